"""A per-channel affine BEFORE a producer folds into the producer's input channels.

Matched at the producer (Conv, Gemm, MatMul): its data input is, through any Identity nodes, the
output of an affine node (BatchNormalization, or Mul/Add/Sub/Div by a constant that broadcasts over
the producer's input channels, a scalar included). The producer then reads the affine's input, and
the affine goes. The algebra is in :mod:`onnxfold.affine_input`:

- Conv W [M, C/group, k...]: W'[m, j] = W[m, j] * scale[c]; b'[m] = b[m] + sum_{j,k} W[m, j, k] * shift[c]
  (c = g*C/group + j). Zero padding is applied after the affine, so with padding only a pure scale
  folds (0 * s = 0); a shift would reach the border where the original saw zeros.
- Gemm (transA = 0): row k of B' scales by s[k], and alpha * t @ B' joins C (beta kept, or C made).
- MatMul with a constant 2-D W: W'[k, :] = W[k, :] * s[k]; a shift needs a bias, so only a rank-2
  MatMul takes one (it becomes a Gemm).

Fan-out: when the affine's output is read by several nodes, the first Conv, Gemm or MatMul among them
takes the match for all (``Match.readers`` lists them, so the driver lets exactly those read it); each
reader gets its own folded weights (a weight they share is copied per reader, the shared one stays for
whatever else reads it) and the affine goes. One reader that cannot take it (another op, or its own
fold declines) declines the whole fold, named in the sentence.

Through a Pad (:class:`PadInputRule`): affine -> Pad -> Conv folds into the Conv when the padding
commutes with the affine (:func:`onnxfold.affine_input.check_pad_commutes`); the Pad then reads the
affine's input.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from ..affine_input import (
    PAD_MODES,
    check_pad_commutes,
    conv_input_affine,
    gemm_input_affine,
    matmul_input_affine,
    pad_amounts,
)
from ..edit import Edit, NewValue, Update
from ..errors import NotFoldable
from ..protobuf import is_default
from .base import GraphQuery, Match, Rule, attr
from .consumers import Consumer
from .producers import bias_hint, conv_constants, matrix_weight, new_inputs

TARGETS = ("Conv", "Gemm", "MatMul")


class InputAffineRule(Rule):
    """An affine node (BatchNormalization, or Mul/Add/Sub/Div by a scalar or per-input-channel constant)
    -> Conv, Gemm or MatMul: the affine folds into the producer's input channels. Conv: W'[m, j] =
    W[m, j] * s[c], b' = b + sum W * t[c]; zero padding comes after the affine, so a padded Conv takes
    only a pure scale (a shift is declined). Gemm (transA=0): B' rows scaled, C' = C + alpha/beta * t @ B'.
    MatMul: W' rows scaled; a shift needs a bias, so only a rank-2 MatMul takes one (it becomes Gemm).
    Fan-out: an affine read by several Conv, Gemm and MatMul nodes folds into each of them (each gets
    its own copy of a weight they share) and goes; when one of its readers cannot take it (another op,
    or a fold that declines), nothing folds and the sentence names that reader."""

    def __init__(self, consumer: Consumer, target: str):
        self.consumer = consumer
        self.target = target
        self.name = f"{consumer.name}_{target.lower()}"
        self.anchors = (target,)
        pad = " without padding (a pure scale also with padding)" if target == "Conv" else ""
        self.description = f"{consumer.op_types[0]} -> {target}{pad} (into its input channels; also read by several)"

    def match(self, g: GraphQuery, i: int) -> Match | str:
        node = g.node(i)
        if not node.input or not node.input[0]:
            return ""
        ai, chain = g.upstream(node.input[0])
        if ai is None:
            return ""
        affine = g.node(ai)
        if not is_default(affine) or affine.op_type not in self.consumer.op_types:
            return ""
        value = node.input[0]
        readers = g.readers_of(value)
        if len(readers) > 1 and next((k for k in readers if _is_target(g.node(k)) and g.node(k).input[0] == value),
                                     None) != i:
            return ""  # the first Conv, Gemm or MatMul reading it as its data takes the whole fan-out
        for d in self.consumer.data_inputs(affine):
            if d < len(affine.input) and affine.input[d] and self.consumer.is_candidate(g, affine, d):
                if (self.target == "MatMul" and len(readers) == 1 and self.consumer.shift_only(affine, d)
                        and g.rank(affine.input[d]) != 2):
                    return ""  # a pure shift needs a bias, which only a rank-2 MatMul gets (as a Gemm)
                return Match(
                    upstream=ai, downstream=i, affine=ai, data_index=d,
                    between=[affine.output[0], *(g.node(k).output[0] for k in reversed(chain))],
                    remove=[ai, *chain],
                    # each producer reads the affine's input
                    inputs={(k, 0): affine.input[d] for k in readers if g.node(k).input[0] == value},
                    output=node.output[0],
                    reads=({*(n for k, n in enumerate(affine.input) if k != d),
                            *(n for k in readers for n in g.node(k).input[1:])}) - {""},
                    readers={value: readers} if len(readers) > 1 else {},
                )
        return ""

    def fold(self, g: GraphQuery, m: Match) -> Edit:
        a, node = g.node(m.upstream), g.node(m.downstream)
        _check_keeps_shape(g, a, m.data_index)
        _check_not_gelu_tail(g, a, m.data_index)
        value = node.input[0]
        readers = m.readers.get(value, [m.downstream])
        updates, dtypes = {}, set()
        for k in readers:
            reader = g.node(k)
            try:
                if not _is_target(reader):
                    raise NotFoldable("it is not a Conv, Gemm or MatMul")
                if reader.input[0] != value or value in reader.input[1:]:
                    raise NotFoldable("it reads the value as a weight, not as its data input")
                dtype, updates[k] = _FOLD[reader.op_type](g, self.consumer, a, m.data_index, reader)
            except NotFoldable as e:
                if len(readers) == 1:
                    raise
                raise NotFoldable(f"{a.op_type} output '{value}' has {len(readers)} readers, and {_who(reader, k)} "
                                  f"cannot take the {a.op_type}: {e}") from None
            dtypes.add(np.dtype(dtype))
        if len(dtypes) > 1:
            raise NotFoldable(f"the {a.op_type}'s readers have weights of different dtypes "
                              f"({', '.join(sorted(d.name for d in dtypes))})")
        # the channels of the tensor compared (the first reader's output): axis 1 (Conv, Gemm), the last (MatMul)
        rank = g.rank(node.output[0])
        axis = (rank - 1 if rank else None) if node.op_type == "MatMul" else 1
        return m.edit(dtypes.pop(), updates, axis)


class PadInputRule(InputAffineRule):
    """An affine node -> Pad -> Conv: the affine folds into the Conv's input channels (as the affine ->
    Conv rule does) and the Pad reads the affine's input. Reflect, edge and wrap padding copy values
    within a channel, so pad(x * s + t) = pad(x) * s + t: any affine passes. Constant padding that adds
    elements writes its value after the affine: only a pure scale with the value 0 passes (0 * s = 0);
    padding that adds nothing (every amount 0, or a crop) passes. Declined: pads that change the channel
    axis, pads, axes or value that are not constants, a mode the model's Pad version does not define.
    Pad-1 (``paddings``), Pad-2 (``pads``, ``value`` attributes), Pad-11 (pads and constant_value inputs),
    Pad-18 (axes input), Pad-19 (mode wrap)."""

    def __init__(self, consumer: Consumer):
        super().__init__(consumer, "Conv")
        self.name = f"{consumer.name}_pad_conv"
        self.description = (f"{consumer.op_types[0]} -> Pad (reflect, edge, wrap, or zeros for a pure scale) -> Conv "
                            "(into its input channels)")

    def match(self, g: GraphQuery, i: int) -> Match | str:
        node = g.node(i)
        if not node.input or not node.input[0]:
            return ""
        pi, tail = g.upstream(node.input[0])
        if pi is None or g.node(pi).op_type != "Pad" or not is_default(g.node(pi)) or not g.node(pi).input[0]:
            return ""
        pad = g.node(pi)
        ai, chain = g.upstream(pad.input[0])
        if ai is None or not is_default(g.node(ai)) or g.node(ai).op_type not in self.consumer.op_types:
            return ""
        affine = g.node(ai)
        for d in self.consumer.data_inputs(affine):
            if d < len(affine.input) and affine.input[d] and self.consumer.is_candidate(g, affine, d):
                padded = [pad.output[0], *(g.node(k).output[0] for k in reversed(tail))]
                return Match(
                    upstream=ai, downstream=i, affine=ai, data_index=d, path=[pi],
                    between=[affine.output[0], *(g.node(k).output[0] for k in reversed(chain)), *padded],
                    kept=set(padded), remove=[ai, *chain],
                    inputs={(pi, 0): affine.input[d]},  # the Pad reads the affine's input
                    output=node.output[0],
                    reads=({*(n for k, n in enumerate(affine.input) if k != d), *node.input[1:],
                            *pad.input[1:]}) - {""},
                )
        return ""

    def fold(self, g: GraphQuery, m: Match) -> Edit:
        a, node, pad = g.node(m.upstream), g.node(m.downstream), g.node(m.path[0])
        _check_keeps_shape(g, a, m.data_index)
        _check_not_gelu_tail(g, a, m.data_index)
        mode, amounts, value = _pad_spec(g, pad)
        check_pad_commutes(mode, amounts, value, None)  # what the affine's values do not change, first
        dtype, update = _into_conv(g, self.consumer, a, m.data_index, node,
                                   lambda shift: check_pad_commutes(mode, amounts, value, shift))
        return m.edit(dtype, {m.downstream: update}, 1)


def _check_not_gelu_tail(g: GraphQuery, a: onnx.NodeProto, d: int) -> None:
    """Decline the 0.5 of a GELU written out, ``x * (1 + erf(x / sqrt 2)) * 0.5`` (or tanh in place of erf):
    onnxruntime fuses those nodes into one Gelu (FastGelu) kernel only with that Mul in place, so folding
    it into the next Conv or MatMul leaves five elementwise nodes to run (legacy ConvNeXt and SwiftFormer
    exports ran 5-8% slower than the original, issue 20)."""
    if a.op_type != "Mul" or len(a.input) != 2:
        return
    try:
        half = g.const(a.input[1 - d], "the Mul's constant")
    except NotFoldable:
        return
    if half.size != 1 or float(half.reshape(-1)[0]) != 0.5:
        return
    pi, _ = g.upstream(a.input[d])
    if pi is None or g.node(pi).op_type != "Mul":
        return
    for name in g.node(pi).input:
        ai, _ = g.upstream(name)
        if ai is None or g.node(ai).op_type != "Add":
            continue
        for inner in g.node(ai).input:
            ei, _ = g.upstream(inner)
            if ei is not None and g.node(ei).op_type in ("Erf", "Tanh"):
                raise NotFoldable(f"the Mul by 0.5 ends a GELU (x * (1 + {g.node(ei).op_type.lower()}(...)) * 0.5), "
                                  "which onnxruntime fuses into one Gelu kernel only with the Mul in place")


def _is_target(node: onnx.NodeProto) -> bool:
    return is_default(node) and node.op_type in TARGETS


def _who(node: onnx.NodeProto, k: int) -> str:
    return f"the {node.op_type} '{node.name}'" if node.name else f"the {node.op_type} (node {k})"


def _pad_spec(g: GraphQuery, pad: onnx.NodeProto) -> tuple[str, list[int], float]:
    """A Pad's (mode, amounts over every axis, constant value), as its version of the spec says."""
    since = g.since_version("Pad")
    mode = attr(pad, "mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    if PAD_MODES.get(mode, since + 1) > since:
        raise NotFoldable(f"the Pad has mode '{mode}', which Pad-{since} does not define")
    if since < 11:
        pads = attr(pad, "paddings" if since < 2 else "pads")
        if pads is None:
            raise NotFoldable(f"the Pad has no {'paddings' if since < 2 else 'pads'} attribute")
        return mode, pad_amounts(pads, None), float(attr(pad, "value", 0.0))
    if len(pad.input) < 2 or not pad.input[1]:
        raise NotFoldable("the Pad has no pads input")
    pads = g.const(pad.input[1], "Pad pads")
    axes, rank = None, None
    if since >= 18 and len(pad.input) > 3 and pad.input[3]:
        axes = g.const(pad.input[3], "Pad axes")
        rank = g.rank(pad.input[0])
        if rank is None:
            raise NotFoldable("the rank of the Pad's input is unknown, so its axes cannot be placed")
    value = 0.0
    if len(pad.input) > 2 and pad.input[2]:
        v = g.const(pad.input[2], "Pad constant_value")
        if v.size != 1:
            raise NotFoldable(f"the Pad's constant_value has shape {list(v.shape)}, not a scalar")
        value = float(np.asarray(v, np.float64).reshape(-1)[0])
    return mode, pad_amounts(pads, axes, rank), value


def _check_keeps_shape(g: GraphQuery, a: onnx.NodeProto, d: int) -> None:
    """The producer will read the affine's input instead of its output: they must have one shape. A
    constant may broadcast the input to more channels ([N, 1, H, W] * [1, C, 1, 1]) or a higher rank;
    BatchNormalization never does. NotFoldable unless the shapes are proven equal."""
    if a.op_type == "BatchNormalization":
        return
    const = g.const(a.input[1 - d], f"{a.op_type} operand")
    if const.size == 1 and const.ndim <= 1:
        return  # a scalar, or [1]: the producer's input has rank 1 or more anyway
    shape = g.shape(a.input[d])
    if shape is None or const.ndim > len(shape) or any(
            c != 1 and shape[len(shape) - const.ndim + k] != c for k, c in enumerate(const.shape)):
        what = "of unknown shape" if shape is None else f"of shape {list(shape)}"
        raise NotFoldable(f"the {a.op_type}'s constant of shape {list(const.shape)} may broadcast its input "
                          f"({what}) to a larger shape, which the producer would then not see")


def _into_conv(g: GraphQuery, consumer: Consumer, a: onnx.NodeProto, d: int, conv: onnx.NodeProto,
               check: Callable[[np.ndarray], None] | None = None):
    w, b = conv_constants(g, conv)
    group = int(attr(conv, "group", 1))
    scale, shift = consumer.affine(g, a, d, w.shape[1] * group, w.ndim, 1)
    if check is not None:
        check(shift)
    padding = _padding(conv)
    if padding and np.any(shift):
        raise NotFoldable(f"Conv pads its input ({padding}): zero padding after {a.op_type} "
                          "is not an affine of the input")
    w2, b2 = conv_input_affine(w, b, scale, shift, group, padded=bool(padding))
    return w.dtype, Update(new_inputs(scale, NewValue(w2, "weight", conv.input[1]),
                                      {2: NewValue(b2, "bias", bias_hint(conv))}))


def _padding(conv: onnx.NodeProto) -> str:
    """How a Conv pads its input ("" when it does not)."""
    auto_pad = attr(conv, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return f"auto_pad={auto_pad}"
    pads = attr(conv, "pads", None)
    if auto_pad == "NOTSET" and pads and any(pads):
        return f"pads={list(pads)}"
    return ""


def _into_gemm(g: GraphQuery, consumer: Consumer, a: onnx.NodeProto, d: int, gemm: onnx.NodeProto):
    if int(attr(gemm, "transA", 0)):
        raise NotFoldable("Gemm has transA=1: its input's channel axis 1 is not the axis it reduces over")
    b = matrix_weight(g, gemm, "Gemm B")
    trans_b = int(attr(gemm, "transB", 0))
    c = g.const(gemm.input[2], "Gemm C") if len(gemm.input) > 2 and gemm.input[2] else None
    scale, shift = consumer.affine(g, a, d, b.shape[1] if trans_b else b.shape[0], 2, 1)
    b2, c2, beta = gemm_input_affine(b, c, scale, shift, trans_b=trans_b, alpha=float(attr(gemm, "alpha", 1.0)),
                                     beta=float(attr(gemm, "beta", 1.0)))
    bias = {} if c2 is None else {2: NewValue(c2, "bias", bias_hint(gemm))}
    return b.dtype, Update(new_inputs(scale, NewValue(b2, "weight", gemm.input[1]), bias), attributes={"beta": beta})


def _into_matmul(g: GraphQuery, consumer: Consumer, a: onnx.NodeProto, d: int, matmul: onnx.NodeProto):
    rank = g.rank(a.input[d])
    if rank is None or rank < 2:
        raise NotFoldable(f"the rank of MatMul's input is {'unknown' if rank is None else rank}")
    if consumer.fixed_axis is not None and consumer.fixed_axis != rank - 1:
        raise NotFoldable(f"MatMul's input has rank {rank}: it reduces over axis {rank - 1}, the "
                          f"{a.op_type}'s channels are on axis {consumer.fixed_axis}")
    w = matrix_weight(g, matmul, "MatMul weight")
    scale, shift = consumer.affine(g, a, d, w.shape[0], rank, rank - 1)
    w2, added = matmul_input_affine(w, scale, shift)
    weight = NewValue(w2, "weight", matmul.input[1])
    if added is None:
        return w.dtype, Update({1: weight})
    if rank != 2:
        raise NotFoldable(f"MatMul's input has rank {rank}: it has no bias to take the {a.op_type}'s shift")
    return w.dtype, Update(new_inputs(scale, weight, {2: NewValue(added, "bias", bias_hint(matmul))}), op_type="Gemm")


_FOLD: dict[str, Callable] = {"Conv": _into_conv, "Gemm": _into_gemm, "MatMul": _into_matmul}
