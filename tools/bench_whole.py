#!/usr/bin/env python
"""The whole process as a user runs it, against onnxruntime's offline optimizer and a bare load+save
(issue 20, item 2), with onnxfold's own per-phase timings (the ``--report`` JSON's "timings").

    python tools/bench_models.py --out /tmp/bm --only resnet50     # the ResNet-50-shaped model, once
    python tools/bench_whole.py /tmp/bm/resnet50.onnx --rounds 7   # -> a table on stdout
    python tools/bench_whole.py MODEL --json out.json              # and the raw numbers

Each round runs every variant once, as a fresh process writing a fresh folder, in an order rotated
from round to round (interleaved: load from other work on the machine falls on every variant alike);
the table gives medians, the spread (min-max) and the 1-minute load average before each round. The
variants:

  onnxfold          python -m onnxfold IN OUT            (verification, the default)
  onnxfold-nv       python -m onnxfold IN OUT --no-verify
  onnxruntime       SessionOptions(ORT_ENABLE_BASIC, optimized_model_filepath=OUT); InferenceSession
  floor             onnx.load + onnx.save

``--before DIR`` adds ``before`` and ``before-nv``: the same two onnxfold commands run from another
checkout's root (``git archive COMMIT onnxfold | tar -x -C DIR``), interleaved with the rest, for a
before/after in one run.

Wall time is spawn to reap (tools/bench.py's run_measured). Nothing here asserts a time: the numbers
are for reading, on a machine whose other load the table shows.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import bench  # noqa: E402  (stdlib and numpy only at import time)

PY = sys.executable
VARIANTS = {
    "onnxfold": lambda s, d, r: [PY, "-m", "onnxfold", s, d, "--report", r],
    "onnxfold-nv": lambda s, d, r: [PY, "-m", "onnxfold", s, d, "--no-verify", "--report", r],
    "onnxruntime": lambda s, d, r: bench.TOOLS["onnxruntime"][0](s, d, False),
    "floor": lambda s, d, r: bench.TOOLS["floor"][0](s, d, False),
}


def run_rounds(model: Path, rounds: int, variants: list[str], work: Path, before: Path | None = None,
               log=print) -> dict:
    walls: dict[str, list[float]] = {v: [] for v in variants}
    phases: dict[str, dict[str, list[float]]] = {v: {} for v in variants if v.startswith(("onnxfold", "before"))}
    loads = []
    for i in range(rounds):
        order = variants[i % len(variants):] + variants[:i % len(variants)]
        loads.append(os.getloadavg()[0])
        for v in order:
            out = work / v
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            report = work / f"{v}.json"
            argv = VARIANTS[v.replace("before", "onnxfold")](str(model), str(out / "out.onnx"), str(report))
            cwd = before if v.startswith("before") and before is not None else ROOT
            r = bench.run_measured(argv, timeout=600, cwd=cwd)
            if r["rc"] != 0 or not (out / "out.onnx").exists():
                raise SystemExit(f"{v} failed (exit {r['rc']}): {bench.short_error(r)}")
            walls[v].append(r["wall_s"])
            if v in phases:
                for k, sec in json.loads(report.read_text())["timings"].items():
                    phases[v].setdefault(k, []).append(sec)
        log(f"round {i + 1}/{rounds} (load {loads[-1]:.2f}): "
            + ", ".join(f"{v} {walls[v][-1]:.2f}s" for v in variants))
    return {"model": str(model), "bytes": model.stat().st_size, "rounds": rounds, "loadavg_1m": loads,
            "cpus": os.cpu_count(), "walls": walls, "phases": phases}


def table(data: dict) -> str:
    walls = data["walls"]
    med = {v: statistics.median(w) for v, w in walls.items()}
    lines = [f"{Path(data['model']).name}, {data['bytes'] / 1e6:.0f} MB, {data['rounds']} interleaved rounds, "
             f"{data['cpus']} CPUs, 1-min load average {min(data['loadavg_1m']):.2f}-{max(data['loadavg_1m']):.2f}",
             "", "| variant | median s | min-max s | / onnxruntime | / floor |", "|---|---:|---:|---:|---:|"]
    for v, w in walls.items():
        ort = f"{med[v] / med['onnxruntime']:.2f}x" if "onnxruntime" in med else "-"
        floor = f"{med[v] / med['floor']:.2f}x" if "floor" in med else "-"
        lines.append(f"| {v} | {med[v]:.3f} | {min(w):.3f}-{max(w):.3f} | {ort} | {floor} |")
    for v, phases in data["phases"].items():
        lines += ["", f"{v}: phases (median s of the report's timings)", "",
                  "| phase | median s | min-max s |", "|---|---:|---:|"]
        for k, w in phases.items():
            lines.append(f"| {k} | {statistics.median(w):.3f} | {min(w):.3f}-{max(w):.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--json", type=Path, help="write the raw numbers here")
    ap.add_argument("--before", type=Path, help="another checkout's root: its onnxfold runs too (before, before-nv)")
    args = ap.parse_args(argv)
    variants = args.variants + (["before", "before-nv"] if args.before else [])
    bench.compile_bytecode()  # as pip install does (see there); a --before checkout: compile it yourself
    with tempfile.TemporaryDirectory(prefix="bench_whole-") as work:
        data = run_rounds(args.model.resolve(), args.rounds, variants, Path(work), args.before)
    if args.json:
        args.json.write_text(json.dumps(data, indent=1) + "\n")
    print(table(data))


if __name__ == "__main__":
    main()
