"""The driver: walk the graph and its subgraphs, apply the shared safety checks, fold, sweep.

One round visits every graph (the main graph, then If/Loop/Scan bodies, depth first). In each it
matches a consumer (BatchNormalization, Mul/Add/Sub/Div by a constant) whose data input is made,
through any Identity nodes, by a producer (Conv, ConvTranspose, Gemm, MatMul) in the same graph;
and a BatchNormalization feeding a Conv. It checks once what every rule shares (what the fold
removes has no other reader and is no graph output), asks the rule for the folded values, casts
them once to the producer's dtype, and rewires: the producer writes the consumer's output name and
reads new, uniquely named constants; the consumer node goes. After the round, the sweep removes
initializers and constant nodes the folds left unused, and stale ``value_info``. Rounds repeat until
nothing changes (chains fold one link a round, or several when they come in order). Local functions
are handled first (:func:`_fold_functions`).
"""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import constexpr
from .affine import NotFoldable, RowScaled, iter_cast
from .io import all_graphs, copy_fields, read_tensor
from .report import Declined, Folded, FoldReport, Left
from .rules import CONSUMERS, PRODUCERS, select_rules

DEFAULT_DOMAINS = ("", "ai.onnx")
# Ops evaluated when every input is constant: exporters compute biases and transposed weights with
# them (torch's dynamo exporter makes a bias-free Conv's zero bias with Shape -> Expand -> CastLike).
CONSTANT_EXPRESSION_OPS = frozenset(
    "Identity Cast CastLike Shape Size Slice Expand Concat Reshape Unsqueeze Squeeze Flatten Transpose "
    "Gather Tile Range Add Sub Mul Div Neg Sqrt Reciprocal".split()
)
_CONSTANT_MAKERS = CONSTANT_EXPRESSION_OPS | {"Constant", "ConstantOfShape"}
MAX_ROUNDS = 16
CACHE_BYTES = 1 << 16

_CONSUMER_BY_OP = {op: c for c in CONSUMERS for op in c.op_types}
_PRODUCER_BY_OP = {op: p for p in PRODUCERS for op in p.op_types}


def _a(word: str) -> str:
    """'a Mul', 'an Add', 'an Identity': the article by the op's first letter (close enough for op names)."""
    return ("an " if word[:1] in "AEIOU" else "a ") + word


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}#{index}"


def _subgraphs(node: onnx.NodeProto):
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.name, a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            for i, g in enumerate(a.graphs):
                yield f"{a.name}[{i}]", g


