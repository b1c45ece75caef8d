"""OUT and --report are a new path or a regular file; an in-place fold keeps a data file another model
reads; a sync that fails fails the run before anything old is removed (issue 18, items 1, 3, 4).

0e3a27c: as root, `python -m onnxfold m.onnx /dev/null` turned /dev/null into a model file (exit 0) and
`--report /dev/stdout` replaced that link with a file; `python -m onnxfold a.onnx a.onnx` removed the
a.onnx.data that b.onnx reads (exit 0); with fsync raising EIO the run said PASSED and an in-place fold
still removed the old data.
"""

import errno
import json
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import builders
from builders import conv_bn_model
from checks import assert_user_error, cli, digest, session
from onnxfold import FoldError, InputError, fold_file, verify
from onnxfold import commit as commit_module


def external_model(folder: Path, name="m.onnx", data=None, seed=0) -> Path:
    return builders.external_model(folder, name, seed=seed, data=data)


def snapshot(folder: Path) -> dict:
    """Every entry (hidden ones too): a file's digest, or what else it is."""
    out = {}
    for p in sorted(folder.iterdir()):
        mode = os.lstat(p).st_mode
        out[p.name] = digest(p) if stat.S_ISREG(mode) else stat.S_IFMT(mode)
    return out


def loads(path):
    onnx.checker.check_model(str(path))
    session(path)


# -- item 1: devices, FIFOs, /dev/std* -----------------------------------------------------------------


