"""Conv/ConvTranspose -> BatchNormalization: every configuration folds, and the result is equivalent.

Equivalence is checked with onnxfold.verify (onnxruntime, optimizations off; default tolerances:
|diff| <= atol + rtol*|ref| with atol = 1e-4 * max|ref|, rtol = 1e-4 for float32, 1e-2 for float16)
and, for float64 and bfloat16 (no onnxruntime CPU kernel), against torch evaluating both graphs in
float64: the folded weights are rounded once to the model's dtype, so the allowed error is that
rounding, relative to the output's scale: 1e-10 for float64, 2e-2 for bfloat16 (8-bit mantissa).
"""

import numpy as np
import onnx
import pytest

from builders import conv_bn_model, count, np_dtype, torch_run
from onnxfold import fold_model, verify

DIMS = [1, 2, 3]
GROUPS = [1, 2, "depthwise"]


def _channels(groups):
    # depthwise: groups == cin == cout
    return (6, 6, 6) if groups == "depthwise" else (4, 6, groups)


def assert_folded(model, n=1):
    folded, report = fold_model(model)
    assert len(report.folded) == n, report.summary()
    assert not report.declined, report.summary()
    assert count(folded, "BatchNormalization") == count(model, "BatchNormalization") - n
    onnx.checker.check_model(folded, full_check=True)
    return folded, report


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("groups", GROUPS)
@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("transpose", [False, True], ids=["Conv", "ConvTranspose"])
def test_fold_in_onnxruntime(transpose, dims, groups, bias, dtype):
    cin, cout, g = _channels(groups)
    model = conv_bn_model(dims=dims, transpose=transpose, groups=g, cin=cin, cout=cout, bias=bias, dtype=dtype,
                          spatial=5 if dims == 3 else 7)
    folded, report = assert_folded(model)
    assert report.folded[0].rule == ("convtranspose_bn" if transpose else "conv_bn")
    assert report.folded[0].dtype == dtype
    conv = [n for n in folded.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    assert len(conv) == 1 and conv[0].output[0] == "y" and len(conv[0].input) == 3
    result = verify(model, folded)
    assert result, str(result)
    assert result.results[0].engine.startswith("onnxruntime")


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("groups", GROUPS)
@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("transpose", [False, True], ids=["Conv", "ConvTranspose"])
def test_fold_float64_bfloat16_against_torch(transpose, dims, groups, bias, dtype):
    cin, cout, g = _channels(groups)
    opset = 22 if dtype == "bfloat16" else 17  # Conv takes bfloat16 from opset 22
    model = conv_bn_model(dims=dims, transpose=transpose, groups=g, cin=cin, cout=cout, bias=bias, dtype=dtype,
                          opset=opset, spatial=5)
    folded, report = assert_folded(model)
    w = next(t for t in folded.graph.initializer if t.name == report.folded[0].weight)
    assert w.data_type == model.graph.initializer[0].data_type  # cast back to the model's dtype
    x = np.random.default_rng(0).uniform(-1, 1, (1, cin) + (5,) * dims).astype(np_dtype(dtype))
    want, got = torch_run(model, x), torch_run(folded, x)
    scale = np.abs(want).max()
    tol = 1e-10 if dtype == "float64" else 2e-2
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * scale)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(strides=2),
        dict(dilations=2, spatial=9),
        dict(pads=1),
        dict(pads=2, strides=2, dilations=2, spatial=11),
        dict(auto_pad="SAME_UPPER"),
        dict(auto_pad="SAME_LOWER", strides=2),
        dict(auto_pad="VALID"),
        dict(kernel=1),
        dict(transpose=True, strides=2, output_padding=1),
        dict(transpose=True, strides=3, pads=1, output_padding=2, groups=2),
        dict(transpose=True, dilations=2, pads=1),
        dict(transpose=True, auto_pad="SAME_UPPER", strides=2),
        dict(batch="N", groups=2),
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
def test_fold_any_geometry(kwargs):
    model = conv_bn_model(**kwargs)
    folded, _ = assert_folded(model)
    result = verify(model, folded, input_shapes={"x": (2, 4, 6, 6)} if kwargs.get("batch") else None)
    assert result, str(result)


