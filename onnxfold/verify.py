"""Prove a fold: run the original and the folded model on the same seeded inputs and compare.

Both models run in onnxruntime with graph optimizations OFF (``ORT_DISABLE_ALL``): with them on,
onnxruntime fuses Conv+BatchNormalization in the reference itself and a wrong fold can look right.
Where onnxruntime's CPU provider has no kernel for the model (float64 or bfloat16 Conv), both run in
``onnx.reference.ReferenceEvaluator`` instead, and the result says so; there BatchNormalization is
computed by :func:`batch_norm` below, as the spec says (onnx.reference's own normalizes
with batch statistics at opsets 9-13 and raises at 6-7).

The runtime runs in a child process, so that a crash of onnxruntime (it segfaults on some valid
models) is a clear :class:`VerifyError` ("onnxruntime crashed (signal 11, SIGSEGV) running the
original model on cpu") instead of the death of the caller. The child is forked when this process
has not imported onnxruntime and runs no other thread (the command line), else it is a worker
process started once (``python -c``, never re-running the caller's ``__main__``) and reused. It
sends back only the comparisons, never the outputs.

Rules (README: "How verification decides"):

- **Graph outputs.** An output passes when every element satisfies
  ``|candidate - reference| <= atol + rtol * |reference|``, by default ``atol = ATOL[dtype] * scale``
  with ``scale = max |reference|`` of that output and ``rtol = RTOL[dtype]`` (:data:`TOLERANCES`):
  a fold rounds each weight once, so its error shows relative to the size of the output, not of each
  element. NaN or Inf in the candidate where the reference is finite always fails. Integer and
  bool outputs must be equal.
- **The floor.** Rounding is relative to the values a computation handles, not to its result: a
  channel that is small by cancellation, or an output far below the tensors it is computed from, is
  still computed with sums and functions on their scale. So no tolerance below is smaller than
  ``FLOOR[dtype] * S``, ``S`` the scale of the tensors it is computed from and
  ``FLOOR[dtype] = min(ATOL[dtype], 64 * eps[dtype])``: 64 units in the last place (float32: 7.6e-6,
  float64: 1.4e-14), or ATOL itself in float16 and bfloat16, whose rounding is that coarse.
  64 ulps is above what rounding gathers through a deep network (PaddleOCR's detector, 61 folds:
  at most 14 ulps of a fold tensor's scale) and far below a wrong fold.
- **Each fold, where it happens.** Given the folds (``folds=report.folded``), the tensor each fold
  in the main graph rewrote (the consumer's output, whose name the fold keeps) is exposed as an extra
  output of both models and compared *per channel* (axis 1): channel ``c`` passes when
  ``|candidate - reference| <= atol_c + RTOL[dtype] * |reference|`` with
  ``atol_c = max(ATOL[dtype] * max |reference[:, c]|, FLOOR[dtype] * max |reference|)``. A channel
  near 0.02 beside one near 850 is held to its own scale down to the floor (float32: 6.5e-3), so a
  fold that flips its sign fails. A link of a chain whose tensor a later fold rewrote again is
  checked at that later tensor. Folds inside subgraphs or functions, and tensors that do not exist
  in both main graphs (inlined functions), cannot be exposed: the graph outputs alone cover them,
  and the result says so.
- **Outputs far below the tensors that feed them.** When every fold was checked at its own tensor
  and passed, an output's atol is ``max(ATOL[dtype] * its scale, FLOOR[dtype] * S)``, ``S`` the
  largest scale of the checked fold tensors it depends on. A Sigmoid of logits near -16 is about
  1e-7, and onnxruntime computes it to about 6e-8 absolute (2^-24: its rounding is on the scale of
  0.5, not of the result): its own scale says atol 1e-11, rounding on the scale of its logits says
  about 1e-4. The folds themselves are proven at
  their tensors, so the output comparison only has to catch what lies outside them. When any fold
  could not be checked, or one failed, every output keeps its own scale alone.
- **Nothing compared is no proof.** When every output and every checked fold tensor is empty (a batch
  fixed at 0), :class:`VerifyError` is raised: there is nothing to call passed or failed.

``atol``/``rtol`` given by the caller replace the defaults for graph outputs; ``tolerances`` by name
applies to graph outputs and fold tensors alike.
"""

from __future__ import annotations

import atexit
import math
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from .errors import FoldError
from .io import PROTOBUF_LIMIT, all_graphs
from .rules import DEFAULT_EPSILON

# Default tolerances by output dtype: (atol as a fraction of the output's scale, rtol).
TOLERANCES = {
    "float64": (1e-10, 1e-10),
    "float32": (1e-4, 1e-4),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}
# No tolerance goes below FLOOR_ULPS units in the last place of the scale of the tensors it is
# computed from (nor below ATOL of it, where that is smaller): see the module's docstring.
FLOOR_ULPS = 64
EPS = {"float64": 2.0**-52, "float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}


def floor(dtype: str) -> float:
    """FLOOR[dtype]: the smallest atol, as a fraction of the scale of the tensors a value comes from."""
    return min(TOLERANCES[dtype][0], FLOOR_ULPS * EPS[dtype])


DEFAULT_RANGE = (-1.0, 1.0)
DEFAULT_BATCH = 1
DEFAULT_DIM = 32
_ELEM_TYPES = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16,
               "float64": onnx.TensorProto.DOUBLE, "bfloat16": onnx.TensorProto.BFLOAT16}


