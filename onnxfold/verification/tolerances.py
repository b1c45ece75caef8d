"""Verification's tolerances and the comparison of one tensor (the rules: the package's docstring)."""

from __future__ import annotations

import math

import numpy as np

from .results import OutputComparison

# Default tolerances by output dtype: (atol as a fraction of the output's scale, rtol).
TOLERANCES = {
    "float64": (1e-10, 1e-10),
    "float32": (1e-4, 1e-4),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}


# No tolerance goes below FLOOR_ULPS units in the last place of the scale of the tensors it is
# computed from (nor below ATOL of it, where that is smaller): see the module's docstring.
FLOOR_ULPS = 64


EPS = {"float64": 2.0**-52, "float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}


def floor(dtype: str) -> float:
    """FLOOR[dtype]: the smallest atol, as a fraction of the scale of the tensors a value comes from."""
    return min(TOLERANCES[dtype][0], FLOOR_ULPS * EPS[dtype])


@np.errstate(over="ignore", invalid="ignore", divide="ignore")  # inf and NaN are judged below, not warned
def compare(name: str, ref: np.ndarray, cand: np.ndarray, atol=None, rtol=None, *, per_channel: bool = False,
            atol_floor: float | None = None, axis: int = 1, terms: np.ndarray | None = None) -> OutputComparison:
    """Compare one tensor. Default ``atol = ATOL[dtype] * max |ref|``, at least ``atol_floor``; with
    ``per_channel`` each channel of ``axis`` (the fold's channel axis: 1 for a Conv, the last for a
    MatMul) takes its own scale, down to ``FLOOR[dtype] * max |ref|``, and the result names the channel
    nearest to (or past) its tolerance. ``terms``: |the constant term| the fold's node adds, per channel
    (or one for all): no default atol is below ``FLOOR[dtype]`` of it (a value small by cancellation)."""
    ref = np.asarray(ref)
    cand = np.asarray(cand)
    dtype = ref.dtype.name
    if ref.shape != cand.shape:
        return OutputComparison(name, dtype, ref.shape, math.inf, math.inf, 0.0, 0.0, math.inf, False,
                                f"shape {list(cand.shape)} != {list(ref.shape)}")
    if dtype not in TOLERANCES:
        equal = bool(np.array_equal(ref, cand))
        return OutputComparison(name, dtype, ref.shape, 0.0 if equal else math.inf, 0.0 if equal else math.inf,
                                0.0, 0.0, 0.0 if equal else math.inf, equal, "" if equal else "values differ")
    d_atol, d_rtol = TOLERANCES[dtype]
    rtol = d_rtol if rtol is None else float(rtol)
    axis = axis % ref.ndim if ref.ndim else 0
    channels = per_channel and ref.ndim >= 2 and ref.shape[axis] > 0 and ref.size > 0
    finite = _finite(ref, cand, rtol, channels, axis) if ref.size else None
    if finite is not None:
        max_abs, max_rel, needs, scales = finite
        note, bad = "", False
        compared = int(ref.size)
    else:
        max_abs, max_rel, needs, scales, note, bad, compared = _general(ref, cand, rtol, channels, axis)
    if atol is None:
        atols = d_atol * np.maximum(scales, np.finfo(np.float64).tiny)
        if channels:
            atols = np.maximum(atols, floor(dtype) * scales.max())
        if atol_floor is not None:
            atols = np.maximum(atols, atol_floor)
        if terms is not None and terms.size:
            per = terms if channels and terms.size == atols.size else terms.max()
            atols = np.maximum(atols, floor(dtype) * per)
    else:
        atols = np.full_like(scales, float(atol))
    worst = int(np.argmax(needs / atols))
    if bad:
        needs = needs.copy()
        needs[worst] = math.inf
    passed = bool(np.all(needs <= atols)) and not bad
    if not compared and ref.size and not note:
        note = "no finite element compared: it proves nothing"
    return OutputComparison(name, dtype, ref.shape, max_abs, max_rel, float(atols[worst]), rtol, float(needs[worst]),
                            passed, note, worst if channels else None, compared)


def _finite(ref: np.ndarray, cand: np.ndarray, rtol: float, channels: bool, axis: int):
    """:func:`_general`'s numbers where every element of both is finite, in fewer passes, a block at a
    time (blocks of :data:`BLOCK` elements stay in the cache). Computed in float32 for float32 and
    narrower tensors (float64 for float64): the difference of two float32 values within a factor of two
    of each other is exact in float32 (Sterbenz), and the rest is rounded once, 6e-8 of itself, far below
    any tolerance; a [1, 96, 112, 112] fold tensor in 1.5 ms, not the 3.7 ms of float64 copies. Returns
    (max |cand - ref|, max rel, the needed atol per channel (or of the whole), the scales), or None at
    the first block with a NaN or an infinity in either (then :func:`_general`)."""
    if channels:
        ref3, cand3 = channel_view(ref, axis), channel_view(cand, axis)
    else:
        ref3, cand3 = ref.reshape(1, 1, ref.size), cand.reshape(1, 1, cand.size)
    pre, count, post = ref3.shape
    work = np.float64 if ref.dtype.itemsize > 4 else np.float32
    scales, needs = np.zeros(count), np.zeros(count)
    max_abs, max_rel = 0.0, 0.0
    for at in _blocks(pre, count, post):
        r, c = ref3[at], cand3[at]
        if r.dtype != work:  # float16, bfloat16: exact in float32
            r, c = r.astype(work), c.astype(work)
        err = np.subtract(c, r)  # NaN or inf where either is (inf - inf is NaN)
        np.abs(err, out=err)
        largest = float(err.max())
        if not math.isfinite(largest):
            return None
        max_abs = max(max_abs, largest)
        r = np.abs(r)  # |ref| from here on (a new array: the inputs are not written)
        # relative errors: inf where the reference is 0 and the error is not (relatively infinite),
        # NaN where both are 0 (fmax passes over it)
        rel = float(np.fmax.reduce(np.divide(err, r), axis=None))
        if rel == rel:
            max_rel = max(max_rel, rel)
        np.maximum(scales[at[1]], r.max(axis=(0, 2)), out=scales[at[1]])
        r *= work(rtol)
        np.subtract(err, r, out=err)  # what atol must cover
        np.maximum(needs[at[1]], err.max(axis=(0, 2)), out=needs[at[1]])
    return max_abs, max_rel, needs, scales


def channel_view(a: np.ndarray, axis: int) -> np.ndarray:
    """``a`` as [before, channels, after] along ``axis`` (a view where reshape can make one: no copy)."""
    return a.reshape(math.prod(a.shape[:axis]), a.shape[axis], math.prod(a.shape[axis + 1:]))


BLOCK = 1 << 15  # elements a block of :func:`_finite` (128 KiB in float32, 256 KiB in float64)


def _blocks(pre: int, count: int, post: int):
    """Index tuples into a [pre, count, post] view covering it in blocks of about :data:`BLOCK` elements,
    each whole along no axis or along the last two (channels, positions)."""
    row = count * post
    if row >= BLOCK:  # within one step of the first axis: channels (or positions of one) at a time
        c_step = max(1, BLOCK // max(post, 1))
        q_step = post if c_step > 1 else BLOCK
        for p in range(pre):
            for c0 in range(0, count, c_step):
                for q0 in range(0, max(post, 1), q_step):
                    yield slice(p, p + 1), slice(c0, min(count, c0 + c_step)), slice(q0, min(post, q0 + q_step))
    else:  # several steps of the first axis at a time, every channel
        p_step = max(1, BLOCK // max(row, 1))
        for p0 in range(0, pre, p_step):
            yield slice(p0, min(pre, p0 + p_step)), slice(0, count), slice(0, post)


def _general(ref: np.ndarray, cand: np.ndarray, rtol: float, channels: bool, axis: int):
    """The comparison's numbers, NaN and Inf anywhere: (max |cand - ref| where both are finite, max rel, the
    needed atol per channel, the scales, a note, whether a NaN/Inf differs, how many elements compared)."""
    r = ref.astype(np.float64)
    c = cand.astype(np.float64)
    finite = np.isfinite(r)
    # Non-finite values: the candidate must match the reference exactly where it is not finite,
    # and must be finite where it is.
    same_nonfinite = (~finite) & ((np.isnan(r) & np.isnan(c)) | (r == c))
    bad_nonfinite = (finite & ~np.isfinite(c)) | ((~finite) & ~same_nonfinite)
    err = np.where(finite & np.isfinite(c), np.abs(c - r), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(np.abs(r) > 0, err / np.abs(r), np.where(err > 0, np.inf, 0.0))
    max_rel = float(rel.max()) if rel.size else 0.0
    need = np.maximum(err - rtol * np.abs(np.where(finite, r, 0.0)), 0.0)
    if channels:  # one scale and one needed atol per channel of the channel axis
        axes = tuple(a for a in range(r.ndim) if a != axis)
        scales = np.max(np.abs(np.where(finite, r, 0.0)), axis=axes)
        needs = np.max(need, axis=axes)
    else:
        scales = np.array([float(np.max(np.abs(r[finite]))) if finite.any() else 0.0])
        needs = np.array([float(need.max()) if need.size else 0.0])
    bad = bool(bad_nonfinite.any())
    note = f"{int(bad_nonfinite.sum())} NaN/Inf where the reference differs" if bad else ""
    max_abs = float(err.max()) if err.size else 0.0
    return max_abs, max_rel, needs, scales, note, bad, int(np.count_nonzero(finite & np.isfinite(c)))


@np.errstate(over="ignore", invalid="ignore")
def scale_of(a) -> float:
    a = np.asarray(a)
    if a.dtype.name not in TOLERANCES or not a.size:
        return 0.0
    largest = float(np.max(np.abs(a)))  # exact in any float dtype; NaN or Inf: their elements are left out
    if math.isfinite(largest):
        return largest
    r = np.abs(a.astype(np.float64))
    r = r[np.isfinite(r)]
    return float(r.max()) if r.size else 0.0

