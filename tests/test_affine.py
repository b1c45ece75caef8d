"""The pure NumPy math, against a direct computation and against torch's fusion utility."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from builders import bn_stats
from onnxfold.affine import (
    NotFoldable,
    bn_affine,
    cast_finite,
    fold_bias,
    scale_columns,
    scale_conv_transpose_weight,
    scale_conv_weight,
)


def _conv_nd(x, w, groups):
    """A direct (slow) grouped 'valid' convolution with stride 1, for any dimensionality (torch's)."""
    torch = pytest.importorskip("torch")

    fn = {3: torch.nn.functional.conv1d, 4: torch.nn.functional.conv2d, 5: torch.nn.functional.conv3d}[x.ndim]
    return fn(torch.from_numpy(x), torch.from_numpy(w), groups=groups).numpy()


def _conv_t_nd(x, w, groups):
    torch = pytest.importorskip("torch")

    fn = {3: torch.nn.functional.conv_transpose1d, 4: torch.nn.functional.conv_transpose2d,
          5: torch.nn.functional.conv_transpose3d}[x.ndim]
    return fn(torch.from_numpy(x), torch.from_numpy(w), groups=groups).numpy()


def test_bn_affine_matches_definition():
    rng = np.random.default_rng(1)
    gamma, beta, mean, var = bn_stats(rng, 7, np.float64)
    scale, shift = bn_affine(gamma, beta, mean, var, 1e-3)
    x = rng.normal(size=(5, 7))
    expected = (x - mean) / np.sqrt(var + 1e-3) * gamma + beta
    np.testing.assert_allclose(x * scale + shift, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("var", [0.0, -1.0, np.nan])
def test_bn_affine_rejects_nonpositive_variance(var):
    v = np.array([1.0, var])
    with pytest.raises(NotFoldable, match="var \\+ epsilon"):
        bn_affine(np.ones(2), np.zeros(2), np.zeros(2), v, 0.0)


@settings(max_examples=40, deadline=None)
@given(
    dims=st.integers(1, 3),
    groups=st.integers(1, 3),
    cin_per_group=st.integers(1, 3),
    cout_per_group=st.integers(1, 3),
    transpose=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_scaled_weights_equal_conv_then_affine(dims, groups, cin_per_group, cout_per_group, transpose, seed):
    """conv(x, W') + b' == conv(x, W) * scale + shift, per output channel, for any group count."""
    rng = np.random.default_rng(seed)
    cin, cout = groups * cin_per_group, groups * cout_per_group
    k = (2,) * dims
    x = rng.normal(size=(2, cin) + (4,) * dims)
    scale = rng.uniform(0.2, 3.0, cout) * rng.choice([-1, 1], cout)
    shift = rng.normal(size=cout)
    b = rng.normal(size=cout)
    shape = [1, cout] + [1] * dims
    if transpose:
        w = rng.normal(size=(cin, cout_per_group, *k))
        got = _conv_t_nd(x, np.asarray(scale_conv_transpose_weight(w, scale, groups)), groups)
        want = _conv_t_nd(x, w, groups) * scale.reshape(shape)
    else:
        w = rng.normal(size=(cout, cin_per_group, *k))
        got = _conv_nd(x, np.asarray(scale_conv_weight(w, scale)), groups)
        want = _conv_nd(x, w, groups) * scale.reshape(shape)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(fold_bias(b, scale, shift), b * scale + shift)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_torch_fuse_conv_bn_weights(transpose, bias):
    """An independent oracle: torch.nn.utils.fusion (group = 1, where its transpose path is right)."""
    torch = pytest.importorskip("torch")
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    rng = np.random.default_rng(3)
    w = rng.normal(size=(5, 4, 3, 3)) if not transpose else rng.normal(size=(4, 5, 3, 3))
    b = rng.normal(size=5) if bias else None
    gamma, beta, mean, var = bn_stats(rng, 5, np.float64)
    eps = 1e-3
    t = lambda a: None if a is None else torch.from_numpy(np.asarray(a))  # noqa: E731
    tw, tb = fuse_conv_bn_weights(t(w), t(b), t(mean), t(var), eps, t(gamma), t(beta), transpose=transpose)
    scale, shift = bn_affine(gamma, beta, mean, var, eps)
    ours_w = scale_conv_transpose_weight(w, scale, 1) if transpose else scale_conv_weight(w, scale)
    np.testing.assert_allclose(np.asarray(ours_w), tw.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(fold_bias(b, scale, shift), tb.detach().numpy(), rtol=1e-12, atol=1e-12)


def test_cast_finite_refuses_float16_overflow():
    with pytest.raises(NotFoldable, match="overflows float16"):
        cast_finite(np.array([1.0, 70000.0]), np.float16, "weight")
    assert cast_finite(np.array([1.0, 65504.0]), np.float16, "weight").dtype == np.float16


def test_cast_finite_bfloat16():
    import ml_dtypes

    out = cast_finite(np.array([1.5, -3e38]), ml_dtypes.bfloat16, "weight")
    assert out.dtype == ml_dtypes.bfloat16
    with pytest.raises(NotFoldable, match="overflows bfloat16"):
        cast_finite(np.array([1e39]), ml_dtypes.bfloat16, "weight")


def test_mismatched_channels_are_refused():
    with pytest.raises(NotFoldable, match="output channels"):
        scale_conv_weight(np.ones((4, 2, 3)), np.ones(5))
    with pytest.raises(NotFoldable, match="output columns"):
        scale_columns(np.ones((4, 3)), np.ones(4))
    with pytest.raises(NotFoldable, match="output channels"):
        scale_conv_transpose_weight(np.ones((4, 2, 3)), np.ones(5), 2)
    with pytest.raises(NotFoldable, match="bias has shape"):
        fold_bias(np.ones(3), np.ones(4), np.ones(4))


@pytest.mark.parametrize("block_bytes", [8, 64, 1 << 20])
def test_row_blocks_cover_the_whole_product(block_bytes):
    """Folded weights are made a block of rows at a time: the blocks must tile the full product."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 3, 2, 2)).astype(np.float32)
    s = rng.uniform(0.5, 2, 6)
    lazy = scale_conv_transpose_weight(w, s, 2)
    full = np.concatenate(list(lazy.blocks(block_bytes)))
    np.testing.assert_array_equal(full, np.asarray(lazy))
    assert cast_finite(lazy, np.float32, "weight").shape == w.shape
