"""Producers: nodes that own per-output-channel weights, so a per-channel affine after them folds in.

Each states its algebra: output channel c is made by one slice of the weight (and one bias entry), so
``y[:, c] * scale[c] + shift[c]`` is the same node with that slice scaled by ``scale[c]`` and the bias
``b[c] * scale[c] + shift[c]``. The math is :mod:`onnxfold.affine`'s; here is only where each op keeps it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import onnx

from ..affine import RowScaled, fold_bias, scale_columns, scale_conv_transpose_weight, scale_conv_weight, unscaled
from ..edit import NewValue, Update
from ..errors import NotFoldable
from ..protobuf import is_default
from .base import GraphQuery, attr, check_float


@dataclass
class Weights:
    """What a producer owns: its constants and how many output channels it makes."""

    weight: np.ndarray
    bias: np.ndarray | None
    channels: int
    rank: int  # rank of the producer's output
    axis: int = 1  # the producer's channel axis in its output
    takes_shift: bool = True  # whether the producer has (or can get) a bias for a shift

    @property
    def dtype(self) -> np.dtype:
        return self.weight.dtype


@dataclass
class GroupedWeights(Weights):
    group: int = 1


@dataclass
class GemmWeights(Weights):
    trans_b: bool = False
    beta: float = 1.0
    c_shape: tuple[int, ...] | None = None


W = TypeVar("W", bound=Weights)


class Producer(ABC, Generic[W]):
    name = ""
    op_types: tuple[str, ...] = ()
    description = ""

    @abstractmethod
    def weights(self, g: GraphQuery, node: onnx.NodeProto, shift_only: bool = False) -> W:
        """The producer's constants, or NotFoldable with the reason they are not foldable.
        ``shift_only``: the affine is a pure shift (an Add), so a producer without a bias declines early."""

    @abstractmethod
    def update(self, node: onnx.NodeProto, w: W, scale: np.ndarray, shift: np.ndarray) -> Update:
        """The node's new inputs for ``y * scale + shift`` on its output channels."""

    def is_producer(self, g: GraphQuery, node: onnx.NodeProto) -> bool:
        """Whether ``node`` is one of this producer (by structure only)."""
        return node.op_type in self.op_types

    def inner(self, g: GraphQuery, node: onnx.NodeProto) -> list[str]:
        """For a producer of several nodes: the values inside it whose content the fold changes (each
        must have one reader); :meth:`inner_updates` changes those nodes."""
        return []

    def inner_updates(self, w: W, scale: np.ndarray) -> dict[int, Update]:
        """Updates of the other nodes of a producer of several nodes, by position."""
        return {}

    def absorb(self, at: int, node: onnx.NodeProto, w: W, scale: np.ndarray, shift: np.ndarray) -> dict[int, Update]:
        """The updates that make the producer at position ``at`` take ``y * scale + shift`` (its own and
        those of the nodes inside it): the tail every producer-side rule shares. NotFoldable when there
        is a shift and the producer has no bias to take it."""
        if not w.takes_shift and np.any(shift):
            raise NotFoldable(f"{node.op_type} output has rank {w.rank}: it has no bias to take the shift")
        return {at: self.update(node, w, scale, shift), **self.inner_updates(w, scale)}


def conv_constants(g: GraphQuery, node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray | None]:
    """A Conv or ConvTranspose's constant weight (rank 3+) and bias."""
    if len(node.input) < 2 or not node.input[1]:
        raise NotFoldable(f"{node.op_type} has no weight input")
    w = g.const(node.input[1], f"{node.op_type} weight")
    check_float(w, f"{node.op_type} weight")
    if w.ndim < 3:
        raise NotFoldable(f"{node.op_type} weight has rank {w.ndim}, expected at least 3")
    b = None
    if len(node.input) > 2 and node.input[2]:
        b = g.const(node.input[2], f"{node.op_type} bias")
        check_float(b, f"{node.op_type} bias")
    return w, b


