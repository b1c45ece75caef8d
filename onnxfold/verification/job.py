"""One verification as a typed job, and its run in the child process: both models on each provider,
each graph output and each planned fold tensor compared; only the comparisons go back to the parent."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from typing import Any

import numpy as np
import onnx

from .. import heap, isolation
from ..const_resolve import CONSTANT_MAKERS
from ..errors import ExposureRefused, first_line
from ..protobuf import PROTOBUF_LIMIT, is_default
from .inputs import feed_specs, input_specs, random_inputs
from .local import Parsed, compare_locally, compare_on_random, idle_channels
from .memory import GIB, check_budget, estimate, inferred_shapes, sized, structure_of_file
from .planning import model_size
from .results import ON_ITS_OWN_INPUTS, UNEXERCISED, OutputComparison, ProviderResult
from .sessions import extra_outputs, run_alone, run_pair
from .tolerances import TOLERANCES, compare, floor, scale_of

# The early reference (:func:`early_reference`) exposes the tensors a fold may be compared at; past this
# many bytes of them it waits for the plan instead.
EARLY_BYTES = 512 << 20
FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
# A fold is compared at the output of the affine it removed (BatchNormalization, Mul, Add, Sub, Div), or,
# when the affine came before the producer, at the producer's output (rules.input_side).
AFFINES = {"BatchNormalization", "Mul", "Add", "Sub", "Div"}
PRODUCERS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
SUMS = {"Add", "Sum", "Sub"}  # a sum of branches (rules.branches) is compared at its output
BRANCHES = AFFINES | PRODUCERS | {"AveragePool"}


@dataclass
class VerifyJob:
    """What the child needs: the two models (paths, ModelProto, or bytes once they cross a pipe), the
    feeds, the providers, the fold tensors to expose and compare, and the tolerances."""

    reference: str | onnx.ModelProto | bytes
    candidate: str | onnx.ModelProto | bytes
    feeds: dict[str, np.ndarray]
    providers: list[str]
    expose: list[tuple[str, int]] = field(default_factory=list)  # (fold tensor, elem type) added as outputs
    fold_tensors: list[str] = field(default_factory=list)  # compared per channel
    feeders: dict[str, list[str]] = field(default_factory=dict)  # graph output -> checked fold tensors it reads
    all_checked: bool = False  # every fold is compared at its own tensor
    atol: float | None = None
    rtol: float | None = None
    tolerances: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    axes: dict[str, int | None] = field(default_factory=dict)  # fold tensor -> its channel axis (None: per tensor)
    terms: dict[str, np.ndarray] = field(default_factory=dict)  # fold tensor -> |its bias| per channel (Folded.terms)
    nodes: tuple[bytes, bytes] = (b"", b"")  # appended to each model's graph: If branches forced (planning)
    # Begun before the fold (verification.begin): the fields of PLAN come from the parent's wait_first();
    # meanwhile the original runs with the tensors of ``structure`` (the original without its weights;
    # None: read from its file here) a fold may be compared at, within ``memory`` GiB. Begun before the
    # load, the feeds are made here too (``inputs``: input_shapes, input_range, seed), as the parent makes
    # them; the plan's ``feeds_digest`` says they are the same.
    plan_later: bool = False
    structure: onnx.ModelProto | None = None
    memory: float | None = None
    inputs: tuple[dict[str, tuple[int, ...]], tuple[float, float], int] | None = None
    feeds_digest: str = ""

    def as_bytes(self) -> VerifyJob:
        """The job with its ModelProto models serialized (a worker process receives them as bytes)."""
        def serialized(model: Any) -> Any:
            return model.SerializeToString() if isinstance(model, onnx.ModelProto) else model

        return replace(self, reference=serialized(self.reference), candidate=serialized(self.candidate))


# What the parent's plan sets (a job begun with plan_later gets these through isolation.wait_first()).
PLAN = ("candidate", "expose", "fold_tensors", "feeders", "all_checked", "atol", "rtol", "tolerances", "axes",
        "terms", "nodes", "feeds_digest", "memory")


def digest(feeds: dict[str, np.ndarray]) -> str:
    """What the inputs are, in a few bytes: the parent's plan and the child's inputs are compared by it."""
    h = hashlib.sha256()
    for name in sorted(feeds):
        value = np.ascontiguousarray(feeds[name])
        h.update(f"{name}\0{value.dtype.str}\0{value.shape}\0".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def plan_of(job: VerifyJob) -> dict[str, Any]:
    return {f.name: getattr(job, f.name) for f in fields(job) if f.name in PLAN}


@dataclass
class Early:
    """The original's outputs run before the plan: every tensor of ``exposed`` beside the graph outputs."""

    outputs: dict[str, Any]
    exposed: set[str]
    timings: dict[str, float]

    def covering(self, job: VerifyJob) -> dict[str, Any] | None:
        """The outputs as run with the job's exposure alone, when they hold all it needs (None else)."""
        wanted = {name for name, _ in job.expose}
        if job.nodes[0] or not wanted <= self.outputs.keys():
            return None
        return {k: v for k, v in self.outputs.items() if k not in self.exposed or k in wanted}

    def idle(self, while_: Callable[[], bool] = lambda: True) -> bool:
        """Whether a fold tensor is likely to have channels these inputs do not reach (then compared on
        random values after the direct comparison: :func:`_on_random`): an exposed tensor with such a
        channel on axis 1, or on its last axis when it has 2 dimensions (the plan has the real axes).
        Looked for tensor by tensor while ``while_()`` holds (False once it does not)."""
        return any(while_() and idle_channels(v, 1 if np.ndim(v) > 2 else -1)
                   for k, v in self.outputs.items() if k in self.exposed)


