"""Producers and consumers: each a small adapter with its algebra in the docstring.

A fold is a pair (see :mod:`onnxfold.affine`): a *producer* that owns per-output-channel weights
and a *consumer* that computes a per-channel affine ``y = x * scale + shift`` of the producer's
output. A rule is one such pair; its name is ``<producer>_<consumer>`` (``conv_bn``).

Adapters read constants through the scope they are given and raise
:class:`~onnxfold.affine.NotFoldable` with a sentence when something is not safe. The checks common
to every rule (the producer's output has no other reader and is not a graph output) live once, in
the driver (:mod:`onnxfold.fold`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from .affine import (
    NotFoldable,
    RowScaled,
    bn_affine,
    fold_bias,
    fold_input_affine,
    scale_columns,
    scale_conv_transpose_weight,
    scale_conv_weight,
)

FLOAT_TYPES = ("float16", "bfloat16", "float32", "float64")
DEFAULT_EPSILON = float(np.float32(1e-5))  # BatchNormalization's epsilon attribute is a float32


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _check_float(array: np.ndarray, what: str) -> None:
    if array.dtype.name not in FLOAT_TYPES:
        raise NotFoldable(f"{what} has dtype {array.dtype.name}, not a float type onnxfold folds")


@dataclass
class Weights:
    """What a producer owns: its constants and how many output channels it makes."""

    weight: np.ndarray
    bias: np.ndarray | None
    channels: int
    rank: int  # rank of the producer's output (the consumer's channel axis is 1)
    extra: dict = field(default_factory=dict)

    @property
    def dtype(self):
        return self.weight.dtype


@dataclass
class Update:
    """A producer's folded inputs: ``{input index: (float64 value, what, name hint)}`` and attributes."""

    inputs: dict[int, tuple[np.ndarray, str, str]]
    attributes: dict = field(default_factory=dict)
    op_type: str | None = None  # a producer may become another op (MatMul + bias -> Gemm)


class Producer:
    name = ""
    op_types: tuple[str, ...] = ()
    description = ""

    def weights(self, scope, node: onnx.NodeProto) -> Weights:  # pragma: no cover - interface
        raise NotImplementedError

    def fold(self, node: onnx.NodeProto, w: Weights, scale: np.ndarray, shift: np.ndarray) -> Update:
        raise NotImplementedError  # pragma: no cover - interface


class ConvProducer(Producer):
    """Conv, any dimensionality: W [M, C/group, k...], B [M]. Output channel m is made by W[m].

    W'[m] = W[m] * scale[m];  B'[m] = B[m] * scale[m] + shift[m]. Strides, pads, dilations and
    groups do not enter the algebra: each output channel is a linear function of its own filter.
    """

    name = "conv"
    op_types = ("Conv",)
    description = "Conv (1-D/2-D/3-D, any strides, pads, dilations, groups, with or without bias)"

    def _constants(self, scope, node):
        if len(node.input) < 2 or not node.input[1]:
            raise NotFoldable(f"{node.op_type} has no weight input")
        w = scope.const(node.input[1], f"{node.op_type} weight")
        _check_float(w, f"{node.op_type} weight")
        if w.ndim < 3:
            raise NotFoldable(f"{node.op_type} weight has rank {w.ndim}, expected at least 3")
        b = None
        if len(node.input) > 2 and node.input[2]:
            b = scope.const(node.input[2], f"{node.op_type} bias")
            _check_float(b, f"{node.op_type} bias")
        return w, b

    def weights(self, scope, node):
        w, b = self._constants(scope, node)
        group = int(attr(node, "group", 1))
        if group < 1 or w.shape[0] % group:
            raise NotFoldable(f"Conv weight has {w.shape[0]} output channels, not divisible by group={group}")
        return Weights(w, b, channels=w.shape[0], rank=w.ndim)

    def fold(self, node, w, scale, shift):
        return Update(
            {
                1: (scale_conv_weight(w.weight, scale), "weight", node.input[1]),
                2: (fold_bias(w.bias, scale, shift), "bias", _bias_hint(node)),
            }
        )


