"""concat_<consumer> (producers -> Concat along their channels -> a per-channel affine) and split_affine
(a producer -> Split along its channels -> affines on the branches).

Checks as in test_rules_layout.py (rulekit.folds / rulekit.declines): exact rules, onnx.checker,
equivalence in onnxruntime (ORT_DISABLE_ALL, k = 1e-4 float32 / 1e-2 float16), one test per decline.
"""

from __future__ import annotations

import numpy as np
import pytest

from rulekit import G, declines, folds, nothing, op_types, via_entry

DTYPES = [np.float32, np.float16]


def _mixconv(g: G, counts=(2, 3, 1), bias=True, depthwise=False):
    """MixNet: one input, Convs of several kernel sizes (depthwise when asked), concatenated."""
    cin = sum(counts) if depthwise else 4
    x = g.input("x", [1, cin, 6, 6])
    outs = []
    if depthwise:
        split = g.node("Split", [x, g.ints(list(counts))], n_out=len(counts), axis=1)
        split = split if isinstance(split, list) else [split]
    for i, c in enumerate(counts):
        k = 2 * i + 1
        if depthwise:
            outs.append(g.conv(split[i], c, c, k=k, group=c, bias=bias, pads=[i] * 4))
        else:
            outs.append(g.conv(x, cin, c, k=k, bias=bias, pads=[i] * 4))
    return outs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("depthwise", [False, True])
@pytest.mark.parametrize("consumer", ["bn", "Mul", "Add", "Sub", "Div"])
def test_concat_of_convs_then_affine(dtype, bias, depthwise, consumer):
    g = G(dtype=dtype)
    outs = _mixconv(g, bias=bias, depthwise=depthwise)
    cc = g.node("Concat", outs, axis=1 if consumer != "Mul" else -3)
    y = g.bn(cc, 6) if consumer == "bn" else g.arith(consumer, cc, [6, 1, 1], const_left=consumer == "Sub")
    folded, _ = folds(g.model(y), [f"concat_{consumer.lower()}"])
    assert "Concat" in op_types(folded) and op_types(folded)[-1] == "Concat"


@pytest.mark.parametrize("dtype", DTYPES)
def test_concat_of_gemm_and_matmul_rank2(dtype):
    """A Gemm and a rank-2 MatMul (it becomes a Gemm to take its share of the shift)."""
    g = G(dtype=dtype)
    x = g.input("x", [3, 4])
    cc = g.node("Concat", [g.gemm(x, 4, 2, trans_b=1, c=(1, 2)), g.matmul(x, 4, 3)], axis=1)
    folded, _ = folds(g.model(g.bn(cc, 5)), ["concat_bn"])
    assert op_types(folded) == ["Gemm", "Gemm", "Concat"]


def test_concat_of_matmuls_rank3_takes_a_scale():
    g = G()
    x = g.input("x", [2, 3, 4])
    cc = g.node("Concat", [g.matmul(x, 4, 3), g.matmul(x, 4, 2)], axis=2)
    folds(g.model(g.arith("Mul", cc, [5])), ["concat_mul"])


@pytest.mark.parametrize("entry", ["graphproto", "graphsurgeon", "cli"])
def test_concat_entry_points(entry, tmp_path):
    g = G()
    cc = g.node("Concat", _mixconv(g), axis=1)
    via_entry(g.model(g.bn(cc, 6)), entry, 1, tmp_path)


def test_concat_declines():
    """Concat not along the channels; a non-producer input (nothing folds); the same producer twice; a
    producer output that is also a graph output; rank-3 MatMuls with a shift."""
    g = G()
    x = g.input("x", [1, 4, 6, 6])
    cc = g.node("Concat", [g.conv(x, 4, 3, pads=[1] * 4), g.conv(x, 4, 3, pads=[1] * 4)], axis=2)
    declines(g.model(g.arith("Mul", cc, [1, 1, 12, 1])), "Concat works along axis 2, not the channel axis 1")

    g = G()
    x = g.input("x", [1, 4, 6, 6])
    cc = g.node("Concat", [g.conv(x, 4, 3, pads=[1] * 4), g.node("Relu", [x])], axis=1)
    report = nothing(g.model(g.bn(cc, 7)))
    assert any("input 1 is made by a Relu node" in left.reason for left in report.left), report.summary()

    g = G()
    x = g.input("x", [1, 4, 6, 6])
    c = g.conv(x, 4, 3, pads=[1] * 4)
    declines(g.model(g.bn(g.node("Concat", [c, c], axis=1), 6)), "has 2 readers", "concat_bn")

    g = G()
    x = g.input("x", [1, 4, 6, 6])
    a, b = g.conv(x, 4, 3, pads=[1] * 4), g.conv(x, 4, 2, pads=[1] * 4)
    declines(g.model([g.bn(g.node("Concat", [a, b], axis=1), 5), b]), "is a graph output", "concat_bn")

    g = G()
    x = g.input("x", [2, 3, 4])
    cc = g.node("Concat", [g.matmul(x, 4, 3), g.matmul(x, 4, 2)], axis=2)
    declines(g.model(g.arith("Add", cc, [5])), "it has no bias to take the shift", "concat_add")


