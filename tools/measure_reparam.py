#!/usr/bin/env python3
"""Re-parameterizable models against onnxfold, onnxruntime, onnxslim and the deploy form (issue 19).

For each model in training form (eval mode, every BatchNorm's statistics random and non-trivial:
tools/corpus.py's ``randomize_bn``), exported by the legacy exporter (``dynamo=False,
do_constant_folding=False``) and by dynamo (``dynamo=True, optimize=False``) where that works:

- BatchNormalization and Conv counts of the export, after ``onnxfold.fold_model``, after onnxruntime's
  offline optimizer (ORT_ENABLE_BASIC and ORT_ENABLE_EXTENDED, ``optimized_model_filepath``, CPU;
  EXTENDED writes FusedConv, counted as Conv), after ``onnxslim.slim``, and of the deploy form exported
  the same way (timm's ``reparameterize_model``; tools/reparam_blocks.py's own merge for TextNet and the
  RepNCSPELAN4 block; none for the ECAPA block);
- the folded model's largest output difference, relative to the largest output, against the original
  (onnxruntime, ORT_DISABLE_ALL) and against the deploy module (torch);
- latency (last, ``--latency``): onnxruntime ORT_ENABLE_ALL, CPU, one thread, batch 1, the original and
  the folded model run alternately, median of ``--runs`` runs each.

Usage:  python tools/measure_reparam.py [--work DIR] [--only NAME ...] [--no-dynamo] [--counts]
                                        [--latency] [--runs N] [--page]
        no phase flag: --counts --latency --page. --counts keeps each model's files and results in
        --work (default /tmp/onnxfold-reparam); --latency and --page read them.
Needs: pip install --no-deps timm==1.0.31; pip install pillow onnxslim==0.1.98 transformers==5.24.0
       (timm's torchvision is replaced by tools/corpus.py's stand-in; nothing is downloaded).
Writes docs/reparam.md (--page).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from corpus import TORCHVISION_STAND_IN, randomize_bn  # noqa: E402
from onnxfold import fold_model  # noqa: E402

TIMM = ["repvgg_a0", "mobileone_s0", "fastvit_t8", "repghostnet_050", "repvit_m0_9"]
MODELS = TIMM + ["textnet", "repncspelan4", "ecapa"]
IMAGE = (1, 3, 128, 128)
CONV_OPS = {"Conv", "FusedConv", "NchwcConv"}  # onnxruntime's fusions of a Conv count as Conv
PAGE = ROOT / "docs" / "reparam.md"


def build(name: str, seed: int):
    """(training-form module, deploy module or None, input, how the deploy form was made)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    if name in TIMM:
        import timm
        from timm.utils.model import reparameterize_model

        torch.manual_seed(seed)
        net = timm.create_model(name, pretrained=False, num_classes=10).eval()
        randomize_bn(net, seed)
        return net, reparameterize_model(copy.deepcopy(net)).eval(), torch.randn(*IMAGE, generator=g), \
            "timm reparameterize_model"
    import reparam_blocks as rb

    torch.manual_seed(seed)
    if name == "textnet":
        import transformers

        inner = transformers.TextNetBackbone(transformers.TextNetConfig()).eval()
        randomize_bn(inner, seed)

        class TextNet(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, pixel_values):
                return tuple(self.m(pixel_values=pixel_values, return_dict=True).feature_maps)

        return TextNet(inner).eval(), TextNet(rb.reparameterize_textnet(inner)).eval(), \
            torch.randn(*IMAGE, generator=g), "reparam_blocks.reparameterize_textnet"
    if name == "repncspelan4":
        net = rb.RepNCSPELAN4().eval()
        randomize_bn(net, seed)
        return net, rb.reparameterize_yolo(net), torch.randn(1, 64, 40, 40, generator=g), \
            "reparam_blocks.reparameterize_yolo"
    if name == "ecapa":
        net = rb.EcapaMini().eval()
        randomize_bn(net, seed)
        return net, None, torch.randn(1, 40, 200, generator=g), "n/a"
    raise SystemExit(f"unknown model {name!r}; known: {' '.join(MODELS)}")


