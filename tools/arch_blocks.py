#!/usr/bin/env python3
"""Blocks of real architectures whose BatchNormalization sits behind a layout op, a Concat or a Split.

Each block is a hand-written torch module (torchvision is not used) in the shape its architecture
writes it, with random non-trivial BatchNorm statistics (seeded), exported in eval mode with
BatchNormalization kept (legacy exporter with do_constant_folding=False; dynamo with optimize=False).

    levit_mlp        LeViT's Linear_BN: Linear -> flatten(0, 1) -> BatchNorm1d -> reshape back (x2, MLP)
    mixnet_mixconv   MixNet's MixedConv: split channels, depthwise convs k=3/5/7, concat, BatchNorm2d
    ocr_squeeze      an OCR recognizer's tail: Conv (height -> 1) -> squeeze(2) -> BatchNorm1d
    seq_transpose    Linear on [B, T, C] -> permute(0, 2, 1) -> BatchNorm1d (MatMul -> Transpose -> BN)
    bn_linear_head   BatchNorm1d -> Linear classifier head (the BN is before the Gemm)
    split_branches   Conv -> torch.split(y, [8, 16], 1) -> BatchNorm2d on each part (a Split along channels)
    chunk_branches   Conv -> chunk(2, dim=1) -> BatchNorm2d on each half (two Slice nodes when exported)

Usage:  python tools/arch_blocks.py OUT_DIR [--measure]

--measure prints, for each exported model, the nodes between the producer and each
BatchNormalization, and how many BatchNormalization nodes are left by onnxfold, by onnxruntime's
optimizer (ORT_ENABLE_EXTENDED) and by onnxslim (default settings).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # torch_blocks beside this file, however it is loaded
from torch_blocks import randomize_bn  # noqa: E402

SEED = 20261126
BN_SEED = 4321
OPSET = 17
PRODUCERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


# --------------------------------------------------------------------------------------------------
# The blocks
# --------------------------------------------------------------------------------------------------
class LinearBN(nn.Module):
    """LeViT's Linear_BN: ``bn(linear(x).flatten(0, 1)).reshape_as(linear(x))``."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.c = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c(x)
        return self.bn(y.flatten(0, 1)).reshape_as(y)


class LeViTMLP(nn.Module):
    """LeViT's residual MLP: x + LinearBN(h -> ed)(hardswish(LinearBN(ed -> h)(x)))."""

    def __init__(self, ed: int = 32, h: int = 64):
        super().__init__()
        self.up, self.act, self.down = LinearBN(ed, h), nn.Hardswish(), LinearBN(h, ed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(self.act(self.up(x)))


class MixedConv(nn.Module):
    """MixNet's MixedConv2d (depthwise, kernels 3/5/7 on channel splits) followed by BatchNorm2d."""

    def __init__(self, channels: int = 24, kernels: tuple[int, ...] = (3, 5, 7)):
        super().__init__()
        splits = [channels // len(kernels)] * len(kernels)
        splits[0] += channels - sum(splits)
        self.splits = splits
        self.convs = nn.ModuleList(nn.Conv2d(c, c, k, padding=k // 2, groups=c, bias=False)
                                   for c, k in zip(splits, kernels))
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.splits, 1)
        return torch.relu(self.bn(torch.cat([conv(p) for conv, p in zip(self.convs, parts)], 1)))


class OCRSqueeze(nn.Module):
    """A CRNN-style recognizer tail: a Conv that takes the height to 1, squeeze(2), BatchNorm1d."""

    def __init__(self, cin: int = 16, cout: int = 32, height: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, (height, 1))
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x).squeeze(2)).permute(2, 0, 1)


class SeqTranspose(nn.Module):
    """A sequence head: Linear on [B, T, C], permute to [B, C, T], BatchNorm1d (MatMul -> Transpose -> BN)."""

    def __init__(self, cin: int = 24, cout: int = 32):
        super().__init__()
        self.fc = nn.Linear(cin, cout)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x).permute(0, 2, 1))


class BNLinearHead(nn.Module):
    """A classifier head: pooled features -> BatchNorm1d -> Linear (the BN is on the Gemm's input)."""

    def __init__(self, features: int = 48, classes: int = 10):
        super().__init__()
        self.bn = nn.BatchNorm1d(features)
        self.fc = nn.Linear(features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x))


