#!/usr/bin/env python
"""Generate the seeded benchmark models used by tools/bench.py.

Every model contains BatchNormalization nodes with random, non-trivial
statistics (mean != 0, var != 1, gamma != 1, beta != 0).  Next to each
``NAME.onnx`` the script writes ``NAME.ref.npz`` holding the seeded input
(``x``, in the model's input dtype) and a float64 reference output (``ref``)
computed by torch with the module in ``.double()`` (or, for the >2 GiB model
that is built directly with onnx.helper, computed layer by layer in float64
by torch from the weights it just wrote).

Models (full set / ``--quick`` set):

  resnet50         ResNet-50-shaped (Bottleneck [3,4,6,3], ~100 MB float32)
  mobilenetv2      MobileNetV2-shaped (depthwise convs)
  unet             UNet-shaped, with ConvTranspose + BatchNorm in the decoder
  mlp              MLP, Linear -> BatchNorm1d -> ReLU (Gemm and MatMul)
  mobilenetv2_fp16 MobileNetV2 in float16
  wide_ext         stack of wide 3x3 Conv + BN + ReLU with external data
                   (> 2 GiB in the full set, a few MB in --quick)

Usage:
  python tools/bench_models.py [--quick] [--out DIR] [--only NAME ...] [--force]

The torch models are exported with the dynamo exporter with
``optimize=False`` so that BatchNormalization survives the export.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "build" / "bench_models"
SEED = 20240611

FULL = ["resnet50", "mobilenetv2", "unet", "mlp", "mobilenetv2_fp16", "wide_ext"]


def _spec(name: str, quick: bool):
    """(the torch module, input shape, dtype) of a torch model."""
    from bench_networks import MLP, MobileNetV2, ResNet50, UNet

    if name == "resnet50":
        if quick:
            return ResNet50(base=8, layers=(1, 1, 1, 1), num_classes=10), (1, 3, 64, 64), "float32"
        return ResNet50(), (1, 3, 224, 224), "float32"
    if name in ("mobilenetv2", "mobilenetv2_fp16"):
        dt = "float16" if name.endswith("fp16") else "float32"
        if quick:
            return MobileNetV2(width_mult=0.25, num_classes=10), (1, 3, 64, 64), dt
        return MobileNetV2(), (1, 3, 224, 224), dt
    if name == "unet":
        if quick:
            return UNet(base=4, depth=2), (1, 3, 32, 32), "float32"
        return UNet(base=32, depth=4), (1, 3, 128, 128), "float32"
    if name == "mlp":
        if quick:
            return MLP(din=32, width=64, depth=2), (8, 32), "float32"
        return MLP(), (32, 512), "float32"
    raise KeyError(name)


def _randomize_bn(model, shape, gen):
    """Calibrate running stats on seeded data, then randomize the affine part.

    Running mean/var come from a training-mode forward pass on random data
    (so they are realistic, non-zero means and non-unit variances); they are
    then perturbed, and gamma/beta are drawn at random.
    """
    import torch
    from torch import nn

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.momentum = 1.0
    calib_shape = (max(4, shape[0]),) + tuple(shape[1:])
    model.train()
    with torch.no_grad():
        model(torch.randn(calib_shape, generator=gen))
    model.eval()
    with torch.no_grad():
        for m in bns:
            c = m.num_features
            m.running_mean += 0.1 * torch.randn(c, generator=gen)
            m.running_var *= torch.empty(c).uniform_(0.6, 1.6, generator=gen)
            m.weight.copy_(torch.empty(c).uniform_(0.5, 1.5, generator=gen))
            m.bias.copy_(0.2 * torch.randn(c, generator=gen))
            m.momentum = 0.1
    return len(bns)


def make_torch_model(name: str, out: Path, quick: bool) -> dict:
    import torch

    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED + zlib.crc32(name.encode()) % 1000)
    model, shape, dtype = _spec(name, quick)
    n_bn = _randomize_bn(model, shape, gen)
    x = torch.randn(shape, generator=gen)
    if dtype == "float16":
        model = model.half()
        x = x.half()
    with torch.no_grad():
        ref = model.double()(x.double()).numpy()
    model = model.half() if dtype == "float16" else model.float()
    path = out / f"{name}.onnx"
    import contextlib
    import io
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=True, optimize=False,
                          external_data=False, input_names=["x"], output_names=["y"])
    _clean_export(path)
    np.savez(out / f"{name}.ref.npz", x=x.numpy(), ref=ref)
    return {"bn_modules": n_bn, "input_shape": list(shape), "dtype": dtype}


def _clean_export(path: Path) -> None:
    """Make the ``optimize=False`` export look like a typical exported model.

    With ``optimize=False`` the dynamo exporter materialises the zero bias of
    ``bias=False`` convolutions as a Shape/Expand/CastLike subgraph, which
    would make every Conv bias non-constant.  We run onnxscript's constant
    folding and dead-node removal (no fusion rules: BatchNormalization stays)
    and then drop Conv biases that are all zeros, so such convs have no bias
    input, as with the legacy exporter.
    """
    import onnx
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    import onnxscript.optimizer

    m = ir.load(str(path))
    onnxscript.optimizer.fold_constants(m)
    common.RemoveUnusedNodesPass()(m)
    ir.save(m, str(path))
    proto = onnx.load(str(path))
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    for n in g.node:
        if n.op_type == "Conv" and len(n.input) == 3 and n.input[2] in inits:
            if not onnx.numpy_helper.to_array(inits[n.input[2]]).any():
                del n.input[2]
    used = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


# --------------------------------------------------------------------------
# the > 2 GiB model, built directly with onnx.helper (memory-bounded)
# --------------------------------------------------------------------------

class _ExternalWriter:
    """Initializers whose bytes go straight to one open data file, one after another."""

    def __init__(self, f, data_name: str):
        self.f, self.data_name = f, data_name
        self.offset = 0
        self.inits: list = []

    def add(self, arr: np.ndarray, tname: str) -> None:
        from onnx import TensorProto

        arr = np.ascontiguousarray(arr, dtype=np.float32)
        self.f.write(arr.tobytes())
        t = TensorProto()
        t.name = tname
        t.data_type = TensorProto.FLOAT
        t.dims.extend(arr.shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.data_name), ("offset", str(self.offset)), ("length", str(arr.nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.offset += arr.nbytes
        self.inits.append(t)


def _wide_layer(i: int, h, rng, C: int, std, eps: float, writer: _ExternalWriter):
    """Layer ``i``'s weights written out; its float64 output by torch (conv, BN, relu) from ``h``."""
    import torch

    w = (rng.standard_normal((C, C, 3, 3), dtype=np.float32) * np.float32(std))
    writer.add(w, f"conv{i}.weight")
    conv = torch.nn.functional.conv2d(h, torch.from_numpy(w.astype(np.float64)), padding=1)
    del w
    # BN statistics close to the real ones, then perturbed; random affine
    cm = conv.mean(dim=(0, 2, 3)).numpy()
    cv = conv.var(dim=(0, 2, 3)).numpy()
    mean = (cm + 0.1 * rng.standard_normal(C)).astype(np.float32)
    var = (cv * rng.uniform(0.6, 1.6, C)).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, C).astype(np.float32)
    beta = (0.2 * rng.standard_normal(C)).astype(np.float32)
    for suffix, arr in (("gamma", gamma), ("beta", beta), ("mean", mean), ("var", var)):
        writer.add(arr, f"bn{i}.{suffix}")
    s = torch.from_numpy(gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps))
    y = (conv - torch.from_numpy(mean.astype(np.float64)).view(1, -1, 1, 1)) * s.view(1, -1, 1, 1)
    y = y + torch.from_numpy(beta.astype(np.float64)).view(1, -1, 1, 1)
    return torch.relu(y)


