"""Consumers: nodes that compute a per-channel affine ``y = x * scale + shift`` of one input.

Each gives its (scale, shift) in float64 over the channels of its data input, or NotFoldable with the
reason. The channels are axis ``axis`` of the data input, of rank ``rank``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import onnx

from ..affine import DEFAULT_EPSILON, bn_affine
from ..errors import NotFoldable
from .base import GraphQuery, attr, check_float

# BatchNormalization's epsilon attribute is a float32: its default is float32(1e-5), as a written 1e-5 reads back


class Consumer(ABC):
    name = ""
    op_types: tuple[str, ...] = ()
    description = ""

    report_left = False  # list this consumer in the report when it has nothing to fold into
    fixed_axis: int | None = None  # the one axis this op works along (BatchNormalization: 1), if any
    becomes_add = False  # a shift a producer cannot take stays behind as an Add in this node's place

    def data_inputs(self, node: onnx.NodeProto) -> tuple[int, ...]:
        """Indices of the inputs that may carry the producer's output."""
        return (0,)

    def is_candidate(self, g: GraphQuery, node: onnx.NodeProto, data_index: int) -> bool:
        """Whether this input is worth matching at all (not a reason to decline)."""
        return True

    def shift_only(self, node: onnx.NodeProto, data_index: int) -> bool:
        """Whether the affine is a pure shift whatever its constant (x + c, x - c)."""
        return False

    @abstractmethod
    def affine(self, g: GraphQuery, node: onnx.NodeProto, data_index: int, channels: int,
               rank: int, axis: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(scale, shift), float64 of length ``channels``."""


class BatchNormConsumer(Consumer):
    """BatchNormalization (opsets 6, 7, 9, 14, 15) in inference mode, channel axis 1.

    scale = gamma / sqrt(var + eps), shift = beta - mean * scale. epsilon defaults to 1e-5.
    Declines training mode (``training_mode=1``, ``is_test=0`` before opset 7, or more than one
    output) and ``spatial=0`` before opset 9 (per-activation statistics).
    """

    name = "bn"
    op_types = ("BatchNormalization",)
    description = "BatchNormalization in inference mode"
    report_left = True
    fixed_axis = 1
    becomes_add = True

    def affine(self, g, node, data_index, channels, rank, axis=1):
        _check_inference(node, g.since_version(node.op_type))
        stats = []
        for name, tensor in zip(("scale", "B", "mean", "var"), node.input[1:5]):
            value = g.const(tensor, f"BatchNormalization {name}")
            check_float(value, f"BatchNormalization {name}")
            if value.shape != (channels,):
                raise NotFoldable(
                    f"BatchNormalization {name} has shape {list(value.shape)}, the producer makes {channels} channels"
                )
            stats.append(value)
        gamma, beta, mean, var = stats
        return bn_affine(gamma, beta, mean, var, float(attr(node, "epsilon", DEFAULT_EPSILON)))


def _check_inference(node: onnx.NodeProto, since: int) -> None:
    """A BatchNormalization in inference mode with its five inputs, or NotFoldable."""
    outputs = [o for o in node.output if o]
    if len(outputs) > 1:
        raise NotFoldable(f"BatchNormalization has {len(outputs)} outputs (training mode)")
    if int(attr(node, "training_mode", 0)) != 0:
        raise NotFoldable("BatchNormalization is in training mode (training_mode=1)")
    if since < 7 and int(attr(node, "is_test", 0)) == 0:
        raise NotFoldable(f"BatchNormalization-{since} has is_test=0 (training mode)")
    if since < 9 and int(attr(node, "spatial", 1)) == 0:
        raise NotFoldable("BatchNormalization has spatial=0 (per-activation statistics cannot go into weights)")
    if len(node.input) < 5 or not all(node.input[1:5]):
        raise NotFoldable("BatchNormalization does not have its five inputs")


_ARITHMETIC = {
    "Mul": "Mul by a per-channel constant (either side)",
    "Add": "Add of a per-channel constant (either side)",
    "Sub": "Sub of a per-channel constant (x - c, or c - x with the sign folded)",
    "Div": "Div by a per-channel constant (x / c only)",
}


class ArithmeticConsumer(Consumer):
    """Mul, Add, Sub or Div of the producer's output by a constant that broadcasts per channel.

    The constant is a scalar, or right-aligned against the producer's output rank r it has shape
    [.., C or 1, 1, ..., 1] with C on axis 1 ([C, 1, 1] or [1, C, 1, 1] for a 4-D Conv; [C] or [1, C]
    for Gemm's 2-D output). A length-C vector against a rank-3+ output broadcasts over the LAST axis,
    not the channels: declined. x*c: scale c. x+c: shift c. x-c: shift -c. c-x: scale -1, shift c.
    x/c: scale 1/c (c != 0). c/x is not affine: never folded.
    """

    def __init__(self, op_type: str):
        self.op_types = (op_type,)
        self.name = op_type.lower()
        self.description = _ARITHMETIC[op_type]

    def data_inputs(self, node):
        return (0,) if node.op_type == "Div" else (0, 1)

    def is_candidate(self, g, node, data_index):
        # Only an operand that is a constant makes this an affine of the other side: a residual Add
        # of two Convs is no candidate, not a decline.
        # "Constant" by structure: one whose value onnxfold cannot evaluate is declined with the reason.
        return len(node.input) == 2 and g.constant_like(node.input[1 - data_index])

    def shift_only(self, node, data_index):
        return node.op_type == "Add" or (node.op_type == "Sub" and data_index == 0)

    def affine(self, g, node, data_index, channels, rank, axis=1):
        if len(node.input) != 2:
            raise NotFoldable(f"{node.op_type} does not have two inputs")
        since = g.since_version(node.op_type)
        if since < 7:
            raise NotFoldable(f"{node.op_type}-{since} broadcasts by its broadcast/axis attributes, not like numpy")
        const = g.const(node.input[1 - data_index], f"{node.op_type} operand")
        check_float(const, f"{node.op_type} operand")
        c = per_channel(const, rank, channels, axis)
        op = node.op_type
        ones, zeros = np.ones(channels), np.zeros(channels)
        if op == "Mul":
            return c, zeros
        if op == "Add":
            return ones, c
        if op == "Sub":
            return (ones, -c) if data_index == 0 else (-ones, c)
        if np.any(c == 0):
            raise NotFoldable("Div by a constant that has zeros")
        return 1.0 / c, zeros


def per_channel(const: np.ndarray, rank: int, channels: int, axis: int = 1) -> np.ndarray:
    """A constant's per-channel values (float64, length C), if it broadcasts only along ``axis``."""
    shape = tuple(const.shape)
    if len(shape) > rank:
        raise NotFoldable(f"constant of shape {list(shape)} has more dimensions than the output (rank {rank})")
    padded = (1,) * (rank - len(shape)) + shape
    others = [d for k, d in enumerate(padded) if k != axis]
    if any(d != 1 for d in others) or padded[axis] not in (1, channels):
        hint = (" (a length-C vector broadcasts over the last axis, not the channels)"
                if len(shape) == 1 and axis != rank - 1 else "")
        raise NotFoldable(f"constant of shape {list(shape)} does not broadcast per channel against rank {rank}{hint}")
    return np.broadcast_to(np.asarray(const, np.float64).reshape(-1), (channels,)).copy()


CONSUMERS: tuple[Consumer, ...] = (BatchNormConsumer(), *(ArithmeticConsumer(op) for op in _ARITHMETIC))