class ConvTransposeProducer(ConvProducer):
    """ConvTranspose: W [C_in, M/group, k...], B [M].

    Output channel ``m = g * (M/group) + j`` is made by the slice ``W[g*C_in/group:(g+1)*C_in/group, j]``,
    so the scale applies within each group along axis 1 (torch's fusion utility is right only for
    group = 1). output_padding, strides and pads do not enter the algebra.
    """

    name = "convtranspose"
    op_types = ("ConvTranspose",)
    description = "ConvTranspose (1-D/2-D/3-D, groups, strides, output_padding, with or without bias)"

    def weights(self, scope, node):
        w, b = self._constants(scope, node)
        group = int(attr(node, "group", 1))
        if group < 1 or w.shape[0] % group:
            raise NotFoldable(f"ConvTranspose weight has {w.shape[0]} input channels, not divisible by group={group}")
        return Weights(w, b, channels=w.shape[1] * group, rank=w.ndim, extra={"group": group})

    def fold(self, node, w, scale, shift):
        return Update(
            {
                1: (scale_conv_transpose_weight(w.weight, scale, w.extra["group"]), "weight", node.input[1]),
                2: (fold_bias(w.bias, scale, shift), "bias", _bias_hint(node)),
            }
        )


class GemmProducer(Producer):
    """Gemm: Y = alpha * A' @ B' + beta * C, with B' = B (transB=0, [K, N]) or B^T (transB=1, [N, K]).

    Output channel n is column n of B' (axis 1 of B, or axis 0 with transB=1); alpha and transA do
    not enter the algebra. B'[:, n] = B[:, n] * scale[n]; C' = beta * C * scale + shift (C absent,
    scalar, [N] or [1, N]) and beta becomes 1.
    """

    name = "gemm"
    op_types = ("Gemm",)
    description = "Gemm (transA, transB, alpha, beta; C absent, scalar, [N] or [1, N])"

    def weights(self, scope, node):
        b = _matrix_weight(scope, node, "Gemm B")
        trans_b = int(attr(node, "transB", 0))
        n = b.shape[0] if trans_b else b.shape[1]
        c = None
        if len(node.input) > 2 and node.input[2]:
            c = scope.const(node.input[2], "Gemm C")
            _check_float(c, "Gemm C")
            if c.shape not in ((), (1,), (n,), (1, n), (1, 1)):
                raise NotFoldable(f"Gemm C has shape {list(c.shape)}: only a scalar, [N] or [1, N] bias folds")
        return Weights(b, c, channels=n, rank=2, extra={"transB": trans_b, "beta": float(attr(node, "beta", 1.0)),
                                                         "c_shape": None if c is None else c.shape})

    def fold(self, node, w, scale, shift):
        axis = 0 if w.extra["transB"] else 1
        b = RowScaled(w.weight, lambda i, j: scale[i:j].reshape(-1, 1)) if axis == 0 else scale_columns(w.weight, scale)
        c = np.zeros(w.channels) if w.bias is None else np.broadcast_to(np.asarray(w.bias, np.float64).reshape(-1), (w.channels,))
        c = c * w.extra["beta"] * scale + shift
        if w.extra["c_shape"] and len(w.extra["c_shape"]) == 2:
            c = c.reshape(1, -1)
        return Update({1: (b, "weight", node.input[1]), 2: (c, "bias", _bias_hint(node))}, attributes={"beta": 1.0})


def _matrix_weight(scope, node, what: str) -> np.ndarray:
    """The constant 2-D weight of a Gemm or MatMul, in an opset where the folded Gemm's [N] bias broadcasts."""
    since = scope.index.since_version("Gemm")
    if since < 7:  # the fold writes a Gemm whose C is [N]: numpy-style broadcasting came with Gemm-7
        raise NotFoldable(f"the model's opset has Gemm-{since}, whose C does not broadcast like numpy "
                          "(the broadcast attribute)")
    w = scope.const(node.input[1], what)
    _check_float(w, what)
    if w.ndim != 2:
        raise NotFoldable(f"{what} has rank {w.ndim}, expected 2")
    return w


class MatMulProducer(Producer):
    """MatMul with a constant 2-D weight W [K, N] and a rank-2 output [M, N] (BatchNorm1d after Linear).

    W'[:, n] = W[:, n] * scale[n]; the shift becomes a bias, so the node becomes Gemm(A, W', shift).
    A rank-3+ output is declined: Gemm is 2-D, and there BatchNormalization's channel axis 1 is not
    the weight's output axis.
    """

    name = "matmul"
    op_types = ("MatMul",)
    description = "MatMul with a constant 2-D weight and a rank-2 output (becomes Gemm)"

    def weights(self, scope, node):
        rank = scope.rank(node.input[0])  # before the weight is read: most rank-3+ MatMuls decline here
        if rank is None:
            raise NotFoldable("the rank of MatMul's input is unknown (no shape information)")
        if rank != 2:
            raise NotFoldable(
                f"MatMul output has rank {rank}: only a rank-2 MatMul folds (it becomes a Gemm, whose output "
                "is 2-D and whose channel axis 1 is the weight's output axis)"
            )
        w = _matrix_weight(scope, node, "MatMul weight")
        return Weights(w, None, channels=w.shape[1], rank=2)

    def fold(self, node, w, scale, shift):
        return Update(
            {1: (scale_columns(w.weight, scale), "weight", node.input[1]),
             2: (shift.copy(), "bias", _bias_hint(node))},
            op_type="Gemm",
        )


