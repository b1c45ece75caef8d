"""What a fold did: each fold, each declined candidate with its reason, and what was left alone."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

MAX_LISTED = 10


def process_age() -> float | None:
    """Seconds since this process started (Linux: /proc, to about 0.01 s); None where it is unknown."""
    try:
        with open("/proc/self/stat", "rb") as fh:
            stat = fh.read()
        with open("/proc/uptime", "rb") as fh:
            uptime = float(fh.read().split()[0])
        started = int(stat[stat.rindex(b")") + 2:].split()[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime - started)


def a(word: str) -> str:
    """'a Mul', 'an Add', 'an Identity': the article by the op's first letter (close enough for op names)."""
    return ("an " if word[:1] in "AEIOU" else "a ") + word


@dataclass
class Folded:
    rule: str
    producer: str  # node name (or "<op_type>#<index>" when the node has none)
    consumer: str
    graph: str  # "main", or the path of a subgraph: "main/<node>.<attribute>"
    dtype: str
    weight: str  # the new weight tensor's name (the new bias's where the weight stays: an Add's fold)
    max_abs_weight: float
    output: str = ""  # the tensor the fold rewrote: the consumer's output (a Conv's for bn_conv), name kept
    # Verification of this fold at ``output`` (per channel; see verify.py), None when not compared there:
    max_abs: float | None = None
    max_rel: float | None = None
    atol: float | None = None  # the tolerance of the channel nearest to (or past) it
    passed: bool | None = None
    note: str = ""  # why it was not compared at its own tensor; or how it was (verification.local)
    # the op type of the affine node the fold removed (BatchNormalization, Mul ...); for the summary,
    # not part of the JSON report (its schema is the command line's contract)
    removed: str = field(default="", repr=False)
    # set when a later fold changed ``output`` again in place (the producer's output that layout ops, a
    # Split or a Concat keep): it no longer holds this fold's result alone. Not part of the JSON either.
    changed_later: str = field(default="", repr=False)
    # the channel axis in ``output`` (verification compares per channel along it; None: per tensor).
    # Not part of the JSON either.
    axis: int | None = field(default=None, repr=False)
    # whether ``output`` was the removed affine's output name, kept by the node that now writes it (not
    # part of the JSON either): a later sentence about that value says so
    kept_name: bool = field(default=False, repr=False)
    # |the constant term| the folded node adds (its bias), per channel of ``axis`` (one value: all channels
    # alike), or None: the scale verification's floor takes for a value that is small by cancellation
    # (driver.terms). Not part of the JSON either.
    terms: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        data = asdict(self)
        del data["removed"], data["changed_later"], data["axis"], data["kept_name"], data["terms"]
        return data

    def check_line(self) -> str:
        """One line for -v: this fold's own check."""
        head = f"  fold {self.rule} {self.producer} + {self.consumer} [{self.graph}] -> {self.output}"
        if self.passed is None:
            return f"{head}: {self.note or 'not verified'}"
        return (f"{head}: max abs {self.max_abs:.3g}, max rel {self.max_rel:.3g}, atol {self.atol:.3g} "
                f"{'ok' if self.passed else 'FAILED'}" + (f" ({self.note})" if self.note else ""))


@dataclass
class Declined:
    rule: str
    producer: str
    consumer: str
    graph: str
    reason: str


@dataclass
class Left:
    """A consumer (a BatchNormalization) with no producer to fold into."""

    consumer: str
    graph: str
    reason: str


@dataclass
class FoldReport:
    folded: list[Folded] = field(default_factory=list)
    declined: list[Declined] = field(default_factory=list)
    left: list[Left] = field(default_factory=list)
    inlined: list[str] = field(default_factory=list)  # local functions inlined to fold their calls
    bn_before: int = 0
    bn_after: int = 0
    rounds: int = 0
    seconds: float = 0.0

    @property
    def changed(self) -> bool:
        return bool(self.folded)

    def summary(self, verbose: bool = False, check: bool = False) -> str:
        """A few lines for a terminal: what was folded (``check``: what is foldable, nothing was
        changed), what was declined and why."""
        by_rule = Counter(f.rule for f in self.folded)
        rules = ", ".join(f"{k}: {v}" for k, v in sorted(by_rule.items()))
        folded_bn = self.bn_before - self.bn_after
        sums = sum(1 for f in self.folded if f.rule == "branch_sum")  # its node is an Add/Sum of branches
        concats = sum(1 for f in self.folded if f.rule == "concat_branch")  # its node is a Concat of branches
        others = sum(1 for f in self.folded if f.removed != "BatchNormalization") - sums - concats
        lines = [
            (("foldable (nothing changed, --check): " if self.folded else "nothing to fold (--check): ") if check
             else "folded ")
            + f"{folded_bn} of {self.bn_before} BatchNormalization"
            + (f" and {others} Mul/Add/Sub/Div" if others else "")
            + (f" and {sums} sum{'s' if sums > 1 else ''} of branches into one Conv" if sums else "")
            + (f" and {concats} Concat{'s' if concats > 1 else ''} of branches into one Conv" if concats else "")
            + (f" ({rules})" if rules else "")
            + f", declined {len(self.declined)}, left {len(self.left)} with no producer"
            + f" in {self.seconds:.2f}s"
        ]
        for d in self.declined[: None if verbose else MAX_LISTED]:
            lines.append(f"  declined {d.rule} {d.producer} -> {d.consumer} [{d.graph}]: {d.reason}")
        if not verbose and len(self.declined) > MAX_LISTED:
            lines.append(f"  ... and {len(self.declined) - MAX_LISTED} more declined (-v lists them all)")
        if self.inlined:
            lines.append(f"  inlined local functions to fold their calls: {', '.join(self.inlined)}")
        for reason, n in Counter(x.reason for x in self.left).most_common():
            lines.append(f"  left {n}: {reason}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "bn_before": self.bn_before,
            "bn_after": self.bn_after,
            "rounds": self.rounds,
            "seconds": self.seconds,
            "folded": [f.to_dict() for f in self.folded],
            "declined": [asdict(d) for d in self.declined],
            "left": [asdict(x) for x in self.left],
            "inlined_functions": list(self.inlined),
        }
