"""Every model in models/ folds as its manifest says, and the result matches the original."""

import json

import onnx
import pytest

from builders import count
from checks import MODELS
from onnxfold import fold_model, verify
from onnxfold.load import load

MANIFEST = json.loads((MODELS / "manifest.json").read_text())


@pytest.mark.parametrize("entry", MANIFEST, ids=lambda e: e["file"])
def test_model_folds_as_the_manifest_says(entry):
    _, external = load(MODELS / entry["file"])  # lazy: external data stays on disk
    assert external == bool(entry["data_file"])
    model = onnx.load(MODELS / entry["file"])  # everything in memory, to verify from ModelProtos
    assert count(model, "BatchNormalization") == entry["bn_total"]
    folded, report = fold_model(model)
    # Every Conv/ConvTranspose/Gemm/MatMul -> BN pair whose producer output has one reader folds; a
    # block of a real architecture (BN behind a layout op, a Concat, a Split, before a Gemm) says what
    # it expects in expect_folds and expect_bn_after (tools/make_models.py).
    direct = entry["conv_bn"] + entry["gemm_bn"]
    assert len(report.folded) == entry.get("expect_folds", direct), report.summary()
    assert report.bn_after == entry.get("expect_bn_after", entry["bn_total"] - direct)
    onnx.checker.check_model(folded)
    result = verify(model, folded)
    assert result, str(result)
