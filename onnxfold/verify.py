"""Prove a fold: run the original and the folded model on the same seeded inputs and compare.

Both models run in onnxruntime with graph optimizations OFF (``ORT_DISABLE_ALL``): with them on,
onnxruntime fuses Conv+BatchNormalization in the reference itself and a wrong fold can look right.
Where onnxruntime's CPU provider has no kernel for the model (float64 or bfloat16 Conv), both run in
``onnx.reference.ReferenceEvaluator`` instead, and the result says so.

An output passes when every element satisfies ``|candidate - reference| <= atol + rtol * |reference|``.
By default ``atol = ATOL[dtype] * scale`` with ``scale = max |reference|`` of that output, and
``rtol = RTOL[dtype]``: the error a fold may introduce is a few units in the last place of the
weights, which shows up relative to the size of the output, not of each element. NaN or Inf in
the candidate where the reference is finite always fails. Integer and bool outputs must be equal.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

# Default tolerances by output dtype: (atol as a fraction of the output's scale, rtol).
TOLERANCES = {
    "float64": (1e-10, 1e-10),
    "float32": (1e-4, 1e-4),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}
DEFAULT_RANGE = (-1.0, 1.0)
DEFAULT_BATCH = 1
DEFAULT_DIM = 32


class VerifyError(Exception):
    """Verification could not run (provider missing, bad inputs): the message says why."""


@dataclass
class OutputComparison:
    name: str
    dtype: str
    shape: tuple
    max_abs: float
    max_rel: float
    atol: float
    rtol: float
    needed_atol: float  # the smallest atol that would pass with this rtol
    passed: bool
    note: str = ""

    def line(self) -> str:
        state = "ok  " if self.passed else "FAIL"
        text = (
            f"{state} {self.name} {self.dtype}{list(self.shape)}: max abs {self.max_abs:.3g}, "
            f"max rel {self.max_rel:.3g} (atol {self.atol:.3g}, rtol {self.rtol:.3g})"
        )
        if not self.passed:
            text += f"; needs atol >= {self.needed_atol:.3g}"
        return text + (f"; {self.note}" if self.note else "")


@dataclass
class ProviderResult:
    provider: str
    engine: str  # "onnxruntime <provider list>" or "onnx.reference"
    outputs: list[OutputComparison]
    note: str = ""

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)


@dataclass
class VerifyResult:
    """Truthy when every output agrees on every provider; ``str`` gives the comparison."""

    results: list[ProviderResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(r.passed for r in self.results)

    def __bool__(self) -> bool:
        return self.passed

    @property
    def worst(self) -> OutputComparison | None:
        failing = [o for r in self.results for o in r.outputs if not o.passed]
        pool = failing or [o for r in self.results for o in r.outputs]
        return max(pool, key=lambda o: o.needed_atol / o.atol if o.atol else math.inf, default=None)

    def max_abs(self) -> float:
        return max((o.max_abs for r in self.results for o in r.outputs), default=0.0)

    def __str__(self) -> str:
        lines = []
        for r in self.results:
            lines.append(f"verify on {r.provider} ({r.engine}){': ' + r.note if r.note else ''}")
            lines.extend("  " + o.line() for o in r.outputs)
        if not self.passed and self.worst is not None:
            w = self.worst
            lines.append(
                f"verification FAILED: worst output '{w.name}' has max abs error {w.max_abs:.3g}; "
                f"it would need atol >= {w.needed_atol:.3g} (rtol {w.rtol:.3g}), tolerance was atol {w.atol:.3g}"
            )
        elif self.passed:
            lines.append("verification passed")
        return "\n".join(lines)


# -- inputs ------------------------------------------------------------------------------------------


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``name:1x3x224x224`` -> ("name", (1, 3, 224, 224))."""
    name, sep, dims = text.rpartition(":")
    if not sep or not name:
        raise ValueError(f"--input-shape {text!r}: expected NAME:DIMS, for example input:1x3x224x224")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x")) if dims else ()
    except ValueError:
        raise ValueError(f"--input-shape {text!r}: dimensions must be integers joined by 'x'") from None
    if any(d < 0 for d in shape):
        raise ValueError(f"--input-shape {text!r}: dimensions must not be negative")
    return name, shape


def _np_dtype(elem_type: int):
    return helper.tensor_dtype_to_np_dtype(elem_type)


