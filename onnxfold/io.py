"""Loading and saving models: external data, clear errors for bad input, atomic writes."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, helper, numpy_helper

from .errors import FoldError

PROTOBUF_LIMIT = 2**31 - 1


class InputError(FoldError):
    """A problem with what the user gave us: one line, no traceback, exit code 2."""


def load(path: str | os.PathLike) -> tuple[onnx.ModelProto, bool]:
    """Load a model; tensors in external data files stay on disk until read (:func:`read_tensor`).

    Returns (model, whether it has external data). The data files are checked to exist and to be
    long enough for every tensor, so a broken model fails here, with one line.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not a model file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file, not an ONNX model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends: not a model, or truncated
        raise InputError(f"{path}: not a readable ONNX model ({_first_line(e)})") from None
    if not model.HasField("graph") or not model.opset_import:
        raise InputError(f"{path}: not an ONNX model (no graph or no opset_import)")
    external = False
    sizes: dict[Path, int] = {}
    for tensor in _every_tensor(model):
        check_tensor(tensor, path)
        if not external_data_helper.uses_external_data(tensor):
            continue
        external = True
        location, offset, length = external_fields(tensor, path)
        data = _data_path(path.parent, location)
        if data not in sizes:
            if not data.is_file():
                raise InputError(f"{path}: its external data file {location!r} is missing")
            sizes[data] = data.stat().st_size
        if offset + length > sizes[data]:
            raise InputError(f"{path}: tensor {tensor.name!r} lies past the end of {location!r} (truncated?)")
    for graph in all_graphs(model.graph):
        _check_acyclic(graph.node, f"{path}: graph {graph.name!r}")
    for fn in model.functions:
        _check_acyclic(fn.node, f"{path}: function {fn.name!r}")
    return model, external


_MAX_ELEMENTS = 1 << 40  # more than any real model: a larger count is a corrupt or hostile file


def _every_tensor(model: onnx.ModelProto):
    """Every TensorProto of the model: initializers, attribute values, sparse initializers' parts."""
    yield from external_data_helper._get_all_tensors(model)
    for graph in all_graphs(model.graph):
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices


def all_graphs(graph: onnx.GraphProto):
    """``graph`` and every subgraph below it (If/Loop/Scan bodies, at any depth)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from all_graphs(attr.g)
            for g in attr.graphs:
                yield from all_graphs(g)


def nbytes(tensor: onnx.TensorProto, where="") -> int:
    """The size of a tensor's data in bytes, from its dims and data type (what external data must hold)."""
    count = _count(tensor, where)
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    except Exception:
        raise InputError(f"{where}tensor {tensor.name!r} has an unknown data type ({tensor.data_type})") from None
    if tensor.data_type in _FOUR_BIT:
        return (count + 1) // 2
    if dtype.kind in "OUS":
        raise InputError(f"{where}tensor {tensor.name!r}: strings cannot be stored as raw or external data")
    return count * dtype.itemsize


def _count(tensor: onnx.TensorProto, where="") -> int:
    count = 1
    for d in tensor.dims:
        if d < 0:
            raise InputError(f"{where}tensor {tensor.name!r} has a negative dimension ({d})")
        count *= d
        if count > _MAX_ELEMENTS:
            raise InputError(f"{where}tensor {tensor.name!r} has dims {list(tensor.dims)}: "
                             f"more than 2^40 elements, not a real weight")
    return count


_FOUR_BIT = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n)}


def check_tensor(tensor: onnx.TensorProto, path="") -> None:
    """One line for a tensor whose size cannot be right: dims too large, raw_data not matching them."""
    where = f"{path}: " if path else ""
    external = external_data_helper.uses_external_data(tensor)
    if not (tensor.HasField("raw_data") or external):  # typed fields (float_data, string_data, ...)
        _count(tensor, where)
        return
    size = nbytes(tensor, where)
    if tensor.HasField("raw_data") and not external and len(tensor.raw_data) != size:
        raise InputError(f"{where}tensor {tensor.name!r} has {len(tensor.raw_data)} bytes of raw_data, but its dims "
                         f"{list(tensor.dims)} need {size}")


