"""What verification needs in memory, estimated before it runs, and the budget it must fit (README:
"How verification decides"): the inputs, and the graph outputs and exposed fold tensors of both models
(their shapes inferred from the inputs' shapes), plus the weights that onnxruntime holds for each model.
onnxruntime's own intermediate tensors are not counted: the estimate is a floor, enough to refuse a run
that cannot fit before it is started (a 3000x3000 input, a batch of 10^4) rather than let the kernel's
OOM killer end it."""

from __future__ import annotations

import math
import mmap
import os

import numpy as np
import onnx
from onnx import numpy_helper

from .. import const_eval
from ..errors import VerifyError
from ..protobuf import DEFAULT_DOMAINS, constant_tensor, copy_fields, without_weights

GIB = 1 << 30
SMALL = 4096  # initializers up to this many bytes keep their values for shape inference (shapes, axes)


CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def default_budget() -> float:
    """The machine's memory, or the container's limit (cgroup) where that is lower, in GiB
    (``--verify-memory``'s default); 0 (no limit) where it is unknown."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 0.0
    for path in CGROUP_LIMITS:
        try:
            with open(path) as fh:
                text = fh.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total / GIB


def estimate(model: onnx.ModelProto, specs: dict[str, tuple[np.dtype, tuple[int, ...]]],
             tensors: list[str], sizes: dict[str, int] | None = None) -> tuple[int, str]:
    """(bytes verification needs at least, how that adds up): twice (the two models) the inputs, the
    sizes of ``tensors`` (graph outputs and exposed fold tensors) that shape inference can tell (or
    ``sizes`` tells, inferred already), and the weights."""
    inputs = sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize for dtype, shape in specs.values())
    weights = sum(_bytes(t) for t in model.graph.initializer)
    if sizes is None:
        sizes = _inferred(model, specs, tensors)
    outputs = sum(sizes.get(name, 0) for name in set(tensors))
    total = 2 * (inputs + outputs + weights)
    return total, (f"2 models x ({inputs / GIB:.2f} GiB of inputs + {outputs / GIB:.2f} GiB of outputs and fold "
                   f"tensors + {weights / GIB:.2f} GiB of weights)")


def check_budget(model, specs, tensors, budget_gib: float | None, name: str,
                 sizes: dict[str, int] | None = None) -> None:
    """Refuse (VerifyError, one line) when the estimate passes ``budget_gib`` (None or 0: no limit).
    ``sizes``: as :func:`estimate` takes them (inferred already)."""
    if not budget_gib:
        return
    need, how = estimate(model, specs, tensors, sizes)
    if need > budget_gib * GIB:
        raise VerifyError(f"{name}: verification needs at least {need / GIB:.1f} GiB ({how}), above its memory "
                          f"budget of {budget_gib:g} GiB (--verify-memory GIB, 0: no limit); use smaller inputs "
                          "(--input-shape) or skip it (--no-verify)")


def known_dtype(elem_type: int) -> np.dtype | None:
    """The numpy dtype of an ONNX element type, None where numpy has none (a string, an unknown number)."""
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, ValueError, TypeError):
        return None


def _bytes(t: onnx.TensorProto) -> int:
    for entry in t.external_data:
        if entry.key == "length":
            return int(entry.value)
    if t.raw_data:
        return len(t.raw_data)
    dtype = known_dtype(t.data_type)
    return int(np.prod(t.dims, dtype=np.int64)) * (dtype.itemsize if dtype is not None else 4)


def _inferred(model: onnx.ModelProto, specs, tensors: list[str]) -> dict[str, int]:
    """Bytes of each of ``tensors`` whose shape inference from the inputs' shapes tells in full."""
    return {name: size for name, (_, size) in inferred(model, specs, tensors).items()}


def inferred(model: onnx.ModelProto, specs, tensors: list[str]) -> dict[str, tuple[int, int]]:
    """(element type, bytes) of each of ``tensors`` whose shape inference from the inputs' shapes tells
    both in full (:func:`inferred_shapes`)."""
    return sized(inferred_shapes(model, specs, tensors))