class Scope:
    """One graph, with a view of its enclosing graphs for outer-scope constants."""

    def __init__(self, index: "ModelIndex", graph: onnx.GraphProto, parent: "Scope | None", path: str):
        self.index = index
        self.graph = graph
        self.parent = parent
        self.path = path
        self.init = {t.name: i for i, t in enumerate(graph.initializer)}
        self.inputs = {v.name for v in graph.input}
        self.producer = {}
        for i, node in enumerate(graph.node):
            for out in node.output:
                if out:
                    self.producer[out] = i
        self._cache: dict[str, np.ndarray] = {}
        self._declared: dict[str, onnx.ValueInfoProto] | None = None
        self.pending_constants: dict[int, list[onnx.NodeProto]] = {}

    # -- constants -------------------------------------------------------------------------------
    def overridable(self, name: str) -> bool:
        """An initializer that is also a graph input can be fed at run time (IR >= 4)."""
        return name in self.inputs and self.index.ir_version >= 4

    def const(self, name: str, what: str) -> np.ndarray:
        """The value of a constant tensor visible here, or NotFoldable saying why it is not one."""
        scope = self
        while scope is not None:
            if name in scope._cache:
                return scope._cache[name]
            if name in scope.init:
                if scope.overridable(name):
                    raise NotFoldable(
                        f"{what} '{name}' is an initializer that is also a graph input (IR version "
                        f"{self.index.ir_version}), so it can be fed at run time"
                    )
                value = read_tensor(scope.graph.initializer[scope.init[name]], self.index.base_dir, self.index.sink)
            elif name in scope.producer:
                value = scope._node_constant(scope.graph.node[scope.producer[name]], name, what)
            elif name in scope.inputs:
                raise NotFoldable(f"{what} '{name}' is a graph input, not a constant")
            else:
                scope = scope.parent
                continue
            if value.nbytes <= CACHE_BYTES:  # statistics, shapes; weights are read once, not held
                scope._cache[name] = value
            return value
        raise NotFoldable(f"{what} '{name}' is not defined in this graph or an enclosing one")

    def _node_constant(self, node: onnx.NodeProto, name: str, what: str) -> np.ndarray:
        if node.domain in DEFAULT_DOMAINS and node.op_type == "Constant":
            try:
                return constexpr.constant_value(node, self.since_version(node),
                                                lambda t: read_tensor(t, self.index.base_dir))
            except NotFoldable as e:
                raise NotFoldable(f"{what} '{name}' is a Constant node that is not folded: {e}") from None
        if node.domain in DEFAULT_DOMAINS and node.op_type == "ConstantOfShape":
            shape = self.const(node.input[0], f"shape of {what}") if node.input and node.input[0] else None
            if shape is None:
                raise NotFoldable(f"{what} '{name}' is made by a ConstantOfShape node without a shape")
            try:
                return constexpr.constant_of_shape(node, shape, self.since_version(node))
            except NotFoldable as e:
                raise NotFoldable(f"{what} '{name}' is made by a ConstantOfShape node that is not folded: {e}") from None
        if node.domain in DEFAULT_DOMAINS and node.op_type == "CastLike" and len(node.input) == 2:
            # Only the dtype of the second input matters: it need not be a constant.
            value = self.const(node.input[0], f"input of the CastLike making {what}")
            target = self.elem_type(node.input[1])
            if target:
                try:
                    like = np.empty(0, helper.tensor_dtype_to_np_dtype(target))
                except Exception:
                    raise NotFoldable(f"{what} '{name}' is cast to data type {target}, which is not evaluated") from None
                return self.index.evaluate(node, {node.input[0]: value, node.input[1]: like})[0]
        if node.domain in DEFAULT_DOMAINS and node.op_type in CONSTANT_EXPRESSION_OPS and node.input:
            values = {}
            for inp in node.input:
                if inp:
                    try:
                        values[inp] = self.const(inp, f"input of the {node.op_type} making {what}")
                    except NotFoldable:
                        break
            else:
                return self.index.evaluate(node, values)[list(node.output).index(name)]
        raise NotFoldable(f"{what} '{name}' is computed by {_a(node.op_type)} node, not a constant")

    def elem_type(self, name: str) -> int:
        """The declared element type of a tensor visible here, or 0 when nothing declares it."""
        scope = self
        while scope is not None:
            v = scope.declared().get(name)
            if v is not None and v.type.HasField("tensor_type"):
                return v.type.tensor_type.elem_type
            if name in scope.init:
                return scope.graph.initializer[scope.init[name]].data_type
            scope = scope.parent
        return 0

    def rank(self, name: str) -> int | None:
        """The rank of a tensor, from declared shapes or, failing that, onnx shape inference."""
        scope = self
        while scope is not None:
            v = scope.declared().get(name)
            if v is not None and v.type.tensor_type.HasField("shape"):
                return len(v.type.tensor_type.shape.dim)
            scope = scope.parent
        return self.index.inferred_rank(name)

    def declared(self) -> dict[str, onnx.ValueInfoProto]:
        """The graph's value infos by name (inputs, value_info, outputs; the first declaration wins)."""
        if self._declared is None:
            self._declared = {}
            for v in (*self.graph.input, *self.graph.value_info, *self.graph.output):
                self._declared.setdefault(v.name, v)
        return self._declared

    def since_version(self, node: onnx.NodeProto) -> int:
        return self.index.since_version(node.op_type)

    def upstream(self, name: str) -> tuple[int | None, list[int]]:
        """The node that makes ``name``, looking through Identity nodes: (its index, the Identities')."""
        chain = []
        i = self.producer.get(name)
        while i is not None and self.graph.node[i].op_type == "Identity" and self.graph.node[i].domain in DEFAULT_DOMAINS:
            if i in chain:  # an Identity cycle (an invalid graph): no producer, so nothing folds through it
                return None, chain
            chain.append(i)
            i = self.producer.get(self.graph.node[i].input[0])
        return i, chain

    def is_const(self, name: str) -> bool:
        try:
            self.const(name, "value")
        except NotFoldable:
            return False
        return True

    def constant_like(self, name: str, _seen: frozenset = frozenset()) -> bool:
        """Whether ``name`` is made from constants alone (an initializer, a Constant node, or an
        expression over them), whether or not onnxfold can evaluate it: the graph's structure only.
        A candidate whose constant cannot be evaluated is then declined with the reason, not skipped."""
        if name in _seen:  # a cycle (an invalid graph)
            return False
        scope = self
        while scope is not None:
            if name in scope.init:
                return not scope.overridable(name)
            if name in scope.producer:
                node = scope.graph.node[scope.producer[name]]
                if node.domain not in DEFAULT_DOMAINS or node.op_type not in _CONSTANT_MAKERS:
                    return False
                inputs = node.input[:1] if node.op_type == "CastLike" else node.input  # CastLike: only the dtype of the 2nd
                return all(scope.constant_like(i, _seen | {name}) for i in inputs if i)
            if name in scope.inputs:
                return False
            scope = scope.parent
        return False

    # -- writing ---------------------------------------------------------------------------------
    def streams(self) -> bool:
        """Whether large new tensors here go straight to the output's data file."""
        return self.index.sink is not None and self.parent is None and not self.index.constants_as_nodes

    def add_constant(self, tensor: onnx.TensorProto, before: int) -> None:
        """A new constant tensor: an initializer, or a Constant node where initializers don't fit."""
        name = tensor.name
        if self.index.constants_as_nodes or (self.parent is not None and self.index.ir_version < 4):
            # A function body has no initializers, and IR 3 requires every initializer to be a graph
            # input while a subgraph's inputs are its signature: a Constant node it is.
            node = helper.make_node("Constant", [], [name], value=tensor, name=name)
            self.pending_constants.setdefault(before, []).append(node)
            return
        self.graph.initializer.append(tensor)
        self.init[name] = len(self.graph.initializer) - 1
        if self.index.ir_version < 4:
            self.graph.input.append(helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
            self.inputs.add(name)

    def rebuild_nodes(self, removed: set[int]) -> None:
        if not removed and not self.pending_constants:
            return
        if not self.pending_constants:
            for i in sorted(removed, reverse=True):
                del self.graph.node[i]
            return
        nodes = []
        for i, node in enumerate(self.graph.node):
            nodes.extend(self.pending_constants.get(i, ()))
            if i not in removed:
                nodes.append(node)
        copies = [onnx.NodeProto() for _ in nodes]
        for copy, node in zip(copies, nodes):
            copy.CopyFrom(node)
        del self.graph.node[:]
        self.graph.node.extend(copies)
        self.pending_constants.clear()


class ModelIndex:
    """Every graph of a model, and how many times each tensor name is read across all of them."""

    def __init__(self, model: onnx.ModelProto, constants_as_nodes: bool = False, base_dir=None, sink=None,
                 ranks: dict | None = None):
        self.model = model
        self.base_dir = base_dir  # where external data files are, for tensors not yet read
        self.sink = sink  # the output's data file: large folded tensors are written as they are made
        self.constants_as_nodes = constants_as_nodes  # a function body has no initializers
        self.ir_version = model.ir_version
        self.opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), None)
        self.scopes: list[Scope] = []
        self.uses: Counter[str] = Counter()
        self.names: set[str] = set()
        # Ranks from shape inference, shared by the rounds of one fold_model: a fold keeps the names
        # and shapes of the tensors that stay, so what was inferred once holds for the later rounds.
        self._ranks = ranks if ranks is not None else {}
        self._since: dict[str, int] = {}
        self._walk(model.graph, None, "main")

    def _walk(self, graph, parent, path):
        scope = Scope(self, graph, parent, path)
        self.scopes.append(scope)
        for v in graph.input:
            self.names.add(v.name)
        for t in graph.initializer:
            self.names.add(t.name)
        for v in graph.output:
            self.uses[v.name] += 1  # a graph output is read by whoever runs the graph
        for i, node in enumerate(graph.node):
            for name in node.input:
                if name:
                    self.uses[name] += 1
            self.names.update(node.output)
            for attr_name, sub in _subgraphs(node):
                self._walk(sub, scope, f"{path}/{_node_label(node, i)}.{attr_name}")

    def since_version(self, op_type: str) -> int:
        if op_type not in self._since:
            opset = self.opset or onnx.defs.onnx_opset_version()
            try:
                self._since[op_type] = onnx.defs.get_schema(op_type, opset).since_version
            except onnx.defs.SchemaError:
                self._since[op_type] = opset
        return self._since[op_type]

    def evaluate(self, node: onnx.NodeProto, values: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Evaluate one node on constant inputs as the ONNX specification says, at the model's opset
        (:mod:`onnxfold.constexpr`; anything it cannot evaluate exactly is declined)."""
        return constexpr.evaluate(node, values, self.since_version(node.op_type))

    def inferred_rank(self, name: str) -> int | None:
        """The rank onnx shape inference gives ``name``; inference runs at most once per fold_model, and
        only when a rule asks, on a copy of the model without its weights."""
        if "inferred" not in self._ranks:
            self._ranks["inferred"] = _infer_ranks(self.model)
        return self._ranks["inferred"].get(name)

    def unique(self, hint: str) -> str:
        base = hint if hint.endswith("_folded") else f"{hint}_folded"
        name, n = base, 0
        while name in self.names:
            n += 1
            name = f"{base}_{n}"
        self.names.add(name)
        return name

    def graph_outputs(self) -> set[str]:
        return {v.name for s in self.scopes for v in s.graph.output}


def fold_model(
    model: onnx.ModelProto, *, disable=(), copy: bool = True, base_dir=None, sink=None
) -> tuple[onnx.ModelProto, FoldReport]:
    """Fold every safe producer -> consumer pair. Returns the folded model and a :class:`FoldReport`.

    The argument is left untouched unless ``copy=False``. ``base_dir`` is the model's folder, for
    tensors whose external data has not been loaded; ``sink`` (an :class:`onnxfold.io.DataSink`)
    receives large folded tensors as they are made, so no more than one weight is in memory at a time.
    """
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(f"fold_model takes an onnx.ModelProto, not {type(model).__name__} "
                        "(fold_conv_bn also takes a GraphProto or an onnx_graphsurgeon.Graph)")
    start = time.perf_counter()
    rules = select_rules(disable)
    if copy:
        clone = onnx.ModelProto()
        clone.CopyFrom(model)
        model = clone
    report = FoldReport(bn_before=count_ops(model, "BatchNormalization"))
    in_functions = FoldReport()
    if model.functions:
        model, in_functions = _fold_functions(model, rules, report)
    _fold_rounds(model, rules, report, base_dir=base_dir, sink=sink)
    # the rounds start each pass with empty lists: what the function bodies declined or left goes first
    report.declined[:0] = in_functions.declined
    report.left[:0] = in_functions.left
    report.bn_after = count_ops(model, "BatchNormalization")
    report.seconds = time.perf_counter() - start
    return model, report


def _fold_rounds(model: onnx.ModelProto, rules, report: FoldReport, constants_as_nodes: bool = False,
                 base_dir=None, sink=None) -> None:
    ranks: dict = {}
    for _ in range(MAX_ROUNDS):
        report.rounds += 1
        report.declined.clear()
        report.left.clear()
        index = ModelIndex(model, constants_as_nodes, base_dir, sink, ranks)
        orphans: set[str] = set()
        changed = 0
        for scope in index.scopes:
            changed += _fold_scope(scope, rules, report, orphans)
        if orphans:
            _sweep(ModelIndex(model, constants_as_nodes, base_dir, sink), orphans)
        if not changed:
            break


def _fold_functions(model: onnx.ModelProto, rules, report: FoldReport) -> tuple[onnx.ModelProto, FoldReport]:
    """Model-local functions.

    A pair whose weights live in the body (Constant nodes) is the same for every call: it folds in
    the body, and the function stays. A pair whose weights are function inputs is bound at each call
    site: folding it means specializing the body per call, which is what inlining does, so such a
    function is inlined (onnxruntime inlines local functions before running anyway) and its calls
    fold in the graph like any other nodes. Returns the model and what the bodies declined or left.
    """
    to_inline, kept = [], FoldReport()
    for fn in model.functions:
        if _reads_weights_from_inputs(fn):
            to_inline.append((fn.domain, fn.name))
            continue
        graph = helper.make_graph(list(fn.node), fn.name, [onnx.ValueInfoProto(name=n) for n in fn.input],
                                  [onnx.ValueInfoProto(name=n) for n in fn.output])
        body = helper.make_model(graph, opset_imports=list(fn.opset_import) or list(model.opset_import))
        body.ir_version = model.ir_version
        sub = FoldReport()
        _fold_rounds(body, rules, sub, constants_as_nodes=True)
        path = f"function {fn.domain}.{fn.name}" if fn.domain else f"function {fn.name}"
        for record in (*sub.folded, *sub.declined, *sub.left):
            record.graph = path
        report.folded += sub.folded
        kept.declined += sub.declined
        kept.left += sub.left
        if sub.folded:
            del fn.node[:]
            fn.node.extend(body.graph.node)
    if to_inline:
        from onnx import inliner

        model = inliner.inline_selected_functions(model, to_inline)
        report.inlined = [f"{d}.{n}" if d else n for d, n in to_inline]
    return model, kept


def _reads_weights_from_inputs(fn: onnx.FunctionProto) -> bool:
    """Whether a foldable-looking pair in the body takes a weight or statistic from a function input."""
    inputs = set(fn.input)
    producer = {o: n for n in fn.node for o in n.output}

    def upstream(name):
        node, seen = producer.get(name), set()
        while node is not None and node.op_type == "Identity":
            if id(node) in seen:  # an Identity cycle: no producer
                return None
            seen.add(id(node))
            node = producer.get(node.input[0])
        return node

    for node in fn.node:
        if node.op_type not in _CONSUMER_BY_OP and node.op_type != "Conv":
            continue
        for data in node.input:
            up = upstream(data)
            if up is None:
                continue
            pair = (up.op_type in _PRODUCER_BY_OP) or (up.op_type == "BatchNormalization" and node.op_type == "Conv")
            if pair and (inputs & (set(up.input[1:]) | (set(node.input) - {data}))):
                return True
    return False


def _fold_scope(scope: Scope, rules, report: FoldReport, orphans: set[str]) -> int:
    graph = scope.graph
    outputs = scope.index.graph_outputs()
    input_rule = rules.get(("BatchNormalization", "Conv"))
    removed: set[int] = set()
    folded = 0
    for ci, node in enumerate(graph.node):
        if ci in removed or node.domain not in DEFAULT_DOMAINS:
            continue
        if input_rule is not None and node.op_type in input_rule.op_types:
            folded += _fold_input(scope, ci, input_rule, report, orphans, removed, outputs)
            continue
        consumer = _CONSUMER_BY_OP.get(node.op_type)
        if consumer is None:
            continue
        clabel = _node_label(node, ci)
        match, why = _find_producer(scope, node, consumer, rules)
        if match is None:
            if consumer.report_left:
                report.left.append(Left(clabel, scope.path, why))
            continue
        pi, data_index, rule, chain = match
        pnode = graph.node[pi]
        plabel = _node_label(pnode, pi)
        between = [pnode.output[0], *(graph.node[i].output[0] for i in reversed(chain))]
        try:
            _check_single_reader(scope, between, outputs, pnode, node)
            weights = rule.producer.weights(scope, pnode)
            scale, shift = rule.consumer.affine(scope, node, data_index, weights)
            update = rule.producer.fold(pnode, weights, scale, shift)
            made, biggest = _materialize(scope, update, weights.dtype)
        except NotFoldable as e:
            report.declined.append(Declined(rule.name, plabel, clabel, scope.path, str(e)))
            continue
        # Rewire: the producer reads the new constants and writes the consumer's output.
        weight_name = _rewrite(scope, pi, update, made, orphans)
        _remove(scope, [ci, *chain], removed, orphans)
        for name in between:
            scope.producer.pop(name, None)
        pnode.output[0] = node.output[0]
        scope.producer[node.output[0]] = pi
        folded += 1
        report.folded.append(_record(rule.name, plabel, clabel, scope, weights.dtype, weight_name, biggest,
                                     node.output[0]))
    scope.rebuild_nodes(removed)
    return folded


def _fold_input(scope: Scope, ci: int, rule, report, orphans, removed, outputs) -> int:
    """BatchNormalization -> Conv: fold the affine into the Conv's input channels."""
    graph = scope.graph
    conv = graph.node[ci]
    if not conv.input or not conv.input[0]:
        return 0
    bi, chain = scope.upstream(conv.input[0])
    if bi is None or bi in removed:
        return 0
    bn = graph.node[bi]
    if bn.op_type != "BatchNormalization" or bn.domain not in DEFAULT_DOMAINS:
        return 0
    blabel, clabel = _node_label(bn, bi), _node_label(conv, ci)
    between = [bn.output[0], *(graph.node[i].output[0] for i in reversed(chain))]
    try:
        _check_single_reader(scope, between, outputs, bn, conv)
        update, dtype = rule.fold(scope, bn, conv)
        made, biggest = _materialize(scope, update, dtype)
    except NotFoldable as e:
        report.declined.append(Declined(rule.name, blabel, clabel, scope.path, str(e)))
        return 0
    weight_name = _rewrite(scope, ci, update, made, orphans)
    x = bn.input[0]
    scope.index.uses[x] += 1  # the Conv reads the BatchNormalization's input now
    conv.input[0] = x
    _remove(scope, [bi, *chain], removed, orphans)
    for name in between:
        scope.producer.pop(name, None)
    report.folded.append(_record(rule.name, blabel, clabel, scope, dtype, weight_name, biggest, conv.output[0]))
    return 1


def _check_single_reader(scope: Scope, names, outputs, upstream, downstream) -> None:
    """The check every rule shares: what the fold removes is read by nothing else."""
    for name in names:
        if name in outputs:
            raise NotFoldable(f"{upstream.op_type} output '{name}' is a graph output")
        n = scope.index.uses[name]
        if n != 1:
            raise NotFoldable(f"{upstream.op_type} output '{name}' has {n} readers, not only the {downstream.op_type}")


def _materialize(scope: Scope, update, dtype) -> tuple[dict[int, onnx.TensorProto], float]:
    """Cast each folded input once to ``dtype`` (block by block) and make its tensor: large ones are
    streamed to the output's data file. Returns the tensors by input index and the weight's max |w'|.
    Nothing is left behind when a value does not fit ``dtype``."""
    index = scope.index
    sink = index.sink if scope.streams() else None
    mark = sink.offset if sink is not None else None
    made: dict[int, onnx.TensorProto] = {}
    biggest = 0.0
    try:
        # small values first: a decline there costs nothing
        for i, (value, what, hint) in sorted(update.inputs.items(), key=lambda kv: _count(kv[1][0])):
            shape = _shape(value)
            name = index.unique(hint)
            big = sink is not None and _count(value) * np.dtype(dtype).itemsize >= sink.THRESHOLD
            peak = [0.0]

            def blocks(value=value, what=what, peak=peak):
                for block, m in iter_cast(value, dtype, what):
                    peak[0] = max(peak[0], m)
                    yield block

            if big:
                made[i] = sink.stream(name, shape, dtype, blocks())
            else:
                arrays = list(blocks())
                if not arrays:  # a zero-size weight (a Conv with no output channels): an empty tensor
                    arrays = [np.zeros(0, dtype=dtype)]
                array = np.concatenate(arrays) if len(arrays) > 1 else arrays[0].reshape(shape)
                made[i] = numpy_helper.from_array(array.reshape(shape), name)
            if i == min(update.inputs):
                biggest = peak[0]
    except NotFoldable:
        if sink is not None:
            sink.rollback(mark)
        raise
    return made, biggest


def _shape(value) -> tuple[int, ...]:
    # a RowScaled knows its shape; np.shape would compute the whole product to find it
    return tuple(value.shape) if isinstance(value, RowScaled) else tuple(np.shape(value))


def _count(value) -> int:
    return int(np.prod(_shape(value), dtype=np.int64))


def _rewrite(scope: Scope, ni: int, update, made: dict[int, onnx.TensorProto], orphans: set[str]) -> str:
    """Point node ``ni``'s inputs at the new tensors; apply attribute and op changes. Returns the weight's name."""
    index = scope.index
    node = scope.graph.node[ni]
    for i, tensor in sorted(made.items()):
        scope.add_constant(tensor, before=ni)
        while len(node.input) <= i:
            node.input.append("")
        old = node.input[i]
        if old:
            index.uses[old] -= 1
            orphans.add(old)
        node.input[i] = tensor.name
        index.uses[tensor.name] += 1
    for key, value in update.attributes.items():
        _set_attr(node, key, value)
    if update.op_type:
        node.op_type = update.op_type
    return made[min(made)].name


def _remove(scope: Scope, indices, removed: set[int], orphans: set[str]) -> None:
    for i in indices:
        for name in scope.graph.node[i].input:
            if name:
                scope.index.uses[name] -= 1
                orphans.add(name)
        removed.add(i)


def _record(rule, upstream, downstream, scope, dtype, weight_name, biggest, output) -> Folded:
    return Folded(rule, upstream, downstream, scope.path, str(np.dtype(dtype)), weight_name, biggest, output)


def _find_producer(scope: Scope, node, consumer, rules):
    """((producer index, data input index, rule, Identity indices), "") or (None, why not)."""
    why = ""
    for data_index in consumer.data_inputs(node):
        if data_index >= len(node.input) or not node.input[data_index]:
            continue
        if not consumer.is_candidate(scope, node, data_index):
            continue
        x = node.input[data_index]
        pi, chain = scope.upstream(x)
        if pi is None:
            why = why or ("its input is a graph input or a constant" if x in scope.inputs or x in scope.init
                          else "its input comes from an enclosing graph")
            continue
        pnode = scope.graph.node[pi]
        producer = _PRODUCER_BY_OP.get(pnode.op_type) if pnode.domain in DEFAULT_DOMAINS else None
        if producer is None:
            why = why or f"its input comes from {_a(pnode.op_type)} node"
            continue
        rule = rules.get((pnode.op_type, node.op_type))
        if rule is None:
            why = why or f"rule {producer.name}_{consumer.name} is disabled"
            continue
        return (pi, data_index, rule, chain), ""
    return None, why or "it has no data input"


def _set_attr(node: onnx.NodeProto, key: str, value) -> None:
    for i, a in enumerate(node.attribute):
        if a.name == key:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(key, value))


