"""The driver: offer every node to the rules anchored at its op type, check, fold, apply; repeat.

One round visits every graph of the model (the main graph, then If/Loop/Scan bodies, depth first,
through :class:`onnxfold.graph.ModelView`). For each node, the first enabled rule whose ``match``
finds a candidate gets it; the driver checks what every rule shares (the values the fold removes have
no other reader and are no graph output), asks the rule for the folded values, casts them once to the
model's dtype (large ones straight into the output's data file) and applies the edit through the view.
A rule that declines says why, and the report keeps the sentence. After the round the view orders and
sweeps. Rounds repeat until nothing changes (chains fold one link a round, or several when they come
in order). Local functions are handled first (:func:`_fold_functions`).
"""

from __future__ import annotations

import time

import numpy as np
import onnx
from onnx import helper, inliner, numpy_helper

from .affine import RowScaled, iter_cast
from .edit import Edit
from .errors import NotFoldable
from .graph import GraphView, ModelView, count_ops
from .protobuf import all_graphs, is_default, subgraphs
from .report import Declined, Folded, FoldReport, Left
from .rules import Match, Rule, RuleSet
from .tensors import DataSink

MAX_ROUNDS = 16

__all__ = ["fold_model", "MAX_ROUNDS"]


def fold_model(
    model: onnx.ModelProto, *, disable=(), enable=(), copy: bool = True, base_dir=None,
    sink: DataSink | None = None
) -> tuple[onnx.ModelProto, FoldReport]:
    """Fold every safe producer -> consumer pair. Returns the folded model and a :class:`FoldReport`.

    The argument is left untouched unless ``copy=False``. ``base_dir`` is the model's folder, for
    tensors whose external data has not been loaded; ``sink`` (an :class:`onnxfold.tensors.DataSink`)
    receives large folded tensors as they are made, so no more than one weight is in memory at a time.
    """
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(f"fold_model takes an onnx.ModelProto, not {type(model).__name__} "
                        "(fold_conv_bn also takes a GraphProto or an onnx_graphsurgeon.Graph)")
    start = time.perf_counter()
    rules = RuleSet(disable, enable)
    if copy:
        clone = onnx.ModelProto()
        clone.CopyFrom(model)
        model = clone
    report = FoldReport(bn_before=count_ops(model, "BatchNormalization"))
    in_functions = FoldReport()
    if model.functions:
        model, in_functions = _fold_functions(model, rules, report)
    _fold_rounds(ModelView(model, base_dir=base_dir, sink=sink), rules, report)
    # the rounds start each pass with empty lists: what the function bodies declined or left goes first
    report.declined[:0] = in_functions.declined
    report.left[:0] = in_functions.left
    report.bn_after = count_ops(model, "BatchNormalization")
    report.seconds = time.perf_counter() - start
    return model, report


def _fold_rounds(view: ModelView, rules: RuleSet, report: FoldReport) -> None:
    for _ in range(MAX_ROUNDS):
        report.rounds += 1
        report.declined.clear()
        report.left.clear()
        changed = sum([_fold_graph(g, rules, report) for g in view.graphs])
        view.end_round()
        if not changed:
            break


def _fold_graph(g: GraphView, rules: RuleSet, report: FoldReport) -> int:
    """One pass over one graph: match, shared checks, fold, apply. Returns how many folds it made. A node
    that stays after a fold anchored at it is offered again at once: a producer whose input side was a
    chain of affines (paddle2onnx's Div -> Mul -> Add -> Conv) takes them one after the other in this
    pass, not one a pass (PP-OCRv4 det: 4 passes, 2 so)."""
    folded, i = 0, 0
    while i < len(g.graph.node):  # a node a fold appends is offered in this pass too
        while i not in g.removed and is_default(g.node(i)) and _fold_at(g, i, rules, report):
            folded += 1
        i += 1
    return folded