def run_job(job: VerifyJob, send) -> list[ProviderResult]:
    """The child's side (an :mod:`onnxfold.isolation` target): every provider in turn. Memory a session
    frees is kept for the next (:func:`onnxfold.heap.keep_freed`): the folded model's session is made
    in the pages the original's left (ResNet-50: 0.23 -> 0.1 s)."""
    heap.keep_freed()

    def stage_on(provider: str):
        return lambda text: send(("stage", "onnxruntime", f"{text} on {provider}"))

    early, shapes, parsed = None, None, None
    if job.plan_later:
        job = _own_inputs(job)
        shapes = infer_candidates(job)
        early = early_reference(job, stage_on(job.providers[0]), shapes)
        if early is not None and early.idle(while_=isolation.first_pending):
            try:  # for the random comparison that follows, while the fold goes on
                parsed = Parsed(job.reference)
            except Exception:  # noqa: BLE001 - that comparison parses it again and says why it cannot
                parsed = None
        stage_on(job.providers[0])("waiting for the folded model to be written")
        job = replace(job, **isolation.wait_first(), plan_later=False, structure=None)
        if job.feeds_digest and job.feeds_digest != digest(job.feeds):
            raise RuntimeError("verification's child made other inputs than the parent")
        check_plan_budget(job, shapes)
    results = []
    for provider in job.providers:
        results.append(compare_provider(job, provider, stage_on(provider), early, shapes, parsed))
        early = None
    return results


def _own_inputs(job: VerifyJob) -> VerifyJob:
    """A job begun before the load: the original's structure read from its file and the inputs made
    from it, as the parent makes them (a file it cannot read so: nothing runs early)."""
    if job.structure is not None and job.feeds:
        return job
    try:
        model = job.structure if job.structure is not None else structure_of_file(job.reference)
        feeds = job.feeds
        if not feeds and job.inputs is not None:
            shapes, value_range, seed = job.inputs
            feeds = random_inputs(input_specs(model, shapes), value_range, seed)
    except Exception:  # noqa: BLE001 - the parent's load says what is wrong with the file
        return replace(job, structure=None)
    return replace(job, structure=model, feeds=feeds)


