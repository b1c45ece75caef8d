"""The command line at its edges (issue 18): file names that are not UTF-8, a reader that goes away, a
model onnxruntime rejects, errors after work began, names that hold a newline, numpy's warnings."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxfold.api
import onnxfold.cli as cli_module
from builders import conv_bn_model, count
from checks import MODELS, assert_close, assert_user_error, child_env, cli, feeds_for, run


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
    assert "o\\xff.onnx.data: each byte of the name that is not UTF-8 written" in proc.stderr
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


def test_onnx_reference_reads_data_in_a_folder_not_utf8(odd, tmp_path):
    """float64 (no CPU kernel): verification in onnx.reference, which reads external data through onnx's
    C++ by UTF-8 names only (this was exit 70)."""
    onnx.save(conv_bn_model(dtype="float64"), tmp_path / "f.onnx", save_as_external_data=True, size_threshold=0,
              location="f.data")
    folder = os.path.join(odd, b"f\xf1")
    os.mkdir(folder)
    for name in (b"f.onnx", b"f.data"):
        shutil.copy(os.path.join(os.fsencode(tmp_path), name), os.path.join(folder, name))
    proc = cli_bytes(os.path.join(folder, b"f.onnx"), os.path.join(folder, b"o.onnx"))
    assert proc.returncode == 0, proc.stderr
    assert "verify on cpu (onnx.reference)" in proc.stderr and "verification passed" in proc.stderr


def test_data_name_not_utf8_is_refused(odd):
    out = os.path.join(odd, b"o.onnx")
    proc = cli_bytes(MODELS / "resnet_block.onnx", out, "--external-data", "always", "--data-name", b"d\xff")
    assert_user_error(proc, "not valid UTF-8")
    assert sorted(os.listdir(odd)) == [b"probe\xff"]


# -- a reader that goes away (`2>&1 | head -1`) --------------------------------------------------------
def _closed_pipe() -> int:
    """The write end of a pipe whose reader has gone: every write to it fails (EPIPE)."""
    r, w = os.pipe()
    os.close(r)
    return w


def _run_closed(argv: list, *, stdout_closed: bool = False, stderr_closed: bool = True,
                command: tuple[str, ...] = ("-m", "onnxfold")) -> subprocess.CompletedProcess:
    w = _closed_pipe()
    try:
        return subprocess.run([sys.executable, *command, *map(str, argv)], env=child_env(), timeout=300,
                              stdout=w if stdout_closed else subprocess.DEVNULL,
                              stderr=w if stderr_closed else subprocess.DEVNULL)
    finally:
        os.close(w)


def _folded(path) -> None:
    model = onnx.load(path)
    assert count(model, "BatchNormalization") == 0
    original = onnx.load(MODELS / "resnet_block.onnx")
    feeds = feeds_for(original)
    assert_close(run(original, feeds), run(model, feeds))


@pytest.mark.parametrize("options", [[], ["-v"], ["--report", "-"], ["--report", "-", "-q"]])
def test_closed_stderr_and_stdout_change_nothing(tmp_path, options):
    """Every line the run prints fails (the reader is gone before it starts): the fold completes, the
    output is written and the exit code is the run's own (this was exit 1, nothing written)."""
    out = tmp_path / "o.onnx"
    proc = _run_closed([MODELS / "resnet_block.onnx", out, *options], stdout_closed=True)
    assert proc.returncode == 0
    _folded(out)
    assert sorted(os.listdir(tmp_path)) == ["o.onnx"]


def test_a_reader_that_reads_one_line_then_goes(tmp_path):
    """``python -m onnxfold IN OUT -v 2>&1 | head -1``: the first line read, the pipe closed."""
    out = tmp_path / "o.onnx"
    proc = subprocess.Popen([sys.executable, "-m", "onnxfold", MODELS / "resnet_block.onnx", out, "-v"],
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    proc.stdout.close()
    assert proc.wait(timeout=300) == 0
    assert first.startswith(b"folded ")
    _folded(out)


def test_closed_stderr_in_folder_mode_and_for_the_other_commands(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(MODELS / "resnet_block.onnx", src / "a.onnx")
    shutil.copy(MODELS / "resnet_block.onnx", src / "b.onnx")
    proc = _run_closed([src, tmp_path / "out", "-v"], stdout_closed=True)
    assert proc.returncode == 0
    _folded(tmp_path / "out" / "a.onnx")
    _folded(tmp_path / "out" / "b.onnx")
    assert _run_closed(["--list-rules"], stdout_closed=True).returncode == 0
    assert _run_closed([src / "a.onnx", "--check"]).returncode == 3
    hook = ("-c", "from onnxfold.precommit import console; console()")
    assert _run_closed([src / "a.onnx"], command=hook).returncode == 3


# -- a model onnxruntime rejects as invalid is not "verified" in onnx.reference ----------------------
def _invalid_models():
    mixed = conv_bn_model()  # a float64 weight in a float32 Conv: Conv's T bound to two types
    w = next(t for t in mixed.graph.initializer if t.name == "w")
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w).astype(np.float64), "w"))
    return {"float64 weight in a float32 Conv": mixed,
            "bfloat16 Conv before opset 22": conv_bn_model(dtype="bfloat16", opset=17)}


