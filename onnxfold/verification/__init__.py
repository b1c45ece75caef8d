"""Prove a fold: run the original and the folded model on the same seeded inputs and compare.

Both models run in onnxruntime with graph optimizations OFF (``ORT_DISABLE_ALL``): with them on,
onnxruntime fuses Conv+BatchNormalization in the reference itself and a wrong fold can look right.
Where onnxruntime's CPU provider has no kernel for the model (float64 or bfloat16 Conv), both run in
``onnx.reference.ReferenceEvaluator`` instead, and the result says so; there BatchNormalization is
computed by :func:`batch_norm` below, as the spec says (onnx.reference's own normalizes
with batch statistics at opsets 9-13 and raises at 6-7).

The runtime runs in a child process (:mod:`onnxfold.isolation`), so that a crash of onnxruntime (it
segfaults on some valid models) is a clear :class:`VerifyError` ("onnxruntime crashed (signal 11,
SIGSEGV) running the original model on cpu") instead of the death of the caller. It sends back only
the comparisons, never the outputs.

The package, by job: :mod:`.inputs` (seeded inputs), :mod:`.planning` (which fold tensors to compare),
:mod:`.job` (the typed job and the child's side), :mod:`.sessions` (onnxruntime), :mod:`.reference`
(onnx.reference, corrected), :mod:`.tolerances` (the comparison), :mod:`.local` (a fold tensor
compared where its inputs are the original's), :mod:`.results`.

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
  output of both models and compared *per channel* along the fold's own channel axis (``Folded.axis``:
  1 for a Conv or Gemm, the last for a MatMul, followed through layout ops): channel ``c`` passes when
  ``|candidate - reference| <= atol_c + RTOL[dtype] * |reference|`` with
  ``atol_c = max(ATOL[dtype] * max |reference[:, c]|, FLOOR[dtype] * max |reference|,
  FLOOR[dtype] * |b'_c|)``, ``b'_c`` the constant term the folded node adds to the channel (``Folded.terms``:
  where a BatchNormalization's mean is far from 0, ``w'x`` and ``b'`` cancel, and the rounding of the
  folded weights is on their scale, not the result's). A channel
  near 0.02 beside one near 850 is held to its own scale down to the floor (float32: 6.5e-3), so a
  fold that flips its sign fails. A link of a chain whose tensor a later fold rewrote again is
  checked at that later tensor. A fold tensor that fails is compared once more where its inputs are
  the original's (:mod:`.local`: the roundings of the folds before it compound through a deep float16
  network; a wrong fold fails both). Folds inside subgraphs or functions, and tensors that do not exist
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
  fixed at 0), or none has a finite element on both sides (inputs all NaN or Inf),
  :class:`VerifyError` is raised: there is nothing to call passed or failed.
- **A fold no input exercised is not verified.** A fold in a branch of a main-graph If runs through a
  copy of that If whose condition is forced to that branch (:func:`.planning.force_branches`), its
  outputs compared like graph outputs; a fold in an If branch that cannot be forced so is refused.
- **Limits.** ``timeout`` seconds (the child is killed past it) and ``memory`` GiB (an estimate,
  :mod:`.memory`, checked before anything runs).

``atol``/``rtol`` given by the caller replace the defaults for graph outputs; ``tolerances`` by name
applies to graph outputs and fold tensors alike.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .. import isolation
from ..errors import ChildFailed, ChildTimeout, VerifyError
from ..protobuf import PROTOBUF_LIMIT
from .inputs import (
    DEFAULT_RANGE,
    check_feeds,
    check_shapes,
    feed_specs,
    input_specs,
    load_inputs,
    make_inputs,
    model_inputs,
    parse_shape,
    random_inputs,
)
from .job import VerifyJob, digest, plan_of, run_job
from .memory import check_budget, default_budget, structure
from .planning import force_branches, plan_folds
from .reference import batch_norm
from .results import UNEXERCISED, OutputComparison, ProviderResult, VerifyResult, annotate
from .sessions import PROVIDERS, check_providers
from .tolerances import TOLERANCES, compare

# How long one verification may take by default (``--verify-timeout``): it runs each model once per
# provider on one input, which takes seconds to a few minutes even for models of several GiB on a CPU;
# an hour is far above that, and ends a run stuck in onnxruntime (a Loop of 10^12 iterations) well
# before a CI job's own limit (GitHub Actions: 6 hours) would kill it without a word.
DEFAULT_TIMEOUT = 3600.0

# The memory verification may need by default (``--verify-memory``, GiB): this machine's (memory.py).
DEFAULT_MEMORY = default_budget()

__all__ = ["verify", "begin", "Early", "DEFAULT_TIMEOUT", "DEFAULT_MEMORY",
           "VerifyResult", "VerifyError", "ProviderResult", "OutputComparison", "annotate", "compare",
           "make_inputs", "model_inputs", "load_inputs", "check_feeds", "check_shapes",
           "parse_shape", "check_providers", "batch_norm", "structure",
           "DEFAULT_RANGE", "PROVIDERS", "TOLERANCES"]


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
    timeout: float | None = DEFAULT_TIMEOUT,
    memory: float | None = DEFAULT_MEMORY,
    meanwhile: Callable[[], None] | None = None,
    structure: onnx.ModelProto | None = None,
    write: Callable[[], None] | None = None,
    planned: onnx.ModelProto | None = None,
    early: Early | None = None,
) -> VerifyResult:
    """Compare ``candidate`` against ``reference`` on each provider ("cpu", "cuda").

    ``reference`` and ``candidate`` are paths or ``onnx.ModelProto``. ``atol``/``rtol`` override the
    dtype defaults for every graph output; ``tolerances={"out": (atol, rtol)}`` for one output or fold
    tensor (None keeps the default). ``folds`` (``report.folded`` of :func:`fold_model`) checks each
    fold at the tensor it rewrote, per channel (see the module's docstring); :func:`annotate` writes
    those checks into the report. ``timeout``: seconds the whole comparison may take (None or 0: no limit;
    default :data:`DEFAULT_TIMEOUT`); past it the child is killed and :class:`VerifyError` raised.
    ``memory``: GiB it may need (None or 0: no limit; default this machine's memory): when the
    estimate (:mod:`.memory`) is above it, :class:`VerifyError` before anything runs. ``meanwhile``: run
    in this process while the models run in the child (fold_file checks the written model then).
    ``structure``: the reference's :func:`structure`, when the caller has the model in memory (then the
    reference's file is not read here again).
    ``write`` and ``planned``: the candidate's file is not written yet; ``write()`` writes it, and
    ``planned`` is the candidate as it will be written (the fold tensors are planned from it). Where
    the child can be forked, it loads and runs the reference while ``write()`` runs here (fold_file:
    the original's session is built while the folded model is written), and reads the candidate once
    ``write()`` has returned; elsewhere ``write()`` runs first. Its time counts in ``timeout``; what it
    raises is raised here.
    ``early``: the verification :func:`begin` started (before the fold) with the same reference,
    candidate, providers, inputs and memory: its child, which has run the reference already, gets the
    plan; ``timeout`` counts from its start.
    Raises :class:`VerifyError` when it cannot run (a provider is
    missing, an input cannot be made, onnxruntime crashes, nothing had an element to compare); the
    result is falsy when an output or a fold tensor disagrees.
    """
    for which, model in (("reference", reference), ("candidate", candidate)):
        if not isinstance(model, (onnx.ModelProto, str, os.PathLike)):
            raise TypeError(f"verify: {which} must be an onnx.ModelProto or a path, not {type(model).__name__}")
    if (write is None) != (planned is None) or (write is not None and isinstance(candidate, onnx.ModelProto)):
        raise TypeError("verify: write and planned go together, with the candidate's path")
    result = VerifyResult()
    began = time.perf_counter()
    if isinstance(providers, str):
        providers = [p for p in providers.split(",") if p]
    for model in (reference, candidate) if write is None else (reference,):
        if not isinstance(model, onnx.ModelProto) and not Path(model).is_file():
            raise VerifyError(f"{model}: no such file")
    if structure is not None:
        ref_model = structure
    elif isinstance(reference, onnx.ModelProto):
        ref_model = reference
    else:
        ref_model = onnx.load(str(reference), load_external_data=False)
    result.timings["reference_s"] = (now := time.perf_counter()) - began
    if early is not None and early.specs is not None:
        specs, feeds = early.specs, early.feeds
        result.warnings.extend(early.warnings)
    else:
        specs, feeds = _specs(ref_model, inputs, input_shapes, result.warnings.append)
    outputs = {o.name for o in ref_model.graph.output}
    planning = candidate if planned is None else planned
    checked, expose, feeders, all_checked = plan_folds(ref_model, reference, planning, folds, outputs, result)
    if early is None:  # else its child checks the plan with the shapes it inferred for its early run
        check_budget(ref_model, specs, [*outputs, *(name for name, _ in expose)], memory,
                     str(reference) if isinstance(reference, (str, os.PathLike)) else "the model")
    result.timings["plan_s"] = (began := time.perf_counter()) - now
    if feeds is None:
        feeds = random_inputs(specs, input_range, seed)
    result.timings["inputs_s"] = (now := time.perf_counter()) - began
    nodes, forced = force_branches(ref_model, planning, folds, result)
    del planning, planned
    axes = {getattr(f, "output", ""): getattr(f, "axis", None) for f in folds or ()}
    terms: dict[str, np.ndarray] = {f.output: f.terms for f in folds or () if getattr(f, "terms", None) is not None}
    job = VerifyJob(reference, candidate, feeds, list(providers), expose, checked, feeders, all_checked, atol, rtol,
                    dict(tolerances or {}), {name: axes.get(name) for name in checked},
                    {name: terms[name] for name in checked if name in terms}, nodes,
                    feeds_digest=digest(feeds) if early is not None and early.feeds is None else "",
                    memory=memory)
    del ref_model
    result.timings["plan_s"] += (began := time.perf_counter()) - now
    result.results = _run_isolated(job, timeout, meanwhile, write, early)
    result.timings["child_s"] = time.perf_counter() - began
    for r in result.results:
        for part, seconds in r.timings.items():
            result.timings[part] = result.timings.get(part, 0.0) + seconds
    _something_compared(result, feeds)
    for r in result.results:
        unexercised = [f.name for f in r.folds if f.passed and UNEXERCISED in f.note]
        if unexercised:
            result.warnings.append(
                f"{len(unexercised)} fold tensor(s) on {r.provider} have channels the inputs do not reach and could "
                f"not be compared on random values either ({unexercised[0]}{' ...' if len(unexercised) > 1 else ''}):"
                " their folds there are not exercised; --inputs or --input-range can reach them")
        missing = sorted(set(forced) - {o.name for o in r.outputs})
        if missing:
            raise VerifyError(f"the If branches holding folds could not be run on their own on {r.provider} "
                              f"({', '.join(missing)} missing): a fold no input exercised is not verified; "
                              "--no-verify writes the model unverified")
    return result


def _specs(ref_model: onnx.ModelProto, inputs: dict[str, np.ndarray] | None,
           input_shapes: dict[str, tuple[int, ...]] | None, warn: Callable[[str], None]):
    """(the inputs' specs, the inputs given or None: made from the specs)."""
    if inputs is None:
        return input_specs(ref_model, input_shapes, warn=warn), None
    feeds = dict(inputs)
    missing = [v.name for v in model_inputs(ref_model) if v.name not in feeds]
    if missing:
        raise VerifyError(f"inputs given lack {', '.join(missing)}")
    check_feeds(ref_model, feeds, "the inputs given")
    return feed_specs(feeds), feeds


@dataclass
class Early:
    """A verification begun before the fold (:func:`begin`); :func:`verify` ends it, or :meth:`close`."""

    child: isolation.Child
    specs: dict[str, tuple[np.dtype, tuple[int, ...]]] | None  # None: made in the child (and by verify())
    feeds: dict[str, np.ndarray] | None
    warnings: list[str]
    began: float  # time.monotonic()

    def close(self) -> None:
        self.child.close()


def begin(reference: str | os.PathLike, providers=("cpu",), *, structure: onnx.ModelProto | None = None,
          inputs: dict[str, np.ndarray] | None = None, input_shapes: dict[str, tuple[int, ...]] | None = None,
          input_range: tuple[float, float] = DEFAULT_RANGE, seed: int = 0,
          memory: float | None = DEFAULT_MEMORY) -> Early | None:
    """Begin verifying before the candidate exists (fold_file: before the load, or before the fold): a
    forked child loads and runs the reference at once, the tensors a fold may be compared at exposed
    (within the memory budget: :func:`.job.early_reference`), while this process folds; :func:`verify`
    given the result (``early=``) sends it the plan, with the candidate's path, once the folded model
    is written. ``structure``: the reference without its weights; None: the child reads it from the
    file and makes the inputs (``inputs`` must then be None), as :func:`verify` makes them here. None
    where a child cannot be forked now, or its inputs cannot be made (then :func:`verify` says why)."""
    if not isolation.can_fork():
        return None
    if isinstance(providers, str):
        providers = [p for p in providers.split(",") if p]
    warnings: list[str] = []
    specs = feeds = None
    if structure is not None:
        try:
            specs, feeds = _specs(structure, inputs, input_shapes, warnings.append)
            if feeds is None:
                feeds = random_inputs(specs, input_range, seed)
        except VerifyError:
            return None
    elif inputs is not None:
        raise ValueError("begin: inputs are made in the child only from the reference's own file")
    job = VerifyJob(os.fspath(reference), "", feeds or {}, list(providers), plan_later=True, structure=structure,
                    memory=memory, inputs=(dict(input_shapes or {}), input_range, seed) if feeds is None else None)
    began = time.monotonic()
    return Early(isolation.Child(run_job, job, gated=True), specs, feeds, warnings, began)


def _run_isolated(job: VerifyJob, timeout: float | None, meanwhile: Callable[[], None] | None = None,
                  write: Callable[[], None] | None = None, early: Early | None = None) -> list[ProviderResult]:
    """The job in a child process; a crash of onnxruntime there, or a run past ``timeout``, is a
    :class:`VerifyError`. ``write``, ``early``: see :func:`verify`."""
    if early is not None:
        def first() -> dict:
            if write is not None:
                write()
            return plan_of(job)

        return _mapped(job, lambda: isolation.join(early.child, first=first, meanwhile=meanwhile,
                                                    timeout=timeout or None, began=early.began))
    if not isolation.can_fork():  # a model crosses the pipe as bytes
        for model in (job.reference, job.candidate):
            if isinstance(model, onnx.ModelProto) and model.ByteSize() > PROTOBUF_LIMIT:
                raise VerifyError("the model is over 2 GiB: save it with external data and verify the file")
        job = job.as_bytes()
    # 0: no limit, as on the command line
    return _mapped(job, lambda: isolation.call(run_job, job, timeout=timeout or None, meanwhile=meanwhile,
                                               first=write))


def _mapped(job: VerifyJob, run: Callable[[], list[ProviderResult]]) -> list[ProviderResult]:
    """``run()``'s results; the child's crash or timeout as a :class:`VerifyError`."""
    try:
        return run()
    except ChildTimeout as e:
        doing = e.where[1] if e.where else "starting"
        provider = next((p for p in job.providers if doing.endswith(f" on {p}")), ",".join(job.providers))
        model = job.reference if isinstance(job.reference, (str, os.PathLike)) else "the model"
        raise VerifyError(f"{model}: verification on {provider} took longer than {e.seconds:g} s "
                          f"(--verify-timeout), stopped while {doing}; give it more time (--verify-timeout "
                          "SECONDS, 0: no limit) or skip it (--no-verify)") from None
    except ChildFailed as e:
        raise VerifyError(f"{e}: it cannot verify this model on this provider (--no-verify skips verification)") \
            from None


def _something_compared(result: VerifyResult, feeds: dict[str, np.ndarray]) -> None:
    """Nothing compared is no proof: raise when every output of a provider is empty, or when no output
    or fold tensor had a finite element on both sides (NaN or Inf inputs); a fold tensor that is empty
    on these inputs is left to the graph outputs (``result.unchecked``)."""
    for r in result.results:
        shapes = ", ".join(f"{k} {list(np.shape(v))}" for k, v in feeds.items())
        if sum(o.elements for o in (*r.outputs, *r.folds)) == 0:
            raise VerifyError(f"nothing to compare on {r.provider}: every output has 0 elements on these inputs "
                              f"({shapes}), so nothing is proven; give inputs with elements (--input-shape, "
                              "--inputs) or skip verification (--no-verify)")
        if r.passed and sum(o.compared for o in (*r.outputs, *r.folds)) == 0:
            raise VerifyError(f"nothing to compare on {r.provider}: no finite element in any output on these "
                              f"inputs ({shapes}; {_nonfinite(feeds)}), so nothing is proven; give finite "
                              "inputs (--inputs) or skip verification (--no-verify)")
        for f in r.folds:
            if f.elements == 0 and f.name not in result.unchecked:
                result.unchecked[f.name] = "its tensor is empty on these inputs: covered by the graph outputs alone"
            elif f.compared == 0 and f.name not in result.unchecked:
                result.unchecked[f.name] = ("its tensor has no finite element on these inputs: covered by the graph "
                                            "outputs alone")


def _nonfinite(feeds: dict[str, np.ndarray]) -> str:
    """How many input elements are NaN or Inf."""
    bad = total = 0
    for v in feeds.values():
        v = np.asarray(v)
        total += v.size
        if v.dtype.kind in "fc" or v.dtype.name == "bfloat16":
            bad += int(np.count_nonzero(~np.isfinite(v.astype(np.float64))))
    return f"{bad} of {total} input elements NaN or Inf"
