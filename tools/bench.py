#!/usr/bin/env python
"""Benchmark onnxfold against the tools people use today to fold BatchNormalization.

One command regenerates everything (models are generated when missing):

    python tools/bench.py            # full run -> docs/benchmarks.md, docs/benchmarks{,_corpus}.png
    python tools/bench.py --quick    # small models, 1 timed run, no 2 GiB model
                                     # -> build/bench/quick/benchmarks.md (+ .png)

Re-measure only some tools (e.g. once the onnxfold CLI exists) and merge them
into the last full run's results, then re-render the report:

    python tools/bench.py --tools floor onnxfold --merge

Then, when the corpus cache exists (``--corpus DIR``, ``--no-corpus`` to skip), every corpus model as whole
processes against onnxruntime, and the start-up of a fresh process: tools/bench_corpus.py.

Every tool runs as a whole fresh process, as a user would run it:

  floor            python -c: onnx.load + onnx.save (nothing else)
  onnxfold         python -m onnxfold IN OUT --no-verify
  onnxoptimizer    python -c: onnx.load; onnxoptimizer.optimize(m, ["fuse_bn_into_conv"]); onnx.save
  onnxruntime      python -c: SessionOptions(ORT_ENABLE_BASIC, optimized_model_filepath=OUT); InferenceSession
  onnxscript       python -c: ir.load; onnxscript.rewriter.rewrite(m, fuse_batchnorm_* rules); ir.save
  onnxslim-bn      python -c: onnxslim.slim with every optimization and fusion pattern skipped
                   except FusionConvBN / FusionConvTransposeBN, no shape inference
  onnxslim         python -m onnxslim IN OUT (default settings)

For models whose weights live in external data, every tool is told to write
external data (the flag each tool has for it); onnxfold decides by itself.

The harness itself imports no ONNX package: models are generated, converted and
evaluated in child processes (tools/bench_models.py, tools/bench_eval.py), so
it never holds a model in memory.  Wall time is measured around the child
process (spawn to reap); peak memory is the child's ru_maxrss from wait4().
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS_DIR = ROOT / "tools"
BUILD = ROOT / "build"
PY = sys.executable

sys.path.insert(0, str(TOOLS_DIR))
import bench_corpus  # noqa: E402  (stdlib only)
import bench_models  # noqa: E402  (stdlib + numpy only at import time)

# --------------------------------------------------------------------------
# the tools, each a fresh process: argv builders get (IN, OUT, external)
# --------------------------------------------------------------------------

_FLOOR = r"""
import os, sys, onnx
src, dst, ext = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
m = onnx.load(src)
onnx.save(m, dst, save_as_external_data=ext, all_tensors_to_one_file=True,
          location=os.path.basename(dst) + ".data")
"""

_ONNXOPTIMIZER = r"""
import os, sys, onnx, onnxoptimizer
src, dst, ext = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
m = onnx.load(src)
m = onnxoptimizer.optimize(m, ["fuse_bn_into_conv"])
onnx.save(m, dst, save_as_external_data=ext, all_tensors_to_one_file=True,
          location=os.path.basename(dst) + ".data")
"""

# onnxruntime's offline optimizer, one model: the "onnxruntime" tool runs it once a process, the corpus's
# folder section (tools/bench_corpus.py) once a model in one process (ORT_LOOP)
_ORT_OPTIMIZE = r"""
import json, os, sys, onnxruntime as ort
def optimize(src, dst, ext):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = dst
    if ext:
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                    os.path.basename(dst) + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
"""
_ORT = _ORT_OPTIMIZE + 'optimize(sys.argv[1], sys.argv[2], sys.argv[3] == "1")\n'
ORT_LOOP = _ORT_OPTIMIZE + r"""
for src, dst, ext in json.load(open(sys.argv[1])):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    optimize(src, dst, ext)
"""

_ONNXSCRIPT = r"""
import os, sys
import onnx_ir as ir
from onnxscript.rewriter import rewrite
from onnxscript.rewriter.rules.common import (
    fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_conv_transpose_rule,
    fuse_batchnorm_into_gemm_rule)
