"""Producers joined by a Concat along their channel axis, then a per-channel affine.

The affine's scale and shift over the Concat's channels are cut by each input's channel count
(:func:`onnxfold.layout.split_affine`) and each part folds into its producer (MixNet's mixed
convolutions: depthwise Convs of several kernel sizes, concatenated, then BatchNormalization). Every
input of the Concat must be a foldable producer read only by the Concat; otherwise nothing folds. A
Concat input made by another Concat (along the channels too, read only by the outer one) is flattened:
its inputs are leaves like the outer one's, at their place in the channel order.
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
    read only by the Concat, or a Concat of such, flattened), then a per-channel affine: each producer
    takes its slice of the affine (cut by the channel counts in the flattened order)."""

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
            leaves = _leaves(g, ci)
            if isinstance(leaves, str):
                return leaves
            producers, inner, _ = leaves
            between = [concat.output[0], *(g.node(k).output[0] for k in reversed(tail)), *inner]
            return Match(
                upstream=ci, downstream=i, affine=i, data_index=d, upstreams=producers,
                between=between, kept=set(between) - {concat.output[0], *(g.node(k).output[0] for k in tail)},
                remove=[i, *tail], outputs={(ci, 0): node.output[0]}, output=node.output[0],
                reads=({n for pi in producers for n in g.node(pi).input[1:]}
                       | {n for k, n in enumerate(node.input) if k != d}) - {""},
            )
        return ""

    def fold(self, g: GraphQuery, m: Match) -> Edit:
        c = g.node(m.downstream)
        shift_only = self.consumer.shift_only(c, m.data_index)
        parts = [(pi, PRODUCER_BY_OP[g.node(pi).op_type]) for pi in m.upstreams]
        weights = [producer.weights(g, g.node(pi), shift_only=shift_only) for pi, producer in parts]
        first = weights[0]
        for w in weights:
            if w.rank != first.rank or w.axis != first.axis or w.dtype != first.dtype:
                raise NotFoldable("the Concat's producers differ in rank, channel axis or dtype")
        leaves = _leaves(g, m.upstream)
        assert not isinstance(leaves, str)  # the match found them
        for k in (m.upstream, *leaves[2]):
            check_channel_axis("Concat", int(attr(g.node(k), "axis", 0)), first.axis, first.rank)
        fixed = self.consumer.fixed_axis
        if fixed is not None and first.axis != fixed:
            raise NotFoldable(f"the producers' channels are on axis {first.axis}, the {c.op_type}'s on axis {fixed}")
        scale, shift = self.consumer.affine(g, c, m.data_index, sum(w.channels for w in weights), first.rank,
                                            first.axis)
        updates = {}
        for (pi, producer), w, (s, t) in zip(parts, weights, split_affine(scale, shift, [w.channels for w in weights])):
            updates.update(producer.absorb(pi, g.node(pi), w, s, t))
        return m.edit(first.dtype, updates, first.axis)


def _leaves(g: GraphQuery, ci: int) -> tuple[list[int], list[str], list[int]] | str:
    """The producers under the Concat at ``ci``, a Concat input made by a Concat flattened into its inputs:
    (the producers in channel order, the values between them and ``ci``'s output, the inner Concats), or
    the sentence saying which input is no producer."""
    producers: list[int] = []
    between: list[str] = []
    inner: list[int] = []
    for k, inp in enumerate(g.node(ci).input):
        pi, chain = g.upstream(inp)
        if pi is None:
            return f"its input comes from a Concat whose input {k} is {g.origin(inp)}"
        node = g.node(pi)
        if node.op_type == "Concat" and is_default(node):
            sub = _leaves(g, pi)
            if isinstance(sub, str):
                return sub
            producers += sub[0]
            between += [node.output[0], *(g.node(j).output[0] for j in reversed(chain)), *sub[1]]
            inner += [pi, *sub[2]]
            continue
        if producer_of(g, node) is None:
            return f"its input comes from a Concat whose input {k} is made by {a(node.op_type)} node"
        producers.append(pi)
        between += [*PRODUCER_BY_OP[node.op_type].inner(g, node), node.output[0],
                    *(g.node(j).output[0] for j in reversed(chain))]
    return producers, between, inner
