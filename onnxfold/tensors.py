"""Tensors and their bytes: external data (checked, read, inlined), and the output's data file.

Every read of a tensor's bytes goes through here: :func:`read_tensor` maps a large external tensor
from its file rather than reading it; :class:`DataSink` is the output's external data file, into which
a fold streams its large new tensors as it makes them and the write copies the unchanged ones as bytes.
What cannot be right (dims too large, raw_data of the wrong size, a location outside the model's
folder, a truncated file) is an :class:`~onnxfold.errors.InputError` with one line.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, helper, numpy_helper

from .errors import InputError
from .protobuf import all_graphs

MAX_ELEMENTS = 1 << 40  # more than any real model: a larger count is a corrupt or hostile file


def is_utf8(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8 (a name from ``os.fsdecode`` may hold surrogates instead)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def utf8_name(name: str) -> str:
    """``name`` with each byte that is not UTF-8 written ``\\xNN``: a data file's name is written into
    the model, where it must be valid UTF-8."""
    return name if is_utf8(name) else os.fsencode(name).decode("utf-8", "backslashreplace")


@contextmanager
def utf8_folder(folder: str) -> Iterator[str]:
    """``folder`` by a name in UTF-8, for onnxruntime and onnx.checker, which take no other: the name
    itself, or (a name with bytes that are not UTF-8) ``/proc/self/fd/N``, N a descriptor of the
    folder held open for the block. InputError where there is no such way."""
    if is_utf8(folder):
        yield folder
        return
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        alias = f"/proc/self/fd/{fd}"
        if not os.path.isdir(alias):
            raise InputError(f"{folder!r}: onnxruntime and onnx.checker take a folder name in UTF-8 only: use a "
                             "folder whose name is valid UTF-8")
        yield alias
    finally:
        os.close(fd)


def every_tensor(model: onnx.ModelProto):
    """Every TensorProto of the model: initializers, attribute values, sparse initializers' parts."""
    yield from external_data_helper._get_all_tensors(model)
    for graph in all_graphs(model.graph):
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices


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
        if count > MAX_ELEMENTS:
            raise InputError(f"{where}tensor {tensor.name!r} has dims {list(tensor.dims)}: "
                             f"more than 2^40 elements, not a real weight")
    return count


_FOUR_BIT = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n)}


