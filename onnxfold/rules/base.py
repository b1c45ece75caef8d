"""What a rule is, what it may ask of the graph, and what it gives back.

A rule is anchored at an op type. The driver (:mod:`onnxfold.driver`) offers it each node of that type;
``match`` looks at the graph's structure only and returns a :class:`Match` (which nodes fold, which
values the fold removes, how the graph is rewired) or a sentence saying why there is nothing to fold.
The driver then checks what every rule shares (the values the fold removes have no other reader and
are not graph outputs), calls ``fold`` for the edit (:class:`~onnxfold.edit.Edit`: new values in float64,
or :class:`~onnxfold.affine.RowScaled` made a block at a time), casts them once to the model's dtype and
applies the edit. ``fold`` raises
:class:`~onnxfold.affine.NotFoldable` with a sentence when the fold is not safe.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import onnx
from onnx import helper

from ..edit import Edit, Update
from ..errors import NotFoldable

FLOAT_TYPES = ("float16", "bfloat16", "float32", "float64")


class GraphQuery(Protocol):
    """What a rule may ask of the graph it works in (:class:`onnxfold.graph.GraphView` answers)."""

    def node(self, i: int) -> onnx.NodeProto: ...

    def upstream(self, name: str, through: Collection[str] = ("Identity",)) -> tuple[int | None, list[int]]:
        """The position of the node making ``name`` through nodes of the ``through`` op types, and the
        positions of those (nearest ``name`` first)."""
        ...

    def readers_of(self, name: str) -> list[int]:
        """The positions of the nodes of this graph that read ``name``."""
        ...

    def readers(self, name: str) -> int:
        """How many times ``name`` is read, in any graph of the model, or as a graph output."""
        ...

    def origin(self, name: str) -> str:
        """Why a value has no producer node in this graph: a sentence fragment for the report."""
        ...

    def const(self, name: str, what: str) -> np.ndarray:
        """A constant's value, or NotFoldable with a sentence naming it as ``what``."""
        ...

    def constant_like(self, name: str) -> bool:
        """Whether ``name`` is made from constants alone, evaluable or not (structure only)."""
        ...

    def rank(self, name: str) -> int | None: ...

    def shape(self, name: str) -> tuple[int | None, ...] | None:
        """A tensor's shape, None for each dimension not known before run time (None: rank unknown)."""
        ...

    def since_version(self, op_type: str) -> int:
        """The version of ``op_type`` at the model's opset."""
        ...


@dataclass
class Match:
    """A candidate fold, found from the graph's structure alone (node positions in one graph)."""

    upstream: int  # the first node of the pair (a producer; an affine before a producer)
    downstream: int  # the second (the consumer; the producer after an affine)
    affine: int  # the affine node the fold takes in (the consumer, or the node before the producer)
    between: list[str]  # values whose content the fold changes or removes: each must have one reader
    #                     (the next node of the match) and not be a graph output
    remove: list[int]  # nodes that go (the affine node, Identity nodes next to it)
    output: str  # the value the fold rewrites (compared at, when verified); its name is kept
    reads: set[str]  # the weights and statistics the fold reads (a function input here means inlining)
    outputs: dict[tuple[int, int], str] = field(default_factory=dict)  # (node, slot) writes this name
    inputs: dict[tuple[int, int], str] = field(default_factory=dict)  # (node, slot) reads this name
    data_index: int = 0  # which input of the consumer carries the producer's output
    path: list[int] = field(default_factory=list)  # layout nodes between the pair, nearest the consumer first
    upstreams: list[int] = field(default_factory=list)  # every producer, when several fold at once (Concat)
    kept: set[str] = field(default_factory=set)  # values of ``between`` that stay, with new content:
    #                                              Shape and Size nodes may read them as well
    # Values of ``between`` that the match lets several nodes read, each with every reader it covers by
    # position (an affine read by several producers, all rewritten; a producer output read by the Slice
    # nodes of a chunk): the driver checks that nothing else reads them. Every other value of ``between``
    # has exactly one reader, the next node of the match.
    readers: dict[str, list[int]] = field(default_factory=dict)
    branches: list[list[int]] = field(default_factory=list)  # a sum's branches: each one's nodes, from X on
    signs: list[int] = field(default_factory=list)  # each branch's sign in the sum (-1: subtracted)

    def edit(self, dtype: np.dtype, updates: dict[int, Update], axis: int | None = None) -> Edit:
        """The edit this match plans, with the rule's new values; ``axis``: the channel axis in
        ``output``, the tensor the fold rewrites."""
        return Edit(dtype, updates, list(self.remove), dict(self.outputs), dict(self.inputs), axis)


class Rule(ABC):
    """One fold. Subclasses set ``name``, ``description`` and ``anchors`` (the op types ``match`` takes)."""

    name: str = ""
    description: str = ""
    anchors: tuple[str, ...] = ()
    report_left: bool = False  # report an anchor no rule matched (a BatchNormalization that stays)
    default_on: bool = True  # False: switched on only by name (--enable NAME, enable=...)

    @abstractmethod
    def match(self, g: GraphQuery, i: int) -> Match | str:
        """The fold anchored at node ``i``, or why there is none ("" when there is nothing to say)."""

    @abstractmethod
    def fold(self, g: GraphQuery, m: Match) -> Edit:
        """The folded values; NotFoldable with a sentence when the fold is not safe."""


def attr(node: onnx.NodeProto, name: str, default=None):
    """A node's attribute, or ``default``; NotFoldable for one that refers to an attribute of the
    function the node is in (``ref_attr_name``): its value is known only at each call."""
    for at in node.attribute:
        if at.name == name:
            return attribute_value(node, at)
    return default


def attribute_value(node: onnx.NodeProto, at: onnx.AttributeProto):
    if at.ref_attr_name:
        raise NotFoldable(f"{node.op_type} attribute '{at.name}' refers to the function attribute "
                          f"'{at.ref_attr_name}', whose value is known only at each call")
    return helper.get_attribute_value(at)


def check_float(array: np.ndarray, what: str) -> None:
    if array.dtype.name not in FLOAT_TYPES:
        raise NotFoldable(f"{what} has dtype {array.dtype.name}, not a float type onnxfold folds")