src, dst, ext = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
m = ir.load(src)
m = rewrite(m, [fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_conv_transpose_rule,
                fuse_batchnorm_into_gemm_rule])
ir.save(m, dst, external_data=(os.path.basename(dst) + ".data") if ext else None)
"""

_ONNXSLIM_BN = r"""
import sys, onnxslim
from onnxslim.core.pattern.registry import DEFAULT_FUSION_PATTERNS
src, dst, ext = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
keep = {"FusionConvBN", "FusionConvTransposeBN"}
onnxslim.slim(src, dst, no_shape_infer=True, save_as_external_data=ext,
              skip_optimizations=["constant_folding", "dead_node_elimination",
                                  "subexpression_elimination", "weight_tying"],
              skip_fusion_patterns=[p for p in DEFAULT_FUSION_PATTERNS if p not in keep])
"""


def _pyc(code):
    return lambda src, dst, ext: [PY, "-c", code, src, dst, "1" if ext else "0"]


TOOLS = {
    # name: (argv builder, distribution to check / report, description)
    "floor": (_pyc(_FLOOR), "onnx", "onnx.load + onnx.save (the floor)"),
    "onnxfold": (lambda s, d, e: [PY, "-m", "onnxfold", s, d, "--no-verify"], "onnxfold",
                 "`python -m onnxfold IN OUT --no-verify`"),
    "onnxfold-verified": (lambda s, d, e: [PY, "-m", "onnxfold", s, d], "onnxfold",
                          "`python -m onnxfold IN OUT` (verification, the default: not a peer, onnxfold as "
                          "most users run it)"),
    "onnxoptimizer": (_pyc(_ONNXOPTIMIZER), "onnxoptimizer",
                      "onnxoptimizer.optimize(model, [\"fuse_bn_into_conv\"])"),
    "onnxruntime": (_pyc(_ORT), "onnxruntime",
                    "onnxruntime offline optimizer, ORT_ENABLE_BASIC + optimized_model_filepath"),
    "onnxscript": (_pyc(_ONNXSCRIPT), "onnxscript",
                   "onnxscript.rewriter.rewrite with fuse_batchnorm_into_{conv,conv_transpose,gemm}_rule"),
    "onnxslim-bn": (_pyc(_ONNXSLIM_BN), "onnxslim",
                    "onnxslim.slim, everything skipped except FusionConvBN/FusionConvTransposeBN, "
                    "no shape inference (closest to \"fold BN only\")"),
    "onnxslim": (lambda s, d, e: [PY, "-m", "onnxslim", s, d] + (["--save-as-external-data"] if e else []),
                 "onnxslim", "`python -m onnxslim IN OUT` (default settings)"),
}
TOOL_ORDER = list(TOOLS)
BIG_FULL = ("floor", "onnxfold", "onnxruntime")  # full repeats on big models too (the targets' ratios)
PEERS = [t for t in TOOL_ORDER if t not in ("floor", "onnxfold-verified")]

VERSION_DISTS = ["onnx", "onnxruntime", "onnxscript", "onnx-ir", "onnxoptimizer", "onnxslim",
                 "onnxfold", "torch", "numpy", "protobuf", "matplotlib"]


def dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def tool_installed(tool: str) -> bool:
    if tool == "onnxfold":  # the project itself: run from the repo root
        return True
    dist = TOOLS[tool][1]
    return dist_version(dist) is not None


# --------------------------------------------------------------------------
# running a process and measuring it
# --------------------------------------------------------------------------

MEM_LIMIT_MIB = 16 * 1024  # a tool process above this is killed (the machine is shared)


def _rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_measured(argv: list[str], timeout: float, cwd: Path = ROOT) -> dict:
    """Run argv as a fresh process; wall seconds, peak RSS (ru_maxrss of wait4) and status.

    A watchdog thread kills the process group past `timeout` seconds or past
    MEM_LIMIT_MIB of resident memory; the measurement itself comes from the kernel
    (wait4's rusage), not from the polling.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                             start_new_session=True)
        done = threading.Event()
        killed = {}

        def watchdog():
            while not done.wait(0.25):
                why = None
                if time.perf_counter() - t0 > timeout:
                    why = "timed out"
                elif _rss_mib(p.pid) > MEM_LIMIT_MIB:
                    why = f"killed by the harness above {MEM_LIMIT_MIB / 1024:g} GiB resident"
                if why:
                    killed["why"] = why
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    return

        th = threading.Thread(target=watchdog, daemon=True)
        th.start()
        try:
            _, status, ru = os.wait4(p.pid, 0)
        finally:
            done.set()
            th.join()
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read().decode("utf-8", "replace")
        out.seek(0)
        stdout = out.read().decode("utf-8", "replace")
    rss_kib = ru.ru_maxrss if sys.platform != "darwin" else ru.ru_maxrss // 1024
    return {"wall_s": wall, "rss_mib": rss_kib / 1024, "rc": p.returncode,
            "killed": killed.get("why"), "stderr": stderr, "stdout": stdout}


def short_error(res: dict) -> str:
    """One short line from a failed run's output."""
    if res.get("killed"):
        return res["killed"]
    if res["rc"] < 0:
        sig = -res["rc"]
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        return f"killed by {name}" + (" (out of memory?)" if sig == 9 else "")
    text = (res["stderr"] + "\n" + res["stdout"]).strip().splitlines()
    lines = [ln.strip() for ln in text if ln.strip()]
    # prefer the last "SomethingError: ..." line of a traceback
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Fail", "InvalidGraph", "InvalidArgument")) and " " not in head:
            return ln[:160]
    return (lines[-1][:160] if lines else f"exit code {res['rc']}")


def rm_model(path: Path) -> None:
    """Remove a tool's output: each output lives alone in its own folder (with its data file,
    whatever the tool named it)."""
    if path.parent.exists():
        shutil.rmtree(path.parent)
    path.parent.mkdir(parents=True)


def external_files(path: Path) -> int:
    """Total bytes written by the tool (the model file and its external data)."""
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file())


