"""examples/pipeline.py, the README's worked export pipeline (torch -> ONNX -> onnxfold -> quantize_static),
runs; its structural claims hold, and the README's table says the same.

The int8 errors are not compared with numbers: only that the folded model's mean error is below the
unfolded one's and its max abs error not above it (+5%), which held for every seed from 0 to 13 (the
smallest gap in mean error was 10%; README, "In an export pipeline")."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BN = 6  # TinyNet's BatchNormalization layers


def _example():
    pytest.importorskip("torch")
    pytest.importorskip("onnxscript")  # the dynamo exporter
    spec = importlib.util.spec_from_file_location("pipeline_example", ROOT / "examples" / "pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _readme_rows() -> dict[str, list[str]]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- pipeline-numbers:start -->\n(.*?)\n<!-- pipeline-numbers:end -->", text, re.S)
    assert block, "README has no pipeline-numbers block"
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in block.group(1).splitlines()[2:]]
    return {r[0]: r for r in rows}


def test_pipeline_example_runs_and_folding_comes_first(tmp_path):
    rows = {r["model"]: r for r in _example().run(tmp_path)}
    assert list(rows) == ["dynamo", "dynamo folded", "legacy", "legacy folded"]
    readme = _readme_rows()
    for exporter in ("dynamo", "legacy"):
        unfolded, folded = rows[exporter], rows[f"{exporter} folded"]
        assert (unfolded["bn_to_quantizer"], unfolded["bn_in_quantized"]) == (BN, BN)
        assert (folded["bn_to_quantizer"], folded["bn_in_quantized"]) == (0, 0)
        assert unfolded["float_max_abs"] == 0  # the reference is this model itself
        assert folded["float_max_abs"] <= 1e-4 * folded["scale"]  # float32: 1e-4 x the output's scale
        for r in (unfolded, folded):
            assert 0 < r["mean_rel"] < 0.05, r  # quantized (not exact), and not broken
            assert readme[r["model"]][1:3] == [str(r["bn_to_quantizer"]), str(r["bn_in_quantized"])]
        assert folded["mean_rel"] < unfolded["mean_rel"]
        assert folded["max_abs"] <= 1.05 * unfolded["max_abs"]
