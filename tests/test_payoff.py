"""tools/payoff.py's pure parts (issue 20): interleaving, medians, flagging, the quantization-error metric,
sizes with external data, that quantize_static leaves BatchNormalization alone, and the page. No timing."""

from __future__ import annotations

import importlib.util
import math
import sys

import numpy as np
import onnx
import pytest

from builders import conv_bn_model, external_model
from checks import ROOT

sys.path.insert(0, str(ROOT / "tools"))
_spec = importlib.util.spec_from_file_location("payoff", ROOT / "tools" / "payoff.py")
payoff = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("payoff", payoff)
_spec.loader.exec_module(payoff)


def test_round_orders_every_variant_once_per_round_seeded_and_shuffled():
    names = ["original", "onnxfold", "onnxruntime", "onnxslim"]
    orders = payoff.round_orders(names, 50, seed=3)
    assert len(orders) == 50
    assert all(sorted(o) == sorted(names) for o in orders)
    assert orders == payoff.round_orders(names, 50, seed=3)
    assert len({tuple(o) for o in orders}) > 1  # not always the same position
    assert {o[0] for o in orders} == set(names)


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_interleaved_warms_up_then_interleaves_rounds():
    clock, calls = FakeClock(), []
    cost = {"a": 1.0, "b": 2.0, "c": 4.0}

    def make(name):
        def run():
            calls.append(name)
            clock.t += cost[name]
        return run

    times = payoff.interleaved({n: make(n) for n in cost}, rounds_min=3, rounds_max=100, budget_s=1e9,
                               warmup=2, clock=clock)
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]  # per-variant warm-up first
    timed = calls[6:]
    assert len(timed) == 300  # budget never reached: rounds_max
    for i in range(0, len(timed), 3):  # each round: every variant exactly once
        assert sorted(timed[i:i + 3]) == ["a", "b", "c"]
    assert times == {n: [c] * 100 for n, c in cost.items()}


def test_interleaved_stops_at_the_budget_but_not_before_rounds_min():
    clock = FakeClock()

    def run():
        clock.t += 1.0

    times = payoff.interleaved({"a": run, "b": run}, rounds_min=5, rounds_max=1000, budget_s=20, warmup=0,
                               clock=clock)
    assert len(times["a"]) == 10  # 2 s per round, 20 s budget
    times = payoff.interleaved({"a": run, "b": run}, rounds_min=30, rounds_max=1000, budget_s=1, warmup=0,
                               clock=clock)
    assert len(times["a"]) == 30


def test_summarize_ratios_and_flagging():
    s = payoff.summarize([5.0, 1.0, 3.0, 100.0, 2.0])
    assert s["median_s"] == 3.0 and s["n"] == 5 and s["p25_s"] <= 3.0 <= s["p75_s"]
    stats = {"original": payoff.summarize([2.0, 2.0, 9.0]), "onnxfold": payoff.summarize([1.0, 1.0, 0.5])}
    assert payoff.ratios(stats) == {"original": 1.0, "onnxfold": 0.5}
    row = {"ratio": {"1": {"original": 1.0, "onnxfold": 1.02}, "2": {"original": 1.0, "onnxfold": 1.05}}}
    assert payoff.flagged(row) == ["2"]
    assert payoff.flagged(row, threshold=1.01) == ["1", "2"]
    assert payoff.flagged({"failed": "x"}) == []
    same = dict(row, variants={"onnxfold": {"same_as_original": True}})
    assert payoff.flagged(same) == []  # the original's bytes again: nothing to be slower
    row["ratio"]["2"][payoff.CONTROL] = 1.04  # the A/A control itself strays: within noise
    row["ratio"]["1"][payoff.CONTROL] = 0.95
    assert payoff.beyond_noise(row, threshold=1.01) == ["1"]
    assert payoff.geomean([0.5, 2.0]) == pytest.approx(1.0)
    assert payoff.geomean([]) is None