def new_inputs(scale, weight: NewValue, others: dict[int, NewValue]) -> dict[int, NewValue]:
    """A producer's new inputs: ``others`` (its bias) and ``weight`` (slot 1), unless the scale is exactly
    1 everywhere (:func:`onnxfold.affine.unscaled`: an Add or a Sub of a constant). Then the weight stays
    the tensor it is and the fold writes the bias alone, with no pass over the weight."""
    return dict(others) if others and unscaled(scale) else {1: weight, **others}


def bias_hint(node: onnx.NodeProto) -> str:
    """A name for a producer's new bias: its old one, or the weight's with .bias / _bias."""
    if len(node.input) > 2 and node.input[2]:
        return node.input[2]
    base = node.input[1]
    return base[: -len(".weight")] + ".bias" if base.endswith(".weight") else base + "_bias"


class ConvProducer(Producer[Weights]):
    """Conv, any dimensionality: W [M, C/group, k...], B [M]. Output channel m is made by W[m].

    W'[m] = W[m] * scale[m];  B'[m] = B[m] * scale[m] + shift[m]. Strides, pads, dilations and
    groups do not enter the algebra: each output channel is a linear function of its own filter.
    """

    name = "conv"
    op_types = ("Conv",)
    description = "Conv (1-D/2-D/3-D, any strides, pads, dilations, groups, with or without bias)"

    def weights(self, g, node, shift_only=False):
        w, b = conv_constants(g, node)
        group = int(attr(node, "group", 1))
        if group < 1 or w.shape[0] % group:
            raise NotFoldable(f"Conv weight has {w.shape[0]} output channels, not divisible by group={group}")
        return Weights(w, b, channels=w.shape[0], rank=w.ndim)

    def update(self, node, w, scale, shift):
        return Update(new_inputs(scale, NewValue(scale_conv_weight(w.weight, scale), "weight", node.input[1]),
                                 {2: NewValue(fold_bias(w.bias, scale, shift), "bias", bias_hint(node))}))


class ConvTransposeProducer(Producer[GroupedWeights]):
    """ConvTranspose: W [C_in, M/group, k...], B [M].

    Output channel ``m = g * (M/group) + j`` is made by the slice ``W[g*C_in/group:(g+1)*C_in/group, j]``,
    so the scale applies within each group along axis 1 (torch's fusion utility is right only for
    group = 1). output_padding, strides and pads do not enter the algebra.
    """

    name = "convtranspose"
    op_types = ("ConvTranspose",)
    description = "ConvTranspose (1-D/2-D/3-D, groups, strides, output_padding, with or without bias)"

    def weights(self, g, node, shift_only=False):
        w, b = conv_constants(g, node)
        group = int(attr(node, "group", 1))
        if group < 1 or w.shape[0] % group:
            raise NotFoldable(f"ConvTranspose weight has {w.shape[0]} input channels, not divisible by group={group}")
        return GroupedWeights(w, b, channels=w.shape[1] * group, rank=w.ndim, group=group)

    def update(self, node, w, scale, shift):
        weight = NewValue(scale_conv_transpose_weight(w.weight, scale, w.group), "weight", node.input[1])
        bias = NewValue(fold_bias(w.bias, scale, shift), "bias", bias_hint(node))
        return Update(new_inputs(scale, weight, {2: bias}))


def matrix_weight(g: GraphQuery, node: onnx.NodeProto, what: str) -> np.ndarray:
    """The constant 2-D weight of a Gemm or MatMul, in an opset where the folded Gemm's [N] bias broadcasts."""
    since = g.since_version("Gemm")
    if since < 7:  # the fold writes a Gemm whose C is [N]: numpy-style broadcasting came with Gemm-7
        raise NotFoldable(f"the model's opset has Gemm-{since}, whose C does not broadcast like numpy "
                          "(the broadcast attribute)")
    w = g.const(node.input[1], what)
    check_float(w, what)
    if w.ndim != 2:
        raise NotFoldable(f"{what} has rank {w.ndim}, expected 2")
    return w


