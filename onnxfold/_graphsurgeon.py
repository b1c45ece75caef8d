"""Folding an onnx-graphsurgeon Graph in place.

The fold itself runs once, on the exported ModelProto (one implementation of the pass). Each node is
given a unique temporary name first, so the result maps back onto the Graph's own node objects: a
node missing from the folded model is removed, a node whose inputs or outputs changed is rewired to
the Graph's existing tensors or to new ``gs.Constant``s. Tensors and nodes the caller holds stay
the same objects; dead tensors are left for ``graph.cleanup()``, graphsurgeon's convention.
"""

from __future__ import annotations

import onnx
from onnx import numpy_helper

from .adapters import TempNames
from .driver import fold_model
from .protobuf import all_graphs, is_graph_attribute


def _gs_graphs(graph):
    import onnx_graphsurgeon as gs

    yield graph
    for node in graph.nodes:
        for value in node.attrs.values():
            subs = value if isinstance(value, (list, tuple)) else [value]
            for sub in subs:
                if isinstance(sub, gs.Graph):
                    yield from _gs_graphs(sub)


def fold_graph(graph, *, disable=(), enable=()):
    import onnx_graphsurgeon as gs

    graphs = list(_gs_graphs(graph))
    nodes = [n for g in graphs for n in g.nodes]
    names = TempNames()
    for node in nodes:
        node.name = names.assign(node.op, node.name)
    try:
        model = gs.export_onnx(graph, do_type_check=False)
        folded, report = fold_model(model, disable=disable, enable=enable, copy=False)
        if report.inlined or any(f.graph.startswith("function ") for f in report.folded):
            # Functions were inlined or rewritten: there is no node-for-node mapping; take the
            # folded graph whole, in the same Graph object.
            replacement = gs.import_onnx(folded)
            graph.__dict__.update(replacement.__dict__)
            nodes = list(graph.nodes)
        elif report.folded:
            _apply(graphs, folded)
    finally:
        for node in nodes:
            node.name = names.original(node.name, node.op)
    names.restore(report)
    return graph, report


def _apply(graphs, folded: onnx.ModelProto) -> None:
    import onnx_graphsurgeon as gs
    from onnx_graphsurgeon.importers.onnx_importer import OnnxImporter

    by_name: dict[str, onnx.NodeProto] = {}
    constants: dict[str, onnx.TensorProto] = {}
    for g in all_graphs(folded.graph):
        for t in g.initializer:
            constants[t.name] = t
        for node in g.node:
            by_name[node.name] = node
            if node.op_type == "Constant":
                for a in node.attribute:
                    if a.name == "value":
                        constants[node.output[0]] = a.t
    tensors = {}
    for g in graphs:
        tensors.update(g.tensors())

    def tensor(name: str):
        if not name:
            return gs.Variable.empty()
        if name not in tensors:
            tensors[name] = gs.Constant(name, numpy_helper.to_array(constants[name]))
        return tensors[name]

    for g in graphs:
        gone = [n for n in g.nodes if n.name not in by_name]
        for node in gone:
            node.inputs.clear()
            node.outputs.clear()
            g.nodes.remove(node)
    for g in graphs:
        for node in g.nodes:
            proto = by_name[node.name]
            same_inputs = [t.name for t in node.inputs] == list(proto.input)
            if same_inputs and [t.name for t in node.outputs] == list(proto.output) and node.op == proto.op_type:
                continue
            node.inputs.clear()
            node.inputs.extend([tensor(n) for n in proto.input])  # a list: gs iterates it twice
            node.outputs.clear()
            node.outputs.extend([tensor(n) for n in proto.output])
            # A fold may change the op (MatMul + bias becomes Gemm) and its attributes (Gemm's beta):
            # the node takes the folded node's op and every attribute but its subgraphs, which stay
            # the Graph objects the caller holds.
            node.op = proto.op_type
            node.domain = proto.domain or None
            subgraphs = {k: v for k, v in node.attrs.items() if _is_graph_attr(v)}
            plain = [a for a in proto.attribute if not is_graph_attribute(a)]
            node.attrs.clear()
            node.attrs.update(OnnxImporter.import_attributes(plain, {}, {}, None, None))  # gs's own conversion
            node.attrs.update(subgraphs)


def _is_graph_attr(value) -> bool:
    import onnx_graphsurgeon as gs

    if isinstance(value, (list, tuple)):
        return bool(value) and all(isinstance(v, gs.Graph) for v in value)
    return isinstance(value, gs.Graph)
