"""The command line as a user runs it: exit codes, one-line errors, atomic output, never touching the input."""

import json
import os
import shutil

import onnx
import pytest

from builders import conv_bn_model, count
from checks import MODELS, assert_user_error, cli, digest


def _write(path, data):
    path.write_bytes(data)
    return path


def test_folds_a_model_and_prints_the_summary(tmp_path):
    src = MODELS / "resnet_block.onnx"
    before = digest(src)
    out = tmp_path / "out.onnx"
    proc = cli(src, out)
    assert proc.returncode == 0, proc.stderr
    assert "folded 10 of 10 BatchNormalization (conv_bn: 10)" in proc.stderr
    assert "verification passed" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("PASSED | Runtime: ")
    assert count(onnx.load(out), "BatchNormalization") == 0
    assert digest(src) == before
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]  # no temporary left behind


def test_output_may_be_the_input(tmp_path):
    path = tmp_path / "m.onnx"
    shutil.copy(MODELS / "mobilenetv2_block.onnx", path)
    proc = cli(path, path)
    assert proc.returncode == 0, proc.stderr
    assert count(onnx.load(path), "BatchNormalization") == 0
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_external_data_in_and_out(tmp_path):
    src = MODELS / "resnet_block_extdata.onnx"
    before = digest(src), digest(MODELS / "resnet_block_extdata.onnx.data")
    out = tmp_path / "folded.onnx"
    proc = cli(src, out)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["folded.onnx", "folded.onnx.data"]
    model = onnx.load(out)
    assert count(model, "BatchNormalization") == 0
    assert (digest(src), digest(MODELS / "resnet_block_extdata.onnx.data")) == before
    inline = tmp_path / "inline.onnx"
    assert cli(src, inline, "--external-data", "never", "--no-verify").returncode == 0
    assert not (tmp_path / "inline.onnx.data").exists()


@pytest.mark.parametrize(
    "make,text",
    [
        (lambda d: d / "missing.onnx", "no such file"),
        (lambda d: _write(d / "empty.onnx", b""), "empty file"),
        (lambda d: _write(d / "text.onnx", b"hello, not a model\n"), "not"),
        (lambda d: _write(d / "trunc.onnx", (MODELS / "resnet_block.onnx").read_bytes()[:5000]),
         "not a readable ONNX model"),
        (lambda d: d, "no *.onnx files below it"),  # a folder is folder mode: an empty one is an error
    ],
    ids=["missing", "empty", "text", "truncated", "empty-folder"],
)
def test_bad_input_is_one_line_exit_2_and_no_output(tmp_path, make, text):
    src = make(tmp_path)
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    proc = cli(src, out)
    assert_user_error(proc, text)
    assert not list(out.parent.iterdir())


def test_unwritable_output_path(tmp_path):
    proc = cli(MODELS / "resnet_block.onnx", tmp_path / "no" / "such" / "dir" / "o.onnx")
    assert_user_error(proc, "does not exist")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_user_error(cli(MODELS / "resnet_block.onnx", blocker / "o.onnx"), "does not exist")


def test_usage_errors(tmp_path):
    assert_user_error(cli(), "expected INPUT and OUTPUT")
    assert_user_error(cli(MODELS / "resnet_block.onnx", tmp_path / "o.onnx", "--disable", "nope"), "unknown rule")
    assert_user_error(cli(MODELS / "resnet_block.onnx", tmp_path / "o.onnx", "--bogus"), "unrecognized")
    assert not (tmp_path / "o.onnx").exists()


