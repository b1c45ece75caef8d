"""Verification's inputs: seeded random inputs from the model's declared inputs (each dynamic dimension
chosen once and named in a warning), ``--input-shape`` parsing, and inputs from an .npz file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from ..errors import VerifyError

DEFAULT_RANGE = (-1.0, 1.0)


DEFAULT_BATCH = 1


DEFAULT_DIM = 32


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``name:1x3x224x224`` -> ("name", (1, 3, 224, 224))."""
    name, sep, dims = text.rpartition(":")
    if not sep or not name:
        raise ValueError(f"--input-shape {text!r}: expected NAME:DIMS, for example input:1x3x224x224")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x")) if dims else ()
    except ValueError:
        raise ValueError(f"--input-shape {text!r}: dimensions must be integers joined by 'x'") from None
    if any(d < 0 for d in shape):
        raise ValueError(f"--input-shape {text!r}: dimensions must not be negative")
    return name, shape


def _np_dtype(elem_type: int):
    return helper.tensor_dtype_to_np_dtype(elem_type)


def feed_specs(feeds) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """The (dtype, shape) of each input given (as :func:`input_specs` tells them before they are made)."""
    return {k: (np.asarray(v).dtype, np.shape(v)) for k, v in feeds.items()}


def model_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The inputs a caller must feed: graph inputs that are not initializers."""
    inits = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in inits]


def make_inputs(
    model: onnx.ModelProto,
    shapes: dict[str, tuple[int, ...]] | None = None,
    value_range: tuple[float, float] = DEFAULT_RANGE,
    seed: int = 0,
    warn=None,
) -> dict[str, np.ndarray]:
    """Seeded inputs from the model's declared inputs.

    Floats are uniform in ``value_range`` (default [-1, 1]); integers uniform in [0, 4); bools random.
    A symbolic, unknown or negative dimension (paddle2onnx writes ``dim_value: -1`` for a dynamic
    axis) takes the user's shape for that input, else the same value for every use of the same name:
    1 on axis 0 (the batch), 32 elsewhere, with a warning naming it.
    """
    return random_inputs(input_specs(model, shapes, warn), value_range, seed)


def random_inputs(specs: dict[str, tuple[np.dtype, tuple[int, ...]]], value_range: tuple[float, float] = DEFAULT_RANGE,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """:func:`make_inputs` from :func:`input_specs` already made."""
    rng = np.random.default_rng(seed)
    return {name: _random(rng, name, dtype, shape, value_range) for name, (dtype, shape) in specs.items()}


def input_specs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | None = None,
                warn=None) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """The (dtype, shape) of each input :func:`make_inputs` makes, before it makes them."""
    shapes = dict(shapes or {})
    chosen: dict[str, int] = {}
    specs = {}
    for v in model_inputs(model):
        t = v.type.tensor_type
        if not v.type.HasField("tensor_type"):
            raise VerifyError(f"input '{v.name}' is not a tensor; pass inputs with --inputs")
        try:
            dtype = _np_dtype(t.elem_type)
        except (KeyError, ValueError, TypeError):
            raise VerifyError(f"input '{v.name}' has no known element type; pass inputs with --inputs") from None
        shape = shapes.pop(v.name) if v.name in shapes else _declared_shape(v, chosen, warn)
        specs[v.name] = (dtype, tuple(shape))
    if shapes:
        raise VerifyError(f"--input-shape names no input of the model: {', '.join(sorted(shapes))}")
    return specs


def _declared_shape(v: onnx.ValueInfoProto, chosen: dict[str, int], warn) -> tuple[int, ...]:
    """The input's declared shape, each dynamic dimension chosen once per name (``chosen``) and named
    in a warning."""
    shape = []
    for axis, d in enumerate(v.type.tensor_type.shape.dim):
        if d.HasField("dim_value") and d.dim_value >= 0:
            shape.append(d.dim_value)
            continue
        if d.HasField("dim_value"):
            key, what = f"{v.name}[{axis}]", f"dim_value {d.dim_value}"
        else:
            key, what = d.dim_param or f"{v.name}[{axis}]", d.dim_param or "unnamed"
        if key not in chosen:
            chosen[key] = DEFAULT_BATCH if axis == 0 else DEFAULT_DIM
            if warn:
                warn(
                    f"input '{v.name}' axis {axis} is dynamic ({what}): "
                    f"using {chosen[key]}; set it with --input-shape {v.name}:..."
                )
        shape.append(chosen[key])
    return tuple(shape)


def _random(rng: np.random.Generator, name: str, dtype, shape: tuple[int, ...],
            value_range: tuple[float, float]) -> np.ndarray:
    kind = np.dtype(dtype).kind if dtype is not None else "O"
    if kind == "f" or np.dtype(dtype).name == "bfloat16":
        lo, hi = value_range
        return rng.uniform(lo, hi, size=shape).astype(dtype)
    if kind in "iu":
        return rng.integers(0, 4, size=shape).astype(dtype)
    if kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    raise VerifyError(f"input '{name}' has dtype {np.dtype(dtype).name}; pass inputs with --inputs")


def load_inputs(path: str | os.PathLike, model: onnx.ModelProto | None = None) -> dict[str, np.ndarray]:
    """Inputs from an .npz file, one array per input name. Given the ``model``, only the keys it needs
    are read (an npz decompresses a key when it is read), each checked against the model's declared
    input (:func:`check_feed`) from its header, before it is decompressed."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            if model is None:
                return {k: data[k] for k in data.files}
            feeds = {}
            for v in model_inputs(model):
                if v.name not in data.files:
                    continue  # the caller names what is missing
                header = _header(data, v.name)
                if header is not None:
                    check_feed(v, *header, f"--inputs {path}")
                feeds[v.name] = data[v.name]
                check_feed(v, feeds[v.name].shape, feeds[v.name].dtype, f"--inputs {path}")
            return feeds
    except (OSError, ValueError, EOFError) as e:
        raise VerifyError(f"{path}: cannot read inputs ({str(e).splitlines()[0]})") from None


