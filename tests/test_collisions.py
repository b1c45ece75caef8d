"""No output file may be a file the input reads, or another output (issue 10, items 2, 3, 5, 7, 8).

Each test names the way eadbfe9 destroyed a model, mostly with exit 0.
"""

import functools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from builders import conv_bn_model, count
from checks import assert_user_error, cli, digest, session
from onnxfold import verify


def snapshot(folder: Path) -> dict:
    return {p.name: digest(p) for p in sorted(folder.iterdir()) if p.is_file()}


def external_model(folder: Path, name="m.onnx", data="m.onnx.data", seed=0) -> Path:
    model = conv_bn_model(cin=16, cout=16)
    keep = np.random.default_rng(seed).normal(size=(16, 16)).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(keep, "keep"))
    model.graph.node.append(helper.make_node("ReduceSum", ["keep"], ["keep_sum"], keepdims=0))
    model.graph.output.append(helper.make_tensor_value_info("keep_sum", onnx.TensorProto.FLOAT, []))
    path = folder / name
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=data,
              size_threshold=256)
    return path


def loads(path):
    onnx.checker.check_model(str(path))
    session(path)


def test_data_name_equal_to_the_input_file_is_refused(tmp_path):
    """eadbfe9: `--data-name m.onnx` replaced the input with raw weights, exit 0."""
    src = external_model(tmp_path)
    before = snapshot(tmp_path)
    assert_user_error(cli(src, tmp_path / "o.onnx", "--data-name", "m.onnx"), "the input reads that file")
    assert snapshot(tmp_path) == before


def test_data_name_equal_to_the_input_data_file_is_refused(tmp_path):
    """eadbfe9: `--data-name weights.bin`, the input's own data file: the input broken, exit 0."""
    src = external_model(tmp_path, data="weights.bin")
    before = snapshot(tmp_path)
    assert_user_error(cli(src, tmp_path / "o.onnx", "--data-name", "weights.bin"), "the input reads that file")
    assert_user_error(cli(src, src, "--data-name", "weights.bin"), "the input reads that file")
    os.symlink(tmp_path / "weights.bin", tmp_path / "alias.bin")  # real paths, after symlinks
    assert_user_error(cli(src, tmp_path / "o.onnx", "--data-name", "alias.bin"), "the input reads that file")
    os.unlink(tmp_path / "alias.bin")
    assert snapshot(tmp_path) == before


def test_data_name_equal_to_the_output_is_refused(tmp_path):
    """eadbfe9: `--data-name o.onnx --no-verify` wrote every output value NaN (or a model pointing to itself)."""
    src = external_model(tmp_path)
    before = snapshot(tmp_path)
    assert_user_error(cli(src, tmp_path / "o.onnx", "--data-name", "o.onnx", "--no-verify"), "output's own file name")
    assert snapshot(tmp_path) == before


def test_default_data_name_that_is_the_input_data_file_gets_a_fresh_name(tmp_path):
    """IN a.onnx keeps its data in b.onnx.data, OUT is b.onnx: eadbfe9 overwrote b.onnx.data, IN broken."""
    src = external_model(tmp_path, name="a.onnx", data="b.onnx.data")
    before = snapshot(tmp_path)
    proc = cli(src, tmp_path / "b.onnx")
    assert proc.returncode == 0, proc.stderr
    assert {k: v for k, v in snapshot(tmp_path).items() if k in before} == before
    loads(src)
    loads(tmp_path / "b.onnx")
    assert count(onnx.load(tmp_path / "b.onnx"), "BatchNormalization") == 0
    assert verify(src, tmp_path / "b.onnx")


def test_report_naming_a_model_or_data_file_is_refused(tmp_path):
    """eadbfe9: `--report IN` replaced the input with JSON; `--report OUT` the folded model; exit 0."""
    src = external_model(tmp_path)
    before = snapshot(tmp_path)
    for report in (src, tmp_path / "o.onnx", tmp_path / "m.onnx.data", tmp_path / "o.onnx.data"):
        assert_user_error(cli(src, tmp_path / "o.onnx", "--report", report), "--report")
    assert_user_error(cli(src, src, "--report", src), "--report")
    assert snapshot(tmp_path) == before


