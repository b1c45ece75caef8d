"""A producer, cut along its channel axis into parts, and a per-channel affine on some of the parts.

Three forms cut the producer's output y (C channels) into parts:

- a Split along the channel axis (the parts as the spec cuts them, :func:`onnxfold.layout.split_slices`);
- Slice nodes, every reader of y but Shape and Size, each keeping channels [lo, hi) with step 1
  (torch.chunk and torch.split in the legacy exporter: :func:`onnxfold.layout.slice_range`);
- SplitToSequence along the channel axis, read only by SequenceAt nodes at constant positions
  (torch.chunk in the dynamo exporter: :func:`onnxfold.layout.sequence_slices`).

Each part's affine covers that part's channels; channels no affine covers get the identity (scale 1,
shift 0). The producer takes the whole assembled affine, the parts take the affines' names, and the
affines go. Exact when every channel an affine covers is read by that part alone: Slices (or SequenceAt
positions) that overlap such a part are declined.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ..edit import Edit
from ..errors import NotFoldable
from ..layout import check_channel_axis, sequence_slices, slice_range, split_slices
from ..protobuf import is_default
from .base import GraphQuery, Match, Rule, attr
from .consumers import CONSUMERS, Consumer
from .producers import PRODUCER_BY_OP, Weights, producer_of

_CONSUMER_BY_OP: dict[str, Consumer] = {op: c for c in CONSUMERS for op in c.op_types}


@dataclass
class _Parts:
    """How a cut reads the producer: each part as (node, output slot), the values between the producer and
    the parts that change with it, and the values several nodes of the cut read (for ``Match.readers``)."""

    parts: list[tuple[int, int]]
    between: list[str]
    readers: dict[str, list[int]]


class SplitRule(Rule):
    """Producer -> a cut along its channel axis (Split; Slice nodes with step 1, every reader of the
    producer's output; SplitToSequence -> SequenceAt at constant positions) -> a per-channel affine
    (BatchNormalization, Mul, Add, Sub, Div) on any of the parts, each read only by its affine: all fold
    into the producer, y * s + t with s and t assembled from the parts' affines (1 and 0 elsewhere).
    Declined when a part with an affine shares channels with another part."""

    name = "split_affine"
    anchors = ("Split", "Slice", "SplitToSequence")
    description = "Producer -> Split, Slices or SplitToSequence along channels -> per-channel affines on the parts"

    def match(self, g: GraphQuery, i: int) -> Match | str:
        node = g.node(i)
        if not node.input or not node.input[0]:
            return ""
        pi, chain = g.upstream(node.input[0])
        if pi is None or producer_of(g, g.node(pi)) is None:
            return ""
        cut = _cut(g, i)
        if cut is None:
            return ""
        branches = _branches(g, cut.parts)
        if not branches:
            return ""
        p = g.node(pi)
        first = min(branches)
        return Match(
            upstream=pi, downstream=i, affine=branches[first][0],
            between=[*PRODUCER_BY_OP[p.op_type].inner(g, p), p.output[0],
                     *(g.node(k).output[0] for k in reversed(chain)), *cut.between,
                     *(_out(g, cut.parts[k]) for k in branches)],
            kept={p.output[0], *(g.node(k).output[0] for k in chain)},
            remove=[ci for ci, _ in branches.values()],
            outputs={cut.parts[k]: g.node(ci).output[0] for k, (ci, _) in branches.items()},
            output=g.node(branches[first][0]).output[0],
            reads=({*p.input[1:]} | {n for ci, d in branches.values() for k, n in enumerate(g.node(ci).input)
                                     if k != d}) - {""},
            readers=cut.readers,
        )

    def fold(self, g: GraphQuery, m: Match) -> Edit:
        p, node = g.node(m.upstream), g.node(m.downstream)
        producer = PRODUCER_BY_OP[p.op_type]
        w = producer.weights(g, p)
        cut = _cut(g, m.downstream)
        assert cut is not None  # the match found it
        ranges = _ranges(g, node, cut, w)
        scale, shift = np.ones(w.channels), np.zeros(w.channels)
        for k, (ci, d) in _branches(g, cut.parts).items():
            c = g.node(ci)
            consumer = _CONSUMER_BY_OP[c.op_type]
            if consumer.fixed_axis is not None and consumer.fixed_axis != w.axis:
                raise NotFoldable(f"the producer's channels are on axis {w.axis}, the {c.op_type}'s on axis "
                                  f"{consumer.fixed_axis}")
            lo, hi = ranges[k]
            for j, (lo2, hi2) in enumerate(ranges):
                if j != k and max(lo, lo2) < min(hi, hi2):
                    raise NotFoldable(f"{node.op_type} parts {k} and {j} share channels ({lo}:{hi} and {lo2}:{hi2}): "
                                      f"part {j} would see part {k}'s {c.op_type}")
            scale[lo:hi], shift[lo:hi] = consumer.affine(g, c, d, hi - lo, w.rank, w.axis)
        return m.edit(w.dtype, producer.absorb(m.upstream, p, w, scale, shift), w.axis)


def _out(g: GraphQuery, part: tuple[int, int]) -> str:
    return g.node(part[0]).output[part[1]]


def _cut(g: GraphQuery, i: int) -> _Parts | None:
    """The parts of the cut anchored at node ``i`` (None: no cut this rule follows, or a Slice that is not
    the first of its cut: the first takes the match)."""
    node = g.node(i)
    if node.op_type == "Split":
        return _Parts([(i, k) for k in range(len(node.output))], [], {})
    if node.op_type == "Slice":
        source = node.input[0]
        slices = [k for k in g.readers_of(source) if g.node(k).op_type not in ("Shape", "Size")
                  or not is_default(g.node(k))]
        if slices[0] != i or not all(_reads_as_data(g.node(k), "Slice", source) for k in slices):
            return None
        return _Parts([(k, 0) for k in slices], [], {source: slices})
    seq = node.output[0]
    ats = g.readers_of(seq) if seq else []
    if not ats or not all(_reads_as_data(g.node(k), "SequenceAt", seq) for k in ats):
        return None
    return _Parts([(k, 0) for k in ats], [seq], {seq: ats})


def _reads_as_data(node: onnx.NodeProto, op_type: str, name: str) -> bool:
    return is_default(node) and node.op_type == op_type and node.input[0] == name and name not in node.input[1:]


def _branches(g: GraphQuery, parts: list[tuple[int, int]]) -> dict[int, tuple[int, int]]:
    """{part index: (its affine node, the affine's data input)} for the parts read by one affine alone."""
    found = {}
    for k, part in enumerate(parts):
        out = _out(g, part)
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


def _ranges(g: GraphQuery, node: onnx.NodeProto, cut: _Parts, w: Weights) -> list[tuple[int, int]]:
    """The [start, stop) channels of each part, as the spec of the cut's op says."""
    if node.op_type == "Split":
        check_channel_axis("Split", int(attr(node, "axis", 0)), w.axis, w.rank)
        return split_slices(w.channels, len(node.output), _sizes(g, node), attr(node, "num_outputs"),
                            g.since_version("Split"))
    if node.op_type == "Slice":
        return [_slice(g, g.node(k), w) for k, _ in cut.parts]
    check_channel_axis("SplitToSequence", int(attr(node, "axis", 0)), w.axis, w.rank)
    split = g.const(node.input[1], "SplitToSequence split") if len(node.input) > 1 and node.input[1] else None
    chunks = sequence_slices(w.channels, split, int(attr(node, "keepdims", 1)))
    ranges = []
    for k, _ in cut.parts:
        at = g.node(k)
        if len(at.input) < 2 or not at.input[1]:
            raise NotFoldable("a SequenceAt has no position")
        position = g.const(at.input[1], "SequenceAt position")
        if position.size != 1 or not -len(chunks) <= int(position.reshape(-1)[0]) < len(chunks):
            raise NotFoldable(f"SequenceAt position {position.reshape(-1).tolist()} is not one of the "
                              f"{len(chunks)} tensors of the sequence")
        ranges.append(chunks[int(position.reshape(-1)[0]) % len(chunks)])
    return ranges


def _slice(g: GraphQuery, node: onnx.NodeProto, w: Weights) -> tuple[int, int]:
    """The channels one Slice keeps: Slice-1 from its attributes, Slice-10 on from its constant inputs."""
    if g.since_version("Slice") < 10:
        starts, ends = attr(node, "starts"), attr(node, "ends")
        if starts is None or ends is None:
            raise NotFoldable("the Slice has no starts or ends attribute")
        return slice_range(w.channels, w.rank, w.axis, starts, ends, attr(node, "axes"))
    if len(node.input) < 3 or not node.input[1] or not node.input[2]:
        raise NotFoldable("the Slice has no starts or ends input")

    def optional(k: int, what: str):
        return g.const(node.input[k], what) if len(node.input) > k and node.input[k] else None

    return slice_range(w.channels, w.rank, w.axis, g.const(node.input[1], "Slice starts"),
                       g.const(node.input[2], "Slice ends"), optional(3, "Slice axes"), optional(4, "Slice steps"))


def _sizes(g: GraphQuery, split) -> np.ndarray | None:
    """The Split's sizes: its attribute (before opset 13) or its constant second input."""
    if g.since_version("Split") < 13:
        value = attr(split, "split")
        return None if value is None else np.asarray(value)
    if len(split.input) > 1 and split.input[1]:
        return g.const(split.input[1], "Split sizes")
    return None
