"""A fold tensor small by cancellation: a BatchNormalization whose mean lies far from 0 (its input has a
large offset, post-ReLU activations or an image's pixel values) makes the folded node's ``w'x`` and
``b'`` cancel, so its result is far below the terms it is summed from, and the rounding of the folded
weights is on the scale of the terms. Verification's floor takes that scale from the folded bias
(``Folded.terms``); it failed a correct float16 fold before (found by test_properties: terms near 0.25,
result 1.2e-3, rounding 6.7e-5 > 1e-2 * 1.2e-3). A wrong fold must still fail, in float16 and float32."""

import importlib
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import np_dtype, onnx_dtype
from checks import cli
from onnxfold import fold_model, verify
from onnxfold.driver import terms
from onnxfold.verification import TOLERANCES
from onnxfold.verification.tolerances import floor

OFFSET = 100.0  # the input's values: OFFSET +- 1


def _model(dtype: str, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    cin, cout = 8, 6
    w = rng.normal(0, 0.3, (cout, cin, 1, 1))
    b = rng.normal(0, 1, cout)
    # statistics of z = conv(x) + b for x uniform in OFFSET +- 1: the mean far from 0, the spread small
    mean = OFFSET * w.sum(axis=(1, 2, 3)) + b + rng.normal(0, 0.05, cout)
    var = (w ** 2).sum(axis=(1, 2, 3)) / 3 * rng.uniform(0.8, 1.2, cout)
    gamma = rng.uniform(0.5, 1.5, cout)
    beta = rng.normal(0, 0.1, cout)
    assert (np.abs(mean) > 20 * np.sqrt(var)).all()  # the case: terms far above the result
    t = np_dtype(dtype)
    inits = [numpy_helper.from_array(np.asarray(a, t), n)
             for n, a in (("w", w), ("b", b), ("gamma", gamma), ("beta", beta), ("mean", mean), ("var", var))]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["z"], name="conv"),
             helper.make_node("BatchNormalization", ["z", "gamma", "beta", "mean", "var"], ["y"], name="bn",
                              epsilon=1e-5)]
    graph = helper.make_graph(nodes, "cancel", [helper.make_tensor_value_info("x", onnx_dtype(dtype), [1, cin, 5, 5])],
                              [helper.make_tensor_value_info("y", onnx_dtype(dtype), [1, cout, 5, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])


def _inputs(dtype: str, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.uniform(OFFSET - 1, OFFSET + 1, (1, 8, 5, 5)).astype(np_dtype(dtype))}


def _bias(model: onnx.ModelProto) -> tuple[onnx.TensorProto, np.ndarray]:
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    t = next(t for t in model.graph.initializer if t.name == conv.input[2])
    return t, numpy_helper.to_array(t).astype(np.float64)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_a_correct_fold_of_cancelling_terms_passes(dtype):
    model = _model(dtype)
    folded, report = fold_model(model)
    assert report.bn_after == 0 and len(report.folded) == 1
    fold = report.folded[0]
    _, b2 = _bias(folded)
    np.testing.assert_allclose(fold.terms, np.abs(b2), rtol=1e-3)  # |b'| per channel, from float64
    result = verify(model, folded, inputs=_inputs(dtype), folds=report.folded)
    assert result, result.results[0].folds
    (check,) = result.results[0].folds
    # the result is far below its terms: the tolerance of the channel nearest to it is its bias's floor
    assert check.atol == pytest.approx(floor(dtype) * fold.terms[check.channel])
    assert check.atol > TOLERANCES[dtype][0] * np.abs(b2).max() / 1000


def test_float16_cancellation_failed_before_the_floor_took_the_bias():
    """The same fold, compared as before (no ``terms``): its rounding is past the result's own scale."""
    model = _model("float16")
    folded, report = fold_model(model)
    report.folded[0].terms = None
    result = verify(model, folded, inputs=_inputs("float16"), folds=report.folded)
    assert not result


@pytest.mark.parametrize("dtype,off", [("float16", 0.03), ("float32", 2e-4)])
def test_a_wrong_bias_of_one_channel_still_fails(dtype, off):
    """Off by ``off`` of its own |b'|: 3x float16's floor (1e-2), 26x float32's (64 ulps = 7.6e-6)."""
    model = _model(dtype)
    folded, report = fold_model(model)
    t, b2 = _bias(folded)
    wrong = b2.copy()
    wrong[3] += off * abs(b2[3])
    t.CopyFrom(numpy_helper.from_array(wrong.astype(np_dtype(dtype)), t.name))
    result = verify(model, folded, inputs=_inputs(dtype), folds=report.folded)
    assert not result
    (check,) = result.results[0].folds
    assert not check.passed and check.channel == 3


@pytest.mark.parametrize("dtype,off", [("float16", 0.03), ("float32", 2e-4)])
def test_a_wrong_weight_scale_of_one_channel_still_fails(dtype, off):
    model = _model(dtype)
    folded, report = fold_model(model)
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    t = next(t for t in folded.graph.initializer if t.name == conv.input[1])
    w = numpy_helper.to_array(t).astype(np.float64)
    w[2] *= 1 + off
    t.CopyFrom(numpy_helper.from_array(w.astype(np_dtype(dtype)), t.name))
    result = verify(model, folded, inputs=_inputs(dtype), folds=report.folded)
    assert not result
    assert result.results[0].folds[0].channel == 2


def test_the_command_line_folds_a_float16_model_with_cancelling_terms(tmp_path):
    src, dst, npz = tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / "x.npz"
    onnx.save(_model("float16"), src)
    np.savez(npz, **_inputs("float16"))
    r = cli(src, dst, "--inputs", npz)
    assert r.returncode == 0, r.stderr
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(dst).graph.node}


def test_terms_of_biases_shaped_for_broadcast():
    """A bias along the channel axis whatever its shape; one value where the channels are not one axis."""
    from onnxfold.edit import Edit, NewValue, Update

    def edit(*values):
        return Edit(np.dtype(np.float32), {0: Update({i + 1: NewValue(np.asarray(v, np.float64), what, "h")
                                                      for i, (what, v) in enumerate(values)})})

    np.testing.assert_array_equal(terms(edit(("weight", np.ones((3, 2))), ("bias", [1.0, -2.0, 3.0]))), [1, 2, 3])
    np.testing.assert_array_equal(terms(edit(("shift", [[[-1.0]], [[4.0]]]))), [1, 4])
    np.testing.assert_array_equal(terms(edit(("bias", [[1.0, -5.0], [2.0, 0.5]]))), [5])
    assert terms(edit(("weight", np.ones((3, 2))))) is None


# -- a deep float16 network: each fold compared where its inputs are the original's ----------------------
# Each float16 fold rounds its weights once (about 2.4e-4 relative); through a deep network those
# roundings compound: MobileNetV2-shaped in float16 (52 folds), 2e-4 of a fold tensor's scale at the
# first fold, 2.6e-2 at the last, while the original run in float16 stays within 3e-4 of the same model
# run in float32. A fold tensor that fails the direct comparison is compared again, made by the folded
# model's own nodes from the original's values of their inputs (verification.local); before, every
# float16 MobileNetV2 failed verification (tools/bench.py's page).


@pytest.fixture(scope="module")
def deep_fp16(tmp_path_factory):
    pytest.importorskip("torch")
    import sys

    from checks import ROOT
    out = tmp_path_factory.mktemp("deep")
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import bench_models

        bench_models.make_torch_model("mobilenetv2_fp16", out, quick=True)  # width 0.25, 64x64, 52 BN
    finally:
        sys.path.remove(str(ROOT / "tools"))
    return out / "mobilenetv2_fp16.onnx"


@pytest.mark.parametrize("external", [False, True])
def test_a_deep_float16_network_folds_and_verifies_on_the_command_line(deep_fp16, tmp_path, external):
    src = deep_fp16
    if external:  # the folded nodes' weights are read from the written model's data file
        src = tmp_path / "ext.onnx"
        onnx.save(onnx.load(deep_fp16), src, save_as_external_data=True)
    r = cli(src, tmp_path / "out.onnx", "-v", "--report", tmp_path / "r.json")
    assert r.returncode == 0, r.stdout + r.stderr
    out = onnx.load(tmp_path / "out.onnx", load_external_data=False)
    assert "BatchNormalization" not in {n.op_type for n in out.graph.node}
    assert any(t.data_location == TensorProto.EXTERNAL for t in out.graph.initializer) == external
    notes = [f["note"] for f in json.loads((tmp_path / "r.json").read_text())["folded"]]
    local = sum("compared where its inputs are the original's" in n for n in notes)
    assert local and f"note: {local} of them compared where their inputs are the original's" in r.stdout + r.stderr


def test_the_direct_comparison_alone_failed_the_deep_float16_network(deep_fp16, monkeypatch):
    job = importlib.import_module("onnxfold.verification.job")
    monkeypatch.setattr(importlib.import_module("onnxfold.isolation"), "WORKER", "fork")  # the patch reaches it
    model = onnx.load(deep_fp16)
    folded, report = fold_model(model)
    assert len(report.folded) == 52
    result = verify(model, folded, folds=report.folded)
    assert result
    local = [f for f in result.results[0].folds if "inputs are the original's" in f.note]
    assert local and all(f.needed_atol < f.atol / 5 for f in local)  # its own error: far below its tolerance
    monkeypatch.setattr(job, "compare_locally", lambda *a: {})
    assert not verify(model, folded, folds=report.folded)


@pytest.mark.parametrize("which", [-1, 30])
def test_a_wrong_deep_float16_fold_still_fails(deep_fp16, which):
    """One channel's folded weights 30% off, at the last fold or in the middle of the network. (10% off
    passes on channel 1 of the last fold: its error 0.163 is under float16's floor, 1e-2 of the whole
    tensor's scale 20.4 -- a channel 12 times smaller than the largest, as the floor has always allowed.)"""
    model = onnx.load(deep_fp16)
    folded, report = fold_model(model)
    convs = [n for n in folded.graph.node if n.op_type == "Conv"]
    conv = convs[which]
    t = next(t for t in folded.graph.initializer if t.name == conv.input[1])
    w = numpy_helper.to_array(t).astype(np.float64)
    w[1] *= 1.3
    t.CopyFrom(numpy_helper.from_array(w.astype(np.float16), t.name))
    result = verify(model, folded, folds=report.folded)
    assert not result
    bad = [f for f in result.results[0].folds if not f.passed]
    assert bad[0].name == conv.output[0] and bad[0].channel == 1


def test_the_walk_goes_through_tensors_the_fold_changed():
    """Conv -> Reshape -> BN folded: the Conv's output keeps its name in both models but not its values,
    so the fold tensor is made from x (the original's), through the folded Conv and the Reshape; the
    Relu the fold left alone, and the fold tensor before it, are the original's."""
    local = importlib.import_module("onnxfold.verification.local")
    f32 = TensorProto.FLOAT
    shape = numpy_helper.from_array(np.array([1, 4, 16], np.int64), "shape")
    w = numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "w")
    stats = [numpy_helper.from_array(np.ones(4, np.float32), n) for n in ("g", "b", "m", "v")]
    io = ([helper.make_tensor_value_info("x", f32, [1, 4, 4, 4])], [helper.make_tensor_value_info("y", f32, None)])
    ref = helper.make_model(helper.make_graph([
        helper.make_node("Conv", ["x", "w"], ["F0"]), helper.make_node("Relu", ["F0"], ["a"]),
        helper.make_node("Conv", ["a", "w"], ["z"]), helper.make_node("Reshape", ["z", "shape"], ["r"]),
        helper.make_node("BatchNormalization", ["r", "g", "b", "m", "v"], ["F"]),
        helper.make_node("Relu", ["F"], ["y"])], "ref", *io, [w, shape, *stats]))
    cand = helper.make_model(helper.make_graph([
        helper.make_node("Conv", ["x", "w0_folded", "b0_folded"], ["F0"]), helper.make_node("Relu", ["F0"], ["a"]),
        helper.make_node("Conv", ["a", "w_folded", "b_folded"], ["z"]),
        helper.make_node("Reshape", ["z", "shape"], ["F"]),
        helper.make_node("Relu", ["F"], ["y"])], "cand", *io,
        [shape] + [numpy_helper.from_array(np.ones(s, np.float32), n) for n, s in
                   (("w0_folded", (4, 4, 1, 1)), ("b0_folded", 4), ("w_folded", (4, 4, 1, 1)), ("b_folded", 4))]))
    same = local.same_in_both(ref, cand, {"F0", "F"})
    assert {"x", "F0", "a", "F", "y"} <= same and "z" not in same
    assert local.fold_nodes(cand, "F", same) == ([2, 3], {"a"})
    assert local.fold_nodes(cand, "F0", same) == ([0], {"x"})