def sized(shapes: dict[str, tuple[int, tuple[int, ...]]]) -> dict[str, tuple[int, int]]:
    """(element type, bytes) of each of ``shapes`` (as :func:`inferred_shapes` gives them) of a known dtype."""
    return {name: (elem_type, math.prod(shape) * dtype.itemsize) for name, (elem_type, shape) in shapes.items()
            if (dtype := known_dtype(elem_type)) is not None}


FOLD_PASSES = 3  # inference runs again at most so often with constants folded, while that folds more


def inferred_shapes(model: onnx.ModelProto, specs, tensors: list[str],
                    every: bool = False) -> dict[str, tuple[int, tuple[int, ...]]]:
    """(element type, shape) of each of ``tensors`` whose shape inference from the inputs' shapes tells
    both in full. Where inference alone leaves some unknown, it runs again with the small constants made
    by nodes folded first (:func:`_fold_small_constants`: 0.01-0.04 s of Python, which most models do
    without), a Shape of a tensor the last inference sized among them, while that folds more (up to
    :data:`FOLD_PASSES` times: PaddleOCR's Reshape targets are Concats of Slices of the Shape of an
    activation made after the last such Reshape), and the answers are merged. ``every``: of every tensor
    the inference so run tells in full, not only ``tensors`` (which still decide whether it runs again)."""
    wanted = set(tensors)
    known: dict[str, tuple[int, tuple[int, ...]]] = {  # large Constant nodes' (inference takes them as given)
        n.output[0]: (t.data_type, tuple(t.dims)) for n in model.graph.node if (t := _large_constant(n)) is not None}
    most = -1
    for attempt in range(1 + FOLD_PASSES):
        graph = _light_graph(model, specs)
        folded: dict[str, np.ndarray] = {}
        if attempt:
            folded = _fold_small_constants(graph, specs, _default_opset(model), model.ir_version < 4, known)
            if len(folded) <= most:
                break  # nothing more folded: inference would tell what it told
            most = len(folded)
        known.update({name: (int(onnx.helper.np_dtype_to_tensor_dtype(v.dtype)), tuple(v.shape))
                      for name, v in folded.items()})  # constants now, known by their values
        light = onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import, graph=graph,
                                functions=model.functions)
        try:
            result = onnx.shape_inference.infer_shapes(light, data_prop=True).graph
        except Exception:  # noqa: BLE001 - shape inference refuses some valid models: nothing is known then
            continue
        known.update(_shaped(result, None))
        if wanted <= known.keys():
            break
    return known if every else {name: v for name, v in known.items() if name in wanted}


def _shaped(graph: onnx.GraphProto, wanted: set[str] | None) -> dict[str, tuple[int, tuple[int, ...]]]:
    """(element type, shape) of each of ``wanted`` (None: of any tensor) that the inferred ``graph`` types
    and shapes in full."""
    known = {}
    for v in (*graph.output, *graph.value_info):
        t = v.type.tensor_type
        if wanted is not None and v.name not in wanted:
            continue
        if not v.type.HasField("tensor_type") or not t.HasField("shape") or not t.elem_type:
            continue
        if all(d.HasField("dim_value") for d in t.shape.dim):
            known[v.name] = (t.elem_type, tuple(int(d.dim_value) for d in t.shape.dim))
    return known