def measure_tool(tool: str, src: Path, dst: Path, ext: bool, warmup: int, repeat: int,
                 timeout: float, log) -> dict:
    if not tool_installed(tool):
        return {"ok": False, "error": "not installed"}
    argv = TOOLS[tool][0](str(src), str(dst), ext)
    report = dst.parent.parent / f"{tool}.report.json"  # onnxfold's per-phase timings (not beside the output)
    if tool.startswith("onnxfold"):
        argv += ["--report", str(report)]
    load_before = os.getloadavg()[0]
    runs, timings = [], []
    for i in range(warmup + repeat):
        rm_model(dst)
        report.unlink(missing_ok=True)
        r = run_measured(argv, timeout)
        if i >= warmup and report.exists():
            timings.append(json.loads(report.read_text()).get("timings", {}))
        ok = r["rc"] == 0 and dst.exists()
        if not ok:
            msg = short_error(r) if r["rc"] != 0 else "exited 0 but wrote no model"
            if tool == "onnxfold" and ("No module named onnxfold" in r["stderr"]
                                       or "No module named 'onnxfold" in r["stderr"]
                                       or "cannot be directly executed" in r["stderr"]):
                msg = "not available (no onnxfold CLI yet)"
            log(f"    {tool}: FAILED after {r['wall_s']:.1f}s, {r['rss_mib']:.0f} MiB: {msg}")
            rm_model(dst)
            return {"ok": False, "error": msg, "wall_s": r["wall_s"], "rss_mib": r["rss_mib"],
                    "stderr_tail": (r["stderr"][-1500:])}
        if i >= warmup:
            runs.append(r)
        log(f"    {tool}: run {i + 1}/{warmup + repeat}{' (warm-up)' if i < warmup else ''}: "
            f"{r['wall_s']:.2f}s, {r['rss_mib']:.0f} MiB")
    walls = [r["wall_s"] for r in runs]
    rss = [r["rss_mib"] for r in runs]
    return {"ok": True, "runs": len(runs), "wall_median_s": statistics.median(walls),
            "wall_min_s": min(walls), "wall_max_s": max(walls),
            "rss_median_mib": statistics.median(rss), "rss_max_mib": max(rss),
            "out_bytes": external_files(dst),
            "phases": {k: statistics.median(t.get(k, 0.0) for t in timings)
                       for k in sorted({k for t in timings for k in t})},
            # 1-minute load average before and after: other work on the machine shows here
            "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def run_eval(original: Path, ref: Path, candidates: dict, workdir: Path, quick: bool,
             timeout: float, big: bool = False) -> dict:
    """Evaluate in a child process. For big models the models are measured one at a time
    and the original's output is cached in workdir (measure the original first)."""
    spec = {"original": str(original), "ref": str(ref),
            "candidates": {k: str(v) for k, v in candidates.items()},
            "latency_min_runs": 3 if quick else 10, "latency_seconds": 0.2 if quick else 2.0,
            "interleave": not big}
    if big:
        spec["original_out"] = str(workdir / f"{original.stem}.original_out.npy")
    spec_p = workdir / "eval_spec.json"
    res_p = workdir / "eval_result.json"
    spec_p.write_text(json.dumps(spec))
    if res_p.exists():
        res_p.unlink()
    r = run_measured([PY, str(TOOLS_DIR / "bench_eval.py"), str(spec_p), str(res_p)], timeout)
    if r["rc"] != 0 or not res_p.exists():
        return {"fatal": short_error(r)}
    return json.loads(res_p.read_text())


