"""A producer followed by a consumer: ``consumer(producer(x))`` becomes one producer node.

Matched at the consumer: its data input is the producer's output, through any Identity nodes and
layout ops (Reshape, Flatten, Transpose, Squeeze, Unsqueeze). The producer's channel axis is followed
through each layout op exactly (:mod:`onnxfold.layout`); the consumer's per-channel axis must be where
it arrives, with every element of a channel still in that channel, or the fold is declined. The layout
ops stay; the last of them (or the producer) writes the consumer's output name, so graph inputs and
outputs keep their names; the consumer and the Identity nodes after the last layout op go.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..edit import Edit, NewValue, Update
from ..errors import NotFoldable
from ..layout import LAYOUT_OPS, follow_layout
from ..protobuf import is_default
from ..report import a
from .base import GraphQuery, Match, Rule, attribute_value
from .consumers import Consumer
from .producers import Producer, Weights

THROUGH = ("Identity", *LAYOUT_OPS)


class PairRule(Rule):
    """A producer, then a consumer of its output (through Identity nodes and layout ops: Reshape,
    Flatten, Transpose, Squeeze, Unsqueeze): the consumer's affine folds into the producer. Through a
    layout op the producer's channel axis is followed exactly (from the op's attributes and constant
    shape); the fold applies only where the consumer's axis is that axis and every element of a channel
    stays in its channel, and is declined with the reason otherwise (a Reshape merging the channel
    axis with another, a shape that is not constant, a Transpose moving it elsewhere)."""

    def __init__(self, producer: Producer, consumer: Consumer):
        self.producer = producer
        self.consumer = consumer
        self.name = f"{producer.name}_{consumer.name}"
        self.description = f"{producer.op_types[0]} -> {consumer.op_types[0]}"
        self.anchors = consumer.op_types
        self.report_left = consumer.report_left

    def match(self, g: GraphQuery, i: int) -> Match | str:
        node = g.node(i)
        why = ""
        for d in self.consumer.data_inputs(node):
            if d >= len(node.input) or not node.input[d] or not self.consumer.is_candidate(g, node, d):
                continue
            found = self._producer(g, node.input[d])
            if isinstance(found, str):
                why = why or found
                continue
            pi, chain = found
            p = g.node(pi)
            path = [k for k in chain if g.node(k).op_type != "Identity"]
            writer = path[0] if path else pi
            tail = chain[: chain.index(writer)] if path else chain  # Identity nodes after the writer
            inner = self.producer.inner(g, p)
            return Match(
                upstream=pi, downstream=i, affine=i, data_index=d, path=path,
                between=[*inner, p.output[0], *(g.node(k).output[0] for k in reversed(chain))],
                remove=[i, *tail],
                kept={p.output[0], *(g.node(k).output[0] for k in chain[chain.index(writer) + 1:])} if path else set(),
                outputs={(writer, 0): node.output[0]},
                output=node.output[0],
                reads={*p.input[1:], *(n for k, n in enumerate(node.input) if k != d)} - {""},
            )
        return why or "it has no data input"

    def _producer(self, g: GraphQuery, x: str) -> tuple[int, list[int]] | str:
        """The producer making ``x`` through Identity and layout nodes, or why there is none."""
        pi, _ = g.upstream(x)
        if pi is None:
            return g.origin(x)
        first = g.node(pi)
        if is_default(first) and first.op_type in LAYOUT_OPS:
            found, chain = g.upstream(x, THROUGH)
            if found is not None and self._is_producer(g, g.node(found)):
                return found, chain
        elif self._is_producer(g, first):
            return g.upstream(x)  # type: ignore[return-value]
        return f"its input comes from {a(first.op_type)} node"

    def _is_producer(self, g: GraphQuery, node: onnx.NodeProto) -> bool:
        return is_default(node) and self.producer.is_producer(g, node)

    def fold(self, g: GraphQuery, m: Match) -> Edit:
        p, c = g.node(m.upstream), g.node(m.downstream)
        w = self.producer.weights(g, p, shift_only=self.consumer.shift_only(c, m.data_index))
        rank, axis = follow_path(g, m.path, p, w)
        fixed = self.consumer.fixed_axis
        if fixed is not None and axis != fixed:
            where = " after the layout ops" if m.path else ""
            raise NotFoldable(f"{p.op_type} output has rank {w.rank}: its channels are on axis {axis}{where}, "
                              f"the {c.op_type}'s on axis {fixed}")
        scale, shift = self.consumer.affine(g, c, m.data_index, w.channels, rank, axis)
        if w.takes_shift or not np.any(shift) or not self.consumer.becomes_add:
            return m.edit(w.dtype, self.producer.absorb(m.upstream, p, w, scale, shift), axis)
        # The producer takes the scale; the shift stays behind as an Add in the consumer's place.
        shaped = shift.reshape(-1, *([1] * (rank - axis - 1)))
        add = Update({1: NewValue(shaped, "shift", c.output[0] + "_shift")}, op_type="Add", arity=2,
                     name=f"{c.name}/shift" if c.name else "")
        return Edit(w.dtype, {**self.producer.absorb(m.upstream, p, w, scale, np.zeros_like(shift)),
                                 m.downstream: add}, axis=axis)


def follow_path(g: GraphQuery, path: list[int], producer: onnx.NodeProto, w: Weights) -> tuple[int, int]:
    """The (rank, channel axis) the producer's channels arrive with after the layout nodes ``path``
    (nearest the consumer first), or NotFoldable when that cannot be proven."""
    if not path:
        return w.rank, w.axis
    shape = g.shape(producer.output[0])
    if shape is None:
        raise NotFoldable(f"the shape of {producer.op_type} output '{producer.output[0]}' is unknown, so its "
                          "channel axis cannot be followed through the layout ops")
    axis = w.axis
    for k in reversed(path):
        node = g.node(k)
        attrs = {at.name: attribute_value(node, at) for at in node.attribute}
        mapped = follow_layout(node.op_type, shape, axis, attrs, [_maybe_const(g, n) for n in node.input[1:]],
                               g.since_version(node.op_type), channels=w.channels if k == path[-1] else None)
        shape, axis = mapped.shape, mapped.axis
    return len(shape), axis


def _maybe_const(g: GraphQuery, name: str) -> np.ndarray | None:
    if not name:
        return None
    try:
        return g.const(name, "input")
    except NotFoldable:
        return None