def export(module, x, dynamo: bool) -> onnx.ModelProto:
    import io

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            return torch.onnx.export(module, (x,), dynamo=True, optimize=False, verbose=False).model_proto
        buf = io.BytesIO()
        torch.onnx.export(module, (x,), buf, dynamo=False, do_constant_folding=False)
    return onnx.load_from_string(buf.getvalue())


def counts(m: onnx.ModelProto) -> dict[str, int]:
    c = Counter(n.op_type for n in m.graph.node)
    return {"bn": c["BatchNormalization"], "conv": sum(c[o] for o in CONV_OPS), "fusedconv": c["FusedConv"],
            "nodes": len(m.graph.node)}


def run_ort(path: Path, x: np.ndarray) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})


def ort_offline(src: Path, level, dst: Path) -> onnx.ModelProto:
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.optimized_model_filepath = str(dst)
    so.intra_op_num_threads = 1
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    return onnx.load(str(dst))


def rel_err(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(r - g)) / max(np.max(np.abs(r)), 1e-30)) for r, g in zip(ref, got))


def measure(name: str, seed: int, dynamo: bool, work: Path) -> dict:
    import onnxslim
    import torch

    exporter = "dynamo" if dynamo else "legacy"
    out = work / f"{name}-{exporter}"
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"model": name, "exporter": exporter}
    net, deploy, x, how = build(name, seed)
    res["deploy_how"] = how
    t = time.perf_counter()
    try:
        model = export(net, x, dynamo)
    except Exception as exc:  # a failed export is a result, reported as such
        res["error"] = f"export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        return res
    res["export_s"] = round(time.perf_counter() - t, 1)
    onnx.save(model, str(out / "original.onnx"))
    res["original"] = counts(model)
    t = time.perf_counter()
    folded, report = fold_model(model)
    res["fold_s"] = round(time.perf_counter() - t, 2)
    onnx.save(folded, str(out / "onnxfold.onnx"))
    res["onnxfold"] = counts(folded)
    res["rules"] = dict(Counter(f.rule for f in report.folded))
    res["declined"] = [f"{d.rule} {d.producer} -> {d.consumer}: {d.reason}" for d in report.declined]
    res["left"] = dict(Counter(x.reason for x in report.left))
    for level, key in ((ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "ort_basic"),
                       (ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "ort_extended")):
        try:
            res[key] = counts(ort_offline(out / "original.onnx", level, out / f"{key}.onnx"))
        except Exception as exc:
            res[key] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    try:
        res["onnxslim"] = counts(onnxslim.slim(model))
    except Exception as exc:
        res["onnxslim"] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    xn = x.numpy()
    ref, got = run_ort(out / "original.onnx", xn), run_ort(out / "onnxfold.onnx", xn)
    res["err_vs_original"] = rel_err(ref, got)
    if deploy is not None:
        with torch.no_grad():
            dout = deploy(x)
        dout = [t.numpy() for t in (dout if isinstance(dout, tuple) else (dout,))]
        res["err_vs_deploy"] = rel_err(dout, got)
        try:
            dmodel = export(deploy, x, dynamo)
            onnx.save(dmodel, str(out / "deploy.onnx"))
            res["deploy"] = counts(dmodel)
        except Exception as exc:
            res["deploy"] = {"error": f"export failed: {type(exc).__name__}"}
    np.save(out / "input.npy", xn)
    return res


def latency(work: Path, key: str, runs: int) -> dict:
    out = work / key
    x = np.load(out / "input.npy")
    sessions = {}
    for which in ("original", "onnxfold"):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        s = ort.InferenceSession(str(out / f"{which}.onnx"), so, providers=["CPUExecutionProvider"])
        sessions[which] = (s, {s.get_inputs()[0].name: x})
    times: dict[str, list[float]] = {"original": [], "onnxfold": []}
    for _ in range(3):
        for s, feed in sessions.values():
            s.run(None, feed)
    for i in range(runs):
        for which in (("original", "onnxfold") if i % 2 == 0 else ("onnxfold", "original")):
            s, feed = sessions[which]
            t = time.perf_counter()
            s.run(None, feed)
            times[which].append(time.perf_counter() - t)
    o, f = statistics.median(times["original"]) * 1e3, statistics.median(times["onnxfold"]) * 1e3
    return {"original_ms": o, "onnxfold_ms": f, "runs": runs}


