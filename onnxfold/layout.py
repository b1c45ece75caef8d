"""Follow a channel axis through a layout op, in pure Python: nothing here knows about ONNX protos.

A producer (Conv, Gemm, MatMul) owns per-channel weights for one axis of its output, the channel
axis, of size ``C``. Between it and a per-channel affine there may be layout ops (Reshape, Flatten,
Transpose, Squeeze, Unsqueeze). The affine folds into the producer only if every element of channel
``c`` is still in channel ``c`` of one output axis after the op. This module computes that axis, or
raises :class:`~onnxfold.affine.NotFoldable` with the reason.

Shapes are tuples of ints, ``None`` for a dimension not known before run time.

Reshape, Flatten, Squeeze and Unsqueeze keep the elements in row-major order. An element at flat
index ``f`` of an input with channel axis ``a`` is in channel ``(f // S_in) % C`` where ``S_in`` is
the product of the input dims after ``a``. At output axis ``j`` of size ``D_j`` it is at index
``(f // S_out) % D_j``. For every ``f`` the two agree exactly when

    D_j == C  and  S_out == S_in     (equivalently, as the totals agree: P_out == P_in,
                                      the products of the dims before each axis)

which is the criterion used here, for C > 1. With C == 1 every size-1 axis qualifies; more than one
candidate is declined as ambiguous. Products are compared as monomials: a known integer times the
unknown dimensions of the input by position (a Reshape ``0`` copies one of them, ``-1`` divides them
out). Two products are equal only when proven so: an unknown never equals a number, and nothing is
guessed from sizes (a square ``[N, C, C]`` layout maps channel axis 1 to one place or declines).
Transpose moves axes without merging them: channel axis ``a`` goes to ``perm.index(a)``.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import NotFoldable

__all__ = [
    "LAYOUT_OPS",
    "AxisMap",
    "Shape",
    "check_channel_axis",
    "follow_flatten",
    "follow_layout",
    "follow_reshape",
    "follow_squeeze",
    "follow_transpose",
    "follow_unsqueeze",
    "normalize_axis",
    "sequence_slices",
    "slice_range",
    "split_affine",
    "split_slices",
]

Shape = tuple[int | None, ...]
Ints = Sequence[int] | np.ndarray  # a list of ints or a constant's value

LAYOUT_OPS = ("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze")


@dataclass(frozen=True)
class AxisMap:
    """Where the channel axis went: its index in the output and the output's shape."""

    axis: int
    shape: Shape


