"""The entry-point matrix (issue 9, "Tests that would have caught these").

Every rule family runs through every way in: ``fold_model`` on a ModelProto, ``fold_conv_bn`` on a
GraphProto and on an onnx_graphsurgeon Graph, the command line to one file (``cli.main``, with
``--external-data always``/``never``, ``--no-verify``, an input with external data, folder mode, and
a real ``python -m onnxfold`` subprocess). Each result must pass ``onnx.checker.check_model(
full_check=True)`` (on the path when it has external data), load in onnxruntime, match the original
there (ORT_DISABLE_ALL; float32: |got - ref| <= 1e-4 * max|ref| + 1e-4 * |ref|, see checks.py), and
have exactly the expected number of folds and of BatchNormalization left.

Families run through every entry point at one weight size (4 KiB: above DataSink.THRESHOLD, below
CACHE_BYTES); a set of families runs at every size through every command-line path, with weights on
both sides of each size threshold in onnxfold: DataSink.THRESHOLD = 1024 B (512 B, exactly 1 KiB,
4 KiB), const_resolve.py CACHE_BYTES = 64 KiB (4 KiB, 80 KiB) and the 1 MiB alignment in DataSink._reserve
(80 KiB, 2 MiB).

Issue 12's families (a layout op between Conv and BatchNormalization, Concat of Convs, BatchNormalization
before a Gemm, bias_add into a Conv with a run-time weight) are in the matrix too; the first three also
at every size.

Issue 9's defects 1 (chained folds through the command line), 6 (graphsurgeon MatMul -> Gemm) and 7
(a BatchNormalization left in a function, missing from report.left) failed here before their fixes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import bn_stats, constant
from checks import assert_close, check_valid, feeds_for, load_path, op_counts, run
from checks import cli as python_m_onnxfold
from onnxfold import cli, fold_conv_bn, fold_model

F = TensorProto.FLOAT
OPSET = 17

# Weight shapes per size: Conv/ConvTranspose (out, in, k) and Gemm/MatMul (K, N); float32 bytes.
SIZES = {
    "512B": ((8, 4, 2), (16, 8)),  # 512 B: below DataSink.THRESHOLD (stays inline)
    "1KiB": ((16, 4, 2), (16, 16)),  # exactly 1024 B: the first size that goes to the data file
    "4KiB": ((16, 16, 2), (32, 32)),  # above THRESHOLD, below CACHE_BYTES (64 KiB)
    "80KiB": ((40, 32, 4), (128, 160)),  # above CACHE_BYTES, below the 1 MiB alignment
    "2MiB": ((256, 512, 2), (512, 1024)),  # above 1 MiB: aligned to a page in the data file
}


@dataclass
class Case:
    model: onnx.ModelProto
    folds: int  # folds expected through an entry point that sees the whole model
    bn_after: int
    left: int = 0  # BatchNormalization expected in report.left
    graph_folds: int | None = None  # through fold_conv_bn(GraphProto): it sees no local functions
    graph_bn_after: int | None = None
    ops_after: dict | None = None  # op counts after, where a fold is not one node fewer (inlining)


class _B:
    """A tiny graph builder: nodes, initializers, random non-trivial constants."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def name(self, prefix):
        self.n += 1
        return f"{prefix}{self.n}"

    def init(self, array, prefix="t"):
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op, inputs, **attrs):
        out = self.name(op.lower() + "_out")
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(op.lower()), **attrs))
        return out

    def weight(self, shape):
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        return self.rng.normal(0, 1 / np.sqrt(fan_in), shape).astype(np.float32)

    def per_channel(self, channels, rank, lo=0.5, hi=1.5):
        """A constant that broadcasts along axis 1 of a rank-``rank`` output: [C, 1, ...] or [C]."""
        values = (self.rng.uniform(lo, hi, channels) * self.rng.choice([-1, 1], channels)).astype(np.float32)
        return values.reshape([channels] + [1] * (rank - 2)) if rank > 2 else values