def _fold_at(g: GraphView, i: int, rules: RuleSet, report: FoldReport) -> bool:
    """The fold anchored at node ``i``, if any: whether one was made (else its decline or what is left
    is reported)."""
    found = _match(g, i, rules)
    if isinstance(found, str):
        report.left.append(Left(g.label(i), g.path, found))
        return False
    if found is None:
        return False
    rule, m = found
    try:
        _check_single_reader(g, m, report)
        # float64 arithmetic may overflow (huge statistics, a Div by 0): each new value is checked
        # where it is cast (affine.iter_cast), and one that is not finite declines the fold
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            edit = rule.fold(g, m)
            first, biggest = _materialize(g, edit)
    except NotFoldable as e:
        report.declined.append(Declined(rule.name, g.label(m.upstream), g.label(m.downstream), g.path, str(e)))
        return False
    removed = g.node(m.affine).op_type
    kept_name = m.output in g.node(m.affine).output
    g.model.apply(g, edit)
    _mark_changed(report, g, m, rule.name)
    report.folded.append(Folded(rule.name, g.label(m.upstream), g.label(m.downstream), g.path,
                                str(np.dtype(edit.dtype)), first, biggest, m.output,
                                removed=removed, axis=edit.axis, kept_name=kept_name, terms=terms(edit)))
    return True


def terms(edit: Edit) -> np.ndarray | None:
    """|the constant term| a fold's node adds, per channel: its new bias (or shift), as a vector along
    the channel axis (a 1-D bias: a Conv's, or one broadcast along the last axis; a shaped one with one
    dimension above 1), else its largest value alone; None without one. A value small by cancellation
    (``w'x`` against ``b'``: a BatchNormalization whose mean is far from 0) is rounded on this scale
    (verification's floor: the package's docstring)."""
    found = [np.abs(np.asarray(v.value, dtype=np.float64)) for v in edit.new_values().values()
             if v.what in ("bias", "shift") and isinstance(v.value, np.ndarray)]
    if not found:
        return None
    bias = max(found, key=np.size)
    long = [n for n in bias.shape if n > 1]
    if bias.size and len(long) <= 1:
        return bias.reshape(-1)
    return np.array([bias.max() if bias.size else 0.0])


def _mark_changed(report: FoldReport, g: GraphView, m: Match, rule: str) -> None:
    """An earlier fold's tensor that this fold changed in place (it is still made, with new values: a
    producer's output kept through layout ops, a Split or a Concat, a Linear's MatMul output) holds
    both folds' results: verification must not compare it with the original's."""
    changed = {name for name in m.between if name in g.producer} - {m.output}
    for record in report.folded:
        if record.graph == g.path and record.output in changed and not record.changed_later:
            record.changed_later = rule


def _match(g: GraphView, i: int, rules: RuleSet) -> tuple[Rule, Match] | str | None:
    """The first enabled rule's match at node ``i``; else, where a rule reports what it leaves, the
    reason there is none (a disabled rule that matched, or the first rule's sentence); else None."""
    why, disabled, report = "", "", False
    for rule in rules.anchored(g.node(i).op_type):
        report = report or rule.report_left
        try:
            m = rule.match(g, i)
        except NotFoldable as e:  # the structure depends on what the match cannot know (a call's attribute)
            m = str(e)
        if isinstance(m, str):
            why = why or m
        elif rules.enabled(rule):
            return rule, m
        else:
            disabled = disabled or f"rule {rule.name} is disabled"
    return (disabled or why) if report else None


def _check_single_reader(g: GraphView, m: Match, report: FoldReport) -> None:
    """The check every rule shares: what the fold changes or removes is read by nothing else (a value
    that stays may also be read by Shape and Size nodes: its shape does not change). A value the match
    lets several nodes read (``Match.readers``: fan-out, chunks) is read by those nodes alone."""
    down = g.node(m.downstream).op_type
    for name in m.between:
        if g.is_output(name):
            raise NotFoldable(f"{_value(g, name, report)} is a graph output")
        n = g.readers(name) - (g.shape_readers(name) if name in m.kept else 0)
        covered = m.readers.get(name)
        if covered is None and n != 1:
            raise NotFoldable(f"{_value(g, name, report)} has {n} readers, not only the {down}")
        if covered is not None and n != sum(list(g.node(k).input).count(name) for k in covered):
            ops = ", ".join(dict.fromkeys(g.node(k).op_type for k in covered))
            raise NotFoldable(f"{_value(g, name, report)} has {n} readers: the {len(covered)} the fold covers "
                              f"({ops}) and others")


