"""Verification that passed a wrong model, and the verification child's limits (issue 18 items 5-8, 10,
11). Each test plants a wrong fold (or a stuck or hungry verification) and shows what verification says;
each failed on 0e3a27c."""

import importlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import conv_bn_model
from checks import cli
from onnxfold import VerifyError, fold_model, verify

planning = importlib.import_module("onnxfold.verification.planning")


def _plant(folded, name="w", channel=0, factor=-1.0):
    """One wrong channel in the folded model's weight ``name`` (axis 0: a Conv's output channel)."""
    t = next(t for t in folded.graph.initializer if t.name == name)
    a = numpy_helper.to_array(t).copy()
    a[channel] *= factor
    t.CopyFrom(numpy_helper.from_array(a, name))
    return folded


def _folded_conv_name(folded):
    return next(n.input[1] for n in folded.graph.node if n.op_type == "Conv")


# -- item 5: inputs with nothing finite ------------------------------------------------------------------


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_inputs_prove_nothing(tmp_path, value):
    """All-NaN or all-Inf inputs printed "verification passed ... max abs 0" over a planted wrong fold:
    no finite element was compared. Now a VerifyError (exit 2, nothing written)."""
    model = conv_bn_model()
    folded, report = fold_model(model)
    _plant(folded, _folded_conv_name(folded))
    x = np.full((1, 4, 6, 6), value, np.float32)
    assert not verify(model, folded, folds=report.folded)  # random inputs catch it
    with pytest.raises(VerifyError, match="no finite element"):
        verify(model, folded, folds=report.folded, inputs={"x": x})
    src, out, npz = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "nan.npz"
    onnx.save(model, src)
    np.savez(npz, x=x)
    proc = cli(src, out, "--inputs", npz)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "onnxfold: error: nothing to compare on cpu: no finite element" in proc.stderr
    assert "verification passed" not in proc.stderr and not out.exists()


def test_an_output_with_nothing_finite_says_so():
    """One output all NaN on both sides beside one that is finite: the finite one is the proof, and the
    comparison of the other says it compared nothing."""
    model = conv_bn_model()
    model.graph.node.append(helper.make_node("Log", ["y"], ["l"]))  # NaN where y < 0 ...
    model.graph.node.append(helper.make_node("Sqrt", ["m"], ["s"]))
    model.graph.node.append(helper.make_node("Neg", ["one"], ["m"]))
    model.graph.initializer.append(numpy_helper.from_array(np.ones((1,), np.float32), "one"))
    model.graph.output.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, None))
    folded, report = fold_model(model)
    result = verify(model, folded, folds=report.folded)
    assert result
    s = next(o for o in result.results[0].outputs if o.name == "s")
    assert s.finite == 0 and "no finite element" in s.note


# -- item 7: per channel on the fold's own channel axis --------------------------------------------------


def _linear_mul(rank=3):
    """x[1, 8, 16] -> MatMul W[16, 4] -> Add b -> Mul s: channels on the last axis, scales 0.005 .. 850."""
    rng = np.random.default_rng(7)
    w = rng.normal(0, 0.5, (16, 4)).astype(np.float32)
    b = rng.normal(0, 0.5, 4).astype(np.float32)
    s = np.array([0.005, 850.0, 1.3, -2.1], np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
             helper.make_node("Add", ["mm", "b"], ["lin"], name="add"),
             helper.make_node("Mul", ["lin", "s"], ["y"], name="mul")]
    shape = [1, 8, 16] if rank == 3 else [8, 16]
    graph = helper.make_graph(nodes, "linear_mul", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(a, n) for n, a in (("w", w), ("b", b), ("s", s))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("rank", [3, 2])
def test_a_channel_last_fold_is_compared_per_its_own_channel(rank):
    """A MatMul's channels are on its last axis: compared per axis 1 (the tokens), a flipped channel at
    scale 0.005 beside one at 850 passed. Now each fold is compared per its own channel axis."""
    model = _linear_mul(rank)
    folded, report = fold_model(model)
    assert len(report.folded) >= 1 and report.folded[-1].axis == rank - 1
    assert verify(model, folded, folds=report.folded)
    mm = next(n for n in folded.graph.node if n.op_type in ("MatMul", "Gemm"))
    t = next(t for t in folded.graph.initializer if t.name == mm.input[1])
    a = numpy_helper.to_array(t).copy()
    a[:, 0] *= -1  # channel 0 (scale 0.005) flipped
    t.CopyFrom(numpy_helper.from_array(a, t.name))
    for o in folded.graph.initializer:  # and its bias, so that the channel is all wrong
        if o.name in (n.input[1] for n in folded.graph.node if n.op_type == "Add"):
            v = numpy_helper.to_array(o).copy()
            v[..., 0] *= -1
            o.CopyFrom(numpy_helper.from_array(v, o.name))
    result = verify(model, folded, folds=report.folded)
    assert not result
    bad = [f for f in result.results[0].folds if not f.passed]
    assert bad and bad[0].channel == 0


def test_a_conv_fold_is_still_compared_per_axis_1():
    model = conv_bn_model()
    folded, report = fold_model(model)
    assert report.folded[0].axis == 1
    _plant(folded, _folded_conv_name(folded), channel=2)
    result = verify(model, folded, folds=report.folded)
    assert not result and result.results[0].folds[0].channel == 2