def _producer(b: _B, op: str, x: str, size: str, pads: int = 1):
    """x -> producer. Returns (graph input value_info, output name, channels, output rank)."""
    (cout, cin, k), (kk, n) = SIZES[size]
    if op == "conv":
        s = k + 1
        w = b.init(b.weight((cout, cin, k, k)), "w")
        bias = b.init(b.rng.normal(0, 0.5, cout).astype(np.float32), "bias")
        out = b.node("Conv", [x, w, bias], kernel_shape=[k, k], pads=[pads] * 4)
        return helper.make_tensor_value_info(x, F, [1, cin, s, s]), out, cout, 4
    if op == "convtranspose":
        s = 3
        w = b.init(b.weight((cin, cout, k, k)), "w")
        bias = b.init(b.rng.normal(0, 0.5, cout).astype(np.float32), "bias")
        out = b.node("ConvTranspose", [x, w, bias], kernel_shape=[k, k], strides=[2, 2], output_padding=[1, 1])
        return helper.make_tensor_value_info(x, F, [1, cin, s, s]), out, cout, 4
    if op == "gemm":
        w = b.init(b.weight((n, kk)), "w")  # transB=1: [N, K]
        c = b.init(b.rng.normal(0, 0.5, n).astype(np.float32), "c")
        out = b.node("Gemm", [x, w, c], transB=1, alpha=0.75, beta=1.25)
        return helper.make_tensor_value_info(x, F, [3, kk]), out, n, 2
    if op == "matmul":
        w = b.init(b.weight((n, kk)).T.copy(), "w")  # [K, N]
        out = b.node("MatMul", [x, w])
        return helper.make_tensor_value_info(x, F, [3, kk]), out, n, 2
    raise ValueError(op)


def _consumer(b: _B, op: str, y: str, channels: int, rank: int) -> str:
    if op == "bn":
        stats = [b.init(a, s) for a, s in zip(bn_stats(b.rng, channels), ("gamma", "beta", "mean", "var"))]
        return b.node("BatchNormalization", [y, *stats], epsilon=1e-3)
    if op == "mul_rows":  # a Mul of Gemm's [3, N] output by a [3, 1] constant: per row, not per channel
        assert rank == 2
        return b.node("Mul", [y, b.init(b.rng.uniform(0.5, 1.5, (3, 1)).astype(np.float32), "mul_rows")])
    if op == "add0":  # Add of exact zeros: a no-op that still folds
        return b.node("Add", [y, b.init(np.zeros([channels] + [1] * (rank - 2), np.float32), "zero")])
    op_type = {"mul": "Mul", "add": "Add", "sub": "Sub", "div": "Div"}[op]
    return b.node(op_type, [y, b.init(b.per_channel(channels, rank), op)])


def _vi(name: str, rank: int = 4):
    return helper.make_tensor_value_info(name, F, [None] * rank)


def _model(b: _B, x_info, out: str, rank: int = 4, functions=(), extra_opsets=()) -> onnx.ModelProto:
    y = _vi(out, rank)
    graph = helper.make_graph(b.nodes, "g", [x_info], [y], b.inits)
    model = helper.make_model(graph, functions=list(functions),
                              opset_imports=[helper.make_opsetid("", OPSET), *extra_opsets])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def chain(producer: str, consumers: list[str], size: str, seed: int = 0) -> Case:
    b = _B(seed)
    x_info, y, channels, rank = _producer(b, producer, "x", size)
    for c in consumers:
        y = _consumer(b, c, y, channels, rank)
    declined = sum(1 for c in consumers if c == "mul_rows")
    return Case(_model(b, x_info, y, rank), folds=len(consumers) - declined, bn_after=0)


def bn_conv(size: str, seed: int = 0) -> Case:
    """BatchNormalization before an unpadded Conv: folds into the Conv's input channels."""
    b = _B(seed)
    (cout, cin, k), _ = SIZES[size]
    stats = [b.init(a, s) for a, s in zip(bn_stats(b.rng, cin), ("gamma", "beta", "mean", "var"))]
    h = b.node("BatchNormalization", ["x", *stats], epsilon=1e-3)
    w = b.init(b.weight((cout, cin, k, k)), "w")
    y = b.node("Conv", [h, w, b.init(b.rng.normal(0, 0.5, cout).astype(np.float32), "bias")], kernel_shape=[k, k])
    return Case(_model(b, helper.make_tensor_value_info("x", F, [1, cin, k + 2, k + 2]), y), folds=1, bn_after=0)