def test_folder_mode_in_place_does_not_clobber_another_models_data(tmp_path):
    """IN_DIR = OUT_DIR: a.onnx's output data (default a.onnx.data) must not overwrite b.onnx's input data,
    which here is named a.onnx.data."""
    a = conv_bn_model(cin=8, cout=8)
    onnx.save(a, tmp_path / "a.onnx")
    b = external_model(tmp_path, name="b.onnx", data="a.onnx.data", seed=3)
    original_b = tmp_path / "orig"
    original_b.mkdir()
    external_model(original_b, name="b.onnx", data="a.onnx.data", seed=3)
    proc = cli(tmp_path, tmp_path, "--external-data", "always", "-q")
    assert proc.returncode == 0, proc.stderr
    loads(tmp_path / "a.onnx")
    loads(b)
    assert verify(original_b / "b.onnx", b)


def test_folder_mode_data_name_shared_by_two_models_is_refused(tmp_path):
    src_dir = tmp_path / "in"
    src_dir.mkdir()
    onnx.save(conv_bn_model(), src_dir / "a.onnx")
    onnx.save(conv_bn_model(), src_dir / "b.onnx")
    proc = cli(src_dir, tmp_path / "out", "--external-data", "always", "--data-name", "w.bin")
    assert_user_error(proc, "same data file")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_in_place_keeps_a_private_models_mode(tmp_path):
    """eadbfe9 left a 0600 model 0644 (mkstemp's 0600 and a chmod to the default) after an in-place fold."""
    src = external_model(tmp_path)
    os.chmod(src, 0o600)
    os.chmod(tmp_path / "m.onnx.data", 0o600)
    proc = cli(src, src)
    assert proc.returncode == 0, proc.stderr
    for f in tmp_path.iterdir():
        assert f.stat().st_mode & 0o777 == 0o600, f


def test_new_outputs_get_the_umask_mode(tmp_path):
    src = external_model(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    for umask, mode in ((0o022, 0o644), (0o077, 0o600)):
        for f in out.iterdir():
            f.unlink()
        proc = cli(src, out / "o.onnx", preexec_fn=functools.partial(os.umask, umask))
        assert proc.returncode == 0, proc.stderr
        assert sorted(f.name for f in out.iterdir()) == ["o.onnx", "o.onnx.data"]
        for f in out.iterdir():
            assert f.stat().st_mode & 0o777 == mode, (f, oct(f.stat().st_mode))


def test_folder_mode_skips_an_output_folder_inside_the_input_folder(tmp_path):
    """eadbfe9 re-folded earlier outputs on each rerun: out/out/out/..."""
    onnx.save(conv_bn_model(), tmp_path / "m.onnx")
    for _ in range(3):
        proc = cli(tmp_path, tmp_path / "out", "-q")
        assert proc.returncode == 0, proc.stderr
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.onnx")) == ["m.onnx", "out/m.onnx"]


def test_stale_temp_folders_of_dead_folds_are_removed(tmp_path):
    """A fold killed by SIGKILL leaves `.OUT.onnxfold-<pid>-xxxx/`; the next run to that folder removes it,
    but never the folder of a fold that still runs."""
    src = external_model(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = out / f".o.onnx.onnxfold-{dead_pid}-abc123"
    live = out / f".o.onnx.onnxfold-{os.getpid()}-def456"
    other = out / ".o.onnx.xyz"  # not onnxfold's pattern: not ours to remove
    for d in (stale, live, other):
        d.mkdir()
        (d / "o.onnx").write_bytes(b"partial")
    proc = cli(src, out / "o.onnx")
    assert proc.returncode == 0, proc.stderr
    assert not stale.exists() and live.exists() and other.exists()


def test_output_path_that_is_a_symlink_to_the_input_data_is_refused(tmp_path):
    src = external_model(tmp_path)
    os.symlink(tmp_path / "m.onnx.data", tmp_path / "o.onnx")
    before = snapshot(tmp_path)
    assert_user_error(cli(src, tmp_path / "o.onnx"), "the input reads that file")
    assert snapshot(tmp_path) == before


def test_output_that_is_a_symlink_to_the_input_replaces_the_link_not_the_input(tmp_path):
    """The rename replaces the link; the input it pointed to, and its data file, stay as they were."""
    src = external_model(tmp_path)
    before = snapshot(tmp_path)
    os.symlink(src, tmp_path / "link.onnx")
    proc = cli(src, tmp_path / "link.onnx")
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "link.onnx").is_symlink()
    assert {k: v for k, v in snapshot(tmp_path).items() if k in before} == before
    loads(src)
    loads(tmp_path / "link.onnx")
    assert verify(src, tmp_path / "link.onnx")