@pytest.mark.parametrize("name", list(_invalid_models()))
@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
def test_an_invalid_model_is_refused_not_verified_in_onnx_reference(tmp_path, name, verify):
    """onnxruntime's Type Error was taken for 'no kernel': onnx.reference 'verified' the model, exit 0,
    and the output did not load in onnxruntime. Exit 0 means it loads: such an input is refused."""
    src = tmp_path / "m.onnx"
    onnx.save(_invalid_models()[name], src)
    proc = cli(src, tmp_path / "o.onnx", *([] if verify else ["--no-verify"]))
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("onnxfold: error:")]
    assert len(errors) == 1 and "the input is not a valid ONNX model (onnxruntime: Type Error" in errors[0]
    assert "Traceback" not in proc.stderr and "onnx.reference" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("FAILED | Runtime: ")  # work had begun
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


@pytest.mark.parametrize("dtype,opset", [("float64", 17), ("bfloat16", 22)])
def test_a_valid_model_without_a_cpu_kernel_is_still_verified_in_onnx_reference(tmp_path, dtype, opset):
    """float64 Conv and bfloat16 Conv-22 are valid ONNX (onnx.checker's full check passes) for which the
    CPU provider has no kernel (NOT_IMPLEMENTED): both run in onnx.reference, as the README says."""
    model = conv_bn_model(dtype=dtype, opset=opset)
    onnx.checker.check_model(model, full_check=True)
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    proc = cli(src, tmp_path / "o.onnx")
    assert proc.returncode == 0, proc.stderr
    assert "verify on cpu (onnx.reference)" in proc.stderr and "verification passed" in proc.stderr


# -- errors after work began; newlines in paths; numpy's warnings -------------------------------------
def test_an_error_after_work_began_ends_with_the_failed_line(tmp_path, monkeypatch, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), src)

    def full(model, path, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(onnxfold.api, "write", full)
    assert cli_module.main([str(src), str(tmp_path / "o.onnx")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("folded 1 of 1 BatchNormalization")
    assert lines[-2].startswith("onnxfold: error: ") and "the disk is full" in lines[-2]
    assert lines[-1].startswith("FAILED | Runtime: ")
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]
    # an error found before any work stays one line alone
    assert cli_module.main([str(tmp_path / "absent.onnx"), str(tmp_path / "o.onnx")]) == 2
    alone = capsys.readouterr().err.strip().splitlines()
    assert alone == [f"onnxfold: error: {tmp_path / 'absent.onnx'}: no such file"]


def test_a_newline_in_a_path_stays_on_one_line(tmp_path):
    folder = tmp_path / "a\nb"
    folder.mkdir()
    absent = cli(tmp_path / "no\nsuch.onnx", folder / "o.onnx")
    assert_user_error(absent, "no\\nsuch.onnx: no such file")
    nofolder = cli(MODELS / "resnet_block.onnx", tmp_path / "x\ny" / "o.onnx")
    assert_user_error(nofolder, "x\\ny")
    done = cli(MODELS / "resnet_block.onnx", folder / "o\nx.onnx", "-q")
    assert done.returncode == 0, done.stderr
    last = done.stderr.strip().splitlines()
    assert len(last) == 1 and last[0].startswith("PASSED | ") and "a\\nb/o\\nx.onnx" in last[0]
    verbose = cli(MODELS / "resnet_block.onnx", folder / "o\nx.onnx")
    assert f"wrote {folder}/o\\nx.onnx".replace("\n", "\\n") in verbose.stderr.splitlines()
    assert (folder / "o\nx.onnx").exists()
    tree = tmp_path / "tree"
    (tree / "c\nd").mkdir(parents=True)
    shutil.copy(MODELS / "resnet_block.onnx", tree / "c\nd" / "m\ny.onnx")
    folders = cli(tree, tmp_path / "out", "-v")
    assert folders.returncode == 0, folders.stderr
    assert "m\ny" not in folders.stderr and "c\\nd/m\\ny.onnx" in folders.stderr, folders.stderr


def test_no_numpy_warning_reaches_stderr(tmp_path):
    """A fold whose float64 result overflows (declined: 'not finite'), and a float16 comparison whose
    outputs overflow to inf in both models: handled, never printed as numpy's RuntimeWarning."""
    big = conv_bn_model(dtype="float16")
    gamma = next(t for t in big.graph.initializer if t.name == "gamma")
    gamma.CopyFrom(numpy_helper.from_array(np.full(6, np.inf, np.float16), "gamma"))
    onnx.save(big, tmp_path / "big.onnx")
    proc = cli(tmp_path / "big.onnx", tmp_path / "o.onnx")
    assert proc.returncode == 0, proc.stderr
    assert "declined" in proc.stderr and "Warning" not in proc.stderr, proc.stderr
    onnx.save(conv_bn_model(dtype="float16"), tmp_path / "f16.onnx")
    proc = cli(tmp_path / "f16.onnx", tmp_path / "o16.onnx", "--input-range", "0,65504")
    assert proc.returncode in (0, 1), proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr
