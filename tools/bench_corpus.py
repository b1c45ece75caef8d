"""tools/bench.py's corpus and start-up sections: every model of the real-model corpus as whole processes.

For every model in the corpus cache's manifest (built by ``python tools/corpus.py``; ``$ONNXFOLD_CORPUS``
or ``~/.cache/onnxfold-corpus``), as fresh processes exactly as a user runs them:

  onnxfold      python -m onnxfold IN OUT --report R          (verification, the default)
  onnxfold-nv   python -m onnxfold IN OUT --no-verify --report R
  onnxruntime   tools/bench.py's "onnxruntime" tool: SessionOptions(ORT_ENABLE_BASIC,
                optimized_model_filepath=OUT); InferenceSession, in a fresh ``python -c``
  floor-checked :data:`FLOOR_CHECKED`: what a tool keeping ``--no-verify``'s guarantees does at least,
                folding nothing (onnx.load, onnx.save, fsync, onnx.checker on the written file and an
                onnxruntime session of it, in the most favourable arrangement on two cores): where it is
                over 1x onnxruntime, no such tool can meet issue 20's ``--no-verify`` target
  floor-load    :data:`FLOOR_LOAD`: less still, a lower bound of any such tool: ``import onnx`` beside an
                onnxruntime session of the model (nothing read, folded, written or checked)

interleaved round-robin (each round runs every model, each model's variants in an order rotated from
round to round and model to model, as tools/bench_whole.py does), so that load from other work on the
machine falls on every variant alike. Per variant: the median wall time of the timed rounds (after the
warm-up rounds), peak memory, every run's exit code, and for onnxfold the median of each phase of its
``--report`` JSON ``timings``.

The start-up section: the median wall time of ``python -c pass``, ``python -c "import onnxruntime"``,
``python -c "import onnx"`` and ``python -m onnxfold --version``, and ``python -X importtime -m onnxfold
--version``'s biggest entries (cumulative, median over the runs) and its total.

This module imports only the standard library; tools/bench.py passes in its process runner.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

PY = sys.executable
VARIANTS = ("onnxfold", "onnxfold-nv", "onnxruntime", "floor-checked", "floor-load")
# the top-level phases of onnxfold's --report timings (the others are parts of these)
PHASES = ("startup_s", "lock_s", "load_s", "plan_s", "stage_s", "fold_s", "write_s", "verify_s", "check_s",
          "commit_s")
DEFAULT_DIR = Path(os.environ.get("ONNXFOLD_CORPUS") or Path.home() / ".cache" / "onnxfold-corpus").expanduser()
STARTUP_COMMANDS = {
    "python -c pass": [PY, "-c", "pass"],
    "python -c \"import onnxruntime\"": [PY, "-c", "import onnxruntime"],
    "python -c \"import onnx\"": [PY, "-c", "import onnx"],
    "python -m onnxfold --version": [PY, "-m", "onnxfold", "--version"],
}


# Both floors begin so: a child forked at interpreter start imports onnxruntime while the parent imports
# onnx, then makes a session of the path the parent sends it (CPU, optimizations off, as onnxfold's check
# of the written model); the parent ends with the child's verdict (_SESSION_END).
_SESSION_CHILD = r"""
import os, sys
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(w)
    import onnxruntime as ort
    path = os.read(r, 65536).decode()
    if not path:
        os._exit(3)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    os._exit(0)
os.close(r)
import onnx
"""
_SESSION_END = r"""
_, status = os.waitpid(pid, 0)
sys.exit(0 if status == 0 else 1)
"""

# The checked floor: a model read and written with onnx's own API, folded not at all, and given the checks
# `python -m onnxfold IN OUT --no-verify` gives it before exit 0: the files synced, onnx.checker on the
# written file, an onnxruntime session of it. Arranged as favourably as two cores allow: the session's
# process imports onnxruntime beside the onnx import, and the checker runs beside the session. No lock,
# no staging, no rename, no report.
FLOOR_CHECKED = _SESSION_CHILD + r"""
src, dst, ext = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
model = onnx.load(src)
onnx.save(model, dst, save_as_external_data=ext, all_tensors_to_one_file=True,
          location=os.path.basename(dst) + ".data")