def _light_graph(model: onnx.ModelProto, specs) -> onnx.GraphProto:
    """The main graph for inference: its inputs of the shapes in ``specs``, its large values by their shapes,
    a large Constant node's among them (paddle2onnx keeps 10.8 MB of PP-OCRv4 rec's weights in Constant
    nodes, which every inference pass copied, serialized and parsed again: 0.23 -> 0.07 s of the child's
    inference there)."""
    graph = onnx.GraphProto(output=model.graph.output)
    for node in model.graph.node:
        value = _large_constant(node)
        if value is None:
            graph.node.append(node)
            continue
        graph.initializer.append(onnx.TensorProto(name=node.output[0], data_type=value.data_type, dims=value.dims))
        if model.ir_version < 4:  # where inference reads an initializer only as a graph input too
            graph.input.append(onnx.helper.make_tensor_value_info(node.output[0], value.data_type, list(value.dims)))
    for v in model.graph.input:
        if v.name in specs:
            dtype, shape = specs[v.name]
            graph.input.append(onnx.helper.make_tensor_value_info(
                v.name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), list(shape)))
        else:
            graph.input.append(v)
    for t in model.graph.initializer:  # large values go: their shapes are enough
        if t.name in specs:  # an input's default value (IR 3): the inputs made replace it
            continue
        if len(t.raw_data) <= SMALL and not t.external_data:
            graph.initializer.append(t)
        else:
            graph.initializer.append(onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims))
    return graph


