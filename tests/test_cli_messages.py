"""What the command line says, as a new user met it (issue 9, "Command line, as a new user met it")."""

import os
import shutil
import subprocess
import sys

import onnx

from builders import conv_bn_model
from checks import MODELS, child_env, cli


def test_check_says_foldable_and_is_not_a_failure(tmp_path):
    proc = cli(MODELS / "resnet_block.onnx", "--check")
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("foldable (nothing changed, --check): 10 of 10 BatchNormalization"), lines
    assert "folded" not in lines[0]
    assert lines[-1].startswith("FOLDABLE | Runtime: ") and "FAILED" not in proc.stderr


def test_check_with_nothing_to_fold_passes(tmp_path):
    folded = tmp_path / "f.onnx"
    assert cli(MODELS / "resnet_block.onnx", folded, "-q").returncode == 0
    proc = cli(folded, "--check")
    assert proc.returncode == 0 and proc.stderr.strip().splitlines()[-1].startswith("PASSED | "), proc.stderr
    assert proc.stderr.startswith("nothing to fold (--check): 0 of 0 BatchNormalization"), proc.stderr


def _one_line(proc, text):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxfold: error: ") and text in lines[0], proc.stderr


def test_arguments_are_checked_before_any_work(tmp_path):
    """Each is refused with one line before the model is folded (no summary printed, nothing written)."""
    src = MODELS / "resnet_block.onnx"
    out = tmp_path / "o.onnx"
    _one_line(cli(src, out, "--providers", "tensorrt"), "unknown provider 'tensorrt'")
    _one_line(cli(src, out, "--providers", ","), "names no provider")
    _one_line(cli(src, out, "--input-shape", "bogus:1x3"), "--input-shape names no input of the model: bogus")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        _one_line(cli(src, out, "--providers", "cpu,cuda"), "CUDAExecutionProvider is not available")
    assert not out.exists() and os.listdir(tmp_path) == []


def test_no_verify_needs_no_provider(tmp_path):
    proc = cli(MODELS / "resnet_block.onnx", tmp_path / "o.onnx", "--no-verify", "--providers", "cpu,cuda")
    assert proc.returncode == 0, proc.stderr


def test_the_last_line_names_the_command_as_run(tmp_path):
    proc = cli(MODELS / "resnet_block.onnx", tmp_path / "o.onnx", "-q")
    assert proc.stderr.strip().splitlines()[-1].endswith(f"Command: python -m onnxfold {MODELS / 'resnet_block.onnx'} "
                                                         f"{tmp_path / 'o.onnx'} -q"), proc.stderr
    script = shutil.which("onnxfold")
    if script:  # the console script, where the package is installed
        proc = subprocess.run([script, str(MODELS / "resnet_block.onnx"), str(tmp_path / "p.onnx"), "-q"],
                              capture_output=True, text=True, env=child_env())
        assert " | Command: onnxfold " in proc.stderr.strip().splitlines()[-1], proc.stderr


def _folder(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        onnx.save(conv_bn_model(seed=i), src / f"m{i}.onnx")
    return src


def test_verbose_folder_mode_prints_every_model(tmp_path):
    src = _folder(tmp_path)
    plain = cli(src, tmp_path / "out", "-j", "1")
    assert plain.returncode == 0, plain.stderr
    assert "folded 1 of 1 BatchNormalization" not in plain.stderr  # the table only
    verbose = cli(src, tmp_path / "out2", "-j", "1", "-v")
    assert verbose.returncode == 0, verbose.stderr
    for name in ("m0.onnx", "m1.onnx"):
        assert f"{src / name}:" in verbose.stderr
    assert verbose.stderr.count("folded 1 of 1 BatchNormalization") == 2
    assert verbose.stderr.count("  folded conv_bn conv + bn") == 2  # every fold, as -v does for one file


CRASH = """
import sys
import onnxfold.driver as fold
real = fold.fold_model
def crash(model, **kw):
    if "boom" in model.graph.name:  # a planted bug, in one model of the folder
        raise RuntimeError("planted bug\\nsecond line of the message " + "x" * 200)
    return real(model, **kw)
import onnxfold.api as api
import onnxfold.cli as cli
api.fold_model = crash
raise SystemExit(cli.main(sys.argv[1:]))
"""


def test_a_crashing_model_in_folder_mode(tmp_path):
    """-q: one line for the crashed model (its traceback is not printed); without -q the traceback and
    'this is a bug'; either way the table's status column stays narrow and the others are folded."""
    src = _folder(tmp_path)
    boom = conv_bn_model(seed=5)
    boom.graph.name = "boom"
    onnx.save(boom, src / "m2.onnx")
    env = child_env()

    def run(*args):
        return subprocess.run([sys.executable, "-c", CRASH, str(src), *map(str, args)], capture_output=True,
                              text=True, env=env)

    quiet = run(tmp_path / "q", "-q")
    assert quiet.returncode == 70, quiet.stderr
    assert "Traceback" not in quiet.stderr
    about = [line for line in quiet.stderr.splitlines() if "m2.onnx" in line]
    assert len(about) == 1 and "second line" not in quiet.stderr, quiet.stderr  # one line (-q: no table)
    assert about[0].startswith(f"{src / 'm2.onnx'}: crashed: RuntimeError: planted bug"), about
    assert (tmp_path / "q" / "m0.onnx").exists() and (tmp_path / "q" / "m1.onnx").exists()
    loud = run(tmp_path / "l")
    assert loud.returncode == 70 and "Traceback" in loud.stderr and "this is a bug in onnxfold" in loud.stderr
    table = loud.stderr[loud.stderr.index("model "):].splitlines()
    assert max(len(line) for line in table[:5]) < 130, "\n".join(table)


def test_verbose_lists_each_fold_on_a_line_of_its_own(tmp_path):
    """-v: a line per fold and a line per fold's check (they were one line joined by a literal '\\n'); a
    node name with a newline in it is still escaped within its own line."""
    model = onnx.load(str(MODELS / "resnet_block.onnx"))
    model.graph.node[0].name = "stem\nconv"
    src = tmp_path / "in.onnx"
    onnx.save(model, str(src))
    proc = cli(src, tmp_path / "out.onnx", "-v")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    folded = [line for line in lines if line.startswith("  folded conv_bn ")]
    checks = [line for line in lines if line.startswith("  fold conv_bn ")]
    assert len(folded) == 10 and len(checks) == 10, proc.stderr
    assert not any("\\n  fold" in line for line in lines), proc.stderr
    assert any("stem\\nconv + " in line for line in folded), folded
