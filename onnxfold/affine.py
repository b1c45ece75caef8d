"""The arithmetic of folding, in pure NumPy: nothing here knows about ONNX.

A per-channel affine consumer computes ``y[:, c] = x[:, c] * scale[c] + shift[c]``.
BatchNormalization in inference mode is one:

    scale = gamma / sqrt(var + eps)
    shift = beta - mean * scale

A producer that owns per-output-channel weights absorbs it:

    W'[c] = W[c] * scale[c]              (the weight slice that makes output channel c)
    b'[c] = b[c] * scale[c] + shift[c]   (b = 0 when the producer has no bias)

which is the same as ``b' = (b - mean) * scale + beta`` for BatchNormalization.

Everything is computed in float64; :func:`iter_cast` casts the result once to the model's dtype,
a block of rows at a time, and refuses values that do not fit it (float16 overflows past 65504).
:func:`cast_finite` is the same for a whole array at once.
"""

from __future__ import annotations

import numpy as np

from .errors import NotFoldable

__all__ = [
    "NotFoldable",
    "bn_affine",
    "scale_conv_weight",
    "scale_conv_transpose_weight",
    "fold_bias",
    "cast_finite",
    "iter_cast",
    "fold_input_affine",
    "RowScaled",
    "scale_columns",
]


# BatchNormalization's default epsilon: the attribute is a float, so the default 1e-5 is the float32
# nearest 1e-5, as when written
DEFAULT_EPSILON = float(np.float32(1e-5))