def check_tensor(tensor: onnx.TensorProto, path="", raw_length: int | None = None) -> None:
    """One line for a tensor whose size cannot be right: dims too large, raw_data not matching them.
    ``raw_length``: the length of its raw_data where that was left in the file (:func:`onnxfold.load.load`)."""
    where = f"{path}: " if path else ""
    external = external_data_helper.uses_external_data(tensor)
    if raw_length is None:
        if not (tensor.HasField("raw_data") or external):  # typed fields (float_data, string_data, ...)
            _count(tensor, where)
            return
        if external:
            nbytes(tensor, where)
            return
        raw_length = len(tensor.raw_data)
    size = nbytes(tensor, where)
    if raw_length != size:
        raise InputError(f"{where}tensor {tensor.name!r} has {raw_length} bytes of raw_data, but its dims "
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
    with open_data(data_path(base_dir, location)) as f:
        raw = os.pread(f.fileno(), length, offset)
    if len(raw) != length:
        raise InputError(f"tensor {tensor.name!r}: its external data is truncated")
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT
    tensor.raw_data = raw


def data_path(base_dir, location: str) -> Path:
    """The file of an external tensor, refused when it resolves outside the model's folder. Resolved
    once per (folder, location) in this process: resolving walks every component with lstat, and a
    model of 1600 external tensors resolved them 0.2 s a run (timm mobileone_s0, dynamo export)."""
    key = (os.fspath(base_dir), location)
    found = _RESOLVED.get(key)
    if found is None:
        base = Path(base_dir).resolve()
        data = (base / location).resolve()
        if base != data and base not in data.parents:
            raise InputError(f"external data location {location!r} points outside the model's folder")
        if len(_RESOLVED) >= 4096:
            _RESOLVED.clear()
        found = _RESOLVED[key] = data
    return found


_RESOLVED: dict[tuple[str, str], Path] = {}


class Held:
    """Files a run reads its weights from in place (a model's own file, :func:`onnxfold.load.load`): each
    held open from the load on, so that every read of the run (:func:`open_data`) sees the file as it
    was loaded, whatever is renamed over its path meanwhile (another run writing it, say)."""

    def __init__(self) -> None:
        self._mine: list[tuple[Path, int]] = []

    def open(self, path) -> int:
        """A descriptor of ``path``, held until :meth:`close`."""
        real = Path(path).resolve()
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._mine.append((real, fd))
        _HELD.setdefault(real, []).append(fd)
        return fd

    def close(self) -> None:
        for real, fd in self._mine:
            fds = _HELD.get(real, [])
            if fd in fds:
                fds.remove(fd)
            if not fds:
                _HELD.pop(real, None)
            os.close(fd)
        self._mine.clear()


_HELD: dict[Path, list[int]] = {}


def open_data(path: Path):
    """A data file (a resolved :func:`data_path`), for reading: the file held since the load when it
    is one (:class:`Held`), else the file now at ``path``."""
    fds = _HELD.get(path)
    if fds:
        return os.fdopen(os.dup(fds[0]), "rb")
    return open(path, "rb")


def _read_span(path: Path, dtype: np.dtype, shape: tuple[int, ...], offset: int, nbytes: int, name: str) -> np.ndarray:
    """``nbytes`` at ``offset`` of the file as an array: read under :data:`MAP_FROM` bytes (a mapping of
    its own costs more than the bytes: 0.13 ms), mapped from there (a fold touches each page once, a
    block of rows at a time, and the pages go with the array; one mapping of a whole data file kept for
    the run held every page it touched resident: 2.2 GiB for wide_ext)."""
    if nbytes < MAP_FROM:  # a plain descriptor: no file object (its buffer) for one pread
        held = _HELD.get(path)
        fd = held[0] if held else os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            raw = os.pread(fd, nbytes, offset) if offset + nbytes <= os.fstat(fd).st_size else b""
        finally:
            if not held:
                os.close(fd)
        if len(raw) != nbytes:
            raise InputError(f"tensor {name!r}: its external data is truncated")
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    with open_data(path) as fh:
        if offset + nbytes > os.fstat(fh.fileno()).st_size:
            raise InputError(f"tensor {name!r}: its external data is truncated")
        return np.memmap(fh, dtype=dtype, mode="r", offset=offset, shape=shape)


MAP_FROM = 1 << 20


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
        if 0 in tensor.dims:
            with open_data(data_path(base_dir, location)) as fh:
                if offset > os.fstat(fh.fileno()).st_size:
                    raise InputError(f"tensor {tensor.name!r}: its external data is truncated")
            return np.zeros(tuple(tensor.dims), dtype=dtype)
        return _read_span(data_path(base_dir, location), dtype, tuple(tensor.dims), offset, length, tensor.name)
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
        return _read_span(self.path, dtype, shape, start, nbytes, tensor.name)

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
                copy_bytes(src, self.file, nbytes)
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
            with open_data(data_path(base_dir, location)) as src:
                start = self._reserve(nbytes)
                src.seek(offset)
                self.file.flush()
                copy_bytes(src, self.file, nbytes)
            self._point(tensor, start, nbytes)
        elif tensor.HasField("raw_data") and len(tensor.raw_data) >= self.THRESHOLD:
            raw = tensor.raw_data
            start = self._reserve(len(raw))
            self.file.write(raw)
            self._point(tensor, start, len(raw))

    def close(self) -> None:
        self.file.close()


def copy_bytes(src, dst, nbytes: int, chunk: int = 16 << 20) -> None:
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


def inline_sparse(model: onnx.ModelProto, base_dir) -> None:
    """Sparse initializers keep their data: external parts are read in (they are small by nature)."""
    for graph in all_graphs(model.graph):
        for sparse in graph.sparse_initializer:
            for part in (sparse.values, sparse.indices):
                if external_data_helper.uses_external_data(part):
                    inline_external(part, base_dir)

