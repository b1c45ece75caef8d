"""Checks shared by the test files: validity, a session and a run in onnxruntime, comparison, and the
command line run as a user runs it (``cli``).

The comparison is the project's rule, computed here independently of onnxfold.verify (the code under
test): every element must satisfy ``|got - ref| <= k * max|ref| + k * |ref|`` with k = 1e-4 for
float32 and 1e-2 for float16 (k * output scale as atol, k as rtol), in onnxruntime with
GraphOptimizationLevel.ORT_DISABLE_ALL (with optimizations on, onnxruntime would fuse Conv+BN in the
original itself and hide a wrong fold). NaN/Inf where the original is finite fails; integer and
bool outputs must be equal.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

K_BY_DTYPE = {np.dtype(np.float32): 1e-4, np.dtype(np.float16): 1e-2, np.dtype(np.float64): 1e-10}
ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child Python: this checkout's onnxfold first on its path."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def cli(*args: object, cwd: str | os.PathLike | None = None, env: dict[str, str] | None = None,
        preexec_fn: Callable[[], object] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m onnxfold ARGS`` in a subprocess, as a user runs it; stdout and stderr captured as text.
    ``env`` adds to the environment; ``timeout`` only stops a hung run (it is no test of speed)."""
    return subprocess.run([sys.executable, "-m", "onnxfold", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=child_env(**(env or {})), preexec_fn=preexec_fn, timeout=timeout)


def assert_user_error(proc: subprocess.CompletedProcess[str], text: str = "", code: int = 2, *,
                      began: bool = False) -> None:
    """The command line refused as the project promises: exit ``code``, no traceback, exactly one line
    ``onnxfold: error: ...`` (containing ``text``) and nothing else on stderr (no FAILED line). With
    ``began`` (an error found once work began: the fold, a write, verification), the error line is
    followed by the run's final ``FAILED |`` line, which ends every run that began."""
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("onnxfold: error:")]
    assert len(errors) == 1 and text in errors[0], proc.stderr
    lines = proc.stderr.strip().splitlines()
    if began:
        assert lines[-1].startswith("FAILED | Runtime: ") and lines[-2] == errors[0], proc.stderr
        assert not any(line.startswith("FAILED") for line in lines[:-1]), proc.stderr
    else:
        assert lines == errors, proc.stderr


def digest(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_valid(model_or_path) -> None:
    """onnx.checker with full_check (shape inference, strict); on the path when there is external data."""
    if isinstance(model_or_path, (str, os.PathLike)):
        onnx.checker.check_model(str(model_or_path), full_check=True)
    else:
        onnx.checker.check_model(model_or_path, full_check=True)


def session(model_or_path):
    """An onnxruntime CPU session with graph optimizations off (ORT_DISABLE_ALL) and warnings quiet."""
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


def assert_close(ref: dict, got: dict, context: str = "", magnitude: dict | None = None) -> None:
    """``got`` matches ``ref`` (see the module docstring).

    ``magnitude``: per output, the magnitude of the terms that make each element (:func:`magnitude_model`).
    Each element may then also be off by k times its magnitude: where an output is made by cancellation
    (a Gemm of three terms of 0.5 that sum to 5e-4), rounding each folded weight once is an error of
    k * magnitude, far above k * the output's own scale, and no fold can do better.
    """
    assert list(ref) == list(got), f"{context}: outputs {list(got)} != {list(ref)}"
    for name, r in ref.items():
        g = got[name]
        assert r.dtype == g.dtype and r.shape == g.shape, \
            f"{context}: output {name!r} {g.dtype}{g.shape} != {r.dtype}{r.shape}"
        if r.dtype.kind != "f":
            assert np.array_equal(r, g), f"{context}: output {name!r} differs"
            continue
        k = K_BY_DTYPE[r.dtype]
        r64, g64 = r.astype(np.float64), g.astype(np.float64)
        finite = np.isfinite(r64)
        assert np.array_equal(np.isnan(r64), np.isnan(g64)), \
            f"{context}: output {name!r}: NaN where the original has none"
        inf = ~finite & ~np.isnan(r64)
        assert np.array_equal(r64[inf], g64[inf]), f"{context}: {name!r}: Inf differs"
        assert np.isfinite(g64[finite]).all(), f"{context}: output {name!r}: not finite where the original is"
        scale = float(np.abs(r64[finite]).max()) if finite.any() else 0.0
        err = np.abs(g64[finite] - r64[finite])
        bound = k * scale + k * np.abs(r64[finite])
        if magnitude is not None:
            m = np.broadcast_to(magnitude[name].astype(np.float64), r64.shape)[finite]
            bound = bound + k * np.where(np.isfinite(m), m, 0.0)
        if err.size and not (err <= bound).all():
            worst = int(np.argmax(err - bound))
            raise AssertionError(
                f"{context}: output {name!r} ({r.dtype}) max abs error {err.max():.3g} > atol {k * scale:.3g} "
                f"(k={k} x scale {scale:.3g}) + rtol {k}" + (" + k x magnitude" if magnitude is not None else "")
                + f": at flat index {worst}, got {g64[finite][worst]!r}, expected {r64[finite][worst]!r}, "
                f"bound there {bound[worst]:.3g}")


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


def widen(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float32 copy of a float16 model (main graph): tensors, Constant values, Casts and types."""
    from onnx import numpy_helper

    wide = onnx.ModelProto()
    wide.CopyFrom(model)
    g = wide.graph
    H, F = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT

    def widen_tensor(t):
        if t.data_type == H:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))

    for t in g.initializer:
        widen_tensor(t)
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                widen_tensor(a.t)
            if n.op_type == "Cast" and a.name == "to" and a.i == H:
                a.i = F
    for v in [*g.input, *g.output, *g.value_info]:
        if v.type.tensor_type.elem_type == H:
            v.type.tensor_type.elem_type = F
    return wide


def magnitude_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model, widened to float32, computing the magnitude of the terms behind each element: every
    constant operand through Abs, Sub as Add, BatchNormalization as (x + |mean|) / sqrt(var + eps) * |gamma|
    + |beta|, Gemm's alpha and beta as their absolute values. Fed |x|, each output bounds the sum of the
    absolute values of the products and sums that make it (the ops the fuzzer uses)."""
    wide = widen(model)
    g = wide.graph
    nodes = []
    count = 0

    def through(op, name):
        nonlocal count
        count += 1
        out = f"__magnitude_{count}"
        nodes.append(onnx.helper.make_node(op, [name], [out]))
        return out

    for n in g.node:
        if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul", "Mul", "Add", "Sub", "Div", "BatchNormalization"):
            for i in range(len(n.input)):
                if not n.input[i]:
                    continue
                if n.op_type == "BatchNormalization" and i == 4:
                    continue  # the variance is positive already
                value = through("Abs", n.input[i])
                if n.op_type == "BatchNormalization" and i == 3:
                    value = through("Neg", value)
                n.input[i] = value
            if n.op_type == "Sub":
                n.op_type = "Add"
            for a in n.attribute:
                if n.op_type == "Gemm" and a.name in ("alpha", "beta"):
                    a.f = abs(a.f)
        nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    return wide


def magnitudes(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    wide_feeds = {k: np.abs(v).astype(np.float32) if v.dtype.kind == "f" else v for k, v in feeds.items()}
    return run(magnitude_model(model), wide_feeds)
