"""A view over a model's protobuf graphs that keeps its own books.

The protobuf stays underneath (streaming large weights and the memory figures depend on it); the view
adds what a rewriter needs and keeps it right through every edit:

- each value's producer (a node position) and every graph's initializers and inputs, per graph;
- how many times each name is read, across the main graph, its If/Loop/Scan bodies, and as a graph
  output (whoever runs the graph reads it);
- the names in use, to make fresh ones.

:meth:`ModelView.apply` is the one edit primitive: it adds a fold's new constants, points nodes at them,
renames the outputs or inputs the fold rewires and marks nodes removed, adjusting the books as it goes.
Removal is deferred: at the end of a round, :meth:`ModelView.end_round` rebuilds each changed graph's
node list (new Constant nodes go just before their reader), then sweeps away the initializers and
constant nodes nothing reads any more. Nothing else edits the graph.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Collection, Iterable

import numpy as np
import onnx
from onnx import helper

from . import const_eval
from .const_resolve import Constants
from .edit import Edit
from .protobuf import DEFAULT_DOMAINS, delete_where, is_default, subgraphs
from .shapes import dims, infer_shapes
from .tensors import DataSink


class GraphView:
    """One graph of the model: its nodes by position, what makes each value, its constants and types."""

    def __init__(self, model: ModelView, graph: onnx.GraphProto, parent: GraphView | None, path: str):
        self.model = model
        self.graph = graph
        self.parent = parent
        self.path = path
        self.removed: set[int] = set()
        self._pending: dict[int, list[onnx.NodeProto]] = {}  # new Constant nodes, by the node they precede
        self._declared: dict[str, onnx.ValueInfoProto] | None = None
        self._readers: dict[str, list[int]] | None = None  # value -> the positions of the nodes reading it
        # positions of initializers and of each value's producer; apply() keeps them through a round
        self.init = {t.name: i for i, t in enumerate(graph.initializer)}
        self.inputs = {v.name for v in graph.input}
        self.producer: dict[str, int] = {}
        for i, node in enumerate(graph.node):
            for out in node.output:
                if out:
                    self.producer[out] = i
        self.constants = Constants(self)

    # -- structure --------------------------------------------------------------------------------
    def node(self, i: int) -> onnx.NodeProto:
        return self.graph.node[i]

    def label(self, i: int) -> str:
        node = self.graph.node[i]
        return node.name or f"{node.op_type}#{i}"

    def upstream(self, name: str, through: Collection[str] = ("Identity",)) -> tuple[int | None, list[int]]:
        """The node that makes ``name``, looking through nodes of the ``through`` op types (by their
        first input): (its position, the positions passed through, nearest ``name`` first)."""
        chain: list[int] = []
        i = self.producer.get(name)
        while i is not None and self.graph.node[i].op_type in through and is_default(self.graph.node[i]):
            if i in chain or not self.graph.node[i].input:  # a cycle (an invalid graph): no producer
                return None, chain
            chain.append(i)
            i = self.producer.get(self.graph.node[i].input[0])
        return i, chain

    def origin(self, name: str) -> str:
        """Where a value without a producer node here comes from, for a report's sentence."""
        if name in self.inputs or name in self.init:
            return "a graph input or a constant"
        return "an enclosing graph"

    def readers_of(self, name: str) -> list[int]:
        """The positions of this graph's nodes that read ``name`` (not removed ones), in order."""
        if self._readers is None:  # built once a view; ModelView's edits keep it (reread)
            self._readers = {}
            for i, node in enumerate(self.graph.node):
                for read in dict.fromkeys(node.input):
                    self._readers.setdefault(read, []).append(i)
        return [i for i in self._readers.get(name, ()) if i not in self.removed]

    def reread(self, n: int, names: Iterable[str]) -> None:
        """Node ``n``'s inputs changed, and ``names`` are those it read before or reads now: the readers
        index follows."""
        if self._readers is None:
            return
        inputs = set(self.graph.node[n].input)
        for name in names:
            readers = self._readers.setdefault(name, [])
            if name in inputs and n not in readers:
                bisect.insort(readers, n)
            elif name not in inputs and n in readers:
                readers.remove(n)

    def shape_readers(self, name: str) -> int:
        """How many Shape and Size nodes of this graph read ``name`` (they see its shape, not its values)."""
        return sum(1 for i in self.readers_of(name) if self.graph.node[i].op_type in ("Shape", "Size")
                   and is_default(self.graph.node[i]))

    def readers(self, name: str) -> int:
        """How many times ``name`` is read, in any graph of the model, or as a graph output."""
        return self.model.uses[name]

    def is_output(self, name: str) -> bool:
        return name in self.model.graph_outputs

    # -- constants and types (delegated; see onnxfold.const_resolve and onnxfold.shapes) --------------
    def const(self, name: str, what: str) -> np.ndarray:
        return self.constants.value(name, what)

    def constant_like(self, name: str) -> bool:
        return self.constants.constant_like(name)

    def since_version(self, op_type: str) -> int:
        return self.model.since_version(op_type)

    def elem_type(self, name: str) -> int:
        """The declared element type of a tensor visible here, or 0 when nothing declares it."""
        view: GraphView | None = self
        while view is not None:
            v = view.declared().get(name)
            if v is not None and v.type.HasField("tensor_type"):
                return v.type.tensor_type.elem_type
            if name in view.init:
                return view.graph.initializer[view.init[name]].data_type
            view = view.parent
        return 0

    def shape(self, name: str) -> tuple[int | None, ...] | None:
        """A tensor's shape (None for each dimension not known before run time), from declared shapes
        or, failing that, onnx shape inference; None when neither knows its rank."""
        view: GraphView | None = self
        while view is not None:
            v = view.declared().get(name)
            if v is not None and v.type.tensor_type.HasField("shape"):
                return dims(v)
            view = view.parent
        return self.model.inferred_shape(name)

    def rank(self, name: str) -> int | None:
        shape = self.shape(name)
        return None if shape is None else len(shape)

    def declared(self) -> dict[str, onnx.ValueInfoProto]:
        """The graph's value infos by name (inputs, value_info, outputs; the first declaration wins)."""
        if self._declared is None:
            self._declared = {}
            for v in (*self.graph.input, *self.graph.value_info, *self.graph.output):
                self._declared.setdefault(v.name, v)
        return self._declared

    # -- writing ----------------------------------------------------------------------------------
    def streams(self) -> DataSink | None:
        """The output's data file, where large new tensors of this graph go as they are made."""
        m = self.model
        return m.sink if self.parent is None and not m.constants_as_nodes else None

    def _add_constant(self, tensor: onnx.TensorProto, before: int) -> None:
        """A new constant tensor: an initializer, or a Constant node where initializers don't fit."""
        m = self.model
        if m.constants_as_nodes or (self.parent is not None and m.ir_version < 4):
            # A function body has no initializers, and IR 3 requires every initializer to be a graph
            # input while a subgraph's inputs are its signature: a Constant node it is.
            node = helper.make_node("Constant", [], [tensor.name], value=tensor, name=tensor.name)
            self._pending.setdefault(before, []).append(node)
            return
        self.graph.initializer.append(tensor)
        self.init[tensor.name] = len(self.graph.initializer) - 1
        if m.ir_version < 4:
            self.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
            self.inputs.add(tensor.name)

    def _order(self) -> bool:
        """Drop removed nodes and put new Constant nodes before their readers. Whether anything moved."""
        if not self.removed and not self._pending:
            return False
        if not self._pending:
            for i in sorted(self.removed, reverse=True):
                del self.graph.node[i]
        else:
            nodes: list[onnx.NodeProto] = []
            for i, node in enumerate(self.graph.node):
                nodes.extend(self._pending.get(i, ()))
                if i not in self.removed:
                    nodes.append(node)
            copies = [onnx.NodeProto() for _ in nodes]
            for copy, node in zip(copies, nodes):
                copy.CopyFrom(node)
            del self.graph.node[:]
            self.graph.node.extend(copies)
            self._pending.clear()
        self.removed.clear()
        return True