class SplitBranches(nn.Module):
    """Conv -> split into two channel groups -> a BatchNorm2d on each -> the halves multiplied (a gated unit).

    ``chunk=False`` writes ``torch.split(y, [a, b], 1)`` (exported as Split, uneven here);
    ``chunk=True`` writes ``y.chunk(2, 1)`` (the legacy exporter writes two Slice nodes).
    """

    def __init__(self, cin: int = 8, half: int = 12, chunk: bool = False):
        super().__init__()
        self.sizes = [half, half] if chunk else [half - 4, half + 4]
        self.chunk = chunk
        self.conv = nn.Conv2d(cin, 2 * half, 3, padding=1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(self.sizes[0]), nn.BatchNorm2d(self.sizes[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        a, b = y.chunk(2, dim=1) if self.chunk else torch.split(y, self.sizes, 1)
        return torch.cat([self.bn_a(a), torch.sigmoid(self.bn_b(b))], 1)


BLOCKS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "levit_mlp": (LeViTMLP, (2, 49, 32)),
    "mixnet_mixconv": (MixedConv, (2, 24, 14, 14)),
    "ocr_squeeze": (OCRSqueeze, (2, 16, 4, 25)),
    "seq_transpose": (SeqTranspose, (2, 10, 24)),
    "bn_linear_head": (BNLinearHead, (2, 48)),
    "split_branches": (SplitBranches, (2, 8, 10, 10)),
    "chunk_branches": (lambda: SplitBranches(chunk=True), (2, 8, 10, 10)),
}


def export(name: str, path: Path, dynamo: bool = False) -> Path:
    """Export one block with BatchNormalization kept; returns the path."""
    make, shape = BLOCKS[name]
    torch.manual_seed(SEED)
    model = make().eval()
    assert randomize_bn(model, BN_SEED) > 0
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(SEED))
    if dynamo:
        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(model, (x,), str(path), dynamo=True, optimize=False, external_data=False,
                              opset_version=18)
    else:
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(model, (x,), str(path), dynamo=False, do_constant_folding=False, opset_version=OPSET,
                          input_names=["x"], output_names=["y"])
    return path


# --------------------------------------------------------------------------------------------------
# What sits between each producer and BatchNormalization, and who folds it
# --------------------------------------------------------------------------------------------------
def count_bn(path: Path) -> int:
    return sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)


def _describe(node: onnx.NodeProto, output: str, consts: dict, shapes: dict) -> str:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    attrs = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in attrs.items()}
    extra = [f"{name}={consts[name].tolist()}" if consts[name].size <= 8 else f"{name}{list(consts[name].shape)}"
             for name in node.input[1:] if name in consts]
    args = ", ".join([f"{k}={v}" for k, v in attrs.items() if not isinstance(v, bytes)] + extra)
    return f"{node.op_type}({args}){shapes.get(output, '?')}"


def bn_patterns(path: Path) -> list[str]:
    """For each BatchNormalization: its input's producer chain back to a Conv/Gemm/MatMul (or a graph input)."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    g = model.graph
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            value = onnx.helper.get_attribute_value(n.attribute[0])
            is_tensor = isinstance(value, onnx.TensorProto)
            consts[n.output[0]] = onnx.numpy_helper.to_array(value) if is_tensor else np.asarray(value)
    shapes = {}
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else d.dim_param or "?" for d in dims]
    made = {o: n for n in g.node for o in n.output}
    out = []
    for bn in (n for n in g.node if n.op_type == "BatchNormalization"):
        chain, name = [f"BatchNormalization{shapes.get(bn.output[0], '?')}"], bn.input[0]
        for _ in range(6):
            node = made.get(name)
            if node is None:
                chain.append(f"input {name}{shapes.get(name, '?')}")
                break
            chain.append(_describe(node, name, consts, shapes))
            if node.op_type in PRODUCERS or node.op_type not in {"Add", "Reshape", "Flatten", "Transpose", "Squeeze",
                                                                  "Unsqueeze", "Split", "Slice", "Concat", "Identity"}:
                break
            name = next(i for i in node.input if i not in consts)
        out.append(" <- ".join(chain))
    return out


def left_by_tools(path: Path, work: Path) -> dict[str, object]:
    """BatchNormalization left by onnxfold, onnxruntime (ORT_ENABLE_EXTENDED) and onnxslim."""
    import onnxruntime as ort

    res: dict[str, object] = {"exported": count_bn(path)}
    folded = work / f"{path.stem}.onnxfold.onnx"
    run = subprocess.run([sys.executable, "-m", "onnxfold", str(path), str(folded), "-v"],
                         capture_output=True, text=True, check=False)
    res["onnxfold"] = count_bn(folded) if run.returncode == 0 else f"exit {run.returncode}"
    res["onnxfold_log"] = (run.stdout + run.stderr).strip()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(work / f"{path.stem}.ort.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    res["onnxruntime"] = count_bn(Path(opts.optimized_model_filepath))
    slim = work / f"{path.stem}.slim.onnx"
    run = subprocess.run([sys.executable, "-m", "onnxslim", str(path), str(slim)],
                         capture_output=True, text=True, check=False)
    res["onnxslim"] = count_bn(slim) if run.returncode == 0 else f"exit {run.returncode}"
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--measure", action="store_true")
    ap.add_argument("--dynamo", action="store_true", help="also export each block with the dynamo exporter")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    paths = [export(name, args.out / f"{name}.onnx") for name in BLOCKS]
    if args.dynamo:
        paths += [export(name, args.out / f"{name}.dynamo.onnx", dynamo=True) for name in BLOCKS]
    if not args.measure:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        for path in paths:
            res = left_by_tools(path, Path(tmp))
            print(f"## {path.name}: BN exported {res['exported']}, left by onnxfold {res['onnxfold']}, "
                  f"onnxruntime {res['onnxruntime']}, onnxslim {res['onnxslim']}")
            for line in bn_patterns(path):
                print(f"   {line}")
            for line in str(res["onnxfold_log"]).splitlines():
                print(f"   | {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
