"""A per-feature affine on a producer's INPUT, folded into its weights: pure NumPy, no ONNX types.

The affine is ``x' = x * s + t`` along the producer's reduction (input-feature) axis, ``s`` and
``t`` of length ``K``. Everything is computed in float64; the caller casts once with
:func:`onnxfold.affine.cast_finite`.

Gemm computes ``Y = alpha * A' @ B' + beta * C`` with ``A' = A.T if transA else A`` ([M, K]) and
``B' = B.T if transB else B`` ([K, N]). The affine acts on the K columns of A'. Then

    Y = alpha * (A' diag(s) + 1 t^T) B' + beta * C
      = alpha * A' (diag(s) B') + (alpha * t^T B' + beta * C)

so the fold scales row k of B' by s[k] (column k of B when transB) and adds ``alpha * t @ B'``
([N], broadcast over the M rows) to ``beta * C``:

    with C:     C'    = C + (alpha / beta) * (t @ B'),  beta unchanged (needs beta != 0);
                C' takes the broadcast shape of C and [N] ([M, 1] or [1] grow to [M, N] or [N])
    without C:  C'    = alpha * (t @ B') and beta' = 1
    t == 0:     C and beta are untouched (also when beta == 0)

MatMul ``Y = X @ W`` with a constant W [..., K, N]: ``W'[..., k, :] = W[..., k, :] * s[k]`` and an
added bias ``t @ W`` of shape [N] for a 2-D W, [..., 1, N] for a batched one (keeping the broadcast
against Y [..., M, N]); MatMul has no bias input, so the caller adds it (or refuses when t != 0).

Conv reads zero-padded input: ``conv(pad(x * s + t))`` is ``conv(pad(x) * s) + (the shift's
contribution)`` only where no padding is read, so a shift folds only into an unpadded Conv
(:func:`onnxfold.affine.fold_input_affine`). A pure scale commutes with zero padding
(``pad(x * s) = pad(x) * s`` as ``0 * s = 0``) and folds into any Conv.

A Pad node between the affine and the Conv (:func:`check_pad_commutes`): reflect, edge and wrap
padding copy values of the same channel, so ``pad(x * s + t) = pad(x) * s + t`` for a per-channel
affine, whatever the amounts (negative amounts crop, which commutes too), as long as the channel axis
itself is not padded (output channel c must be input channel c). Constant padding that adds elements
writes its value v after the affine: ``pad(x * s + t, v) = pad(x, v') * s + t`` needs ``v = v' * s[c] +
t[c]`` in every channel, which holds for ``v = v' = 0`` and a pure scale, the Conv's own padding case.
Constant padding that adds nothing (every amount 0 or negative) is a crop and commutes.
"""

from __future__ import annotations

import numpy as np

from .affine import RowScaled, fold_input_affine, unscaled
from .errors import NotFoldable

__all__ = ["conv_input_affine", "gemm_input_affine", "matmul_input_affine", "pad_amounts", "check_pad_commutes",
           "PAD_MODES"]

# Pad's modes by the version that introduced them ('wrap' came with Pad-19)
PAD_MODES = {"constant": 1, "reflect": 1, "edge": 1, "wrap": 19}


def _features(scale, shift) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scale, dtype=np.float64).reshape(-1)
    t = np.asarray(shift, dtype=np.float64).reshape(-1)
    if s.shape != t.shape:
        raise NotFoldable(f"the affine's scale has {s.size} values, its shift {t.size}")
    return s, t


def gemm_input_affine(
    b: np.ndarray,
    c: np.ndarray | None,
    scale,
    shift,
    *,
    trans_b: int = 0,
    alpha: float = 1.0,
    beta: float = 1.0,
) -> tuple[np.ndarray, np.ndarray | None, float]:
    """Fold ``A' = A' * s + t`` (over Gemm's K axis) into B and C; returns (B', C', beta').

    C' is None when C is absent and the shift is zero (nothing to add).
    """
    s, t = _features(scale, shift)
    b64 = np.asarray(b, dtype=np.float64)
    if b64.ndim != 2:
        raise NotFoldable(f"Gemm's B has rank {b64.ndim}, not 2")
    bk = b64.T if trans_b else b64  # B' [K, N]
    if bk.shape[0] != s.size:
        raise NotFoldable(f"Gemm reduces over {bk.shape[0]} input features, the affine has {s.size}")
    # B' = B where the affine is a pure shift: the fold then keeps B and writes C alone (rules.producers.new_inputs)
    new_b = b64 if unscaled(s) else b64 * (s.reshape(1, -1) if trans_b else s.reshape(-1, 1))
    if not np.any(t):
        return new_b, None if c is None else np.asarray(c, dtype=np.float64), float(beta)
    added = float(alpha) * (t @ bk)  # [N]
    if c is None:
        return new_b, added, 1.0
    if float(beta) == 0.0:
        raise NotFoldable("Gemm has beta = 0, so its C cannot take the affine's shift")
    c64 = np.asarray(c, dtype=np.float64)
    try:
        shape = np.broadcast_shapes(c64.shape, added.shape)
    except ValueError:
        raise NotFoldable(f"Gemm's C has shape {list(c64.shape)}, which does not broadcast against "
                          f"[{added.size}]") from None
    return new_b, np.broadcast_to(c64, shape) + added / float(beta), float(beta)


def matmul_input_affine(w: np.ndarray, scale, shift) -> tuple[np.ndarray, np.ndarray | None]:
    """Fold ``X' = X * s + t`` (over X's last axis) into MatMul's constant W [..., K, N].

    Returns (W', added bias or None when the shift is zero).
    """
    s, t = _features(scale, shift)
    w64 = np.asarray(w, dtype=np.float64)
    if w64.ndim < 2:
        raise NotFoldable(f"MatMul's weight has rank {w64.ndim}: no input-feature axis to scale")
    if w64.shape[-2] != s.size:
        raise NotFoldable(f"MatMul reduces over {w64.shape[-2]} input features, the affine has {s.size}")
    new_w = w64 if unscaled(s) else w64 * s.reshape(-1, 1)  # a pure shift keeps W (rules.producers.new_inputs)
    if not np.any(t):
        return new_w, None
    added = np.einsum("k,...kn->...n", t, w64)
    return new_w, added if w64.ndim == 2 else added[..., None, :]


def conv_input_affine(
    w: np.ndarray, bias, scale, shift, group: int, padded: bool
) -> tuple[RowScaled, np.ndarray]:
    """A per-input-channel affine before a Conv; a padded Conv takes only a pure scale."""
    s, t = _features(scale, shift)
    if padded and np.any(t):
        raise NotFoldable("the Conv pads its input with zeros, and a shift does not commute with padding")
    return fold_input_affine(w, bias, s, t, group)


def pad_amounts(pads, axes=None, rank: int | None = None) -> list[int]:
    """Pad's amounts over every axis of its input, [x1_begin, ..., x1_end, ...] (2 * rank values), from
    its ``pads`` over ``axes`` (None: every axis, and ``pads`` has 2 * rank values; negative axes count
    from the back of a rank-``rank`` input)."""
    p = [int(v) for v in np.asarray(pads).reshape(-1)]
    if axes is None:
        if len(p) % 2 or len(p) < 4:
            raise NotFoldable(f"the Pad has {len(p)} pad amounts, not two for each axis of an input with channels")
        return p
    if rank is None:
        raise NotFoldable("the rank of the Pad's input is unknown, so its axes cannot be placed")
    ax = [int(v) for v in np.asarray(axes).reshape(-1)]
    if len(p) != 2 * len(ax) or any(not -rank <= a < rank for a in ax):
        raise NotFoldable(f"Pad's axes {ax} and pads {p} do not fit an input of rank {rank}")
    ax = [a % rank for a in ax]
    if len(set(ax)) != len(ax):
        raise NotFoldable(f"Pad's axes {ax} repeat an axis (the specification leaves that undefined)")
    full = [0] * (2 * rank)
    for k, a in enumerate(ax):
        full[a], full[a + rank] = p[k], p[k + len(ax)]
    return full


def check_pad_commutes(mode: str, amounts: list[int], value: float, shift, channel_axis: int = 1) -> None:
    """NotFoldable unless ``pad(x * s + t) == pad(x) * s + t`` for every per-channel affine with this
    ``shift`` (``amounts`` over every axis, as :func:`pad_amounts` gives them; ``shift`` None: not known
    yet, everything else is checked)."""
    rank = len(amounts) // 2
    lo, hi = amounts[channel_axis], amounts[channel_axis + rank]
    if lo or hi:
        raise NotFoldable(f"the Pad changes the channel axis {channel_axis} (by {lo} and {hi}): its output "
                          "channels are not its input channels one to one")
    if mode in ("reflect", "edge", "wrap") or not any(v > 0 for v in amounts):
        return  # copies of the same channel, or a crop
    if value != 0:
        raise NotFoldable(f"the Pad fills with the constant {value:g} after the affine, which no per-channel "
                          "value before it gives in every channel")
    if shift is not None and np.any(np.asarray(shift) != 0):
        raise NotFoldable("the Pad pads with zeros after the affine, so its shift would reach the border "
                          "where the original reads zeros (only a pure scale folds through constant padding)")