def _cell(d: dict | None, k: str) -> str:
    if not d:
        return "n/a"
    if "error" in d:
        return "failed"
    v = d[k]
    if k == "conv" and d.get("fusedconv"):
        return f"{v} ({d['fusedconv']} Fused)"
    return str(v)


def page(results: list[dict]) -> str:
    lines = [
        "# Re-parameterizable models: onnxfold, onnxruntime, onnxslim and the deploy form",
        "",
        "<!-- generated by tools/measure_reparam.py, do not edit by hand -->",
        "Generated by `python tools/measure_reparam.py` (do not edit by hand). Each model is in training",
        "form (branches not merged), eval mode, every BatchNorm's statistics random and non-trivial, exported",
        "by torch's legacy exporter (`dynamo=False, do_constant_folding=False`) and by dynamo",
        "(`dynamo=True, optimize=False`). Image models take 1x3x128x128; the RepNCSPELAN4 block (YOLOv9)",
        "1x64x40x40; the ECAPA-TDNN block (speechbrain-style Conv1d with reflect padding) 1x40x200.",
        "Torch blocks and their own re-parameterizations: `tools/reparam_blocks.py`.",
        "",
        "Counts are BatchNormalization / Conv nodes. `ORT basic` and `ORT ext.` are the models onnxruntime",
        "writes with `optimized_model_filepath` at ORT_ENABLE_BASIC and ORT_ENABLE_EXTENDED (CPU); EXTENDED",
        "fuses Conv + activation into `FusedConv` (com.microsoft), counted here as Conv. `deploy` is the",
        "Conv count of the framework's own re-parameterization exported the same way (timm's",
        "`reparameterize_model`; for TextNet and RepNCSPELAN4 the merge in `tools/reparam_blocks.py`; the",
        "ECAPA block has none). `err vs deploy` / `err vs orig.`: the largest output difference of",
        "onnxfold's model, relative to the largest output, against the deploy module run in torch and",
        "against the original export run in onnxruntime (ORT_DISABLE_ALL).",
        "",
        "| model | export | BN orig. | BN onnxfold | BN ORT basic | BN ORT ext. | BN onnxslim | BN deploy "
        "| Conv orig. | Conv onnxfold | Conv ORT basic | Conv ORT ext. | Conv onnxslim | Conv deploy "
        "| nodes orig. / onnxfold / deploy | err vs deploy | err vs orig. |",
        "|---|---|" + "---:|" * 15,
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['exporter']} | {r['error']} |" + " |" * 12)
            continue
        keys = ("original", "onnxfold", "ort_basic", "ort_extended", "onnxslim", "deploy")
        bn = [_cell(r.get(k), "bn") for k in keys]
        conv = [_cell(r.get(k), "conv") for k in keys]
        nodes = " / ".join(_cell(r.get(k), "nodes") for k in ("original", "onnxfold", "deploy"))
        ed = f"{r['err_vs_deploy']:.1e}" if "err_vs_deploy" in r else "n/a"
        lines.append(f"| {r['model']} | {r['exporter']} | " + " | ".join(bn + conv)
                     + f" | {nodes} | {ed} | {r['err_vs_original']:.1e} |")
    timed = [r for r in results if "latency" in r]
    if timed:
        runs = min(r["latency"]["runs"] for r in timed)
        lines += [
            "",
            "## Latency",
            "",
            f"onnxruntime {ort.__version__}, ORT_ENABLE_ALL, CPUExecutionProvider, one intra-op and one",
            "inter-op thread, batch 1; after 3 warm-up runs each, the original and onnxfold's model run",
            f"alternately (the order flipped every round), median of {runs} runs each, on this machine's",
            "shared CPU (2 cores): ratios within a few per cent are noise.",
            "",
            "| model | export | original ms | onnxfold ms | onnxfold / original |",
            "|---|---|---:|---:|---:|",
        ]
        for r in timed:
            lat = r["latency"]
            lines.append(f"| {r['model']} | {r['exporter']} | {lat['original_ms']:.2f} | {lat['onnxfold_ms']:.2f} "
                         f"| {lat['onnxfold_ms'] / lat['original_ms']:.2f} |")
    lines += [
        "",
        "## Notes",
        "",
        "- Dynamo exports with `optimize=False` give a Conv without bias a bias computed at run time",
        "  (`Shape -> Expand` of a zero), which onnxruntime's Conv+BatchNormalization fusion and onnxslim",
        "  do not treat as a constant: they leave every BatchNormalization of those exports; onnxfold reads",
        "  the computed zero and folds them.",
        "- `BN deploy` is not 0 where the framework's re-parameterization merges only the branches and",
        "  leaves the other Conv+BatchNorm pairs to the exporter (timm's repghostnet and fastvit; exported",
        "  here without constant folding). The Conv counts are what compare.",
        "- repghostnet's extra branch is a BatchNorm of the Conv's input added after it; timm's own merge",
        "  does not remove a Conv either, so the Conv count does not drop.",
        "- repvit_m0_9: onnxfold's model has one Gemm, Add, Div and Constant more than the deploy form: the",
        "  distilled classifier `(head(x) + head_dist(x)) / 2` is two Gemm of one input, which timm's",
        "  `fuse()` averages into one Linear; `branch_sum` merges Conv branches only.",
        "- The ECAPA block: the BatchNorm before the final kernel-1 Conv1d reaches it through a reflect",
        "  Pad of amount 0 and folds (`bn_pad_conv`); the other BatchNorms follow a ReLU and feed residual",
        "  Adds, Res2Net chunks that meet an Add or the Concat, the SE product or the pooling statistics:",
        "  no tool folds them, and no re-parameterization exists.",
    ]
    lines += ["", "## What onnxfold declined or left", ""]
    for r in results:
        if "error" in r:
            continue
        rules = ", ".join(f"{k} {v}" for k, v in sorted(r["rules"].items()))
        lines.append(f"- **{r['model']} ({r['exporter']})**: folded {rules or 'nothing'}; "
                     f"declined {len(r['declined'])}; left without a producer {sum(r['left'].values())}.")
        for reason, n in Counter(d.split(": ", 1)[1] for d in r["declined"]).most_common(4):
            lines.append(f"  - {n} x declined: {reason}")
        for reason, n in sorted(r["left"].items(), key=lambda kv: -kv[1]):
            lines.append(f"  - {n} x left: {reason}")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "onnxfold-reparam")
    p.add_argument("--only", nargs="+", default=MODELS)
    p.add_argument("--no-dynamo", action="store_true")
    p.add_argument("--counts", action="store_true")
    p.add_argument("--latency", action="store_true")
    p.add_argument("--runs", type=int, default=31)
    p.add_argument("--page", action="store_true")
    a = p.parse_args(argv)
    if not (a.counts or a.latency or a.page):
        a.counts = a.latency = a.page = True
    logging.getLogger("torch").setLevel(logging.ERROR)
    a.work.mkdir(parents=True, exist_ok=True)
    results_path = a.work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if a.counts:
        import torch

        torch.set_num_threads(1)
        stand_in = Path(tempfile.mkdtemp())
        (stand_in / "torchvision").mkdir()
        (stand_in / "torchvision" / "__init__.py").write_text(TORCHVISION_STAND_IN)
        sys.path.insert(0, str(stand_in))
        for name in a.only:
            for dynamo in (False,) if a.no_dynamo else (False, True):
                key = f"{name}-{'dynamo' if dynamo else 'legacy'}"
                try:
                    results[key] = measure(name, 1000 + MODELS.index(name), dynamo, a.work)
                except Exception:
                    traceback.print_exc()
                    results[key] = {"model": name, "exporter": key.split("-")[1],
                                    "error": "measurement failed (traceback on stderr)"}
                r = results[key]
                print(key, {k: r.get(k) for k in ("error", "original", "onnxfold", "ort_extended", "onnxslim",
                                                  "deploy", "err_vs_deploy", "err_vs_original")}, flush=True)
                results_path.write_text(json.dumps(results, indent=1))
    if a.latency:
        for key, r in results.items():
            if r["model"] in a.only and "error" not in r and (a.work / key / "onnxfold.onnx").exists():
                r["latency"] = latency(a.work, key, a.runs)
                print(key, r["latency"], flush=True)
                results_path.write_text(json.dumps(results, indent=1))
    if a.page:
        order = {m: i for i, m in enumerate(MODELS)}
        rows = sorted(results.values(), key=lambda r: (order.get(r["model"], 99), r["exporter"] != "legacy"))
        PAGE.write_text(page(rows))
        print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
