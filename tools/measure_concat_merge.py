#!/usr/bin/env python3
"""Is one merged Conv faster than parallel Convs of one X + Concat in onnxruntime? (issue 19 item 4)

For each block (parallel Convs reading the same X, concatenated along the channels), builds the
original (the Convs and the Concat) and folds it with onnxfold's concat_branch rule (enabled
explicitly): one Conv whose weight stacks the branch weights along the output channels, each
zero-padded into the largest kernel. Times both in onnxruntime (ORT_ENABLE_ALL, CPUExecutionProvider,
batch 1), with one intra-op thread and with all threads, interleaved (original, merged, original, ...),
and prints the median of each and the ratio merged / original (below 1: the merge is faster), with the
multiply-adds of each (the zero taps of a padded kernel are multiplied too).

Usage:  python tools/measure_concat_merge.py [--runs N] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from onnxfold import fold_model  # noqa: E402

# name: (input channels, size, [(output channels, kernel height, kernel width), ...])
BLOCKS = {
    "inception_28_1x1_3x3_5x5": (192, 28, [(64, 1, 1), (128, 3, 3), (32, 5, 5)]),
    "inception_56_1x1_3x3_5x5": (64, 56, [(64, 1, 1), (96, 3, 3), (32, 5, 5)]),
    "inception_28_1x1_3x3": (256, 28, [(128, 1, 1), (128, 3, 3)]),
    "inception_56_1x1_3x3": (128, 56, [(64, 1, 1), (64, 3, 3)]),
    "acnet_28_3x3_1x3_3x1": (128, 28, [(64, 3, 3), (64, 1, 3), (64, 3, 1)]),
    "acnet_56_3x3_1x3_3x1": (64, 56, [(64, 3, 3), (64, 1, 3), (64, 3, 1)]),
    "same_56_1x1_x3": (64, 56, [(64, 1, 1), (64, 1, 1), (64, 1, 1)]),
    "same_28_3x3_x2": (128, 28, [(128, 3, 3), (128, 3, 3)]),
    "same_28_1x1_x2_256": (256, 28, [(128, 1, 1), (128, 1, 1)]),
}


def block(channels: int, size: int, branches: list[tuple[int, int, int]], seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits, outs = [], [], []
    for k, (m, kh, kw) in enumerate(branches):
        w = rng.standard_normal((m, channels, kh, kw)).astype(np.float32) * 0.05
        b = rng.standard_normal(m).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{k}"), numpy_helper.from_array(b, f"b{k}")]
        nodes.append(helper.make_node("Conv", ["x", f"w{k}", f"b{k}"], [f"c{k}"], name=f"conv{k}",
                                      kernel_shape=[kh, kw], pads=[kh // 2, kw // 2, kh // 2, kw // 2]))
        outs.append(f"c{k}")
    nodes.append(helper.make_node("Concat", outs, ["y"], name="concat", axis=1))
    total = sum(m for m, _, _ in branches)
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                             [1, channels, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, total, size, size])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def macs(model: onnx.ModelProto, size: int) -> int:
    init = {t.name: t for t in model.graph.initializer}
    return sum(int(np.prod(init[n.input[1]].dims)) * size * size for n in model.graph.node if n.op_type == "Conv")


def session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def interleaved(a: ort.InferenceSession, b: ort.InferenceSession, x: np.ndarray, runs: int) -> tuple[float, float]:
    feed = {"x": x}
    for _ in range(5):
        a.run(None, feed)
        b.run(None, feed)
    ta, tb = [], []
    for _ in range(runs):
        for s, t in ((a, ta), (b, tb)):
            start = time.perf_counter()
            s.run(None, feed)
            t.append(time.perf_counter() - start)
    return statistics.median(ta), statistics.median(tb)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--only", nargs="*", default=None)
    args = p.parse_args()
    print(f"onnxruntime {ort.__version__}, ORT_ENABLE_ALL, CPU, batch 1, median of {args.runs} interleaved runs")
    print(f"{'block':<28} {'MACs orig':>10} {'merged':>10} {'threads':>7} {'orig ms':>8} {'merged ms':>9} {'ratio':>6}")
    for name, (channels, size, branches) in BLOCKS.items():
        if args.only and name not in args.only:
            continue
        model = block(channels, size, branches)
        merged, report = fold_model(model, enable=["concat_branch"])
        assert [f.rule for f in report.folded] == ["concat_branch"], report.declined
        x = np.random.default_rng(1).standard_normal((1, channels, size, size)).astype(np.float32)
        a1, b1 = session(model, 1), session(merged, 1)
        np.testing.assert_allclose(a1.run(None, {"x": x})[0], b1.run(None, {"x": x})[0], rtol=1e-3, atol=1e-3)
        for threads in (1, 0):
            a, b = (a1, b1) if threads == 1 else (session(model, 0), session(merged, 0))
            ta, tb = interleaved(a, b, x, args.runs)
            print(f"{name:<28} {macs(model, size) / 1e6:>9.1f}M {macs(merged, size) / 1e6:>9.1f}M "
                  f"{threads or 'all':>7} {ta * 1e3:>8.3f} {tb * 1e3:>9.3f} {tb / ta:>6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