def _header(data, key: str) -> tuple[tuple[int, ...], np.dtype] | None:
    """(shape, dtype) of one array of an npz, from its header alone; None when it cannot be read so."""
    member = key + ".npy" if key + ".npy" in data.zip.namelist() else key
    with data.zip.open(member) as fp:
        version = np.lib.format.read_magic(fp)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read is None:
            return None
        shape, _, dtype = read(fp)
        return tuple(shape), np.dtype(dtype)


def check_feed(v: onnx.ValueInfoProto, shape: tuple[int, ...], dtype, given: str) -> None:
    """An input given (``--inputs``, arrays by name) against the model's declared input: the same
    element type and rank, and each fixed dimension; else a VerifyError (one line), before any work."""
    t = v.type.tensor_type
    if not v.type.HasField("tensor_type"):
        return
    try:
        want = np.dtype(_np_dtype(t.elem_type))
    except (KeyError, ValueError, TypeError):
        want = None
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else (d.dim_param or "?")
            for d in t.shape.dim]
    wrong_type = dtype is not None and want is not None and want.kind in "fiubc" and np.dtype(dtype) != want
    wrong_shape = t.HasField("shape") and (len(dims) != len(shape) or any(
        isinstance(d, int) and d != s for d, s in zip(dims, shape)))
    if wrong_type or wrong_shape:
        declared = f"{want.name if want is not None else 'its type'} {dims}".replace("'", "")
        what = f"{np.dtype(dtype).name} {list(shape)}" if dtype is not None else str(list(shape))
        raise VerifyError(f"{given}: input '{v.name}' is {what}, the model declares {declared}")


def check_shapes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> None:
    """``--input-shape`` against the model's declared inputs: a fixed dimension cannot change."""
    for v in model_inputs(model):
        if v.name in shapes:
            check_feed(v, shapes[v.name], None, f"--input-shape {v.name}:{'x'.join(map(str, shapes[v.name]))}")


def check_feeds(model: onnx.ModelProto, feeds: dict[str, np.ndarray], given: str) -> None:
    """:func:`check_feed` for each of the model's inputs that ``feeds`` has."""
    for v in model_inputs(model):
        if v.name in feeds:
            value = np.asarray(feeds[v.name])
            check_feed(v, value.shape, value.dtype, given)