def _large_constant(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The tensor of a Constant node of more than ``SMALL`` bytes (a weight: its type and shape are what
    inference needs of it), else None."""
    value = constant_tensor(node)
    return value if value is not None and value.ByteSize() > 2 * SMALL else None


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 1)


def _fold_small_constants(graph: onnx.GraphProto, specs, opset: int, listed: bool,
                          sized: dict[str, tuple[int, tuple[int, ...]]] | None = None) -> dict[str, np.ndarray]:
    """Replace in ``graph`` (inference's copy) each node whose outputs are small constants (``SMALL``
    bytes at most) by initializers holding them: onnx's data propagation stops at Reshape, Transpose,
    ConstantOfShape and the like, and with it the shapes of everything after (torch's dynamo export
    gives ReduceMean its axes through a Reshape of Constants; Hugging Face's legacy exports pad through
    ConstantOfShape -> Concat -> Reshape -> Slice -> Transpose -> Cast): timm's efficientnet_b0 dynamo
    export had 5 of its 187 candidate tensors sized, now all. Shape and Size of a graph input (with
    ``specs``' shape) or an initializer are constants too. Evaluated as the spec says
    (:mod:`onnxfold.const_eval`); what it declines stays a node. Only shapes depend on this: sizes for
    the memory estimate and the early run's exposure, which onnxruntime checks again. ``listed``: each
    initializer is a graph input too (IR version 3, where inference ignores one that is not). Returns
    the values made, by name (inference no longer reports them: they are initializers). ``sized``: (element
    type, shape) of tensors an inference of this graph told, so that a Shape of one is a constant too."""
    values = _Values()
    shapes: dict[str, tuple[int, ...]] = {k: shape for k, (_, shape) in (sized or {}).items()}
    types = {k: elem for k, (elem, _) in (sized or {}).items()}
    shapes.update({k: tuple(shape) for k, (_, shape) in specs.items()})
    types.update({k: onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)) for k, (dtype, _) in specs.items()})
    for t in graph.initializer:
        shapes[t.name], types[t.name] = tuple(t.dims), t.data_type
        if not t.external_data and t.data_location != onnx.TensorProto.EXTERNAL and t.ByteSize() <= 2 * SMALL:
            values.unread[t.name] = t
    since: dict[str, int] = {}
    kept, folded = [], {}
    for node in graph.node:
        out = _constant_outputs(node, values, shapes, types, since, opset)
        if out is None:
            kept.append(node)
            continue
        for name, value in zip(node.output, out):
            values[name], shapes[name], folded[name] = value, value.shape, value
            graph.initializer.append(numpy_helper.from_array(value, name))
            if listed:
                graph.input.append(onnx.helper.make_tensor_value_info(
                    name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape)))
    del graph.node[:]
    graph.node.extend(kept)
    return folded


class _Values(dict):
    """Constant values by name; a small initializer's (``unread``) is read when first asked for."""

    def __init__(self):
        super().__init__()
        self.unread: dict[str, onnx.TensorProto] = {}

    def __missing__(self, name: str) -> np.ndarray:
        value = numpy_helper.to_array(self.unread.pop(name))
        self[name] = value
        return value

    def __contains__(self, name: object) -> bool:
        if super().__contains__(name):
            return True
        t = self.unread.get(name) if isinstance(name, str) else None
        if t is None:
            return False
        try:
            value = self[name]
        except Exception:  # noqa: BLE001 - a value it cannot read: not a constant here
            return False
        if value.size != math.prod(t.dims):
            del self[name]
            return False
        return True


def _constant_outputs(node, values: _Values, shapes, types, since: dict[str, int],
                      opset: int) -> list[np.ndarray] | None:
    """The node's outputs when they are small constants (see :func:`_fold_small_constants`), else None."""
    if node.domain not in DEFAULT_DOMAINS or not node.output or not all(node.output) \
            or (node.op_type not in const_eval.OPS and node.op_type not in ("Constant", "ConstantOfShape")):
        return None
    op = node.op_type
    if op not in since:
        try:
            since[op] = onnx.defs.get_schema(op, opset).since_version
        except Exception:  # noqa: BLE001 - an operator onnx does not know at this opset
            since[op] = 0
    if not since[op]:
        return None
    inputs = [i for i in node.input if i]
    try:
        if op == "Constant":
            if node.ByteSize() > 2 * SMALL:  # a weight, not a shape: not read
                return None
            out = [const_eval.constant_value(node, since[op])]
        elif op == "ConstantOfShape":
            if not inputs or inputs[0] not in values or math.prod(values[inputs[0]].tolist()) * 8 > SMALL:
                return None  # (a weight the ONNX backend's light models make so: not made to be dropped)
            out = [const_eval.constant_of_shape(node, values[inputs[0]], since[op])]
        elif op in ("Shape", "Size") and inputs and inputs[0] not in values and inputs[0] in shapes:
            probe = np.broadcast_to(np.zeros((), np.uint8), shapes[inputs[0]])  # only its shape is read
            out = const_eval.evaluate(node, {inputs[0]: probe}, since[op])
        elif op == "CastLike" and len(inputs) == 2 and inputs[0] in values and inputs[1] in types:
            like = np.empty(0, onnx.helper.tensor_dtype_to_np_dtype(types[inputs[1]]))
            out = const_eval.evaluate(node, {inputs[0]: values[inputs[0]], inputs[1]: like}, since[op])
        elif inputs and all(i in values for i in inputs):
            out = const_eval.evaluate(node, {i: values[i] for i in inputs}, since[op])
        else:
            return None
    except Exception:  # noqa: BLE001 - declined (NotFoldable) or not evaluable: it stays a node
        return None
    return out if all(np.asarray(v).nbytes <= SMALL for v in out) else None


LEFT_OUT = "(left out: only its size is planned with)"


def structure_of_file(path) -> onnx.ModelProto:
    """:func:`structure` of the model at ``path``, read from the file's wire format without parsing its
    weights (verification's child plans its early run with it while the parent loads the model)."""
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        light = without_weights(buf, SMALL, LEFT_OUT)
    model = onnx.ModelProto()
    model.ParseFromString(light)
    return model


def structure(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` to plan a verification with, without its weights: every field, but each of the
    main graph's initializers of more than ``SMALL`` bytes of data only by its name, type, shape and size
    (an external data entry ``length``, which :func:`estimate` reads). The caller that has the model in
    memory hands it to :func:`~onnxfold.verification.verify` (``structure=``), which then does not read
    the original's file again (ResNet-50, 103 MB: 0.1 s)."""
    out = onnx.ModelProto()
    copy_fields(model, out, skip=("graph",))
    copy_fields(model.graph, out.graph, skip=("initializer",))
    for t in model.graph.initializer:
        if len(t.raw_data) <= SMALL:
            out.graph.initializer.append(t)
            continue
        light = out.graph.initializer.add()
        copy_fields(t, light, skip=("raw_data",))
        light.data_location = onnx.TensorProto.EXTERNAL
        light.external_data.add(key="location", value=LEFT_OUT)
        light.external_data.add(key="length", value=str(len(t.raw_data)))
    return out
