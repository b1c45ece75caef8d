"""Verification on the CUDA execution provider, as a user runs it (`--providers cpu,cuda`).

Skipped, with the reason, where onnxruntime has no CUDAExecutionProvider (the CPU build, which CI
and the development machines have). tools/gpu_check.sh runs these on a machine with a GPU.
"""

import json

import onnx
import onnxruntime as ort
import pytest

import checks
from builders import count

MODELS = sorted(checks.MODELS.glob("*.onnx"))

pytestmark = pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                                reason="CUDAExecutionProvider is not available in this onnxruntime build")


@pytest.mark.parametrize("path", MODELS, ids=[p.stem for p in MODELS])
def test_every_model_verifies_on_cuda_from_the_command_line(tmp_path, path):
    out = tmp_path / path.name
    report = tmp_path / "report.json"
    proc = checks.cli(path, out, "--providers", "cpu,cuda", "--report", report)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    onnx.checker.check_model(str(out), full_check=True)
    assert count(onnx.load(out), "BatchNormalization") == data["bn_after"]
    if data["folded"]:
        providers = data["verification"]["providers"]
        assert [p["provider"] for p in providers] == ["cpu", "cuda"]
        assert providers[1]["engine"].startswith("onnxruntime CUDAExecutionProvider"), providers[1]
        assert all(o["passed"] for p in providers for o in p["outputs"])


def test_chain_with_large_weights_verifies_on_cuda(tmp_path):
    from test_chains_cli import chain_model

    src = tmp_path / "chain.onnx"
    onnx.save(chain_model("conv_mul_bn_sub", channels=128, kernel=5), src)
    proc = checks.cli(src, tmp_path / "o.onnx", "--providers", "cuda", "--external-data", "always")
    assert proc.returncode == 0, proc.stderr
    assert "verify on cuda (onnxruntime CUDAExecutionProvider" in proc.stderr