class VerifyError(FoldError):
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
    channel: int | None = None  # per-channel comparisons: the channel nearest to (or past) its tolerance

    def line(self) -> str:
        state = "ok  " if self.passed else "FAIL"
        where = f" at channel {self.channel}" if self.channel is not None else ""
        text = (
            f"{state} {self.name} {self.dtype}{list(self.shape)}: max abs {self.max_abs:.3g}, "
            f"max rel {self.max_rel:.3g} (atol {self.atol:.3g}{where}, rtol {self.rtol:.3g})"
        )
        if not self.passed:
            text += f"; needs atol >= {self.needed_atol:.3g}{where}"
        return text + (f"; {self.note}" if self.note else "")

    @property
    def elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if all(isinstance(d, int) for d in self.shape) else 0


@dataclass
class ProviderResult:
    provider: str
    engine: str  # "onnxruntime <provider list>" or "onnx.reference"
    outputs: list[OutputComparison]
    note: str = ""
    folds: list[OutputComparison] = field(default_factory=list)  # fold tensors, per channel

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs) and all(f.passed for f in self.folds)


@dataclass
class VerifyResult:
    """Truthy when every output, and every fold checked at its own tensor, agrees on every provider;
    ``str`` gives the comparison."""

    results: list[ProviderResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    unchecked: dict[str, str] = field(default_factory=dict)  # fold tensor -> why it was not compared there
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(r.passed for r in self.results)

    def __bool__(self) -> bool:
        return self.passed

    def _all(self):
        return [o for r in self.results for o in (*r.outputs, *r.folds)]

    @property
    def worst(self) -> OutputComparison | None:
        failing = [o for o in self._all() if not o.passed]
        pool = failing or self._all()
        return max(pool, key=lambda o: o.needed_atol / o.atol if o.atol else math.inf, default=None)

    def max_abs(self) -> float:
        return max((o.max_abs for r in self.results for o in r.outputs), default=0.0)

    def to_dict(self) -> dict:
        """The comparison as JSON-ready data (the ``verification`` field of ``--report``)."""
        return {
            "passed": bool(self),
            "max_abs": self.max_abs(),
            "providers": [
                {"provider": r.provider, "engine": r.engine, "note": r.note,
                 "outputs": [{"name": o.name, "dtype": o.dtype, "shape": list(o.shape), "max_abs": o.max_abs,
                              "max_rel": o.max_rel, "atol": o.atol, "rtol": o.rtol, "passed": o.passed}
                             for o in r.outputs],
                 "folds": [{"name": o.name, "shape": list(o.shape), "max_abs": o.max_abs, "max_rel": o.max_rel,
                            "atol": o.atol, "channel": o.channel, "passed": o.passed} for o in r.folds]}
                for r in self.results
            ],
            "warnings": list(self.warnings),
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        lines = []
        for r in self.results:
            lines.append(f"verify on {r.provider} ({r.engine}){': ' + r.note if r.note else ''}")
            lines.extend("  " + o.line() for o in r.outputs)
            if r.folds:
                bad = [f for f in r.folds if not f.passed]
                top = max(r.folds, key=lambda o: o.needed_atol / o.atol if o.atol else math.inf)
                lines.append(
                    f"  {'ok  ' if not bad else 'FAIL'} {len(r.folds)} fold tensor(s) compared per channel: "
                    + (f"{len(bad)} outside tolerance" if bad else
                       f"nearest to its tolerance '{top.name}', max abs {top.max_abs:.3g} (atol {top.atol:.3g}"
                       + (f" at channel {top.channel})" if top.channel is not None else ")"))
                )
                lines.extend("    fold tensor " + f.line() for f in bad)
        for note in self.notes:
            lines.append(f"  note: {note}")
        if not self.passed and self.worst is not None:
            w = self.worst
            kind = "fold tensor" if any(w is f for r in self.results for f in r.folds) else "output"
            where = f" at channel {w.channel}" if w.channel is not None else ""
            lines.append(
                f"verification FAILED: worst {kind} '{w.name}' has max abs error {w.max_abs:.3g}; "
                f"it would need atol >= {w.needed_atol:.3g}{where} (rtol {w.rtol:.3g}), tolerance was atol {w.atol:.3g}"
            )
        elif self.passed:
            lines.append("verification passed")
        return "\n".join(lines)


def annotate(folded, result: VerifyResult) -> None:
    """Write each fold's own check into its report record (``report.Folded``): ``max_abs``,
    ``max_rel`` and ``atol`` (of the channel nearest to its tolerance, worst over providers),
    ``passed``; or ``note`` saying why it was not compared at its own tensor."""
    for f in folded:
        name = getattr(f, "output", "")
        checks = [c for r in result.results for c in r.folds if c.name == name]
        if checks and name not in result.unchecked:
            worst = max(checks, key=lambda o: o.needed_atol / o.atol if o.atol else math.inf)
            f.max_abs = max(c.max_abs for c in checks)
            f.max_rel = max(c.max_rel for c in checks)
            f.atol = worst.atol
            f.passed = all(c.passed for c in checks)
            f.note = ""
        else:
            f.note = result.unchecked.get(name, "not compared at its own tensor")


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
    A symbolic, unknown or negative dimension (paddle2onnx writes ``dim_value: -1`` for a dynamic
    axis) takes the user's shape for that input, else the same value for every use of the same name:
    1 on axis 0 (the batch), 32 elsewhere, with a warning naming it.
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
        shape = shapes.pop(v.name) if v.name in shapes else _declared_shape(v, chosen, warn)
        feeds[v.name] = _random(rng, v.name, dtype, shape, value_range)
    if shapes:
        raise VerifyError(f"--input-shape names no input of the model: {', '.join(sorted(shapes))}")
    return feeds


def _declared_shape(v: onnx.ValueInfoProto, chosen: dict[str, int], warn) -> tuple[int, ...]:
    """The input's declared shape, each dynamic dimension chosen once per name (``chosen``) and named
    in a warning."""
    shape = []
    for axis, d in enumerate(v.type.tensor_type.shape.dim):
        if d.HasField("dim_value") and d.dim_value >= 0:
            shape.append(d.dim_value)
            continue
        if d.HasField("dim_value"):
            key, what = f"{v.name}[{axis}]", f"dim_value {d.dim_value}"
        else:
            key, what = d.dim_param or f"{v.name}[{axis}]", d.dim_param or "unnamed"
        if key not in chosen:
            chosen[key] = DEFAULT_BATCH if axis == 0 else DEFAULT_DIM
            if warn:
                warn(
                    f"input '{v.name}' axis {axis} is dynamic ({what}): "
                    f"using {chosen[key]}; set it with --input-shape {v.name}:..."
                )
        shape.append(chosen[key])
    return tuple(shape)


def _random(rng: np.random.Generator, name: str, dtype, shape: tuple[int, ...],
            value_range: tuple[float, float]) -> np.ndarray:
    kind = np.dtype(dtype).kind if dtype is not None else "O"
    if kind == "f" or np.dtype(dtype).name == "bfloat16":
        lo, hi = value_range
        return rng.uniform(lo, hi, size=shape).astype(dtype)
    if kind in "iu":
        return rng.integers(0, 4, size=shape).astype(dtype)
    if kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    raise VerifyError(f"input '{name}' has dtype {np.dtype(dtype).name}; pass inputs with --inputs")


# -- onnx.reference, corrected ------------------------------------------------------------------------

_BN = None


def _reference_ops() -> list:
    """OpRun classes that replace onnx.reference's own where they are wrong."""
    global _BN
    if _BN is None:
        from onnx.reference.op_run import OpRun

        class BatchNormalization(OpRun):
            """BatchNormalization of every opset, as the spec says (``batch_norm`` below)."""

            op_domain = ""

            def _run(self, x, scale, bias, mean, var, **_attributes):
                opsets = self.run_params.get("opsets") or {}
                opset = opsets.get("", opsets.get("ai.onnx", onnx.defs.onnx_opset_version()))
                since = onnx.defs.get_schema("BatchNormalization", opset, "").since_version
                attrs = {a.name: helper.get_attribute_value(a) for a in self.onnx_node.attribute}
                return batch_norm(x, scale, bias, mean, var, since=since,
                                  outputs=[bool(o) for o in self.onnx_node.output], **attrs)

        _BN = BatchNormalization
    return [_BN]


def batch_norm(x, scale, bias, mean, var, *, since: int, outputs=(True,), epsilon=DEFAULT_EPSILON, momentum=0.9,
               is_test=0, spatial=1, training_mode=0, **_ignored):
    """BatchNormalization-``since`` (6, 7, 9, 14, 15) as its spec defines it, computed in float64.
    ``epsilon`` is a float attribute: its default 1e-5 is the float32 nearest 1e-5, as when written.

    Inference mode: ``Y = (X - mean) / sqrt(var + epsilon) * scale + B`` with the statistics on axis 1,
    or, with ``spatial=0`` (6 and 7), per activation (shape ``X.shape[1:]``). The mode: ``is_test`` at
    opset 6; at 7-13 the number of outputs present (only Y: inference); from 14 ``training_mode``.
    Training mode normalizes with the batch's mean and (population) variance and returns the running
    statistics ``input * momentum + batch * (1 - momentum)``; the saved_mean/saved_var outputs of
    opsets 6-13 are not defined precisely enough by the spec to compute, and raise.
    """
    present = [i for i, p in enumerate(outputs) if p]
    if since < 7:
        training = int(is_test) == 0
    elif since < 14:
        training = len(present) > 1
    else:
        training = int(training_mode) != 0
    x64 = np.asarray(x).astype(np.float64)
    per_activation = since < 9 and int(spatial) == 0
    axes = (0,) if per_activation else tuple(a for a in range(x64.ndim) if a != 1)
    stat_shape = (1, *x64.shape[1:]) if per_activation else (1, -1) + (1,) * (x64.ndim - 2)

    def stat(a):
        return np.asarray(a).astype(np.float64).reshape(stat_shape)

    eps = float(epsilon)
    if not training:
        y = (x64 - stat(mean)) / np.sqrt(stat(var) + eps) * stat(scale) + stat(bias)
        return (y.astype(np.asarray(x).dtype),)
    if any(i >= 3 for i in present):
        raise NotImplementedError(f"BatchNormalization-{since} in training mode with saved_mean/saved_var outputs")
    batch_mean = x64.mean(axis=axes, keepdims=True)
    batch_var = ((x64 - batch_mean) ** 2).mean(axis=axes, keepdims=True)
    y = (x64 - batch_mean) / np.sqrt(batch_var + eps) * stat(scale) + stat(bias)
    m = float(momentum)
    running_mean = np.asarray(mean) * m + batch_mean.reshape(np.shape(mean)) * (1 - m)
    running_var = np.asarray(var) * m + batch_var.reshape(np.shape(var)) * (1 - m)
    result = [y.astype(np.asarray(x).dtype), running_mean.astype(np.asarray(mean).dtype),
              running_var.astype(np.asarray(var).dtype)]
    return tuple(result[: max(present) + 1])


# -- running (in the child process) ------------------------------------------------------------------

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def check_providers(providers, *, available: bool = True) -> list[str]:
    """The providers named ("cpu,cuda" or a list), checked before any work: each known and, with
    ``available``, each one other than the CPU available in this onnxruntime build. onnxruntime is
    asked in a child process unless it is already imported (verification forks from a parent that
    has not imported it)."""
    if isinstance(providers, str):
        providers = [p.strip() for p in providers.split(",") if p.strip()]
    providers = list(providers)
    if not providers:
        raise VerifyError("--providers names no provider; choose from " + ", ".join(PROVIDERS))
    for p in providers:
        if p not in PROVIDERS:
            raise VerifyError(f"unknown provider {p!r}; choose from {', '.join(PROVIDERS)}")
    wanted = [PROVIDERS[p] for p in providers if p != "cpu"]
    if wanted and available:
        found: list[str]
        if "onnxruntime" in sys.modules:
            found = sys.modules["onnxruntime"].get_available_providers()
        else:
            import subprocess

            proc = subprocess.run([sys.executable, "-c", "import onnxruntime; print(','.join("
                                   "onnxruntime.get_available_providers()))"], capture_output=True, text=True)
            if proc.returncode != 0:
                raise VerifyError("cannot import onnxruntime: " + (proc.stderr.strip().splitlines() or ["?"])[-1])
            found = proc.stdout.strip().split(",")
        for name in wanted:
            if name not in found:
                raise VerifyError(f"{name} is not available in this onnxruntime build (available: "
                                  f"{', '.join(found)})")
    return providers


def _session(source, data_dir: str | None = None, *, provider: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    if data_dir is not None:  # a model given as bytes reads its external data from its own folder
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", data_dir)
    if provider == "cuda":
        providers = [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    sess = ort.InferenceSession(source, so, providers=providers)
    active = sess.get_providers()
    if not active or active[0] != PROVIDERS[provider]:
        raise VerifyError(f"onnxruntime did not activate {PROVIDERS[provider]} (active: {', '.join(active)})")
    return sess


def _extra_outputs(expose) -> bytes:
    """Graph outputs to append to a serialized model: concatenated protobuf messages merge, and a
    repeated field appends, so ``model bytes + these bytes`` is the model with the extra outputs."""
    if not expose:
        return b""
    return onnx.ModelProto(graph=onnx.GraphProto(
        output=[helper.make_tensor_value_info(name, elem, None) for name, elem in expose])).SerializeToString()


def _ort_source(model, expose=()):
    """(what onnxruntime loads, the folder of its external data when that is given as bytes)."""
    extra = _extra_outputs(expose)
    if isinstance(model, (str, os.PathLike)):
        if not extra:
            return str(model), None
        return Path(model).read_bytes() + extra, str(Path(model).resolve().parent)
    data = model if isinstance(model, bytes) else model.SerializeToString()
    if len(data) + len(extra) > PROTOBUF_LIMIT:
        raise VerifyError("the model is over 2 GiB: save it with external data and verify the file")
    return data + extra, None


def _run_reference(model, feeds, expose=()):
    from onnx.reference import ReferenceEvaluator

    if isinstance(model, (str, os.PathLike)):
        m = onnx.load(str(model))
    elif isinstance(model, bytes):
        m = onnx.load_from_string(model)
    else:
        m = model  # a forked child's copy: ours to change
    m.graph.output.extend(helper.make_tensor_value_info(name, elem, None) for name, elem in expose)
    try:
        outs = ReferenceEvaluator(m, new_ops=_reference_ops()).run(None, feeds)
    except Exception as e:
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise VerifyError(f"onnx.reference cannot run the model either: {type(e).__name__}: {first}") from None
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


class _ExposureRefused(Exception):
    """onnxruntime loads the model, but not with the fold tensors as extra outputs."""


def _check_exposure(model, expose, provider, err) -> None:
    if not expose:
        return
    try:
        _session(*_ort_source(model), provider=provider)
    except Exception:
        return  # it fails without them too: the caller reports that
    raise _ExposureRefused(str(err).splitlines()[0][:200])


def run_pair(reference, candidate, feeds, provider: str, expose=(),
             stage=lambda text: None) -> tuple[dict, dict, str, str]:
    """Run both models on one provider, with the tensors ``expose`` ([(name, elem_type)]) as extra
    outputs. Returns (reference outputs, candidate outputs, engine, note). ``stage`` is told what runs
    next, so that a crash can be named. Runs onnxruntime in this process: :func:`verify` calls it in a
    child process."""
    if provider not in PROVIDERS:
        raise VerifyError(f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}")
    stage("loading onnxruntime")
    import onnxruntime as ort

    if PROVIDERS[provider] not in ort.get_available_providers():
        raise VerifyError(
            f"{PROVIDERS[provider]} is not available in this onnxruntime build "
            f"(available: {', '.join(ort.get_available_providers())})"
        )
    stage("loading the original model")
    try:
        ref_sess = _session(*_ort_source(reference, expose), provider=provider)
    except VerifyError:
        raise
    except Exception as e:
        _check_exposure(reference, expose, provider, e)
        if provider == "cpu" and _no_kernel(e):
            note = "onnxruntime has no CPU kernel for this model: " + str(e).splitlines()[0][:160]
            stage("running the original model in onnx.reference")
            ref = _run_reference(reference, feeds, expose)
            stage("running the folded model in onnx.reference")
            return ref, _run_reference(candidate, feeds, expose), "onnx.reference", note
        raise VerifyError(f"onnxruntime cannot load the original model: {str(e).splitlines()[0]}") from None
    stage("loading the folded model")
    try:
        cand_sess = _session(*_ort_source(candidate, expose), provider=provider)
    except VerifyError:
        raise
    except Exception as e:
        _check_exposure(candidate, expose, provider, e)
        raise VerifyError(f"onnxruntime cannot load the folded model: {str(e).splitlines()[0]}") from None
    stage("running the original model")
    ref = _run_session(ref_sess, feeds, "original")
    del ref_sess
    stage("running the folded model")
    cand = _run_session(cand_sess, feeds, "folded")
    engine = "onnxruntime " + ",".join(cand_sess.get_providers())
    return ref, cand, engine, ""


# -- comparing ----------------------------------------------------------------------------------------


def compare(name: str, ref: np.ndarray, cand: np.ndarray, atol=None, rtol=None, *, per_channel: bool = False,
            atol_floor: float | None = None) -> OutputComparison:
    """Compare one tensor. Default ``atol = ATOL[dtype] * max |ref|``, at least ``atol_floor``; with
    ``per_channel`` each channel of axis 1 takes its own scale, down to ``FLOOR[dtype] * max |ref|``,
    and the result names the channel nearest to (or past) its tolerance."""
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
    d_atol, d_rtol = TOLERANCES[dtype]
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
    need = np.maximum(err - rtol * np.abs(np.where(finite, r, 0.0)), 0.0)
    channels = per_channel and r.ndim >= 2 and r.shape[1] > 0 and r.size > 0
    if channels:  # one scale and one needed atol per channel of axis 1
        axes = tuple(a for a in range(r.ndim) if a != 1)
        scales = np.max(np.abs(np.where(finite, r, 0.0)), axis=axes)
        needs = np.max(need, axis=axes)
    else:
        scales = np.array([float(np.max(np.abs(r[finite]))) if finite.any() else 0.0])
        needs = np.array([float(need.max()) if need.size else 0.0])
    if atol is None:
        atols = d_atol * np.maximum(scales, np.finfo(np.float64).tiny)
        if channels:
            atols = np.maximum(atols, floor(dtype) * scales.max())
        if atol_floor is not None:
            atols = np.maximum(atols, atol_floor)
    else:
        atols = np.full_like(scales, float(atol))
    worst = int(np.argmax(needs / atols))
    note = ""
    if bad_nonfinite.any():
        needs = needs.copy()
        needs[worst] = math.inf
        note = f"{int(bad_nonfinite.sum())} NaN/Inf where the reference differs"
    passed = bool(np.all(needs <= atols)) and not bad_nonfinite.any()
    return OutputComparison(name, dtype, ref.shape, max_abs, max_rel, float(atols[worst]), rtol, float(needs[worst]),
                            passed, note, worst if channels else None)


def _compare_provider(job: dict, provider: str, stage) -> ProviderResult:
    """Run and compare on one provider (in the child): only the comparisons go back."""
    expose, fold_tensors, all_checked = job["expose"], job["fold_tensors"], job["all_checked"]
    try:
        ref_out, cand_out, engine, note = run_pair(job["reference"], job["candidate"], job["feeds"], provider,
                                                   expose, stage)
    except _ExposureRefused as e:  # verify as without per-fold checks, and say so
        ref_out, cand_out, engine, note = run_pair(job["reference"], job["candidate"], job["feeds"], provider,
                                                   (), stage)
        note = "; ".join(x for x in (note, f"the fold tensors could not be added as outputs ({e}): the graph "
                                           "outputs alone cover the folds") if x)
        expose, all_checked = (), False
        fold_tensors = [n for n in fold_tensors if n in ref_out]
    stage("comparing")
    tolerances, exposed = job["tolerances"], {name for name, _ in expose}
    folds = []
    for name in fold_tensors:
        if name not in ref_out or name not in cand_out:
            folds.append(OutputComparison(name, "", (), math.inf, math.inf, 0.0, 0.0, math.inf, False,
                                          "missing in the " + ("original" if name not in ref_out else "folded")
                                          + " model"))
            continue
        f_atol, f_rtol = tolerances.get(name, (None, None))
        folds.append(compare(name, ref_out[name], cand_out[name], f_atol, f_rtol, per_channel=True))
    # The floor of an output's atol: the fold tensors feeding it, when every fold was checked and passed.
    floors = {}
    if all_checked and folds and all(f.passed for f in folds):
        fold_floor = {f.name: floor(f.dtype) * _scale(ref_out[f.name]) for f in folds if f.dtype in TOLERANCES}
        for out, feeders in job["feeders"].items():
            value = max((fold_floor[n] for n in feeders if n in fold_floor), default=0.0)
            if value > 0:
                floors[out] = value
    outputs = []
    for name, value in ref_out.items():
        if name in exposed:
            continue
        if name not in cand_out:
            outputs.append(OutputComparison(name, str(np.asarray(value).dtype), np.shape(value), math.inf,
                                            math.inf, 0.0, 0.0, math.inf, False, "missing in the folded model"))
            continue
        o_atol, o_rtol = tolerances.get(name, (None, None))
        o_atol = o_atol if o_atol is not None else job["atol"]
        o_rtol = o_rtol if o_rtol is not None else job["rtol"]
        low = floors.get(name) if o_atol is None else None
        c = compare(name, value, cand_out[name], o_atol, o_rtol, atol_floor=low)
        if low is not None and c.dtype in TOLERANCES and low > TOLERANCES[c.dtype][0] * _scale(value):
            c.note = ("atol from the scale of the checked fold tensors feeding it, not its own"
                      + (f"; {c.note}" if c.note else ""))
        outputs.append(c)
    return ProviderResult(provider, engine, outputs, note, folds)


def _scale(a) -> float:
    a = np.asarray(a)
    if a.dtype.name not in TOLERANCES or not a.size:
        return 0.0
    r = np.abs(a.astype(np.float64))
    r = r[np.isfinite(r)]
    return float(r.max()) if r.size else 0.0


def _run_job(job: dict, send) -> None:
    """The child's side: every provider in turn; messages to ``send``."""
    for provider in job["providers"]:
        try:
            result = _compare_provider(job, provider, lambda text, p=provider: send(("stage", p, text)))
        except VerifyError as e:
            send(("error", str(e)))
            return
        except Exception:  # a bug: its traceback goes back to the parent
            import traceback

            send(("bug", traceback.format_exc()))
            return
        send(("result", result))
    send(("done",))


# -- the child process --------------------------------------------------------------------------------

WORKER = os.environ.get("ONNXFOLD_VERIFY_WORKER", "auto")  # "fork", "spawn" or "auto"
_lock = threading.Lock()
_worker = None  # the _Worker of this process, started on first use, stopped at exit


def _can_fork() -> bool:
    if WORKER != "auto":
        return WORKER == "fork"
    return (hasattr(os, "fork") and sys.platform.startswith("linux") and "onnxruntime" not in sys.modules
            and threading.active_count() == 1)


def _crash(status: int, where) -> VerifyError:
    provider, stage = where or ("?", "starting")
    if status < 0:
        sig = -status
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = "unknown signal"
        return VerifyError(f"onnxruntime crashed (signal {sig}, {name}) {stage} on {provider}: it cannot verify "
                           "this model on this provider (--no-verify skips verification)")
    return VerifyError(f"the verification process ended with exit code {status} {stage} on {provider}")


def _collect(recv, finish) -> list[ProviderResult]:
    """Read the child's messages until it is done; ``finish()`` gives the child's exit status."""
    results, where = [], None
    while True:
        try:
            msg = recv()
        except (EOFError, OSError):
            raise _crash(finish(), where) from None
        kind = msg[0]
        if kind == "stage":
            where = msg[1:]
        elif kind == "result":
            results.append(msg[1])
        elif kind == "error":
            raise VerifyError(msg[1])
        elif kind == "bug":
            raise RuntimeError("verification failed in its child process (this is a bug):\n" + msg[1])
        else:
            return results


def _run_forked(job: dict) -> list[ProviderResult]:
    from multiprocessing.connection import Connection

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: run, send, and leave without running the parent's exit handlers
        code = 0
        try:
            os.close(r)
            _run_job(job, Connection(w, readable=False).send)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    conn = Connection(r, writable=False)
    done = False
    try:
        def finish():
            nonlocal done
            done = True
            return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

        results = _collect(conn.recv, finish)
        finish()
        return results
    finally:
        conn.close()
        if not done:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)


class _Worker:
    """A persistent worker process, for processes that cannot fork safely (onnxruntime imported)."""

    def __init__(self):
        import subprocess
        from multiprocessing.connection import Connection

        to_child, from_parent = os.pipe()
        to_parent, from_child = os.pipe()
        root = str(Path(__file__).resolve().parent.parent)
        code = (f"import sys; sys.path.insert(0, {root!r}); from onnxfold.verify import _serve; "
                f"_serve({to_child}, {from_child})")
        self.proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(to_child, from_child),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        os.close(to_child)
        os.close(from_child)
        self.send = Connection(from_parent, readable=False)
        self.recv = Connection(to_parent, writable=False)
        self.owner = os.getpid()

    def run(self, job: dict) -> list[ProviderResult]:
        try:
            self.send.send(job)
        except OSError:
            raise _crash(self.proc.wait(), None) from None
        return _collect(self.recv.recv, self.proc.wait)

    def close(self):
        self.send.close()
        self.recv.close()
        try:
            self.proc.wait(timeout=5)
        except Exception:
            self.proc.kill()
            self.proc.wait()


def _serve(read_fd: int, write_fd: int) -> None:
    """The worker process's loop: a job in, its messages out, until the parent closes the pipe."""
    from multiprocessing.connection import Connection

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and closes the pipe
    recv = Connection(read_fd, writable=False)
    send = Connection(write_fd, readable=False)
    while True:
        try:
            job = recv.recv()
        except (EOFError, OSError):
            return
        _run_job(job, send.send)


def _run_spawned(job: dict) -> list[ProviderResult]:
    global _worker
    for key in ("reference", "candidate"):  # a model crosses the pipe as bytes
        if isinstance(job[key], onnx.ModelProto):
            if job[key].ByteSize() > PROTOBUF_LIMIT:
                raise VerifyError("the model is over 2 GiB: save it with external data and verify the file")
            job[key] = job[key].SerializeToString()
    if _worker is not None and _worker.owner != os.getpid():
        _worker = None  # inherited through a fork: its pipes belong to the parent's conversation
    if _worker is None or _worker.proc.poll() is not None:
        _stop_worker()
        _worker = _Worker()
    try:
        return _worker.run(job)
    except (VerifyError, RuntimeError):
        if _worker.proc.poll() is not None:  # it crashed: the next call starts a fresh one
            _stop_worker()
        raise
    except BaseException:  # interrupted mid-job: its answer would be read by the next call
        _stop_worker(kill=True)
        raise


def _stop_worker(kill: bool = False) -> None:
    global _worker
    if _worker is not None and _worker.owner == os.getpid():
        w, _worker = _worker, None
        if kill and w.proc.poll() is None:
            w.proc.kill()
        w.close()


atexit.register(_stop_worker)


def _run_isolated(job: dict) -> list[ProviderResult]:
    with _lock:
        return _run_forked(job) if _can_fork() else _run_spawned(job)


# -- what to expose -----------------------------------------------------------------------------------


def _main_outputs(model) -> set[str]:
    """Names of the tensors the main graph's nodes write, from a ModelProto or a model file (read as
    protobuf's wire format, without parsing the weights)."""
    if isinstance(model, onnx.ModelProto):
        return {o for n in model.graph.node for o in n.output if o}
    import mmap

    with open(model, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        names: set[str] = set()
        for graph in _fields(buf, 0, len(buf), 7):  # ModelProto.graph
            for node in _fields(buf, graph[0], graph[1], 1):  # GraphProto.node
                names.update(bytes(buf[a:b]).decode("utf-8", "replace") for a, b in _fields(buf, node[0], node[1], 2))
        names.discard("")
        return names


def _fields(buf, start: int, end: int, wanted: int):
    """(start, end) of each length-delimited field numbered ``wanted`` in buf[start:end]."""

    def varint(i):
        shift = value = 0
        while True:
            b = buf[i]
            value |= (b & 0x7F) << shift
            i += 1
            if b < 0x80:
                return value, i
            shift += 7

    i = start
    while i < end:
        key, i = varint(i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, i = varint(i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            n, i = varint(i)
            if number == wanted:
                yield i, i + n
            i += n
        else:  # groups are not used by ONNX
            raise ValueError(f"unexpected protobuf wire type {wire}")


def _feeders(model: onnx.ModelProto, wanted: set[str]) -> dict[str, list[str]]:
    """For each graph output, the tensors of ``wanted`` it depends on (through the main graph's nodes
    and the outer-scope names their subgraphs read)."""
    producer = {o: n for n in model.graph.node for o in n.output if o}

    def reads(node):
        names = list(node.input)
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                for g in all_graphs(sub):
                    for n in g.node:
                        names.extend(n.input)
        return [x for x in names if x]

    result = {}
    for out in model.graph.output:
        seen, todo, found = set(), [out.name], []
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in wanted:
                found.append(name)
            node = producer.get(name)
            if node is not None:
                todo.extend(reads(node))
        result[out.name] = found
    return result


def _plan_folds(ref_model, reference, candidate, folds, outputs: set[str], result: VerifyResult):
    """Which fold tensors to compare, which to add as outputs, which fold tensors each graph output
    depends on, and whether every fold is checked (itself or at a later link of its chain). Fills
    ``result.unchecked`` and ``result.notes``."""
    checked: list[str] = []
    expose: list[tuple[str, int]] = []
    if not folds:
        return checked, expose, {}, False
    ref_names = _main_outputs(ref_model)
    cand_names = _main_outputs(candidate)
    uncovered = 0
    for f in folds:
        name = getattr(f, "output", "")
        if name in result.unchecked or name in checked:
            continue
        if name and f.graph == "main" and name in ref_names and name not in cand_names:
            # a later fold of the same chain rewrote it again
            result.unchecked[name] = "rewritten again by a later fold of its chain: checked at that fold's tensor"
            continue
        why = _why_not_at_its_tensor(f, name, ref_names)
        if why:
            result.unchecked[name or f"{f.producer} + {f.consumer}"] = why
            uncovered += 1
            continue
        checked.append(name)
        if name not in outputs:
            expose.append((name, _ELEM_TYPES[f.dtype]))
    if expose and max(_size(reference), _size(candidate)) + len(_extra_outputs(expose)) > PROTOBUF_LIMIT:
        for name, _ in expose:
            checked.remove(name)
            result.unchecked[name] = "not exposed (the model is near 2 GiB): covered by the graph outputs alone"
        uncovered += len(expose)
        expose = []
        result.notes.append("the model's file is too near protobuf's 2 GiB limit to add outputs: its folds "
                            "are covered by the graph outputs alone")
    if uncovered:
        result.notes.append(f"{uncovered} fold(s) could not be compared at their own tensors: the graph outputs "
                            "alone cover them, each output at its own scale")
    all_checked = uncovered == 0 and bool(checked)
    feeders = _feeders(ref_model, set(checked)) if all_checked else {}
    return checked, expose, feeders, all_checked


def _why_not_at_its_tensor(f, name: str, ref_names: set[str]) -> str:
    """Why a fold cannot be compared at the tensor it rewrote ("" when it can)."""
    if not name:
        return "its tensor is not known: covered by the graph outputs alone"
    if getattr(f, "changed_later", ""):
        return f"changed again in place by a later fold ({f.changed_later}): covered by the graph outputs alone"
    if f.graph != "main":
        where = "a function" if f.graph.startswith("function") else "a subgraph"
        return f"inside {where} ({f.graph}): covered by the graph outputs alone"
    if name not in ref_names:
        return "not a tensor of the original's main graph (an inlined function): covered by the graph outputs alone"
    if f.dtype not in _ELEM_TYPES:
        return f"dtype {f.dtype}: covered by the graph outputs alone"
    return ""


def _size(model) -> int:
    return model.ByteSize() if isinstance(model, onnx.ModelProto) else Path(model).stat().st_size


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
    folds=None,
) -> VerifyResult:
    """Compare ``candidate`` against ``reference`` on each provider ("cpu", "cuda").

    ``reference`` and ``candidate`` are paths or ``onnx.ModelProto``. ``atol``/``rtol`` override the
    dtype defaults for every graph output; ``tolerances={"out": (atol, rtol)}`` for one output or fold
    tensor (None keeps the default). ``folds`` (``report.folded`` of :func:`fold_model`) checks each
    fold at the tensor it rewrote, per channel (see the module's docstring); :func:`annotate` writes
    those checks into the report. Raises :class:`VerifyError` when it cannot run (a provider is
    missing, an input cannot be made, onnxruntime crashes, nothing had an element to compare); the
    result is falsy when an output or a fold tensor disagrees.
    """
    for which, model in (("reference", reference), ("candidate", candidate)):
        if not isinstance(model, (onnx.ModelProto, str, os.PathLike)):
            raise TypeError(f"verify: {which} must be an onnx.ModelProto or a path, not {type(model).__name__}")
    result = VerifyResult()
    if isinstance(providers, str):
        providers = [p for p in providers.split(",") if p]
    for model in (reference, candidate):
        if not isinstance(model, onnx.ModelProto) and not Path(model).is_file():
            raise VerifyError(f"{model}: no such file")
    ref_model = (reference if isinstance(reference, onnx.ModelProto)
                 else onnx.load(str(reference), load_external_data=False))
    if inputs is None:
        feeds = make_inputs(ref_model, input_shapes, input_range, seed, warn=result.warnings.append)
    else:
        feeds = dict(inputs)
        missing = [v.name for v in model_inputs(ref_model) if v.name not in feeds]
        if missing:
            raise VerifyError(f"inputs given lack {', '.join(missing)}")
    outputs = {o.name for o in ref_model.graph.output}
    checked, expose, feeders, all_checked = _plan_folds(ref_model, reference, candidate, folds, outputs, result)
    job = {"reference": reference, "candidate": candidate, "feeds": feeds, "providers": list(providers),
           "expose": expose, "fold_tensors": checked, "feeders": feeders, "all_checked": all_checked,
           "atol": atol, "rtol": rtol, "tolerances": dict(tolerances or {})}
    del ref_model
    result.results = _run_isolated(job)
    _something_compared(result, feeds)
    return result


def _something_compared(result: VerifyResult, feeds: dict[str, np.ndarray]) -> None:
    """Nothing compared is no proof: raise when every output of a provider is empty; a fold tensor that
    is empty on these inputs is left to the graph outputs (``result.unchecked``)."""
    for r in result.results:
        if sum(o.elements for o in (*r.outputs, *r.folds)) == 0:
            shapes = ", ".join(f"{k} {list(np.shape(v))}" for k, v in feeds.items())
            raise VerifyError(f"nothing to compare on {r.provider}: every output has 0 elements on these inputs "
                              f"({shapes}), so nothing is proven; give inputs with elements (--input-shape, "
                              "--inputs) or skip verification (--no-verify)")
        for f in r.folds:
            if f.elements == 0 and f.name not in result.unchecked:
                result.unchecked[f.name] = "its tensor is empty on these inputs: covered by the graph outputs alone"


def load_inputs(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Inputs from an .npz file, one array per input name."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise VerifyError(f"{path}: cannot read inputs ({str(e).splitlines()[0]})") from None