def conv_reshape_bn(size: str, seed: int = 0) -> Case:
    """Conv -> Reshape [1, C, -1] -> BatchNormalization (issue 12: the channel axis through a layout op)."""
    b = _B(seed)
    x_info, y, channels, _ = _producer(b, "conv", "x", size)
    # a Constant node: an initializer would go to external data (cli_external_input), where onnxruntime's
    # shape inference cannot read a Reshape's shape and refuses the original model
    b.nodes.append(_const("target", np.array([1, channels, -1], np.int64)))
    r = b.node("Reshape", [y, "target"])
    out = _consumer(b, "bn", r, channels, 3)
    return Case(_model(b, x_info, out, 3), folds=1, bn_after=0)


def concat_bn(size: str, seed: int = 0) -> Case:
    """Two Convs of one input, concatenated along the channels -> BatchNormalization (MixNet)."""
    b = _B(seed)
    (cout, cin, k), _ = SIZES[size]
    outs = [b.node("Conv", ["x", b.init(b.weight((cout, cin, k, k)), "w"),
                            b.init(b.rng.normal(0, 0.5, cout).astype(np.float32), "bias")],
                   kernel_shape=[k, k], pads=[1] * 4) for _ in range(2)]
    out = _consumer(b, "bn", b.node("Concat", outs, axis=1), 2 * cout, 4)
    return Case(_model(b, helper.make_tensor_value_info("x", F, [1, cin, k + 1, k + 1]), out), folds=1, bn_after=0)


def bn_gemm(size: str, seed: int = 0) -> Case:
    """BatchNorm1d before a Linear head: folds into the Gemm's input features."""
    b = _B(seed)
    _, (kk, n) = SIZES[size]
    h = _consumer(b, "bn", "x", kk, 2)
    y = b.node("Gemm", [h, b.init(b.weight((n, kk)), "w"), b.init(b.rng.normal(0, 0.5, n).astype(np.float32), "c")],
               transB=1, alpha=0.75)
    return Case(_model(b, helper.make_tensor_value_info("x", F, [3, kk]), y, 2), folds=1, bn_after=0)


def bias_add(size: str, seed: int = 0) -> Case:
    """A Conv whose weight is a graph input (computed at run time) -> Add of a per-channel constant."""
    b = _B(seed)
    (cout, cin, k), _ = SIZES[size]
    y = b.node("Conv", ["x", "w"], kernel_shape=[k, k])
    out = b.node("Add", [y, b.init(b.per_channel(cout, 4), "add")])
    graph = helper.make_graph(b.nodes, "g", [helper.make_tensor_value_info("x", F, [1, cin, k + 1, k + 1]),
                                             helper.make_tensor_value_info("w", F, [cout, cin, k, k])],
                              [_vi(out)], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return Case(model, folds=1, bn_after=0)


NEW_FAMILIES = {"conv_reshape_bn": conv_reshape_bn, "concat_bn": concat_bn, "bn_gemm": bn_gemm, "bias_add": bias_add}


def _const(name, array):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(array), name))


