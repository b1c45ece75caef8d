"""Verification's results: one comparison per tensor, per provider, and the whole (truthy when it
passed; ``str`` is what the command line prints, :meth:`VerifyResult.to_dict` the report's field)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# How a fold tensor's note begins when it passed where its inputs are the original's (verification.local)
ON_ITS_OWN_INPUTS = "compared where its inputs are the original's"
# What a fold tensor's note says when a channel of it is one value on the inputs and it could not be
# compared on random values either (verification.job._on_random): that fold is not exercised there
UNEXERCISED = "not exercised by them, and not compared on random values"


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
    finite: int | None = None  # elements compared with a finite value on both sides (None: every element)

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

    @property
    def compared(self) -> int:
        """Elements that prove something: finite on both sides (every element of an integer tensor)."""
        return self.elements if self.finite is None else self.finite


@dataclass
class ProviderResult:
    provider: str
    engine: str  # "onnxruntime <provider list>" or "onnx.reference"
    outputs: list[OutputComparison]
    note: str = ""
    folds: list[OutputComparison] = field(default_factory=list)  # fold tensors, per channel
    # seconds spent in the child, by part (import_s, session_original_s, run_folded_s, compare_s ...)
    timings: dict[str, float] = field(default_factory=dict)

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
    # seconds by part: the parent's (reference_s, plan_s, inputs_s, child_s) and the child's, summed over
    # providers (:attr:`ProviderResult.timings`); not part of :meth:`to_dict`
    timings: dict[str, float] = field(default_factory=dict)

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
                local = sum(1 for f in r.folds if f.passed and f.note.startswith(ON_ITS_OWN_INPUTS))
                if local:
                    lines.append(f"  note: {local} of them compared where their inputs are the original's: the "
                                 "error of the folds before them, larger than their tolerance, is not their own (-v)")
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
    ``passed``, and ``note`` saying how where it was not plain (compared where its inputs are the
    original's: verification.local); or ``note`` saying why it was not compared at its own tensor."""
    for f in folded:
        name = getattr(f, "output", "")
        checks = [c for r in result.results for c in r.folds if c.name == name]
        if checks and name not in result.unchecked:
            worst = max(checks, key=lambda o: o.needed_atol / o.atol if o.atol else math.inf)
            f.max_abs = max(c.max_abs for c in checks)
            f.max_rel = max(c.max_rel for c in checks)
            f.atol = worst.atol
            f.passed = all(c.passed for c in checks)
            f.note = "; ".join(dict.fromkeys(c.note for c in checks if c.note))
        else:
            f.note = result.unchecked.get(name, "not compared at its own tensor")