class GemmProducer(Producer[GemmWeights]):
    """Gemm: Y = alpha * A' @ B' + beta * C, with B' = B (transB=0, [K, N]) or B^T (transB=1, [N, K]).

    Output channel n is column n of B' (axis 1 of B, or axis 0 with transB=1); alpha and transA do
    not enter the algebra. B'[:, n] = B[:, n] * scale[n]; C' = beta * C * scale + shift (C absent,
    scalar, [N] or [1, N]) and beta becomes 1.
    """

    name = "gemm"
    op_types = ("Gemm",)
    description = "Gemm (transA, transB, alpha, beta; C absent, scalar, [N] or [1, N])"

    def weights(self, g, node, shift_only=False):
        b = matrix_weight(g, node, "Gemm B")
        trans_b = bool(attr(node, "transB", 0))
        n = b.shape[0] if trans_b else b.shape[1]
        c = None
        if len(node.input) > 2 and node.input[2]:
            c = g.const(node.input[2], "Gemm C")
            check_float(c, "Gemm C")
            if c.shape not in ((), (1,), (n,), (1, n), (1, 1)):
                raise NotFoldable(f"Gemm C has shape {list(c.shape)}: only a scalar, [N] or [1, N] bias folds")
        return GemmWeights(b, c, channels=n, rank=2, trans_b=trans_b, beta=float(attr(node, "beta", 1.0)),
                           c_shape=None if c is None else tuple(c.shape))

    def update(self, node, w, scale, shift):
        if w.trans_b:
            b: RowScaled = RowScaled(w.weight, lambda i, j: scale[i:j].reshape(-1, 1))
        else:
            b = scale_columns(w.weight, scale)
        c = np.zeros(w.channels) if w.bias is None else np.broadcast_to(
            np.asarray(w.bias, np.float64).reshape(-1), (w.channels,))
        c = c * w.beta * scale + shift
        if w.c_shape and len(w.c_shape) == 2:
            c = c.reshape(1, -1)
        bias = NewValue(c, "bias", bias_hint(node))
        return Update(new_inputs(scale, NewValue(b, "weight", node.input[1]), {2: bias}), attributes={"beta": 1.0})


class MatMulProducer(Producer[Weights]):
    """MatMul with a constant 2-D weight W [K, N]: output channel n (the last axis) is column n of W.

    W'[:, n] = W[:, n] * scale[n]. With a rank-2 input the shift becomes a bias, so the node becomes
    Gemm(A, W', shift) (BatchNorm1d after Linear). With a rank-3+ input MatMul has no bias: a pure
    scale folds (the node stays a MatMul), a BatchNormalization's shift stays behind as an Add of a
    constant, and a pure shift (an Add) is declined.
    """

    name = "matmul"
    op_types = ("MatMul",)
    description = "MatMul with a constant 2-D weight (rank 2 becomes Gemm; rank 3+ takes a scale)"

    def weights(self, g, node, shift_only=False):
        rank = g.rank(node.input[0])  # before the weight is read: most rank-3+ MatMuls decline here
        if rank is None:
            raise NotFoldable("the rank of MatMul's input is unknown (no shape information)")
        if rank < 2:
            raise NotFoldable(f"MatMul's input has rank {rank}: no channel axis to fold into")
        if rank > 2 and shift_only:
            raise NotFoldable(
                f"MatMul output has rank {rank}: it has no bias to take the shift (only a rank-2 MatMul "
                "becomes a Gemm, whose C is a bias)"
            )
        w = matrix_weight(g, node, "MatMul weight")
        return Weights(w, None, channels=w.shape[1], rank=rank, axis=rank - 1, takes_shift=rank == 2)

    def update(self, node, w, scale, shift):
        weight = NewValue(scale_columns(w.weight, scale), "weight", node.input[1])
        if not w.takes_shift:
            return Update({1: weight})
        return Update(new_inputs(scale, weight, {2: NewValue(shift.copy(), "bias", bias_hint(node))}), op_type="Gemm")


