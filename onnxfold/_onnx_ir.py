"""Folding an ``onnx_ir.Model`` or ``onnx_ir.Graph`` in place, and a ``torch.onnx.ONNXProgram`` through its model.

onnx_ir's objects are mutable containers (its passes and onnxscript's optimizer change them in place),
and torch's ``ONNXProgram.optimize()`` changes the program in place: folding follows that convention
and returns the same object.

The fold itself runs once, on a ModelProto (one implementation of the pass), and the result is mapped
back onto the caller's objects, as ``_graphsurgeon.py`` does for onnx-graphsurgeon:

- nodes the fold left alone, their values and their initializers stay the same Python objects (a
  torch-backed weight the fold did not change stays the torch tensor);
- a node the fold rewrote (a new weight, an output name, MatMul become Gemm) is replaced by a new
  node in the same place, whose outputs take over the old values' uses, names, types and shapes
  (graph outputs included);
- nodes and initializers missing from the folded proto are removed; new initializers are added.

Memory: ``onnx_ir.serde.serialize_model`` is the one copy of the weights (``TorchTensor.tobytes()``
into the proto); weights in external data (``onnx_ir.ExternalTensor``) are not read there, they stay
references to their file, and the fold maps what it changes from that file (``base_dir``). The folded
proto is not copied back: each new initializer is an ``onnx_ir.TensorProtoTensor`` wrapping the
folded proto's own ``TensorProto``. The proto's unchanged weights are released with it unless a
wrapper keeps the proto alive (protobuf keeps a message's bytes in one arena), so after a fold that
changed something the caller holds at most the original weights plus one copy.

When the fold inlined a model-local function or rewrote a function body there is no node-for-node
mapping; the model's graph and functions are replaced whole by the folded ones (same Model object).

onnx_ir and torch are imported only here, and this module is imported only when such an object is
passed (:func:`kind` looks at type names alone).
"""

from __future__ import annotations

import hashlib
from typing import Any

import onnx
from onnx import helper

from .adapters import TempNames
from .driver import fold_model
from .protobuf import graph_attributes, is_graph_attribute
from .report import FoldReport

_IR_TYPES = ("Model", "Graph")


def kind(obj: object) -> str | None:
    """``"ir_model"``, ``"ir_graph"``, ``"program"`` or None, from the type's module and name alone
    (nothing is imported)."""
    for cls in type(obj).__mro__:
        root = cls.__module__.split(".")[0]
        if root == "onnx_ir" and cls.__name__ in _IR_TYPES:
            return "ir_model" if cls.__name__ == "Model" else "ir_graph"
        if root == "torch" and cls.__name__ == "ONNXProgram":
            return "program"
    return None


def fold_in_place(obj: Any, *, disable=(), enable=()) -> tuple[Any, FoldReport]:
    """Fold ``obj`` (an onnx_ir Model or Graph, or a torch ONNXProgram) in place; returns it and the report."""
    which = kind(obj)
    if which == "program":
        return fold_program(obj, disable=disable, enable=enable)
    if which == "ir_model":
        return fold_ir_model(obj, disable=disable, enable=enable)
    if which == "ir_graph":
        return fold_ir_graph(obj, disable=disable, enable=enable)
    raise TypeError(f"not an onnx_ir.Model, onnx_ir.Graph or torch.onnx.ONNXProgram: {type(obj).__name__}")


def fold_program(program: Any, *, disable=(), enable=()) -> tuple[Any, FoldReport]:
    """Fold ``program.model`` in place. An inference session the program already made ran the unfolded
    model: it is released, so calling the program makes a new one from the folded model.

    ``program.apply_weights(state_dict)`` after a fold does not reach folded weights (they have new
    names, and the BatchNormalization statistics are gone): apply weights first, then fold.
    """
    _, report = fold_ir_model(program.model, disable=disable, enable=enable)
    if report.folded:
        program.release()
    return program, report


def fold_ir_model(model: Any, *, disable=(), enable=()) -> tuple[Any, FoldReport]:
    import onnx_ir as ir

    proto = ir.serde.serialize_model(model)
    mapping = _Mapping.build(model.graph, proto.graph)
    folded, report = fold_model(proto, disable=disable, enable=enable, copy=False, base_dir=_base_dir(model.graph))
    mapping.names.restore(report)
    if not report.folded:
        return model, report
    if report.inlined or any(f.graph.startswith("function ") for f in report.folded):
        _replace_whole(model, folded)
    else:
        mapping.apply(folded.graph)
    return model, report


