"""The arithmetic of merging parallel branches into one Conv, in pure NumPy (nothing here knows ONNX).

A re-parameterizable block (RepVGG, MobileOne, ACNet, Diverse Branch Block) sums branches that all read
one tensor X. Each branch is a linear map of X that a Conv can state: a :class:`Kernel` (a weight
``[M, C/group, k...]``, a bias ``[M]``, its pads, strides and dilations). A branch is built from X
stage by stage:

- X itself is the identity: a per-channel kernel (``weight [C, 1, 1...]`` of ones, ``per_channel``),
  which fits a Conv of any group: in a Conv of group g it is the kernel with
  ``W[m, m mod (C/g)] = 1`` (:func:`regroup`; depthwise is g = C).
- A per-channel affine after a kernel scales its rows: ``W'[m] = W[m] * s[m]``, ``b' = b * s + t``
  (:func:`then_affine`); after the identity that is the identity scaled by s, with bias t.
- A k x k AveragePool with count_include_pad=1 (or no padding) is the per-channel kernel of taps
  1/prod(k) (:func:`average_pool`); with count_include_pad=0 and padding, the divisor changes at the
  border, which no Conv does.
- A Conv after a pointwise kernel (1x1, stride 1, no padding: a 1x1 Conv, an affine, the identity)
  composes: ``W[m, j] = sum_l W2[m, l] W1[l, j]`` within each group and ``b = b2 + sum_{l,k} W2[m, l, k] b1[l]``
  (:func:`then_kernel`). The second's zero padding pads the first's output, where the first made its bias
  b1, not 0: exact only when the second has no padding or b1 = 0. A pool after a pointwise kernel is
  the same composition.

The branches then sum (:func:`merge`) into one kernel, each zero-padded into the largest at the offset
its pads imply. Along one spatial axis a kernel of size k, dilation d, pads (p0, p1) reads input
positions ``o*s - p0 + d*i``, i < k: in the merged kernel of size K with begin pad P0 its tap i is tap
``i + (P0 - p0) / d``. That is exact when every offset is a whole number and every branch makes the
same number of outputs (``p0 + p1 - d*(k-1)`` the same), so that the offsets agree on both sides: a
3x3 with pads 1, a 1x1 with pads 0, ACNet's 1x3 with pads (0, 1) and 3x1 with pads (1, 0). The strides,
the dilations (of kernels larger than 1x1) and the groups of the branches that are not per-channel
must be equal.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .errors import NotFoldable

__all__ = ["Kernel", "identity", "average_pool", "then_affine", "then_kernel", "regroup", "merge", "stack",
           "is_pointwise"]


@dataclass
class Kernel:
    """A linear map of X that one Conv computes (float64)."""

    weight: np.ndarray  # [M, C/group, k...]
    bias: np.ndarray  # [M]
    group: int
    begins: tuple[int, ...]
    ends: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    per_channel: bool = False  # weight [C, 1, k...] acts on each channel alone: it fits any group

    @property
    def spatial(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def channels(self) -> int:
        return int(self.weight.shape[0])

    def describe(self) -> str:
        size = "x".join(str(k) for k in self.spatial) or "scalar"
        return f"{size} kernel with pads {[*self.begins, *self.ends]}"


def identity(channels: int, dims: int) -> Kernel:
    """X itself: a 1x1 per-channel kernel of ones."""
    ones = (1,) * dims
    return Kernel(np.ones((channels, 1, *ones)), np.zeros(channels), channels, (0,) * dims, (0,) * dims, ones, ones,
                  per_channel=True)


def is_pointwise(k: Kernel) -> bool:
    """A 1x1 kernel with stride 1 and no padding: output position o reads input position o only."""
    return all(s == 1 for s in k.spatial) and not any(k.begins) and not any(k.ends) and all(s == 1 for s in k.strides)


def then_affine(k: Kernel, scale: np.ndarray, shift: np.ndarray) -> Kernel:
    """``y * scale + shift`` per output channel after the kernel ``k``."""
    s = np.asarray(scale, np.float64).reshape(-1)
    w = k.weight * s.reshape(-1, *([1] * (k.weight.ndim - 1)))
    return replace(k, weight=w, bias=k.bias * s + np.asarray(shift, np.float64).reshape(-1))


def average_pool(channels: int, kernel_shape, begins, ends, strides) -> Kernel:
    """An AveragePool that counts its padding (or has none) as a per-channel kernel of taps 1/prod(k)."""
    size = tuple(int(k) for k in kernel_shape)
    w = np.full((channels, 1, *size), 1.0 / float(np.prod(size)))
    return Kernel(w, np.zeros(channels), channels, tuple(begins), tuple(ends), tuple(strides), (1,) * len(size),
                  per_channel=True)


def regroup(k: Kernel, group: int) -> np.ndarray:
    """A per-channel kernel's weight as the weight of a Conv of ``group`` groups over its C channels:
    ``W[m, m mod (C/group)] = D[m]`` (output channel m of group m // (C/group) reads input channel m)."""
    if not k.per_channel:
        return k.weight
    c = k.channels
    per = c // group
    w = np.zeros((c, per, *k.spatial))
    w[np.arange(c), np.arange(c) % per] = k.weight[:, 0]
    return w


def then_kernel(first: Kernel, second: Kernel, what: str = "Conv") -> Kernel:
    """``second`` applied to the output of the pointwise ``first``: one kernel with ``second``'s geometry.
    NotFoldable when it would not be exact (padding over a nonzero bias) or cannot be stated."""
    if not is_pointwise(first):
        raise NotFoldable(f"a {what} after a {first.describe()} and strides {list(first.strides)}: only a "
                          "branch whose earlier stages are 1x1 with stride 1 and no padding merges")
    if (any(second.begins) or any(second.ends)) and np.any(first.bias):
        raise NotFoldable(f"the {what}'s padding ({[*second.begins, *second.ends]}) pads the earlier 1x1 "
                          "stage's output with zeros where that stage makes its bias, so no one Conv is exact "
                          "(exact only without padding, or when the 1x1 stage has no bias)")
    if first.per_channel and second.per_channel:
        w = second.weight * first.weight.reshape(-1, 1, *([1] * len(second.spatial)))
        bias = second.bias + second.weight.reshape(second.channels, -1).sum(axis=1) * first.bias
        return replace(second, weight=w, bias=bias)
    group = second.group if first.per_channel else first.group
    if not second.per_channel and second.group != group:
        raise NotFoldable(f"a {what} of group {second.group} after a 1x1 stage of group {group}")
    w1 = regroup(first, group).reshape(first.channels, -1)  # [L, C/g]: the kernel is 1x1
    w2 = regroup(second, group)  # [M, L/g, k...]
    m, per_l = w2.shape[0], w2.shape[1]
    if w1.shape[0] != per_l * group:
        raise NotFoldable(f"the {what} reads {per_l * group} channels, the stage before makes {w1.shape[0]}")
    per_m = m // group
    out = np.zeros((m, w1.shape[1], *w2.shape[2:]))
    for gi in range(group):
        rows = slice(gi * per_m, (gi + 1) * per_m)
        out[rows] = np.einsum("ml...,lj->mj...", w2[rows], w1[gi * per_l:(gi + 1) * per_l])
    # each output channel m of group gi sums W2[m, l, k] * b1[gi * per_l + l]
    b1 = first.bias.reshape(group, per_l)
    w2_sum = w2.reshape(m, per_l, -1).sum(axis=2)
    bias = second.bias + np.einsum("ml,ml->m", w2_sum, np.repeat(b1, per_m, axis=0))
    return Kernel(out, bias, group, second.begins, second.ends, second.strides, second.dilations)


def _geometry(kernels: list[Kernel]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The (strides, dilations) every branch shares, or NotFoldable saying which differ (a 1x1 kernel's
    dilation does not matter)."""
    dims = {len(k.spatial) for k in kernels}
    if len(dims) != 1:
        raise NotFoldable(f"the branches have kernels of {sorted(dims)} spatial dimensions")
    strides = {k.strides for k in kernels}
    if len(strides) != 1:
        listed = " and ".join(str(list(s)) for s in sorted(strides))
        raise NotFoldable(f"the branches have different strides ({listed})")
    dilations = {k.dilations for k in kernels if any(s != 1 for s in k.spatial)}
    if len(dilations) > 1:
        raise NotFoldable(f"the branches have different dilations "
                          f"({' and '.join(str(list(d)) for d in sorted(dilations))})")
    return next(iter(strides)), next(iter(dilations)) if dilations else (1,) * next(iter(dims))


def merge(kernels: list[Kernel]) -> Kernel:
    """The sum of branches that read one X: one kernel, each branch zero-padded into the largest at the
    offset its pads imply. NotFoldable with the reason when no one Conv computes the sum exactly."""
    stride, dilation = _geometry(kernels)
    groups = {k.group for k in kernels if not k.per_channel}
    if len(groups) > 1:
        raise NotFoldable(f"the Conv branches have different group counts ({' and '.join(map(str, sorted(groups)))})")
    dense = [k for k in kernels if not k.per_channel]
    group = dense[0].group if dense else kernels[0].channels
    m = kernels[0].channels if not dense else dense[0].channels
    if dense and any(k.per_channel for k in kernels) and dense[0].weight.shape[1] * group != m:
        raise NotFoldable(f"an identity, affine or pool branch needs as many output channels as input "
                          f"channels: the Conv reads {dense[0].weight.shape[1] * group} and makes {m}")
    channels = {k.channels for k in kernels}
    if len(channels) != 1:
        listed = " and ".join(map(str, sorted(channels)))
        raise NotFoldable(f"the branches make different numbers of channels ({listed})")
    size, begins, ends, offsets = _align(kernels, dilation)
    per = dense[0].weight.shape[1] if dense else 1
    first = regroup(kernels[0], group)
    if first.shape == (m, per, *size):  # the first branch fills the kernel (RepVGG's 3x3): the sum starts
        weight = np.add(first, 0.0, dtype=np.float64)  # at 0 + it, in one pass, not zeros and an add
        bias = np.add(kernels[0].bias, 0.0, dtype=np.float64)
        rest = zip(kernels[1:], offsets[1:])
    else:
        weight, bias = np.zeros((m, per, *size)), np.zeros(m)
        rest = zip(kernels, offsets)
    for k, off in rest:
        window = tuple(slice(o, o + s) for o, s in zip(off, k.spatial))
        weight[(slice(None), slice(None)) + window] += regroup(k, group)
        bias += k.bias
    return Kernel(weight, bias, group, begins, ends, stride, dilation)


def stack(kernels: list[Kernel]) -> Kernel:
    """Branches that read one X, concatenated along the output channels: one kernel whose weight stacks
    theirs (in order), each zero-padded into the largest at the offset its pads imply, and whose bias
    concatenates theirs. Grouped Convs are declined: output channel block j of a Conv of g groups reads
    input group j, and the concatenation puts each branch's g blocks after the other's, which no one
    grouped Conv's layout matches. NotFoldable with the reason when no one Conv is exact."""
    grouped = sorted({k.group for k in kernels if k.group != 1})
    if grouped or any(k.per_channel for k in kernels):
        raise NotFoldable(f"the Convs are grouped (group={' and '.join(map(str, grouped or [0]))}): concatenated, "
                          "their output channels do not follow one grouped Conv's layout (group by group)")
    stride, dilation = _geometry(kernels)
    size, begins, ends, offsets = _align(kernels, dilation)
    parts = []
    for k, off in zip(kernels, offsets):
        w = np.zeros((k.channels, k.weight.shape[1], *size))
        w[(slice(None), slice(None)) + tuple(slice(o, o + s) for o, s in zip(off, k.spatial))] = k.weight
        parts.append(w)
    return Kernel(np.concatenate(parts), np.concatenate([k.bias for k in kernels]), 1, begins, ends, stride,
                  dilation)


def _align(kernels: list[Kernel], dilation: tuple[int, ...]):
    """Per spatial axis: the merged kernel size, its begin and end pads, and each branch's offset in it."""
    size, begins, ends = [], [], []
    offsets: list[list[int]] = [[] for _ in kernels]
    for axis, d in enumerate(dilation):
        reach = {k.begins[axis] + k.ends[axis] - d * (k.spatial[axis] - 1) for k in kernels}
        p0 = max(k.begins[axis] for k in kernels)
        if len(reach) > 1 or any((p0 - k.begins[axis]) % d for k in kernels):
            a, b = _mismatch(kernels, axis, d, p0)
            raise NotFoldable(f"the branches' padding does not line up on spatial axis {axis}: a {a.describe()} and "
                              f"a {b.describe()} read windows that no one zero-padded kernel covers")
        for k, off in zip(kernels, offsets):
            off.append((p0 - k.begins[axis]) // d)
        n = max(off[axis] + k.spatial[axis] for k, off in zip(kernels, offsets))
        size.append(n)
        begins.append(p0)
        ends.append(reach.pop() + d * (n - 1) - p0)
    return tuple(size), tuple(begins), tuple(ends), offsets


def _mismatch(kernels: list[Kernel], axis: int, d: int, p0: int) -> tuple[Kernel, Kernel]:
    first = kernels[0]
    for k in kernels[1:]:
        if (k.begins[axis] + k.ends[axis] - d * (k.spatial[axis] - 1)
                != first.begins[axis] + first.ends[axis] - d * (first.spatial[axis] - 1)) or (
                (p0 - k.begins[axis]) % d) or ((p0 - first.begins[axis]) % d):
            return first, k
    return first, kernels[-1]