def _wide_nodes(i: int, cur: str, out_name: str, eps: float) -> list:
    from onnx import helper

    return [helper.make_node("Conv", [cur, f"conv{i}.weight"], [f"c{i}"],
                             name=f"conv{i}", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization",
                             [f"c{i}"] + [f"bn{i}.{s_}" for s_ in ("gamma", "beta", "mean", "var")],
                             [f"b{i}"], name=f"bn{i}", epsilon=eps),
            helper.make_node("Relu", [f"b{i}"], [out_name], name=f"relu{i}")]


def make_wide_ext(out: Path, quick: bool) -> dict:
    """Stack of Conv(3x3, C->C) + BatchNormalization + Relu, weights as external data.

    The data file is written tensor by tensor so that at most one layer's
    weights are in memory; the float64 reference is computed alongside.
    """
    import onnx
    import torch
    from onnx import TensorProto, helper

    if quick:
        C, L, HW = 64, 4, 8
    else:
        C, L, HW = 2048, 15, 8  # 15 * 2048*2048*9*4 B = 2.27e9 B > 2 GiB
    rng = np.random.default_rng(SEED)
    name = "wide_ext"
    data_name = f"{name}.onnx.data"
    x = rng.standard_normal((1, C, HW, HW), dtype=np.float32)
    h = torch.from_numpy(x.astype(np.float64))
    nodes = []
    cur = "x"
    std = np.sqrt(2.0 / (C * 9))
    eps = 1e-5
    with open(out / data_name, "wb") as f:
        writer = _ExternalWriter(f, data_name)
        for i in range(L):
            h = _wide_layer(i, h, rng, C, std, eps, writer)
            out_name = "y" if i == L - 1 else f"r{i}"
            nodes += _wide_nodes(i, cur, out_name, eps)
            cur = out_name
    graph = helper.make_graph(
        nodes, "wide_ext",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, HW, HW])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, HW, HW])],
        initializer=writer.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="onnxfold-bench")
    model.ir_version = 8
    with open(out / f"{name}.onnx", "wb") as f:
        f.write(model.SerializeToString())
    onnx.checker.check_model(str(out / f"{name}.onnx"))  # by path: data stays on disk
    np.savez(out / f"{name}.ref.npz", x=x, ref=h.numpy())
    return {"bn_modules": L, "input_shape": [1, C, HW, HW], "dtype": "float32",
            "external_data_bytes": writer.offset}