# --------------------------------------------------------------------------
# machine description
# --------------------------------------------------------------------------

def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                ram = int(line.split()[1]) / 1024 / 1024
                break
    except OSError:
        pass
    versions = {d: dist_version(d) for d in VERSION_DISTS}
    versions["python"] = platform.python_version()
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        rev = ""
    try:
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "onnxfold"], cwd=ROOT,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except Exception:  # noqa: BLE001
        dirty = False
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": ram, "os": platform.platform(),
            "versions": versions, "git_rev": rev or None, "onnxfold_dirty": dirty}


def compile_bytecode() -> dict:
    """Compile onnxfold's modules to bytecode (``__pycache__``), as ``pip install`` does: an editable
    install where PYTHONDONTWRITEBYTECODE is set (this machine, many container images) otherwise
    compiles its ~50 modules from source at every start (about 0.07 s here), which no installed user
    pays. onnx, numpy and onnxruntime come compiled from their wheels."""
    proc = subprocess.run([PY, "-m", "compileall", "-q", str(ROOT / "onnxfold")], capture_output=True, text=True)
    return {"dont_write_bytecode_env": bool(os.environ.get("PYTHONDONTWRITEBYTECODE")),
            "compiled": proc.returncode == 0}


# --------------------------------------------------------------------------
# main loop
# --------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="small models, 1 timed run without warm-up, no 2 GiB model (development)")
    ap.add_argument("--models", nargs="*", default=None, help=f"subset of {bench_models.FULL}")
    ap.add_argument("--tools", nargs="*", default=None, help=f"subset of {TOOL_ORDER}")
    ap.add_argument("--repeat", type=int, default=None, help="timed runs per tool x model (default 5; quick 1)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up runs (default 1; quick 0)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per tool run (default 1800; quick 120)")
    ap.add_argument("--merge", action="store_true",
                    help="merge into the existing results.json instead of starting afresh")
    ap.add_argument("--mem-limit-gib", type=float, default=16,
                    help="kill a tool process whose resident memory exceeds this (default 16)")
    ap.add_argument("--big-mb", type=float, default=1000,
                    help="models larger than this (MB) are evaluated one tool at a time and their "
                         "outputs deleted right away (default 1000)")
    ap.add_argument("--keep-outputs", action="store_true",
                    help="keep each tool's output model under build/bench/*/out/ (default: deleted after evaluation)")
    ap.add_argument("--report-only", action="store_true", help="re-render the report from results.json")
    ap.add_argument("--models-dir", type=Path, default=None)
    ap.add_argument("--docs-dir", type=Path, default=None,
                    help="where benchmarks.md/.png go (default docs/; quick: build/bench/quick/)")
    ap.add_argument("--big-repeat", type=int, default=3,
                    help="on models above --big-mb, timed runs (and no warm-up) for the peers other than "
                         "onnxruntime, which take up to 30 s a run there (default 3)")
    ap.add_argument("--corpus", type=Path, default=bench_corpus.DEFAULT_DIR,
                    help="the corpus cache (default $ONNXFOLD_CORPUS or ~/.cache/onnxfold-corpus)")
    ap.add_argument("--no-corpus", action="store_true", help="skip the corpus and start-up sections")
    ap.add_argument("--corpus-models", nargs="*", default=None,
                    help="only the corpus models whose name contains one of these (timm/densenet, detr)")
    ap.add_argument("--corpus-rounds", type=int, default=None, help="timed rounds (default 5; quick 1)")
    ap.add_argument("--corpus-warmup", type=int, default=None, help="warm-up rounds (default 1; quick 0)")
    return ap


