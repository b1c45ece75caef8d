"""PairRule through layout ops (Reshape, Flatten, Transpose, Squeeze, Unsqueeze), MatMul rank 3+ (a pure
scale folds, a BatchNormalization's shift stays behind as an Add) and linear_<consumer> (MatMul + Add bias).

Positive tests: the exact rules in the report, onnx.checker (full_check), graph inputs and outputs kept,
outputs equal in onnxruntime with ORT_DISABLE_ALL within k * max|ref| + k * |ref| (k = 1e-4 float32,
1e-2 float16; tests/checks.py), and a second fold finds nothing. Negative tests: one per reason to
decline, each asserting its sentence and that the graph is unchanged.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from builders import bn_stats
from checks import assert_close, run
from onnxfold import fold_model
from rulekit import G, declines, folds, op_types, via_entry

DTYPES = [np.float32, np.float16]
# A rank-3 MatMul's Add of the BatchNormalization's shift is itself a MatMul -> Add candidate that
# declines (no bias): the report says so after the fold.
LEFT_ADD = ["matmul_add"]


def _conv(g: G, x_shape, cout=6, bias=True, group=1, k=3):
    x = g.input("x", x_shape)
    return g.conv(x, x_shape[1], cout, k=k, bias=bias, group=group)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("opset", [11, 13, 21])
def test_conv_squeeze_bn(dtype, bias, group, opset):
    """OCR recognizers: Conv [N, C, 1, W] -> Squeeze(2) -> BatchNormalization (axes: attribute before 13)."""
    g = G(dtype=dtype, opset=opset)
    c = _conv(g, [2, 4, 3, 7], bias=bias, group=group)
    s = g.node("Squeeze", [c], axes=[2]) if opset < 13 else g.node("Squeeze", [c, g.ints([-2])])
    folded, _ = folds(g.model(g.bn(s, 6)), ["conv_bn"])
    assert op_types(folded) == ["Conv", "Squeeze"]
    assert folded.graph.node[-1].output[0] == folded.graph.output[0].name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opset", [11, 13, 18])
def test_conv_unsqueeze_bn3d(dtype, opset):
    g = G(dtype=dtype, opset=opset)
    c = _conv(g, [1, 4, 5, 5])
    u = g.node("Unsqueeze", [c], axes=[-1]) if opset < 13 else g.node("Unsqueeze", [c, g.ints([4])])
    folds(g.model(g.bn(u, 6)), ["conv_bn"])


@pytest.mark.parametrize("target", [[1, 6, 9], [0, 6, -1], [1, 6, 3, 3, 1], [0, 0, 9]])
def test_conv_reshape_bn(target):
    g = G()
    c = _conv(g, [1, 4, 5, 5])
    r = g.node("Reshape", [c, g.ints(target)])
    folds(g.model(g.bn(r, 6)), ["conv_bn"])


def test_conv_flatten_mul_then_transpose_mul():
    """Flatten(1) of [N, C, 1, 1]; then NHWC Transpose and a Mul over the last axis: both fold."""
    g = G()
    c = _conv(g, [2, 4, 3, 3])
    f = g.node("Flatten", [c], axis=1)
    m = g.arith("Mul", f, [1, 6])
    folds(g.model(m), ["conv_mul"])
    g = G()
    c = _conv(g, [1, 4, 5, 5])
    t = g.node("Transpose", [c], perm=[0, 2, 3, 1])
    folds(g.model(g.arith("Add", t, [6])), ["conv_add"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c", [None, (), (6,), (1, 6)], ids=["noC", "scalar", "N", "1xN"])
def test_gemm_unsqueeze_bn(dtype, trans_b, c):
    g = G(dtype=dtype)
    x = g.input("x", [3, 4])
    y = g.gemm(x, 4, 6, trans_b=trans_b, c=c, alpha=0.5, beta=1.5)
    u = g.node("Unsqueeze", [y, g.ints([2])])
    folds(g.model(g.bn(u, 6)), ["gemm_bn"])


def test_gemm_transpose_mul_by_column():
    """Gemm [M, N] -> Transpose -> Mul by [N, 1]: the channels are on axis 0 after the Transpose."""
    g = G()
    x = g.input("x", [3, 4])
    t = g.node("Transpose", [g.gemm(x, 4, 6, trans_b=1, c=(6,))])
    folds(g.model(g.arith("Mul", t, [6, 1])), ["gemm_mul"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_rank3_transpose_bn_leaves_the_shift_as_an_add(dtype):
    """[B, T, C] -> Transpose -> BatchNorm1d: the MatMul takes the scale, the shift stays as an Add."""
    g = G(dtype=dtype)
    x = g.input("x", [2, 5, 4])
    t = g.node("Transpose", [g.matmul(x, 4, 6)], perm=[0, 2, 1])
    folded, _ = folds(g.model(g.bn(t, 6)), ["matmul_bn"], declined=LEFT_ADD)
    assert op_types(folded) == ["MatMul", "Transpose", "Add"]


def test_matmul_rank3_pure_scale_stays_a_matmul():
    g = G()
    x = g.input("x", [2, 5, 4])
    folded, _ = folds(g.model(g.arith("Div", g.matmul(x, 4, 6), [6])), ["matmul_div"])
    assert op_types(folded) == ["MatMul"]


def test_levit_flatten_bn_reshape_as_two_blocks():
    """LeViT: Linear -> Flatten(0, 1) -> BatchNorm1d -> Reshape to the Linear output's shape (a Shape node
    reads the MatMul output: it sees the shape only, which the fold keeps). Two blocks in a row."""
    g = G()
    y = g.input("x", [2, 5, 4])
    for k, n in ((4, 6), (6, 3)):
        m = g.matmul(y, k, n)
        b = g.bn(g.node("Flatten", [m], axis=2), n)
        y = g.node("Reshape", [b, g.node("Shape", [m])])
    folded, _ = folds(g.model(y), ["matmul_bn", "matmul_bn"], declined=LEFT_ADD * 2)
    assert op_types(folded).count("BatchNormalization") == 0


@pytest.mark.parametrize("bias_shape", [[6], [1, 1, 6]])
def test_linear_transpose_bn_and_linear_sub(bias_shape):
    """MatMul + Add bias over the last axis is a producer (torch's Linear on rank 3): both nodes take
    the fold; c - x folds with the sign."""
    g = G()
    x = g.input("x", [2, 5, 4])
    a = g.node("Add", [g.matmul(x, 4, 6), g.init(g.values(bias_shape), "lb")])
    t = g.node("Transpose", [a], perm=[0, 2, 1])
    folded, _ = folds(g.model(g.bn(t, 6)), ["linear_bn"], declined=LEFT_ADD)
    assert op_types(folded) == ["MatMul", "Add", "Transpose"]
    g = G()
    x = g.input("x", [2, 5, 4])
    a = g.node("Add", [g.matmul(x, 4, 6), g.init(g.values(bias_shape), "lb")])
    folds(g.model(g.arith("Sub", a, [6], const_left=True)), ["linear_sub"], declined=LEFT_ADD)


def test_chain_conv_squeeze_bn_mul():
    g = G()
    c = _conv(g, [2, 4, 3, 7])
    s = g.node("Squeeze", [c, g.ints([2])])
    m = g.arith("Mul", g.bn(s, 6), [6, 1])
    folded, _ = folds(g.model(m), ["conv_bn", "conv_mul"])
    assert op_types(folded) == ["Conv", "Squeeze"]


@pytest.mark.parametrize("entry", ["graphproto", "graphsurgeon", "cli"])
def test_entry_points(entry, tmp_path):
    g = G()
    c = _conv(g, [1, 4, 5, 5])
    r = g.node("Reshape", [c, g.ints([1, 6, 9])])
    m = g.arith("Mul", g.bn(r, 6), [6, 1])
    via_entry(g.model(m), entry, 2, tmp_path)


# -- declines ---------------------------------------------------------------------------------------


def test_reshape_merging_the_channel_axis():
    g = G()
    c = _conv(g, [1, 4, 5, 5])
    r = g.node("Reshape", [c, g.ints([1, 18, 3])])
    declines(g.model(g.bn(r, 18)), "merges or splits it with other dimensions", "conv_bn")


def test_reshape_shape_not_constant():
    # a dynamic batch: Shape of a tensor whose every dimension is known is a constant (const_resolve)
    g = G()
    c = _conv(g, ["N", 4, 5, 5])
    r = g.node("Reshape", [c, g.node("Shape", [c])])
    declines(g.model(g.bn(r, 6)), "Reshape's shape is not a constant", "conv_bn")


def test_reshape_by_shape_of_a_static_tensor():
    """Shape of a tensor whose dimensions are all known is a constant: the Reshape is followed."""
    g = G()
    c = _conv(g, [1, 4, 5, 5])
    folds(g.model(g.bn(g.node("Reshape", [c, g.node("Shape", [c])]), 6)), ["conv_bn"])


def test_transpose_moves_the_channels_elsewhere():
    g = G()
    c = _conv(g, [1, 4, 5, 5])
    t = g.node("Transpose", [c], perm=[0, 2, 3, 1])
    declines(g.model(g.bn(t, 3)), "its channels are on axis 3 after the layout ops", "conv_bn")


def test_square_layout_n_c_c_is_not_guessed():
    """[B, 6, 6] out of a MatMul of 6 channels: BN's axis 1 is the 6 rows, not the channels."""
    g = G()
    x = g.input("x", [2, 6, 4])
    declines(g.model(g.bn(g.matmul(x, 4, 6), 6)), "its channels are on axis 2, the BatchNormalization's on axis 1")
    g = G()
    x = g.input("x", [2, 6, 4])
    r = g.node("Reshape", [g.matmul(x, 4, 6), g.ints([2, 6, 6])])
    declines(g.model(g.bn(r, 6)), "on axis 2 after the layout ops")


def test_single_channel_in_several_size1_axes_is_ambiguous():
    g = G()
    c = _conv(g, [1, 4, 3, 3], cout=1)
    r = g.node("Reshape", [c, g.ints([1, 1, 1])])
    declines(g.model(g.bn(r, 1)), "ambiguous", "conv_bn")


@pytest.mark.parametrize("how", ["other reader", "graph output", "producer read"])
def test_layout_value_read_elsewhere(how):
    g = G()
    c = _conv(g, [1, 4, 3, 3])
    r = g.node("Reshape", [c, g.ints([1, 6, 1])])
    outs = [g.bn(r, 6)]
    if how == "other reader":
        outs.append(g.node("Relu", [r]))
    elif how == "graph output":
        outs.append(r)
    else:
        outs.append(g.node("Relu", [c]))
    declines(g.model(outs), "is a graph output" if how == "graph output" else "has 2 readers")


def test_squeeze_axes_not_constant():
    g = G()
    c = _conv(g, [1, 4, 3, 7])
    g.inputs.append(helper.make_tensor_value_info("axes", TensorProto.INT64, [1]))
    m = g.arith("Mul", g.node("Squeeze", [c, "axes"]), [1, 6, 1])
    report = declines(_with_output_shape(g, m, [1, 6, 7]), "Squeeze's axes are not a constant")
    assert report.declined[0].rule == "conv_mul"


def _with_output_shape(g: G, out: str, shape) -> onnx.ModelProto:
    """A model whose output has a declared shape (shape inference cannot give one here)."""
    graph = helper.make_graph(g.nodes, "g", g.inputs, [helper.make_tensor_value_info(out, TensorProto.FLOAT, shape)],
                              g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", g.opset)])
    model.ir_version = 8
    return model


def test_producer_shape_unknown():
    g = G()
    x = g.input("x", None)
    r = g.node("Reshape", [g.conv(x, 4, 6), g.ints([1, 6, -1])])
    model = _with_output_shape(g, g.bn(r, 6), [1, 6, 9])
    folded, report = fold_model(model)
    assert not report.folded
    assert "its channel axis cannot be followed" in report.declined[0].reason, report.summary()
    assert op_types(folded) == op_types(model)
    feeds = {"x": np.random.default_rng(0).uniform(-1, 1, (1, 4, 5, 5)).astype(np.float32)}
    assert_close(run(model, feeds), run(folded, feeds), "declined")


def test_matmul_rank3_shift_only_declines():
    g = G()
    x = g.input("x", [2, 5, 4])
    t = g.node("Transpose", [g.matmul(x, 4, 6)], perm=[0, 2, 1])
    declines(g.model(g.arith("Add", t, [6, 1])), "MatMul output has rank 3: it has no bias to take the shift")


@pytest.mark.parametrize("bias_shape", [[1, 5, 6], [1, 1, 1, 6]])
def test_linear_bias_not_over_the_last_axis(bias_shape):
    g = G()
    x = g.input("x", [2, 5, 4])
    a = g.node("Add", [g.matmul(x, 4, 6), g.init(g.values(bias_shape), "lb")])
    report = declines(g.model(g.arith("Mul", a, [6])), "not a bias over the last axis")
    assert "linear_mul" in [d.rule for d in report.declined]


def _matmul_transpose_bn_nodes(x: str, w: str, stats: list[str], out: str) -> list[onnx.NodeProto]:
    return [helper.make_node("MatMul", [x, w], [out + "_m"]),
            helper.make_node("Transpose", [out + "_m"], [out + "_t"], perm=[0, 2, 1]),
            helper.make_node("BatchNormalization", [out + "_t", *stats], [out], epsilon=1e-3)]


def test_matmul_rank3_bn_becomes_add_inside_an_if_body():
    """The shift's Add is made in the subgraph (its constant an initializer of the body's graph)."""
    g = G()
    g.input("x", [2, 5, 4])
    g.inputs.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    w = g.weight((4, 6))
    stats = [g.init(a, n) for a, n in zip(bn_stats(g.rng, 6), ("g", "b", "m", "v"))]
    vi = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6, 5])]
    then = helper.make_graph(_matmul_transpose_bn_nodes("x", w, stats, "y"), "then", [], vi)
    other = helper.make_graph([helper.make_node("Transpose", ["x"], ["e"], perm=[0, 2, 1]),
                               helper.make_node("Pad", ["e", "pads"], ["y"])], "else", [], vi)
    g.inits.append(onnx.numpy_helper.from_array(np.array([0, 0, 0, 0, 2, 0], np.int64), "pads"))
    g.nodes.append(helper.make_node("If", ["cond"], ["out"], then_branch=then, else_branch=other))
    model = g.model("out")
    folded, report = fold_model(model)
    assert [f.rule for f in report.folded] == ["matmul_bn"] and report.folded[0].graph.endswith("then_branch")
    body = next(a.g for a in folded.graph.node[0].attribute if a.name == "then_branch")
    assert [n.op_type for n in body.node] == ["MatMul", "Transpose", "Add"]
    for cond in (True, False):
        feeds = {"x": np.random.default_rng(1).uniform(-1, 1, (2, 5, 4)).astype(np.float32), "cond": np.array(cond)}
        assert_close(run(model, feeds), run(folded, feeds), f"cond={cond}")


