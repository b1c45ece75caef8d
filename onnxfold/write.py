"""Writing the folded model to its staging path: one file written in pieces (no second copy of the
model in memory), or the model and its external data file.

Protobuf serializes a message as its fields, in any order, and repeated fields may be appended
(:mod:`onnxfold.protobuf`): so a single-file model is the model's other fields, then the graph without
its external initializers, then each of those appended to the graph, its bytes copied from its file (in
the kernel where it can): the data file the fold streamed it to, or the input's own files, where the
load left the weights it did not parse (:func:`onnxfold.load.load`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import BinaryIO

import onnx
from onnx import external_data_helper

from . import protobuf
from .errors import InputError, TooLarge
from .protobuf import GRAPH_INITIALIZER, MODEL_GRAPH, TENSOR_RAW_DATA, copy_fields, length_delimited
from .tensors import DataSink, copy_bytes, data_path, external_fields, inline_external, inline_sparse, open_data


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
        except TooLarge:
            if external is False:
                raise InputError("the folded model is over 2 GiB: it needs external data "
                                 "(--external-data always)") from None
    if sink is None:
        sink = DataSink(staged_path.parent / (staged_path.name + ".data"))
    for tensor in external_data_helper._get_attribute_tensors(model):
        if external_data_helper.uses_external_data(tensor):  # Constant values stay inline
            inline_external(tensor, base_dir)
    inline_sparse(model, base_dir)
    sink.compact(external_data_helper._get_initializer_tensors(model))
    for tensor in external_data_helper._get_initializer_tensors(model):
        sink.take(tensor, base_dir)
    sink.close()
    with open(staged_path, "wb") as f:
        f.write(model.SerializeToString())
    return [staged_path, sink.path]


def _write_inline(model: onnx.ModelProto, path: Path, base_dir, sink: DataSink | None) -> Path:
    """One file, written in pieces in protobuf's wire format.

    Protobuf serializes a message as its fields, in any order, and repeated fields may be appended:
    so the model is the model's other fields, then the graph (without its external initializers),
    then each external initializer appended to the graph, its bytes copied from its file. No copy of
    the whole model is made in memory (``onnx.save`` makes one, and sizes it twice).
    """
    taken: list[onnx.TensorProto] = []
    try:
        return _write_pieces(model, path, base_dir, sink, taken)
    except TooLarge:
        # The external initializers were taken out of the graph: put them back (still pointing to
        # their files), so the caller can write the model with external data instead.
        model.graph.initializer.extend(taken)
        raise


def _write_pieces(model, path: Path, base_dir, sink: DataSink | None, taken: list) -> Path:
    graph = model.graph
    streamed = []  # (tensor, its file, offset, length): each external initializer, copied from its file
    for i in reversed(range(len(graph.initializer))):
        t = graph.initializer[i]
        if not external_data_helper.uses_external_data(t):
            continue
        if sink is not None and sink.owns(t):
            source, (offset, length) = sink.path, sink.written[t.name]
        else:  # the input's data files, or the input itself (weights left in it: load.load)
            location, offset, length = external_fields(t)
            source = data_path(base_dir, location)
        kept = onnx.TensorProto()
        kept.CopyFrom(t)
        taken.append(kept)
        streamed.append((kept, source, offset, length))
        del graph.initializer[i]
    streamed.reverse()
    for tensor in external_data_helper._get_all_tensors(model):
        if external_data_helper.uses_external_data(tensor):  # in subgraphs: read in, one tensor at a time
            inline_external(tensor, base_dir)
    inline_sparse(model, base_dir)
    pieces = []
    for tensor, _, _, length in streamed:
        header = onnx.TensorProto()
        copy_fields(tensor, header, skip=("external_data", "data_location"))
        head = header.SerializeToString() + length_delimited(TENSOR_RAW_DATA, length)
        pieces.append((head, length))
    try:
        graph_bytes = graph.SerializeToString()
    except Exception as e:  # protobuf refuses past 2 GiB
        raise TooLarge() from e
    entries = sum(len(length_delimited(GRAPH_INITIALIZER, len(h) + n)) + len(h) + n for h, n in pieces)
    graph_len = len(graph_bytes) + entries
    rest = onnx.ModelProto()
    copy_fields(model, rest, skip=("graph",))
    head = rest.SerializeToString()
    if len(head) + graph_len + 16 > protobuf.PROTOBUF_LIMIT:
        raise TooLarge()
    if sink is not None:
        sink.file.flush()
    with open(path, "wb") as out, contextlib.ExitStack() as files:
        out.write(head)
        out.write(length_delimited(MODEL_GRAPH, graph_len))
        out.write(graph_bytes)
        del graph_bytes
        opened: dict[Path, BinaryIO] = {}
        for (h, n), (_, source, offset, _) in zip(pieces, streamed):
            out.write(length_delimited(GRAPH_INITIALIZER, len(h) + n) + h)
            if source not in opened:
                opened[source] = files.enter_context(open_data(source))
            data = opened[source]
            data.seek(offset)
            copy_bytes(data, out, n)
    return path