def _sweep(index: ModelIndex, orphans: set[str]) -> None:
    """Remove the initializers and constant-producing nodes that the folds left unused."""
    where: dict[str, list[tuple[Scope, str, int]]] = {}
    for scope in index.scopes:
        for name, i in scope.init.items():
            where.setdefault(name, []).append((scope, "init", i))
        for name, i in scope.producer.items():
            where.setdefault(name, []).append((scope, "node", i))
    dead_init: dict[int, set[int]] = {}
    dead_node: dict[int, set[int]] = {}
    dead_names: set[str] = set()
    work = list(orphans)
    while work:
        name = work.pop()
        if not name or index.uses[name] > 0 or name in dead_names:
            continue
        places = where.get(name, [])
        if not places:  # no longer produced (a rewired output): only its value_info is left
            dead_names.add(name)
            continue
        if len(places) > 1:
            continue  # defined in several scopes (shadowed): leave it
        scope, kind, i = places[0]
        if kind == "init":
            dead_init.setdefault(id(scope), set()).add(i)
            dead_names.add(name)
            continue
        node = scope.graph.node[i]
        if node.domain not in DEFAULT_DOMAINS or any(index.uses[o] > 0 for o in node.output if o):
            continue
        if i in dead_node.get(id(scope), ()):
            continue
        dead_node.setdefault(id(scope), set()).add(i)
        dead_names.update(o for o in node.output if o)
        for inp in node.input:
            if inp:
                index.uses[inp] -= 1
                work.append(inp)
    for scope in index.scopes:
        graph = scope.graph
        inits = dead_init.get(id(scope), set())
        removed_names = {graph.initializer[i].name for i in inits}
        for i in sorted(inits, reverse=True):
            del graph.initializer[i]
        if removed_names and index.ir_version < 4:
            _delete_where(graph.input, lambda v: v.name in removed_names)
        nodes = dead_node.get(id(scope), set())
        for i in sorted(nodes, reverse=True):
            del graph.node[i]
        _delete_where(graph.value_info, lambda v: v.name in dead_names)