def external_fields(tensor: onnx.TensorProto, path="") -> tuple[str, int, int]:
    """(location, offset, length) of an external tensor, each field checked; ``length`` defaults to the
    tensor's size from its dims and dtype (the key is optional in the spec)."""
    where = f"{path}: " if path else ""
    fields = {}
    for entry in tensor.external_data:
        fields[entry.key] = entry.value
    location = fields.get("location", "")
    if not location or "\0" in location or len(location) > 4096:
        raise InputError(f"{where}tensor {tensor.name!r} has a bad external data location {location[:80]!r}")
    numbers = {}
    for key in ("offset", "length"):
        text = fields.get(key)
        if text is None:
            continue
        if not (text.isascii() and text.isdigit()) or len(text) > 19:
            raise InputError(f"{where}tensor {tensor.name!r}: external data {key} {text[:40]!r} is not a "
                             "non-negative integer")
        numbers[key] = int(text)
    size = nbytes(tensor, where)
    length = numbers.get("length", size)
    if length != size:
        raise InputError(f"{where}tensor {tensor.name!r}: external data length {length} does not match its dims "
                         f"{list(tensor.dims)} ({size} bytes)")
    return location, numbers.get("offset", 0), length


def inline_external(tensor: onnx.TensorProto, base_dir) -> None:
    """Read a tensor's external bytes into ``raw_data`` (checked like every other read)."""
    location, offset, length = external_fields(tensor)
    with open(_data_path(base_dir, location), "rb") as f:
        f.seek(offset)
        raw = f.read(length)
    if len(raw) != length:
        raise InputError(f"tensor {tensor.name!r}: its external data is truncated")
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT
    tensor.raw_data = raw


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


def _data_path(base_dir, location: str) -> Path:
    base = Path(base_dir).resolve()
    data = (base / location).resolve()
    if base != data and base not in data.parents:
        raise InputError(f"external data location {location!r} points outside the model's folder")
    return data


def read_tensor(tensor: onnx.TensorProto, base_dir, sink: DataSink | None = None) -> np.ndarray:
    """A tensor's value; external data is read from its file (just this tensor's bytes).

    A tensor that ``sink`` wrote during this run (a fold's output, folded again by a later fold) is
    read back from the sink's file, wherever that is: not from the input's folder.
    """
    if not external_data_helper.uses_external_data(tensor):
        return numpy_helper.to_array(tensor)
    if sink is not None and sink.owns(tensor):
        return sink.read(tensor)
    if base_dir is None:
        raise InputError(f"tensor {tensor.name!r} has external data, but the model's folder is not known")
    location, offset, length = external_fields(tensor)
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    if tensor.data_type in _RAW_TYPES and dtype.byteorder in "=<|" and np.little_endian:
        count = int(np.prod(tensor.dims, dtype=np.int64))
        path = _data_path(base_dir, location)
        if offset + length > path.stat().st_size:
            raise InputError(f"tensor {tensor.name!r}: its external data is truncated")
        if count == 0:
            return np.zeros(tuple(tensor.dims), dtype=dtype)
        # Mapped, not read: a fold touches each page once, a block of rows at a time.
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(tensor.dims))
    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    inline_external(copy, base_dir)
    return numpy_helper.to_array(copy)


_RAW_TYPES = {
    onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT8, onnx.TensorProto.UINT8,
}