def candidates(model: onnx.ModelProto) -> list[str]:
    """The tensors of the main graph a fold may be compared at (:data:`AFFINES`, :data:`PRODUCERS`): the
    outputs of its BatchNormalizations and of its Mul, Add, Sub and Div by a constant (what a rule folds),
    of its sums with a branch made by a producer or an affine (a branch sum: Add, Sum, Sub), and of its
    producers that read such an affine's output (or a Pad's). A Mul of two run-time tensors (SiLU's
    x * sigmoid(x), squeeze-excite) is no fold's: exposing it only cost memory and time (timm's
    efficientnet_b0: 187 candidates, 56 so)."""
    graph = model.graph
    made_by = {o: n for n in graph.node for o in n.output if o}
    fed = {v.name for v in graph.input} if model.ir_version >= 4 else set()
    # constants as onnxfold.const_resolve decides them, Shape of anything counting: one pass in the
    # graph's order (topological, as the spec wants; out of order, a value counts as not constant)
    constant = {t.name: t.name not in fed for t in graph.initializer}
    for n in graph.node:
        value = is_default(n) and n.op_type in CONSTANT_MAKERS and (
            n.op_type in ("Shape", "Size")
            or all(constant.get(i, False) for i in (n.input[:1] if n.op_type == "CastLike" else n.input) if i))
        constant.update({o: value for o in n.output if o})
    affines, names = set(), set()
    for n in graph.node:
        if not n.output or not n.output[0] or not is_default(n):
            continue
        by_constant = any(constant.get(i, False) for i in n.input[:2] if i)
        if n.op_type == "BatchNormalization" or (n.op_type in AFFINES and by_constant):
            affines.add(n.output[0])
        elif n.op_type in SUMS and any(getattr(made_by.get(i), "op_type", "") in BRANCHES for i in n.input):
            names.add(n.output[0])
    # an affine read by nothing but the next affine of its chain (BatchNormalization -> Mul -> Add, as
    # Caffe2's exports have it): that fold's tensor is rewritten by the next fold and compared at its
    # output (light_densenet121: 363 candidates, 121 so; the plan compares 59)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in set(n.input):
            if i in affines:
                readers.setdefault(i, []).append(n)
    names |= {a for a in affines if not (len(readers.get(a, ())) == 1 and readers[a][0].output
                                         and readers[a][0].output[0] in affines)}
    for n in graph.node:
        if n.output and n.output[0] and is_default(n) and n.op_type in PRODUCERS and n.input:
            if n.input[0] in affines or getattr(made_by.get(n.input[0]), "op_type", "") == "Pad":
                names.add(n.output[0])
    return sorted(names - {o.name for o in graph.output} - {v.name for v in graph.input})


@dataclass
class Inferred:
    """What shape inference tells of the original on the job's inputs, once per child (it is the slow
    part of planning the early run): (element type, bytes) of each tensor of ``asked`` it tells in full,
    and (element type, shape) of every tensor it tells in full (the random comparison's inputs)."""

    model: onnx.ModelProto
    specs: dict[str, tuple[np.dtype, tuple[int, ...]]]
    candidates: list[str]  # :func:`candidates` of ``model``
    asked: set[str]  # the candidates and the graph outputs
    shapes: dict[str, tuple[int, tuple[int, ...]]]

    @cached_property
    def typed(self) -> dict[str, tuple[int, int]]:
        """(element type, bytes) of each tensor of ``asked`` told in full."""
        return sized({n: s for n, s in self.shapes.items() if n in self.asked})

    def sizes(self, names: list[str]) -> dict[str, int] | None:
        """Bytes by name, when every one of ``names`` was asked about (None: infer them again)."""
        return {n: size for n, (_, size) in self.typed.items()} if set(names) <= self.asked else None


def infer_candidates(job: VerifyJob) -> Inferred | None:
    """Shape inference on the original's structure with the job's inputs, for its :func:`candidates`
    and graph outputs (None without a structure or inputs)."""
    model = job.structure
    if model is None or not job.feeds:
        return None
    specs = feed_specs(job.feeds)
    names = candidates(model)
    asked = {*names, *(o.name for o in model.graph.output)}
    return Inferred(model, specs, names, asked, inferred_shapes(model, specs, sorted(asked), every=True))


def early_reference(job: VerifyJob, stage, shapes: Inferred | None) -> Early | None:
    """The original run before the fold has said which of its tensors to compare: the float tensors of
    :func:`candidates` whose type and size shape inference tells (``shapes``) are added as outputs (up
    to :data:`EARLY_BYTES`, within ``job.memory``). None when that cannot be (the plan then runs it
    again, with its own exposure, as it does when a planned tensor is not among these)."""
    if shapes is None:
        return None
    stage("planning the original's early run")
    model, typed = shapes.model, shapes.typed
    outputs = {o.name for o in model.graph.output}
    known = {name: typed[name][0] for name in shapes.candidates if name in typed and typed[name][0] in FLOATS}
    sizes = {name: size for name, (_, size) in typed.items()}
    if not known or sum(sizes[name] for name in known) > EARLY_BYTES:
        return None
    if job.memory and estimate(model, shapes.specs, [*outputs, *known], sizes)[0] > job.memory * GIB:
        return None
    expose = list(known.items())
    if not isinstance(job.reference, str) or model_size(job.reference) + len(extra_outputs(expose)) > PROTOBUF_LIMIT:
        return None
    timings: dict[str, float] = {}
    out = run_alone(job.reference, job.feeds, job.providers[0], expose, stage, timings)
    return None if out is None else Early(out, set(known), timings)


