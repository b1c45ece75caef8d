"""A worked export pipeline: torch -> ONNX -> onnxfold -> verified -> int8 with onnxruntime.quantization.

A small ResNet/MobileNet-like network with six BatchNormalization layers is exported twice:

- with torch's dynamo exporter (``torch.onnx.export(..., dynamo=True, optimize=False)``: with
  ``optimize=True`` onnxscript would fold plain Conv+BN itself), folded through the ``ONNXProgram``
  it returns (in place; ``onnxfold.verify`` compares it with the export), then saved;
- with the legacy TorchScript exporter (``dynamo=False, do_constant_folding=False``) to a file, folded
  with the command line (``python -m onnxfold IN OUT``, which verifies before it writes).

Each model, folded and not, then goes through ``onnxruntime.quantization.quantize_static`` (QDQ, int8,
per-channel weights, MinMax calibration on seeded inputs), and each quantized model is compared with
the float model (the export, run in onnxruntime with optimizations off) on held-out seeded inputs:
max abs error, and that error relative to the float output's scale (max |float output|).

``python examples/pipeline.py`` prints the table; ``--readme`` also writes it into README.md between
the ``pipeline-numbers`` markers. tests/test_pipeline_example.py runs :func:`run`.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # a checkout runs without installing
import onnxfold  # noqa: E402

BATCH, SHAPE = 8, (3, 32, 32)
CALIBRATION_SEED, HELD_OUT_SEED = 1, 2


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: type | None = torch.nn.ReLU):
    layers = [torch.nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), torch.nn.BatchNorm2d(cout)]
    return torch.nn.Sequential(*layers, *([act()] if act else []))


class TinyNet(torch.nn.Module):
    """Stem, a ResNet basic block, a MobileNetV2 inverted residual (depthwise), a linear head: 6 BN."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16, stride=2)
        self.res = torch.nn.Sequential(conv_bn(16, 16), conv_bn(16, 16, act=None))
        self.inverted = torch.nn.Sequential(conv_bn(16, 64, k=1, act=torch.nn.ReLU6),
                                            conv_bn(64, 64, groups=64, act=torch.nn.ReLU6),
                                            conv_bn(64, 24, k=1, act=None))
        self.head = torch.nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = torch.relu(self.res(y) + y)
        y = self.inverted(y)
        return self.head(y.mean((2, 3)))


def batches(seed: int, n: int) -> list[np.ndarray]:
    """Seeded inputs: blocky noise images (each value repeated over 2x2 pixels) with an offset per
    image and channel."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.normal(0, 1, (BATCH, SHAPE[0], SHAPE[1] // 2, SHAPE[2] // 2)).repeat(2, 2).repeat(2, 3)
        out.append((x + rng.normal(0, 0.5, (BATCH, SHAPE[0], 1, 1))).astype(np.float32))
    return out


def build(seed: int = 0) -> TinyNet:
    """The network with trained-looking BatchNormalization: running statistics gathered in training
    mode over seeded batches (not 0 and 1), scale and shift drawn at random (not 1 and 0)."""
    torch.manual_seed(seed)
    net = TinyNet()
    rng = np.random.default_rng(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the batches below
            m.weight.data = torch.tensor(rng.uniform(0.5, 1.5, m.num_features), dtype=torch.float32)
            m.bias.data = torch.tensor(rng.normal(0, 0.3, m.num_features), dtype=torch.float32)
    net.train()
    with torch.no_grad():
        for x in batches(seed + 100, 8):
            net(torch.from_numpy(x))
    return net.eval()


class Reader(CalibrationDataReader):
    def __init__(self, name: str, data: list[np.ndarray]) -> None:
        self.feeds = iter([{name: x} for x in data])

    def get_next(self) -> dict | None:
        return next(self.feeds, None)


def bn_count(path: Path) -> int:
    return sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)


def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def outputs(path: Path, data: list[np.ndarray]) -> np.ndarray:
    sess = session(path)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x})[0] for x in data])


def export(net: TinyNet, work: Path) -> dict[str, Path]:
    """Both exports, unfolded and folded: {"dynamo": ..., "dynamo folded": ..., "legacy": ..., "legacy folded": ...}."""
    x = torch.from_numpy(batches(0, 1)[0])
    program = torch.onnx.export(net, (x,), dynamo=True, optimize=False, verbose=False)
    assert program is not None  # the dynamo exporter returns its ONNXProgram
    paths = {"dynamo": work / "dynamo.onnx", "dynamo folded": work / "dynamo.folded.onnx",
             "legacy": work / "legacy.onnx", "legacy folded": work / "legacy.folded.onnx"}
    program.save(paths["dynamo"])
    original = program.model_proto
    program, report = onnxfold.fold_model(program)  # folded in place: program(x) now runs the folded model
    assert report.bn_after == 0, report.summary()
    result = onnxfold.verify(original, program.model_proto)
    assert result, result
    program.save(paths["dynamo folded"])

    torch.onnx.export(net, (x,), str(paths["legacy"]), dynamo=False, do_constant_folding=False,
                      input_names=["x"], output_names=["logits"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-m", "onnxfold", str(paths["legacy"]), str(paths["legacy folded"]), "-q"],
                   check=True, env=env)  # exit 0: folded and verified
    return paths


def quantize(src: Path, dst: Path) -> None:
    name = session(src).get_inputs()[0].name
    quantize_static(str(src), str(dst), Reader(name, batches(CALIBRATION_SEED, 8)), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)


def run(work: Path, seed: int = 0) -> list[dict]:
    """One row per exporter and folding: BatchNormalization nodes reaching the quantizer and left in its
    output, and the quantized model's error against the float model on held-out inputs."""
    torch.manual_seed(seed)
    paths = export(build(seed), work)
    held_out = batches(HELD_OUT_SEED, 4)
    rows = []
    for name, path in paths.items():
        reference = outputs(paths[name.split()[0]], held_out)  # the float model as exported
        quantized = work / f"{path.stem}.int8.onnx"
        quantize(path, quantized)
        err = np.abs(outputs(quantized, held_out).astype(np.float64) - reference)
        scale = float(np.abs(reference).max())
        rows.append({"model": name, "bn_to_quantizer": bn_count(path), "bn_in_quantized": bn_count(quantized),
                     "scale": scale, "max_abs": float(err.max()), "rel": float(err.max()) / scale,
                     "mean_rel": float(err.mean()) / scale,
                     "float_max_abs": float(np.abs(outputs(path, held_out) - reference).max())})
    return rows


def table(rows: list[dict]) -> str:
    lines = [("| export | BatchNormalization into quantize_static | left in the int8 model | float model vs export, "
              "max abs | int8 vs float: max abs | max abs / output scale | mean abs / output scale |"),
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['bn_to_quantizer']} | {r['bn_in_quantized']} | {r['float_max_abs']:.1e} "
                     f"| {r['max_abs']:.3g} | {r['rel']:.2%} | {r['mean_rel']:.2%} |")
    return "\n".join(lines)


def write_readme(text: str) -> None:
    readme = ROOT / "README.md"
    start, end = "<!-- pipeline-numbers:start -->", "<!-- pipeline-numbers:end -->"
    pattern = rf"{re.escape(start)}.*?{re.escape(end)}"
    new, n = re.subn(pattern, f"{start}\n{text}\n{end}", readme.read_text(), flags=re.S)
    if n != 1:
        raise SystemExit("README.md has no pipeline-numbers block")
    readme.write_text(new)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--readme", action="store_true", help="write the table into README.md")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        text = table(run(Path(tmp), args.seed))
    print(text)
    if args.readme:
        write_readme(text)


if __name__ == "__main__":
    main()