def _value(g: GraphView, name: str, report: FoldReport) -> str:
    """A value named for a sentence by the op that makes it now, and, when that node writes it under a
    name an earlier fold kept (the removed affine's), the fold that did: "Conv output 'bn_out' (its
    name kept from the BatchNormalization that conv_bn folded)"."""
    at = g.producer.get(name)
    head = f"{g.node(at).op_type} output" if at is not None else "value"
    earlier = next((f for f in reversed(report.folded) if f.graph == g.path and f.output == name and f.kept_name),
                   None)
    kept = f" (its name kept from the {earlier.removed} that {earlier.rule} folded)" if earlier else ""
    return f"{head} '{name}'{kept}"


def _materialize(g: GraphView, edit: Edit) -> tuple[str, float]:
    """Cast each new value once to the edit's dtype (block by block) and make its tensor
    (``NewValue.tensor``): large ones are streamed to the output's data file. Returns the name and max
    |w'| of the first (the weight). Nothing is left behind when a value does not fit the dtype."""
    values = edit.new_values()
    sink = g.streams()
    mark = sink.offset if sink is not None else 0
    peaks: dict[tuple[int, int], float] = {}
    try:
        # small values first: a decline there costs nothing
        for key, v in sorted(values.items(), key=lambda kv: _count(kv[1].value)):
            v.tensor, peaks[key] = _tensor(g, v.value, edit.dtype, v.what, g.model.fresh(v.hint), sink)
    except NotFoldable:
        for v in values.values():
            v.tensor = None
        if sink is not None:
            sink.rollback(mark)
        raise
    first = values[min(values)].tensor
    assert first is not None
    return first.name, peaks[min(values)]


def _tensor(g: GraphView, value, dtype, what: str, name: str, sink: DataSink | None) -> tuple[onnx.TensorProto, float]:
    """One value as a tensor of ``dtype``, and its largest magnitude; streamed when it is large.
    A float16 weight most of whose values would be subnormal declines the fold (:func:`_underflow`)."""
    shape = _shape(value)
    peak = 0.0
    counts = [0, 0]  # nonzero, subnormal

    def blocks():
        nonlocal peak
        for block, m in iter_cast(value, dtype, what):
            peak = max(peak, m)
            if what == "weight" and np.dtype(dtype) == np.float16:  # on the bits: float16 arithmetic is slow
                magnitude = block.view(np.uint16) & 0x7FFF
                zero = int(np.count_nonzero(magnitude == 0))
                counts[0] += block.size - zero
                counts[1] += int(np.count_nonzero(magnitude < 0x0400)) - zero  # exponent 0: subnormal
            yield block
        _underflow(*counts)

    if sink is not None and _count(value) * np.dtype(dtype).itemsize >= sink.THRESHOLD:
        return sink.stream(name, shape, dtype, blocks()), peak
    arrays = list(blocks()) or [np.zeros(0, dtype=dtype)]  # a zero-size weight (no output channels)
    array = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
    return numpy_helper.from_array(array.reshape(shape), name), peak


def _underflow(nonzero: int, subnormal: int) -> None:
    """A folded float16 weight keeps the precision of the weights it replaces only in float16's normal
    range: below 6.1e-05 its values are subnormal, with fewer significant bits the smaller they are. A
    scale near 1e-6 (a layer scale at its initial value) folded into weights near 0.05 gives values
    near 5e-8, one or two bits each: the folded tensor is then off by several of its own units where the
    original's Mul rounds once. When most of a weight's nonzero values would be subnormal, the fold is
    declined (the original computes it better); a few subnormal values among normal ones are rounding."""
    if subnormal and 2 * subnormal > nonzero:
        raise NotFoldable(f"the folded weights would be subnormal in float16 (below "
                          f"{float(np.finfo(np.float16).smallest_normal):.2g}): {subnormal} of {nonzero} nonzero "
                          "values, each with a few significant bits; the original computes it more exactly")


def _shape(value) -> tuple[int, ...]:
    # a RowScaled knows its shape; np.shape would compute the whole product to find it
    return tuple(value.shape) if isinstance(value, RowScaled) else tuple(np.shape(value))


def _count(value) -> int:
    return int(np.prod(_shape(value), dtype=np.int64))


