"""Constant expressions, evaluated exactly as the ONNX specification says, in NumPy.

A fold may rest on a value that a small subgraph computes from constants (exporters make a zero
bias with Shape -> ConstantOfShape, reshape a scale with Unsqueeze, cast it with CastLike). A wrong
value there makes a wrong model, so every op here follows the operator's documentation at the
opset version the model imports (``since_version``), and whatever the specification leaves
undefined, or that this module does not implement, is declined with :class:`NotFoldable` rather than
guessed. In particular:

- axes (Unsqueeze, Squeeze, Slice, Concat, Flatten, Gather) are counted from the back only from the
  version that allows negative values; a repeated axis or one out of range is declined;
- Cast from floating point to an integer type truncates toward zero and declines NaN, infinities and
  values out of the target's range (undefined in the specification); to float16 and bfloat16 it
  rounds to nearest even and overflows to infinity; an integer is narrowed by dropping high bits;
- integer Div truncates toward zero (as C and onnxruntime do); division by zero, and any integer
  result that overflows its type, is declined;
- Add/Sub/Mul/Div before version 7 use their legacy broadcasting (``broadcast``, ``axis``);
- Range is exact for integers; for floating point it is evaluated only when the specification's
  formula (``start + i * delta``) and the accumulation runtimes use agree on every element;
- inputs are checked against the operator's type constraints, and unknown attributes are declined.

onnx.reference is deliberately not used: some of its kernels are wrong (Unsqueeze-1/11 inserts
several axes one at a time, giving [1, 5, 1, 1] for ``axes=[1, 0, 2]`` on a [5] tensor instead of
the specification's [1, 1, 1, 5]).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import onnx
from ml_dtypes import bfloat16
from onnx import TensorProto, helper

from .errors import NotFoldable
from .protobuf import DEFAULT_DOMAINS

__all__ = ["evaluate", "cast", "constant_value", "constant_of_shape", "OPS"]

MAX_ELEMENTS = 1 << 26  # an expression that makes more than this is not a weight or a statistic

_BF16 = np.dtype(bfloat16)
_FLOATS = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64), _BF16}
_INTS = {np.dtype(t) for t in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64)}
_BOOL = np.dtype(bool)
_NUMERIC = _FLOATS | _INTS | {_BOOL}


# -- helpers -----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _type_name(dtype: np.dtype) -> str:
    if dtype == np.dtype(object) or dtype.kind in "US":
        return "string"
    try:
        return TensorProto.DataType.Name(helper.np_dtype_to_tensor_dtype(dtype)).lower()
    except Exception:
        return str(dtype)


def _is_float(x: np.ndarray) -> bool:
    return x.dtype in _FLOATS


def _ints(x: np.ndarray, what: str) -> list[int]:
    if x.dtype not in _INTS:
        raise NotFoldable(f"{what} must be integers, got {_type_name(x.dtype)}")
    if x.ndim != 1:
        raise NotFoldable(f"{what} must be a 1-D tensor, got shape {list(x.shape)}")
    return [int(v) for v in x]


def _scalar(x: np.ndarray, what: str):
    if x.ndim != 0 and x.size != 1:
        raise NotFoldable(f"{what} must be a scalar, got shape {list(x.shape)}")
    return x.reshape(())


def _axis(a: int, rank: int, negative_ok: bool, what: str, upper: int | None = None) -> int:
    """An axis in [0, upper) (upper defaults to rank); negative counts from the back where allowed."""
    upper = rank if upper is None else upper
    if a < 0:
        if not negative_ok:
            raise NotFoldable(f"{what} {a} is negative, which this version of the operator does not allow")
        a += rank
    if not 0 <= a < upper:
        raise NotFoldable(f"{what} is out of range for a tensor of rank {rank}")
    return a


def _axes(axes: list[int], rank: int, negative_ok: bool, what: str) -> list[int]:
    out = [_axis(a, rank, negative_ok, f"{what} {a}") for a in axes]
    if len(set(out)) != len(out):
        raise NotFoldable(f"{what} {axes} name the same axis twice")
    return out


def _limit(shape, what: str) -> None:
    n = math.prod(int(d) for d in shape)
    if n > MAX_ELEMENTS:
        raise NotFoldable(f"{what} would make {n} elements, more than a constant worth folding ({MAX_ELEMENTS})")


def _check_int_range(exact: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    """``exact`` holds Python ints (object dtype): the result, or a decline if one overflows."""
    info = np.iinfo(dtype)
    if exact.size and any(v < info.min or v > info.max for v in exact.reshape(-1)):
        raise NotFoldable(f"{what} overflows {_type_name(dtype)}, which the specification leaves undefined")
    return np.array([int(v) for v in exact.reshape(-1)], dtype=dtype).reshape(exact.shape)


# -- Cast ----------------------------------------------------------------------------------------------
def cast(x: np.ndarray, to: int) -> np.ndarray:
    """Cast-6.. as specified, for bool, integer, float16/32/64 and bfloat16 sources and targets."""
    try:
        target = np.dtype(helper.tensor_dtype_to_np_dtype(to))
    except Exception:
        raise NotFoldable(f"Cast to data type {to} is not a known tensor type") from None
    if target not in _NUMERIC:
        raise NotFoldable(f"Cast to {_type_name(target)} is not evaluated here")
    if x.dtype not in _NUMERIC:
        raise NotFoldable(f"Cast from {_type_name(x.dtype)} is not evaluated here")
    if x.dtype == target:
        return x.copy()
    src = x
    if x.dtype == _BF16:
        src = x.astype(np.float32)  # exact
    if target == _BOOL:
        return src != 0  # NaN is not zero: True, as the specification says "all else to True"
    if src.dtype in _FLOATS and target in _INTS:
        wide = src.astype(np.float64)  # exact for float16/32/64
        if not np.all(np.isfinite(wide)):
            raise NotFoldable(f"Cast of NaN or infinity to {_type_name(target)} is undefined")
        t = np.trunc(wide)
        bits = target.itemsize * 8
        lo, hi = (-(2.0 ** (bits - 1)), 2.0 ** (bits - 1)) if target.kind == "i" else (0.0, 2.0**bits)
        if t.size and (t.min() < lo or t.max() >= hi):
            raise NotFoldable(f"Cast of a value out of the range of {_type_name(target)} is undefined")
        return t.astype(target)
    if target in (_BF16, np.dtype(np.float16)) and src.dtype not in (np.dtype(np.float32), np.dtype(np.float16), _BOOL):
        # float64 or a wide integer to a 16-bit float: a runtime may go through float32 and round
        # twice, or not; only values that float32 holds exactly give one answer.
        with np.errstate(all="ignore"):
            if not np.array_equal(src.astype(np.float32).astype(np.float64), src.astype(np.float64), equal_nan=True):
                raise NotFoldable(f"Cast from {_type_name(src.dtype)} to {_type_name(target)} of a value float32 "
                                  f"does not hold exactly rounds differently in different runtimes")
    if target == _BF16:
        return src.astype(np.float32).astype(bfloat16)
    with np.errstate(all="ignore"):
        # integer -> integer drops high bits (two's complement), float -> float rounds to nearest
        # even and overflows to infinity, integer/bool -> float rounds to nearest: NumPy's casts.
        return src.astype(target)


# -- the operators ---------------------------------------------------------------------------------------
def _identity(v, x, a):
    return x[0].copy()


def _cast(v, x, a):
    to = a["to"]
    if isinstance(to, bytes):  # Cast-1 names the type as a string
        try:
            to = TensorProto.DataType.Value(to.decode())
        except ValueError:
            raise NotFoldable(f"Cast to '{to.decode()}' names no tensor data type") from None
    return cast(x[0], to)


def _castlike(v, x, a):
    return cast(x[0], helper.np_dtype_to_tensor_dtype(x[1].dtype))


def _shape(v, x, a):
    rank = x[0].ndim
    start, end = a.get("start", 0), a.get("end")
    end = rank if end is None else end
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    return np.array(x[0].shape[start:end] if start < end else (), dtype=np.int64)


def _size(v, x, a):
    return np.array(x[0].size, dtype=np.int64)


def _slice(v, x, a):
    data = x[0]
    if v < 10:
        starts, ends = list(a["starts"]), list(a["ends"])
        axes = list(a["axes"]) if "axes" in a else list(range(len(starts)))
        steps = [1] * len(starts)
    else:
        starts, ends = _ints(x[1], "Slice starts"), _ints(x[2], "Slice ends")
        axes = _ints(x[3], "Slice axes") if len(x) > 3 and x[3] is not None else list(range(len(starts)))
        steps = _ints(x[4], "Slice steps") if len(x) > 4 and x[4] is not None else [1] * len(starts)
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise NotFoldable("Slice starts, ends, axes and steps differ in length")
    axes = _axes(axes, data.ndim, v >= 11, "Slice axes")
    index: list[slice | np.ndarray] = [slice(None)] * data.ndim
    for axis, s, e, st in zip(axes, starts, ends, steps):
        if st == 0:
            raise NotFoldable("Slice step 0 is invalid")
        dim = data.shape[axis]
        s = s + dim if s < 0 else s
        e = e + dim if e < 0 else e
        if st > 0:
            s, e = min(max(s, 0), dim), min(max(e, 0), dim)
        else:
            s, e = min(max(s, 0), dim - 1), min(max(e, -1), dim - 1)
        index[axis] = np.arange(s, e, st, dtype=np.int64) if dim else np.zeros(0, np.int64)
    out = data
    for axis, idx in enumerate(index):
        if not isinstance(idx, slice):
            out = np.take(out, idx, axis=axis)
    return np.ascontiguousarray(out)


def _expand(v, x, a):
    shape = _ints(x[1], "Expand shape")
    if any(d < 0 for d in shape):
        raise NotFoldable(f"Expand shape {shape} has a negative dimension")
    try:
        out = np.broadcast_shapes(x[0].shape, tuple(shape))
    except ValueError:
        raise NotFoldable(f"Expand shape {shape} does not broadcast with {list(x[0].shape)}") from None
    _limit(out, "Expand")
    return np.broadcast_to(x[0], out).copy()


def _concat(v, x, a):
    inputs = [t for t in x]
    if not inputs or any(t is None for t in inputs):
        raise NotFoldable("Concat has no inputs, or an empty input name")
    rank = inputs[0].ndim
    if rank == 0 or any(t.ndim != rank for t in inputs):
        raise NotFoldable("Concat inputs must have the same rank, at least 1")
    axis = _axis(a.get("axis", 1), rank, v >= 11, f"Concat axis {a.get('axis', 1)}")
    for t in inputs:
        if t.shape[:axis] + t.shape[axis + 1:] != inputs[0].shape[:axis] + inputs[0].shape[axis + 1:]:
            raise NotFoldable(f"Concat inputs of shapes {[list(t.shape) for t in inputs]} differ off the axis {axis}")
    return np.concatenate(inputs, axis=axis)


def _reshape(v, x, a):
    data = x[0]
    shape = list(a["shape"]) if v < 5 else _ints(x[1], "Reshape shape")
    allowzero = a.get("allowzero", 0)
    if allowzero and 0 in shape and -1 in shape:
        raise NotFoldable("Reshape with allowzero=1 cannot have both 0 and -1 in its shape")
    if shape.count(-1) > 1 or any(d < -1 for d in shape):
        raise NotFoldable(f"Reshape shape {shape} is invalid")
    out = []
    for i, d in enumerate(shape):
        if d == 0 and not allowzero:
            if i >= data.ndim:
                raise NotFoldable(f"Reshape shape {shape} copies dimension {i} of a rank-{data.ndim} input")
            d = data.shape[i]
        out.append(d)
    if -1 in out:
        known = math.prod(d for d in out if d != -1)
        if known == 0 or data.size % known:
            raise NotFoldable(f"Reshape shape {shape} cannot infer its -1 for {list(data.shape)}")
        out[out.index(-1)] = data.size // known
    if math.prod(out) != data.size:
        raise NotFoldable(f"Reshape of {list(data.shape)} to {out} changes the number of elements")
    return data.reshape(out).copy()


def _unsqueeze(v, x, a):
    data = x[0]
    axes = list(a["axes"]) if v < 13 else _ints(x[1], "Unsqueeze axes")
    rank = data.ndim + len(axes)
    inserted = set(_axes(axes, rank, v >= 11, "Unsqueeze axes"))
    dims = iter(data.shape)
    return data.reshape([1 if i in inserted else next(dims) for i in range(rank)]).copy()


def _squeeze(v, x, a):
    data = x[0]
    if v < 13:
        axes = list(a["axes"]) if "axes" in a else None
    else:
        axes = _ints(x[1], "Squeeze axes") if len(x) > 1 and x[1] is not None else None
    if axes is None:
        return data.reshape([d for d in data.shape if d != 1]).copy()
    if not axes:
        raise NotFoldable("Squeeze with an empty axes list: onnx's shape inference keeps every dimension, "
                          "onnxruntime removes every 1")
    axes = _axes(axes, data.ndim, v >= 11, "Squeeze axes")
    if any(data.shape[i] != 1 for i in axes):
        raise NotFoldable(f"Squeeze axes {axes} name a dimension that is not 1 in {list(data.shape)}")
    return data.reshape([d for i, d in enumerate(data.shape) if i not in axes]).copy()


def _flatten(v, x, a):
    data = x[0]
    axis = _axis(a.get("axis", 1), data.ndim, v >= 11, f"Flatten axis {a.get('axis', 1)}", upper=data.ndim + 1)
    return data.reshape(math.prod(data.shape[:axis]), math.prod(data.shape[axis:])).copy()


def _transpose(v, x, a):
    data = x[0]
    perm = list(a["perm"]) if "perm" in a else list(range(data.ndim))[::-1]
    if sorted(perm) != list(range(data.ndim)):
        raise NotFoldable(f"Transpose perm {perm} is not a permutation of the {data.ndim} axes")
    return np.ascontiguousarray(np.transpose(data, perm))


def _gather(v, x, a):
    data, indices = x
    if data.ndim == 0:
        raise NotFoldable("Gather data must have rank at least 1")
    axis = _axis(a.get("axis", 0), data.ndim, True, f"Gather axis {a.get('axis', 0)}")
    dim = data.shape[axis]
    idx = indices.astype(np.int64)
    if idx.size and (idx.min() < (-dim if v >= 11 else 0) or idx.max() >= dim):
        raise NotFoldable(f"Gather indices are out of range for a dimension of {dim}")
    return np.take(data, np.where(idx < 0, idx + dim, idx), axis=axis)


def _tile(v, x, a):
    if v < 6:
        raise NotFoldable("Tile-1 (tiles and axis inputs) does not say whether it repeats elements or copies")
    repeats = _ints(x[1], "Tile repeats")
    if len(repeats) != x[0].ndim or any(r < 0 for r in repeats):
        raise NotFoldable(f"Tile repeats {repeats} do not fit a rank-{x[0].ndim} input")
    _limit([d * r for d, r in zip(x[0].shape, repeats)], "Tile")
    return np.tile(x[0], repeats) if repeats else x[0].copy()


def _range(v, x, a):
    start, limit, delta = (_scalar(t, f"Range {n}") for t, n in zip(x, ("start", "limit", "delta")))
    dtype = start.dtype
    if dtype in _INTS:
        s, stop, d = int(start), int(limit), int(delta)
        if d == 0:
            raise NotFoldable("Range delta 0 is invalid")
        n = max(-((s - stop) // d), 0)  # ceil((stop - s) / d), exactly
        _limit([n], "Range")
        return _check_int_range(np.array([s + i * d for i in range(n)], dtype=object), dtype, "Range")
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise NotFoldable(f"Range of {_type_name(dtype)} is not evaluated here")
    with np.errstate(all="ignore"):
        if not (np.isfinite(start) and np.isfinite(limit) and np.isfinite(delta)) or delta == 0:
            raise NotFoldable("Range start, limit and delta must be finite and delta non-zero")
        counts = {
            math.ceil(float((limit - start) / delta)),  # in the input type
            math.ceil(float(limit - start) / float(delta)),  # difference in the type, quotient in double
            math.ceil((float(limit) - float(start)) / float(delta)),  # all in double
        }
        if len(counts) != 1:
            raise NotFoldable("Range's element count depends on the precision it is computed in")
        n = max(counts.pop(), 0)
        if n > 1 << 20:
            raise NotFoldable(f"Range of {n} floating-point elements is not evaluated here")
        spec = (start + np.arange(n, dtype=dtype) * delta).astype(dtype)
        acc = np.empty(n, dtype)
        value = start
        for i in range(n):
            acc[i] = value
            value = (value + delta).astype(dtype)
    if not np.array_equal(spec, acc):
        raise NotFoldable("Range's values differ between start + i * delta and the running sum runtimes use")
    return spec


def _legacy_broadcast(v, a, A, B):
    """Add/Sub/Mul/Div-1 and -6: B broadcasts to A only with broadcast=1, by suffix or from ``axis``."""
    if not a.get("broadcast", 0):
        if A.shape != B.shape:
            raise NotFoldable(f"without broadcast=1 the shapes {list(A.shape)} and {list(B.shape)} must match")
        return B
    if B.size == 1 and B.ndim <= A.ndim:
        return B.reshape(())
    axis = a.get("axis", A.ndim - B.ndim)
    if axis < 0 or axis + B.ndim > A.ndim or A.shape[axis:axis + B.ndim] != B.shape:
        raise NotFoldable(f"legacy broadcast of {list(B.shape)} onto {list(A.shape)} at axis {axis} is not a "
                          f"contiguous subset of the first shape")
    return B.reshape(B.shape + (1,) * (A.ndim - axis - B.ndim))


def _binary(fn):
    def op(v, x, a):
        A, B = x
        if v < 7:
            B = _legacy_broadcast(v, a, A, B)
        else:
            try:
                np.broadcast_shapes(A.shape, B.shape)
            except ValueError:
                raise NotFoldable(f"shapes {list(A.shape)} and {list(B.shape)} do not broadcast") from None
        if A.dtype == _BF16:
            raise NotFoldable("bfloat16 arithmetic is not evaluated here: runtimes round it differently")
        if A.dtype in _INTS:
            exact = fn(A.astype(object), B.astype(object), integer=True)
            return _check_int_range(np.asarray(exact, dtype=object), A.dtype, "the integer result")
        with np.errstate(all="ignore"):
            return np.asarray(fn(A, B, integer=False), dtype=A.dtype)
    return op


def _div(A, B, integer):
    if not integer:
        return A / B
    if np.any(B == 0):
        raise NotFoldable("integer division by zero is undefined")
    q = np.vectorize(lambda p, r: abs(p) // abs(r) * (1 if (p < 0) == (r < 0) else -1), otypes=[object])
    return q(A, B)  # truncates toward zero, as C and onnxruntime do


def _unary(name, fn, ints_ok=False):
    def op(v, x, a):
        X = x[0]
        if X.dtype == _BF16 and name != "Neg":
            raise NotFoldable(f"bfloat16 {name} is not evaluated here: runtimes round it differently")
        if X.dtype in _INTS:
            if not ints_ok:
                raise NotFoldable(f"{name} of {_type_name(X.dtype)} is not evaluated here")
            return _check_int_range(-X.astype(object), X.dtype, name)
        with np.errstate(all="ignore"):
            return np.asarray(fn(X), dtype=X.dtype)
    return op


OPS = {
    "Identity": _identity,
    "Cast": _cast,
    "CastLike": _castlike,
    "Shape": _shape,
    "Size": _size,
    "Slice": _slice,
    "Expand": _expand,
    "Concat": _concat,
    "Reshape": _reshape,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Flatten": _flatten,
    "Transpose": _transpose,
    "Gather": _gather,
    "Tile": _tile,
    "Range": _range,
    "Add": _binary(lambda A, B, integer: A + B),
    "Sub": _binary(lambda A, B, integer: A - B),
    "Mul": _binary(lambda A, B, integer: A * B),
    "Div": _binary(_div),
    "Neg": _unary("Neg", np.negative, ints_ok=True),
    "Sqrt": _unary("Sqrt", np.sqrt),
    "Reciprocal": _unary("Reciprocal", lambda X: np.ones((), X.dtype) / X),
    # exact in every float type (Hugging Face's legacy MobileViT sizes its patches with Ceil of a Constant)
    "Ceil": _unary("Ceil", np.ceil),
    "Floor": _unary("Floor", np.floor),
}
# Attributes that only told old runtimes how to reuse memory; they do not change the value.
_IGNORED_ATTRIBUTES = {"consumed_inputs"}


class _Spec:
    """What evaluation reads of an operator's schema, read from onnx once per (op, version): each
    get_schema copies the schema, with the function body of an op defined by one (CastLike), and each
    read of its inputs, constraints or attributes converts them again (a dynamo export's Conv biases,
    Expand of CastLike of Shape: 800 evaluations a fold)."""

    def __init__(self, schema: onnx.defs.OpSchema):
        self.since_version = schema.since_version
        self.inputs = tuple(schema.inputs)
        self.outputs = tuple(schema.outputs)
        variadic = onnx.defs.OpSchema.FormalParameterOption.Variadic
        self.variadic = bool(self.inputs) and self.inputs[-1].option == variadic
        self.constraints = {c.type_param_str: frozenset(c.allowed_type_strs) for c in schema.type_constraints}
        self.attributes = dict(schema.attributes)


@functools.lru_cache(maxsize=256)
def _schema(op_type: str, since_version: int) -> _Spec:
    try:
        return _Spec(onnx.defs.get_schema(op_type, since_version))
    except onnx.defs.SchemaError:
        raise NotFoldable(f"{op_type} has no definition at opset {since_version}") from None


def _attributes(node: onnx.NodeProto, schema) -> dict:
    out = {}
    for attr in node.attribute:
        if attr.name in _IGNORED_ATTRIBUTES and attr.name in schema.attributes:
            continue
        if attr.name not in schema.attributes:
            raise NotFoldable(f"{node.op_type}-{schema.since_version} has no attribute '{attr.name}'")
        if attr.ref_attr_name:
            raise NotFoldable(f"{node.op_type} attribute '{attr.name}' refers to a function attribute")
        out[attr.name] = helper.get_attribute_value(attr)
    for name, spec in schema.attributes.items():
        if name in out or name in _IGNORED_ATTRIBUTES:
            continue
        if spec.required:
            raise NotFoldable(f"{node.op_type} is missing its required attribute '{name}'")
        if spec.default_value.type != onnx.AttributeProto.UNDEFINED:
            out[name] = helper.get_attribute_value(spec.default_value)
    return out


def _check_inputs(node: onnx.NodeProto, schema, inputs: list) -> None:
    formal, variadic, constraints = schema.inputs, schema.variadic, schema.constraints
    if len(inputs) > len(formal) and not variadic:
        raise NotFoldable(f"{node.op_type}-{schema.since_version} takes at most {len(formal)} inputs")
    bound: dict[str, str] = {}
    for i, param in enumerate(formal):
        given = inputs[i:] if (variadic and i == len(formal) - 1) else inputs[i:i + 1]
        optional = param.option == onnx.defs.OpSchema.FormalParameterOption.Optional
        if not given or any(x is None for x in given):
            if optional and not (variadic and i == len(formal) - 1):
                continue
            raise NotFoldable(f"{node.op_type} is missing its input '{param.name}'")
        for x in given:
            name = _type_name(x.dtype)
            allowed = constraints.get(param.type_str, {param.type_str})
            if f"tensor({name})" not in allowed:
                raise NotFoldable(f"{node.op_type}-{schema.since_version} does not take {name} for '{param.name}'")
            if param.type_str in constraints and bound.setdefault(param.type_str, name) != name:
                raise NotFoldable(f"{node.op_type} inputs bound to {param.type_str} differ in type")


def evaluate(node: onnx.NodeProto, values: dict[str, np.ndarray], since_version: int) -> list[np.ndarray]:
    """The outputs of ``node`` given its constant inputs (by name; an empty name is an omitted input).

    ``since_version`` is the version of the operator's definition that applies at the model's opset.
    Anything not evaluated exactly as specified raises :class:`NotFoldable` with a sentence.
    """
    label = f"the constant {node.op_type} node '{node.name}'" if node.name else f"a constant {node.op_type} node"
    if node.domain not in DEFAULT_DOMAINS or node.op_type not in OPS:
        raise NotFoldable(f"{label} is not an operator evaluated here")
    try:
        inputs = [np.asarray(values[n]) if n else None for n in node.input]
    except KeyError as e:
        raise NotFoldable(f"{label} reads {e}, which is not a constant") from None
    while inputs and inputs[-1] is None:
        inputs.pop()
    try:
        schema = _schema(node.op_type, since_version)
        _check_inputs(node, schema, inputs)
        attrs = _attributes(node, schema)
        out = OPS[node.op_type](schema.since_version, inputs, attrs)
    except NotFoldable as e:
        raise NotFoldable(f"cannot evaluate {label}: {e}") from None
    return [np.asarray(out)]


def constant_value(node: onnx.NodeProto, since_version: int, read_tensor=None) -> np.ndarray:
    """The value of a Constant node: exactly one of its value attributes, as the specification types it."""
    schema = _schema("Constant", since_version)
    present = [a for a in node.attribute if a.name in schema.attributes]
    unknown = [a.name for a in node.attribute if a.name not in schema.attributes]
    if unknown:
        raise NotFoldable(f"Constant-{schema.since_version} has no attribute '{unknown[0]}'")
    if len(present) != 1:
        raise NotFoldable(f"a Constant node must set exactly one value attribute, this one sets {len(present)}")
    a = present[0]
    if a.name == "value":
        if a.t.data_type == TensorProto.STRING:
            raise NotFoldable("a string Constant is not a number")
        if read_tensor is not None:
            return read_tensor(a.t)
        return onnx.numpy_helper.to_array(a.t)
    if a.name == "value_float":
        return np.array(a.f, dtype=np.float32)
    if a.name == "value_floats":
        return np.array(a.floats, dtype=np.float32)
    if a.name == "value_int":
        return np.array(a.i, dtype=np.int64)
    if a.name == "value_ints":
        return np.array(a.ints, dtype=np.int64)
    if a.name == "sparse_value":
        raise NotFoldable("a sparse Constant is not evaluated here")
    raise NotFoldable(f"a Constant with '{a.name}' is not a number")


def constant_of_shape(node: onnx.NodeProto, shape: np.ndarray, since_version: int) -> np.ndarray:
    """ConstantOfShape: a tensor of ``shape`` (1-D int64, non-negative; empty -> a scalar) filled
    with the one element of ``value`` (float32 0 by default)."""
    schema = _schema("ConstantOfShape", since_version)
    _check_inputs(node, schema, [np.asarray(shape)])
    attrs = _attributes(node, schema)
    dims = _ints(np.asarray(shape), "ConstantOfShape shape")
    if any(d < 0 for d in dims):
        raise NotFoldable(f"ConstantOfShape shape {dims} has a negative dimension")
    _limit(dims, "ConstantOfShape")
    if "value" in attrs:
        fill = onnx.numpy_helper.to_array(attrs["value"])
        if fill.size != 1:
            raise NotFoldable(f"ConstantOfShape value must have one element, it has {fill.size}")
        allowed = schema.constraints[schema.outputs[0].type_str]
        if f"tensor({_type_name(fill.dtype)})" not in allowed:
            raise NotFoldable(f"ConstantOfShape-{schema.since_version} cannot make {_type_name(fill.dtype)}")
    else:
        fill = np.zeros(1, np.float32)
    return np.full(dims, fill.reshape(-1)[0], dtype=fill.dtype)