def function_case(kind: str, seed: int = 0) -> Case:
    """A model-local function called twice.

    body:    Conv -> BN with the weights as Constant nodes in the body: folded in place (1 fold).
    inlined: weights passed in at each call: the function is inlined, each call folds (2 folds).
    left:    a BN on the function's input, nothing to fold into: it stays and report.left names it.
    """
    b = _B(seed)
    (c, _, k), _ = SIZES["4KiB"]
    names = ["g", "bb", "m", "v"]
    body = []
    if kind == "body":
        body += [constant("w", b.weight((c, c, k, k)))] + [constant(n, a) for n, a in zip(names, bn_stats(b.rng, c))]
        fn_inputs = ["x"]
    elif kind == "inlined":
        fn_inputs = ["x", "w", *names]
    else:
        body += [constant(n, a) for n, a in zip(names, bn_stats(b.rng, c))]
        fn_inputs = ["x"]
    if kind == "left":
        body += [helper.make_node("BatchNormalization", ["x", *names], ["y"], epsilon=1e-3),
                 helper.make_node("Relu", ["y"], ["out"])]
    else:
        body += [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[k, k], pads=[0, 1, 0, 1]),
                 helper.make_node("BatchNormalization", ["c", *names], ["y"], epsilon=1e-3),
                 helper.make_node("Relu", ["y"], ["out"])]
    fn = helper.make_function("local", "Block", fn_inputs, ["out"], body, [helper.make_opsetid("", OPSET)])
    prev = "x"
    for i in range(2):
        args = [prev]
        if kind == "inlined":
            args += [b.init(b.weight((c, c, k, k)), "w")]
            args += [b.init(a, n) for a, n in zip(bn_stats(b.rng, c), names)]
        out = f"h{i}"
        b.nodes.append(helper.make_node("Block", args, [out], domain="local", name=f"call{i}"))
        prev = out
    model = _model(b, helper.make_tensor_value_info("x", F, [1, c, 5, 5]), prev, functions=[fn],
                   extra_opsets=[helper.make_opsetid("local", 1)])
    if kind == "body":
        return Case(model, folds=1, bn_after=0, graph_folds=0, graph_bn_after=1)
    if kind == "inlined":
        return Case(model, folds=2, bn_after=0, graph_folds=0, graph_bn_after=1, ops_after={"Conv": 2, "Relu": 2})
    return Case(model, folds=0, bn_after=1, left=1, graph_folds=0, graph_bn_after=1)


def _conv_bn_nodes(b: _B, x: str, channels: int, k: int, w: str | None = None):
    w = w or b.init(b.weight((channels, channels, k, k)), "w")
    c = b.node("Conv", [x, w], kernel_shape=[k, k], pads=[0, 0, 1, 1])
    stats = [b.init(a, s) for a, s in zip(bn_stats(b.rng, channels), ("gamma", "beta", "mean", "var"))]
    return b.node("BatchNormalization", [c, *stats], epsilon=1e-3)


