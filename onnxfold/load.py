"""Loading a model for folding: weights stay on disk until read, and a broken or hostile file is one
line (:class:`~onnxfold.errors.InputError`) here, before any work."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from onnx import external_data_helper

from .errors import InputError, first_line
from .protobuf import all_graphs, parse_in_place
from .tensors import Held, check_tensor, data_path, every_tensor, external_fields, is_utf8

LEFT_FROM = 1 << 16  # initializers of more bytes are left in the file (``held=``) until read
# external data files held open from the load (``held=``), at most: each read of a tensor there is then one
# pread on the file as it was loaded (timm mobileone_s0 dynamo: 1346 reads, each an open, fstat and close
# of the file at its path before); a model with a file per tensor keeps its other files read by path
HELD_DATA_FILES = 64


def load(path: str | os.PathLike, held: Held | None = None) -> tuple[onnx.ModelProto, bool]:
    """Load a model; tensors in external data files stay on disk until read (:func:`read_tensor`).

    ``held``: the large weights of the model's own file are left there too: each initializer of more
    than :data:`LEFT_FROM` bytes points to its bytes in the file (as external data at the file's own
    name), which ``held`` keeps open for the run's reads, as it keeps the external data files (up to
    :data:`HELD_DATA_FILES` of them). Parsing them costs more than the rest of a
    run's work on them: ResNet-50's 103 MB take 0.13 s to parse here (each fresh page of the copy is a
    fault), 0.01 s to point. The write copies them from the file, in the kernel.

    Returns (model, whether it has external data: the model's own file does not count). The data files
    are checked to exist and to be long enough for every tensor, so a broken model fails here, with one
    line.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not a model file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file, not an ONNX model")
    try:
        model, left = _read(path, held)
    except Exception as e:  # protobuf's DecodeError and friends: not a model, or truncated
        raise InputError(f"{path}: not a readable ONNX model ({first_line(e)})") from None
    if not model.HasField("graph") or not model.opset_import:
        raise InputError(f"{path}: not an ONNX model (no graph or no opset_import)")
    external = False
    sizes: dict[Path, int] = {}
    for tensor in left:  # its raw_data is the span it points to
        check_tensor(tensor, path, raw_length=int({e.key: e.value for e in tensor.external_data}["length"]))
    pointed = {id(t) for t in left}
    for tensor in every_tensor(model):
        if id(tensor) in pointed:
            continue
        check_tensor(tensor, path)
        if not external_data_helper.uses_external_data(tensor):
            continue
        external = True
        location, offset, length = external_fields(tensor, path)
        data = data_path(path.parent, location)
        if data not in sizes:
            if not data.is_file():
                raise InputError(f"{path}: its external data file {location!r} is missing")
            if held is not None and len(sizes) < HELD_DATA_FILES:  # read from here on as it is now
                sizes[data] = os.fstat(held.open(data)).st_size
            else:
                sizes[data] = data.stat().st_size
        if offset + length > sizes[data]:
            raise InputError(f"{path}: tensor {tensor.name!r} lies past the end of {location!r} (truncated?)")
    for graph in all_graphs(model.graph):
        _check_acyclic(graph.node, f"{path}: graph {graph.name!r}")
    for fn in model.functions:
        _check_acyclic(fn.node, f"{path}: function {fn.name!r}")
    return model, external


def _read(path: Path, held: Held | None) -> tuple[onnx.ModelProto, list[onnx.TensorProto]]:
    """The model at ``path``, and the initializers left in its file (``held``: see :func:`load`). Left
    only where every read will accept the file by its own name (:func:`data_path`): a link to a model in
    another folder resolves outside its own, so it is parsed."""
    if held is None or path.stat().st_size <= LEFT_FROM or not is_utf8(path.name) or not path.is_file() \
            or not _names_itself(path):
        return onnx.load(str(path), load_external_data=False), []
    fd = held.open(path)
    try:
        model, indices = parse_in_place(fd, LEFT_FROM, path.name)
    except Exception:  # noqa: BLE001 - not a message this walk reads (broken, or groups): protobuf's verdict
        return onnx.load(str(path), load_external_data=False), []
    initializers = model.graph.initializer
    return model, [initializers[i] for i in indices]


def _names_itself(path: Path) -> bool:
    try:
        data_path(path.parent, path.name)
    except InputError:
        return False
    return True


def _check_acyclic(nodes, where: str) -> None:
    """ONNX graphs are acyclic; a cycle (an Identity feeding itself, two nodes feeding each other)
    would make every walk up the graph endless, so such a file is refused."""
    producer = {}
    for i, node in enumerate(nodes):
        for o in node.output:
            if o:
                producer[o] = i
    state = [0] * len(nodes)  # 0 unseen, 1 on the current path, 2 done
    for root in range(len(nodes)):
        if state[root]:
            continue
        stack = [(root, iter(nodes[root].input))]
        state[root] = 1
        while stack:
            i, inputs = stack[-1]
            for name in inputs:
                j = producer.get(name)
                if j is None or state[j] == 2:
                    continue
                if state[j] == 1:
                    raise InputError(f"{where} has a cycle through {nodes[j].op_type} output {name!r}: "
                                     "not a valid ONNX graph")
                state[j] = 1
                stack.append((j, iter(nodes[j].input)))
                break
            else:
                state[i] = 2
                stack.pop()

