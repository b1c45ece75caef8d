"""A small graph builder and the checks the rule-family tests share (test_rules_*.py).

``folds(model, rules)``: the report's rule names are exactly ``rules``, both models pass
``onnx.checker.check_model(full_check=True)``, graph inputs and outputs keep their names, and every
output matches the original in onnxruntime (ORT_DISABLE_ALL) within checks.assert_close's bound
(k * max|ref| + k * |ref|, k = 1e-4 float32, 1e-2 float16).
``declines(model, reason)``: nothing folds, one decline carries the sentence, the model is unchanged
(same nodes) and still valid.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from builders import bn_stats
from checks import assert_close, check_valid, feeds_for, run
from onnxfold import fold_model

ELEM = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}


class G:
    """Nodes, initializers and random non-trivial constants for one graph."""

    def __init__(self, seed: int = 0, dtype=np.float32, opset: int = 17):
        self.rng = np.random.default_rng(seed)
        self.dtype = np.dtype(dtype)
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.n = 0

    def name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def input(self, name: str, shape, dtype=None) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, ELEM[np.dtype(dtype or self.dtype)], shape))
        return name

    def init(self, array, prefix: str = "t") -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def ints(self, values, prefix: str = "shape") -> str:
        return self.init(np.asarray(values, np.int64), prefix)

    def node(self, op: str, inputs, n_out: int = 1, **attrs):
        outs = [self.name(op.lower() + "_") for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=self.name(op.lower()), **attrs))
        return outs[0] if n_out == 1 else outs

    def values(self, shape, lo: float = 0.5, hi: float = 1.5, signed: bool = True) -> np.ndarray:
        v = self.rng.uniform(lo, hi, shape)
        if signed:
            v = v * self.rng.choice([-1.0, 1.0], shape)
        return v.astype(self.dtype)

    def weight(self, shape) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        return self.init(self.rng.normal(0, 1 / np.sqrt(max(fan_in, 1)), shape).astype(self.dtype), "w")

    def bias(self, n: int) -> str:
        return self.init(self.rng.normal(0, 0.5, n).astype(self.dtype), "b")

    # -- producers ------------------------------------------------------------------------------
    def conv(self, x: str, cin: int, cout: int, k: int = 3, group: int = 1, bias: bool = True, dims: int = 2,
             **attrs) -> str:
        inputs = [x, self.weight((cout, cin // group, *[k] * dims))]
        if bias:
            inputs.append(self.bias(cout))
        return self.node("Conv", inputs, kernel_shape=[k] * dims, group=group, **attrs)

    def matmul(self, x: str, k: int, n: int) -> str:
        return self.node("MatMul", [x, self.weight((k, n))])

    def gemm(self, x: str, k: int, n: int, trans_b: int = 0, c=(), **attrs) -> str:
        inputs = [x, self.weight((n, k) if trans_b else (k, n))]
        if c is not None:
            inputs.append(self.init(self.rng.normal(0, 0.5, c).astype(self.dtype), "c"))
        return self.node("Gemm", inputs, transB=trans_b, **attrs)

    # -- affines --------------------------------------------------------------------------------
    def bn(self, x: str, channels: int, stats_dtype=None) -> str:
        stats = [self.init(a, s) for a, s in zip(bn_stats(self.rng, channels, stats_dtype or self.dtype),
                                                   ("gamma", "beta", "mean", "var"))]
        return self.node("BatchNormalization", [x, *stats], epsilon=1e-3)

    def arith(self, op: str, x: str, shape, const_left: bool = False) -> str:
        lo, hi = (0.5, 2.0) if op in ("Mul", "Div") else (0.1, 1.0)
        c = self.init(self.values(shape, lo, hi), op.lower())
        return self.node(op, [c, x] if const_left else [x, c])

    # -- the model --------------------------------------------------------------------------------
    def model(self, outputs, ir_version: int = 8, functions=()) -> onnx.ModelProto:
        outs = [outputs] if isinstance(outputs, str) else list(outputs)
        vis = [helper.make_tensor_value_info(o, ELEM[self.dtype], None) for o in outs]
        graph = helper.make_graph(self.nodes, "g", self.inputs, vis, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)],
                                  functions=list(functions))
        model.ir_version = ir_version
        # the outputs' types as shape inference gives them (rank known, dims maybe symbolic)
        inferred = onnx.shape_inference.infer_shapes(model).graph
        known = {v.name: v for v in [*inferred.value_info, *inferred.output] if v.type.tensor_type.HasField("shape")}
        for v in model.graph.output:
            v.CopyFrom(known[v.name])
        check_valid(model)
        return model


def io_names(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    inits = {t.name for t in model.graph.initializer}
    return [v.name for v in model.graph.input if v.name not in inits], [v.name for v in model.graph.output]


def equivalent(model: onnx.ModelProto, folded, context: str = "", seeds=(1, 2)) -> None:
    """Valid, and equal to ``model`` in onnxruntime (ORT_DISABLE_ALL) on seeded inputs (checks.py bound)."""
    check_valid(folded)
    for s in seeds:
        feeds = feeds_for(model, seed=s)
        assert_close(run(model, feeds), run(folded, feeds), context)


def folds(model: onnx.ModelProto, rules: list[str], declined: list[str] | None = None,
          **kwargs) -> tuple[onnx.ModelProto, object]:
    """Fold; the report's rules are exactly ``rules`` (in order), the declined rules exactly ``declined``
    (none by default), graph inputs and outputs keep their names, output equivalent, a second fold finds
    nothing more."""
    folded, report = fold_model(model, **kwargs)
    assert [f.rule for f in report.folded] == rules, report.summary(verbose=True)
    assert [d.rule for d in report.declined] == (declined or []), report.summary(verbose=True)
    assert io_names(folded) == io_names(model)
    equivalent(model, folded, report.summary(verbose=True))
    _, second = fold_model(folded, **kwargs)
    assert not second.folded, f"folding the folded model folds again: {second.summary(verbose=True)}"
    return folded, report


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def declines(model: onnx.ModelProto, reason: str, rule: str | None = None) -> object:
    """Nothing folds; a decline says ``reason`` (by ``rule``, when given); the graph is unchanged."""
    folded, report = fold_model(model)
    assert not report.folded, report.summary(verbose=True)
    reasons = [d.reason for d in report.declined if rule is None or d.rule == rule]
    assert any(reason in r for r in reasons), f"{reason!r} not in {reasons}\n{report.summary(verbose=True)}"
    assert op_types(folded) == op_types(model)
    assert [list(n.input) for n in folded.graph.node] == [list(n.input) for n in model.graph.node]
    equivalent(model, folded, "declined", seeds=(1,))
    return report


def nothing(model: onnx.ModelProto) -> object:
    """No fold and the graph unchanged (no candidate at all, or a decline: either way nothing moved)."""
    folded, report = fold_model(model)
    assert not report.folded, report.summary(verbose=True)
    assert op_types(folded) == op_types(model)
    equivalent(model, folded, "unchanged", seeds=(1,))
    return report


def via_entry(model: onnx.ModelProto, entry: str, folds_expected: int, tmp_path) -> None:
    """Fold through one entry point and check the result: ``graphproto`` (fold_conv_bn on the graph, read
    at the latest opset), ``graphsurgeon`` (in place), ``cli`` (``python -m onnxfold IN OUT``: exit 0 and
    a PASSED line). The node count drops by ``folds_expected`` (each fold removes its affine node)."""
    from onnxfold import fold_conv_bn

    if entry == "graphproto":
        graph = fold_conv_bn(model.graph)
        assert isinstance(graph, onnx.GraphProto)
        folded = onnx.ModelProto()
        folded.CopyFrom(model)
        folded.graph.CopyFrom(graph)
    elif entry == "graphsurgeon":
        import onnx_graphsurgeon as gs

        graph = gs.import_onnx(model)
        assert fold_conv_bn(graph) is graph
        folded = gs.export_onnx(graph.cleanup().toposort())
    elif entry == "cli":
        from test_cli import cli

        src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
        onnx.save(model, str(src))
        proc = cli(src, out)
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("PASSED | "), proc.stderr
        folded = onnx.load(str(out))
    else:
        raise ValueError(entry)
    real = [n for n in folded.graph.node if n.op_type != "Constant"]
    assert len(real) == len([n for n in model.graph.node if n.op_type != "Constant"]) - folds_expected, op_types(folded)
    equivalent(model, folded, entry)
