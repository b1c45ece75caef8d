"""<affine>_<conv|gemm|matmul>: a per-channel affine BEFORE a producer folds into its input channels.

Checks as in test_rules_layout.py (rulekit.folds / rulekit.declines): exact rules, onnx.checker,
equivalence in onnxruntime (ORT_DISABLE_ALL, k = 1e-4 float32 / 1e-2 float16), one test per decline.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxfold import verify
from rulekit import G, declines, folds, nothing, op_types, via_entry

DTYPES = [np.float32, np.float16]
AFFINES = ["bn", "Mul", "Add", "Sub", "Div"]


def _affine(g: G, kind: str, x: str, channels: int, rank: int, const_left: bool = False) -> str:
    if kind == "bn":
        return g.bn(x, channels)
    shape = [channels] + [1] * (rank - 2) if rank > 2 else [channels]
    return g.arith(kind, x, shape, const_left=const_left and kind != "Div")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", AFFINES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("group,strides,dims", [(1, 1, 2), (2, 2, 2), (4, 1, 1), (1, 2, 3)])
def test_affine_into_unpadded_conv(dtype, kind, bias, group, strides, dims):
    g = G(dtype=dtype)
    x = g.input("x", [2, 4] + [5] * dims)
    h = _affine(g, kind, x, 4, dims + 2, const_left=True)
    y = g.conv(h, 4, 8, k=3, group=group, bias=bias, dims=dims, strides=[strides] * dims)
    folded, _ = folds(g.model(y), [f"{kind.lower()}_conv"])
    assert op_types(folded) == ["Conv"]


@pytest.mark.parametrize("kind", ["Mul", "Div"])
@pytest.mark.parametrize("pads", [{"pads": [1, 1, 1, 1]}, {"auto_pad": "SAME_UPPER"}], ids=["pads", "same"])
def test_pure_scale_into_padded_conv(kind, pads):
    g = G()
    x = g.input("x", [1, 4, 5, 5])
    folds(g.model(g.conv(_affine(g, kind, x, 4, 4), 4, 6, **pads)), [f"{kind.lower()}_conv"])


def test_scalar_scale_into_conv():
    g = G()
    x = g.input("x", [1, 4, 5, 5])
    h = g.node("Mul", [x, g.init(np.float32(0.75), "s")])
    folds(g.model(g.conv(h, 4, 6, pads=[1] * 4)), ["mul_conv"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", AFFINES)
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c", [None, (), (6,), (1, 6), (3, 6)], ids=["noC", "scalar", "N", "1xN", "MxN"])
def test_affine_into_gemm(dtype, kind, trans_b, c):
    g = G(dtype=dtype)
    x = g.input("x", [3, 4])
    y = g.gemm(_affine(g, kind, x, 4, 2), 4, 6, trans_b=trans_b, c=c, alpha=0.5, beta=1.5)
    folds(g.model(y), [f"{kind.lower()}_gemm"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", AFFINES)
def test_affine_into_matmul_rank2_becomes_gemm(dtype, kind):
    g = G(dtype=dtype)
    x = g.input("x", [3, 4])
    folded, _ = folds(g.model(g.matmul(_affine(g, kind, x, 4, 2), 4, 5)), [f"{kind.lower()}_matmul"])
    assert op_types(folded) == (["MatMul"] if kind in ("Mul", "Div") else ["Gemm"])


@pytest.mark.parametrize("kind", ["Mul", "Div"])
def test_scale_into_matmul_rank3(kind):
    g = G()
    x = g.input("x", [2, 3, 4])
    h = g.arith(kind, x, [1, 1, 4])
    folds(g.model(g.matmul(h, 4, 5)), [f"{kind.lower()}_matmul"])


def test_chain_bn_conv_bn_both_sides():
    """BN -> unpadded Conv -> BN: the first folds into the Conv's input channels, the second into its output."""
    g = G()
    x = g.input("x", [1, 4, 5, 5])
    y = g.bn(g.conv(g.bn(x, 4), 4, 6), 6)
    folded, _ = folds(g.model(y), ["bn_conv", "conv_bn"])
    assert op_types(folded) == ["Conv"]


@pytest.mark.parametrize("entry", ["graphproto", "graphsurgeon", "cli"])
def test_input_side_entry_points(entry, tmp_path):
    g = G()
    x = g.input("x", [3, 4])
    y = g.gemm(g.bn(x, 4), 4, 6, trans_b=1, c=(6,))
    via_entry(g.model(y), entry, 1, tmp_path)


# -- declines ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bn", "Add", "Sub"])
@pytest.mark.parametrize("pads", [{"pads": [0, 1, 0, 1]}, {"auto_pad": "SAME_LOWER"}], ids=["pads", "same"])
def test_shift_into_padded_conv(kind, pads):
    g = G()
    x = g.input("x", [1, 4, 5, 5])
    y = g.conv(_affine(g, kind, x, 4, 4), 4, 6, **pads)
    declines(g.model(y), "zero padding after", f"{kind.lower()}_conv")