def model_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The inputs a caller must feed: graph inputs that are not initializers."""
    inits = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in inits]


def make_inputs(
    model: onnx.ModelProto,
    shapes: dict[str, tuple[int, ...]] | None = None,
    value_range: tuple[float, float] = DEFAULT_RANGE,
    seed: int = 0,
    warn=None,
) -> dict[str, np.ndarray]:
    """Seeded inputs from the model's declared inputs.

    Floats are uniform in ``value_range`` (default [-1, 1]); integers uniform in [0, 4); bools random.
    A symbolic or unknown dimension takes the user's shape for that input, else the same value for
    every use of the same name: 1 on axis 0 (the batch), 32 elsewhere, with a warning naming it.
    """
    shapes = dict(shapes or {})
    rng = np.random.default_rng(seed)
    chosen: dict[str, int] = {}
    feeds = {}
    for v in model_inputs(model):
        t = v.type.tensor_type
        if not v.type.HasField("tensor_type"):
            raise VerifyError(f"input '{v.name}' is not a tensor; pass inputs with --inputs")
        try:
            dtype = _np_dtype(t.elem_type)
        except (KeyError, ValueError, TypeError):
            raise VerifyError(f"input '{v.name}' has no known element type; pass inputs with --inputs") from None
        if v.name in shapes:
            shape = shapes.pop(v.name)
        else:
            shape = []
            for axis, d in enumerate(t.shape.dim):
                if d.HasField("dim_value"):
                    shape.append(d.dim_value)
                    continue
                key = d.dim_param or f"{v.name}[{axis}]"
                if key not in chosen:
                    chosen[key] = DEFAULT_BATCH if axis == 0 else DEFAULT_DIM
                    if warn:
                        warn(
                            f"input '{v.name}' axis {axis} is dynamic ({d.dim_param or 'unnamed'}): "
                            f"using {chosen[key]}; set it with --input-shape {v.name}:..."
                        )
                shape.append(chosen[key])
        shape = tuple(shape)
        kind = np.dtype(dtype).kind if dtype is not None else "O"
        if kind == "f" or np.dtype(dtype).name == "bfloat16":
            lo, hi = value_range
            feeds[v.name] = rng.uniform(lo, hi, size=shape).astype(dtype)
        elif kind in "iu":
            feeds[v.name] = rng.integers(0, 4, size=shape).astype(dtype)
        elif kind == "b":
            feeds[v.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise VerifyError(f"input '{v.name}' has dtype {np.dtype(dtype).name}; pass inputs with --inputs")
    if shapes:
        raise VerifyError(f"--input-shape names no input of the model: {', '.join(sorted(shapes))}")
    return feeds


# -- running ------------------------------------------------------------------------------------------

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def _session(source, provider: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    if provider == "cuda":
        providers = [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    sess = ort.InferenceSession(source, so, providers=providers)
    active = sess.get_providers()
    if not active or active[0] != PROVIDERS[provider]:
        raise VerifyError(f"onnxruntime did not activate {PROVIDERS[provider]} (active: {', '.join(active)})")
    return sess


def _ort_source(model):
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    if model.ByteSize() > 2**31 - 1:
        raise VerifyError("the model is over 2 GiB: save it with external data and verify the file")
    return model.SerializeToString()


def _load(model) -> onnx.ModelProto:
    if isinstance(model, (str, os.PathLike)):
        return onnx.load(str(model))
    return model


def _run_reference(model, feeds):
    from onnx.reference import ReferenceEvaluator

    m = _load(model)
    try:
        outs = ReferenceEvaluator(m).run(None, feeds)
    except Exception as e:
        raise VerifyError(f"onnx.reference cannot run the model either: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    return dict(zip([o.name for o in m.graph.output], outs))


def _run_session(sess, feeds, which: str) -> dict:
    try:
        outs = sess.run(None, feeds)
    except Exception as e:
        raise VerifyError(f"onnxruntime cannot run the {which} model on these inputs: {str(e).splitlines()[0]} "
                          + " ".join(str(e).splitlines()[1:4])) from None
    return dict(zip([o.name for o in sess.get_outputs()], outs))


def _no_kernel(err: Exception) -> bool:
    text = str(err)
    return "NOT_IMPLEMENTED" in text or "Could not find an implementation" in text or "Type Error" in text


def run_pair(reference, candidate, feeds, provider: str) -> tuple[dict, dict, str, str]:
    """Run both models on one provider. Returns (reference outputs, candidate outputs, engine, note)."""
    if provider not in PROVIDERS:
        raise VerifyError(f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}")
    import onnxruntime as ort

    if PROVIDERS[provider] not in ort.get_available_providers():
        raise VerifyError(
            f"{PROVIDERS[provider]} is not available in this onnxruntime build "
            f"(available: {', '.join(ort.get_available_providers())})"
        )
    try:
        ref_sess = _session(_ort_source(reference), provider)
    except VerifyError:
        raise
    except Exception as e:
        if provider == "cpu" and _no_kernel(e):
            note = "onnxruntime has no CPU kernel for this model: " + str(e).splitlines()[0][:160]
            return _run_reference(reference, feeds), _run_reference(candidate, feeds), "onnx.reference", note
        raise VerifyError(f"onnxruntime cannot load the original model: {str(e).splitlines()[0]}") from None
    try:
        cand_sess = _session(_ort_source(candidate), provider)
    except VerifyError:
        raise
    except Exception as e:
        raise VerifyError(f"onnxruntime cannot load the folded model: {str(e).splitlines()[0]}") from None
    ref = _run_session(ref_sess, feeds, "original")
    cand = _run_session(cand_sess, feeds, "folded")
    engine = "onnxruntime " + ",".join(cand_sess.get_providers())
    return ref, cand, engine, ""


# -- comparing ----------------------------------------------------------------------------------------


def compare(name: str, ref: np.ndarray, cand: np.ndarray, atol=None, rtol=None) -> OutputComparison:
    ref = np.asarray(ref)
    cand = np.asarray(cand)
    dtype = ref.dtype.name
    if ref.shape != cand.shape:
        return OutputComparison(name, dtype, ref.shape, math.inf, math.inf, 0.0, 0.0, math.inf, False,
                                f"shape {list(cand.shape)} != {list(ref.shape)}")
    if dtype not in TOLERANCES:
        equal = bool(np.array_equal(ref, cand))
        return OutputComparison(name, dtype, ref.shape, 0.0 if equal else math.inf, 0.0 if equal else math.inf,
                                0.0, 0.0, 0.0 if equal else math.inf, equal, "" if equal else "values differ")
    r = ref.astype(np.float64)
    c = cand.astype(np.float64)
    finite = np.isfinite(r)
    scale = float(np.max(np.abs(r[finite]))) if finite.any() else 0.0
    d_atol, d_rtol = TOLERANCES[dtype]
    atol = d_atol * max(scale, np.finfo(np.float64).tiny) if atol is None else float(atol)
    rtol = d_rtol if rtol is None else float(rtol)
    # Non-finite values: the candidate must match the reference exactly where it is not finite,
    # and must be finite where it is.
    same_nonfinite = (~finite) & ((np.isnan(r) & np.isnan(c)) | (r == c))
    bad_nonfinite = (finite & ~np.isfinite(c)) | ((~finite) & ~same_nonfinite)
    err = np.where(finite & np.isfinite(c), np.abs(c - r), 0.0)
    max_abs = float(err.max()) if err.size else 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(np.abs(r) > 0, err / np.abs(r), np.where(err > 0, np.inf, 0.0))
    max_rel = float(rel.max()) if rel.size else 0.0
    needed = float(np.max(err - rtol * np.abs(np.where(finite, r, 0.0)))) if err.size else 0.0
    needed = max(needed, 0.0)
    note = ""
    if bad_nonfinite.any():
        needed = math.inf
        note = f"{int(bad_nonfinite.sum())} NaN/Inf where the reference differs"
    passed = needed <= atol and not bad_nonfinite.any()
    return OutputComparison(name, dtype, ref.shape, max_abs, max_rel, atol, rtol, needed, passed, note)


def verify(
    reference,
    candidate,
    providers=("cpu",),
    *,
    inputs: dict[str, np.ndarray] | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    input_range: tuple[float, float] = DEFAULT_RANGE,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    tolerances: dict[str, tuple[float | None, float | None]] | None = None,
) -> VerifyResult:
    """Compare ``candidate`` against ``reference`` on each provider ("cpu", "cuda").

    ``reference`` and ``candidate`` are paths or ``onnx.ModelProto``. ``atol``/``rtol`` override the
    dtype defaults for every output; ``tolerances={"out": (atol, rtol)}`` for one output (None keeps
    the default). Raises :class:`VerifyError` when it cannot run (a provider is missing, an input
    cannot be made); the result is falsy when an output disagrees.
    """
    for which, model in (("reference", reference), ("candidate", candidate)):
        if not isinstance(model, (onnx.ModelProto, str, os.PathLike)):
            raise TypeError(f"verify: {which} must be an onnx.ModelProto or a path, not {type(model).__name__}")
    result = VerifyResult()
    if isinstance(providers, str):
        providers = [p for p in providers.split(",") if p]
    ref_model = reference if isinstance(reference, onnx.ModelProto) else onnx.load(str(reference), load_external_data=False)
    if inputs is None:
        feeds = make_inputs(ref_model, input_shapes, input_range, seed, warn=result.warnings.append)
    else:
        feeds = dict(inputs)
        missing = [v.name for v in model_inputs(ref_model) if v.name not in feeds]
        if missing:
            raise VerifyError(f"inputs given lack {', '.join(missing)}")
    tolerances = tolerances or {}
    for provider in providers:
        ref_out, cand_out, engine, note = run_pair(reference, candidate, feeds, provider)
        comparisons = []
        for name, value in ref_out.items():
            if name not in cand_out:
                comparisons.append(OutputComparison(name, str(np.asarray(value).dtype), np.shape(value), math.inf,
                                                    math.inf, 0.0, 0.0, math.inf, False, "missing in the folded model"))
                continue
            o_atol, o_rtol = tolerances.get(name, (None, None))
            comparisons.append(compare(name, value, cand_out[name],
                                       o_atol if o_atol is not None else atol,
                                       o_rtol if o_rtol is not None else rtol))
        result.results.append(ProviderResult(provider, engine, comparisons, note))
    return result


def load_inputs(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Inputs from an .npz file, one array per input name."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise VerifyError(f"{path}: cannot read inputs ({str(e).splitlines()[0]})") from None