def test_float64_verify_falls_back_to_onnx_reference():
    model = conv_bn_model(dtype="float64")
    folded, _ = assert_folded(model)
    result = verify(model, folded)
    assert result, str(result)
    assert result.results[0].engine == "onnx.reference"
    assert "no CPU kernel" in result.results[0].note


def test_float16_data_with_float32_statistics_folds_into_float16():
    """BatchNormalization-15 allows float16 X with float32 scale/bias/mean/var."""
    model = conv_bn_model(dtype="float16", stats_dtype="float32", opset=15)
    onnx.checker.check_model(model, full_check=True)
    folded, report = assert_folded(model)
    assert report.folded[0].dtype == "float16"
    new = {t.name: t for t in folded.graph.initializer}
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    assert new[conv.input[1]].data_type == onnx.TensorProto.FLOAT16
    assert new[conv.input[2]].data_type == onnx.TensorProto.FLOAT16
    x = np.random.default_rng(0).uniform(-1, 1, (1, 4, 6, 6)).astype(np.float16)
    np.testing.assert_allclose(torch_run(folded, x), torch_run(model, x), atol=1e-2 * np.abs(torch_run(model, x)).max())


@pytest.mark.parametrize(
    "opset,attrs",
    [
        (6, {"is_test": 1}),
        (6, {"is_test": 1, "spatial": 1}),
        (7, {}),
        (7, {"spatial": 1}),
        (9, {}),
        (14, {}),
        (14, {"training_mode": 0}),
        (15, {"training_mode": 0}),
        (17, {}),
    ],
)
def test_every_batchnorm_opset(opset, attrs):
    model = conv_bn_model(opset=opset, bn_attrs=attrs)
    folded, _ = assert_folded(model)
    x = np.random.default_rng(0).uniform(-1, 1, (1, 4, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(torch_run(folded, x), torch_run(model, x), rtol=1e-5, atol=1e-5)
    if opset >= 7:
        assert verify(model, folded)


def test_default_epsilon_when_the_attribute_is_absent():
    model = conv_bn_model(epsilon=None)
    folded, _ = assert_folded(model)
    # var tiny: eps = 1e-5 matters; a fold with eps = 0 or 1e-3 would be visibly wrong.
    var = next(t for t in model.graph.initializer if t.name == "var")
    var.CopyFrom(onnx.numpy_helper.from_array(np.full(6, 2e-5, np.float32), "var"))
    folded, _ = assert_folded(model)
    x = np.random.default_rng(0).uniform(-1, 1, (1, 4, 6, 6)).astype(np.float32)
    want = torch_run(model, x)
    np.testing.assert_allclose(torch_run(folded, x), want, atol=1e-5 * np.abs(want).max())
    assert verify(model, folded)


def test_default_epsilon_is_the_float32_attribute_value():
    """The epsilon attribute is a float32, so its default is float32(1e-5) = 9.99999974738e-06, as a
    written 1e-5 reads back and as onnxruntime uses it: a float64 fold with the absent attribute and one
    with epsilon written out give the same weights to the last bit (the double 1e-5 was 4.6e-12 off)."""
    absent, _ = assert_folded(conv_bn_model(dtype="float64", epsilon=None, opset=13))
    written, _ = assert_folded(conv_bn_model(dtype="float64", epsilon=1e-5, opset=13))
    for a, b in zip(absent.graph.initializer, written.graph.initializer):
        assert a.name == b.name
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))


def test_weights_from_constant_nodes_paddle_style():
    """PaddlePaddle exports have no initializers: every weight is a Constant node."""
    model = conv_bn_model(constants_as_nodes=True)
    assert not model.graph.initializer
    folded, _ = assert_folded(model)
    assert [n.op_type for n in folded.graph.node] == ["Conv"], "unused Constant nodes must be swept"
    assert verify(model, folded)