def test_gemm_trans_a():
    g = G()
    x = g.input("x", [5, 4])
    y = g.node("Gemm", [g.bn(x, 4), g.weight((5, 6)), g.bias(6)], transA=1)
    declines(g.model(y), "Gemm has transA=1", "bn_gemm")


def test_gemm_beta_zero_with_a_shift():
    g = G()
    x = g.input("x", [3, 4])
    y = g.gemm(g.arith("Add", x, [4]), 4, 6, c=(6,), beta=0.0)
    declines(g.model(y), "Gemm has beta = 0", "add_gemm")


def test_matmul_rank3_with_a_shift():
    """c - x before a rank-3 MatMul: the shift has no bias to go to. (x + c is no candidate at all.)"""
    g = G()
    x = g.input("x", [2, 3, 4])
    h = g.arith("Sub", x, [4], const_left=True)
    declines(g.model(g.matmul(h, 4, 5)), "it has no bias to take the Sub's shift", "sub_matmul")
    g = G()
    x = g.input("x", [2, 3, 4])
    nothing(g.model(g.matmul(g.arith("Add", x, [4]), 4, 5)))


def test_bn_before_matmul_rank3_is_on_the_wrong_axis():
    g = G()
    x = g.input("x", [2, 4, 4])
    declines(g.model(g.matmul(g.bn(x, 4), 4, 5)),
             "it reduces over axis 2, the BatchNormalization's channels are on axis 1")


def test_affine_read_twice():
    g = G()
    x = g.input("x", [1, 4, 5, 5])
    h = g.arith("Mul", x, [4, 1, 1])
    declines(g.model([g.conv(h, 4, 6), g.node("Relu", [h])]), "has 2 readers", "mul_conv")


def test_constant_along_a_spatial_axis():
    g = G()
    x = g.input("x", [1, 4, 5, 5])
    declines(g.model(g.conv(g.arith("Mul", x, [1, 1, 5]), 4, 6)), "does not broadcast per channel", "mul_conv")


# Regression: the producer used to read the affine's input in place of its output even when the affine's
# constant broadcast that input to more channels or a higher rank; the folded model failed in onnx.checker
# or onnxruntime ("Input channels C is not equal to kernel channels * group").
BROADCASTS = [
    ("Conv", "Mul", [1, 1, 5, 5], [1, 4, 1, 1]),
    ("Conv", "Add", [1, 1, 5, 5], [4, 1, 1]),
    ("Conv", "Mul", [4, 5, 5], [1, 4, 1, 1]),
    ("Gemm", "Mul", [3, 1], [1, 4]),
    ("Gemm", "Div", [4], [1, 4]),
    ("MatMul", "Add", [3, 1], [1, 4]),
    ("MatMul", "Mul", [2, 3, 1], [4]),
    ("MatMul", "Mul", [3, 4], [2, 1, 1]),
]


@pytest.mark.parametrize("target,kind,x_shape,c_shape", BROADCASTS)
def test_affine_that_broadcasts_its_input(target, kind, x_shape, c_shape):
    g = G()
    x = g.input("x", x_shape)
    h = g.arith(kind, x, c_shape)
    y = {"Conv": lambda: g.conv(h, 4, 6), "Gemm": lambda: g.gemm(h, 4, 6),
         "MatMul": lambda: g.matmul(h, 4, 6)}[target]()
    declines(g.model(y), "to a larger shape", f"{kind.lower()}_{target.lower()}")


def _bn_conv_reshape_bn(g: G) -> str:
    c = g.conv(g.bn(g.input("x", [1, 4, 5, 5]), 4), 4, 6)
    return g.bn(g.node("Reshape", [c, g.ints([1, 6, 9])]), 6)


def _bn_conv_split(g: G) -> list[str]:
    c = g.conv(g.bn(g.input("x", [1, 4, 5, 5]), 4), 4, 6)
    a, b = g.node("Split", [c, g.ints([2, 4])], n_out=2, axis=1)
    return [g.bn(a, 2), b]


def _mul_linear_mul(g: G) -> str:
    m = g.matmul(g.arith("Mul", g.input("x", [2, 3, 4]), [4]), 4, 6)
    return g.arith("Mul", g.node("Add", [m, g.init(g.values([6]), "lb")]), [6])


def _bn_conv_concat_bn(g: G) -> str:
    x = g.input("x", [1, 4, 5, 5])
    cc = g.node("Concat", [g.conv(g.bn(x, 4), 4, 3), g.conv(g.node("Relu", [x]), 4, 3)], axis=1)
    return g.bn(cc, 6)