def check_plan_budget(job: VerifyJob, shapes: Inferred | None) -> None:
    """The parent's plan within ``job.memory`` (:func:`.memory.check_budget`), checked here with the early
    run's shape inference: the parent leaves it to a child begun early (its inference 0.02-0.05 s of a
    corpus model, on the parent's path between the fold and the write)."""
    if not job.memory or not isinstance(job.reference, str):
        return
    model = shapes.model if shapes is not None else structure_of_file(job.reference)
    outputs = [o.name for o in model.graph.output]
    tensors = [*outputs, *(name for name, _ in job.expose)]
    specs = feed_specs(job.feeds)
    sizes = shapes.sizes(tensors) if shapes is not None and shapes.specs == specs else None
    check_budget(model, specs, tensors, job.memory, job.reference, sizes)


def _axis(job: VerifyJob, name: str) -> int:
    """The channel axis a fold tensor is compared along (1 where the fold gave none, as compare() takes it)."""
    axis = job.axes.get(name)
    return 1 if axis is None else axis


def _largest(terms: np.ndarray | None) -> float:
    return float(terms.max()) if terms is not None and terms.size else 0.0


def _compare_fold(job: VerifyJob, name: str, ref, cand) -> OutputComparison:
    f_atol, f_rtol = job.tolerances.get(name, (None, None))
    axis = job.axes.get(name)
    return compare(name, ref, cand, f_atol, f_rtol, per_channel=axis is not None, axis=_axis(job, name),
                   terms=job.terms.get(name))


def _again_locally(job: VerifyJob, provider: str, folds: list[OutputComparison], failed: list[str], ref_out,
                   timings: dict[str, float]) -> list[OutputComparison]:
    """The fold tensors that failed, compared again where their inputs are the original's (.local): one
    that passes there passes, its note giving the direct comparison's error."""
    try:
        again = compare_locally(job, provider, failed, ref_out, _compare_fold, timings)
    except Exception as e:  # noqa: BLE001 - the direct comparisons stand; the note says why
        return [replace(f, note="; ".join(x for x in (f.note, f"not compared where its inputs are the original's "
                                                              f"({first_line(e)[:120]})") if x))
                if f.name in failed else f for f in folds]
    result = []
    for f in folds:
        local = again.get(f.name)
        if local is not None and local.passed:
            local.note = (f"{ON_ITS_OWN_INPUTS}; directly, max abs {f.max_abs:.3g} "
                          f"(atol {f.atol:.3g}): the error of the folds before it")
            f = local
        elif local is not None:
            f.note = "; ".join(x for x in (f.note, f"also fails where its inputs are the original's "
                                                   f"(max abs {local.max_abs:.3g})") if x)
        result.append(f)
    return result


def _on_random(job: VerifyJob, provider: str, folds: list[OutputComparison], idle: dict[str, list[int]], ref_out,
               timings: dict[str, float], shapes: Inferred | None = None,
               parsed: Parsed | None = None) -> list[OutputComparison]:
    """The fold tensors with channels the inputs do not reach (``idle``: their channels, one value each on
    these inputs), compared again on random values at their own inputs (.local): one that fails there
    fails; one that cannot be compared so passes as it did, its note saying which channels went
    unexercised. ``shapes``: the early run's shape inference (used where it was of these inputs)."""
    specs = feed_specs(job.feeds)
    known = shapes.shapes if shapes is not None and shapes.specs == specs else None
    try:
        again = compare_on_random(job, provider, list(idle), ref_out, _compare_fold, timings, shapes=known,
                                  parsed=parsed)
        why = ""
    except Exception as e:  # noqa: BLE001 - the direct comparisons stand; the note says why
        again, why = {}, f" ({first_line(e)[:120]})"
    result = []
    for f in folds:
        channels = idle.get(f.name)
        if channels is not None:
            said = (f"{len(channels)} channel(s) one value on these inputs (channel {channels[0]}"
                    f"{' ...' if len(channels) > 1 else ''})")
            random = again.get(f.name)
            if random is None:
                f = replace(f, note="; ".join(x for x in (f.note, f"{said}: {UNEXERCISED}{why}") if x))
            elif random.passed:
                f = replace(f, note="; ".join(x for x in (f.note, f"{said}: on random values at its own inputs "
                                                                   f"too, max abs {random.max_abs:.3g}") if x))
            else:
                f = replace(random, note=f"{said}, where it passed; on random values at its own inputs it fails")
        result.append(f)
    return result