def test_matmul_rank3_bn_in_a_local_function():
    """Weights passed at the call: the function is inlined and the BN's shift stays as an Add. Weights
    in the body: its input's rank is unknown there, and the fold declines with that reason."""
    rng = np.random.default_rng(0)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]
    fn = helper.make_function("local", "Blk", ["x", "w", "g", "b", "m", "v"], ["y"],
                              _matmul_transpose_bn_nodes("x", "w", ["g", "b", "m", "v"], "y"), opsets[:1])
    g = G()
    x = g.input("x", [2, 5, 4])
    args = [x, g.weight((4, 6)), *[g.init(a, n) for a, n in zip(bn_stats(g.rng, 6), "gbmv")]]
    g.nodes.append(helper.make_node("Blk", args, ["out"], domain="local"))
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 6, 5])
    graph = helper.make_graph(g.nodes, "g", g.inputs, [out], g.inits)
    model = helper.make_model(graph, functions=[fn], opset_imports=opsets)
    model.ir_version = 8
    folded, report = fold_model(model)
    assert [f.rule for f in report.folded] == ["matmul_bn"] and report.inlined == ["local.Blk"]
    assert [n.op_type for n in folded.graph.node if n.op_type != "Constant"] == ["MatMul", "Transpose", "Add"]
    equivalent_feeds = {"x": rng.uniform(-1, 1, (2, 5, 4)).astype(np.float32)}
    assert_close(run(model, equivalent_feeds), run(folded, equivalent_feeds), "inlined")

    consts = [helper.make_node("Constant", [], [n], value=onnx.numpy_helper.from_array(a, n))
              for n, a in zip(["w", "g", "b", "m", "v"], [rng.normal(0, 0.5, (4, 6)).astype(np.float32),
                                                          *bn_stats(rng, 6)])]
    body = helper.make_function("local", "Blk", ["x"], ["y"],
                                consts + _matmul_transpose_bn_nodes("x", "w", ["g", "b", "m", "v"], "y"), opsets[:1])
    graph = helper.make_graph([helper.make_node("Blk", ["x"], ["out"], domain="local")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 6, 5])])
    model = helper.make_model(graph, functions=[body], opset_imports=opsets)
    model.ir_version = 8
    folded, report = fold_model(model)
    assert not report.folded
    assert "rank of MatMul's input is unknown" in report.declined[0].reason, report.summary()
    assert_close(run(model, equivalent_feeds), run(folded, equivalent_feeds), "function body")
