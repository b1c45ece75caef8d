"""A pure shift (x + c, x - c) scales by exactly 1: its fold writes the bias alone and leaves the weight
tensor as it is (same name, same bytes), whichever producer takes it; a scale (x * c, c - x, a
BatchNormalization) still writes a new weight. Each model is also checked equivalent in onnxruntime
(rulekit.folds: optimizations off, the dtype's default tolerance)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxfold import verify
from rulekit import G, folds


def _weight_bytes(model: onnx.ModelProto) -> dict[str, bytes]:
    return {t.name: t.SerializeToString() for t in model.graph.initializer}


def _reader(model: onnx.ModelProto, op_types: tuple[str, ...]) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type in op_types)


def _check(model, rules, weight_name, producer_ops, kept):
    before = _weight_bytes(model)
    folded, report = folds(model, rules)
    after = _weight_bytes(folded)
    node = _reader(folded, producer_ops)
    if kept:
        assert node.input[1] == weight_name and after[weight_name] == before[weight_name]
        assert report.folded[-1].weight == node.input[2]  # the record names the new bias
    else:
        assert node.input[1] != weight_name and report.folded[-1].weight == node.input[1]
    assert verify(model, folded)
    return folded


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("op,const_left,kept", [("Add", False, True), ("Add", True, True), ("Sub", False, True),
                                                ("Sub", True, False), ("Mul", False, False)],
                         ids=["x+c", "c+x", "x-c", "c-x", "x*c"])
@pytest.mark.parametrize("producer", ["Conv", "ConvTranspose"])
def test_conv_output_side(producer, op, const_left, kept, dtype):
    g = G(dtype=dtype)
    x = g.input("x", [1, 4, 6, 6])
    if producer == "Conv":
        y = g.conv(x, 4, 6)
    else:
        y = g.node("ConvTranspose", [x, g.weight((4, 3, 3, 3)), g.bias(6)], kernel_shape=[3, 3], group=2)
    weight = g.nodes[-1].input[1]
    _check(g.model(g.arith(op, y, [6, 1, 1], const_left)), [f"{producer.lower()}_{op.lower()}"], weight,
           (producer,), kept)


@pytest.mark.parametrize("kind", ["gemm", "matmul", "linear"])
def test_matrix_output_side(kind):
    """Gemm, a rank-2 MatMul (it becomes a Gemm with the shift as C: the weight stays its B) and a
    Linear (MatMul + Add on a rank-3 input: only the Add's bias changes, the MatMul stays as it is)."""
    g = G()
    x = g.input("x", [2, 3, 4] if kind == "linear" else [3, 4])
    if kind == "gemm":
        y = g.gemm(x, 4, 5, c=(5,))
    elif kind == "matmul":
        y = g.matmul(x, 4, 5)
    else:
        y = g.node("Add", [g.matmul(x, 4, 5), g.bias(5)])
    weight = next(n for n in g.nodes if n.op_type in ("Gemm", "MatMul")).input[1]
    before = _weight_bytes(g.model(y))
    model = g.model(g.arith("Add", y, [5]))
    # the Linear's own Add is first seen as an Add after a rank-3 MatMul, which has no bias: declined
    folded, report = folds(model, [f"{kind}_add"], ["matmul_add"] if kind == "linear" else None)
    node = _reader(folded, ("Gemm", "MatMul"))
    assert node.input[1] == weight and _weight_bytes(folded)[weight] == before[weight]
    assert node.op_type == ("MatMul" if kind == "linear" else "Gemm")
    assert verify(model, folded)


@pytest.mark.parametrize("op,kept", [("Add", True), ("Sub", True), ("Mul", False)])
@pytest.mark.parametrize("target", ["Conv", "Gemm", "MatMul"])
def test_input_side(target, op, kept):
    """An affine on a producer's input: a shift goes into the bias as W @ c (the weight is read, not
    written); a scale rewrites the weight's input channels."""
    g = G()
    if target == "Conv":
        x = g.input("x", [1, 4, 5, 5])
        h = g.arith(op, x, [4, 1, 1])
        y = g.conv(h, 4, 6, k=1)
    else:
        x = g.input("x", [3, 4])
        h = g.arith(op, x, [4])
        y = g.gemm(h, 4, 5, c=(5,)) if target == "Gemm" else g.matmul(h, 4, 5)
    weight = g.nodes[-1].input[1]
    produced = ("Gemm",) if target == "MatMul" and op != "Mul" else (target,)
    rule = f"{op.lower()}_{target.lower()}"
    _check(g.model(y), [rule], weight, produced, kept)


def test_shared_weight_stays_shared():
    """Two Convs share one weight, each followed by an Add: both folds leave it as it is, so the model
    keeps one copy of it (a scale would give each Conv its own)."""
    g = G()
    x = g.input("x", [1, 4, 6, 6])
    w = g.weight((6, 4, 3, 3))
    outs = [g.arith("Add", g.node("Conv", [x, w, g.bias(6)], kernel_shape=[3, 3]), [6, 1, 1]) for _ in range(2)]
    model = g.model(outs)
    folded, _ = folds(model, ["conv_add", "conv_add"])
    assert [n.input[1] for n in folded.graph.node] == [w, w]
    assert sum(t.name == w for t in folded.graph.initializer) == 1
