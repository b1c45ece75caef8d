"""Verification of each fold where it happens, the onnx.reference fallback, crashes of onnxruntime, and
inputs that prove nothing (issue 9 defects 2, 4, 5, 8; issue 10 "verification blind spots").
Every test here fails on eadbfe9."""

import importlib
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import bn_stats, conv_bn_model, tensor
from checks import MODELS, child_env, cli
from onnxfold import VerifyError, fold_model, verify
from onnxfold.verification import annotate, batch_norm, make_inputs

planning = importlib.import_module("onnxfold.verification.planning")
reference = importlib.import_module("onnxfold.verification.reference")

def _set(model, name, array):
    t = next(t for t in model.graph.initializer if t.name == name)
    t.CopyFrom(numpy_helper.from_array(np.asarray(array, dtype=numpy_helper.to_array(t).dtype), name))


def _get(model, name):
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name)).copy()


# -- defect 2: dim_value -1 ------------------------------------------------------------------------------


def test_negative_dim_value_is_dynamic_and_named_in_the_warning():
    """paddle2onnx writes dim_value -1 for a dynamic axis: it crashed make_inputs ('negative dimensions')."""
    model = conv_bn_model()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_value = -1
    dims[2].dim_value = -1
    warnings = []
    feeds = make_inputs(model, warn=warnings.append)
    assert feeds["x"].shape == (1, 4, 32, 6)
    assert any("axis 0 is dynamic (dim_value -1): using 1" in w for w in warnings)
    assert any("axis 2 is dynamic (dim_value -1): using 32" in w for w in warnings)
    folded, report = fold_model(model)
    assert verify(model, folded, folds=report.folded)
    assert verify(model, folded, input_shapes={"x": (2, 4, 9, 6)}).results[0].outputs[0].shape == (2, 6, 7, 4)


# -- defect 4: BatchNormalization in the onnx.reference fallback -----------------------------------------


def _np_bn(x, gamma, beta, mean, var, eps, stat_shape):
    """The spec's inference formula, in float64 NumPy."""
    r = [np.asarray(a, np.float64).reshape(stat_shape) for a in (gamma, beta, mean, var)]
    return (x.astype(np.float64) - r[2]) / np.sqrt(r[3] + eps) * r[0] + r[1]


