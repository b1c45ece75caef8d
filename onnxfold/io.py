"""Loading and saving models: external data, clear errors for bad input, atomic writes."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import onnx
from onnx import external_data_helper

PROTOBUF_LIMIT = 2**31 - 1


class InputError(Exception):
    """A problem with what the user gave us: one line, no traceback, exit code 2."""


def uses_external_data(model: onnx.ModelProto) -> bool:
    return any(
        external_data_helper.uses_external_data(t) for t in external_data_helper._get_all_tensors(model)
    )


def load(path: str | os.PathLike) -> tuple[onnx.ModelProto, bool]:
    """Load a model and its external data. Returns (model, whether it had external data)."""
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
    external = uses_external_data(model)
    if external:
        try:
            external_data_helper.load_external_data_for_model(model, str(path.parent))
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: cannot read its external data ({_first_line(e)})") from None
    return model, external


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


@contextlib.contextmanager
def staged(path: str | os.PathLike):
    """A temporary folder beside ``path``; :func:`commit` moves what was written there into place.

    Nothing is left behind when the block raises.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{path}: the folder {parent} is not writable")
    if path.is_dir():
        raise InputError(f"{path}: is a directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=parent))
    try:
        yield tmp / path.name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write(model: onnx.ModelProto, staged_path: Path, external: bool | None = None, data_name: str | None = None) -> list[Path]:
    """Write ``model`` to a staging path. ``external=None`` writes external data only when needed.

    Returns the files written (the model first).
    """
    if external is None:
        external = model.ByteSize() > PROTOBUF_LIMIT
    if not external:
        onnx.save(model, str(staged_path))
        return [staged_path]
    data_name = data_name or staged_path.name + ".data"
    onnx.save(
        model,
        str(staged_path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_name,
        size_threshold=1024,
    )
    return [staged_path, staged_path.parent / data_name]


def commit(files: list[Path], destination: Path) -> None:
    """Move staged files beside ``destination``: data files first, the model last."""
    folder = destination.parent if str(destination.parent) else Path(".")
    for f in files[1:]:
        os.replace(f, folder / f.name)
    os.replace(files[0], destination)