# -- local functions ------------------------------------------------------------------------------
def _fold_functions(model: onnx.ModelProto, rules: RuleSet, report: FoldReport) -> tuple[onnx.ModelProto, FoldReport]:
    """Model-local functions.

    A pair whose weights live in the body (Constant nodes) is the same for every call: it folds in
    the body, and the function stays. A pair whose weights are function inputs is bound at each call
    site: folding it means specializing the body per call, which is what inlining does, so such a
    function is inlined (onnxruntime inlines local functions before running anyway) and its calls
    fold in the graph like any other nodes. So is a function whose body refers to its own attributes
    (``ref_attr_name``) where a rule matches: each call binds its own values, which the inliner puts
    in place (with the function's defaults where a call binds none). Returns the model and what the
    bodies declined or left.
    """
    inlined: list[tuple[str, str]] = []
    # inlining one function may put a reference or a weight input into another's body: look again
    while to_inline := [(fn.domain, fn.name) for fn in model.functions
                        if (fn.domain, fn.name) not in inlined and _binds_weights_at_call(fn, model, rules)]:
        _bind_defaults(model, to_inline)
        model = inliner.inline_selected_functions(model, to_inline)
        inlined += to_inline
    if inlined:
        report.inlined = [f"{d}.{n}" if d else n for d, n in inlined]
    kept = FoldReport()
    for fn in model.functions:
        body = _body(fn, model)
        sub = FoldReport()
        _fold_rounds(ModelView(body, constants_as_nodes=True), rules, sub)
        path = f"function {fn.domain}.{fn.name}" if fn.domain else f"function {fn.name}"
        records: list[Folded | Declined | Left] = [*sub.folded, *sub.declined, *sub.left]
        for record in records:
            record.graph = path
        report.folded += sub.folded
        kept.declined += sub.declined
        kept.left += sub.left
        if sub.folded:
            del fn.node[:]
            fn.node.extend(body.graph.node)
    return model, kept


def _bind_defaults(model: onnx.ModelProto, functions: list[tuple[str, str]]) -> None:
    """Write each function attribute's default (``attribute_proto``) into every call that does not bind
    it: onnx.inliner leaves such a reference unbound (the node then takes its op's own default), while
    onnxruntime and the spec take the function's default."""
    defaults = {(fn.domain, fn.name): list(fn.attribute_proto) for fn in model.functions
                if (fn.domain, fn.name) in functions and fn.attribute_proto}
    if not defaults:
        return
    for nodes in [*(g.node for g in all_graphs(model.graph)), *(n for fn in model.functions for n in _graphs_of(fn))]:
        for node in nodes:
            for default in defaults.get((node.domain, node.op_type), ()):
                if all(at.name != default.name for at in node.attribute):
                    node.attribute.append(default)


def _body(fn: onnx.FunctionProto, model: onnx.ModelProto) -> onnx.ModelProto:
    """A function's body as a model of its own, the function's inputs as graph inputs."""
    graph = helper.make_graph(list(fn.node), fn.name, [onnx.ValueInfoProto(name=n) for n in fn.input],
                              [onnx.ValueInfoProto(name=n) for n in fn.output])
    body = helper.make_model(graph, opset_imports=list(fn.opset_import) or list(model.opset_import))
    body.ir_version = model.ir_version
    return body


def _binds_weights_at_call(fn: onnx.FunctionProto, model: onnx.ModelProto, rules: RuleSet) -> bool:
    """Whether a fold in the body depends on what a call site binds: a rule matches in the body (any
    of its graphs) and reads a weight or statistic from a function input (a function input counts as
    a constant here: a call site may bind one), or the body has an attribute that refers to one of the
    function's attributes (``ref_attr_name``: BatchNormalization's epsilon, Gemm's transB, a Constant's
    value ...). The value of such an attribute is known only at each call, and a fold in the body may
    come to read it in a later round, so any fold there is made in the caller's graph after inlining,
    where each call's value is in place."""
    inputs = set(fn.input)
    refers = any(at.ref_attr_name for g in _graphs_of(fn) for node in g for at in node.attribute)
    for g in ModelView(_body(fn, model), constants_as_nodes=True, bound_at_call=inputs).graphs:
        for i, node in enumerate(g.graph.node):
            for rule in rules.anchored(node.op_type) if is_default(node) else ():
                if not rules.enabled(rule):
                    continue
                try:
                    m = rule.match(g, i)
                except NotFoldable:  # the match read an attribute bound at the call
                    if refers:
                        return True
                    raise
                if isinstance(m, Match) and (refers or m.reads & inputs):
                    return True
    return False


def _graphs_of(fn: onnx.FunctionProto):
    """The node lists of a function's body and of every subgraph in it."""
    yield fn.node
    for node in fn.node:
        for _, sub in subgraphs(node):
            for graph in all_graphs(sub):
                yield graph.node