@pytest.mark.parametrize("opset,attrs,outputs", [
    (6, {"is_test": 1}, 1), (6, {"is_test": 1, "epsilon": 0.25}, 1), (7, {}, 1), (7, {"spatial": 0}, 1),
    (8, {"epsilon": 1e-3}, 1), (9, {}, 1), (9, {}, 5), (13, {"momentum": 0.5}, 1), (14, {}, 1),
    (15, {"epsilon": 0.1}, 1),
])
def test_reference_batchnorm_is_the_spec_in_inference_mode(opset, attrs, outputs):
    """onnx.reference's own BatchNormalization-9..13 normalizes with batch statistics, and -6/7 raises;
    the fallback's must equal the spec's formula (default epsilon 1e-5, spatial=0 per activation,
    optional outputs given as "" are absent)."""
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(opset)
    x = rng.normal(0.4, 2.0, (2, 3, 4, 5))
    spatial = attrs.get("spatial", 1)
    stat_shape = (1, 3, 4, 5) if not spatial else (1, 3, 1, 1)
    n = int(np.prod(stat_shape))
    gamma, beta, mean, var = (a.astype(np.float64) for a in bn_stats(rng, n))
    names = ["gamma", "beta", "mean", "var"]
    inits = [tensor(k, v.reshape(stat_shape[1:]) if not spatial else v)
             for k, v in zip(names, (gamma, beta, mean, var))]
    if opset == 15:  # BatchNormalization-15: float32 statistics for float64 data
        inits[2:] = [tensor(k, v.astype(np.float32)) for k, v in zip(names[2:], (mean, var))]
    node = helper.make_node("BatchNormalization", ["x", *names], ["y"] + [""] * (outputs - 1), **attrs)
    graph = helper.make_graph([node], "bn", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    (y,) = ReferenceEvaluator(model, new_ops=reference.reference_ops()).run(None, {"x": x})
    means = mean.astype(np.float32) if opset == 15 else mean
    varis = var.astype(np.float32) if opset == 15 else var
    expected = _np_bn(x, gamma, beta, means, varis, float(np.float32(attrs.get("epsilon", 1e-5))), stat_shape)
    np.testing.assert_allclose(y, expected, rtol=1e-14, atol=1e-14)


def test_reference_batchnorm_training_mode_uses_batch_statistics():
    """BatchNormalization-14 with training_mode=1: Y from the batch's mean and population variance, and
    running statistics input * momentum + batch * (1 - momentum), as the spec says."""
    rng = np.random.default_rng(5)
    x = rng.normal(1.0, 3.0, (4, 3, 2, 2))
    gamma, beta, mean, var = (a.astype(np.float64) for a in bn_stats(rng, 3))
    y, rm, rv = batch_norm(x, gamma, beta, mean, var, since=14, outputs=[True, True, True], training_mode=1,
                           momentum=0.8, epsilon=1e-3)
    bm, bv = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    np.testing.assert_allclose(y, _np_bn(x, gamma, beta, bm, bv, 1e-3, (1, 3, 1, 1)), rtol=1e-13)
    np.testing.assert_allclose(rm, mean * 0.8 + bm * 0.2, rtol=1e-13)
    np.testing.assert_allclose(rv, var * 0.8 + bv * 0.2, rtol=1e-13)


@pytest.mark.parametrize("opset", [7, 8, 9, 13, 14, 15])
def test_float64_fold_verifies_in_the_reference_fallback(opset):
    """onnxruntime has no float64 Conv on the CPU, so verification runs in onnx.reference: a correct fold
    failed (opsets 9-13: batch statistics) or could not run (7-8: raise). A planted error still fails."""
    model = conv_bn_model(dtype="float64", opset=opset, epsilon=None, batch=2)
    folded, report = fold_model(model)
    assert len(report.folded) == 1
    result = verify(model, folded, folds=report.folded)
    assert result, str(result)
    assert result.results[0].engine == "onnx.reference"
    assert result.results[0].folds[0].max_rel < 1e-10
    wrong = onnx.ModelProto()
    wrong.CopyFrom(folded)
    b = _get(wrong, "b_folded")
    b[2] *= 1 + 1e-6
    _set(wrong, "b_folded", b)
    assert not verify(model, wrong, folds=report.folded)
    assert not verify(model, wrong)


def test_float64_fold_through_the_command_line(tmp_path):
    """The command line exited 1 (opset 9-13) or 2 (opset 7-8) on a correct float64 fold."""
    for opset in (8, 9):
        src = tmp_path / f"m{opset}.onnx"
        onnx.save(conv_bn_model(dtype="float64", opset=opset), src)
        proc = cli(src, tmp_path / f"o{opset}.onnx")
        assert proc.returncode == 0, proc.stderr
        assert "onnx.reference" in proc.stderr and "verification passed" in proc.stderr


# -- defect 5: onnxruntime crashes ---------------------------------------------------------------------


def _segv_model(path):
    """BatchNormalization-9 with outputs [Y, "", "", "", ""]: valid ONNX (the optional outputs are
    absent) on which onnxruntime 1.32 segfaults."""
    model = conv_bn_model(opset=9)
    model.graph.node[-1].output.extend([""] * 4)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return model


def _ort_crashes(path) -> bool:
    code = ("import onnxruntime as ort, numpy as np; so = ort.SessionOptions(); "
            "so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL; "
            f"s = ort.InferenceSession({str(path)!r}, so, providers=['CPUExecutionProvider']); "
            "s.run(None, {'x': np.zeros((1, 4, 6, 6), np.float32)})")
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode < 0


@pytest.fixture
def segv(tmp_path):
    path = tmp_path / "in" / "segv.onnx"
    path.parent.mkdir()
    model = _segv_model(path)
    if not _ort_crashes(path):
        pytest.skip("this onnxruntime does not crash on BatchNormalization-9 with empty optional outputs")
    return path, model


def test_crash_of_onnxruntime_is_a_verify_error_in_the_api(segv):
    """The whole process died with SIGSEGV; now the worker process dies and verify says so."""
    path, model = segv
    folded, report = fold_model(model)
    with pytest.raises(VerifyError, match=r"onnxruntime crashed \(signal 11, SIGSEGV\) running the original "
                                          r"model on cpu"):
        verify(model, folded, folds=report.folded)
    with pytest.raises(VerifyError, match="onnxruntime crashed"):
        verify(str(path), folded)
    good = conv_bn_model()  # the next call starts a fresh worker
    assert verify(good, fold_model(good)[0])


@pytest.mark.parametrize("worker", ["fork", "spawn"])
def test_crash_of_onnxruntime_on_the_command_line(segv, tmp_path, worker):
    path, _ = segv
    out = tmp_path / "o.onnx"
    proc = cli(path, out, env={"ONNXFOLD_VERIFY_WORKER": worker})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()
    errors = [line for line in proc.stderr.splitlines() if line.startswith("onnxfold: error:")]
    assert len(errors) == 1
    assert "onnxruntime crashed (signal 11, SIGSEGV) running the original model on cpu" in errors[0]


def test_crash_of_onnxruntime_in_folder_mode(segv, tmp_path):
    """One model crashing onnxruntime does not take the folder run down: the others are written."""
    path, _ = segv
    onnx.save(conv_bn_model(), path.parent / "good.onnx")
    out = tmp_path / "out"
    for jobs in ("1", "2"):
        proc = cli(path.parent, out, "-j", jobs)
        assert proc.returncode == 2, proc.stderr
        assert "onnxruntime crashed (signal 11" in proc.stderr and "Traceback" not in proc.stderr
        assert (out / "good.onnx").exists() and not (out / "segv.onnx").exists()


def test_command_line_does_not_import_onnxruntime_in_its_own_process(tmp_path):
    """Verification forks its child only where that is safe: the parent never imported onnxruntime."""
    code = ("import sys; from onnxfold.cli import main; code = main(sys.argv[1:]); "
            "assert 'onnxruntime' not in sys.modules, 'imported'; raise SystemExit(code)")
    proc = subprocess.run([sys.executable, "-c", code, str(MODELS / "resnet_block.onnx"),
                           str(tmp_path / "o.onnx")], capture_output=True, text=True,
                          env=child_env())
    assert proc.returncode == 0, proc.stderr
    assert "verification passed" in proc.stderr


# -- defect 8 and issue 10: each fold at its own tensor, per channel ---------------------------------------


def _two_scale_model():
    """x -> Conv(2 channels) -> BatchNormalization -> y, channel 0 near 850, channel 1 near 0.02."""
    rng = np.random.default_rng(7)
    w = rng.normal(0, 0.5, (2, 3, 3, 3)).astype(np.float32)
    b = rng.normal(0, 0.5, 2).astype(np.float32)
    gamma, beta, mean, var = bn_stats(rng, 2)
    gamma *= np.array([2.0, 0.002], np.float32)
    beta = np.array([850.0, 0.02], np.float32) + beta * np.array([1.0, 0.001], np.float32)
    inits = [tensor("w", w), tensor("b", b), tensor("gamma", gamma), tensor("beta", beta), tensor("mean", mean),
             tensor("var", var)]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"], name="bn")]
    graph = helper.make_graph(nodes, "two_scales",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_a_fold_that_flips_a_small_channel_fails_per_channel():
    """Per output, atol = 1e-4 * 850 hid a sign flip of the channel near 0.02 (error 0.04)."""
    model = _two_scale_model()
    folded, report = fold_model(model)
    assert verify(model, folded, folds=report.folded)
    y = verify(model, folded).results[0]  # the scales are as the test says
    wrong = onnx.ModelProto()
    wrong.CopyFrom(folded)
    w, b = _get(wrong, "w_folded"), _get(wrong, "b_folded")
    w[1], b[1] = -w[1], -b[1]
    _set(wrong, "w_folded", w)
    _set(wrong, "b_folded", b)
    assert verify(model, wrong), "the blind spot this guards: per output it passes"
    assert y.outputs[0].atol > 0.05
    result = verify(model, wrong, folds=report.folded)
    assert not result
    check = result.results[0].folds[0]
    assert check.name == "y" and not check.passed and check.channel == 1
    assert 0.02 < check.max_abs < 0.08 and check.atol < 0.01
    assert "worst fold tensor 'y'" in str(result) and "at channel 1" in str(result)
    annotate(report.folded, result)
    f = report.folded[0]
    assert f.output == "y" and f.passed is False and f.max_abs == check.max_abs and f.atol == check.atol


FLIP = """
import sys
import numpy as np
import onnxfold.rules.consumers as rules
real = rules.bn_affine
def flipped(*args):                      # the planted bug: channel 1 of every BatchNormalization negated
    scale, shift = real(*args)
    scale, shift = np.array(scale, copy=True), np.array(shift, copy=True)
    scale[1], shift[1] = -scale[1], -shift[1]
    return scale, shift
rules.bn_affine = flipped
from onnxfold.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def test_a_flipped_channel_fails_on_the_command_line_and_the_report_says_where(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(_two_scale_model(), src)
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-c", FLIP, str(src), str(out), "--report", str(report), "-v"],
                          capture_output=True, text=True, env=child_env())
    assert proc.returncode == 1, proc.stderr
    assert "verification FAILED: worst fold tensor 'y'" in proc.stderr and not out.exists()
    data = json.loads(report.read_text())
    (f,) = data["folded"]
    assert f["output"] == "y" and f["passed"] is False and f["max_abs"] > f["atol"]
    assert "fold conv_bn conv + bn [main] -> y: max abs" in proc.stderr and "FAILED" in proc.stderr
    proc = cli(src, out, "--report", report)
    assert proc.returncode == 0, proc.stderr
    (f,) = json.loads(report.read_text())["folded"]
    assert f["passed"] is True and 0 < f["max_abs"] <= f["atol"] and f["note"] == ""


def _sigmoid_model(seed=0):
    """PaddleOCR's detector ends in a Sigmoid of very negative logits: x -> Conv -> BN (large, the
    scale of the network) -> Relu -> Conv -> BN (logits near -16) -> Sigmoid (about 1e-7)."""
    rng = np.random.default_rng(seed)
    inits, nodes, x = [], [], "x"
    for i, (cin, cout, gain, shift) in enumerate([(8, 8, 20.0, 5.0), (8, 4, 1e-4, -16.0)]):
        gamma, beta, mean, var = bn_stats(rng, cout)
        p = f"l{i}_"
        inits += [tensor(p + "w", rng.normal(0, 1.0, (cout, cin, 3, 3)).astype(np.float32)),
                  tensor(p + "b", rng.normal(0, 0.5, cout).astype(np.float32)),
                  tensor(p + "gamma", (gamma * gain).astype(np.float32)),
                  tensor(p + "beta", (beta + shift).astype(np.float32)),
                  tensor(p + "mean", mean), tensor(p + "var", var)]
        nodes += [helper.make_node("Conv", [x, p + "w", p + "b"], [p + "c"], pads=[1] * 4),
                  helper.make_node("BatchNormalization", [p + "c", *(p + k for k in ("gamma", "beta", "mean", "var"))],
                                   [p + "bn"])]
        x = p + "bn"
        if i == 0:
            nodes.append(helper.make_node("Relu", [x], ["l0_relu"]))
            x = "l0_relu"
    nodes.append(helper.make_node("Sigmoid", [x], ["prob"]))
    graph = helper.make_graph(nodes, "sigmoid_tail",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
                              [helper.make_tensor_value_info("prob", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_output_far_below_its_fold_tensors_does_not_turn_rounding_into_a_failure(seed):
    model = _sigmoid_model(seed)
    folded, report = fold_model(model)
    assert len(report.folded) == 2
    plain = verify(model, folded)
    out = plain.results[0].outputs[0]
    assert out.atol < 1e-10 and 0 < out.max_abs < 1e-6  # its own scale: rounding looks like a failure
    result = verify(model, folded, folds=report.folded)
    assert result, str(result)
    o = result.results[0].outputs[0]
    assert o.max_abs == out.max_abs and o.atol > 100 * o.max_abs and "fold tensors feeding it" in o.note
    assert [f.name for f in result.results[0].folds] == ["l0_bn", "l1_bn"]


def test_an_output_far_below_its_fold_tensors_still_catches_a_wrong_fold():
    model = _sigmoid_model()
    folded, report = fold_model(model)
    wrong = onnx.ModelProto()
    wrong.CopyFrom(folded)
    b = _get(wrong, report.folded[1].weight.replace("w_folded", "b_folded"))
    b[0] += 1.0  # logits of channel 0 one higher: Sigmoid e times larger
    _set(wrong, report.folded[1].weight.replace("w_folded", "b_folded"), b)
    result = verify(model, wrong, folds=report.folded)
    assert not result
    assert [f.passed for f in result.results[0].folds] == [True, False]
    # the failed fold takes the floor away: the output is back on its own scale, and fails too
    assert not result.results[0].outputs[0].passed and "fold tensors" not in result.results[0].outputs[0].note


def test_chain_links_are_checked_at_the_last_tensor_of_the_chain():
    """Conv -> Mul -> BN: the Mul's fold writes a tensor the BN's fold rewrites again."""
    model = conv_bn_model()
    g = model.graph
    g.initializer.append(tensor("s", np.random.default_rng(1).uniform(0.5, 2, (1, 6, 1, 1)).astype(np.float32)))
    g.node.insert(1, helper.make_node("Mul", ["c", "s"], ["m"], name="mul"))
    g.node[2].input[0] = "m"
    folded, report = fold_model(model)
    assert [f.output for f in report.folded] == ["m", "y"]
    result = verify(model, folded, folds=report.folded)
    assert result and [f.name for f in result.results[0].folds] == ["y"]
    annotate(report.folded, result)
    first, last = report.folded
    assert first.passed is None and "rewritten again by a later fold" in first.note
    assert last.passed is True and last.max_abs is not None and not result.notes


def test_folds_in_subgraphs_are_covered_by_the_outputs_and_the_result_says_so():
    from test_subgraphs import _if_model

    model = _if_model()
    folded, report = fold_model(model)
    assert len(report.folded) == 2 and all(f.graph != "main" for f in report.folded)
    feeds = {**make_inputs(model), "cond": np.array(True)}
    result = verify(model, folded, inputs=feeds, folds=report.folded)
    assert result and not result.results[0].folds
    assert any("2 fold(s) could not be compared at their own tensors" in n for n in result.notes)
    assert "note: 2 fold(s)" in str(result)
    annotate(report.folded, result)
    assert all(f.passed is None and "inside a subgraph" in f.note for f in report.folded)


def test_folds_are_exposed_in_models_with_external_data(tmp_path):
    """File inputs with external data: the extra outputs are added to the serialized model, and
    onnxruntime reads the weights from the model's own folder."""
    src = MODELS / "resnet_block_extdata.onnx"
    model = onnx.load(str(src))
    folded, report = fold_model(model)
    out = tmp_path / "folded.onnx"
    onnx.save(folded, out, save_as_external_data=True, all_tensors_to_one_file=True, location="folded.data",
              size_threshold=0)
    result = verify(src, out, folds=report.folded)
    assert result, str(result)
    assert len(result.results[0].folds) == len(report.folded) == 10


def test_per_fold_exposure_is_skipped_with_a_note_near_the_protobuf_limit(monkeypatch):
    model = conv_bn_model()
    model.graph.node.append(helper.make_node("Relu", ["y"], ["z"]))
    model.graph.output[0].name = "z"
    folded, report = fold_model(model)
    assert len(verify(model, folded, folds=report.folded).results[0].folds) == 1
    monkeypatch.setattr(planning, "PROTOBUF_LIMIT", model.ByteSize() + 4)
    result = verify(model, folded, folds=report.folded)
    assert result and not result.results[0].folds
    assert any("2 GiB" in n for n in result.notes)


# -- issue 10: nothing compared ------------------------------------------------------------------------


def test_a_batch_fixed_at_zero_proves_nothing(tmp_path):
    """It printed "verification passed" after comparing no elements: now a VerifyError (exit 2, nothing
    written): verification could not run, which is neither a pass nor a mismatch (exit 1)."""
    model = conv_bn_model(batch=0)
    folded, report = fold_model(model)
    with pytest.raises(VerifyError, match="nothing to compare on cpu: every output has 0 elements"):
        verify(model, folded, folds=report.folded)
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(model, src)
    proc = cli(src, out)
    assert proc.returncode == 2 and "nothing to compare" in proc.stderr and not out.exists()
    assert "verification passed" not in proc.stderr
    assert cli(src, out, "--no-verify").returncode == 0 and out.exists()


def test_a_model_onnxruntime_refuses_with_extra_outputs_is_verified_without_them(monkeypatch):
    """Should onnxruntime refuse the models with the fold tensors added as outputs, verification runs as
    before (graph outputs alone, each at its own scale) and says so, rather than fail or fall back."""
    model = conv_bn_model()
    model.graph.node.append(helper.make_node("Relu", ["y"], ["z"]))
    model.graph.output[0].name = "z"
    folded, report = fold_model(model)
    monkeypatch.setitem(planning.ELEM_TYPES, "float32", TensorProto.DOUBLE)  # a wrong declared type
    result = verify(model, folded, folds=report.folded)
    assert result and not result.results[0].folds
    assert result.results[0].engine.startswith("onnxruntime")
    assert "could not be added as outputs" in result.results[0].note


@pytest.mark.parametrize("weights_inside", [True, False])
def test_folds_in_functions_are_covered_by_the_outputs_and_the_result_says_so(weights_inside):
    """A fold in a function body, or in an inlined call (its tensor is not in the original's main
    graph), cannot be exposed in both models: the outputs cover it, at their own scale, and the
    report says why for each fold."""
    from test_functions import function_model

    model = function_model(weights_inside)
    folded, report = fold_model(model)
    result = verify(model, folded, folds=report.folded)
    assert result and not result.results[0].folds
    assert any(f"{len(report.folded)} fold(s) could not be compared" in n for n in result.notes)
    annotate(report.folded, result)
    why = "inside a function" if weights_inside else "an inlined function"
    assert report.folded and all(f.passed is None and why in f.note for f in report.folded)


@pytest.mark.parametrize("name", ["resnet_block.onnx", "resnet_block_extdata.onnx", "mobilenetv2_fp16.onnx"])
def test_node_outputs_read_from_the_wire_format_match_the_parsed_model(name):
    """The folded file's tensor names are read without parsing its weights: the same set as onnx.load's."""
    path = MODELS / name
    model = onnx.load(str(path), load_external_data=False)
    names = planning.main_outputs(str(path))
    assert names == planning.main_outputs(model) and len(names) == len(model.graph.node) > 5


def test_a_fold_whose_tensor_a_later_fold_changes_again_is_not_compared_there():
    """ConvNeXt (corpus hf/convnext_legacy) failed verification falsely: mul_matmul folded GELU's
    x * 0.5 into the MatMul, then linear_mul folded the layer scale (1e-6) into the same MatMul (+ bias),
    whose output keeps its name. The first fold's tensor no longer holds the original values; the second
    fold's tensor, downstream, holds both, and the graph outputs cover the first."""
    rng = np.random.default_rng(7)
    d = 16
    w = numpy_helper.from_array(rng.normal(0, 0.2, (d, d)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.normal(0, 0.2, d).astype(np.float32), "b")
    gamma = numpy_helper.from_array((rng.uniform(0.5, 1.5, d) * 1e-6).astype(np.float32), "gamma")
    half = numpy_helper.from_array(np.array(0.5, np.float32), "half")
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Mul", ["r", "half"], ["h"]),
             helper.make_node("MatMul", ["h", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["a"]),
             helper.make_node("Mul", ["a", "gamma"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 5, d])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 5, d])],
                              [w, b, gamma, half])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folded, report = fold_model(model)
    assert sorted(f.rule for f in report.folded) == ["linear_mul", "mul_matmul"]
    assert [n.op_type for n in folded.graph.node] == ["Relu", "MatMul", "Add"]
    result = verify(model, folded, folds=report.folded)
    assert result, str(result)
    annotate(report.folded, result)
    first = next(f for f in report.folded if f.rule == "mul_matmul")
    assert first.passed is None and "changed again in place by a later fold (linear_mul)" in first.note
    assert next(f for f in report.folded if f.rule == "linear_mul").passed