@dataclass
class LinearWeights(Weights):
    matmul: int = -1  # the MatMul's position
    weight_name: str = ""
    bias_slot: int = 1  # which input of the Add is the bias
    bias_shape: tuple[int, ...] = ()


class LinearProducer(Producer[LinearWeights]):
    """MatMul with a constant 2-D weight W [K, N], then Add of a constant bias b over the last axis
    ([N] or [1, ..., N]): torch's Linear on a rank-3+ input. Channel n is column n of W and b[n]:
    W'[:, n] = W[:, n] * scale[n]; b'[n] = b[n] * scale[n] + shift[n]. Both nodes stay."""

    name = "linear"
    op_types = ("Add",)
    description = "MatMul + Add of a bias over the last axis (a Linear layer on a rank-3+ input)"

    def _parts(self, g: GraphQuery, node: onnx.NodeProto) -> tuple[int, list[int], int] | None:
        """(the MatMul's position, the Identity positions between, the bias input's slot) or None."""
        if node.op_type != "Add" or len(node.input) != 2:
            return None
        for d in (0, 1):
            mi, chain = g.upstream(node.input[d])
            if mi is not None and g.node(mi).op_type == "MatMul" and g.constant_like(node.input[1 - d]):
                return mi, chain, 1 - d
        return None

    def is_producer(self, g, node):
        return self._parts(g, node) is not None

    def inner(self, g, node):
        parts = self._parts(g, node)
        if parts is None:
            return []
        mi, chain, _ = parts
        return [g.node(mi).output[0], *(g.node(k).output[0] for k in reversed(chain))]

    def weights(self, g, node, shift_only=False):
        parts = self._parts(g, node)
        if parts is None:
            raise NotFoldable("the Add is not a MatMul plus a constant")
        mi, _, slot = parts
        matmul = g.node(mi)
        rank = g.rank(matmul.input[0])
        if rank is None or rank < 2:
            raise NotFoldable("the rank of the MatMul's input is unknown (no shape information)" if rank is None
                              else f"the MatMul's input has rank {rank}")
        w = matrix_weight(g, matmul, "MatMul weight")
        b = g.const(node.input[slot], "Linear bias")
        check_float(b, "Linear bias")
        n = w.shape[1]
        if b.ndim > rank or b.shape[-1:] != (n,) or any(d != 1 for d in b.shape[:-1]):
            raise NotFoldable(f"the Add's constant has shape {list(b.shape)}, not a bias over the last axis ({n})")
        return LinearWeights(w, b, channels=n, rank=rank, axis=rank - 1, matmul=mi, weight_name=matmul.input[1],
                             bias_slot=slot, bias_shape=tuple(b.shape))

    def update(self, node, w, scale, shift):
        bias = (np.asarray(w.bias, np.float64).reshape(-1) * scale + shift).reshape(w.bias_shape)
        return Update({w.bias_slot: NewValue(bias, "bias", node.input[w.bias_slot])})

    def inner_updates(self, w, scale):
        if unscaled(scale):  # the bias takes the shift alone: the MatMul stays as it is
            return {}
        return {w.matmul: Update({1: NewValue(scale_columns(w.weight, scale), "weight", w.weight_name)})}


PRODUCERS: tuple[Producer, ...] = (ConvProducer(), ConvTransposeProducer(), GemmProducer(), MatMulProducer(),
                                   LinearProducer())
PRODUCER_BY_OP: dict[str, Producer] = {op: p for p in PRODUCERS for op in p.op_types}


def producer_of(g: GraphQuery, node: onnx.NodeProto) -> Producer | None:
    """The producer ``node`` is, if any (default domain; by structure)."""
    p = PRODUCER_BY_OP.get(node.op_type) if is_default(node) else None
    return p if p is not None and p.is_producer(g, node) else None
