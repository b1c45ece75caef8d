"""A constant Add into the bias of a producer whose weight is computed at run time.

Conv, ConvTranspose or Gemm, then ``x + c`` or ``x - c`` with ``c`` constant per output channel (a
scalar included). A shift needs only the bias: ``B' = B + c`` (absent B is 0), Gemm's ``C' = beta * C + c``
with beta set to 1. The weight is never read, so it may come from anywhere (onnxoptimizer's
fuse_add_bias_into_conv, for a weight that is a graph input or computed). When the weight is a
constant, the producer rules (conv_add ...) take the pair instead; this rule leaves it to them.
"""

from __future__ import annotations

import numpy as np

from ..edit import Edit, NewValue, Update
from ..errors import NotFoldable
from ..protobuf import is_default
from .base import GraphQuery, Match, Rule, attr, check_float
from .consumers import ArithmeticConsumer
from .producers import bias_hint

_SHIFTS = {"Add": ArithmeticConsumer("Add"), "Sub": ArithmeticConsumer("Sub")}


class BiasAddRule(Rule):
    """Conv/ConvTranspose/Gemm whose weight is not a constant, then Add (or x - c) of a per-channel
    constant: the constant goes into the bias, B' = B + c (Gemm: C' = beta * C + c, beta = 1)."""

    name = "bias_add"
    anchors = ("Add", "Sub")
    description = "Conv/ConvTranspose/Gemm with a run-time weight -> Add of a constant (into the bias only)"

    def match(self, g: GraphQuery, i: int) -> Match | str:
        node = g.node(i)
        consumer = _SHIFTS[node.op_type]
        for d in consumer.data_inputs(node):
            if d >= len(node.input) or not consumer.shift_only(node, d) or not consumer.is_candidate(g, node, d):
                continue
            pi, chain = g.upstream(node.input[d])
            if pi is None:
                continue
            p = g.node(pi)
            if not is_default(p) or p.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(p.input) < 2:
                continue
            if g.constant_like(p.input[1]):
                return ""  # a constant weight: the producer rules fold the pair
            return Match(
                upstream=pi, downstream=i, affine=i, data_index=d,
                between=[p.output[0], *(g.node(k).output[0] for k in reversed(chain))],
                remove=[i, *chain], outputs={(pi, 0): node.output[0]}, output=node.output[0],
                reads={*p.input[2:3], node.input[1 - d]} - {""},
            )
        return ""

    def fold(self, g: GraphQuery, m: Match) -> Edit:
        p, c = g.node(m.upstream), g.node(m.downstream)
        what = "Gemm C" if p.op_type == "Gemm" else f"{p.op_type} bias"
        bias = g.const(p.input[2], what) if len(p.input) > 2 and p.input[2] else None
        operand = g.const(c.input[1 - m.data_index], f"{c.op_type} operand")
        check_float(operand, f"{c.op_type} operand")
        if bias is not None:
            check_float(bias, what)
        rank = 2 if p.op_type == "Gemm" else g.rank(p.output[0]) or g.rank(p.input[0])
        if rank is None:
            raise NotFoldable(f"the rank of {p.op_type}'s output is unknown (no shape information)")
        channels = _channels(g, p, bias)
        _, shift = _SHIFTS[c.op_type].affine(g, c, m.data_index, channels, rank, 1)
        dtype = (bias if bias is not None else operand).dtype
        if p.op_type != "Gemm":
            b = np.zeros(channels) if bias is None else np.asarray(bias, np.float64)
            return m.edit(dtype, {m.upstream: Update({2: NewValue(b + shift, "bias", bias_hint(p))})}, 1)
        beta = float(attr(p, "beta", 1.0))
        b = np.zeros(channels)
        if bias is not None:
            b = np.broadcast_to(np.asarray(bias, np.float64).reshape(-1), (channels,))
        new = b * beta + shift
        if bias is not None and bias.ndim == 2:
            new = new.reshape(1, -1)
        update = Update({2: NewValue(new, "bias", bias_hint(p))}, attributes={"beta": 1.0})
        return m.edit(dtype, {m.upstream: update}, 1)


def _channels(g: GraphQuery, p, bias: np.ndarray | None) -> int:
    """The producer's output channels, from its bias or its output's shape."""
    if p.op_type == "Gemm" and bias is not None and bias.shape not in ((), (1,), (1, 1)):
        if bias.ndim > 2 or (bias.ndim == 2 and bias.shape[0] != 1):
            raise NotFoldable(f"Gemm C has shape {list(bias.shape)}: only a scalar, [N] or [1, N] bias folds")
        return int(bias.shape[-1])
    if p.op_type != "Gemm" and bias is not None:
        return int(bias.shape[0])
    # Not from the constant: a [1, C, 1, 1] constant also broadcasts a one-channel output to C channels,
    # which a bias of C values cannot do.
    shape = g.shape(p.output[0])
    if shape is not None and len(shape) > 1 and shape[1]:
        return int(shape[1])
    raise NotFoldable(f"the number of {p.op_type} output channels is unknown (no bias, no shape information)")
