"""The command line at its edges (issue 18): file names that are not UTF-8, a reader that goes away, a
model onnxruntime rejects, errors after work began, names that hold a newline, numpy's warnings."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import onnx
import pytest

from builders import count
from checks import MODELS, assert_close, assert_user_error, child_env, feeds_for, run


def cli_bytes(*args: bytes | str | os.PathLike, cwd=None) -> subprocess.CompletedProcess[str]:
    """``python -m onnxfold`` with arguments as bytes (names that are not UTF-8 pass as they are)."""
    argv = [sys.executable.encode(), b"-m", b"onnxfold", *(os.fsencode(a) for a in args)]
    proc = subprocess.run(argv, capture_output=True, cwd=cwd, env=child_env(), timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(errors="backslashreplace"),
                                       proc.stderr.decode(errors="backslashreplace"))


@pytest.fixture
def odd(tmp_path):
    """A folder where names that are not UTF-8 can be made (skip where the filesystem refuses them)."""
    try:
        os.mkdir(os.path.join(os.fsencode(tmp_path), b"probe\xff"))
    except (OSError, UnicodeError):
        pytest.skip("this filesystem takes only UTF-8 names")
    return os.fsencode(tmp_path)


def _load_bytes_path(path: bytes, tmp: str) -> onnx.ModelProto:
    """The model at ``path`` and its data files, copied to a folder ``tmp`` (onnx reads external data in a
    folder whose name is UTF-8 only), then loaded."""
    model = onnx.load(os.fsdecode(path), load_external_data=False)
    os.makedirs(tmp, exist_ok=True)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                shutil.copy(os.path.join(os.path.dirname(path), e.value.encode()), os.path.join(tmp, e.value))
    copy = os.path.join(tmp, "model.onnx")
    shutil.copy(path, copy)
    return onnx.load(copy)


def _external_model(folder: bytes, name: bytes) -> bytes:
    for n in ("resnet_block_extdata.onnx", "resnet_block_extdata.onnx.data"):
        shutil.copy(MODELS / n, os.path.join(folder, n.encode()))
    src = os.path.join(folder, b"resnet_block_extdata.onnx")
    if name != b"resnet_block_extdata.onnx":
        os.rename(src, os.path.join(folder, name))
    return os.path.join(folder, name)


def _same_as_original(out: bytes, tmp: str) -> None:
    """The written model (with its data) computes what the original does."""
    folded = _load_bytes_path(out, tmp)
    assert count(folded, "BatchNormalization") == 0
    original = onnx.load(MODELS / "resnet_block_extdata.onnx")
    feeds = feeds_for(original)
    assert_close(run(original, feeds), run(folded, feeds))


# -- issue 18 item 12: names that are not UTF-8 ------------------------------------------------------
def test_output_name_not_utf8_gets_a_utf8_data_name(odd):
    """The data file's name is written into the model, in UTF-8: a name from OUT's bytes is chosen, and
    said (this was exit 70, UnicodeEncodeError in the data sink)."""
    out = os.path.join(odd, b"o\xff.onnx")
    proc = cli_bytes(MODELS / "resnet_block.onnx", out, "--external-data", "always")
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(odd)) == [b"o\\xff.onnx.data", b"o\xff.onnx", b"probe\xff"]
    assert "valid UTF-8" in proc.stderr
    model = onnx.load(os.fsdecode(out), load_external_data=False)
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"o\\xff.onnx.data"}
    _same_as_original(out, os.fsdecode(odd) + "/check")


def test_input_and_output_in_folders_not_utf8(odd):
    """onnxruntime takes a folder's name in UTF-8 only: verification and the output check reach it
    another way (this was 'incompatible function arguments', exit 2, or exit 70 in the checker)."""
    folder = os.path.join(odd, b"in\xfe")
    os.mkdir(folder)
    src = _external_model(folder, b"m\xfd.onnx")
    out_folder = os.path.join(odd, b"out\xfc")
    os.mkdir(out_folder)
    for i, out in enumerate((os.path.join(out_folder, b"o.onnx"), os.path.join(out_folder, b"p\xfb.onnx"), src)):
        proc = cli_bytes(src, out)
        assert proc.returncode == 0, proc.stderr
        assert "verification passed" in proc.stderr and "Traceback" not in proc.stderr
        _same_as_original(out, os.fsdecode(odd) + f"/check{i}")
    assert not any(name.startswith(b".") for name in os.listdir(folder) + os.listdir(out_folder))


def test_data_name_not_utf8_is_refused(odd):
    out = os.path.join(odd, b"o.onnx")
    proc = cli_bytes(MODELS / "resnet_block.onnx", out, "--external-data", "always", "--data-name", b"d\xff")
    assert_user_error(proc, "not valid UTF-8")
    assert sorted(os.listdir(odd)) == [b"probe\xff"]
