"""BatchNormalization -> Conv folds into the Conv's input channels, only without padding.

Equivalence in onnxruntime, optimizations off, default tolerances (float32: 1e-4 of the output's
scale; float16: 1e-2).
"""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import bn_stats, np_dtype, onnx_dtype, torch_run
from onnxfold import fold_model, verify
from onnxfold.affine import bn_affine, fold_input_affine


def bn_conv_model(*, dims=2, groups=1, bias=True, pads=0, auto_pad=None, strides=1, dilations=1, dtype="float32",
                  cin=6, cout=4, relu_first=True, seed=0):
    rng = np.random.default_rng(seed)
    dt = np_dtype(dtype)
    k = (3,) * dims
    stats = ["g", "s", "m", "v"]
    inits = [numpy_helper.from_array(a, n) for a, n in zip(bn_stats(rng, cin, dt), stats)]
    inits.append(numpy_helper.from_array(rng.normal(0, 0.5, (cout, cin // groups, *k)).astype(dt), "w"))
    conv_in = ["n", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.5, cout).astype(dt), "b"))
        conv_in.append("b")
    attrs = dict(group=groups, kernel_shape=list(k), strides=[strides] * dims, dilations=[dilations] * dims)
    if auto_pad:
        attrs["auto_pad"] = auto_pad
    else:
        attrs["pads"] = [pads] * 2 * dims
    nodes = [helper.make_node("Relu", ["x"], ["r"])] if relu_first else []
    nodes += [helper.make_node("BatchNormalization", ["r" if relu_first else "x", *stats], ["n"], epsilon=1e-3,
                               name="bn"),
              helper.make_node("Conv", conv_in, ["y"], name="conv", **attrs)]
    x = helper.make_tensor_value_info("x", onnx_dtype(dtype), [2, cin] + [8] * dims)
    y = helper.make_tensor_value_info("y", onnx_dtype(dtype), [2, cout] + [None] * dims)
    graph = helper.make_graph(nodes, "bn_conv", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("groups", [1, 2, "depthwise"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_bn_before_conv_without_padding_folds(dims, groups, bias, dtype):
    cin, cout, g = (6, 6, 6) if groups == "depthwise" else (6, 4, groups)
    model = bn_conv_model(dims=dims, groups=g, bias=bias, dtype=dtype, cin=cin, cout=cout)
    folded, report = fold_model(model)
    assert [f.rule for f in report.folded] == ["bn_conv"], report.summary()
    assert [n.op_type for n in folded.graph.node] == ["Relu", "Conv"]
    assert folded.graph.node[1].input[0] == "r"
    onnx.checker.check_model(folded, full_check=True)
    result = verify(model, folded)
    assert result, str(result)


@pytest.mark.parametrize("kwargs", [dict(strides=2), dict(dilations=2), dict(auto_pad="VALID"), dict(relu_first=False)],
                         ids=str)
def test_bn_before_conv_geometry(kwargs):
    model = bn_conv_model(**kwargs)
    folded, report = fold_model(model)
    assert len(report.folded) == 1, report.summary()
    assert verify(model, folded)


@pytest.mark.parametrize("kwargs,text", [(dict(pads=1), "pads=[1, 1, 1, 1]"),
                                         (dict(auto_pad="SAME_UPPER"), "auto_pad=SAME_UPPER")],
                         ids=["pads", "same"])
def test_bn_before_padded_conv_is_declined(kwargs, text):
    """Zero padding comes after BN: the border would see `shift` where the original saw zeros."""
    model = bn_conv_model(**kwargs)
    folded, report = fold_model(model)
    assert not report.folded and text in report.declined[0].reason and "zero padding" in report.declined[0].reason
    assert folded.SerializeToString() == model.SerializeToString()


def test_bn_with_two_readers_is_declined():
    model = bn_conv_model()
    model.graph.output.append(helper.make_tensor_value_info("n", TensorProto.FLOAT, [2, 6, 8, 8]))
    _, report = fold_model(model)
    assert not report.folded and "'n' is a graph output" in report.declined[0].reason


def test_input_affine_math_against_torch():
    """W' and b' against torch evaluating BN then a grouped, strided Conv in float64."""
    rng = np.random.default_rng(5)
    model = bn_conv_model(groups=2, strides=2, dtype="float64")
    folded, _ = fold_model(model)
    x = rng.uniform(-1, 1, (2, 6, 8, 8))
    np.testing.assert_allclose(torch_run(folded, x), torch_run(model, x), rtol=1e-10, atol=1e-10)
    gamma, beta, mean, var = bn_stats(rng, 6, np.float64)
    scale, shift = bn_affine(gamma, beta, mean, var, 1e-3)
    w = rng.normal(size=(4, 3, 1, 1))
    w2, b2 = fold_input_affine(w, None, scale, shift, 2)
    w2 = np.asarray(w2)
    # 1x1 grouped conv by hand: output m of group g reads channels 3g..3g+2
    for m in range(4):
        cs = slice(3 * (m // 2), 3 * (m // 2) + 3)
        np.testing.assert_allclose(w2[m, :, 0, 0], w[m, :, 0, 0] * scale[cs])
        np.testing.assert_allclose(b2[m], (w[m, :, 0, 0] * shift[cs]).sum())


def test_disable_bn_conv():
    _, report = fold_model(bn_conv_model(), disable=["bn_conv"])
    assert not report.folded