@dataclass
class Plan:
    """What one run measures, where, and how often (the command line's defaults filled in)."""

    quick: bool
    models_dir: Path
    work: Path  # build/bench/{quick,full}: results.json, the tools' outputs
    docs_dir: Path
    warmup: int
    repeat: int
    timeout: float
    models: list[str]
    tools: list[str]
    big_mb: float
    keep_outputs: bool
    big_repeat: int = 3

    @property
    def results_path(self) -> Path:
        return self.work / "results.json"


def _plan(a: argparse.Namespace) -> Plan:
    quick = a.quick
    work = BUILD / "bench" / ("quick" if quick else "full")
    return Plan(
        quick=quick,
        models_dir=a.models_dir or (bench_models.DEFAULT_OUT / "quick" if quick else bench_models.DEFAULT_OUT),
        work=work,
        docs_dir=a.docs_dir or (work if quick else ROOT / "docs"),
        warmup=a.warmup if a.warmup is not None else (0 if quick else 1),
        repeat=a.repeat if a.repeat is not None else (1 if quick else 5),
        timeout=a.timeout or (120 if quick else 1800),
        # in --quick the external-data model is a few MB (same code path, not 2 GiB)
        models=a.models or bench_models.FULL,
        tools=a.tools or TOOL_ORDER,
        big_mb=a.big_mb,
        keep_outputs=a.keep_outputs,
        big_repeat=min(a.big_repeat, a.repeat if a.repeat is not None else (1 if quick else 5)),
    )


def log(msg: str) -> None:
    print(msg, flush=True)


def main(argv=None):
    ap = _parser()
    a = ap.parse_args(argv)
    global MEM_LIMIT_MIB
    MEM_LIMIT_MIB = a.mem_limit_gib * 1024
    plan = _plan(a)
    plan.work.mkdir(parents=True, exist_ok=True)
    for t in plan.tools:
        if t not in TOOLS:
            ap.error(f"unknown tool {t!r}; choose from {TOOL_ORDER}")

    if a.report_only:
        import bench_report

        bench_report.render(json.loads(plan.results_path.read_text()), plan.docs_dir, _readme(plan))
        return 0

    results, run_idx = _start_results(plan, a.merge)
    results["machine"]["bytecode"] = compile_bytecode()
    t_start = time.perf_counter()
    meta = _ensure_models(plan)  # 1. models (generated in a child process)
    for model in plan.models:  # 2. tools x models
        _bench_model(plan, model, results, meta, run_idx)
        plan.results_path.write_text(json.dumps(results, indent=1))

    if not a.no_corpus and (a.corpus / "manifest.json").exists():  # 3. the corpus, 4. start-up
        _bench_corpus(plan, a, results)
        plan.results_path.write_text(json.dumps(results, indent=1))
    elif not a.no_corpus:
        log(f"[bench] no corpus at {a.corpus} (python tools/corpus.py builds it): corpus section skipped")
    results["runs"][-1]["seconds"] = round(time.perf_counter() - t_start, 1)
    plan.results_path.write_text(json.dumps(results, indent=1))
    log(f"[bench] measured in {results['runs'][-1]['seconds']:.0f} s; results in {plan.results_path}")

    import bench_report

    md, png = bench_report.render(results, plan.docs_dir, _readme(plan))
    log(f"[bench] wrote {md}" + (f" and {png}" if png else ""))
    return 0