def test_a_fold_after_a_wrong_one_passes_on_its_own_inputs_through_layout_ops():
    """x -> Conv -> BN -> Relu -> Conv -> Reshape -> BN: the first fold planted wrong (one channel 1%
    off) fails, and the second fold's tensor, which the first one's error reaches, fails directly but
    passes where its inputs are the original's, made through its folded Conv and the Reshape. The
    verdict is the first fold's failure; the second is not blamed for it."""
    from rulekit import G

    g = G()
    x = g.input("x", [1, 4, 6, 6])
    f1 = g.bn(g.conv(x, 4, 6), 6)
    r = g.node("Reshape", [g.conv(g.node("Relu", [f1]), 6, 6, k=1), g.ints([1, 6, 16])])
    model = g.model(g.bn(r, 6))
    folded, report = fold_model(model)
    assert [f.rule for f in report.folded] == ["conv_bn", "conv_bn"]
    first = next(n for n in folded.graph.node if n.op_type == "Conv")
    t = next(t for t in folded.graph.initializer if t.name == first.input[1])
    w = numpy_helper.to_array(t).copy()
    w[2] *= 1.01
    t.CopyFrom(numpy_helper.from_array(w, t.name))
    result = verify(model, folded, folds=report.folded)
    assert not result
    one, two = result.results[0].folds
    assert not one.passed and one.channel == 2 and "also fails where its inputs are the original's" in one.note
    assert two.passed and two.note.startswith("compared where its inputs are the original's")
    assert two.max_abs < two.atol / 10  # its own rounding only