def test_list_rules_and_disable(tmp_path):
    proc = cli("--list-rules")
    listing = proc.stdout.split("\n\n")[0].splitlines()[1:]  # the rule list, up to the first blank line
    names = [line.split()[0] for line in listing]
    expected = {"conv_bn", "convtranspose_bn", "gemm_bn", "matmul_bn", "conv_mul", "bn_conv"}
    assert proc.returncode == 0 and expected <= set(names)
    assert "training mode" in proc.stdout and "graph output" in proc.stdout
    # every paragraph once (Mul/Add/Sub/Div share one, which was printed four times)
    paragraphs = [line for line in proc.stdout.splitlines() if line.startswith("    ") and len(line) > 40]
    assert len(paragraphs) == len(set(paragraphs)), proc.stdout
    proc = cli(MODELS / "convtranspose_decoder.onnx", tmp_path / "o.onnx", "--disable", "convtranspose_bn")
    assert proc.returncode == 0 and "rule convtranspose_bn is disabled" in proc.stderr


def test_declines_are_reported(tmp_path):
    proc = cli(MODELS / "net3d.onnx", tmp_path / "o.onnx")
    assert proc.returncode == 0, proc.stderr
    assert "declined 1" in proc.stderr and "is a graph output" in proc.stderr


def test_report_json_and_check(tmp_path):
    report = tmp_path / "r.json"
    proc = cli(MODELS / "net1d.onnx", tmp_path / "o.onnx", "--report", report)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    assert data["bn_before"] == 5 and len(data["folded"]) == 3 and data["verification"]["passed"]
    assert cli(MODELS / "net1d.onnx", "--check").returncode == 3
    assert cli(tmp_path / "o.onnx", "--check").returncode == 0


def test_float16_and_version(tmp_path):
    proc = cli(MODELS / "mobilenetv2_fp16.onnx", tmp_path / "o.onnx", "-q")
    assert proc.returncode == 0 and proc.stderr.count("\n") == 1, proc.stderr
    assert cli("--version").stdout.startswith("onnxfold ")


def test_console_script_entry_point():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "onnxfold"]
    assert ep.value == "onnxfold.cli:console"


def test_float64_model_is_verified_with_onnx_reference(tmp_path):
    src = tmp_path / "f64.onnx"
    onnx.save(conv_bn_model(dtype="float64"), src)
    proc = cli(src, tmp_path / "o.onnx")
    assert proc.returncode == 0, proc.stderr
    assert "onnx.reference" in proc.stderr



LEAVE = """
import atexit, logging, sys
from onnxfold.cli import leave
atexit.register(lambda: print("exit handler ran"))
logging.basicConfig(stream=sys.stderr)
logging.getLogger("t").warning("logged")
print("buffered " * 2000)  # stdout to a pipe: block-buffered, flushed before the process ends
leave(3)
"""


def test_the_command_line_leaves_without_teardown_but_with_what_an_exit_does(monkeypatch):
    """``python -m onnxfold`` ends with ``os._exit`` (the interpreter's teardown took 0.1 s of a ResNet-50
    run, issue 20) after what an exit does that matters: the exit handlers, logging, the buffered output;
    the exit code as given. With another thread alive, or a stream that cannot be flushed, the ordinary
    exit (which waits for the thread)."""
    import subprocess
    import sys

    from checks import child_env
    from onnxfold import cli as cli_module

    proc = subprocess.run([sys.executable, "-c", LEAVE], capture_output=True, text=True, env=child_env(),
                          timeout=120)
    assert proc.returncode == 3
    assert proc.stdout.count("buffered") == 2000 and "exit handler ran" in proc.stdout
    assert "logged" in proc.stderr
    monkeypatch.setattr(cli_module.os, "_exit", lambda code: pytest.fail("os._exit with another thread alive"))
    monkeypatch.setattr(cli_module.threading, "active_count", lambda: 2)
    with pytest.raises(SystemExit) as e:
        cli_module.leave(4)
    assert e.value.code == 4
    monkeypatch.setattr(cli_module.threading, "active_count", lambda: 1)
    monkeypatch.setattr(cli_module.atexit, "_run_exitfuncs", lambda: None)  # not this test process's handlers

    class Closed:
        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli_module.sys, "stdout", Closed())
    with pytest.raises(SystemExit) as e:
        cli_module.leave(5)
    assert e.value.code == 5