@pytest.mark.parametrize("make,rules", [
    (_bn_conv_reshape_bn, ["bn_conv", "conv_bn"]),
    (_bn_conv_split, ["bn_conv", "split_affine"]),
    (_mul_linear_mul, ["mul_matmul", "linear_mul"]),
    (_bn_conv_concat_bn, ["bn_conv", "concat_bn"]),
], ids=["reshape", "split", "linear", "concat"])
def test_input_side_then_a_fold_that_keeps_the_producer_output(make, rules, tmp_path):
    """Regression: the input-side fold is checked at the producer's output, which the second fold then
    changes in place (the layout op, Split or Concat keeps it; a Linear's MatMul output). Verification
    compared it with the original's and failed a right model (the command line exited 1 and wrote
    nothing). The first fold is now covered by the graph outputs, and verification passes."""
    g = G()
    model = g.model(make(g))
    folded, report = folds(model, rules, declined=["matmul_add"] if "linear_mul" in rules else None)
    result = verify(model, folded, folds=report.folded)
    assert result, str(result)
    assert "changed again in place by a later fold" in " ".join(result.unchecked.values()), result.unchecked
    via_entry(model, "cli", 2, tmp_path)


def _gelu(g: G, x: str, tanh: bool = False, half: float = 0.5) -> str:
    """x * (1 + erf(x / sqrt 2)) * half, as the legacy exporter writes nn.GELU (or the tanh form's tail)."""
    if tanh:
        inner = g.node("Tanh", [g.node("Mul", [x, g.init(np.float32(0.7978845608), "k")])])
    else:
        inner = g.node("Erf", [g.node("Div", [x, g.init(np.float32(1.4142135381698608), "sqrt2")])])
    one = g.node("Add", [inner, g.init(np.float32(1.0), "one")])
    return g.node("Mul", [g.node("Mul", [x, one]), g.init(np.float32(half), "half")])


@pytest.mark.parametrize("target", ["conv", "matmul"])
@pytest.mark.parametrize("tanh", [False, True], ids=["erf", "tanh"])
def test_gelu_tail_stays_for_onnxruntime_gelu_fusion(target, tanh, tmp_path):
    """Issue 20, never slower: the 0.5 of a GELU written out (ConvNeXt and SwiftFormer legacy exports)
    folded into the next Conv/MatMul broke onnxruntime's Gelu/FastGelu fusion (hf/convnext_legacy 1.05x,
    hf/swiftformer_legacy 1.08x the original's latency): the Mul stays, and onnxruntime still fuses it."""
    g = G()
    if target == "conv":
        x = g.input("x", [1, 4, 5, 5])
        y = g.conv(_gelu(g, x, tanh), 4, 6)
    else:
        x = g.input("x", [2, 3, 4])
        y = g.matmul(_gelu(g, x, tanh), 4, 5)
    model = g.model(y)
    declines(model, "ends a GELU", f"mul_{target}")
    if not tanh:  # onnxruntime's FastGelu fusion wants the whole tanh polynomial, not built here
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(tmp_path / "ort.onnx")
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        assert "Gelu" in op_types(onnx.load(tmp_path / "ort.onnx"))


def test_gelu_tail_stays_before_a_pad_too():
    g = G()
    x = g.input("x", [1, 4, 5, 5])
    h = g.node("Pad", [_gelu(g, x), g.init(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")], mode="reflect")
    declines(g.model(g.conv(h, 4, 6)), "ends a GELU", "mul_pad_conv")


def test_a_scale_after_something_else_than_a_gelu_still_folds():
    """Not 0.5, or no Erf/Tanh behind it: onnxruntime fuses nothing there, the scale folds."""
    g = G()
    x = g.input("x", [2, 3, 4])
    folds(g.model(g.matmul(_gelu(g, x, half=0.75), 4, 5)), ["mul_matmul"])
    g = G()
    x = g.input("x", [2, 3, 4])
    h = g.node("Mul", [g.node("Mul", [x, g.node("Add", [g.node("Sigmoid", [x]), g.init(np.float32(1.0), "one")])]),
                       g.init(np.float32(0.5), "half")])
    folds(g.model(g.matmul(h, 4, 5)), ["mul_matmul"])


def test_a_chain_of_affines_before_a_conv_folds_in_one_pass(tmp_path):
    """x -> Div -> Mul -> Add -> Conv (paddle2onnx's normalization, PP-OCRv4): the Conv, offered again
    after each fold into its input, takes the whole chain in one pass (one pass an affine before: PP-OCRv4
    det had 4 passes); a second pass finds nothing. Verified end to end, and through the command line."""
    g = G()
    x = g.input("x", [1, 4, 6, 6])
    h = _affine(g, "Add", _affine(g, "Mul", _affine(g, "Div", x, 4, 4), 4, 4), 4, 4)
    y = g.conv(h, 4, 6, pads=[0] * 4)
    model = g.model(y)
    folded, report = folds(model, ["add_conv", "mul_conv", "div_conv"])
    assert op_types(folded) == ["Conv"] and report.rounds == 2
    result = verify(model, folded, folds=report.folded)
    assert result, str(result)
    via_entry(model, "cli", 3, tmp_path)