class DataSink:
    """The output's external data file: folded tensors are written once, as the fold makes them, and
    the tensors it does not change are copied as bytes from the input's data files at save time."""

    ALIGN = 4096  # large tensors start on a page boundary, so onnxruntime can map them
    THRESHOLD = 1024  # smaller tensors stay inline in the .onnx file

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = open(self.path, "wb")
        self.offset = 0
        self.written: dict[str, tuple[int, int]] = {}  # tensor name -> (offset, length) in this file

    def _reserve(self, nbytes: int) -> int:
        if nbytes >= 1 << 20 and self.offset % self.ALIGN:
            pad = self.ALIGN - self.offset % self.ALIGN
            self.file.write(b"\0" * pad)
            self.offset += pad
        start = self.offset
        self.offset += nbytes
        return start

    def _point(self, tensor: onnx.TensorProto, start: int, nbytes: int) -> None:
        tensor.ClearField("raw_data")
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(start)), ("length", str(nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.written[tensor.name] = (start, nbytes)

    def owns(self, tensor: onnx.TensorProto) -> bool:
        """Whether ``tensor`` points into this file (this run wrote it)."""
        if tensor.name not in self.written or not external_data_helper.uses_external_data(tensor):
            return False
        info = external_data_helper.ExternalDataInfo(tensor)
        return info.location == self.path.name and (info.offset, info.length) == self.written[tensor.name]

    def read(self, tensor: onnx.TensorProto) -> np.ndarray:
        """A tensor this sink wrote, mapped from its file (flushed first)."""
        start, nbytes = self.written[tensor.name]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
        shape = tuple(tensor.dims)
        if nbytes == 0:
            return np.zeros(shape, dtype=dtype)
        self.file.flush()
        return np.memmap(self.path, dtype=dtype, mode="r", offset=start, shape=shape)

    def compact(self, tensors) -> None:
        """Drop the bytes of tensors no longer in the model (a weight folded twice is written twice).

        ``tensors``: every tensor of the model. The live ones are copied, in order, to a fresh file
        that takes this one's place; nothing is copied when nothing is dead.
        """
        live = [t for t in tensors if self.owns(t)]
        if sum(n for _, n in (self.written[t.name] for t in live)) == self.offset:
            return
        old_path = self.path.with_name(self.path.name + ".old")
        self.file.close()
        os.replace(self.path, old_path)
        self.file = open(self.path, "wb")
        self.offset = 0
        moved = {t.name: self.written[t.name] for t in live}
        self.written = {}
        with open(old_path, "rb") as src:
            for t in live:
                start, nbytes = moved[t.name]
                new = self._reserve(nbytes)
                src.seek(start)
                self.file.flush()
                _copy(src, self.file, nbytes)
                self._point(t, new, nbytes)
        old_path.unlink()

    def stream(self, name: str, shape, dtype, blocks) -> onnx.TensorProto:
        """A new tensor written block by block (rows of a C-order array). On an error the data file is
        cut back, so a declined fold leaves nothing behind."""
        itemsize = np.dtype(dtype).itemsize
        nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize
        mark = self.offset
        start = self._reserve(nbytes)
        try:
            for block in blocks:
                block = np.ascontiguousarray(block)
                self.file.write(block.data.cast("B") if block.dtype.kind == "f" else block.tobytes())
        except BaseException:
            self.rollback(mark)
            raise
        tensor = onnx.TensorProto()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        tensor.dims.extend(shape)
        self._point(tensor, start, nbytes)
        return tensor

    def rollback(self, offset: int) -> None:
        self.file.seek(offset)
        self.file.truncate()
        self.offset = offset

    def take(self, tensor: onnx.TensorProto, base_dir) -> None:
        """Move a tensor's bytes into the data file: copied from the input's data file, or from memory."""
        if self.owns(tensor):
            return
        if external_data_helper.uses_external_data(tensor):
            location, offset, nbytes = external_fields(tensor)  # exactly the tensor's bytes, `length` or not
            with open(_data_path(base_dir, location), "rb") as src:
                start = self._reserve(nbytes)
                src.seek(offset)
                self.file.flush()
                _copy(src, self.file, nbytes)
            self._point(tensor, start, nbytes)
        elif tensor.HasField("raw_data") and len(tensor.raw_data) >= self.THRESHOLD:
            raw = tensor.raw_data
            start = self._reserve(len(raw))
            self.file.write(raw)
            self._point(tensor, start, len(raw))

    def close(self) -> None:
        self.file.close()


def _copy(src, dst, nbytes: int, chunk: int = 16 << 20) -> None:
    """Copy ``nbytes`` from ``src``'s position to ``dst``'s: in the kernel where it can, else in chunks."""
    left = nbytes
    if hasattr(os, "copy_file_range"):
        dst.flush()
        src_off, dst_off = src.tell(), dst.tell()
        try:
            while left:
                n = os.copy_file_range(src.fileno(), dst.fileno(), min(left, 1 << 30), src_off, dst_off)
                if n <= 0:
                    break
                left -= n
                src_off += n
                dst_off += n
        except OSError:  # another filesystem or an old kernel: fall back to read/write
            pass
        src.seek(src_off)
        dst.seek(dst_off)
    while left:
        buf = src.read(min(chunk, left))
        if not buf:
            raise InputError(f"{src.name}: external data is truncated")
        dst.write(buf)
        left -= len(buf)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


@contextlib.contextmanager
def staged(path: str | os.PathLike):
    """A temporary folder beside ``path``; :func:`commit` moves what was written there into place.

    Nothing is left behind when the block raises (an interruption included: SIGINT and SIGTERM raise
    in the CLI). A fold killed outright leaves its folder, ``.<name>.onnxfold-<pid>-<random>``; the next
    run to the same folder removes it once that pid no longer runs.
    """
    from .paths import TEMP_MARK, remove_stale_temps

    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{path}: the folder {parent} is not writable")
    if path.is_dir():
        raise InputError(f"{path}: is a directory")
    remove_stale_temps(parent)
    tmp = None
    try:
        with signals_deferred():  # a signal waits until the folder is made and known here, or removed
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name[:64]}{TEMP_MARK}{os.getpid()}-", dir=parent))
        yield tmp / path.name
    finally:
        if tmp is not None:
            with signals_deferred():
                shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def signals_deferred():
    """SIGINT and SIGTERM wait (blocked, not lost) until the block is done."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def write(model: onnx.ModelProto, staged_path: Path, *, base_dir=None, sink: DataSink | None = None,
          external: bool | None = None) -> list[Path]:
    """Write ``model`` (consumed: do not use it afterwards) to its staging path.

    ``external``: True writes external data, False one file, None one file unless it would pass
    2 GiB. Tensors the fold streamed to ``sink`` are written once more only for a single-file output,
    read back a tensor at a time; unchanged tensors of the input's data files are copied as bytes.
    Returns the files written, the model first.
    """
    if external is not True:
        try:
            return [_write_inline(model, staged_path, base_dir, sink)]
        except _TooLarge:
            if external is False:
                raise InputError("the folded model is over 2 GiB: it needs external data "
                                 "(--external-data always)") from None
    if sink is None:
        sink = DataSink(staged_path.parent / (staged_path.name + ".data"))
    for tensor in external_data_helper._get_attribute_tensors(model):
        if external_data_helper.uses_external_data(tensor):  # Constant values stay inline
            inline_external(tensor, base_dir)
    _inline_sparse(model, base_dir)
    sink.compact(external_data_helper._get_initializer_tensors(model))
    for tensor in external_data_helper._get_initializer_tensors(model):
        sink.take(tensor, base_dir)
    sink.close()
    with open(staged_path, "wb") as f:
        f.write(model.SerializeToString())
    return [staged_path, sink.path]


def copy_fields(src, dst, skip=()) -> None:
    """Copy a protobuf message's fields into ``dst``, except those named in ``skip`` (a shallow
    way to build a model around a graph of one's own, without copying the weights)."""
    for field, value in src.ListFields():
        if field.name in skip:
            continue
        if hasattr(value, "extend"):  # a repeated field
            getattr(dst, field.name).extend(value)
        elif hasattr(value, "CopyFrom"):  # a message
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def _inline_sparse(model: onnx.ModelProto, base_dir) -> None:
    """Sparse initializers keep their data: external parts are read in (they are small by nature)."""
    for graph in all_graphs(model.graph):
        for sparse in graph.sparse_initializer:
            for part in (sparse.values, sparse.indices):
                if external_data_helper.uses_external_data(part):
                    inline_external(part, base_dir)


class _TooLarge(Exception):
    pass


def _key(field: int, wire: int = 2) -> bytes:
    return _varint(field << 3 | wire)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9  # field numbers in onnx.proto


def _write_inline(model: onnx.ModelProto, path: Path, base_dir, sink: DataSink | None) -> Path:
    """One file, written in pieces in protobuf's wire format.

    Protobuf serializes a message as its fields, in any order, and repeated fields may be appended:
    so the model is the model's other fields, then the graph (without the streamed initializers),
    then each streamed initializer appended to the graph, its bytes read back from the data file.
    No copy of the whole model is made in memory (``onnx.save`` makes one, and sizes it twice).
    """
    taken: list[onnx.TensorProto] = []
    try:
        return _write_pieces(model, path, base_dir, sink, taken)
    except _TooLarge:
        # The streamed initializers were taken out of the graph: put them back (still pointing to the
        # sink's data file), so the caller can write the model with external data instead.
        model.graph.initializer.extend(taken)
        raise


def _write_pieces(model, path: Path, base_dir, sink: DataSink | None, taken: list) -> Path:
    graph = model.graph
    streamed_names = sink.written if sink is not None else set()
    streamed = []
    for i in reversed(range(len(graph.initializer))):
        t = graph.initializer[i]
        if t.name in streamed_names and external_data_helper.uses_external_data(t):
            kept = onnx.TensorProto()
            kept.CopyFrom(t)
            taken.append(kept)
            header = onnx.TensorProto()
            header.CopyFrom(t)
            _, offset, length = external_fields(t)
            streamed.append((header, offset, length))
            del graph.initializer[i]
    streamed.reverse()
    for tensor in external_data_helper._get_all_tensors(model):
        if external_data_helper.uses_external_data(tensor):  # the input's data: read in, one tensor at a time
            inline_external(tensor, base_dir)
    _inline_sparse(model, base_dir)
    pieces = []
    for header, _, length in streamed:
        header.ClearField("data_location")
        del header.external_data[:]
        head = header.SerializeToString() + _key(_TENSOR_RAW_DATA) + _varint(length)
        pieces.append((head, length))
    try:
        graph_bytes = graph.SerializeToString()
    except Exception as e:  # protobuf refuses past 2 GiB
        raise _TooLarge() from e
    entries = sum(len(_key(_GRAPH_INITIALIZER)) + len(_varint(len(h) + n)) + len(h) + n for h, n in pieces)
    graph_len = len(graph_bytes) + entries
    rest = onnx.ModelProto()
    copy_fields(model, rest, skip=("graph",))
    head = rest.SerializeToString()
    if len(head) + graph_len + 16 > PROTOBUF_LIMIT:
        raise _TooLarge()
    if sink is not None:
        sink.file.flush()
    with open(path, "wb") as out:
        out.write(head)
        out.write(_key(_MODEL_GRAPH) + _varint(graph_len))
        out.write(graph_bytes)
        del graph_bytes
        if pieces:
            assert sink is not None  # only streamed tensors make pieces
            with open(sink.path, "rb") as data:
                for (h, n), (_, offset, _) in zip(pieces, streamed):
                    out.write(_key(_GRAPH_INITIALIZER) + _varint(len(h) + n) + h)
                    data.seek(offset)
                    _copy(data, out, n)
    return path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # a folder on a filesystem that cannot sync one: nothing more to do
        pass
    finally:
        os.close(fd)


def commit(files: list[Path], destination: Path, *, mode: int | None = None, stale=()) -> None:
    """Move staged files into place so that ``destination`` always holds a whole model, old or new.

    The data file goes first, under its own name (a name neither the input nor the model now at
    ``destination`` reads: see :func:`onnxfold.paths.plan_output`), then the model replaces the old
    one in one rename, then the old model's data files (``stale``) are removed. Files are synced
    before the renames and the folder after, so a crash cannot leave a renamed but empty file.
    SIGINT and SIGTERM wait until the commit is done.
    """
    folder = destination.parent if str(destination.parent) else Path(".")
    for f in files:
        if mode is not None:
            os.chmod(f, mode)
        _fsync(f)
    with signals_deferred():
        for f in files[1:]:
            os.replace(f, folder / f.name)
        if len(files) > 1:
            _fsync(folder)
        os.replace(files[0], destination)
        _fsync(folder)
        for old in stale:
            with contextlib.suppress(OSError):
                os.unlink(old)


def check_output(path: Path, src: Path, *, session: bool) -> list[str]:
    """Exit 0 promises a model that loads: ``onnx.checker`` on the written file (from its path, so external
    data is checked where it lies) and, when verification did not already run it, an onnxruntime session,
    in a child process where it can fork (a crash of the runtime cannot take onnxfold down), at the same
    time as the checker.

    A failure is onnxfold's fault, not the user's (:class:`OutputBroken`), unless the input fails the
    same way: then it is a warning (returned) about the input, which onnxfold does not repair.
    """
    warnings: list[str] = []
    loading = _Background(_session, path) if session else None  # while this process runs the checker
    try:
        _judge("onnx.checker", _run_here(_checker, path), lambda: _run_here(_checker, src), warnings)
        if loading is not None:
            _judge("onnxruntime", loading.result(), lambda: _Background(_session, src).result(), warnings)
    finally:
        if loading is not None:
            loading.close()
    return warnings


def _judge(name: str, error: str | None, input_error, warnings: list[str]) -> None:
    if error is None:
        return
    if input_error() is not None:
        warnings.append(f"{name} rejects the input too ({error}): written as it was given")
        return
    raise OutputBroken(f"{name} rejects the written model, though it accepts the input: {error}")


def _checker(path: Path) -> None:
    onnx.checker.check_model(str(path))


def _run_here(fn, path) -> str | None:
    try:
        fn(path)
    except Exception as e:
        return _first_line(e)
    return None


class _Background:
    """``fn(path)`` in a forked child while this process goes on; :meth:`result` is None or the error's
    first line. Runs in this process, at :meth:`result`, where forking is not safe (onnxruntime already
    loaded here, other threads, not Linux)."""

    def __init__(self, fn, path):
        from .verify import _can_fork

        self.fn, self.path, self.pid = fn, path, None
        if not _can_fork():
            return
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never runs the parent's handlers or cleanup
            code = 0
            try:
                os.close(r)
                for signum in (signal.SIGINT, signal.SIGTERM):
                    signal.signal(signum, signal.SIG_DFL)
                error = _run_here(fn, path)
                os.write(w, (error or "").encode()[:4096])
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(w)
        self.pid, self.fd = pid, r

    def result(self) -> str | None:
        if self.pid is None:
            return _run_here(self.fn, self.path)
        with os.fdopen(self.fd, "rb") as f:
            message = f.read().decode(errors="replace")
        code = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        self.pid = None
        if code < 0:
            return f"onnxruntime crashed (signal {-code}) loading it"
        if code:
            return f"the check ended with exit code {code}"
        return message or None

    def close(self) -> None:
        """Stop the child if its result was never asked for (the parent was interrupted)."""
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            os.close(self.fd)
            self.pid = None


def _session(path: Path) -> None:
    """Load the model at ``path`` in onnxruntime, as verification does (CPU, optimizations off)."""
    from .verify import _session as session

    session(str(path), provider="cpu")


class OutputBroken(Exception):
    """The model onnxfold wrote does not load: a bug, never exit 0."""
