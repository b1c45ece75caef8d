"""A producer, a Split along its channel axis, and a per-channel affine on some of the branches.

Each branch's affine covers that branch's slice of the producer's channels
(:func:`onnxfold.layout.split_slices`, as the spec cuts them); the slices of branches without one
get the identity (scale 1, shift 0). The producer takes the whole assembled affine, the Split's
outputs take the affines' names, and the affines go.
"""

from __future__ import annotations

import numpy as np

from ..edit import Edit
from ..errors import NotFoldable
from ..layout import check_channel_axis, split_slices
from ..protobuf import is_default
from .base import GraphQuery, Match, Rule, attr
from .consumers import CONSUMERS, Consumer
from .producers import PRODUCER_BY_OP, producer_of

_CONSUMER_BY_OP: dict[str, Consumer] = {op: c for c in CONSUMERS for op in c.op_types}


class SplitRule(Rule):
    """Producer -> Split along its channel axis -> a per-channel affine (BatchNormalization, Mul, Add,
    Sub, Div) on any of the branches, each read only by its affine: all fold into the producer."""

    name = "split_affine"
    anchors = ("Split",)
    description = "Producer -> Split along channels -> per-channel affines on the branches"

    def match(self, g: GraphQuery, i: int) -> Match | str:
        split = g.node(i)
        if not split.input or not split.input[0]:
            return ""
        pi, chain = g.upstream(split.input[0])
        if pi is None or producer_of(g, g.node(pi)) is None:
            return ""
        branches = self._branches(g, split)
        if not branches:
            return ""
        p = g.node(pi)
        first = min(branches)
        return Match(
            upstream=pi, downstream=i, affine=branches[first][0],
            between=[*PRODUCER_BY_OP[p.op_type].inner(g, p), p.output[0],
                     *(g.node(k).output[0] for k in reversed(chain)), *(split.output[k] for k in branches)],
            kept={p.output[0], *(g.node(k).output[0] for k in chain)},
            remove=[ci for ci, _ in branches.values()],
            outputs={(i, k): g.node(ci).output[0] for k, (ci, _) in branches.items()},
            output=g.node(branches[first][0]).output[0],
            reads=({*p.input[1:]} | {n for ci, d in branches.values() for k, n in enumerate(g.node(ci).input)
                                     if k != d}) - {""},
        )

    def _branches(self, g: GraphQuery, split) -> dict[int, tuple[int, int]]:
        """{Split output index: (its affine node, the affine's data input)} for the branches with one."""
        found = {}
        for k, out in enumerate(split.output):
            readers = g.readers_of(out) if out else []
            if len(readers) != 1:
                continue
            node = g.node(readers[0])
            consumer = _CONSUMER_BY_OP.get(node.op_type) if is_default(node) else None
            if consumer is None:
                continue
            for d in consumer.data_inputs(node):
                if d < len(node.input) and node.input[d] == out and consumer.is_candidate(g, node, d):
                    found[k] = (readers[0], d)
                    break
        return found

    def fold(self, g: GraphQuery, m: Match) -> Edit:
        p, split = g.node(m.upstream), g.node(m.downstream)
        producer = PRODUCER_BY_OP[p.op_type]
        w = producer.weights(g, p)
        check_channel_axis("Split", int(attr(split, "axis", 0)), w.axis, w.rank)
        slices = split_slices(w.channels, len(split.output), _sizes(g, split), attr(split, "num_outputs"),
                              g.since_version("Split"))
        scale, shift = np.ones(w.channels), np.zeros(w.channels)
        for k, (ci, d) in self._branches(g, split).items():
            c = g.node(ci)
            consumer = _CONSUMER_BY_OP[c.op_type]
            if consumer.fixed_axis is not None and consumer.fixed_axis != w.axis:
                raise NotFoldable(f"the producer's channels are on axis {w.axis}, the {c.op_type}'s on axis "
                                  f"{consumer.fixed_axis}")
            lo, hi = slices[k]
            scale[lo:hi], shift[lo:hi] = consumer.affine(g, c, d, hi - lo, w.rank, w.axis)
        return m.edit(w.dtype, producer.absorb(m.upstream, p, w, scale, shift), w.axis)


def _sizes(g: GraphQuery, split) -> np.ndarray | None:
    """The Split's sizes: its attribute (before opset 13) or its constant second input."""
    if g.since_version("Split") < 13:
        value = attr(split, "split")
        return None if value is None else np.asarray(value)
    if len(split.input) > 1 and split.input[1]:
        return g.const(split.input[1], "Split sizes")
    return None
