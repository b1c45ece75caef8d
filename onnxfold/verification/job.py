"""One verification as a typed job, and its run in the child process: both models on each provider,
each graph output and each planned fold tensor compared; only the comparisons go back to the parent."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx

from ..errors import ExposureRefused
from .results import OutputComparison, ProviderResult
from .sessions import run_pair
from .tolerances import TOLERANCES, compare, floor, scale_of


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
    nodes: tuple[bytes, bytes] = (b"", b"")  # appended to each model's graph: If branches forced (planning)

    def as_bytes(self) -> VerifyJob:
        """The job with its ModelProto models serialized (a worker process receives them as bytes)."""
        def serialized(model: Any) -> Any:
            return model.SerializeToString() if isinstance(model, onnx.ModelProto) else model

        return replace(self, reference=serialized(self.reference), candidate=serialized(self.candidate))


def run_job(job: VerifyJob, send) -> list[ProviderResult]:
    """The child's side (an :mod:`onnxfold.isolation` target): every provider in turn."""
    results = []
    for provider in job.providers:
        def stage(text: str, provider: str = provider) -> None:
            send(("stage", "onnxruntime", f"{text} on {provider}"))

        results.append(compare_provider(job, provider, stage))
    return results


def compare_provider(job: VerifyJob, provider: str, stage) -> ProviderResult:
    """Run and compare on one provider (in the child): only the comparisons go back."""
    expose, fold_tensors, all_checked = job.expose, job.fold_tensors, job.all_checked
    timings: dict[str, float] = {}
    try:
        ref_out, cand_out, engine, note = run_pair(job.reference, job.candidate, job.feeds, provider,
                                                   expose, stage, job.nodes, timings)
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
        f_atol, f_rtol = tolerances.get(name, (None, None))
        axis = job.axes.get(name)
        folds.append(compare(name, ref_out[name], cand_out[name], f_atol, f_rtol, per_channel=axis is not None,
                             axis=1 if axis is None else axis))
    # The floor of an output's atol: the fold tensors feeding it, when every fold was checked and passed.
    floors: dict[str, float] = {}
    if all_checked and folds and all(f.passed for f in folds):
        fold_floor = {f.name: floor(f.dtype) * scale_of(ref_out[f.name]) for f in folds if f.dtype in TOLERANCES}
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