def fold_ir_graph(graph: Any, *, disable=(), enable=()) -> tuple[Any, FoldReport]:
    import onnx_ir as ir

    opsets = dict(graph.opset_imports) or {"": onnx.defs.onnx_opset_version()}
    opsets.setdefault("", onnx.defs.onnx_opset_version())
    proto = helper.make_model(ir.serde.serialize_graph(graph),
                              opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    mapping = _Mapping.build(graph, proto.graph)
    folded, report = fold_model(proto, disable=disable, enable=enable, copy=False, base_dir=_base_dir(graph))
    mapping.names.restore(report)
    if report.folded:
        mapping.apply(folded.graph)
    return graph, report


def _base_dir(graph: Any) -> str | None:
    """The folder external tensors are read from (onnx_ir keeps it on each ExternalTensor)."""
    import onnx_ir as ir

    for node_or_graph in (graph, *graph.subgraphs()):
        for value in node_or_graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                return str(value.const_value.base_dir)
    return None


def _replace_whole(model: Any, folded: onnx.ModelProto) -> None:
    import onnx_ir as ir

    new = ir.serde.deserialize_model(folded)
    model.graph = new.graph
    model.functions.clear()
    model.functions.update(new.functions)  # opset imports live on the graph


def _signature(node: onnx.NodeProto) -> tuple:
    """What a fold may change in a node, graph attributes aside (those stay the caller's objects)."""
    digest = hashlib.sha256()
    for a in node.attribute:
        if not is_graph_attribute(a):
            digest.update(a.SerializeToString(deterministic=True))
    return node.op_type, node.domain, tuple(node.input), tuple(node.output), digest.hexdigest()


class _Mapping:
    """The caller's graphs and nodes against the serialized proto's, paired by position (serde keeps
    the order), with each proto node given a unique temporary name."""

    def __init__(self) -> None:
        self.graphs: list[tuple[Any, onnx.GraphProto]] = []
        self.nodes: dict[str, Any] = {}  # temporary name -> the caller's node
        self.names = TempNames()
        self.signatures: dict[str, tuple] = {}

    @classmethod
    def build(cls, graph: Any, proto: onnx.GraphProto) -> _Mapping:
        mapping = cls()
        mapping._pair(graph, proto)
        return mapping

    def _pair(self, graph: Any, proto: onnx.GraphProto) -> None:
        self.graphs.append((graph, proto))
        nodes = list(graph)
        if len(nodes) != len(proto.node):
            raise AssertionError("onnx_ir serialized a different number of nodes than the graph holds")
        for node, node_proto in zip(nodes, proto.node):
            tmp = node_proto.name = self.names.assign(node_proto.op_type, node_proto.name)
            self.nodes[tmp] = node
            self.signatures[tmp] = _signature(node_proto)
            for attr, subs in graph_attributes(node_proto):
                value = node.attributes[attr.name].value
                for sub, sub_proto in zip(value if isinstance(value, (list, tuple)) else [value], subs):
                    self._pair(sub, sub_proto)

    def apply(self, folded: onnx.GraphProto) -> None:
        """Rewire the caller's graphs to match the folded proto (its subgraphs are the same objects
        as the ones paired in :meth:`build`, folded in place)."""
        values = _values(g for g, _ in self.graphs)
        for graph, proto in self.graphs:
            _add_initializers(graph, proto, values)
        removed: dict[int, list] = {}
        for graph, proto in self.graphs:
            kept = {n.name for n in proto.node}
            removed[id(graph)] = [node for tmp, node in self.nodes.items()
                                  if tmp not in kept and node.graph is graph]
            previous = None
            for node_proto in proto.node:
                previous = self._place(graph, node_proto, previous, values, removed[id(graph)])
        for graph, proto in self.graphs:
            graph.remove(removed[id(graph)], safe=True)
            for name in set(graph.initializers) - {t.name for t in proto.initializer}:
                value = graph.initializers[name]
                if not value.uses() and not value.is_graph_output():
                    graph.initializers.pop(name)

    def _place(self, graph: Any, node_proto: onnx.NodeProto, previous: Any, values: dict, removed: list) -> Any:
        """The caller's node for ``node_proto``: the same node if the fold left it alone, else a new
        node inserted after ``previous`` (the old one goes to ``removed``)."""
        old = self.nodes.get(node_proto.name)
        if old is not None and self.signatures[node_proto.name] == _signature(node_proto):
            return old
        new = _new_node(node_proto, values, self.names.original(node_proto.name, node_proto.op_type))
        if previous is None and len(graph):
            graph.insert_before(next(iter(graph)), new)
        elif previous is None:
            graph.append(new)
        else:
            graph.insert_after(previous, new)
        if old is not None:
            removed.append(old)
        return new


def _values(graphs) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for graph in graphs:
        for v in (*graph.inputs, *graph.initializers.values()):
            values[v.name] = v
        for node in graph:
            for v in node.outputs:
                if v.name:
                    values[v.name] = v
    return values


def _add_initializers(graph: Any, proto: onnx.GraphProto, values: dict) -> None:
    """The fold's new tensors, as TensorProtoTensor wrappers. Each is first moved out of the folded
    proto (one copy of the folded tensor): a TensorProto inside it would keep the whole proto alive,
    every weight the serialization copied included (protobuf keeps a message tree in one arena)."""
    import onnx_ir as ir

    for tensor in proto.initializer:
        if tensor.name in graph.initializers:
            continue
        own = onnx.TensorProto()
        own.CopyFrom(tensor)
        value = ir.Value(name=tensor.name, const_value=ir.TensorProtoTensor(own),
                         type=ir.TensorType(ir.DataType(tensor.data_type)), shape=ir.Shape(list(tensor.dims)))
        graph.register_initializer(value)
        values[tensor.name] = value


def _new_node(node_proto: onnx.NodeProto, values: dict, name: str) -> Any:
    """A node like ``node_proto`` reading the caller's values; its outputs take over the uses, graph
    outputs, type and shape of the values of the same name."""
    import onnx_ir as ir

    inputs = [values[n] if n else None for n in node_proto.input]
    attributes = [ir.serde.deserialize_attribute(a) for a in node_proto.attribute]
    node = ir.Node(node_proto.domain, node_proto.op_type, inputs, attributes,
                   num_outputs=len(node_proto.output),
                   name=None if not name or name.startswith(f"{node_proto.op_type}#") else name)
    for out, out_name in zip(node.outputs, node_proto.output):
        old = values.get(out_name)
        if old is not None:
            out.type, out.shape = old.type, old.shape
            ir.convenience.replace_all_uses_with(old, out, replace_graph_outputs=True)
            old.name = None
        out.name = out_name
        values[out_name] = out
    return node