def _bias_hint(node: onnx.NodeProto) -> str:
    if len(node.input) > 2 and node.input[2]:
        return node.input[2]
    base = node.input[1]
    return base[: -len(".weight")] + ".bias" if base.endswith(".weight") else base + "_bias"


class Consumer:
    name = ""
    op_types: tuple[str, ...] = ()
    description = ""

    report_left = False  # list this consumer in the report when it has nothing to fold into

    def data_inputs(self, node: onnx.NodeProto) -> tuple[int, ...]:
        """Indices of the inputs that may carry the producer's output."""
        return (0,)

    def is_candidate(self, scope, node: onnx.NodeProto, data_index: int) -> bool:
        """Whether this input is worth matching at all (not a reason to decline)."""
        return True

    def affine(self, scope, node: onnx.NodeProto, data_index: int, w: Weights) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError  # pragma: no cover - interface


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

    def affine(self, scope, node, data_index, w):
        since = scope.since_version(node)
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
        names = ("scale", "B", "mean", "var")
        stats = []
        for name, tensor in zip(names, node.input[1:5]):
            value = scope.const(tensor, f"BatchNormalization {name}")
            _check_float(value, f"BatchNormalization {name}")
            if value.shape != (w.channels,):
                raise NotFoldable(
                    f"BatchNormalization {name} has shape {list(value.shape)}, the producer makes {w.channels} channels"
                )
            stats.append(value)
        gamma, beta, mean, var = stats
        # the attribute is a float32: its default is float32(1e-5), as a written 1e-5 reads back
        eps = float(attr(node, "epsilon", DEFAULT_EPSILON))
        return bn_affine(gamma, beta, mean, var, eps)


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
        self.description = {
            "Mul": "Mul by a per-channel constant (either side)",
            "Add": "Add of a per-channel constant (either side)",
            "Sub": "Sub of a per-channel constant (x - c, or c - x with the sign folded)",
            "Div": "Div by a per-channel constant (x / c only)",
        }[op_type]

    def data_inputs(self, node):
        return (0,) if node.op_type == "Div" else (0, 1)

    def is_candidate(self, scope, node, data_index):
        # Only an operand that is a constant makes this an affine of the other side: a residual Add
        # of two Convs is no candidate, not a decline.
        # "Constant" by structure: one whose value onnxfold cannot evaluate is declined with the reason.
        return len(node.input) == 2 and scope.constant_like(node.input[1 - data_index])

    def affine(self, scope, node, data_index, w):
        if len(node.input) != 2:
            raise NotFoldable(f"{node.op_type} does not have two inputs")
        since = scope.since_version(node)
        if since < 7:
            raise NotFoldable(f"{node.op_type}-{since} broadcasts by its broadcast/axis attributes, not like numpy")
        const = scope.const(node.input[1 - data_index], f"{node.op_type} operand")
        _check_float(const, f"{node.op_type} operand")
        c = per_channel(const, w.rank, w.channels)
        op = node.op_type
        ones, zeros = np.ones(w.channels), np.zeros(w.channels)
        if op == "Mul":
            return c, zeros
        if op == "Add":
            return ones, c
        if op == "Sub":
            return (ones, -c) if data_index == 0 else (-ones, c)
        if np.any(c == 0):
            raise NotFoldable("Div by a constant that has zeros")
        return 1.0 / c, zeros


def per_channel(const: np.ndarray, rank: int, channels: int) -> np.ndarray:
    """A constant's per-channel values (float64, length C), if it broadcasts only along axis 1."""
    shape = tuple(const.shape)
    if len(shape) > rank:
        raise NotFoldable(f"constant of shape {list(shape)} has more dimensions than the output (rank {rank})")
    padded = (1,) * (rank - len(shape)) + shape
    others = [d for axis, d in enumerate(padded) if axis != 1]
    if any(d != 1 for d in others) or padded[1] not in (1, channels):
        hint = " (a length-C vector broadcasts over the last axis, not the channels)" if len(shape) == 1 and rank > 2 else ""
        raise NotFoldable(f"constant of shape {list(shape)} does not broadcast per channel against rank {rank}{hint}")
    return np.broadcast_to(np.asarray(const, np.float64).reshape(-1), (channels,)).copy()


