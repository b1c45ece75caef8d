"""bias_add: a constant Add (or x - c) into the bias of a Conv/ConvTranspose/Gemm whose weight is computed
at run time (here: a graph input, or a Mul of one). Only the bias is read and written.

Checks as in test_rules_layout.py (rulekit.folds / rulekit.declines): exact rules, onnx.checker,
equivalence in onnxruntime (ORT_DISABLE_ALL, k = 1e-4 float32 / 1e-2 float16; the run-time weight is
fed random values), one test per decline.
"""

from __future__ import annotations

import numpy as np
import pytest

from rulekit import G, declines, folds, nothing, op_types, via_entry

DTYPES = [np.float32, np.float16]


def _runtime_conv(g: G, op="Conv", cout=6, cin=4, group=1, bias=True, w_shape=None, computed=False, dims=2):
    x = g.input("x", [1, cin] + [5] * dims)
    shape = w_shape or ([cout, cin // group] if op == "Conv" else [cin, cout // group]) + [3] * dims
    w = g.input("w", shape)
    if computed:
        w = g.node("Mul", [w, g.node("Relu", [w])])
    inputs = [x, w] + ([g.bias(cout)] if bias else [])
    return g.node(op, inputs, kernel_shape=[3] * dims, group=group)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("c_shape", [[6, 1, 1], [1, 6, 1, 1], [], [1]], ids=["C11", "1C11", "scalar", "1"])
@pytest.mark.parametrize("computed", [False, True])
def test_conv_runtime_weight_add(dtype, bias, c_shape, computed):
    g = G(dtype=dtype)
    y = _runtime_conv(g, bias=bias, computed=computed)
    folded, _ = folds(g.model(g.arith("Add", y, c_shape, const_left=True)), ["bias_add"])
    assert op_types(folded)[-1] == "Conv"


@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_transpose_and_1d_runtime_weight_sub(group, bias):
    g = G()
    y = _runtime_conv(g, op="ConvTranspose", cin=4, cout=6, group=group, bias=bias)
    folds(g.model(g.arith("Sub", y, [6, 1, 1])), ["bias_add"])
    g = G()
    y = _runtime_conv(g, dims=1, bias=bias)
    folds(g.model(g.arith("Add", y, [6, 1])), ["bias_add"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [None, (), (5,), (1, 5)], ids=["noC", "scalar", "N", "1xN"])
@pytest.mark.parametrize("beta", [1.0, -0.5])
@pytest.mark.parametrize("c_shape", [[5], [1, 5], []], ids=["N", "1N", "scalar"])
def test_gemm_runtime_weight_add(dtype, c, beta, c_shape):
    g = G(dtype=dtype)
    x = g.input("x", [3, 4])
    w = g.input("w", [5, 4])
    inputs = [x, w] + ([] if c is None else [g.init(g.values(c), "c")])
    y = g.node("Gemm", inputs, transB=1, alpha=0.5, beta=beta)
    folds(g.model(g.arith("Add", y, c_shape)), ["bias_add"])


@pytest.mark.parametrize("entry", ["graphproto", "graphsurgeon", "cli"])
def test_bias_add_entry_points(entry, tmp_path):
    g = G()
    y = _runtime_conv(g, bias=False)
    via_entry(g.model(g.arith("Add", y, [6, 1, 1])), entry, 1, tmp_path)


# -- declines and non-candidates ------------------------------------------------------------------


def test_unknown_channel_count():
    """No bias and a weight whose output-channel count is a dim_param: the channels are unknown."""
    g = G()
    y = _runtime_conv(g, bias=False, w_shape=["M", 4, 3, 3])
    model = g.model(g.arith("Add", y, [1, 1, 1]))
    declines(model, "the number of Conv output channels is unknown", "bias_add")


@pytest.mark.parametrize("op", ["Conv", "Gemm", "Gemm_scalar_C"])
def test_constant_that_broadcasts_the_channels(op):
    """Regression: bias_add took the channel count from the constant. A [1, 3, 1, 1] Add after a
    one-channel output broadcasts it to 3 channels, which a 3-value bias cannot do (the folded model
    failed onnx.checker: "Inferred shape and existing shape differ in dimension 1")."""
    g = G()
    if op == "Conv":
        y = _runtime_conv(g, bias=False, w_shape=[1, 4, 3, 3])
        c_shape = [1, 3, 1, 1]
    else:
        x = g.input("x", [2, 4])
        w = g.input("w", [4, 1])
        y = g.node("Gemm", [x, w] + ([g.init(np.float32(0.5), "c")] if op == "Gemm_scalar_C" else []))
        c_shape = [1, 3]
    declines(g.model(g.arith("Add", y, c_shape)), "does not broadcast per channel", "bias_add")


def test_gemm_c_per_row():
    g = G()
    x = g.input("x", [2, 4])
    y = g.node("Gemm", [x, g.input("w", [4, 3]), g.init(g.values((2, 1)), "c")])
    declines(g.model(g.arith("Add", y, [3])), "only a scalar, [N] or [1, N] bias folds", "bias_add")


def test_bias_not_a_constant():
    g = G()
    x = g.input("x", [1, 4, 5, 5])
    y = g.node("Conv", [x, g.input("w", [6, 4, 3, 3]), g.input("b", [6])], kernel_shape=[3, 3])
    declines(g.model(g.arith("Add", y, [6, 1, 1])), "Conv bias 'b' is a graph input", "bias_add")


def test_constant_along_a_spatial_axis():
    g = G()
    y = _runtime_conv(g)
    declines(g.model(g.arith("Add", y, [1, 1, 3])), "does not broadcast per channel", "bias_add")


def test_c_minus_x_and_mul_are_no_candidates():
    """c - x negates the output, a Mul scales it: both need the weight, which is not a constant."""
    g = G()
    y = _runtime_conv(g)
    report = nothing(g.model(g.arith("Sub", y, [6, 1, 1], const_left=True)))
    assert all(d.rule != "bias_add" for d in report.declined)
    g = G()
    y = _runtime_conv(g)
    report = nothing(g.model(g.arith("Mul", y, [6, 1, 1])))
    assert all(d.rule != "bias_add" for d in report.declined)


def test_producer_read_twice():
    g = G()
    y = _runtime_conv(g)
    declines(g.model([g.arith("Add", y, [6, 1, 1]), g.node("Relu", [y])]), "has 2 readers", "bias_add")
