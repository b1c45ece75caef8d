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
    if _all_finite(ref, cand):
        err, max_rel, needs, scales = _finite(ref, cand, rtol, channels, axis)
        note, bad = "", False
        compared = int(ref.size)
    else:
        err, max_rel, needs, scales, note, bad, compared = _general(ref, cand, rtol, channels, axis)
    max_abs = float(err.max()) if err.size else 0.0
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


def _all_finite(ref: np.ndarray, cand: np.ndarray) -> bool:
    """Whether both have elements and every one is finite (then :func:`_finite` compares them)."""
    return bool(ref.size) and bool(np.isfinite(ref).all()) and bool(np.isfinite(cand).all())


def _finite(ref: np.ndarray, cand: np.ndarray, rtol: float, channels: bool, axis: int):
    """:func:`_general` where every element of both is finite: the same numbers in fewer passes.
    Returns (|cand - ref|, max rel, the needed atol per channel (or of the whole), the scales)."""
    r = ref.astype(np.float64)
    err = cand.astype(np.float64)
    err -= r
    np.abs(err, out=err)
    np.abs(r, out=r)  # |ref| from here on
    zero = r == 0
    if zero.any():
        max_rel = math.inf if bool((err[zero] > 0).any()) else 0.0
        if not zero.all():
            max_rel = max(max_rel, float(np.max(err[~zero] / r[~zero])))
    else:
        max_rel = float(np.max(np.divide(err, r)))
    need = np.multiply(r, rtol, out=np.empty_like(r))
    np.subtract(err, need, out=need)
    if channels:
        axes = tuple(a for a in range(r.ndim) if a != axis)
        scales = np.max(r, axis=axes)
        needs = np.maximum(np.max(need, axis=axes), 0.0)
    else:
        scales = np.array([float(r.max())])
        needs = np.array([max(float(need.max()), 0.0)])
    return err, max_rel, needs, scales


def _general(ref: np.ndarray, cand: np.ndarray, rtol: float, channels: bool, axis: int):
    """The comparison's numbers, NaN and Inf anywhere: (|cand - ref| where both are finite, max rel, the
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
    return err, max_rel, needs, scales, note, bad, int(np.count_nonzero(finite & np.isfinite(c)))


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