# Initializers that shape inference may need the values of (Reshape's shape, Slice's starts ...).
_SHAPE_LIKE_BYTES = 1024
_SHAPE_LIKE_TYPES = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)


def _infer_ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Ranks of every value, from onnx shape inference on a weightless copy of the model.

    A weight enters inference only through its type and shape, so each large or float initializer
    is given to it as a graph input of that type and shape: the copy is small (inference serializes
    the model it is given), and external data is never read.
    """
    stub = onnx.ModelProto()
    copy_fields(model, stub, skip=("graph",))
    graph = stub.graph
    copy_fields(model.graph, graph, skip=("initializer",))
    declared = {v.name for v in graph.input}
    for t in model.graph.initializer:
        small = t.data_type in _SHAPE_LIKE_TYPES and t.ByteSize() <= _SHAPE_LIKE_BYTES and not t.external_data
        if small:
            graph.initializer.append(t)
        elif t.name not in declared:
            graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    try:
        inferred = onnx.shape_inference.infer_shapes(stub)
    except Exception:  # inference is a convenience here; without it the rule declines
        return {}
    return {v.name: len(v.type.tensor_type.shape.dim)
            for v in _all_value_infos(inferred.graph) if v.type.tensor_type.HasField("shape")}


def _all_value_infos(graph: onnx.GraphProto):
    for g in all_graphs(graph):
        yield from (*g.input, *g.value_info, *g.output)


def _delete_where(repeated, predicate) -> None:
    for i in reversed([i for i, item in enumerate(repeated) if predicate(item)]):
        del repeated[i]


def count_ops(model: onnx.ModelProto, op_type: str) -> int:
    def count(graph):
        n = 0
        for node in graph.node:
            if node.op_type == op_type and node.domain in DEFAULT_DOMAINS:
                n += 1
            for _, sub in _subgraphs(node):
                n += count(sub)
        return n

    return count(model.graph) + sum(count_function(f, op_type) for f in model.functions)


def count_function(function: onnx.FunctionProto, op_type: str) -> int:
    return sum(1 for n in function.node if n.op_type == op_type and n.domain in DEFAULT_DOMAINS)
