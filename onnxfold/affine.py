"""The arithmetic of folding, in pure NumPy: nothing here knows about ONNX.

A per-channel affine consumer computes ``y[:, c] = x[:, c] * scale[c] + shift[c]``.
BatchNormalization in inference mode is one:

    scale = gamma / sqrt(var + eps)
    shift = beta - mean * scale

A producer that owns per-output-channel weights absorbs it:

    W'[c] = W[c] * scale[c]              (the weight slice that makes output channel c)
    b'[c] = b[c] * scale[c] + shift[c]   (b = 0 when the producer has no bias)

which is the same as ``b' = (b - mean) * scale + beta`` for BatchNormalization.

Everything is computed in float64; :func:`cast_finite` casts the result once to the model's
dtype and refuses values that do not fit it (float16 overflows past 65504).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "NotFoldable",
    "bn_affine",
    "scale_conv_weight",
    "scale_conv_transpose_weight",
    "fold_bias",
    "cast_finite",
    "fold_input_affine",
]


class NotFoldable(Exception):
    """A fold that is not safe. The message is the reason, a sentence for the report."""


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


def scale_conv_weight(w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Conv weight [M, C/group, k...]: output channel m is slice w[m]."""
    w = np.asarray(w, dtype=np.float64)
    if w.shape[0] != scale.shape[0]:
        raise NotFoldable(f"weight has {w.shape[0]} output channels, the affine has {scale.shape[0]}")
    return w * scale.reshape(_channel_shape(w.ndim, 0))


def scale_conv_transpose_weight(w: np.ndarray, scale: np.ndarray, group: int) -> np.ndarray:
    """ConvTranspose weight [C_in, M/group, k...].

    Output channel ``m = g * (M/group) + j`` is made by ``w[g*C_in/group:(g+1)*C_in/group, j]``:
    the scale applies within each group along axis 1.
    """
    w = np.asarray(w, dtype=np.float64)
    c_in, m_per_group = w.shape[0], w.shape[1]
    if group < 1 or c_in % group:
        raise NotFoldable(f"weight has {c_in} input channels, not divisible by group={group}")
    if m_per_group * group != scale.shape[0]:
        raise NotFoldable(
            f"weight makes {m_per_group * group} output channels (group={group}), the affine has {scale.shape[0]}"
        )
    kernel = w.shape[2:]
    grouped = w.reshape(group, c_in // group, m_per_group, *kernel)
    s = scale.reshape(group, 1, m_per_group, *([1] * len(kernel)))
    return (grouped * s).reshape(w.shape)


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


def cast_finite(value: np.ndarray, dtype, what: str) -> np.ndarray:
    """Cast a float64 result once to ``dtype``; refuse values that are not finite there."""
    value = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(value)):
        raise NotFoldable(f"folded {what} is not finite (inf or NaN in the float64 result)")
    with np.errstate(over="ignore"):
        out = value.astype(dtype)
    if not np.all(np.isfinite(out.astype(np.float64))):
        biggest = float(np.max(np.abs(value)))
        limit = float(_finfo(dtype).max)
        raise NotFoldable(
            f"folded {what} overflows {np.dtype(dtype).name} (max |value| = {biggest:.4g} > {limit:.6g})"
        )
    return out


def fold_input_affine(w: np.ndarray, bias, scale: np.ndarray, shift: np.ndarray, group: int):
    """A per-channel affine on a Conv's INPUT, folded into the Conv (exact only without padding).

    Conv weight W [M, C/group, k...]; output channel m of group g = m // (M/group) reads input
    channels g*C/group + j through W[m, j]:

        W'[m, j] = W[m, j] * scale[g*C/group + j]
        b'[m]    = b[m] + sum over j and the kernel of W[m, j, k] * shift[g*C/group + j]
    """
    w = np.asarray(w, dtype=np.float64)
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
    return w * s, b + (w * t).sum(axis=tuple(range(1, w.ndim)))
