"""The one description of an edit, from a rule to the graph view.

A rule's ``fold`` returns an :class:`Edit`: by node position, an :class:`Update` (new input values,
attributes, maybe a new op type), the nodes that go, and the outputs and inputs that take new names.
The driver casts each :class:`NewValue` once to the edit's dtype and gives it its tensor
(``NewValue.tensor``); :meth:`onnxfold.graph.ModelView.apply` then applies the same object. A new kind
of edit (one that merges several producers into one) is a new field here and its few lines in
``apply``: nothing in between.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from .affine import RowScaled

Value = np.ndarray | RowScaled  # a folded value in float64, before the cast to the model's dtype


@dataclass
class NewValue:
    """A folded input of a node: its float64 value, what it is (for messages), a hint for its name;
    ``tensor`` is the value cast to the edit's dtype, made by the driver before the edit is applied."""

    value: Value
    what: str
    hint: str
    tensor: onnx.TensorProto | None = None


@dataclass
class Update:
    """What an edit changes in one node: new inputs by slot, attributes, maybe its op type."""

    inputs: dict[int, NewValue]
    attributes: dict[str, object] = field(default_factory=dict)
    op_type: str | None = None  # a producer may become another op (MatMul + bias -> Gemm)
    arity: int | None = None  # keep only this many inputs (and drop every old attribute)
    name: str | None = None  # a new node name (a node that becomes another op)


@dataclass
class Edit:
    """What a fold changes in one graph, by node position: an :class:`Update` per node (values cast to
    ``dtype``), the nodes that go, and the outputs and inputs that take new names: node ``n``'s output
    (input) slot ``k`` takes the name given."""

    dtype: np.dtype
    updates: dict[int, Update]
    remove: list[int] = field(default_factory=list)
    outputs: dict[tuple[int, int], str] = field(default_factory=dict)
    inputs: dict[tuple[int, int], str] = field(default_factory=dict)
    axis: int | None = None  # the channel axis in the tensor the fold rewrote (verification compares per it)

    def new_values(self) -> dict[tuple[int, int], NewValue]:
        """Every new input value, by (node, input slot)."""
        return {(n, slot): v for n, u in self.updates.items() for slot, v in u.inputs.items()}
