"""Producers joined by a Concat along their channel axis, then a per-channel affine.

The affine's scale and shift over the Concat's channels are cut by each input's channel count
(:func:`onnxfold.layout.split_affine`) and each part folds into its producer (MixNet's mixed
convolutions: depthwise Convs of several kernel sizes, concatenated, then BatchNormalization). Every
input of the Concat must be a foldable producer read only by the Concat; otherwise nothing folds.
The Concat stays and writes the affine's output name; the affine goes.
"""

from __future__ import annotations

from ..edit import Edit
from ..errors import NotFoldable
from ..layout import check_channel_axis, split_affine
from ..protobuf import is_default
from ..report import a
from .base import GraphQuery, Match, Rule, attr
from .consumers import Consumer
from .producers import PRODUCER_BY_OP, producer_of


class ConcatRule(Rule):
    """Concat of producers along their channel axis (every input a Conv, ConvTranspose, Gemm or MatMul
    read only by the Concat), then a per-channel affine: each producer takes its slice of the affine."""

    def __init__(self, consumer: Consumer):
        self.consumer = consumer
        self.name = f"concat_{consumer.name}"
        self.description = f"Concat of producers -> {consumer.op_types[0]}"
        self.anchors = consumer.op_types
        self.report_left = consumer.report_left

    def match(self, g: GraphQuery, i: int) -> Match | str:
        node = g.node(i)
        for d in self.consumer.data_inputs(node):
            if d >= len(node.input) or not node.input[d] or not self.consumer.is_candidate(g, node, d):
                continue
            ci, tail = g.upstream(node.input[d])
            if ci is None or g.node(ci).op_type != "Concat" or not is_default(g.node(ci)):
                continue
            concat = g.node(ci)
            producers, between = [], [concat.output[0], *(g.node(k).output[0] for k in reversed(tail))]
            for k, inp in enumerate(concat.input):
                pi, chain = g.upstream(inp)
                if pi is None or producer_of(g, g.node(pi)) is None:
                    what = g.origin(inp) if pi is None else f"made by {a(g.node(pi).op_type)} node"
                    return f"its input comes from a Concat whose input {k} is {what}"
                producers.append(pi)
                between += [*PRODUCER_BY_OP[g.node(pi).op_type].inner(g, g.node(pi)), g.node(pi).output[0],
                            *(g.node(j).output[0] for j in reversed(chain))]
            return Match(
                upstream=ci, downstream=i, affine=i, data_index=d, upstreams=producers,
                between=between, kept=set(between) - {concat.output[0], *(g.node(k).output[0] for k in tail)},
                remove=[i, *tail], outputs={(ci, 0): node.output[0]}, output=node.output[0],
                reads=({n for pi in producers for n in g.node(pi).input[1:]}
                       | {n for k, n in enumerate(node.input) if k != d}) - {""},
            )
        return ""

    def fold(self, g: GraphQuery, m: Match) -> Edit:
        concat, c = g.node(m.upstream), g.node(m.downstream)
        shift_only = self.consumer.shift_only(c, m.data_index)
        parts = [(pi, PRODUCER_BY_OP[g.node(pi).op_type]) for pi in m.upstreams]
        weights = [producer.weights(g, g.node(pi), shift_only=shift_only) for pi, producer in parts]
        first = weights[0]
        for w in weights:
            if w.rank != first.rank or w.axis != first.axis or w.dtype != first.dtype:
                raise NotFoldable("the Concat's producers differ in rank, channel axis or dtype")
        check_channel_axis("Concat", int(attr(concat, "axis", 0)), first.axis, first.rank)
        fixed = self.consumer.fixed_axis
        if fixed is not None and first.axis != fixed:
            raise NotFoldable(f"the producers' channels are on axis {first.axis}, the {c.op_type}'s on axis {fixed}")
        scale, shift = self.consumer.affine(g, c, m.data_index, sum(w.channels for w in weights), first.rank,
                                            first.axis)
        updates = {}
        for (pi, producer), w, (s, t) in zip(parts, weights, split_affine(scale, shift, [w.channels for w in weights])):
            updates.update(producer.absorb(pi, g.node(pi), w, s, t))
        return m.edit(first.dtype, updates, first.axis)
