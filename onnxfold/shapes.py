"""Shapes from onnx shape inference, run on a copy of the model without its weights."""

from __future__ import annotations

import onnx
from onnx import helper

from .protobuf import all_graphs, constant_tensor, copy_fields

# Initializers that shape inference may need the values of (Reshape's shape, Slice's starts ...).
_SHAPE_LIKE_BYTES = 1024
_SHAPE_LIKE_TYPES = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)


def infer_shapes(model: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    """The shape of every value (None for a dimension not known before run time), from onnx shape
    inference on a weightless copy of the model.

    A weight enters inference only through its type and shape, so each large or float initializer, and
    each large Constant node of the main graph (paddle2onnx's weights: 10.8 MB of PP-OCRv4 rec's, a
    third of its fold's time), is given to it as a graph input of that type and shape: the copy is small
    (inference serializes the model it is given), and external data is never read.
    """
    stub = onnx.ModelProto()
    copy_fields(model, stub, skip=("graph",))
    graph = stub.graph
    copy_fields(model.graph, graph, skip=("initializer", "node"))
    declared = {v.name for v in graph.input}
    for node in model.graph.node:
        t = constant_tensor(node)
        if t is None or t.ByteSize() <= _SHAPE_LIKE_BYTES:  # a small value, of any type, stays: inference
            graph.node.append(node)  # reads those of Constant nodes (a Resize's float scales)
        elif node.output[0] not in declared:
            graph.input.append(helper.make_tensor_value_info(node.output[0], t.data_type, list(t.dims)))
    for t in model.graph.initializer:
        if _shape_like(t):
            graph.initializer.append(t)
        elif t.name not in declared:
            graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    try:
        inferred = onnx.shape_inference.infer_shapes(stub)
    except Exception:  # inference is a convenience here; without it the rule declines
        return {}
    return {v.name: dims(v) for v in _all_value_infos(inferred.graph) if v.type.tensor_type.HasField("shape")}


def _shape_like(t: onnx.TensorProto) -> bool:
    """A small integer tensor, whose values inference may need (a Reshape's shape, a Slice's starts)."""
    return t.data_type in _SHAPE_LIKE_TYPES and t.ByteSize() <= _SHAPE_LIKE_BYTES and not t.external_data


def dims(value: onnx.ValueInfoProto) -> tuple[int | None, ...]:
    """A value info's shape: each dimension's size, or None when it is symbolic or unknown."""
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                 for d in value.type.tensor_type.shape.dim)


def _all_value_infos(graph: onnx.GraphProto):
    for g in all_graphs(graph):
        yield from (*g.input, *g.value_info, *g.output)
