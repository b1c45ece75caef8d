"""Checks shared by the entry-point matrix and the fuzzer: validity, a run in onnxruntime, comparison.

The comparison is the project's rule, computed here independently of onnxfold.verify (the code under
test): every element must satisfy ``|got - ref| <= k * max|ref| + k * |ref|`` with k = 1e-4 for
float32 and 1e-2 for float16 (k * output scale as atol, k as rtol), in onnxruntime with
GraphOptimizationLevel.ORT_DISABLE_ALL (with optimizations on, onnxruntime would fuse Conv+BN in the
original itself and hide a wrong fold). NaN/Inf where the original is finite fails; integer and
bool outputs must be equal.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

K_BY_DTYPE = {np.dtype(np.float32): 1e-4, np.dtype(np.float16): 1e-2, np.dtype(np.float64): 1e-10}


def check_valid(model_or_path) -> None:
    """onnx.checker with full_check (shape inference, strict); on the path when there is external data."""
    if isinstance(model_or_path, (str, os.PathLike)):
        onnx.checker.check_model(str(model_or_path), full_check=True)
    else:
        onnx.checker.check_model(model_or_path, full_check=True)


def session(model_or_path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    src = str(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else model_or_path.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def run(model_or_path, feeds: dict) -> dict[str, np.ndarray]:
    sess = session(model_or_path)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def assert_close(ref: dict, got: dict, context: str = "") -> None:
    assert list(ref) == list(got), f"{context}: outputs {list(got)} != {list(ref)}"
    for name, r in ref.items():
        g = got[name]
        assert r.dtype == g.dtype and r.shape == g.shape, f"{context}: output {name!r} {g.dtype}{g.shape} != {r.dtype}{r.shape}"
        if r.dtype.kind != "f":
            assert np.array_equal(r, g), f"{context}: output {name!r} differs"
            continue
        k = K_BY_DTYPE[r.dtype]
        r64, g64 = r.astype(np.float64), g.astype(np.float64)
        finite = np.isfinite(r64)
        assert np.array_equal(np.isnan(r64), np.isnan(g64)), f"{context}: output {name!r}: NaN where the original has none"
        assert np.array_equal(r64[~finite & ~np.isnan(r64)], g64[~finite & ~np.isnan(r64)]), f"{context}: {name!r}: Inf differs"
        assert np.isfinite(g64[finite]).all(), f"{context}: output {name!r}: not finite where the original is"
        scale = float(np.abs(r64[finite]).max()) if finite.any() else 0.0
        err = np.abs(g64[finite] - r64[finite])
        bound = k * scale + k * np.abs(r64[finite])
        if err.size and not (err <= bound).all():
            worst = int(np.argmax(err - bound))
            raise AssertionError(
                f"{context}: output {name!r} ({r.dtype}) max abs error {err.max():.3g} > atol {k * scale:.3g} "
                f"(k={k} x scale {scale:.3g}) + rtol {k}: at flat index {worst}, got {g64[finite][worst]!r}, "
                f"expected {r64[finite][worst]!r}")


def feeds_for(model: onnx.ModelProto, seed: int = 0, bool_value: bool | None = None) -> dict[str, np.ndarray]:
    """Seeded inputs for the graph inputs that are not initializers; dynamic or negative dims take 2."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for v in model.graph.input:
        if v.name in inits:
            continue
        t = v.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else 2 for d in t.shape.dim)
        dtype = helper.tensor_dtype_to_np_dtype(t.elem_type)
        if dtype == np.bool_:
            feeds[v.name] = np.full(shape, bool(rng.integers(0, 2)) if bool_value is None else bool_value)
        elif np.dtype(dtype).kind in "iu":
            feeds[v.name] = rng.integers(1, 3, size=shape).astype(dtype)
        else:
            feeds[v.name] = rng.uniform(-1, 1, size=shape).astype(dtype)
    return feeds


def all_graphs(model: onnx.ModelProto):
    """The main graph, every subgraph, and every function body (as node lists)."""

    def walk(nodes):
        yield nodes
        for n in nodes:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    yield from walk(a.g.node)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for g in a.graphs:
                        yield from walk(g.node)

    yield from walk(model.graph.node)
    for f in model.functions:
        yield from walk(f.node)


def op_counts(model: onnx.ModelProto) -> Counter:
    """Op types over all graphs, subgraphs and function bodies (Constant nodes excluded)."""
    return Counter(n.op_type for nodes in all_graphs(model) for n in nodes if n.op_type != "Constant")


def load_path(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=False)