def test_quant_error_metric():
    ref = [np.array([3.0, 0.0], np.float32), np.array([[4.0]], np.float32)]
    got = [np.array([3.0, 0.0], np.float32), np.array([[4.5]], np.float32)]
    e = payoff.quant_error(ref, got)
    assert e["max_abs"] == pytest.approx(0.5)
    assert e["rel_l2"] == pytest.approx(0.1)  # 0.5 / ||(3, 0, 4)|| = 0.5 / 5
    assert e["sqnr_db"] == pytest.approx(20.0)
    assert math.isinf(payoff.quant_error(ref, ref)["sqnr_db"])


def test_model_stats_count_external_data(tmp_path):
    path = external_model(tmp_path)
    files = payoff.model_files(path)
    assert [p.name for p in files] == ["m.onnx", "m.onnx.data"]
    st = payoff.model_stats(path)
    assert st["bytes"] == path.stat().st_size + (tmp_path / "m.onnx.data").stat().st_size
    assert st["bn"] == 1 and st["nodes"] == 3


def test_quantize_static_does_not_fold_batchnorm_in_the_without_case(tmp_path):
    pytest.importorskip("onnxruntime.quantization")
    model = conv_bn_model(cin=3, cout=8, spatial=8, seed=5)
    src = tmp_path / "orig.onnx"
    onnx.save(model, src)
    record = {"file": "orig.onnx", "input_shape": [1, 3, 8, 8]}
    q = payoff.measure_quant(src, src, record, tmp_path)
    for which in ("without", "with"):
        assert "error" not in q[which], q[which]
        assert q[which]["bn_in_int8_model"] == 1  # quantize_static kept the BatchNormalization
        assert 0 < q[which]["rel_l2"] < 0.2


def _row(model, r1, r2, export="dynamo"):
    lat = {"median_s": 0.001, "p25_s": 0.001, "p75_s": 0.001, "n": 10}
    return {"model": model, "export": export, "kind": "timm",
            "variants": {v: {"nodes": 3, "bn": 1, "bytes": 1000} for v in payoff.VARIANTS},
            "latency": {"1": {v: lat for v in payoff.VARIANTS}, "2": {v: lat for v in payoff.VARIANTS}},
            "ratio": {"1": {"original": 1.0, "onnxfold": r1, "onnxruntime": 0.9, "onnxslim": 1.0},
                      "2": {"original": 1.0, "onnxfold": r2, "onnxruntime": 0.9, "onnxslim": 1.0}},
            "quant": {"without": {"max_abs": 0.1, "rel_l2": 0.02, "sqnr_db": 34.0, "bn_in_int8_model": 1},
                      "with": {"max_abs": 0.1, "rel_l2": 0.01, "sqnr_db": 40.0, "bn_in_int8_model": 0}}}


def test_page_lists_what_stays_slower_and_the_headline(tmp_path):
    pytest.importorskip("matplotlib")
    import payoff_report

    data = {"machine": {"cpu": "cpu", "cores": 2, "ram_gib": 8, "os": "linux", "versions": {"onnxruntime": "1"},
                        "git_rev": "abc", "onnxfold_dirty": False},
            "threads": [1, 2], "sched": dict(payoff.DEFAULT), "rerun_factor": 4, "flag_ratio": 1.03,
            "never_slower": False, "seconds": 1.0, "command": "python tools/payoff.py",
            "rows": [_row("timm/a_dynamo.onnx", 0.5, 0.8), _row("timm/b_legacy.onnx", 1.0, 1.10, "legacy"),
                     dict(_row("timm/c_legacy.onnx", 1.0, 1.2, "legacy"),
                          ort_ops_diff={"original_only": {"Conv": 3}, "onnxfold_only": {}}),
                     {"model": "hf/c_dynamo.onnx", "export": "dynamo", "failed": "timed out"}]}
    page, headline = payoff_report.render(data, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
    assert page.startswith("# What folding buys") and "Generated by `python tools/payoff.py`" in page
    assert "after reruns: `timm/b_legacy.onnx` (2t 1.10x, A/A –x)" in page
    assert "`timm/c_legacy.onnx` (2t 1.20x, A/A –x; operators onnxruntime runs for the original only: Conv 3, " \
           "for onnxfold's output only: none)" in page
    assert "failed: timed out" in page
    assert any("dynamo exports (1 models)" in h and "0.50x with 1 thread and 0.80x with 2 threads" in h
               for h in headline)
    assert any("higher on 3 of 3" in h for h in headline)
