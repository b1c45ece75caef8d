"""Input-side folds (Gemm, MatMul, padded Conv) against a direct float64 computation.

Tolerance: float64 throughout, relative 1e-10 (the fold reorders a few sums of products).
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from builders import bn_stats
from onnxfold.affine import NotFoldable, bn_affine
from onnxfold.affine_input import (
    check_pad_commutes,
    conv_input_affine,
    gemm_input_affine,
    matmul_input_affine,
    pad_amounts,
)

RTOL, ATOL = 1e-10, 1e-10


def _gemm(a, b, c, trans_a, trans_b, alpha, beta):
    a2 = a.T if trans_a else a
    b2 = b.T if trans_b else b
    y = alpha * a2 @ b2
    return y if c is None else y + beta * c


def _affine(rng, k):
    gamma, beta, mean, var = bn_stats(rng, k, np.float64)
    return bn_affine(gamma, beta, mean, var, 1e-5)


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 5), st.integers(1, 6), st.integers(1, 4), st.booleans(), st.booleans(),
    st.sampled_from([None, "N", "1N", "MN", "1", "scalar", "M1"]),
    st.sampled_from([1.0, 0.5, -2.0]), st.sampled_from([1.0, 0.25, -3.0]),
    st.booleans(), st.integers(0, 2**31 - 1),
)
def test_gemm_input_affine(m, k, n, trans_a, trans_b, c_kind, alpha, beta, zero_shift, seed):
    rng = np.random.default_rng(seed)
    scale, shift = _affine(rng, k)
    if zero_shift:
        shift = np.zeros(k)
    x = rng.normal(size=(m, k))
    b = rng.normal(size=(n, k) if trans_b else (k, n))
    c_shape = {None: None, "N": (n,), "1N": (1, n), "MN": (m, n), "1": (1,), "scalar": (), "M1": (m, 1)}[c_kind]
    c = None if c_shape is None else rng.normal(size=c_shape)
    xa = x * scale + shift  # the affine on A' = [M, K]
    want = _gemm(xa.T if trans_a else xa, b, c, trans_a, trans_b, alpha, beta)
    new_b, new_c, new_beta = gemm_input_affine(b, c, scale, shift, trans_b=int(trans_b), alpha=alpha, beta=beta)
    assert new_b.shape == b.shape
    got = _gemm(x.T if trans_a else x, new_b, new_c, trans_a, trans_b, alpha, new_beta)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    if zero_shift:
        assert new_beta == beta and (new_c is None) == (c is None)
    if c is not None:  # C' must still be a valid Gemm C: unidirectionally broadcastable to [M, N]
        assert np.broadcast_shapes(new_c.shape, (m, n)) == (m, n)


def test_gemm_beta_zero_with_shift_declines_and_without_shift_folds():
    rng = np.random.default_rng(0)
    scale, shift = _affine(rng, 3)
    b, c = rng.normal(size=(3, 2)), rng.normal(size=(2,))
    with pytest.raises(NotFoldable, match="beta = 0"):
        gemm_input_affine(b, c, scale, shift, beta=0.0)
    new_b, new_c, new_beta = gemm_input_affine(b, c, scale, np.zeros(3), beta=0.0)
    np.testing.assert_array_equal(new_c, c)
    assert new_beta == 0.0
    np.testing.assert_allclose(new_b, b * scale[:, None])


def test_gemm_declines_on_wrong_sizes():
    with pytest.raises(NotFoldable, match="reduces over 4 input features, the affine has 3"):
        gemm_input_affine(np.ones((4, 2)), None, np.ones(3), np.ones(3))
    with pytest.raises(NotFoldable, match="reduces over 2 input features"):
        gemm_input_affine(np.ones((3, 2)), None, np.ones(3), np.ones(3), trans_b=1)
    with pytest.raises(NotFoldable, match="does not broadcast"):
        gemm_input_affine(np.ones((3, 2)), np.ones((2, 3)), np.ones(3), np.ones(3))
    with pytest.raises(NotFoldable, match="scale has 3 values, its shift 2"):
        gemm_input_affine(np.ones((3, 2)), None, np.ones(3), np.ones(2))


@pytest.mark.parametrize("w_shape, x_shape", [((4, 3), (5, 4)), ((4, 3), (2, 5, 4)), ((2, 4, 3), (2, 5, 4)),
                                              ((4, 3), (4,)), ((2, 1, 4, 3), (3, 5, 4))])
@pytest.mark.parametrize("zero_shift", [False, True])
def test_matmul_input_affine(w_shape, x_shape, zero_shift):
    rng = np.random.default_rng(len(w_shape) * 10 + len(x_shape))
    scale, shift = _affine(rng, 4)
    if zero_shift:
        shift = np.zeros(4)
    w, x = rng.normal(size=w_shape), rng.normal(size=x_shape)
    want = np.matmul(x * scale + shift, w)
    new_w, added = matmul_input_affine(w, scale, shift)
    got = np.matmul(x, new_w)
    if zero_shift:
        assert added is None
    else:
        got = got + added
        assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_matmul_declines():
    with pytest.raises(NotFoldable, match="rank 1"):
        matmul_input_affine(np.ones(4), np.ones(4), np.zeros(4))
    with pytest.raises(NotFoldable, match="reduces over 4 input features, the affine has 3"):
        matmul_input_affine(np.ones((4, 2)), np.ones(3), np.zeros(3))


@pytest.mark.parametrize("group, c_in, m", [(1, 4, 6), (2, 4, 6), (4, 4, 8)])
@pytest.mark.parametrize("padding", [0, 1, 2])
@pytest.mark.parametrize("bias", [False, True])
def test_conv_input_scale_commutes_with_padding(group, c_in, m, padding, bias):
    rng = np.random.default_rng(group * 100 + padding * 10 + bias)
    scale, shift = _affine(rng, c_in)
    x = rng.normal(size=(2, c_in, 7, 6))
    w = rng.normal(size=(m, c_in // group, 3, 3))
    b = rng.normal(size=m) if bias else None
    torch = pytest.importorskip("torch")  # the reference Conv
    tb = None if b is None else torch.from_numpy(b)

    def conv(xx, ww, bb):
        out = torch.nn.functional.conv2d(torch.from_numpy(xx), torch.from_numpy(ww), bb, padding=padding, groups=group)
        return out.numpy()

    want = conv(x * scale.reshape(1, -1, 1, 1), w, tb)
    new_w, new_b = conv_input_affine(w, b, scale, np.zeros(c_in), group, padded=padding > 0)
    got = conv(x, np.asarray(new_w), torch.from_numpy(new_b))
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    if padding:
        with pytest.raises(NotFoldable, match="shift does not commute with padding"):
            conv_input_affine(w, b, scale, shift, group, padded=True)
    else:  # unpadded: the shift folds too
        want = conv(x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1), w, tb)
        new_w, new_b = conv_input_affine(w, b, scale, shift, group, padded=False)
        np.testing.assert_allclose(conv(x, np.asarray(new_w), torch.from_numpy(new_b)), want, rtol=RTOL, atol=ATOL)


# -- issue 19: an affine through a Pad ---------------------------------------------------------------


def _np_pad(x, amounts, mode, value=0.0):
    """ONNX Pad by numpy (positive amounts; ONNX wrap is numpy's wrap)."""
    r = x.ndim
    width = [(amounts[i], amounts[i + r]) for i in range(r)]
    return np.pad(x, width, mode=mode, constant_values=value) if mode == "constant" else np.pad(x, width, mode=mode)


@pytest.mark.parametrize("mode", ["reflect", "edge", "wrap", "constant"])
@pytest.mark.parametrize("seed", range(5))
def test_pad_commutes_where_check_pad_commutes_says(mode, seed):
    """The claim in affine_input's docstring, on random data: where check_pad_commutes passes,
    pad(x * s + t) == pad(x) * s + t; where it declines, the two differ."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, 3, 4, 5))
    s, t = rng.uniform(0.5, 2, 3), rng.normal(size=3) * (seed % 2)  # odd seeds: a shift
    amounts = [int(rng.integers(0, 2)) if i not in (1, 5) else 0 for i in range(8)]
    amounts[2] = 1  # something is padded
    s4, t4 = s.reshape(1, 3, 1, 1), t.reshape(1, 3, 1, 1)
    left = _np_pad(x * s4 + t4, amounts, mode)
    right = _np_pad(x, amounts, mode) * s4 + t4
    try:
        check_pad_commutes(mode, amounts, 0.0, t)
    except NotFoldable:
        assert mode == "constant" and np.any(t) and not np.allclose(left, right)
    else:
        np.testing.assert_allclose(left, right, rtol=1e-12, atol=1e-12)


def test_pad_checks():
    assert pad_amounts([1, 2], [-1], 3) == [0, 0, 1, 0, 0, 2]
    assert pad_amounts([0, 0, 1, 0, 0, 2]) == [0, 0, 1, 0, 0, 2]
    with pytest.raises(NotFoldable, match="repeat an axis"):
        pad_amounts([1, 1, 1, 1], [2, -1], 3)
    with pytest.raises(NotFoldable, match="changes the channel axis 1"):
        check_pad_commutes("reflect", [0, 1, 0, 0, 0, 0], 0.0, None)
    with pytest.raises(NotFoldable, match="fills with the constant 2"):
        check_pad_commutes("constant", [0, 0, 1, 0, 0, 0], 2.0, None)
    check_pad_commutes("constant", [0, 0, -1, 0, 0, 0], 2.0, np.ones(3))  # a crop fills nothing