def specials(tmp_path: Path) -> list[Path]:
    """A FIFO, a link to it and, where this process may make one (root), a character device like
    /dev/null (made here: the real /dev/null is never written to)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link-to-fifo"
    link.symlink_to(fifo)
    out = [fifo, link]
    try:
        os.mknod(tmp_path / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        out.append(tmp_path / "null")
    except (PermissionError, OSError):
        pass
    return out


def test_out_naming_a_fifo_a_link_to_one_or_a_device_is_refused_before_any_work(tmp_path):
    src_dir = tmp_path / "in"
    src_dir.mkdir()
    src = external_model(src_dir)
    targets = specials(tmp_path)
    before, before_src = snapshot(tmp_path), snapshot(src_dir)
    for target in targets:
        kind = "FIFO" if "fifo" in target.name else "character device"
        assert_user_error(cli(src, target), f"is {'a link to ' if target.is_symlink() else ''}a {kind}")
        assert_user_error(cli(src, tmp_path / "o.onnx", "--report", target), "--report")
        with pytest.raises(InputError, match="regular file"):
            fold_file(src, target)
        with pytest.raises(InputError, match="regular file"):
            fold_file(src, tmp_path / "o.onnx", report=target)
        assert snapshot(tmp_path) == before, target  # no lock file, no temporary, the special file as it was
    assert snapshot(src_dir) == before_src


def test_a_link_like_dev_stdout_as_out_or_report_is_refused(tmp_path):
    """A link to /proc/self/fd/1 (what /dev/stdout is: here the run's pipe) is refused. The test makes its
    own link: the real /dev/stdout is never named, so that an onnxfold that writes it cannot replace it."""
    src = external_model(tmp_path)
    stdout = tmp_path / "stdout"
    stdout.symlink_to("/proc/self/fd/1")
    before = snapshot(tmp_path)
    assert_user_error(cli(src, stdout), "is a link to a FIFO")
    assert_user_error(cli(src, tmp_path / "o.onnx", "--report", stdout), "--report - writes it to standard")
    assert snapshot(tmp_path) == before


def test_a_link_to_stdout_redirected_to_a_file_is_refused(tmp_path):
    """`python -m onnxfold m.onnx /dev/stdout > log`: the link leads to a regular file, through
    /proc/self/fd; it is refused all the same (1d0de84 replaced the link with the model)."""
    import subprocess
    import sys

    from checks import child_env

    src = external_model(tmp_path)
    link = tmp_path / "stdout"
    link.symlink_to("/proc/self/fd/1")
    log = tmp_path / "log.txt"
    for args in ([src, link], [src, tmp_path / "o.onnx", "--report", link]):
        with open(log, "w") as f:
            proc = subprocess.run([sys.executable, "-m", "onnxfold", *map(str, args)], stdout=f,
                                  stderr=subprocess.PIPE, text=True, env=child_env(), timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert "is a link to one of this process's open files" in proc.stderr
        assert link.is_symlink() and log.read_text() == ""
        assert not (tmp_path / "o.onnx").exists()


def test_report_dash_still_goes_to_stdout(tmp_path):
    src = external_model(tmp_path)
    proc = cli(src, tmp_path / "o.onnx", "--report", "-", "--no-verify")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["status"] == "written"


def test_folder_mode_refuses_a_fifo_output_and_report(tmp_path):
    src_dir, out_dir = tmp_path / "in", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    external_model(src_dir, "a.onnx")
    external_model(src_dir, "b.onnx", seed=1)
    os.mkfifo(out_dir / "a.onnx")
    proc = cli(src_dir, out_dir, "--no-verify", "-q")
    assert proc.returncode == 2, proc.stderr
    assert "is a FIFO" in proc.stderr and "Traceback" not in proc.stderr
    assert stat.S_ISFIFO(os.lstat(out_dir / "a.onnx").st_mode)
    loads(out_dir / "b.onnx")  # the other model is folded
    os.mkfifo(tmp_path / "r.json")
    assert_user_error(cli(src_dir, tmp_path / "out2", "--report", tmp_path / "r.json"), "is a FIFO")
    assert not (tmp_path / "out2").exists()


def test_a_default_data_name_that_is_a_fifo_is_not_replaced(tmp_path):
    src = external_model(tmp_path)
    os.mkfifo(tmp_path / "o.onnx.data")
    result = fold_file(src, tmp_path / "o.onnx", verify=False)
    assert stat.S_ISFIFO(os.lstat(tmp_path / "o.onnx.data").st_mode)
    assert result.written[1].name == "o.onnx.1.data"
    loads(tmp_path / "o.onnx")
    assert_user_error(cli(src, tmp_path / "p.onnx", "--data-name", "o.onnx.data"), "--data-name")


# -- item 3: an in-place fold and another model reading its data file ----------------------------------


def test_in_place_fold_keeps_a_data_file_another_model_reads(tmp_path):
    a = external_model(tmp_path, "a.onnx")
    b = tmp_path / "b.onnx"
    b.write_bytes(a.read_bytes())  # reads a.onnx.data too
    original = tmp_path.parent / (tmp_path.name + "-original")
    original.mkdir(exist_ok=True)
    external_model(original, "a.onnx")
    proc = cli(a, a)
    assert proc.returncode == 0, proc.stderr
    assert "warning: kept a.onnx.data" in proc.stderr and "b.onnx reads it too" in proc.stderr
    loads(b)
    loads(a)
    assert verify(original / "a.onnx", a) and verify(original / "a.onnx", b)
    # and once more: the folded a.onnx's own old data file goes; b's is neither removed nor overwritten
    # (1d0de84 + the removal check alone: a.onnx.data, no longer read by a.onnx, was the new data's name)
    b_data = (tmp_path / "a.onnx.data").read_bytes()
    proc = cli(a, a, "--no-verify")
    assert proc.returncode == 0, proc.stderr
    loads(a)
    loads(b)
    assert (tmp_path / "a.onnx.data").read_bytes() == b_data
    assert verify(original / "a.onnx", a) and verify(original / "a.onnx", b)
    names = {p.name for p in tmp_path.iterdir()}
    assert a_data(a) != "a.onnx.data"
    assert names == {"a.onnx", "b.onnx", "a.onnx.data", a_data(a)}
    assert_user_error(cli(a, tmp_path / "c.onnx", "--data-name", "a.onnx.data"), "b.onnx reads that file")


def a_data(path: Path) -> str:
    model = onnx.load(str(path), load_external_data=False)
    return next(e.value for t in model.graph.initializer for e in t.external_data if e.key == "location")


# -- item 4: fsync errors ------------------------------------------------------------------------------


def failing_fsync(monkeypatch, on_dirs: bool, code=errno.EIO):
    real = os.fsync
    calls = []

    def fsync(fd):
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        if is_dir == on_dirs:
            calls.append(fd)
            raise OSError(code, os.strerror(code))
        return real(fd)

    monkeypatch.setattr(commit_module.os, "fsync", fsync)
    return calls


@pytest.mark.parametrize("on_dirs", [False, True], ids=["files", "folder"])
def test_an_fsync_error_fails_the_run_before_anything_is_replaced_or_removed(tmp_path, monkeypatch, on_dirs):
    src = external_model(tmp_path)
    before = snapshot(tmp_path)
    calls = failing_fsync(monkeypatch, on_dirs)
    with pytest.raises(FoldError, match="cannot sync"):
        fold_file(src, src, verify=False)
    assert calls
    assert snapshot(tmp_path) == before  # the old model and its data, nothing new, no temporary
    monkeypatch.undo()
    loads(src)


def test_an_fsync_error_is_one_line_exit_2(tmp_path):
    src = external_model(tmp_path)
    before = snapshot(tmp_path)
    script = ("import errno, os, stat, sys\n"
              "real = os.fsync\n"
              "def fsync(fd):\n"
              "    if stat.S_ISREG(os.fstat(fd).st_mode): raise OSError(errno.EIO, 'Input/output error')\n"
              "    return real(fd)\n"
              "os.fsync = fsync\n"
              "from onnxfold.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    import subprocess
    import sys

    from checks import child_env
    proc = subprocess.run([sys.executable, "-c", script, str(src), str(src), "--no-verify"], capture_output=True,
                          text=True, env=child_env(), timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("onnxfold:")] == \
        [line for line in proc.stderr.splitlines() if "cannot sync the file to disk (Input/output error)" in line]
    assert snapshot(tmp_path) == before


def test_a_folder_that_cannot_be_synced_is_not_an_error(tmp_path, monkeypatch):
    src = external_model(tmp_path)
    calls = failing_fsync(monkeypatch, on_dirs=True, code=errno.EINVAL)
    result = fold_file(src, tmp_path / "o.onnx", verify=False)
    assert calls and result
    monkeypatch.undo()
    loads(tmp_path / "o.onnx")


def test_a_folder_sync_failing_after_the_model_rename_keeps_the_old_data(tmp_path, monkeypatch):
    """The second folder sync (after the model's rename) fails: the run fails, says OUT was replaced,
    and removes nothing old (the new model is whole and loads; the old data file is still there)."""
    src = external_model(tmp_path)
    old_data = (tmp_path / "m.onnx.data").read_bytes()
    real = os.fsync
    dirs = []

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            dirs.append(fd)
            if len(dirs) == 2:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd)

    monkeypatch.setattr(commit_module.os, "fsync", fsync)
    with pytest.raises(FoldError, match="cannot sync the folder.*was replaced.*old data files were kept"):
        fold_file(src, src, verify=False)
    monkeypatch.undo()
    assert (tmp_path / "m.onnx.data").read_bytes() == old_data
    assert a_data(src) != "m.onnx.data"
    loads(src)
    assert not [p for p in tmp_path.iterdir() if ".onnxfold-" in p.name]


def test_what_the_model_at_out_reads_is_found_without_parsing_its_weights(tmp_path, monkeypatch):
    """files_of (what the model now at OUT reads, kept whole until the new one replaces it) parses a file
    without its weights (issue 20: parsing a 103 MB OUT took 0.1 s of every rerun, scanning it for
    ``location`` 0.04 s): a single-file model is itself alone; one with external data names its data
    file; a single-file model whose weights hold the bytes ``location`` is itself alone; a model whose
    subgraph's tensor is external names that file too."""
    from onnxfold import output_plan

    parsed = []
    real_parse = onnx.ModelProto.ParseFromString
    monkeypatch.setattr(onnx.ModelProto, "ParseFromString",
                        lambda self, b: parsed.append(len(b)) or real_parse(self, b))
    m = conv_bn_model(cin=16, cout=64, seed=8)
    single = tmp_path / "single.onnx"
    onnx.save(m, single)
    assert output_plan.files_of(single) == {single.resolve()}
    assert parsed and max(parsed) < single.stat().st_size - 16 * 64 * 9 * 4  # the Conv weight was not parsed
    ext = tmp_path / "ext.onnx"
    onnx.save(conv_bn_model(cin=8, cout=8, seed=8), ext, save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.bin", size_threshold=0)
    assert output_plan.files_of(ext) == {ext.resolve(), (tmp_path / "ext.bin").resolve()}
    m = conv_bn_model(seed=8)
    m.graph.initializer.append(numpy_helper.from_array(np.frombuffer(b"location" * 10000, dtype=np.uint8), "words"))
    words = tmp_path / "words.onnx"
    onnx.save(m, words)
    assert output_plan.files_of(words) == {words.resolve()}
    inner = tmp_path / "inner.onnx"
    branch = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["c"], ["o"])], "b", [],
                                    [onnx.helper.make_tensor_value_info("o", onnx.TensorProto.FLOAT, [2])],
                                    [numpy_helper.from_array(np.ones(2, np.float32), "c")])
    ext_tensor = branch.initializer[0]
    ext_tensor.ClearField("raw_data")
    ext_tensor.data_location = onnx.TensorProto.EXTERNAL
    ext_tensor.external_data.add(key="location", value="inner.bin")
    (tmp_path / "inner.bin").write_bytes(np.ones(2, np.float32).tobytes())
    node = onnx.helper.make_node("If", ["x"], ["y"], then_branch=branch, else_branch=branch)
    g = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.BOOL, [])],
                               [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
    onnx.save(onnx.helper.make_model(g), inner)
    assert output_plan.files_of(inner) == {inner.resolve(), (tmp_path / "inner.bin").resolve()}
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    assert output_plan.files_of(empty) == {empty.resolve()}