class ModelView:
    """Every graph of a model, with the books :class:`GraphView` reads and :meth:`apply` keeps."""

    def __init__(self, model: onnx.ModelProto, *, constants_as_nodes: bool = False, base_dir=None,
                 sink: DataSink | None = None, bound_at_call: set[str] | None = None):
        self.model = model
        self.base_dir = base_dir  # where external data files are, for tensors not yet read
        self.sink = sink  # the output's data file: large folded tensors are written as they are made
        self.constants_as_nodes = constants_as_nodes  # a function body has no initializers
        # A function's inputs, to judge its body: constants for matching, as a call site may bind them
        self.bound_at_call = bound_at_call or set()
        self.ir_version = model.ir_version
        self.opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), None)
        self._since: dict[str, int] = {}
        # Shapes from shape inference, for the whole fold: a fold keeps the names and shapes of the
        # tensors that stay, so what was inferred once holds for the later rounds.
        self._shapes: dict[str, tuple[int | None, ...]] | None = None
        self.orphans: set[str] = set()  # names a fold stopped reading: the sweep's work list
        self.edits = 0  # edits applied: what a view decided about the structure holds until the next
        self.refresh()

    def refresh(self) -> None:
        """Walk every graph and count every read (at the start, and after each round's order and sweep)."""
        self.graphs: list[GraphView] = []
        self.uses: Counter[str] = Counter()
        self.names: set[str] = set()
        self._walk(self.model.graph, None, "main")
        self.graph_outputs = {v.name for g in self.graphs for v in g.graph.output}

    def _walk(self, graph: onnx.GraphProto, parent: GraphView | None, path: str) -> None:
        view = GraphView(self, graph, parent, path)
        self.graphs.append(view)
        self.names.update(v.name for v in graph.input)
        self.names.update(t.name for t in graph.initializer)
        for v in graph.output:
            self.uses[v.name] += 1  # a graph output is read by whoever runs the graph
        for i, node in enumerate(graph.node):
            self.uses.update(name for name in node.input if name)
            self.names.update(node.output)
            for attr_name, sub in subgraphs(node):
                self._walk(sub, view, f"{path}/{view.label(i)}.{attr_name}")

    def since_version(self, op_type: str) -> int:
        if op_type not in self._since:
            opset = self.opset or onnx.defs.onnx_opset_version()
            try:
                self._since[op_type] = onnx.defs.get_schema(op_type, opset).since_version
            except onnx.defs.SchemaError:
                self._since[op_type] = opset
        return self._since[op_type]

    def evaluate(self, node: onnx.NodeProto, values: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One node on constant inputs, as the ONNX specification says at the model's opset."""
        return const_eval.evaluate(node, values, self.since_version(node.op_type))

    def inferred_shape(self, name: str) -> tuple[int | None, ...] | None:
        """The shape onnx shape inference gives ``name``; inference runs at most once per fold, and only
        when a rule asks, on a copy of the model without its weights (:func:`onnxfold.shapes.infer_shapes`)."""
        if self._shapes is None:
            self._shapes = infer_shapes(self.model)
        return self._shapes.get(name)

    def fresh(self, hint: str) -> str:
        """A name no graph of the model uses, from ``hint``: ``<hint>_folded``, ``<hint>_folded_1`` ..."""
        base = hint if hint.endswith("_folded") else f"{hint}_folded"
        name, n = base, 0
        while name in self.names:
            n += 1
            name = f"{base}_{n}"
        self.names.add(name)
        return name

    # -- the one edit primitive -------------------------------------------------------------------
    def apply(self, view: GraphView, edit: Edit) -> None:
        """Apply a fold's edit to ``view``'s graph and keep every book right. Each new value must have
        its tensor (the driver makes them: ``NewValue.tensor``)."""
        self.edits += 1
        nodes = view.graph.node
        for n, update in edit.updates.items():
            if update.arity is not None:  # it becomes another op: keep that many inputs, no old attribute
                dropped = list(nodes[n].input[update.arity:])
                for name in dropped:
                    self._unread(name)
                del nodes[n].input[update.arity:]
                del nodes[n].attribute[:]
                view.reread(n, dropped)
        for (n, slot), value in sorted(edit.new_values().items()):
            assert value.tensor is not None, "the driver makes each new value's tensor before the edit"
            view._add_constant(value.tensor, before=n)
            self._set_input(view, n, slot, value.tensor.name)
        for (n, slot), name in edit.inputs.items():
            self._set_input(view, n, slot, name)
        for n in edit.remove:
            for name in nodes[n].input:
                self._unread(name)
            for name in nodes[n].output:
                view.producer.pop(name, None)
            view.removed.add(n)
        for (n, slot), name in edit.outputs.items():
            view.producer.pop(nodes[n].output[slot], None)
            nodes[n].output[slot] = name
            view.producer[name] = n
        for n, update in edit.updates.items():
            for key, attribute in update.attributes.items():
                _set_attr(nodes[n], key, attribute)
            if update.op_type:
                nodes[n].op_type = update.op_type
            if update.name is not None:
                nodes[n].name = update.name

    def _set_input(self, view: GraphView, n: int, slot: int, name: str) -> None:
        node = view.graph.node[n]
        while len(node.input) <= slot:
            node.input.append("")
        old = node.input[slot]
        self._unread(old)
        node.input[slot] = name
        self.uses[name] += 1
        view.reread(n, (old, name))

    def _unread(self, name: str) -> None:
        if name:
            self.uses[name] -= 1
            self.orphans.add(name)

    # -- after a round ----------------------------------------------------------------------------
    def end_round(self) -> None:
        """Order, then sweep: rebuild the node lists the round's edits changed, then remove what no
        longer has a reader. Rebuilt lists hold new node (and subgraph) objects, so the views are made
        again; the counts they find are the books the edits kept."""
        if any([view._order() for view in self.graphs]):
            self.refresh()
        if self.orphans:
            self._sweep()
            self.refresh()

    def _sweep(self) -> None:
        """Remove the initializers and constant-making nodes nothing reads any more, and the value
        infos of names nothing makes."""
        places: dict[str, list[tuple[GraphView, str, int]]] = {}
        for view in self.graphs:
            for name, i in view.init.items():
                places.setdefault(name, []).append((view, "init", i))
            for name, i in view.producer.items():
                places.setdefault(name, []).append((view, "node", i))
        dead_init: dict[int, set[int]] = {}
        dead_node: dict[int, set[int]] = {}
        dead_names: set[str] = set()
        work = list(self.orphans)
        self.orphans.clear()
        while work:
            name = work.pop()
            if not name or self.uses[name] > 0 or name in dead_names:
                continue
            where = places.get(name, [])
            if not where:  # no longer produced (a rewired output): only its value_info is left
                dead_names.add(name)
                continue
            if len(where) > 1:
                continue  # defined in several graphs (shadowed): leave it
            view, kind, i = where[0]
            if kind == "init":
                dead_init.setdefault(id(view), set()).add(i)
                dead_names.add(name)
                continue
            node = view.graph.node[i]
            if not is_default(node) or any(self.uses[o] > 0 for o in node.output if o):
                continue
            if i in dead_node.get(id(view), ()):
                continue
            dead_node.setdefault(id(view), set()).add(i)
            dead_names.update(o for o in node.output if o)
            for inp in node.input:
                if inp:
                    self.uses[inp] -= 1
                    work.append(inp)
        for view in self.graphs:
            _delete(view, dead_init.get(id(view), set()), dead_node.get(id(view), set()), dead_names,
                    self.ir_version)


def _delete(view: GraphView, inits: set[int], nodes: set[int], dead_names: set[str], ir_version: int) -> None:
    graph = view.graph
    removed_names = {graph.initializer[i].name for i in inits}
    for i in sorted(inits, reverse=True):
        del graph.initializer[i]
    if removed_names and ir_version < 4:
        delete_where(graph.input, lambda v: v.name in removed_names)
    for i in sorted(nodes, reverse=True):
        del graph.node[i]
    delete_where(graph.value_info, lambda v: v.name in dead_names)


def _set_attr(node: onnx.NodeProto, key: str, value: object) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == key:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(key, value))


def count_ops(model: onnx.ModelProto, op_type: str) -> int:
    """How many nodes of ``op_type`` (default domain) the model has, in every graph and function."""

    def count(nodes: Iterable[onnx.NodeProto]) -> int:
        n = 0
        for node in nodes:
            if node.op_type == op_type and is_default(node):
                n += 1
            for _, sub in subgraphs(node):
                n += count(sub.node)
        return n

    return count(model.graph.node) + sum(count(f.node) for f in model.functions)