def if_case(seed: int = 0) -> Case:
    """If with Conv -> BN in each branch; one branch's weight lives in the enclosing graph."""
    b = _B(seed)
    (c, _, k), _ = SIZES["4KiB"]
    outer_w = b.init(b.weight((c, c, k, k)), "w_outer")
    branches = []
    for i in range(2):
        sub = _B(seed + 1 + i)
        sub.n = 100 * (i + 1)
        y = _conv_bn_nodes(sub, "x", c, k, w=outer_w if i == 0 else None)
        branches.append(helper.make_graph(sub.nodes, f"branch{i}", [], [_vi(y)],
                                          sub.inits))
    b.nodes.append(helper.make_node("If", ["cond"], ["y"], then_branch=branches[0], else_branch=branches[1], name="if"))
    graph = helper.make_graph(b.nodes, "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                                             helper.make_tensor_value_info("x", F, [1, c, 4, 4])],
                              [_vi("y")], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return Case(model, folds=2, bn_after=0)


def loop_case(seed: int = 0) -> Case:
    """Loop (3 iterations) whose body runs Conv -> BN on the loop-carried value; weights outside."""
    b = _B(seed)
    (c, _, k), _ = SIZES["4KiB"]
    sub = _B(seed + 1)
    sub.n = 100
    w = b.init(b.weight((c, c, k, k)), "w")
    y = _conv_bn_nodes(sub, "v_in", c, k, w=w)
    sub.nodes.append(helper.make_node("Identity", ["cond_in"], ["cond_out"]))
    body = helper.make_graph(sub.nodes, "body",
                             [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                              helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                              _vi("v_in")],
                             [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
                              _vi(y)], sub.inits)
    trip = b.init(np.array(3, np.int64), "trip")
    cond = b.init(np.array(True), "cond")
    b.nodes.append(helper.make_node("Loop", [trip, cond, "x"], ["y"], body=body, name="loop"))
    return Case(_model(b, helper.make_tensor_value_info("x", F, [1, c, 4, 4]), "y"), folds=1, bn_after=0)


PRODUCERS = ["conv", "convtranspose", "gemm", "matmul"]
CONSUMERS = ["bn", "mul", "add", "sub", "div"]
CHAINS = {
    "conv_mul_bn": ("conv", ["mul", "bn"]),
    "conv_bn_add": ("conv", ["bn", "add"]),
    "convtranspose_add_bn": ("convtranspose", ["add", "bn"]),
    "conv_bn_add0": ("conv", ["bn", "add0"]),
    "conv_bn_mul_add": ("conv", ["bn", "mul", "add"]),
    "gemm_mul_bn": ("gemm", ["mul", "bn"]),
    "matmul_bn_add": ("matmul", ["bn", "add"]),
    # One fold, then a candidate that is declined (a per-row Mul): the decline reads the folded weight.
    "gemm_bn_mul_rows": ("gemm", ["bn", "mul_rows"]),
}


def build(family: str, size: str = "4KiB") -> Case:
    if family in CHAINS:
        p, cs = CHAINS[family]
        return chain(p, cs, size)
    p, _, c = family.partition("_")
    if p in PRODUCERS and c in CONSUMERS:
        return chain(p, [c], size)
    if family == "bn_conv":
        return bn_conv(size)
    if family in NEW_FAMILIES:
        return NEW_FAMILIES[family](size)
    if family.startswith("function_"):
        return function_case(family.removeprefix("function_"))
    if family == "if":
        return if_case()
    if family == "loop":
        return loop_case()
    raise ValueError(family)


FAMILIES = ([f"{p}_{c}" for p in PRODUCERS for c in CONSUMERS] + list(CHAINS)
            + ["bn_conv", "function_body", "function_inlined", "function_left", "if", "loop"] + list(NEW_FAMILIES))


# -- entry points ----------------------------------------------------------------------------------


def _expect(case: Case, folded: onnx.ModelProto, folds: int, bn_after: int, whole_model: bool = True) -> None:
    before, after = op_counts(case.model), op_counts(folded)
    assert after["BatchNormalization"] == bn_after, f"BN after: {after['BatchNormalization']} != {bn_after}"
    if case.ops_after is not None and whole_model:
        assert dict(after) == case.ops_after
        return
    # Each fold removes its consumer node (a MatMul that absorbs one becomes a Gemm: same count).
    assert sum(after.values()) == sum(before.values()) - folds, \
        f"{dict(before)} -> {dict(after)}, {folds} folds expected"


def _compare(case: Case, folded_model_or_path, context: str) -> None:
    check_valid(folded_model_or_path)
    has_bool = any(v.type.tensor_type.elem_type == TensorProto.BOOL for v in case.model.graph.input)
    bools = [True, False] if has_bool else [None]
    for value in bools:
        feeds = feeds_for(case.model, seed=1, bool_value=value)
        assert_close(run(case.model, feeds), run(folded_model_or_path, feeds), context)


def via_fold_model(case: Case, tmp_path: Path) -> None:
    folded, report = fold_model(case.model)
    assert len(report.folded) == case.folds, report.summary()
    assert report.bn_after == case.bn_after, report.summary()
    assert len(report.left) == case.left, report.summary()
    _expect(case, folded, case.folds, case.bn_after)
    _compare(case, folded, "fold_model")


def via_graph_proto(case: Case, tmp_path: Path) -> None:
    """fold_conv_bn(GraphProto): a new graph, put back into the original model (opsets, functions)."""
    graph = fold_conv_bn(case.model.graph)
    assert isinstance(graph, onnx.GraphProto)
    folded = onnx.ModelProto()
    folded.CopyFrom(case.model)
    folded.graph.CopyFrom(graph)
    folds = case.folds if case.graph_folds is None else case.graph_folds
    _expect(case, folded, folds, case.bn_after if case.graph_bn_after is None else case.graph_bn_after,
            whole_model=False)
    _compare(case, folded, "fold_conv_bn(GraphProto)")


def via_graphsurgeon(case: Case, tmp_path: Path) -> None:
    gs = pytest.importorskip("onnx_graphsurgeon")

    graph = gs.import_onnx(case.model)
    assert fold_conv_bn(graph) is graph
    folded = gs.export_onnx(graph.cleanup().toposort())
    _expect(case, folded, case.folds, case.bn_after)
    _compare(case, folded, "fold_conv_bn(gs.Graph)")


def _save_input(case: Case, folder: Path, external: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / "m.onnx"
    if external:
        model = onnx.ModelProto()
        model.CopyFrom(case.model)  # onnx.save moves the data of the model it is given: keep the case's
        onnx.save(model, str(src), save_as_external_data=True, location="m.weights", size_threshold=0)
    else:
        onnx.save(case.model, str(src))
    return src


def _check_cli_result(case: Case, code: int, report: dict, out: Path, external: bool | None, context: str) -> None:
    assert code == 0, f"{context}: exit {code}, status {report.get('status')!r}"
    assert report["status"] == "written"
    assert len(report["folded"]) == case.folds
    assert report["bn_after"] == case.bn_after
    assert len(report["left"]) == case.left
    data = out.parent / (out.name + ".data")
    if external is True:
        assert data.is_file(), f"{context}: --external-data always wrote no {data.name}"
    elif external is False:
        assert not data.exists(), f"{context}: --external-data never wrote {data.name}"
    loaded = load_path(out)
    uses = any(onnx.external_data_helper.uses_external_data(t)
               for t in onnx.external_data_helper._get_all_tensors(loaded))
    if external is False:
        assert not uses, f"{context}: --external-data never left a tensor in external data"
    _expect(case, loaded, case.folds, case.bn_after)
    _compare(case, out, context)


def _cli(options: list[str], external: bool | None, input_external: bool = False):
    def entry(case: Case, tmp_path: Path) -> None:
        src = _save_input(case, tmp_path / "in", external=input_external)
        out = tmp_path / "out" / "folded.onnx"
        out.parent.mkdir()
        report_path = tmp_path / "report.json"
        before = {p: p.read_bytes() for p in src.parent.iterdir()}
        code = cli.main([str(src), str(out), "-q", "--report", str(report_path), *options])
        report = json.loads(report_path.read_text())
        _check_cli_result(case, code, report, out, external, f"cli {' '.join(options)}")
        assert {p: p.read_bytes() for p in src.parent.iterdir()} == before  # the input is untouched
    return entry


def via_folder(case: Case, tmp_path: Path) -> None:
    _save_input(case, tmp_path / "in" / "sub")
    out_dir = tmp_path / "out"
    report_path = tmp_path / "report.json"
    code = cli.main([str(tmp_path / "in"), str(out_dir), "-q", "--report", str(report_path)])
    data = json.loads(report_path.read_text())
    (report,) = data["models"]
    _check_cli_result(case, code, report, out_dir / "sub" / "m.onnx", None, "folder mode")
    assert data["totals"] == {"models": 1, "failed": 0, "folded": case.folds}


def via_subprocess(case: Case, tmp_path: Path) -> None:
    """A real ``python -m onnxfold``: the module entry point, exit code and files as a user sees them."""
    src = _save_input(case, tmp_path / "in")
    out = tmp_path / "out.onnx"
    report_path = tmp_path / "report.json"
    proc = python_m_onnxfold(src, out, "--report", report_path, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    report = json.loads(report_path.read_text())
    _check_cli_result(case, proc.returncode, report, out, None, "python -m onnxfold")
    assert proc.stderr.strip().splitlines()[-1].startswith("PASSED | "), proc.stderr


ENTRY_POINTS = {
    "fold_model": via_fold_model,
    "graphproto": via_graph_proto,
    "graphsurgeon": via_graphsurgeon,
    "cli": _cli([], None),
    "cli_ext_always": _cli(["--external-data", "always"], True),
    "cli_ext_never": _cli(["--external-data", "never"], False),
    "cli_no_verify": _cli(["--no-verify"], None),
    "cli_external_input": _cli([], None, input_external=True),
    "folder": via_folder,
}
CLI_PATHS = ["cli", "cli_ext_always", "cli_ext_never", "cli_no_verify", "cli_external_input", "folder"]


def _param(family: str, entry: str, size: str):
    return pytest.param(family, entry, size, id=f"{family}-{entry}-{size}")


MATRIX = [_param(f, e, "4KiB") for f in FAMILIES for e in ENTRY_POINTS]
SIZE_FAMILIES = ["conv_bn", "conv_mul_bn", "conv_bn_mul_add", "convtranspose_add_bn", "gemm_bn", "matmul_bn_add",
                 "bn_conv", "conv_reshape_bn", "concat_bn", "bn_gemm"]
SIZE_MATRIX = [_param(f, e, s) for s in SIZES if s != "4KiB" for f in SIZE_FAMILIES for e in CLI_PATHS + ["fold_model"]]
SUBPROCESS = [_param(f, "subprocess", s) for f in ("conv_bn", "conv_mul_bn") for s in ("512B", "2MiB")]


@pytest.mark.parametrize("family,entry,size", MATRIX + SIZE_MATRIX + SUBPROCESS)
def test_entry_point(family, entry, size, tmp_path):
    case = build(family, size)
    (ENTRY_POINTS.get(entry) or via_subprocess)(case, tmp_path)


def test_size_table_straddles_each_threshold():
    """The sizes above sit on both sides of every threshold they are meant to (guards against drift)."""
    from onnxfold.const_resolve import CACHE_BYTES
    from onnxfold.tensors import DataSink

    conv_bytes = {s: int(np.prod([c[0], c[1], c[2], c[2]])) * 4 for s, (c, _) in SIZES.items()}
    gemm_bytes = {s: g[0] * g[1] * 4 for s, (_, g) in SIZES.items()}
    for table in (conv_bytes, gemm_bytes):
        assert table["512B"] < DataSink.THRESHOLD <= table["1KiB"] == DataSink.THRESHOLD
        assert table["4KiB"] <= CACHE_BYTES < table["80KiB"]
        assert table["80KiB"] < 1 << 20 <= table["2MiB"]


def test_the_comparison_catches_a_wrong_fold():
    """Guards the matrix itself: a fold that is off in one output channel by 1% must fail _compare."""
    case = build("conv_bn", "4KiB")
    folded, _ = fold_model(case.model)
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    w = next(t for t in folded.graph.initializer if t.name == conv.input[1])
    array = numpy_helper.to_array(w).copy()
    array[3] *= 1.01
    w.CopyFrom(numpy_helper.from_array(array, w.name))
    with pytest.raises(AssertionError, match="max abs error"):
        _compare(case, folded, "perturbed")


@pytest.mark.parametrize("family", FAMILIES)
def test_check_mode_counts_without_writing(family, tmp_path):
    """``--check``: exit 3 when something folds (0 when nothing does), the report counts the folds the
    other entry points make, and nothing is written."""
    case = build(family, "4KiB")
    src = _save_input(case, tmp_path / "in")
    report_path = tmp_path / "report.json"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code = cli.main([str(src), "--check", "-q", "--report", str(report_path)])
    assert code == (3 if case.folds else 0)
    report = json.loads(report_path.read_text())
    assert len(report["folded"]) == case.folds and report["bn_after"] == case.bn_after
    assert report["output"] is None
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(before + ["report.json"])


def test_folder_mode_with_two_workers(tmp_path):
    """Folder mode with ``-j 2``: every family (at a size no known defect hits) in one folder, each
    output checked like the single-file ones, and the totals add up."""
    chosen = {}
    for family in FAMILIES:
        size = "4KiB"
        case = build(family, size)
        _save_input(case, tmp_path / "in" / family)
        chosen[family] = case
    report_path = tmp_path / "report.json"
    code = cli.main([str(tmp_path / "in"), str(tmp_path / "out"), "-q", "-j", "2", "--report", str(report_path)])
    data = json.loads(report_path.read_text())
    by_input = {Path(m["input"]).parent.name: m for m in data["models"]}
    assert set(by_input) == set(chosen)
    for family, case in chosen.items():
        _check_cli_result(case, code, by_input[family], tmp_path / "out" / family / "m.onnx", None, f"-j 2: {family}")
    assert data["totals"] == {"models": len(chosen), "failed": 0, "folded": sum(c.folds for c in chosen.values())}