class BatchNormBeforeConv:
    """BatchNormalization -> Conv: the affine folds into the Conv's INPUT channels.

    W'[m, j] = W[m, j] * scale[c]; b'[m] = b[m] + sum over j and the kernel of W[m, j, k] * shift[c],
    with c = g*C/group + j for output channel m of group g. Only when the Conv has no padding (pads all
    zero or auto_pad VALID): zero padding is applied after BatchNormalization, so with padding the
    border outputs would see shift where the original saw zeros.
    """

    name = "bn_conv"
    op_types = ("Conv",)
    description = "BatchNormalization -> Conv without padding (into the Conv's input channels)"

    def fold(self, scope, bn, conv):
        auto_pad = attr(conv, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            raise NotFoldable(f"Conv pads its input (auto_pad={auto_pad}): zero padding after BatchNormalization "
                              "is not an affine of the input")
        pads = attr(conv, "pads", None)
        if auto_pad == "NOTSET" and pads and any(pads):
            raise NotFoldable(f"Conv pads its input (pads={list(pads)}): zero padding after BatchNormalization "
                              "is not an affine of the input")
        w, b = ConvProducer()._constants(scope, conv)
        group = int(attr(conv, "group", 1))
        channels = w.shape[1] * group
        scale, shift = BatchNormConsumer().affine(scope, bn, 0, Weights(w, b, channels=channels, rank=w.ndim))
        w2, b2 = fold_input_affine(w, b, scale, shift, group)
        return Update({1: (w2, "weight", conv.input[1]), 2: (b2, "bias", _bias_hint(conv))}), w.dtype


@dataclass(frozen=True)
class Rule:
    producer: Producer
    consumer: Consumer

    @property
    def name(self) -> str:
        return f"{self.producer.name}_{self.consumer.name}"

    @property
    def description(self) -> str:
        return f"{self.producer.op_types[0]} -> {self.consumer.op_types[0]}"


PRODUCERS: tuple[Producer, ...] = (ConvProducer(), ConvTransposeProducer(), GemmProducer(), MatMulProducer())
CONSUMERS: tuple[Consumer, ...] = (BatchNormConsumer(), *(ArithmeticConsumer(op) for op in ("Mul", "Add", "Sub", "Div")))
RULES: tuple[Rule, ...] = tuple(Rule(p, c) for p in PRODUCERS for c in CONSUMERS)

# Reasons every rule shares; checked once, in the driver.
SHARED_DECLINES = (
    "the producer's output has another consumer, or is a graph output",
    "a weight, bias or statistic is not a constant (a graph input, an initializer that is also a "
    "graph input in IR >= 4, or computed at run time)",
    "a folded value is not finite in the model's dtype (float16 overflow past 65504)",
    "shapes or dtypes that do not match",
)


INPUT_RULES = (BatchNormBeforeConv(),)


def rule_names() -> list[str]:
    return [r.name for r in RULES] + [r.name for r in INPUT_RULES]


def select_rules(disable=()) -> dict[tuple[str, str], object]:
    """Rules keyed by (upstream op_type, downstream op_type), without the disabled ones."""
    disable = {disable} if isinstance(disable, str) else set(disable)  # a string is one rule's name, not letters
    unknown = disable - set(rule_names())
    if unknown:
        raise ValueError(f"unknown rule {sorted(unknown)[0]!r}; known rules: {', '.join(rule_names())}")
    table = {}
    for rule in RULES:
        if rule.name in disable:
            continue
        for p in rule.producer.op_types:
            for c in rule.consumer.op_types:
                table[(p, c)] = rule
    for rule in INPUT_RULES:
        if rule.name not in disable:
            table[("BatchNormalization", "Conv")] = rule
    return table


def _doc(obj) -> list[str]:
    return ["    " + line.strip() for line in (type(obj).__doc__ or "").strip().splitlines() if line.strip()]


def describe_rules() -> str:
    """What --list-rules prints: every rule by name, then what each producer and consumer does and declines."""
    lines = ["rules (switch one off with --disable NAME):"]
    lines += [f"  {r.name:<20} {r.description}" for r in (*RULES, *INPUT_RULES)]
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
    for r in INPUT_RULES:
        lines.append(f"{r.name}: {r.description}")
        lines += _doc(r)
    lines.append("every rule declines when:")
    lines.extend(f"    - {reason}" for reason in SHARED_DECLINES)
    return "\n".join(lines)