def _readme(plan: Plan) -> Path | None:
    """The README whose headline follows the page: only when the page written is the repository's own."""
    return ROOT / "README.md" if plan.docs_dir.resolve() == (ROOT / "docs").resolve() else None


def _bench_corpus(plan: Plan, a: argparse.Namespace, results: dict) -> None:
    entries = bench_corpus.corpus_models(a.corpus, a.corpus_models)
    # 5 rounds + 1 warm-up: one round of the 68 models takes ~85 s on 2 cores, so ~9 minutes in all
    rounds = a.corpus_rounds if a.corpus_rounds is not None else (1 if plan.quick else 5)
    warmup = a.corpus_warmup if a.corpus_warmup is not None else (0 if plan.quick else 1)
    log(f"[bench] corpus: {len(entries)} models from {a.corpus}, {warmup} warm-up + {rounds} timed rounds")
    results["corpus"] = bench_corpus.run_corpus(a.corpus, entries, plan.work, rounds, warmup,
                                                min(plan.timeout, 600), run_measured, TOOLS["onnxruntime"][0],
                                                short_error, log)
    results["folder"] = bench_corpus.run_folder(a.corpus, entries, plan.work, 1 if plan.quick else 3,
                                                min(plan.timeout, 1200), run_measured, ORT_LOOP, log)
    results["startup"] = bench_corpus.run_startup(3 if plan.quick else 7, run_measured, log)


def _start_results(plan: Plan, merge: bool) -> tuple[dict, int]:
    """The results to fill (the previous ones with ``--merge``), with this run recorded; its index."""
    results_p = plan.results_path
    results = json.loads(results_p.read_text()) if (merge and results_p.exists()) else {}
    results.setdefault("results", {})
    results.setdefault("models", {})
    results["machine"] = machine_info()
    results["quick"] = plan.quick
    results["settings"] = {"warmup": plan.warmup, "repeat": plan.repeat, "timeout_s": plan.timeout,
                           "big_mb": plan.big_mb, "big_repeat": plan.big_repeat, "big_full": list(BIG_FULL)}
    results["tools"] = {t: TOOLS[t][2] for t in TOOL_ORDER}
    results.setdefault("runs", []).append(
        {"started": _dt.datetime.now().isoformat(timespec="seconds"), "models": plan.models, "tools": plan.tools,
         "git_rev": results["machine"]["git_rev"], "onnxfold_dirty": results["machine"]["onnxfold_dirty"]})
    return results, len(results["runs"]) - 1


def _ensure_models(plan: Plan) -> dict:
    """Generate the missing models in a child process (the harness never imports torch/onnx); their
    metadata (models.json)."""
    models_dir = plan.models_dir
    missing = [m for m in plan.models if not all(p.exists() for p in bench_models.model_files(models_dir, m))]
    if missing:
        if "wide_ext" in missing and not plan.quick:
            free = shutil.disk_usage(models_dir.parent if models_dir.parent.exists() else ROOT).free
            log(f"[bench] generating the > 2 GiB model needs ~2.3 GB of disk; {free / 2**30:.0f} GiB free")
        cmd = [PY, str(TOOLS_DIR / "bench_models.py"), "--out", str(models_dir), "--only", *missing]
        if plan.quick:
            cmd.append("--quick")
        log(f"[bench] generating models: {' '.join(missing)}")
        subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads((models_dir / "models.json").read_text())


