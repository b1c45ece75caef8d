"""Constant resolution: the value of a tensor that does not depend on the graph's inputs.

A value is constant when it is, in this graph or an enclosing one:

- an initializer, unless it is also a graph input in IR >= 4 (then it can be fed at run time);
- made by a Constant node, or by ConstantOfShape of a constant shape;
- made by an op of :data:`CONSTANT_EXPRESSION_OPS` from constants, evaluated exactly as the ONNX
  specification says at the model's opset (:mod:`onnxfold.const_eval`; what it cannot evaluate exactly
  is declined with the reason). Exporters compute biases and transposed weights this way: torch's
  dynamo exporter makes a bias-free Conv's zero bias with Shape -> Expand -> CastLike;
- Shape or Size of a run-time tensor whose every dimension is known before run time, and Gather of
  such a Shape where the dimensions it picks are known (the others may be dynamic);
- a tensor an earlier fold of this run wrote, wherever it was written (the output's data file
  included: :func:`onnxfold.tensors.read_tensor` asks the sink).

It asks the graph through :class:`Scope`, a narrow protocol that :class:`onnxfold.graph.GraphView`
implements; this module does not import the graph view.

Small values (statistics, shapes) are kept once read; weights are read when asked and not held.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol

import numpy as np
import onnx
from onnx import helper

from . import const_eval
from .errors import NotFoldable
from .protobuf import is_default
from .report import a
from .tensors import DataSink, read_tensor

CONSTANT_EXPRESSION_OPS = frozenset(
    "Identity Cast CastLike Shape Size Slice Expand Concat Reshape Unsqueeze Squeeze Flatten Transpose "
    "Gather Tile Range Add Sub Mul Div Neg Sqrt Reciprocal Ceil Floor".split()
)
CONSTANT_MAKERS = CONSTANT_EXPRESSION_OPS | {"Constant", "ConstantOfShape"}
CACHE_BYTES = 1 << 16


class ModelScope(Protocol):
    """What constant resolution asks of the model (:class:`onnxfold.graph.ModelView` answers)."""

    @property
    def base_dir(self) -> object: ...  # where external data files are
    @property
    def sink(self) -> DataSink | None: ...
    @property
    def ir_version(self) -> int: ...
    @property
    def bound_at_call(self) -> Collection[str]: ...  # a function body's inputs, constants when matching
    @property
    def edits(self) -> int: ...  # how many edits were applied: the structure changes with each

    def since_version(self, op_type: str) -> int: ...

    def evaluate(self, node: onnx.NodeProto, values: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class Scope(Protocol):
    """What constant resolution asks of one graph (:class:`onnxfold.graph.GraphView` answers)."""

    @property
    def model(self) -> ModelScope: ...
    @property
    def parent(self) -> Scope | None: ...  # the enclosing graph
    @property
    def constants(self) -> Constants: ...  # the enclosing graph's own cache
    @property
    def graph(self) -> onnx.GraphProto: ...
    @property
    def init(self) -> dict[str, int]: ...  # initializer positions by name
    @property
    def producer(self) -> dict[str, int]: ...  # node positions by the values they make
    @property
    def inputs(self) -> Collection[str]: ...

    def elem_type(self, name: str) -> int: ...

    def shape(self, name: str) -> tuple[int | None, ...] | None: ...


class Constants:
    """The constants visible in one graph (and, through its parent, in the graphs around it)."""

    def __init__(self, view: Scope):
        self.view = view
        self._cache: dict[str, np.ndarray] = {}
        # what constant_like decided, by ``shapes``, for the structure after ``_edits`` edits
        self._like: dict[bool, dict[str, bool]] = {False: {}, True: {}}
        self._edits = -1

    def overridable(self, name: str) -> bool:
        """An initializer that is also a graph input can be fed at run time (IR >= 4)."""
        return name in self.view.inputs and self.view.model.ir_version >= 4

    def value(self, name: str, what: str) -> np.ndarray:
        """The value of a constant tensor, or NotFoldable saying why it is not one (``what`` names it)."""
        view: Scope | None = self.view
        while view is not None:
            here = view.constants
            if name in here._cache:
                return here._cache[name]
            if name in view.init:
                if here.overridable(name):
                    raise NotFoldable(
                        f"{what} '{name}' is an initializer that is also a graph input (IR version "
                        f"{view.model.ir_version}), so it can be fed at run time"
                    )
                value = read_tensor(view.graph.initializer[view.init[name]], view.model.base_dir, view.model.sink)
            elif name in view.producer:
                value = here._made_by(view.graph.node[view.producer[name]], name, what)
            elif name in view.inputs:
                raise NotFoldable(f"{what} '{name}' is a graph input, not a constant")
            else:
                view = view.parent
                continue
            if value.nbytes <= CACHE_BYTES:  # statistics, shapes; weights are read once, not held
                here._cache[name] = value
            return value
        raise NotFoldable(f"{what} '{name}' is not defined in this graph or an enclosing one")

    def _made_by(self, node: onnx.NodeProto, name: str, what: str) -> np.ndarray:
        op = node.op_type if is_default(node) else ""
        model = self.view.model
        since = model.since_version(node.op_type)
        if op == "Constant":
            try:
                return const_eval.constant_value(node, since, lambda t: read_tensor(t, model.base_dir))
            except NotFoldable as e:
                raise NotFoldable(f"{what} '{name}' is a Constant node that is not folded: {e}") from None
        if op == "ConstantOfShape":
            if not node.input or not node.input[0]:
                raise NotFoldable(f"{what} '{name}' is made by a ConstantOfShape node without a shape")
            shape = self.value(node.input[0], f"shape of {what}")
            try:
                return const_eval.constant_of_shape(node, shape, since)
            except NotFoldable as e:
                raise NotFoldable(f"{what} '{name}' is made by a ConstantOfShape node that is not folded: "
                                  f"{e}") from None
        if op == "Gather" and len(node.input) == 2 and node.input[1]:
            dims = self._gather_of_shape(node, what)
            if dims is not None:
                return dims
        if op in ("Shape", "Size") and node.input and node.input[0]:
            static = self._initializer_dims(node.input[0])
            if static is None:
                static = self._static_shape(node.input[0])
            if static is not None:  # only the shape is read: no value needed, none made
                return model.evaluate(node, {node.input[0]: np.broadcast_to(np.zeros((), np.uint8), static)})[0]
        if op == "CastLike" and len(node.input) == 2 and self.view.elem_type(node.input[1]):
            return self._cast_like(node, name, what)
        if op in CONSTANT_EXPRESSION_OPS and node.input and all(
                self._made_of_constants(i, shapes=True) for i in node.input if i):  # else no walk down it
            values = {}
            for inp in node.input:
                if inp:
                    try:
                        values[inp] = self.value(inp, f"input of the {op} making {what}")
                    except NotFoldable:
                        break
            else:
                return model.evaluate(node, values)[list(node.output).index(name)]
        raise NotFoldable(f"{what} '{name}' is computed by {a(node.op_type)} node, not a constant")

    def _initializer_dims(self, name: str) -> tuple[int, ...] | None:
        """The dims of ``name`` where it is an initializer that cannot be fed at run time: Shape and Size
        of a weight read none of its bytes (the dynamo exporter sizes each Conv's Expand bias from Shape
        of its weight). None otherwise."""
        view: Scope | None = self.view
        while view is not None:
            if name in view.producer:
                return None
            if name in view.init:
                if view.constants.overridable(name):
                    return None
                return tuple(view.graph.initializer[view.init[name]].dims)
            if name in view.inputs:
                return None
            view = view.parent
        return None

    def _static_shape(self, name: str) -> tuple[int, ...] | None:
        """A run-time tensor's shape when every dimension is known before run time (declared or inferred):
        Shape and Size of it are constants (the legacy exporter computes torch.chunk's Slice ends from
        Shape of the tensor it cuts). None for a constant (it is evaluated) or a dimension not known."""
        if self.constant_like(name):
            return None
        shape = self.view.shape(name)
        dims = [d for d in shape or () if isinstance(d, int) and d >= 0]
        return None if shape is None or len(dims) != len(shape) else tuple(dims)

    def _gather_of_shape(self, node: onnx.NodeProto, what: str) -> np.ndarray | None:
        """Gather(Shape(x), indices) where the dimensions it picks are known before run time, others
        maybe not (the legacy exporter's torch.chunk of a tensor with a dynamic batch reads its channel
        count this way); None when that is not what the node is."""
        at = self.view.producer.get(node.input[0])
        shape_node = self.view.graph.node[at] if at is not None else None
        if (shape_node is None or shape_node.op_type != "Shape" or not is_default(shape_node)
                or not shape_node.input or any(a.name == "axis" and a.i != 0 for a in node.attribute)
                or self.constant_like(shape_node.input[0])):
            return None
        shape = self.view.shape(shape_node.input[0])
        if shape is None:
            return None
        # which dimensions Shape returns (its start and end, Shape-15), evaluated as the spec says on a
        # probe whose dimension k has size k + 1: entry j of the result is position (value - 1)
        probe = np.broadcast_to(np.zeros((), np.uint8), [k + 1 for k in range(len(shape))])
        positions = [int(v) - 1 for v in self.view.model.evaluate(shape_node, {shape_node.input[0]: probe})[0]]
        try:
            indices = self.value(node.input[1], f"indices of the Gather making {what}")
        except NotFoldable:
            return None
        flat = [int(v) for v in np.asarray(indices).reshape(-1)]
        if any(not -len(positions) <= v < len(positions) for v in flat):
            return None
        picked = [shape[positions[v]] for v in flat]
        if any(not isinstance(d, int) or d < 0 for d in picked):
            return None
        return np.asarray(picked, np.int64).reshape(np.shape(indices))

    def _cast_like(self, node: onnx.NodeProto, name: str, what: str) -> np.ndarray:
        # Only the dtype of the second input matters: it need not be a constant.
        value = self.value(node.input[0], f"input of the CastLike making {what}")
        target = self.view.elem_type(node.input[1])
        try:
            like = np.empty(0, helper.tensor_dtype_to_np_dtype(target))
        except Exception:
            raise NotFoldable(f"{what} '{name}' is cast to data type {target}, which is not evaluated") from None
        return self.view.model.evaluate(node, {node.input[0]: value, node.input[1]: like})[0]

    def constant_like(self, name: str) -> bool:
        """Whether ``name`` is made from constants alone (an initializer, a Constant node, or an
        expression over them), whether or not onnxfold can evaluate it: the graph's structure only.
        A candidate whose constant cannot be evaluated is then declined with the reason, not skipped."""
        return self._made_of_constants(name, shapes=False)

    def _made_of_constants(self, name: str, *, shapes: bool) -> bool:
        """:meth:`constant_like`; with ``shapes``, Shape and Size of anything count as constants too (what
        :meth:`value` may still evaluate, when the shape is known). A walk with its own stack, each name
        once: a residual chain hundreds of Adds deep is no recursion. What a walk decides is kept until
        the next edit (the matchers ask about the same values again and again: PaddleOCR's recognizer,
        8348 walks a fold)."""
        if self._edits != self.view.model.edits:
            self._like, self._edits = {False: {}, True: {}}, self.view.model.edits
        known = self._like[shapes]
        if name in known:
            return known[name]
        waiting: dict[str, list[str]] = {}  # a name whose inputs are being decided -> those inputs
        stack: list[tuple[str, bool]] = [(name, False)]
        while stack:
            current, inputs_decided = stack.pop()
            if inputs_decided:
                known[current] = all(known.get(i, False) for i in waiting.pop(current))
                continue
            if current in known:
                continue
            if current in waiting:  # met again on its own path: a cycle (an invalid graph)
                known[current] = False
                continue
            verdict, inputs = self._leaf(current, shapes)
            if verdict is not None:
                known[current] = verdict
                continue
            waiting[current] = inputs
            stack.append((current, True))
            stack.extend((i, False) for i in inputs if i not in known)
        return known[name]

    def _leaf(self, name: str, shapes: bool) -> tuple[bool | None, list[str]]:
        """(True or False when ``name`` is decided by itself, else None; the inputs it depends on)."""
        if name in self.view.model.bound_at_call:
            return True, []
        view: Scope | None = self.view
        while view is not None:
            if name in view.init:
                return not view.constants.overridable(name), []
            if name in view.producer:
                node = view.graph.node[view.producer[name]]
                if not is_default(node) or node.op_type not in CONSTANT_MAKERS:
                    return False, []
                if shapes and node.op_type in ("Shape", "Size"):
                    return True, []
                # CastLike: only the dtype of its second input matters
                inputs = node.input[:1] if node.op_type == "CastLike" else node.input
                names = [i for i in inputs if i]
                return (True, []) if not names else (None, names)
            if name in view.inputs:
                return False, []
            view = view.parent
        return False, []