def compare_provider(job: VerifyJob, provider: str, stage, early: Early | None = None,
                     shapes: Inferred | None = None, parsed: Parsed | None = None) -> ProviderResult:
    """Run and compare on one provider (in the child): only the comparisons go back. ``early``: the
    original's outputs run already on this provider (used when they cover the job's exposure);
    ``shapes``: the early run's shape inference; ``parsed``: the original parsed ahead for the random
    comparison."""
    expose, fold_tensors, all_checked = job.expose, job.fold_tensors, job.all_checked
    timings: dict[str, float] = {}
    given = early.covering(job) if early is not None else None
    if given is not None:
        timings.update(early.timings)  # type: ignore[union-attr]
    try:
        ref_out, cand_out, engine, note = run_pair(job.reference, job.candidate, job.feeds, provider,
                                                   expose, stage, job.nodes, timings, reference_outputs=given)
    except ExposureRefused as e:  # verify as without per-fold checks (nor forced branches), and say so
        ref_out, cand_out, engine, note = run_pair(job.reference, job.candidate, job.feeds, provider,
                                                   (), stage, timings=timings)
        note = "; ".join(x for x in (note, f"the fold tensors could not be added as outputs ({e}): the graph "
                                           "outputs alone cover the folds") if x)
        expose, all_checked = [], False
        fold_tensors = [n for n in fold_tensors if n in ref_out]
    stage("comparing")
    began = time.perf_counter()
    tolerances, exposed = job.tolerances, {name for name, _ in expose}
    folds: list[OutputComparison] = []
    for name in fold_tensors:
        if name not in ref_out or name not in cand_out:
            folds.append(OutputComparison(name, "", (), math.inf, math.inf, 0.0, 0.0, math.inf, False,
                                          "missing in the " + ("original" if name not in ref_out else "folded")
                                          + " model"))
            continue
        folds.append(_compare_fold(job, name, ref_out[name], cand_out[name]))
    failed = [f.name for f in folds if not f.passed and f.name in ref_out and f.name in cand_out]
    if failed and engine.startswith("onnxruntime"):
        stage("comparing the failed fold tensors where their inputs are the original's")
        folds = _again_locally(job, provider, folds, failed, ref_out, timings)
    idle = {f.name: channels for f in folds if f.passed and f.name in ref_out
            and (channels := idle_channels(ref_out[f.name], _axis(job, f.name)))}
    if idle and engine.startswith("onnxruntime"):
        stage("comparing on random values the folds of channels the inputs do not reach")
        folds = _on_random(job, provider, folds, idle, ref_out, timings, shapes, parsed)
    # The floor of an output's atol: the fold tensors feeding it, when every fold was checked and passed.
    floors: dict[str, float] = {}
    if all_checked and folds and all(f.passed for f in folds):
        fold_floor = {f.name: floor(f.dtype) * max(scale_of(ref_out[f.name]), _largest(job.terms.get(f.name)))
                      for f in folds if f.dtype in TOLERANCES}
        for out, feeders in job.feeders.items():
            value = max((fold_floor[n] for n in feeders if n in fold_floor), default=0.0)
            if value > 0:
                floors[out] = value
    outputs: list[OutputComparison] = []
    for name, value in ref_out.items():
        if name in exposed:
            continue
        if name not in cand_out:
            outputs.append(OutputComparison(name, str(np.asarray(value).dtype), np.shape(value), math.inf,
                                            math.inf, 0.0, 0.0, math.inf, False, "missing in the folded model"))
            continue
        o_atol, o_rtol = tolerances.get(name, (None, None))
        o_atol = o_atol if o_atol is not None else job.atol
        o_rtol = o_rtol if o_rtol is not None else job.rtol
        low = floors.get(name) if o_atol is None else None
        c = compare(name, value, cand_out[name], o_atol, o_rtol, atol_floor=low)
        if low is not None and c.dtype in TOLERANCES and low > TOLERANCES[c.dtype][0] * scale_of(value):
            c.note = ("atol from the scale of the checked fold tensors feeding it, not its own"
                      + (f"; {c.note}" if c.note else ""))
        outputs.append(c)
    timings["compare_s"] = time.perf_counter() - began
    return ProviderResult(provider, engine, outputs, note, folds, timings)