def _bench_model(plan: Plan, model: str, results: dict, meta: dict, run_idx: int) -> None:
    """Every tool on one model, each output evaluated. A big model's original is evaluated once up front
    and each output evaluated and deleted as soon as it is written, to keep disk use bounded."""
    models_dir, work = plan.models_dir, plan.work
    out_dir = work / "out"
    out_dir.mkdir(exist_ok=True)
    src = models_dir / f"{model}.onnx"
    ref = models_dir / f"{model}.ref.npz"
    ext = model == "wide_ext"
    size = bench_models_size(models_dir, model)
    big = size > plan.big_mb * 1e6
    results["models"][model] = dict(meta.get(model, {}), onnx_bytes=size, external_data=ext)
    log(f"[bench] {model}: {size / 1e6:.1f} MB{' (external data)' if ext else ''}")
    per_model = results["results"].setdefault(model, {})
    cache = work / f"{src.stem}.original_out.npy"
    if big:  # the original once, up front; its output is cached for the per-tool evals
        cache.unlink(missing_ok=True)
        ev = run_eval(src, ref, {}, work, plan.quick, plan.timeout, big)
        _merge_eval(per_model, results["models"][model], ev, log, model)
    done = {}
    for tool in plan.tools:
        dst = out_dir / model / tool / f"{model}.onnx"
        warmup, repeat = plan.warmup, plan.repeat
        if big and tool not in BIG_FULL:  # the slow peers: up to 30 s a run on a 2 GiB model
            warmup, repeat = 0, plan.big_repeat
        res = measure_tool(tool, src, dst, ext, warmup, repeat, plan.timeout, log)
        res["measured"] = _dt.datetime.now().isoformat(timespec="seconds")
        res["run"] = run_idx  # ratios are taken against the floor of the same run
        per_model[tool] = res
        if tool == "floor":
            results.setdefault("floors", {}).setdefault(model, {})[str(run_idx)] = res
        if res["ok"]:
            done[tool] = dst
            if big:  # evaluate now and delete, to keep disk use bounded
                ev = run_eval(src, ref, {tool: dst}, work, plan.quick, plan.timeout, big)
                _merge_eval(per_model, results["models"][model], ev, log, model)
                shutil.rmtree(dst.parent)
    if not big:
        ev = run_eval(src, ref, done, work, plan.quick, plan.timeout)
        _merge_eval(per_model, results["models"][model], ev, log, model)
        if not plan.keep_outputs:
            shutil.rmtree(out_dir / model, ignore_errors=True)
    else:
        cache.unlink(missing_ok=True)


def bench_models_size(models_dir: Path, model: str) -> int:
    return sum(p.stat().st_size for p in bench_models.model_files(models_dir, model)
               if p.exists() and not p.name.endswith(".npz"))


def _merge_eval(per_model: dict, model_meta: dict, ev: dict, log, model: str) -> None:
    if "fatal" in ev:
        log(f"    eval FAILED: {ev['fatal'][-300:]}")
        model_meta["eval_error"] = ev["fatal"][-300:]
        return
    if "original" in ev:
        model_meta["original_eval"] = ev["original"]
    for tool, r in ev.items():
        if tool == "original":
            continue
        per_model[tool]["eval"] = r
        bits = [f"BN left {r.get('bn')}", f"nodes {r.get('nodes')}"]
        if "vs_original" in r:
            bits.append(f"max abs vs original {r['vs_original'].get('max_abs', float('nan')):.3g}")
        for k in ("ort_off_error", "ort_default_error", "structure_error"):
            if k in r:
                bits.append(f"{k}: {r[k]}")
        log(f"    {tool}: " + ", ".join(bits))


if __name__ == "__main__":
    sys.exit(main())
