"""A sweep over the onnx package's own backend test models: folding never raises, and every model
onnxruntime can run still produces its stored outputs after folding (tolerance as onnx's backend
tests: rtol 1e-3, atol 1e-7; plus the light IR 3 zoo models)."""

import glob
import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxfold import fold_model

DATA = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")
MODELS = sorted(glob.glob(os.path.join(DATA, "*", "*", "model.onnx")))


def _read(folder, prefix):
    out = []
    for path in sorted(glob.glob(os.path.join(folder, f"{prefix}_*.pb")), key=lambda p: int(p.rsplit("_", 1)[1][:-3])):
        t = onnx.TensorProto()
        with open(path, "rb") as f:
            t.ParseFromString(f.read())
        out.append(numpy_helper.to_array(t))
    return out


def _session(model):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def test_the_sweep_has_models():
    assert len(MODELS) > 100


@pytest.mark.parametrize("path", MODELS, ids=lambda p: os.path.relpath(os.path.dirname(p), DATA))
def test_backend_model_still_produces_its_stored_outputs(path):
    """The folded model gives the stored outputs wherever onnxruntime gives them for the original. Where it
    does not (the installed onnx's data is older than onnxruntime's kernels: DFT and STFT before onnx 1.23),
    the folded model gives the original's outputs in onnxruntime, to the same tolerance."""
    model = onnx.load(path)
    folded, report = fold_model(model)  # must never raise
    onnx.checker.check_model(folded)
    folder = os.path.join(os.path.dirname(path), "test_data_set_0")
    try:
        inputs, expected = _read(folder, "input"), _read(folder, "output")
    except Exception as e:  # noqa: BLE001 - this onnx cannot read its own data (segments before 1.23)
        pytest.skip(f"onnx cannot read the stored data: {str(e).splitlines()[0][:120]}")
    try:
        sess = _session(model)
        feeds = dict(zip([i.name for i in sess.get_inputs()], inputs))
        original = sess.run(None, feeds)
    except Exception as e:  # noqa: BLE001 - onnxruntime cannot run the original: nothing to compare
        pytest.skip(f"onnxruntime cannot run the original: {str(e).splitlines()[0][:120]}")
    got = _session(folded).run(None, feeds)
    assert len(got) == len(expected) == len(original)
    for g, e, o in zip(got, expected, original):
        _same(g, e if _matches(o, e) else o)


def _matches(a, b) -> bool:
    try:
        _same(a, b)
    except AssertionError:
        return False
    return True


def _same(got, want) -> None:
    if np.asarray(want).dtype.kind in "fc":
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-7)
    else:
        np.testing.assert_array_equal(got, want)
