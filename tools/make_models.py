#!/usr/bin/env python3
"""Generate the ONNX test models in models/ for onnxfold.

Every model is a small hand-written torch.nn module (no torchvision) whose
BatchNorm layers get random, non-trivial statistics and affine parameters.
The modules are exported in eval mode with the BatchNormalization nodes KEPT
(the exporters fuse Conv+BN on their own unless told not to), post-processed
so that the bytes are reproducible, checked with onnx.checker, run in
onnxruntime (CPU, graph optimizations disabled) and compared with torch.

Usage:  python tools/make_models.py [--out models]

The script is deterministic: running it twice gives byte-identical files.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn

import arch_blocks
from torch_blocks import Bottleneck, InvertedResidual, randomize_bn

SEED = 20240611          # torch.manual_seed for weights, numpy seed for inputs
BN_SEED = 1234           # torch.Generator seed for the BatchNorm parameters
ROOT = Path(__file__).resolve().parent.parent

# Exporter settings that keep BatchNormalization in the graph.
# Legacy TorchScript exporter: do_constant_folding=False stops the eval-mode
# Conv+BN fusion (it is done by the constant-folding pass).
LEGACY = dict(dynamo=False, do_constant_folding=False, export_params=True,
              keep_initializers_as_inputs=False)
# Dynamo exporter: optimize=False keeps BN (the onnxscript optimizer fuses it).
# opset 18 is the lowest the dynamo exporter implements natively (17 would go
# through the version converter).
DYNAMO = dict(dynamo=True, optimize=False, external_data=False)


# --------------------------------------------------------------------------
# BatchNorm randomisation
# --------------------------------------------------------------------------
# --------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------
def conv_bn_relu(cin, cout, k=3, s=1, p=1, bias=False):
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, p, bias=bias),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, 0, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + idt)


class SmallResNet(nn.Module):
    """stem conv-bn-relu, BasicBlock, BasicBlock(stride 2, 1x1 downsample),
    Bottleneck(1x1 downsample), global avg pool, linear head."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = conv_bn_relu(3, 16)
        self.layer1 = BasicBlock(16, 16)
        self.layer2 = BasicBlock(16, 32, stride=2)
        self.layer3 = Bottleneck(32, 16, 64)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class SmallMobileNetV2(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(inplace=True),
            InvertedResidual(16, 16, 1, 1),     # t=1: no expand conv, residual
            InvertedResidual(16, 24, 2, 4),
            InvertedResidual(24, 24, 1, 4),     # residual
            InvertedResidual(24, 32, 2, 4),
            InvertedResidual(32, 32, 1, 4),     # residual
            nn.Conv2d(32, 64, 1, 1, 0, bias=False), nn.BatchNorm2d(64), nn.ReLU6(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class SmallUNet(nn.Module):
    def __init__(self, cin=3, cout=2):
        super().__init__()
        def double(a, b):
            return nn.Sequential(conv_bn_relu(a, b), conv_bn_relu(b, b))
        self.enc1 = double(cin, 8)
        self.enc2 = double(8, 16)
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = conv_bn_relu(16, 32)
        self.up2 = nn.Sequential(nn.ConvTranspose2d(32, 16, 2, stride=2),
                                 nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        self.dec2 = conv_bn_relu(32, 16, bias=True)
        self.up1 = nn.Sequential(nn.ConvTranspose2d(16, 8, 2, stride=2),
                                 nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.dec1 = conv_bn_relu(16, 8, bias=True)
        self.head = nn.Conv2d(8, cout, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        b = self.bottleneck(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.head(d1)


class Net1d(nn.Module):
    """Conv1d-BN1d-ReLU stacks (one dilated, one groups=2) plus two BNs that
    are NOT foldable into a conv: a BN on the raw input, and a BN whose conv
    output also feeds a residual Add (two consumers)."""

    def __init__(self, cin=4, num_classes=5):
        super().__init__()
        self.in_bn = nn.BatchNorm1d(cin)
        self.c1 = nn.Conv1d(cin, 16, 5, padding=2)
        self.b1 = nn.BatchNorm1d(16)
        self.c2 = nn.Conv1d(16, 16, 3, padding=2, dilation=2)
        self.b2 = nn.BatchNorm1d(16)
        self.c3 = nn.Conv1d(16, 32, 3, padding=1, groups=2, bias=False)
        self.b3 = nn.BatchNorm1d(32)
        self.c4 = nn.Conv1d(32, 32, 1)
        self.b4 = nn.BatchNorm1d(32)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.in_bn(x)
        x = self.relu(self.b1(self.c1(x)))
        x = self.relu(self.b2(self.c2(x)))
        x = self.relu(self.b3(self.c3(x)))
        y = self.c4(x)
        x = self.relu(self.b4(y)) + y          # c4 output has two consumers
        return self.fc(torch.flatten(self.pool(x), 1))


class Net3d(nn.Module):
    """Conv3d-BN3d stacks and one ConvTranspose3d-BN3d.  The last conv's
    output is also returned as a second graph output ("aux"), so its BN is
    not foldable by the conv_bn rule."""

    def __init__(self, cin=2):
        super().__init__()
        self.c1 = nn.Conv3d(cin, 8, 3, padding=1)
        self.b1 = nn.BatchNorm3d(8)
        # NB: a bias-free Conv3d is exported WRONGLY by the dynamo exporter
        # (onnxscript 0.7.2 aten_conv3d builds a zero bias of shape [C_out, 2],
        # which onnxruntime rejects), so the Conv3d layers keep their bias and
        # the ConvTranspose3d (exported via aten.convolution) has none.
        self.c2 = nn.Conv3d(8, 16, 3, stride=2, padding=1)
        self.b2 = nn.BatchNorm3d(16)
        self.up = nn.ConvTranspose3d(16, 8, 2, stride=2, bias=False)
        self.b3 = nn.BatchNorm3d(8)
        self.c4 = nn.Conv3d(8, 4, 1)
        self.b4 = nn.BatchNorm3d(4)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.relu(self.b1(self.c1(x)))
        x = self.relu(self.b2(self.c2(x)))
        x = self.relu(self.b3(self.up(x)))
        aux = self.c4(x)
        return self.b4(aux), aux


class MlpBn1d(nn.Module):
    def __init__(self, fin=32, hid=64, num_classes=10):
        super().__init__()
        self.fc1 = nn.Linear(fin, hid)
        self.bn1 = nn.BatchNorm1d(hid)
        self.fc2 = nn.Linear(hid, hid, bias=False)   # exports as Transpose+MatMul
        self.bn2 = nn.BatchNorm1d(hid)
        self.relu = nn.ReLU()
        self.fc3 = nn.Linear(hid, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.fc1(x)))
        x = self.relu(self.bn2(self.fc2(x)))
        return self.fc3(x)


class ConvTransposeDecoder(nn.Module):
    def __init__(self, cin=32, cout=3):
        super().__init__()
        # 4x4 -> 8x8, output_padding=1
        self.up1 = nn.ConvTranspose2d(cin, 32, 3, stride=2, padding=1, output_padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        # 8x8 -> 16x16, groups=2 (weight is [C_in, C_out/groups, kH, kW])
        self.up2 = nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1, groups=2)
        self.bn2 = nn.BatchNorm2d(16)
        # 16x16 -> 16x16, no bias
        self.up3 = nn.ConvTranspose2d(16, 8, 3, stride=1, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.out = nn.Conv2d(8, cout, 1)

    def forward(self, x):
        x = self.relu(self.bn1(self.up1(x)))
        x = self.relu(self.bn2(self.up2(x)))
        x = self.relu(self.bn3(self.up3(x)))
        return torch.tanh(self.out(x))


# --------------------------------------------------------------------------
# Model specs: one function per model file
# --------------------------------------------------------------------------
def _build(cls, *args, **kw):
    torch.manual_seed(SEED)
    m = cls(*args, **kw)
    randomize_bn(m, BN_SEED)
    return m.eval()


def make_resnet_block():
    return dict(
        file="resnet_block.onnx",
        description="ResNet-shaped: stem conv-bn-relu, 2 BasicBlocks (2nd: stride 2 "
                    "+ 1x1 conv-bn downsample), 1 Bottleneck (1x1 conv-bn downsample), "
                    "residual Adds, GlobalAveragePool, Linear head. Dynamic batch.",
        model=_build(SmallResNet),
        inputs=[("input", (2, 3, 32, 32))], outputs=["output"],
        exporter=dict(LEGACY, opset_version=17,
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}),
        test_batch=3,
    )


def make_mobilenetv2_block():
    return dict(
        file="mobilenetv2_block.onnx",
        description="MobileNetV2-shaped: stem conv-bn-relu6, 5 inverted residual "
                    "blocks (1x1 expand conv-bn-relu6, depthwise 3x3 conv "
                    "(group=channels)-bn-relu6, 1x1 project conv-bn, residual Add "
                    "where stride 1 and cin==cout), 1x1 conv-bn-relu6, pool, Linear.",
        model=_build(SmallMobileNetV2),
        inputs=[("input", (1, 3, 32, 32))], outputs=["output"],
        exporter=dict(LEGACY, opset_version=17),
    )


def make_unet_small():
    return dict(
        file="unet_small.onnx",
        description="UNet-shaped: encoder (conv-bn-relu x2, MaxPool) x2, bottleneck "
                    "conv-bn-relu, decoder ConvTranspose2d(stride 2)-BN-relu, skip "
                    "Concat, conv(bias)-bn-relu, 1x1 head conv. Dynamo exporter "
                    "(bias-free Conv gets a computed zero bias). Dynamic batch.",
        model=_build(SmallUNet),
        inputs=[("input", (2, 3, 32, 32))], outputs=["output"],
        exporter=dict(DYNAMO, opset_version=18,
                      dynamic_shapes=({0: torch.export.Dim("batch")},)),
        test_batch=3,
    )


def make_net1d():
    return dict(
        file="net1d.onnx",
        description="1-D conv net: BN1d on the raw input (not foldable), "
                    "Conv1d-BN1d-ReLU x3 (one dilation=2, one groups=2 without bias), "
                    "Conv1d whose output feeds BN1d AND a residual Add (not foldable), "
                    "GlobalAveragePool, Linear. Dynamic batch and length.",
        model=_build(Net1d),
        inputs=[("input", (2, 4, 64))], outputs=["output"],
        exporter=dict(LEGACY, opset_version=17,
                      dynamic_axes={"input": {0: "batch", 2: "length"},
                                    "output": {0: "batch"}}),
        test_batch=3, test_shape=(3, 4, 48),
    )


def make_net3d():
    return dict(
        file="net3d.onnx",
        description="3-D conv net: Conv3d-BN3d-ReLU, Conv3d(stride 2)-BN3d-ReLU, "
                    "ConvTranspose3d(stride 2, no bias)-BN3d-ReLU, Conv3d 1x1x1 whose output is "
                    "also graph output 'aux' -> BN3d (not foldable). Dynamo exporter.",
        model=_build(Net3d),
        inputs=[("input", (1, 2, 8, 16, 16))], outputs=["output", "aux"],
        exporter=dict(DYNAMO, opset_version=18),
    )


def make_mobilenetv2_fp16():
    return dict(
        file="mobilenetv2_fp16.onnx",
        description="Same architecture and weights as mobilenetv2_block, exported in "
                    "float16 (model.half() on CPU; initializers and I/O are float16).",
        model=_build(SmallMobileNetV2).half(),
        inputs=[("input", (1, 3, 32, 32))], outputs=["output"],
        exporter=dict(LEGACY, opset_version=17),
        dtype="float16",
    )


def make_mlp_bn1d():
    return dict(
        file="mlp_bn1d.onnx",
        description="MLP: Linear-BN1d-ReLU-Linear(no bias)-BN1d-ReLU-Linear on 2-D "
                    "input [N, F]. First Linear -> Gemm, bias-free Linear -> "
                    "Transpose(weight)+MatMul. Dynamic batch.",
        model=_build(MlpBn1d),
        inputs=[("input", (4, 32))], outputs=["output"],
        exporter=dict(LEGACY, opset_version=17,
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}),
        test_batch=5,
    )


def make_convtranspose_decoder():
    return dict(
        file="convtranspose_decoder.onnx",
        description="Decoder of ConvTranspose2d-BN2d-ReLU blocks: stride 2 with "
                    "output_padding=1; stride 2 with groups=2; stride 1 without bias; "
                    "1x1 Conv + Tanh head.",
        model=_build(ConvTransposeDecoder),
        inputs=[("input", (1, 32, 4, 4))], outputs=["output"],
        exporter=dict(LEGACY, opset_version=17),
    )


def make_resnet_block_extdata():
    spec = make_resnet_block()
    spec.update(
        file="resnet_block_extdata.onnx",
        data_file="resnet_block_extdata.onnx.data",
        description="Same graph and weights as resnet_block.onnx, saved with ALL "
                    "initializers in one external data file "
                    "(resnet_block_extdata.onnx.data, size_threshold=0).",
    )
    return spec


def _arch(file: str, cls, shape: tuple[int, ...], description: str, folds: int) -> dict:
    """A block of a real architecture (tools/arch_blocks.py) whose BatchNormalization is not right
    after its producer; ``folds``: how many folds take every BatchNormalization out (issue 12's rules)."""
    return dict(file=file, description=description, model=_build(cls), inputs=[("input", shape)],
                outputs=["output"], exporter=dict(LEGACY, opset_version=17), expect_folds=folds,
                expect_bn_after=0)


def make_levit_mlp():
    return _arch("levit_mlp.onnx", arch_blocks.LeViTMLP, (2, 49, 32),
                 "LeViT's residual MLP: two Linear_BN (Linear without bias on [B, N, C] -> flatten(0, 1) -> "
                 "BatchNorm1d -> reshape_as, whose Shape reads the MatMul's output), Hardswish between. "
                 "Folds through the Flatten; the BatchNorm's shift stays as an Add (MatMul has no bias).", 2)


def make_mixnet_mixconv():
    return _arch("mixnet_mixconv.onnx", arch_blocks.MixedConv, (2, 24, 14, 14),
                 "MixNet's MixedConv2d: channels split, depthwise Convs k=3/5/7, Concat, BatchNorm2d, ReLU "
                 "(concat_bn).", 1)


def make_ocr_squeeze():
    return _arch("ocr_squeeze.onnx", arch_blocks.OCRSqueeze, (2, 16, 4, 25),
                 "A CRNN-style recognizer tail: Conv taking the height to 1 -> Squeeze(2) -> BatchNorm1d -> "
                 "permute (conv_bn through the Squeeze).", 1)


def make_seq_transpose():
    return _arch("seq_transpose.onnx", arch_blocks.SeqTranspose, (2, 10, 24),
                 "Linear on [B, T, C] (MatMul + Add) -> permute(0, 2, 1) -> BatchNorm1d (linear_bn through "
                 "the Transpose).", 1)


def make_bn_linear_head():
    return _arch("bn_linear_head.onnx", arch_blocks.BNLinearHead, (2, 48),
                 "Classifier head: BatchNorm1d -> Linear (bn_gemm: the BatchNorm folds into the Gemm's "
                 "input features).", 1)


def make_split_branches():
    return _arch("split_branches.onnx", arch_blocks.SplitBranches, (2, 8, 10, 10),
                 "Conv -> torch.split(y, [8, 16], 1) -> BatchNorm2d on each part -> Concat, Sigmoid on one "
                 "(split_affine: one fold takes both).", 1)


MAKERS = [make_resnet_block, make_mobilenetv2_block, make_unet_small, make_net1d,
          make_net3d, make_mobilenetv2_fp16, make_mlp_bn1d,
          make_convtranspose_decoder, make_resnet_block_extdata,
          make_levit_mlp, make_mixnet_mixconv, make_ocr_squeeze, make_seq_transpose, make_bn_linear_head,
          make_split_branches]


# --------------------------------------------------------------------------
# Export, post-processing, checks
# --------------------------------------------------------------------------
def _jsonable(v):
    if isinstance(v, torch.export.Dim):
        return f"torch.export.Dim({v.__name__!r})"
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def export(spec, tmpdir: Path) -> onnx.ModelProto:
    dtype = torch.float16 if spec.get("dtype") == "float16" else torch.float32
    args = tuple(torch.zeros(shape, dtype=dtype) for _, shape in spec["inputs"])
    kw = dict(spec["exporter"])
    path = tmpdir / spec["file"]
    buf = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
        warnings.simplefilter("ignore")
        torch.onnx.export(spec["model"], args, str(path),
                          input_names=[n for n, _ in spec["inputs"]],
                          output_names=spec["outputs"], **kw)
    return onnx.load(str(path))


def strip_nondeterministic(model: onnx.ModelProto) -> list[str]:
    """Remove content that depends on where/how the script runs.

    The dynamo exporter attaches node metadata_props with Python stack traces
    (absolute file paths, line numbers) and FX node reprs; those are removed,
    as are node/graph/model doc_strings.  producer_name/version are kept
    (they only depend on the torch version)."""
    removed = Counter()

    def walk(g: onnx.GraphProto):
        if g.doc_string:
            g.doc_string = ""
            removed["graph.doc_string"] += 1
        for n in g.node:
            if n.doc_string:
                n.doc_string = ""
                removed["node.doc_string"] += 1
            if len(n.metadata_props):
                del n.metadata_props[:]
                removed["node.metadata_props"] += 1
            for a in n.attribute:
                if a.g.node:
                    walk(a.g)
                for sg in a.graphs:
                    walk(sg)

    walk(model.graph)
    if model.doc_string:
        model.doc_string = ""
        removed["model.doc_string"] += 1
    return [f"{k} cleared on {v} item(s)" for k, v in sorted(removed.items())]


def _consumers(graph: onnx.GraphProto) -> Counter:
    cnt = Counter()

    def walk(g):
        for n in g.node:
            for i in n.input:
                if i:
                    cnt[i] += 1
            for a in n.attribute:
                for sg in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    walk(sg)
    walk(graph)
    return cnt


def analyze(model: onnx.ModelProto) -> dict:
    """Expected folding counts, computed from the graph."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    consumers = _consumers(g)
    outputs = {o.name for o in g.output}
    inits = {t.name for t in g.initializer}
    bns = [n for n in g.node if n.op_type == "BatchNormalization"]
    details, conv_bn, gemm_bn, conv_bn_init = [], 0, 0, 0
    for bn in bns:
        x = bn.input[0]
        p = producer.get(x)
        single = consumers[x] == 1 and x not in outputs
        kind = None
        if p is not None and single and p.op_type in ("Conv", "ConvTranspose"):
            kind = "conv_bn"
            conv_bn += 1
        elif p is not None and single and p.op_type in ("Gemm", "MatMul"):
            kind = "gemm_bn"
            gemm_bn += 1
        prod_params = list(p.input[1:]) if p is not None else []
        prod_params_init = all(i in inits for i in prod_params if i)
        bn_params_init = all(i in inits for i in bn.input[1:])
        if kind == "conv_bn" and prod_params_init and bn_params_init:
            conv_bn_init += 1
        details.append(dict(
            bn=bn.name or bn.output[0],
            x=x,
            x_producer_op=p.op_type if p is not None else None,
            x_consumers=consumers[x],
            x_is_graph_output=x in outputs,
            fold=kind,
            producer_params_are_initializers=prod_params_init if p is not None else None,
            bn_params_are_initializers=bn_params_init,
        ))
    return dict(
        bn_total=len(bns), conv_bn=conv_bn, gemm_bn=gemm_bn,
        bn_remaining_after_conv_bn=len(bns) - conv_bn,
        conv_bn_all_params_initializers=conv_bn_init,
        op_counts=dict(sorted(Counter(n.op_type for n in g.node).items())),
        bn_details=details,
    )


def _dims(vi):
    out = []
    for d in vi.type.tensor_type.shape.dim:
        out.append(d.dim_param if d.HasField("dim_param") else
                   (d.dim_value if d.HasField("dim_value") else None))
    return out


def _dtype_name(vi):
    return onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name


def save(model: onnx.ModelProto, spec, out: Path):
    path = out / spec["file"]
    data = spec.get("data_file")
    if data:
        # onnx appends to an existing data file: remove it first.
        (out / data).unlink(missing_ok=True)
        onnx.save_model(model, str(path), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data,
                        size_threshold=0, convert_attribute=False)
        os.chmod(out / data, 0o644)   # onnx creates the data file with mode 0600
    else:
        onnx.save_model(model, str(path))


def run_checks(spec, out: Path) -> float:
    path = out / spec["file"]
    onnx.checker.check_model(str(path), full_check=True)
    m = onnx.load(str(path))
    n_bn = sum(n.op_type == "BatchNormalization" for n in m.graph.node)
    n_bn_torch = sum(isinstance(x, nn.modules.batchnorm._BatchNorm)
                     for x in spec["model"].modules())
    if n_bn != n_bn_torch or n_bn == 0:
        raise SystemExit(f"{spec['file']}: {n_bn} BatchNormalization nodes in the graph, "
                         f"{n_bn_torch} BN modules in torch -- the exporter fused BN")

    fp16 = spec.get("dtype") == "float16"
    rng = np.random.default_rng(SEED)
    feeds, targs = {}, []
    for name, shape in spec["inputs"]:
        shape = spec.get("test_shape") or (
            (spec["test_batch"],) + tuple(shape[1:]) if "test_batch" in spec else shape)
        x = rng.standard_normal(shape).astype(np.float32)
        feeds[name] = x.astype(np.float16) if fp16 else x
        targs.append(torch.from_numpy(feeds[name]))

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    got = sess.run(None, feeds)

    with torch.no_grad():
        ref = spec["model"](*targs)
        if fp16:   # compare against the float32 model as well
            ref32 = _build(SmallMobileNetV2)(*(t.float() for t in targs))
    refs = ref if isinstance(ref, tuple) else (ref,)
    worst = 0.0
    for o, r in zip(got, refs):
        r = r.float().numpy()
        o = o.astype(np.float32)
        scale = max(1.0, float(np.abs(r).max()))
        err = float(np.abs(o - r).max()) / scale
        worst = max(worst, err)
        tol = 2e-2 if fp16 else 1e-4
        if not (err <= tol):
            raise SystemExit(f"{spec['file']}: onnxruntime vs torch max rel err {err:.3g} > {tol}")
    if fp16:
        r = ref32.numpy()
        err32 = float(np.abs(got[0].astype(np.float32) - r).max()) / max(1.0, float(np.abs(r).max()))
        if not (err32 <= 5e-2):
            raise SystemExit(f"{spec['file']}: fp16 onnxruntime vs fp32 torch rel err {err32:.3g}")
    return worst


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def manifest_entry(spec, maker, out: Path, post: list[str], info: dict, err: float) -> dict:
    """models/manifest.json's record of one model: where it came from, how it was exported and
    post-processed, what it holds and what folding it should give."""
    m = onnx.load(str(out / spec["file"]), load_external_data=False)
    files = [spec["file"]] + ([spec["data_file"]] if spec.get("data_file") else [])
    return dict(
        file=spec["file"],
        data_file=spec.get("data_file"),
        description=spec["description"],
        source=f"tools/make_models.py: {maker.__name__}",
        exporter=dict(call="torch.onnx.export", **_jsonable(dict(
            input_names=[n for n, _ in spec["inputs"]],
            output_names=spec["outputs"], **spec["exporter"])),
            module_mode="eval",
            module_dtype="float16 (model.half())" if spec.get("dtype") == "float16" else "float32",
            example_input_shapes=[list(s) for _, s in spec["inputs"]],
            post_processing=["onnx.load"] + post + (
                ["onnx.save_model(save_as_external_data=True, all_tensors_to_one_file=True,"
                 f" location={spec['data_file']!r}, size_threshold=0)"]
                if spec.get("data_file") else ["onnx.save_model"])),
        producer=f"{m.producer_name} {m.producer_version}",
        opset=next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")),
        ir_version=m.ir_version,
        dtype=spec.get("dtype", "float32"),
        inputs=[dict(name=i.name, dtype=_dtype_name(i), shape=_dims(i)) for i in m.graph.input],
        outputs=[dict(name=o.name, dtype=_dtype_name(o), shape=_dims(o)) for o in m.graph.output],
        bn_total=info["bn_total"],
        conv_bn=info["conv_bn"],
        gemm_bn=info["gemm_bn"],
        bn_remaining_after_conv_bn=info["bn_remaining_after_conv_bn"],
        conv_bn_all_params_initializers=info["conv_bn_all_params_initializers"],
        num_initializers=len(m.graph.initializer),
        op_counts=info["op_counts"],
        bn_details=info["bn_details"],
        ort_vs_torch_max_rel_err=float(f"{err:.3g}"),
        sha256={f: sha256(out / f) for f in files},
        **{k: spec[k] for k in ("expect_folds", "expect_bn_after") if k in spec},
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "models"))
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    manifest, rows = [], []
    with tempfile.TemporaryDirectory() as td:
        for maker in MAKERS:
            spec = maker()
            model = export(spec, Path(td))
            post = strip_nondeterministic(model)
            info = analyze(model)
            if info["bn_total"] == 0:
                raise SystemExit(f"{spec['file']}: no BatchNormalization left after export")
            save(model, spec, out)
            err = run_checks(spec, out)
            entry = manifest_entry(spec, maker, out, post, info, err)
            manifest.append(entry)
            size = sum((out / f).stat().st_size for f in entry["sha256"])  # the model and its data file
            rows.append((spec["file"], size, entry["dtype"], entry["opset"],
                         "x".join(str(d) for d in entry["inputs"][0]["shape"]),
                         info["bn_total"], info["conv_bn"], info["gemm_bn"],
                         info["bn_remaining_after_conv_bn"], err))

    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    hdr = ("file", "bytes", "dtype", "opset", "input", "bn", "conv_bn", "gemm_bn", "left", "ort_err")
    fmt = "{:<28} {:>8} {:<7} {:>5} {:<16} {:>3} {:>7} {:>7} {:>4} {:>9}"
    print(fmt.format(*hdr))
    for r in rows:
        print(fmt.format(*r[:-1], f"{r[-1]:.2e}"))
    print(f"total bytes: {sum(r[1] for r in rows)}  (seed {SEED}, BN seed {BN_SEED})")

if __name__ == "__main__":
    sys.exit(main())
