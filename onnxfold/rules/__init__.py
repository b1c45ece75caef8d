"""The rules, and the registry the driver reads.

A rule (:class:`~onnxfold.rules.base.Rule`) is anchored at an op type; ``match`` finds a candidate from
the graph's structure, ``fold`` computes the new values or declines with a sentence. Most rules are a
producer that owns per-output-channel weights (:mod:`~onnxfold.rules.producers`) followed by a consumer
that is a per-channel affine (:mod:`~onnxfold.rules.consumers`), joined by
:class:`~onnxfold.rules.pair.PairRule`; :mod:`~onnxfold.rules.input_side` folds an affine into the
producer after it. A new rule is one class and one entry in :data:`RULES`.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..edit import Edit, NewValue, Update
from .base import Match, Rule
from .bias import BiasAddRule
from .branches import BranchSumRule, ConcatBranchRule
from .concat import ConcatRule
from .consumers import CONSUMERS, Consumer
from .input_side import TARGETS, InputAffineRule, PadInputRule
from .pair import PairRule
from .producers import PRODUCERS, Producer
from .split import SplitRule

# The driver offers a node to the rules anchored at its op type in this order; the first whose match
# finds a candidate takes it. bias_add takes only producers with a run-time weight, and a Concat rule
# only a Concat, so they go before the producer rules that would decline those.
RULES: tuple[Rule, ...] = (
    BiasAddRule(),
    *(ConcatRule(c) for c in CONSUMERS),
    *(PairRule(p, c) for p in PRODUCERS for c in CONSUMERS),
    SplitRule(),
    *(InputAffineRule(c, t) for c in CONSUMERS for t in TARGETS),
    *(PadInputRule(c) for c in CONSUMERS),
    BranchSumRule(),
    ConcatBranchRule(),  # anchored at the Concat itself; concat_<consumer> at the affine after one
)

# Reasons every rule shares; checked once, in the driver.
SHARED_DECLINES = (
    "the producer's output has another consumer, or is a graph output",
    "a weight, bias or statistic is not a constant (a graph input, an initializer that is also a "
    "graph input in IR >= 4, or computed at run time)",
    "a folded value is not finite in the model's dtype (float16 overflow past 65504)",
    "shapes or dtypes that do not match",
)

__all__ = ["RULES", "RuleSet", "Rule", "Match", "Edit", "Update", "NewValue", "Producer", "Consumer",
           "PRODUCERS", "CONSUMERS", "SHARED_DECLINES", "rule_names", "select_rules",
           "describe_rules", "off_by_default"]


def rule_names() -> list[str]:
    return [r.name for r in RULES]


def off_by_default() -> list[str]:
    """The rules that fold only when named (``--enable NAME``, ``enable=``)."""
    return [r.name for r in RULES if not r.default_on]


def _names(names: str | Iterable[str]) -> set[str]:
    named = {names} if isinstance(names, str) else set(names)  # a string is one rule's name, not letters
    unknown = named - set(rule_names())
    if unknown:
        raise ValueError(f"unknown rule {sorted(unknown)[0]!r}; known rules: {', '.join(rule_names())}")
    return named


class RuleSet:
    """The rules by the op type they are anchored at, and which of them are switched off: those named
    in ``disable``, and those off by default (``Rule.default_on``) that ``enable`` does not name
    (``disable`` wins over ``enable``)."""

    def __init__(self, disable: str | Iterable[str] = (), enable: str | Iterable[str] = ()):
        disabled, enabled = _names(disable), _names(enable)
        self.disabled = disabled | {r.name for r in RULES if not r.default_on and r.name not in enabled}
        self._anchored: dict[str, list[Rule]] = {}
        for rule in RULES:
            for op in rule.anchors:
                self._anchored.setdefault(op, []).append(rule)

    def anchored(self, op_type: str) -> list[Rule]:
        """Every rule anchored at ``op_type``, disabled ones included (a match there is reported)."""
        return self._anchored.get(op_type, [])

    def enabled(self, rule: Rule) -> bool:
        return rule.name not in self.disabled


def select_rules(disable: str | Iterable[str] = (), enable: str | Iterable[str] = ()) -> RuleSet:
    return RuleSet(disable, enable)


def _doc(obj) -> list[str]:
    return ["    " + line.strip() for line in (type(obj).__doc__ or "").strip().splitlines() if line.strip()]


def describe_rules() -> str:
    """What --list-rules prints: every rule by name, then what each producer and consumer does and declines."""
    lines = ["rules (--disable NAME switches one off; --enable NAME switches on one marked off by default):"]
    lines += [f"  {r.name:<20} {r.description}" for r in RULES]
    lines.append("")
    lines.append("producers (own per-output-channel weights):")
    for p in PRODUCERS:
        lines.append(f"  {p.name}: {p.description}")
        lines += _doc(p)
    lines.append("consumers (a per-channel affine y = x * scale + shift):")
    for i, c in enumerate(CONSUMERS):
        lines.append(f"  {c.name}: {c.description}")
        if i + 1 == len(CONSUMERS) or _doc(CONSUMERS[i + 1]) != _doc(c):  # Mul/Add/Sub/Div share one: say it once
            lines += _doc(c)
    families: dict[type, list[str]] = {}
    for r in RULES:
        families.setdefault(type(r), []).append("<producer>_<consumer>" if isinstance(r, PairRule) else r.name)
    for family, names in families.items():
        lines.append(f"{', '.join(dict.fromkeys(names))}:")
        lines += ["    " + line.strip() for line in (family.__doc__ or "").strip().splitlines() if line.strip()]
    lines.append("every rule declines when:")
    lines.extend(f"    - {reason}" for reason in SHARED_DECLINES)
    return "\n".join(lines)