def model_files(out: Path, name: str) -> list[Path]:
    files = [out / f"{name}.onnx", out / f"{name}.ref.npz"]
    if name == "wide_ext":
        files.append(out / f"{name}.onnx.data")
    return files


def generate(out: Path, quick: bool, only=None, force=False, log=print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "models.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    for name in (only or FULL):
        if name not in FULL:
            raise SystemExit(f"unknown model {name!r}; choose from {FULL}")
        if not force and all(p.exists() for p in model_files(out, name)) and name in meta:
            continue
        t0 = time.perf_counter()
        log(f"[bench_models] generating {name} in {out} ...")
        info = make_wide_ext(out, quick) if name == "wide_ext" else make_torch_model(name, out, quick)
        info["seconds"] = round(time.perf_counter() - t0, 1)
        info["onnx_bytes"] = sum(p.stat().st_size for p in model_files(out, name) if p.suffix != ".npz")
        info["quick"] = quick
        meta[name] = info
        meta_path.write_text(json.dumps(meta, indent=1))
        log(f"[bench_models]   {name}: {info['onnx_bytes'] / 1e6:.1f} MB in {info['seconds']} s")
        gc.collect()
    return meta


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small models (default dir build/bench_models/quick)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--only", nargs="*", default=None, help=f"subset of {FULL}")
    ap.add_argument("--force", action="store_true", help="regenerate even if present")
    a = ap.parse_args(argv)
    out = a.out or (DEFAULT_OUT / "quick" if a.quick else DEFAULT_OUT)
    generate(out, a.quick, a.only, a.force)


if __name__ == "__main__":
    sys.exit(main())
