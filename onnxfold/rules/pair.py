"""A producer followed by a consumer: ``consumer(producer(x))`` becomes one producer node.

Matched at the consumer: its data input, through any Identity nodes, is the producer's output. The
producer writes the consumer's output name (graph inputs and outputs keep their names); the consumer
and the Identities go.
"""

from __future__ import annotations

from .base import GraphQuery, Match, Rewrite, Rule, a, is_default
from .consumers import Consumer
from .producers import Producer


class PairRule(Rule):
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
            x = node.input[d]
            pi, chain = g.upstream(x)
            if pi is None:
                why = why or g.origin(x)
                continue
            p = g.node(pi)
            if not is_default(p) or p.op_type not in self.producer.op_types:
                why = why or f"its input comes from {a(p.op_type)} node"
                continue
            return Match(
                upstream=pi, downstream=i, data_index=d,
                between=[p.output[0], *(g.node(k).output[0] for k in reversed(chain))],
                remove=[i, *chain],
                outputs={(pi, 0): node.output[0]},
                output=node.output[0],
                reads={*p.input[1:], *(n for k, n in enumerate(node.input) if k != d)} - {""},
            )
        return why or "it has no data input"

    def fold(self, g: GraphQuery, m: Match) -> Rewrite:
        p, c = g.node(m.upstream), g.node(m.downstream)
        w = self.producer.weights(g, p)
        scale, shift = self.consumer.affine(g, c, m.data_index, w.channels, w.rank)
        return Rewrite(w.dtype, {m.upstream: self.producer.fold(p, w, scale, shift)})