@dataclass(frozen=True)
class _Mono:
    """A product of dimensions: ``coef`` times the unknown input dims named in ``syms``."""

    coef: int
    syms: tuple[tuple[int, int], ...] = ()  # sorted (input position, power)

    @staticmethod
    def of(dim: int | None, pos: int) -> _Mono:
        return _Mono(1, ((pos, 1),)) if dim is None else _Mono(int(dim))

    def __mul__(self, other: _Mono) -> _Mono:
        syms = Counter(dict(self.syms))
        syms.update(dict(other.syms))
        return _Mono(self.coef * other.coef, tuple(sorted(syms.items())))

    def divide(self, other: _Mono) -> _Mono | None:
        """self / other when it is a monomial with an integer coefficient, else None."""
        syms = Counter(dict(self.syms))
        syms.subtract(dict(other.syms))
        if any(v < 0 for v in syms.values()) or other.coef == 0 or self.coef % other.coef:
            return None
        return _Mono(self.coef // other.coef, tuple(sorted((k, v) for k, v in syms.items() if v)))

    @property
    def value(self) -> int | None:
        return None if self.syms else self.coef


def _product(dims: Sequence[_Mono]) -> _Mono:
    out = _Mono(1)
    for d in dims:
        out = out * d
    return out


def normalize_axis(axis: int, rank: int, what: str = "axis") -> int:
    """An axis in [-rank, rank) as a non-negative index, or NotFoldable."""
    axis = int(axis)
    if not -rank <= axis < rank:
        raise NotFoldable(f"{what} {axis} is out of range for rank {rank}")
    return axis + rank if axis < 0 else axis


def _check_input(shape: Sequence[int | None], axis: int) -> tuple[Shape, int, int]:
    shape = tuple(None if d is None else int(d) for d in shape)
    if any(d is not None and d <= 0 for d in shape):
        raise NotFoldable(f"input shape {list(shape)} has a dimension that is not positive")
    axis = normalize_axis(axis, len(shape), "channel axis")
    channels = shape[axis]
    if channels is None:  # the caller may fill it in from the producer's weight
        raise NotFoldable(f"the channel axis {axis} has an unknown size")
    return shape, axis, channels


def _regroup(in_dims: Sequence[_Mono], axis: int, out_dims: Sequence[_Mono], op: str) -> int:
    """The output axis that holds the channel axis of a row-major regrouping, or NotFoldable."""
    channels = in_dims[axis].coef
    before, after = _product(in_dims[:axis]), _product(in_dims[axis + 1 :])
    found = []
    for j, dim in enumerate(out_dims):
        if dim.value != channels:
            continue
        if _product(out_dims[:j]) == before or _product(out_dims[j + 1 :]) == after:
            found.append(j)
    if not found:
        raise NotFoldable(
            f"{op} does not keep the channel axis ({channels} channels) as an axis of its own: "
            "it merges or splits it with other dimensions, or the sizes cannot be proven"
        )
    if len(found) > 1:
        raise NotFoldable(f"{op} leaves the single channel in {len(found)} size-1 axes: ambiguous")
    return found[0]


def _reshape_dims(shape: Shape, target: Sequence[int], allowzero: int) -> list[_Mono]:
    in_dims = [_Mono.of(d, i) for i, d in enumerate(shape)]
    out: list[_Mono | None] = []
    for i, t in enumerate(int(t) for t in target):
        if t == 0 and not allowzero:
            if i >= len(shape):
                raise NotFoldable(f"Reshape copies dimension {i} (0) past the input's rank {len(shape)}")
            out.append(in_dims[i])
        elif t == -1:
            out.append(None)
        elif t <= 0:
            raise NotFoldable(f"Reshape target {list(target)} has a dimension {t} that is not positive")
        else:
            out.append(_Mono(t))
    holes = [i for i, d in enumerate(out) if d is None]
    if len(holes) > 1:
        raise NotFoldable(f"Reshape target {list(target)} has more than one -1")
    if holes:
        rest = _product([d for d in out if d is not None])
        inferred = _product(in_dims).divide(rest)
        if inferred is None:
            raise NotFoldable(f"Reshape cannot prove the size of -1 in {list(target)} from input {list(shape)}")
        out[holes[0]] = inferred
    dims = [d for d in out if d is not None]
    total_in, total_out = _product(in_dims), _product(dims)
    if total_in.value is not None and total_out.value is not None and total_in != total_out:
        raise NotFoldable(f"Reshape from {list(shape)} to {list(target)} changes the element count")
    return dims


def follow_reshape(shape: Sequence[int | None], axis: int, target: Ints, allowzero: int = 0) -> AxisMap:
    """Reshape to the constant ``target`` (``0`` copies the input dim unless allowzero, ``-1`` infers)."""
    shape, axis, _ = _check_input(shape, axis)
    target = [int(t) for t in np.asarray(target).reshape(-1)]
    if allowzero and 0 in target:
        raise NotFoldable("Reshape with allowzero=1 makes an empty tensor")
    in_dims = [_Mono.of(d, i) for i, d in enumerate(shape)]
    out_dims = _reshape_dims(shape, target, allowzero)
    j = _regroup(in_dims, axis, out_dims, "Reshape")
    return AxisMap(j, tuple(d.value for d in out_dims))


def follow_flatten(shape: Sequence[int | None], axis: int, flatten_axis: int = 1) -> AxisMap:
    """Flatten(axis): ``[prod(shape[:axis]), prod(shape[axis:])]``; axis in [-r, r]."""
    shape, axis, _ = _check_input(shape, axis)
    rank = len(shape)
    if not -rank <= flatten_axis <= rank:
        raise NotFoldable(f"Flatten axis {flatten_axis} is out of range for rank {rank}")
    cut = flatten_axis + rank if flatten_axis < 0 else flatten_axis
    in_dims = [_Mono.of(d, i) for i, d in enumerate(shape)]
    out_dims = [_product(in_dims[:cut]), _product(in_dims[cut:])]
    j = _regroup(in_dims, axis, out_dims, f"Flatten(axis={flatten_axis})")
    return AxisMap(j, tuple(d.value for d in out_dims))


def follow_transpose(shape: Sequence[int | None], axis: int, perm: Ints | None = None) -> AxisMap:
    """Transpose: output axis i is input axis perm[i]; perm defaults to the reversed axes."""
    shape, axis, _ = _check_input(shape, axis)
    rank = len(shape)
    perm = list(range(rank))[::-1] if perm is None else [int(p) for p in perm]
    if sorted(perm) != list(range(rank)):
        raise NotFoldable(f"Transpose perm {perm} is not a permutation of {rank} axes")
    return AxisMap(perm.index(axis), tuple(shape[p] for p in perm))


def _squeezed_axes(shape: Shape, axes: Ints | None) -> list[int]:
    rank = len(shape)
    if axes is None:
        if any(d is None for d in shape):
            raise NotFoldable("Squeeze without axes on a shape with unknown dimensions: which axes go is unknown")
        return [i for i, d in enumerate(shape) if d == 1]
    flat = [int(a) for a in np.asarray(axes).reshape(-1)]
    if not flat:  # onnxruntime squeezes every size-1 axis, numpy and the reference none: do not guess
        raise NotFoldable("Squeeze has an empty axes list, which runtimes read differently")
    out = sorted({normalize_axis(a, rank, "Squeeze axis") for a in flat})
    if len(out) != len(flat):
        raise NotFoldable(f"Squeeze axes {flat} repeat an axis")
    for a in out:
        if shape[a] != 1:
            size = "an unknown size" if shape[a] is None else f"size {shape[a]}"
            raise NotFoldable(f"Squeeze axis {a} has {size}, not 1")
    return out


def follow_squeeze(shape: Sequence[int | None], axis: int, axes: Ints | None = None) -> AxisMap:
    """Squeeze the size-1 ``axes`` (all size-1 axes when None); the channel axis must not go."""
    shape, axis, _ = _check_input(shape, axis)
    gone = _squeezed_axes(shape, axes)
    if axis in gone:
        raise NotFoldable(f"Squeeze removes the channel axis {axis}")
    kept = [i for i in range(len(shape)) if i not in gone]
    return AxisMap(kept.index(axis), tuple(shape[i] for i in kept))


def follow_unsqueeze(shape: Sequence[int | None], axis: int, axes: Ints) -> AxisMap:
    """Unsqueeze: ``axes`` index the output (rank r + len(axes)), negative ones counted from its end."""
    shape, axis, _ = _check_input(shape, axis)
    flat = [int(a) for a in np.asarray(axes).reshape(-1)]
    rank = len(shape) + len(flat)
    new = {normalize_axis(a, rank, "Unsqueeze axis") for a in flat}
    if len(new) != len(flat):
        raise NotFoldable(f"Unsqueeze axes {flat} repeat an axis")
    old = iter(shape)
    out = tuple(1 if i in new else next(old) for i in range(rank))
    kept = [i for i in range(rank) if i not in new]
    return AxisMap(kept[axis], out)


def _const(consts: Sequence[Any], index: int) -> np.ndarray | None:
    if len(consts) <= index or consts[index] is None:
        return None
    return np.asarray(consts[index])


def _with_channels(shape: Sequence[int | None], axis: int, channels: int | None) -> list[int | None]:
    out = list(shape)
    if channels is None:
        return out
    axis = normalize_axis(axis, len(out), "channel axis")
    if out[axis] is not None and out[axis] != channels:
        raise NotFoldable(f"the channel axis {axis} has size {out[axis]}, the producer makes {channels} channels")
    out[axis] = int(channels)
    return out


def follow_layout(
    op_type: str,
    shape: Sequence[int | None],
    axis: int,
    attrs: Mapping[str, Any],
    consts: Sequence[Any] = (),
    opset: int = 21,
    channels: int | None = None,
) -> AxisMap:
    """Follow the channel axis through one layout node.

    ``attrs`` are the node's attributes as Python values; ``consts`` has one entry for each input
    the node has after the first (an optional input left out or named "" has none): its constant
    value, or None when it is not a constant. ``opset`` is the ai.onnx opset. ``channels``, the
    producer's channel count, fills in a channel axis that shape inference left unknown, and must
    agree with one it knows.
    """
    shape = _with_channels(shape, axis, channels)
    if op_type == "Reshape":
        target = _const(consts, 0)
        if target is None:
            raise NotFoldable("Reshape's shape is not a constant")
        return follow_reshape(shape, axis, target, int(attrs.get("allowzero", 0)))
    if op_type == "Flatten":
        return follow_flatten(shape, axis, int(attrs.get("axis", 1)))
    if op_type == "Transpose":
        return follow_transpose(shape, axis, attrs.get("perm"))
    if op_type == "Squeeze":
        if opset < 13:
            return follow_squeeze(shape, axis, attrs.get("axes"))
        if len(consts) > 0 and consts[0] is None:
            raise NotFoldable("Squeeze's axes are not a constant")
        return follow_squeeze(shape, axis, _const(consts, 0))
    if op_type == "Unsqueeze":
        axes = attrs.get("axes") if opset < 13 else _const(consts, 0)
        if axes is None:
            raise NotFoldable("Unsqueeze's axes are not a constant")
        return follow_unsqueeze(shape, axis, axes)
    raise NotFoldable(f"{op_type} is not a layout op this fold can follow")


def check_channel_axis(op_type: str, axis: int, channel_axis: int, rank: int) -> None:
    """A Concat or Split must work along the channel axis; NotFoldable otherwise."""
    along = normalize_axis(axis, rank, f"{op_type} axis")
    channel = normalize_axis(channel_axis, rank, "channel axis")
    if along != channel:
        raise NotFoldable(f"{op_type} works along axis {along}, not the channel axis {channel}")


def split_affine(scale: np.ndarray, shift: np.ndarray, counts: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """A per-channel (scale, shift) after Concat of inputs with ``counts`` channels -> one part each."""
    counts = [int(c) for c in counts]
    scale, shift = np.asarray(scale), np.asarray(shift)
    if any(c <= 0 for c in counts):
        raise NotFoldable(f"a Concat input has no channels ({counts})")
    if sum(counts) != scale.shape[0] or shift.shape != scale.shape:
        raise NotFoldable(f"Concat inputs have {sum(counts)} channels in all, the affine has {scale.shape[0]}")
    edges = np.cumsum([0, *counts])
    return [(scale[a:b], shift[a:b]) for a, b in itertools.pairwise(edges)]


def split_slices(
    channels: int,
    outputs: int,
    split: Ints | None = None,
    num_outputs: int | None = None,
    opset: int = 21,
) -> list[tuple[int, int]]:
    """The [start, stop) channels of each Split output, as the ONNX spec says.

    ``split`` is the attribute (opset < 13) or the constant input (opset >= 13); without it the
    channels are split equally, which must divide before opset 18; from opset 18 ``num_outputs`` may
    leave a smaller last chunk (chunks of ceil(channels / num_outputs)).
    """
    if split is not None:
        sizes = [int(s) for s in np.asarray(split).reshape(-1)]
        if len(sizes) != outputs or any(s < 0 for s in sizes) or sum(sizes) != channels:
            raise NotFoldable(f"Split sizes {sizes} do not cut {channels} channels into {outputs} outputs")
    elif opset >= 18 and num_outputs is not None:
        if int(num_outputs) != outputs or outputs < 1:
            raise NotFoldable(f"Split num_outputs={num_outputs} but the node has {outputs} outputs")
        chunk = -(-channels // outputs)
        sizes = [min(chunk, max(0, channels - i * chunk)) for i in range(outputs)]
    else:
        if outputs < 1 or channels % outputs:
            raise NotFoldable(f"Split cannot cut {channels} channels equally into {outputs} outputs")
        sizes = [channels // outputs] * outputs
    edges = np.cumsum([0, *sizes])
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges)]


def slice_range(channels: int, rank: int, channel_axis: int, starts: Ints, ends: Ints, axes: Ints | None = None,
                steps: Ints | None = None) -> tuple[int, int]:
    """The [start, stop) channels a Slice keeps of ``channels`` along ``channel_axis``, as the spec says
    (axes default to 0, 1, ...; negative axes, starts and ends count from the back; starts and ends are
    clamped to [0, channels] for a positive step). The whole range when the Slice does not cut the
    channel axis; NotFoldable when it steps along it by anything but 1 or repeats an axis."""
    st, en = [int(v) for v in np.asarray(starts).reshape(-1)], [int(v) for v in np.asarray(ends).reshape(-1)]
    ax = list(range(len(st))) if axes is None else [int(v) for v in np.asarray(axes).reshape(-1)]
    sp = [1] * len(st) if steps is None else [int(v) for v in np.asarray(steps).reshape(-1)]
    if not len(st) == len(en) == len(ax) == len(sp):
        raise NotFoldable(f"the Slice has {len(st)} starts, {len(en)} ends, {len(ax)} axes and {len(sp)} steps")
    ax = [normalize_axis(a, rank, "Slice axis") for a in ax]
    if len(set(ax)) != len(ax):
        raise NotFoldable(f"the Slice's axes {ax} repeat an axis (the specification leaves that undefined)")
    channel_axis = normalize_axis(channel_axis, rank, "channel axis")
    if channel_axis not in ax:
        return 0, channels
    k = ax.index(channel_axis)
    if sp[k] != 1:
        raise NotFoldable(f"the Slice steps by {sp[k]} along the channel axis {channel_axis}, not 1")

    def clamp(v: int) -> int:
        return min(max(v + channels if v < 0 else v, 0), channels)

    lo, hi = clamp(st[k]), clamp(en[k])
    return lo, max(lo, hi)


def sequence_slices(channels: int, split: Ints | None, keepdims: int = 1) -> list[tuple[int, int]]:
    """The [start, stop) channels of each tensor SplitToSequence makes, as the spec says: ``split`` a
    scalar (chunks of that size, the last one alone maybe smaller), a 1-D tensor (the sizes, summing to
    ``channels``), or absent (chunks of 1, which lose the axis when keepdims=0: declined)."""
    if split is None:
        if not keepdims:
            raise NotFoldable("SplitToSequence without split and with keepdims=0 drops the channel axis")
        return [(c, c + 1) for c in range(channels)]
    arr = np.asarray(split)
    if arr.ndim == 0:
        size = int(arr)
        if size <= 0:
            raise NotFoldable(f"SplitToSequence's split {size} is not positive")
        return [(lo, min(lo + size, channels)) for lo in range(0, channels, size)]
    sizes = [int(v) for v in arr.reshape(-1)]
    if arr.ndim != 1 or any(v < 0 for v in sizes) or sum(sizes) != channels:
        raise NotFoldable(f"SplitToSequence's split {sizes} does not cut {channels} channels")
    edges = np.cumsum([0, *sizes])
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges)]
