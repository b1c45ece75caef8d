"""Following a channel axis through layout ops, checked element by element against NumPy.

Every element of the input holds its channel index; the claimed output axis must hold, at index c,
only elements of channel c. A decline on a fully known shape with C > 1 must mean that no output
axis holds the channels (the criterion is exact, not merely safe).
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxfold.affine import NotFoldable
from onnxfold.layout import (
    AxisMap,
    check_channel_axis,
    follow_flatten,
    follow_layout,
    follow_reshape,
    follow_squeeze,
    follow_transpose,
    follow_unsqueeze,
    sequence_slices,
    slice_range,
    split_affine,
    split_slices,
)


def _labelled(shape, axis):
    """An array whose every element is its index along ``axis``."""
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return np.broadcast_to(np.arange(shape[axis]).reshape(view), shape).copy()


def _holds_channels(y, j, channels):
    """Does axis j of y hold channel c (and only c) at index c?"""
    if y.shape[j] != channels:
        return False
    return bool(np.all(np.moveaxis(y, j, 0) == np.arange(channels).reshape(-1, *[1] * (y.ndim - 1))))


def _check(result, y, channels, masked):
    assert _holds_channels(y, result.axis, channels)
    assert len(result.shape) == y.ndim
    for got, real in zip(result.shape, y.shape):
        assert got is None or got == real
    if not any(d is None for d in masked):
        assert result.shape == y.shape


def _any_axis_holds(y, channels):
    return [j for j in range(y.ndim) if _holds_channels(y, j, channels)]


def _factor(n, draw):
    out = []
    while n > 1:
        divisors = [d for d in range(2, n + 1) if n % d == 0]
        d = draw(st.sampled_from(divisors))
        out.append(d)
        n //= d
    return out


@st.composite
def shapes(draw, max_rank=4):
    shape = draw(st.lists(st.integers(1, 4), min_size=1, max_size=max_rank))
    axis = draw(st.integers(0, len(shape) - 1))
    masked = [None if draw(st.booleans()) and i != axis and draw(st.booleans()) else d for i, d in enumerate(shape)]
    return shape, axis, masked


@st.composite
def reshape_cases(draw):
    shape, axis, masked = draw(shapes())
    target: list[int] = []
    i = 0
    while i < len(shape):  # regroup: keep, merge with the next, or split into factors; maybe insert 1s
        how = draw(st.sampled_from(["keep", "merge", "split", "one"]))
        if how == "merge" and i + 1 < len(shape):
            target.append(shape[i] * shape[i + 1])
            i += 2
            continue
        if how == "split":
            target.extend(_factor(shape[i], draw) or [1])
        elif how == "one":
            target.extend([1, shape[i]])
        else:
            target.append(shape[i])
        i += 1
    if draw(st.booleans()):  # a random factorization of the total instead
        target = _factor(math.prod(shape), draw) or [1]
        target = draw(st.permutations(target))
    spec = list(target)
    for k in range(min(len(spec), len(shape))):
        if spec[k] == shape[k] and draw(st.booleans()):
            spec[k] = 0
    if draw(st.booleans()):
        spec[draw(st.integers(0, len(spec) - 1))] = -1
    return shape, axis, masked, list(target), spec


@settings(max_examples=400, deadline=None)
@given(reshape_cases())
def test_reshape_claims_hold_and_declines_are_exact(case):
    shape, axis, masked, target, spec = case
    x = _labelled(shape, axis)
    y = x.reshape(target)
    channels = shape[axis]
    try:
        result = follow_reshape(masked, axis, spec)
    except NotFoldable as e:
        assert str(e)
        if channels > 1 and not any(d is None for d in masked):
            assert _any_axis_holds(y, channels) == [], (shape, axis, spec)
        return
    _check(result, y, channels, masked)


@settings(max_examples=300, deadline=None)
@given(shapes(), st.integers(-5, 5))
def test_flatten_claims_hold_and_declines_are_exact(case, cut):
    shape, axis, masked = case
    if not -len(shape) <= cut <= len(shape):
        with pytest.raises(NotFoldable, match="out of range"):
            follow_flatten(masked, axis, cut)
        return
    c = cut + len(shape) if cut < 0 else cut
    y = _labelled(shape, axis).reshape(math.prod(shape[:c]), math.prod(shape[c:]))
    try:
        result = follow_flatten(masked, axis, cut)
    except NotFoldable:
        if shape[axis] > 1 and not any(d is None for d in masked):
            assert _any_axis_holds(y, shape[axis]) == []
        return
    _check(result, y, shape[axis], masked)


@settings(max_examples=200, deadline=None)
@given(shapes(), st.data())
def test_transpose_moves_the_channel_axis(case, data):
    shape, axis, masked = case
    perm = data.draw(st.one_of(st.none(), st.permutations(range(len(shape)))))
    y = np.transpose(_labelled(shape, axis), perm)
    result = follow_transpose(masked, axis, perm)
    _check(result, y, shape[axis], masked)


@settings(max_examples=200, deadline=None)
@given(shapes(), st.data())
def test_squeeze_keeps_the_channel_axis(case, data):
    shape, axis, masked = case
    ones = [i for i, d in enumerate(shape) if d == 1]
    some = st.lists(st.sampled_from(ones), unique=True, min_size=1) if ones else st.none()
    axes = data.draw(st.one_of(st.none(), some))
    if axes is not None:
        axes = [a - len(shape) if data.draw(st.booleans()) else a for a in axes]
    masked = [1 if d == 1 else m for d, m in zip(shape, masked)]  # a squeezed axis has a known size
    x = _labelled(shape, axis)
    gone = ones if axes is None else [a % len(shape) for a in axes]
    if axes is None and None in masked:
        with pytest.raises(NotFoldable, match="which axes go is unknown"):
            follow_squeeze(masked, axis, axes)
        return
    if axis in gone:
        with pytest.raises(NotFoldable, match="removes the channel axis"):
            follow_squeeze(masked, axis, axes)
        return
    result = follow_squeeze(masked, axis, axes)
    _check(result, np.squeeze(x, axis=tuple(gone)), shape[axis], masked)


@settings(max_examples=200, deadline=None)
@given(shapes(), st.data())
def test_unsqueeze_keeps_the_channel_axis(case, data):
    shape, axis, masked = case
    rank = len(shape) + data.draw(st.integers(1, 3))
    new = rank - len(shape)
    axes = data.draw(st.lists(st.integers(0, rank - 1), min_size=new, max_size=new, unique=True))
    axes = [a - rank if data.draw(st.booleans()) else a for a in axes]
    y = np.expand_dims(_labelled(shape, axis), tuple(axes))
    _check(follow_unsqueeze(masked, axis, axes), y, shape[axis], masked)


# --- the architectures' own layouts ------------------------------------------------------------


def test_levit_flatten_keeps_channels_last():
    assert follow_flatten((None, 49, 384), 2, 2) == AxisMap(1, (None, 384))
    assert follow_reshape((None, 49, 384), 2, [-1, 384]) == AxisMap(1, (None, 384))
    assert follow_reshape((8, 49, 384), 2, [-1, 384]) == AxisMap(1, (392, 384))


def test_levit_reshape_back():
    assert follow_reshape((392, 384), 1, [8, 49, 384]) == AxisMap(2, (8, 49, 384))
    assert follow_reshape((392, 384), 1, [8, -1, 384]) == AxisMap(2, (8, 49, 384))


def test_copied_unknown_batch_is_proven_symbolically():
    assert follow_reshape((None, 64, 7, 7), 1, [0, 64, -1]) == AxisMap(1, (None, 64, 49))
    assert follow_reshape((None, 64, 7, 7), 1, [0, -1, 49]) == AxisMap(1, (None, 64, 49))


def test_ocr_squeeze_height():
    assert follow_squeeze((None, 256, 1, None), 1, [2]) == AxisMap(1, (None, 256, None))
    assert follow_squeeze((4, 256, 1, 25), 1, None) == AxisMap(1, (4, 256, 25))


def test_merging_leading_ones_is_fine():
    assert follow_reshape((1, 1, 32, 5), 2, [32, 5]) == AxisMap(0, (32, 5))
    assert follow_flatten((1, 32, 5), 1, 2) == AxisMap(0, (32, 5))


def test_square_layout_maps_to_one_place():
    # [N, C, C] reshaped to itself: channel axis 1 stays at 1, never 2
    assert follow_reshape((3, 4, 4), 1, [3, 4, 4]) == AxisMap(1, (3, 4, 4))
    assert follow_reshape((3, 4, 4), 2, [0, 0, 0]) == AxisMap(2, (3, 4, 4))
    # a transpose of a square layout is followed by perm, not by size
    assert follow_transpose((3, 4, 4), 1, [0, 2, 1]) == AxisMap(2, (3, 4, 4))


# --- each reason to decline ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, axis, target, reason",
    [
        ((2, 3, 4), 1, [6, 4], "merges or splits"),  # channel merged with the batch
        ((2, 3, 4), 1, [2, 12], "merges or splits"),  # channel merged with the trailing axis
        ((2, 6, 4), 1, [2, 3, 2, 4], "merges or splits"),  # channel split in two
        ((2, 3, 4), 1, [3, 2, 4], "merges or splits"),  # a 3 in front, but it is not the channel axis
        ((2, 3, 4), 2, [3, 2, 4], None),  # the leading dims regroup; the last axis stays (control)
        ((4, 4), 0, [4, 4], None),  # identity on a square: fine (control)
        ((4, 4), 0, [2, 2, 4], "merges or splits"),  # channel 0 of [4, 4] split; the 4 at the end is not it
        ((None, 3, 4), 1, [-1, 4], "merges or splits"),
        ((None, 3, None), 1, [0, 3, 5], None),  # the copied batch proves it (Reshape fails unless W = 5)
        ((2, None, 3), 2, [2, 3, -1], "merges or splits"),  # holds only if the unknown is 1: not provable
        ((2, 3, 4), 1, [-1, -1], "more than one -1"),
        ((2, 3, 4), 1, [5, -1], "cannot prove the size of -1"),
        ((2, 3, 4), 1, [2, 3, 5], "changes the element count"),
        ((2, 3, 4), 1, [2, -2, 4], "not positive"),
        ((2, 3), 1, [2, 3, 0], "past the input's rank"),
        ((2, 1), 1, [2, 1, 1], "ambiguous"),
    ],
)
def test_reshape_declines(shape, axis, target, reason):
    if reason is None:
        assert follow_reshape(shape, axis, target).axis == axis
        return
    with pytest.raises(NotFoldable, match=reason):
        follow_reshape(shape, axis, target)


def test_reshape_allowzero_and_bad_input_decline():
    with pytest.raises(NotFoldable, match="allowzero"):
        follow_reshape((2, 3), 1, [0, 3], allowzero=1)
    with pytest.raises(NotFoldable, match="not positive"):
        follow_reshape((0, 3), 1, [-1, 3])
    with pytest.raises(NotFoldable, match="unknown size"):
        follow_reshape((2, None), 1, [2, -1])
    with pytest.raises(NotFoldable, match="out of range"):
        follow_reshape((2, 3), 2, [2, 3])


def test_reshape_allowzero_without_zero_behaves_as_usual():
    assert follow_reshape((2, 3, 4), 1, [2, 3, 4], allowzero=1) == AxisMap(1, (2, 3, 4))


def test_flatten_declines_when_merging_the_channel():
    with pytest.raises(NotFoldable, match=r"Flatten\(axis=1\)"):
        follow_flatten((2, 3, 4), 1, 1)  # [2, 12]
    with pytest.raises(NotFoldable, match="merges or splits"):
        follow_flatten((2, 3, 4), 1, 3)  # [24, 1]


def test_transpose_and_squeeze_and_unsqueeze_decline():
    with pytest.raises(NotFoldable, match="not a permutation"):
        follow_transpose((2, 3, 4), 1, [0, 1, 1])
    with pytest.raises(NotFoldable, match="removes the channel axis"):
        follow_squeeze((2, 1, 4), 1, [1])
    with pytest.raises(NotFoldable, match="size 4, not 1"):
        follow_squeeze((2, 3, 4), 1, [2])
    with pytest.raises(NotFoldable, match="unknown size, not 1"):
        follow_squeeze((2, 3, None), 1, [2])
    with pytest.raises(NotFoldable, match="which axes go is unknown"):
        follow_squeeze((None, 3, 1), 1, None)
    with pytest.raises(NotFoldable, match="empty axes list"):
        follow_squeeze((2, 3, 1), 1, np.array([], dtype=np.int64))
    with pytest.raises(NotFoldable, match="repeat"):
        follow_squeeze((2, 3, 1), 1, [2, -1])
    with pytest.raises(NotFoldable, match="repeat"):
        follow_unsqueeze((2, 3), 1, [0, -4])
    with pytest.raises(NotFoldable, match="out of range"):
        follow_unsqueeze((2, 3), 1, [3])


# --- the dispatcher: attributes against inputs by opset --------------------------------------------


def test_follow_layout_by_opset():
    assert follow_layout("Squeeze", (2, 3, 1), 1, {"axes": [2]}, (), opset=11) == AxisMap(1, (2, 3))
    assert follow_layout("Squeeze", (2, 3, 1), 1, {}, (np.array([-1]),), opset=13) == AxisMap(1, (2, 3))
    assert follow_layout("Squeeze", (1, 3, 1), 1, {}, (), opset=13) == AxisMap(0, (3,))
    assert follow_layout("Unsqueeze", (2, 3), 1, {"axes": [0]}, (), opset=11) == AxisMap(2, (1, 2, 3))
    assert follow_layout("Unsqueeze", (2, 3), 1, {}, (np.array([0]),), opset=13) == AxisMap(2, (1, 2, 3))
    assert follow_layout("Flatten", (2, 3, 4), 2, {"axis": 2}) == AxisMap(1, (6, 4))
    assert follow_layout("Transpose", (2, 3, 4), 0, {}) == AxisMap(2, (4, 3, 2))
    assert follow_layout("Reshape", (2, 3, 4), 2, {}, (np.array([6, 4]),)) == AxisMap(1, (6, 4))


@pytest.mark.parametrize(
    "op, attrs, consts, opset, reason",
    [
        ("Reshape", {}, (None,), 21, "shape is not a constant"),
        ("Squeeze", {}, (None,), 13, "axes are not a constant"),
        ("Unsqueeze", {}, (None,), 13, "axes are not a constant"),
        ("Unsqueeze", {}, (), 11, "axes are not a constant"),
        ("Slice", {}, (), 21, "not a layout op"),
    ],
)
def test_follow_layout_declines(op, attrs, consts, opset, reason):
    with pytest.raises(NotFoldable, match=reason):
        follow_layout(op, (2, 3, 1), 1, attrs, consts, opset)


# --- Concat and Split -----------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=4), st.integers(0, 2**31 - 1))
def test_split_affine_matches_concat(counts, seed):
    rng = np.random.default_rng(seed)
    scale, shift = rng.normal(size=sum(counts)), rng.normal(size=sum(counts))
    xs = [rng.normal(size=(2, c, 3)) for c in counts]
    want = np.concatenate(xs, axis=1) * scale.reshape(1, -1, 1) + shift.reshape(1, -1, 1)
    parts = split_affine(scale, shift, counts)
    got = np.concatenate([x * s.reshape(1, -1, 1) + t.reshape(1, -1, 1) for x, (s, t) in zip(xs, parts)], axis=1)
    np.testing.assert_array_equal(got, want)


def test_split_affine_declines():
    with pytest.raises(NotFoldable, match="5 channels in all"):
        split_affine(np.ones(4), np.zeros(4), [2, 3])
    with pytest.raises(NotFoldable, match="no channels"):
        split_affine(np.ones(4), np.zeros(4), [4, 0])


@pytest.mark.parametrize(
    "channels, outputs, split, num_outputs, opset",
    [(12, 3, None, None, 13), (12, 2, [5, 7], None, 13), (10, 3, None, 3, 18), (12, 4, None, 4, 18),
     (7, 2, [7, 0], None, 11), (9, 3, None, None, 18)],
)
def test_split_slices_match_numpy(channels, outputs, split, num_outputs, opset):
    slices = split_slices(channels, outputs, split, num_outputs, opset)
    x = _labelled((2, channels, 3), 1)
    if split is not None:
        parts = np.split(x, np.cumsum(split)[:-1], axis=1)
    elif num_outputs is not None:
        chunk = -(-channels // num_outputs)
        parts = [x[:, i * chunk : (i + 1) * chunk] for i in range(num_outputs)]
    else:
        parts = np.split(x, outputs, axis=1)
    assert len(slices) == outputs
    for (a, b), part in zip(slices, parts):
        np.testing.assert_array_equal(x[:, a:b], part)
    assert slices[-1][1] == channels


@pytest.mark.parametrize(
    "channels, outputs, split, num_outputs, opset, reason",
    [(10, 3, None, None, 13, "equally"), (10, 3, None, 3, 17, "equally"), (10, 2, [4, 5], None, 13, "do not cut"),
     (10, 2, [4, 6, 0], None, 13, "do not cut"), (10, 2, None, 3, 18, "num_outputs=3")],
)
def test_split_slices_decline(channels, outputs, split, num_outputs, opset, reason):
    with pytest.raises(NotFoldable, match=reason):
        split_slices(channels, outputs, split, num_outputs, opset)


def test_concat_and_split_must_be_along_the_channel_axis():
    check_channel_axis("Concat", 1, 1, 4)
    check_channel_axis("Split", -3, 1, 4)
    check_channel_axis("Concat", -1, 2, 3)
    with pytest.raises(NotFoldable, match="Split works along axis 2, not the channel axis 1"):
        check_channel_axis("Split", 2, 1, 4)
    with pytest.raises(NotFoldable, match="Concat works along axis 0, not the channel axis 1"):
        check_channel_axis("Concat", -4, 1, 4)
    with pytest.raises(NotFoldable, match="Concat axis 4 is out of range"):
        check_channel_axis("Concat", 4, 1, 4)


def test_at_least_as_careful_as_onnxruntime_on_square_layouts():
    """onnxruntime 1.32 leaves MatMul [4, 4] -> Transpose -> BN(4) and MatMul [4, 4] -> Reshape [2, 4, 2] -> BN(4).

    Sizes match in both (4 channels), but the BN's axis 1 is not the MatMul's output-column axis: the
    Transpose moves the columns to axis 0 and the Reshape splits them across axes 0 and 2.
    """
    assert follow_transpose((4, 4), 1, [1, 0]).axis == 0  # not BN's channel axis 1: the fold must decline
    with pytest.raises(NotFoldable, match="merges or splits"):
        follow_reshape((4, 4), 1, [2, 4, 2])
    assert follow_reshape((4, 4), 1, [4, 4]) == AxisMap(1, (4, 4))  # onnxruntime folds this one too


def test_follow_layout_takes_the_channel_count_from_the_producer():
    attrs = {"axis": 2}
    assert follow_layout("Flatten", (None, None, None), 2, attrs, channels=32) == AxisMap(1, (None, 32))
    assert follow_layout("Flatten", (None, None, 32), 2, attrs, channels=32) == AxisMap(1, (None, 32))
    with pytest.raises(NotFoldable, match="unknown size"):
        follow_layout("Flatten", (None, None, None), 2, attrs)
    with pytest.raises(NotFoldable, match="has size 16, the producer makes 32 channels"):
        follow_layout("Flatten", (None, None, 16), 2, attrs, channels=32)


# -- issue 19: the channels a Slice keeps, the chunks SplitToSequence makes -------------------------


@pytest.mark.parametrize("seed", range(20))
def test_slice_range_against_numpy(seed):
    """slice_range gives the channels numpy's basic slicing keeps (ONNX Slice with step 1 is numpy's)."""
    rng = np.random.default_rng(seed)
    c = int(rng.integers(1, 9))
    start, end = (int(v) for v in rng.integers(-12, 12, 2))
    if seed % 4 == 0:
        end = 2**62
    kept = np.arange(c)[start:end]
    lo, hi = slice_range(c, 4, 1, [start], [end], [1 - 4 * (seed % 2)])  # axis 1, or -3
    assert list(range(lo, hi)) == kept.tolist()
    assert slice_range(c, 4, 1, [0], [2], [2]) == (0, c)  # another axis: every channel


def test_slice_range_declines_and_sequence_slices():
    with pytest.raises(NotFoldable, match="steps by 2"):
        slice_range(6, 4, 1, [0], [6], [1], [2])
    with pytest.raises(NotFoldable, match="repeat an axis"):
        slice_range(6, 4, 1, [0, 0], [6, 6], [1, -3])
    assert sequence_slices(7, np.int64(3)) == [(0, 3), (3, 6), (6, 7)]
    assert sequence_slices(7, np.array([2, 5])) == [(0, 2), (2, 7)]
    assert sequence_slices(2, None) == [(0, 1), (1, 2)]
    with pytest.raises(NotFoldable, match="keepdims=0"):
        sequence_slices(2, None, keepdims=0)
    with pytest.raises(NotFoldable, match="does not cut"):
        sequence_slices(7, np.array([2, 4]))
