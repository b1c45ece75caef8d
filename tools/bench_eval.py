#!/usr/bin/env python
"""Evaluate ONNX models for tools/bench.py (run as its own process).

Usage: python tools/bench_eval.py SPEC.json RESULT.json

SPEC.json: {"original": path, "ref": path to NAME.ref.npz, "candidates": {label: path},
            "latency_min_runs": int, "latency_seconds": float (per model),
            "interleave": bool (hold all sessions at once and run them round-robin),
            "original_out": optional .npy path: the original's output is saved there on
                            the first call and reused (original not re-measured) later}

For the original and each candidate model it records: BatchNormalization
node count, node count, and onnxruntime CPU latency with optimizations off
(ORT_DISABLE_ALL) and at the default level (ORT_ENABLE_ALL).  For each
candidate it also records the max abs / max relative error of its output
against the original model's output (both run with ORT_DISABLE_ALL, same
seeded input) and against the float64 reference from bench_models.py.
The relative error is max|a - b| / max|b| (b: the reference side), which
stays meaningful where single elements are close to zero.

For outputs and errors, models are loaded one at a time and released before
the next.  For latency, small models are held together and run round-robin
(fairer under background load); with "interleave": false (large models) they
are measured one at a time, so the process holds one model at a time.
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
import traceback

import numpy as np


def structure(path: str) -> dict:
    import onnx

    m = onnx.load(path, load_external_data=False)
    ops = [n.op_type for n in m.graph.node]
    return {"nodes": len(ops), "bn": ops.count("BatchNormalization")}


def session(path: str, level: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "default": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def errors(out: np.ndarray, ref: np.ndarray) -> dict:
    a = out.astype(np.float64)
    b = ref.astype(np.float64)
    if a.shape != b.shape:
        return {"error": f"shape {a.shape} != {b.shape}"}
    if not np.all(np.isfinite(a)):
        return {"max_abs": float("inf"), "max_rel": float("inf"), "nonfinite": int((~np.isfinite(a)).sum())}
    d = float(np.max(np.abs(a - b))) if a.size else 0.0
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    return {"max_abs": d, "max_rel": d / scale if scale > 0 else (0.0 if d == 0 else float("inf"))}


def outputs_and_structure(path: str, feed: dict) -> tuple[dict, np.ndarray | None]:
    res: dict = {}
    out = None
    try:
        res.update(structure(path))
    except Exception as e:  # noqa: BLE001
        res["structure_error"] = f"{type(e).__name__}: {e}"[:300]
    s = None
    try:
        s = session(path, "off")
        out = s.run(None, feed)[0]
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()
        res["ort_off_error"] = f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]
    finally:
        del s
        gc.collect()
    return res, out


def _err_msg(e):
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def latencies(paths: dict, feed: dict, spec: dict, results: dict) -> None:
    """Latency of every model at both levels.

    When the models are small enough to be held together, the runs are
    interleaved round-robin (one inference per model per round) so that a
    burst of load from elsewhere on the machine hits all models alike;
    otherwise the models are measured one after another.
    """
    min_runs = spec.get("latency_min_runs", 10)
    seconds = spec.get("latency_seconds", 2.0)
    together = spec.get("interleave", True)
    for level in ("off", "default"):
        groups = [list(paths)] if together else [[k] for k in paths]
        for group in groups:
            sessions = {}
            for k in group:
                if results[k].get("ort_off_error") and level == "off":
                    continue
                try:
                    sessions[k] = session(paths[k], level)
                    for _ in range(2):  # warm-up
                        sessions[k].run(None, feed)
                except Exception as e:  # noqa: BLE001
                    results[k][f"ort_{level}_error"] = _err_msg(e)
                    sessions.pop(k, None)
            times = {k: [] for k in sessions}
            t_end = time.perf_counter() + seconds * max(1, len(sessions))
            rounds = 0
            while sessions and (rounds < min_runs or (time.perf_counter() < t_end and rounds < 1000)):
                for k, s in sessions.items():
                    t0 = time.perf_counter()
                    s.run(None, feed)
                    times[k].append(time.perf_counter() - t0)
                rounds += 1
            for k, ts in times.items():
                results[k][f"latency_{level}"] = {
                    "median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3,
                    "max_ms": max(ts) * 1e3, "runs": len(ts)}
            sessions = None
            gc.collect()


def main(argv):
    spec = json.load(open(argv[1]))
    ref = np.load(spec["ref"])
    x, ref64 = ref["x"], ref["ref"]
    result: dict = {}
    try:
        import onnx

        m = onnx.load(spec["original"], load_external_data=False)
        feed = {m.graph.input[0].name: x}
        del m
        cache = spec.get("original_out")  # .npy of the original's output, reused across calls
        if cache and os.path.exists(cache):
            paths = dict(spec["candidates"])
            orig_out = np.load(cache)
        else:
            paths = {"original": spec["original"], **spec["candidates"]}
            orig, orig_out = outputs_and_structure(spec["original"], feed)
            if orig_out is not None:
                orig["vs_fp64"] = errors(orig_out, ref64)
                if cache:
                    np.save(cache, orig_out)
            result["original"] = orig
        for label, path in spec["candidates"].items():
            try:
                r, out = outputs_and_structure(path, feed)
                if out is not None:
                    r["vs_fp64"] = errors(out, ref64)
                    if orig_out is not None:
                        r["vs_original"] = errors(out, orig_out)
                result[label] = r
            except Exception as e:  # noqa: BLE001
                result[label] = {"eval_error": _err_msg(e)}
                paths.pop(label)
            out = None
            gc.collect()
        latencies(paths, feed, spec, result)
    except Exception:  # noqa: BLE001
        result["fatal"] = traceback.format_exc()[-1000:]
    json.dump(result, open(argv[2], "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv)