def _split(g: G, sizes, opset_form: str, c: str):
    n = len(sizes)
    if opset_form == "attr":
        return g.node("Split", [c], n_out=n, axis=1, split=list(sizes))
    if opset_form == "input":
        return g.node("Split", [c, g.ints(list(sizes))], n_out=n, axis=1)
    return g.node("Split", [c], n_out=n, axis=1, num_outputs=n)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("opset,form,sizes", [(11, "attr", (2, 4)), (13, "input", (1, 2, 3)), (18, "num", (3, 3, 1)),
                                              (18, "input", (4, 2))])
def test_split_branches_fold(dtype, bias, opset, form, sizes):
    """Affines on some branches (BN, Mul, c - x); a branch without one gets the identity."""
    g = G(dtype=dtype, opset=opset)
    x = g.input("x", [1, 3, 5, 5])
    c = g.conv(x, 3, sum(sizes), bias=bias, pads=[1] * 4)
    parts = _split(g, sizes, form, c)
    outs = [g.bn(parts[0], sizes[0]), g.arith("Mul", parts[1], [sizes[1], 1, 1])]
    if len(sizes) > 2:
        outs.append(g.arith("Sub", parts[2], [1, sizes[2], 1, 1], const_left=True) if form == "input" else parts[2])
    folded, _ = folds(g.model(outs), ["split_affine"])
    assert op_types(folded) == ["Conv", "Split"]


def test_split_of_gemm_and_linear():
    g = G()
    x = g.input("x", [3, 4])
    a, b = g.node("Split", [g.gemm(x, 4, 5, trans_b=1, c=(5,)), g.ints([2, 3])], n_out=2, axis=-1)
    folds(g.model([g.bn(a, 2), g.arith("Add", b, [3])]), ["split_affine"])
    g = G()
    x = g.input("x", [2, 3, 4])
    lin = g.node("Add", [g.matmul(x, 4, 5), g.init(g.values([5]), "lb")])
    a, b = g.node("Split", [lin, g.ints([2, 3])], n_out=2, axis=2)
    folds(g.model([g.arith("Mul", a, [2]), g.arith("Add", b, [3])]), ["split_affine"], declined=["matmul_add"])


@pytest.mark.parametrize("entry", ["graphproto", "graphsurgeon", "cli"])
def test_split_entry_points(entry, tmp_path):
    g = G()
    x = g.input("x", [1, 3, 5, 5])
    a, b = g.node("Split", [g.conv(x, 3, 6, pads=[1] * 4), g.ints([2, 4])], n_out=2, axis=1)
    via_entry(g.model([g.bn(a, 2), g.arith("Div", b, [4, 1, 1])]), entry, 2, tmp_path)


def test_split_branch_read_twice_or_an_output_gets_the_identity():
    """A branch read by its affine and another node is no branch with an affine: its slice keeps the
    identity, the other branches fold. A branch that is a graph output the same."""
    g = G()
    x = g.input("x", [1, 3, 5, 5])
    a, b = g.node("Split", [g.conv(x, 3, 6, pads=[1] * 4), g.ints([2, 4])], n_out=2, axis=1)
    folded, _ = folds(g.model([g.bn(a, 2), g.arith("Mul", b, [4, 1, 1]), g.node("Relu", [a])]), ["split_affine"])
    assert op_types(folded).count("BatchNormalization") == 1
    g = G()
    x = g.input("x", [1, 3, 5, 5])
    a, b = g.node("Split", [g.conv(x, 3, 6, pads=[1] * 4), g.ints([2, 4])], n_out=2, axis=1)
    folds(g.model([g.bn(a, 2), b]), ["split_affine"])


def test_split_declines():
    g = G()
    x = g.input("x", [1, 3, 6, 6])
    a, b = g.node("Split", [g.conv(x, 3, 6, pads=[1] * 4), g.ints([3, 3])], n_out=2, axis=2)
    declines(g.model([g.arith("Mul", a, [1, 6, 1, 1]), b]), "Split works along axis 2, not the channel axis 1",
             "split_affine")

    g = G()
    x = g.input("x", [1, 3, 5, 5])
    c = g.conv(x, 3, 6, pads=[1] * 4)
    a, b = g.node("Split", [c, g.ints([2, 4])], n_out=2, axis=1)
    declines(g.model([g.bn(a, 2), b, g.node("Relu", [c])]), "has 2 readers", "split_affine")

    g = G()
    x = g.input("x", [1, 3, 5, 5])
    a, b = g.node("Split", [g.conv(x, 3, 6, pads=[1] * 4), g.ints([2, 4])], n_out=2, axis=1)
    declines(g.model([g.arith("Mul", a, [1, 1, 5]), b]), "does not broadcast per channel", "split_affine")

    g = G()
    x = g.input("x", [2, 3, 4])
    a, b = g.node("Split", [g.matmul(x, 4, 5), g.ints([2, 3])], n_out=2, axis=2)
    declines(g.model([g.arith("Add", a, [2]), b]), "it has no bias to take the shift", "split_affine")