def bn_affine(gamma, beta, mean, var, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """BatchNormalization statistics -> (scale, shift) in float64."""
    gamma, beta, mean, var = (np.asarray(a, dtype=np.float64) for a in (gamma, beta, mean, var))
    denom = var + float(eps)
    if not np.all(np.isfinite(denom)) or np.any(denom <= 0):
        bad = int(np.flatnonzero(~(denom > 0))[0]) if np.any(~(denom > 0)) else -1
        raise NotFoldable(
            f"var + epsilon is not positive and finite (channel {bad}: var={var.flat[bad]!r}, eps={eps!r})"
        )
    scale = gamma / np.sqrt(denom)
    shift = beta - mean * scale
    return scale, shift


def _channel_shape(ndim: int, axis: int) -> list[int]:
    shape = [1] * ndim
    shape[axis] = -1
    return shape


class RowScaled:
    """``w * factor`` in float64, made a block of rows (axis 0) at a time.

    A weight's full float64 product is never held: each block is computed, cast to the model's dtype
    and written before the next (``np.asarray`` gives the whole product, for small weights and tests).
    """

    def __init__(self, w: np.ndarray, factor):
        self.w = w
        self.shape = tuple(w.shape)
        self._factor = factor  # factor(a, b) -> float64, broadcastable against w[a:b]

    def block(self, a: int, b: int) -> np.ndarray:
        rows = self.w[a:b]
        if rows.dtype.kind != "f":  # bfloat16 (ml_dtypes): widen first
            rows = np.asarray(rows, dtype=np.float64)
        return np.multiply(rows, self._factor(a, b), dtype=np.float64)

    def ranges(self, target_bytes: int = 8 << 20):
        """(a, b): the blocks of rows, each about ``target_bytes`` in float64."""
        rows = self.shape[0] if self.shape else 1
        per_row = max(1, int(np.prod(self.shape[1:], dtype=np.int64)) * 8)
        step = max(1, target_bytes // per_row)
        for a in range(0, rows, step):
            yield a, min(rows, a + step)

    def blocks(self, target_bytes: int = 8 << 20):
        for a, b in self.ranges(target_bytes):
            yield self.block(a, b)

    def cast_block(self, a: int, b: int, dtype) -> np.ndarray | None:
        """``block(a, b)`` rounded once to ``dtype``, computed in float64 by numpy's buffered loop without
        holding the float64 block (the same values as ``block(a, b).astype(dtype)``); None where numpy
        has no such loop (bfloat16): then use :meth:`block`."""
        rows = self.w[a:b]
        if rows.dtype not in _NATIVE or np.dtype(dtype) not in _NATIVE:
            return None
        out = np.empty(rows.shape, dtype=dtype)
        with np.errstate(over="ignore", invalid="ignore"):
            np.multiply(rows, self._factor(a, b), out=out, dtype=np.float64, casting="unsafe")
        return out

    def __array__(self, dtype=None, copy=None):
        out = self.block(0, self.shape[0])
        return out if dtype is None else out.astype(dtype)


def scale_conv_weight(w: np.ndarray, scale: np.ndarray) -> RowScaled:
    """Conv weight [M, C/group, k...]: output channel m is slice w[m]."""
    if w.shape[0] != scale.shape[0]:
        raise NotFoldable(f"weight has {w.shape[0]} output channels, the affine has {scale.shape[0]}")
    tail = [1] * (w.ndim - 1)
    return RowScaled(w, lambda a, b: scale[a:b].reshape(-1, *tail))


def scale_conv_transpose_weight(w: np.ndarray, scale: np.ndarray, group: int) -> RowScaled:
    """ConvTranspose weight [C_in, M/group, k...].

    Output channel ``m = g * (M/group) + j`` is made by ``w[g*C_in/group:(g+1)*C_in/group, j]``:
    the scale applies within each group along axis 1.
    """
    c_in, m_per_group = w.shape[0], w.shape[1]
    if group < 1 or c_in % group:
        raise NotFoldable(f"weight has {c_in} input channels, not divisible by group={group}")
    if m_per_group * group != scale.shape[0]:
        raise NotFoldable(
            f"weight makes {m_per_group * group} output channels (group={group}), the affine has {scale.shape[0]}"
        )
    per_group = scale.reshape(group, m_per_group)
    tail = [1] * (w.ndim - 2)
    rows_per_group = c_in // group
    return RowScaled(w, lambda a, b: per_group[np.arange(a, b) // rows_per_group].reshape(b - a, m_per_group, *tail))


def scale_columns(w: np.ndarray, scale: np.ndarray) -> RowScaled:
    """A 2-D weight [K, N] whose columns are the output channels (Gemm's B, MatMul's W)."""
    if w.shape[1] != scale.shape[0]:
        raise NotFoldable(f"weight has {w.shape[1]} output columns, the affine has {scale.shape[0]}")
    return RowScaled(w, lambda a, b: scale.reshape(1, -1))


def unscaled(scale) -> bool:
    """Whether ``scale`` is exactly 1 everywhere (an Add or a Sub of a constant): the weight then stays
    the tensor it is, bit for bit what scaling it by 1 in float64 and casting back would write."""
    return bool(np.all(np.asarray(scale) == 1))


def fold_bias(bias, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """b' = b * scale + shift, with b = 0 when absent."""
    if bias is None:
        return shift.copy()
    bias = np.asarray(bias, dtype=np.float64)
    if bias.shape != scale.shape:
        raise NotFoldable(f"bias has shape {list(bias.shape)}, expected [{scale.shape[0]}]")
    return bias * scale + shift


def _finfo(dtype):
    try:
        return np.finfo(dtype)
    except ValueError:  # bfloat16 and other ml_dtypes types
        import ml_dtypes

        return ml_dtypes.finfo(dtype)


_NATIVE = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def _peak(out: np.ndarray) -> float | None:
    """max |value| of a cast block, or None when it holds NaN or inf."""
    if not out.size:
        return 0.0
    view = out if out.dtype.kind == "f" else out.astype(np.float32)
    hi, lo = float(view.max()), float(view.min())  # NaN and inf show up here: no extra pass
    return max(hi, -lo) if np.isfinite(hi) and np.isfinite(lo) else None


def _cast_block(block: np.ndarray, dtype, what: str) -> tuple[np.ndarray, float]:
    """Cast one float64 block; returns it and its max |value|, or NotFoldable if it is not finite."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = block.astype(dtype)
    peak = _peak(out)
    if peak is None:
        if not np.all(np.isfinite(block)):
            raise NotFoldable(f"folded {what} is not finite (inf or NaN in the float64 result)")
        biggest = float(np.max(np.abs(block)))
        limit = float(_finfo(dtype).max)
        raise NotFoldable(
            f"folded {what} overflows {np.dtype(dtype).name} (max |value| = {biggest:.4g} > {limit:.6g})"
        )
    return out, peak


def iter_cast(value, dtype, what: str):
    """Cast a float64 result (an array or a :class:`RowScaled`) to ``dtype`` block by block.

    Yields (block in ``dtype``, max |value| of the block). Raises NotFoldable on a value that is not
    finite in ``dtype``.
    """
    if not isinstance(value, RowScaled):
        yield _cast_block(np.asarray(value, dtype=np.float64), dtype, what)
        return
    for a, b in value.ranges():
        out = value.cast_block(a, b, dtype)
        peak = None if out is None else _peak(out)
        if out is None or peak is None:  # bfloat16, or not finite: the float64 block says by how much
            yield _cast_block(value.block(a, b), dtype, what)
        else:
            yield out, peak


def cast_finite(value, dtype, what: str) -> np.ndarray:
    """Cast a float64 result once to ``dtype``; refuse values that are not finite there."""
    shape = value.shape if isinstance(value, RowScaled) else np.shape(value)
    out = np.empty(shape, dtype=dtype)
    if not shape:
        return next(iter_cast(value, dtype, what))[0].reshape(())
    row = 0
    for block, _ in iter_cast(value, dtype, what):
        out[row : row + len(block)] = block
        row += len(block)
    return out


def fold_input_affine(w: np.ndarray, bias, scale: np.ndarray, shift: np.ndarray, group: int):
    """A per-channel affine on a Conv's INPUT, folded into the Conv (exact only without padding).

    Conv weight W [M, C/group, k...]; output channel m of group g = m // (M/group) reads input
    channels g*C/group + j through W[m, j]:

        W'[m, j] = W[m, j] * scale[g*C/group + j]
        b'[m]    = b[m] + sum over j and the kernel of W[m, j, k] * shift[g*C/group + j]
    """
    m, c_per_group = w.shape[0], w.shape[1]
    if group < 1 or m % group or c_per_group * group != scale.shape[0]:
        raise NotFoldable(
            f"Conv reads {c_per_group * group} input channels (group={group}), the affine has {scale.shape[0]}"
        )
    rows = m // group
    kernel = [1] * (w.ndim - 2)
    s = np.repeat(scale.reshape(group, c_per_group), rows, axis=0).reshape(m, c_per_group, *kernel)
    t = np.repeat(shift.reshape(group, c_per_group), rows, axis=0).reshape(m, c_per_group, *kernel)
    b = np.zeros(m) if bias is None else np.asarray(bias, dtype=np.float64)
    if b.shape != (m,):
        raise NotFoldable(f"bias has shape {list(b.shape)}, expected [{m}]")
    axes = tuple(range(1, w.ndim))
    added = np.concatenate([block.sum(axis=axes) for block in RowScaled(w, lambda a, c: t[a:c]).blocks()])
    return RowScaled(w, lambda a, c: s[a:c]), b + added