for f in [dst] + ([dst + ".data"] if ext else []):
    fd = os.open(f, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
os.write(w, dst.encode())
os.close(w)
onnx.checker.check_model(dst)
""" + _SESSION_END

# The load floor: what any tool keeping those guarantees cannot do without, in Python with onnx and
# onnxruntime: onnx imported (to read and check the model) and an onnxruntime session of the model made
# in a process that imported onnxruntime meanwhile (the session of the written model cannot begin before
# the write, which follows the onnx import). The input stands in for the written model: nothing is read,
# folded, written or checked.
FLOOR_LOAD = _SESSION_CHILD + r"""
os.write(w, sys.argv[1].encode())
os.close(w)
""" + _SESSION_END


def model_name(entry: dict) -> str:
    """A manifest entry's name on the page: its file without the .onnx suffix (timm/densenet121_legacy)."""
    return entry["file"].removesuffix(".onnx")


def corpus_models(corpus_dir: Path, only: list[str] | None = None) -> list[dict]:
    """The manifest's entries whose file is present, those whose name contains one of `only` if given."""
    manifest = json.loads((corpus_dir / "manifest.json").read_text())
    entries = [e for e in manifest["models"] if (corpus_dir / e["file"]).exists()]
    if only:
        entries = [e for e in entries if any(o in model_name(e) for o in only)]
    return entries


def model_bytes(corpus_dir: Path, entry: dict) -> int:
    files = [entry["file"]] + ([entry["data_file"]] if entry.get("data_file") else [])
    return sum((corpus_dir / f).stat().st_size for f in files if (corpus_dir / f).exists())


def variant_argv(variant: str, src: str, dst: str, report: str, ext: bool,
                 ort_argv: Callable[[str, str, bool], list[str]]) -> list[str]:
    if variant == "onnxfold":
        return [PY, "-m", "onnxfold", src, dst, "--report", report]
    if variant == "onnxfold-nv":
        return [PY, "-m", "onnxfold", src, dst, "--no-verify", "--report", report]
    if variant == "floor-checked":
        return [PY, "-c", FLOOR_CHECKED, src, dst, "1" if ext else "0"]
    if variant == "floor-load":
        return [PY, "-c", FLOOR_LOAD, src]
    return ort_argv(src, dst, ext)


def rotated(items: tuple[str, ...] | list[str], k: int) -> list[str]:
    k %= len(items)
    return list(items[k:]) + list(items[:k])


def run_corpus(corpus_dir: Path, entries: list[dict], work: Path, rounds: int, warmup: int, timeout: float,
               run: Callable[..., dict], ort_argv: Callable[[str, str, bool], list[str]],
               short_error: Callable[[dict], str], log=print) -> dict:
    """Every entry x VARIANTS, `warmup` + `rounds` interleaved rounds; the raw runs and their medians."""
    t_start = time.perf_counter()
    raw: dict[str, dict[str, list[dict]]] = {model_name(e): {v: [] for v in VARIANTS} for e in entries}
    loads = []
    for i in range(warmup + rounds):
        loads.append(round(os.getloadavg()[0], 2))
        t_round = time.perf_counter()
        for j, e in enumerate(entries):
            name, src = model_name(e), str(corpus_dir / e["file"])
            for v in rotated(VARIANTS, i + j):
                out = work / "corpus_out" / v
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir(parents=True)
                report = work / "corpus_out" / f"{v}.report.json"
                report.unlink(missing_ok=True)
                dst = out / "out.onnx"
                r = run(variant_argv(v, src, str(dst), str(report), bool(e.get("data_file")), ort_argv),
                        timeout)
                wrote = dst.exists() or v == "floor-load"  # (which writes nothing)
                rec = {"wall_s": r["wall_s"], "rss_mib": r["rss_mib"], "rc": r["rc"], "wrote": wrote}
                if r["rc"] != 0 or not wrote:
                    rec["error"] = short_error(r) if r["rc"] != 0 else "exited 0 but wrote no model"
                if v.startswith("onnxfold") and report.exists():
                    try:
                        rec["timings"] = json.loads(report.read_text()).get("timings", {})
                    except ValueError:
                        pass
                if i >= warmup:
                    raw[name][v].append(rec)
        shutil.rmtree(work / "corpus_out", ignore_errors=True)
        log(f"[corpus] round {i + 1}/{warmup + rounds}{' (warm-up)' if i < warmup else ''}: "
            f"{len(entries)} models in {time.perf_counter() - t_round:.0f} s (load {loads[-1]:.2f})")
    models = {}
    for e in entries:
        name = model_name(e)
        models[name] = {"bytes": model_bytes(corpus_dir, e), "bn_nodes": e.get("bn_nodes"), "kind": e.get("kind"),
                        "external_data": bool(e.get("data_file")),
                        "variants": {v: summarize(raw[name][v]) for v in VARIANTS}}
    return {"dir": str(corpus_dir), "rounds": rounds, "warmup": warmup, "loadavg_1m": loads,
            "seconds": round(time.perf_counter() - t_start, 1), "models": models}


def summarize(runs: list[dict]) -> dict:
    """One variant on one model: median wall and memory, the exit codes, the median of each phase."""
    if not runs:
        return {"runs": 0}
    walls = [r["wall_s"] for r in runs]
    out = {"runs": len(runs), "wall_median_s": statistics.median(walls), "wall_min_s": min(walls),
           "wall_max_s": max(walls), "rss_median_mib": statistics.median(r["rss_mib"] for r in runs),
           "rcs": [r["rc"] for r in runs], "ok": all(r["rc"] == 0 and r["wrote"] for r in runs)}
    errors = [r["error"] for r in runs if r.get("error")]
    if errors:
        out["error"] = errors[-1]
    timed = [r["timings"] for r in runs if r.get("timings")]
    if timed:
        keys = {k for t in timed for k in t}
        out["phases"] = {k: statistics.median(t.get(k, 0.0) for t in timed) for k in sorted(keys)}
    return out


# --------------------------------------------------------------------------
# the corpus as one folder: start-up paid once
# --------------------------------------------------------------------------

FOLDER_VARIANTS = ("onnxfold", "onnxfold-nv", "onnxfold -j 2", "onnxruntime")


def folder_of_links(corpus_dir: Path, entries: list[dict], into: Path) -> Path:
    """The entries (and their data files) hard-linked (else copied) into one folder, in the corpus's
    layout: the folder ``python -m onnxfold IN OUT`` folds whole."""
    for e in entries:
        for f in [e["file"]] + ([e["data_file"]] if e.get("data_file") else []):
            (into / f).parent.mkdir(parents=True, exist_ok=True)
            try:  # not a symbolic link: onnxfold refuses a data file that leads out of the model's folder
                os.link(corpus_dir / f, into / f)
            except OSError:
                shutil.copyfile(corpus_dir / f, into / f)
    return into


def run_folder(corpus_dir: Path, entries: list[dict], work: Path, rounds: int, timeout: float,
               run: Callable[..., dict], ort_loop: str, log=print) -> dict:
    """The corpus as one folder, `rounds` interleaved rounds: ``python -m onnxfold IN OUT`` (verified,
    --no-verify, -j 2) against onnxruntime's offline optimizer over the same models in one process
    (``ort_loop``: tools/bench.py's ORT_LOOP, run with a JSON list of [src, dst, external data])."""
    src = folder_of_links(corpus_dir, entries, work / "folder_in")
    todo = [[str(src / e["file"]), str(work / "folder_out" / "onnxruntime" / e["file"]), bool(e.get("data_file"))]
            for e in entries]
    (work / "folder_todo.json").write_text(json.dumps(todo))
    argvs = {"onnxfold": [PY, "-m", "onnxfold", str(src), "{out}", "-q"],
             "onnxfold-nv": [PY, "-m", "onnxfold", str(src), "{out}", "-q", "--no-verify"],
             "onnxfold -j 2": [PY, "-m", "onnxfold", str(src), "{out}", "-q", "-j", "2"],
             "onnxruntime": [PY, "-c", ort_loop, str(work / "folder_todo.json")]}
    walls: dict[str, list[float]] = {v: [] for v in FOLDER_VARIANTS}
    rcs: dict[str, list[int]] = {v: [] for v in FOLDER_VARIANTS}
    for i in range(rounds):
        for v in rotated(FOLDER_VARIANTS, i):
            out = work / "folder_out"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            r = run([a.replace("{out}", str(out / "onnxfold")) for a in argvs[v]], timeout)
            walls[v].append(r["wall_s"])
            rcs[v].append(r["rc"])
        log(f"[folder] round {i + 1}/{rounds}: " + ", ".join(f"{v} {walls[v][-1]:.1f}s" for v in FOLDER_VARIANTS))
    shutil.rmtree(work / "folder_out", ignore_errors=True)
    shutil.rmtree(src, ignore_errors=True)
    return {"models": len(entries), "rounds": rounds,
            "variants": {v: {"wall_median_s": statistics.median(walls[v]), "wall_min_s": min(walls[v]),
                             "wall_max_s": max(walls[v]), "rcs": rcs[v]} for v in FOLDER_VARIANTS}}


# --------------------------------------------------------------------------
# start-up
# --------------------------------------------------------------------------

def parse_importtime(stderr: str) -> list[tuple[str, int, float, float]]:
    """``-X importtime`` lines as (module, depth, self s, cumulative s), in the order printed."""
    rows = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or line.count("|") != 2:
            continue
        self_us, cum_us, name = line[len("import time:"):].split("|")
        if not (self_us.strip().isdigit() and cum_us.strip().isdigit()):
            continue  # the header line
        depth = (len(name) - len(name.lstrip(" "))) // 2
        rows.append((name.strip(), depth, int(self_us) / 1e6, int(cum_us) / 1e6))
    return rows


def importtime_summary(runs: list[list[tuple[str, int, float, float]]], top: int = 10) -> dict:
    """The `top` entries by median cumulative time (a module's first import), and the median total: the
    sum of the outermost (depth 0) imports' cumulative times."""
    cums: dict[str, list[float]] = {}
    depth: dict[str, int] = {}
    totals = []
    for rows in runs:
        seen: set[str] = set()
        for name, d, _self, cum in rows:
            if name in seen:
                continue
            seen.add(name)
            cums.setdefault(name, []).append(cum)
            depth.setdefault(name, d)
        totals.append(sum(cum for _n, d, _s, cum in rows if d == 0))
    med = {n: statistics.median(v) for n, v in cums.items()}
    biggest = sorted(med, key=lambda n: med[n], reverse=True)[:top]
    return {"runs": len(runs), "total_s": statistics.median(totals) if totals else None,
            "top": [{"module": n, "depth": depth[n], "cumulative_s": med[n]} for n in biggest]}


def run_startup(repeat: int, run: Callable[..., dict], log=print) -> dict:
    """Interleaved: each command of STARTUP_COMMANDS and ``-X importtime -m onnxfold --version``, `repeat`
    times; median walls and the importtime summary."""
    walls: dict[str, list[float]] = {k: [] for k in STARTUP_COMMANDS}
    imports = []
    for _ in range(repeat):
        for label, argv in STARTUP_COMMANDS.items():
            r = run(argv, 120)
            if r["rc"] == 0:
                walls[label].append(r["wall_s"])
        r = run([PY, "-X", "importtime", "-m", "onnxfold", "--version"], 120)
        if r["rc"] == 0:
            imports.append(parse_importtime(r["stderr"]))
    medians = {k: statistics.median(v) for k, v in walls.items() if v}
    summary = importtime_summary(imports)
    log("[startup] " + ", ".join(f"{k} {v:.2f}s" for k, v in medians.items())
        + (f"; importtime total {summary['total_s']:.2f}s" if summary["total_s"] else ""))
    return {"repeat": repeat, "walls": medians, "importtime": summary}
