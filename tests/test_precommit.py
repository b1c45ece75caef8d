"""The pre-commit hook (.pre-commit-hooks.yaml) and ``onnxfold-check``, ``--check`` on many files."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from onnxfold import fold_model
from onnxfold.precommit import main

ROOT = Path(__file__).resolve().parent.parent
HOOKS = (ROOT / ".pre-commit-hooks.yaml").read_text()


def _field(name: str) -> str:
    m = re.search(rf"^\s+{name}: (.+)$", HOOKS, re.M)
    assert m, f".pre-commit-hooks.yaml has no {name}"
    return m.group(1).strip()


@pytest.fixture
def models(tmp_path):
    """A foldable model, the same model folded, and a foldable model with external data."""
    foldable = tmp_path / "foldable.onnx"
    shutil.copy(ROOT / "models" / "resnet_block.onnx", foldable)
    folded = tmp_path / "folded.onnx"
    onnx.save(fold_model(onnx.load(foldable))[0], folded)
    for name in ("resnet_block_extdata.onnx", "resnet_block_extdata.onnx.data"):
        shutil.copy(ROOT / "models" / name, tmp_path / name)
    return foldable, folded, tmp_path / "resnet_block_extdata.onnx"


def test_hook_runs_a_declared_console_script_on_onnx_files():
    assert re.search(r"^- id: onnxfold-check$", HOOKS, re.M)
    entry = _field("entry")
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(rf'^{re.escape(entry)} = "onnxfold\.precommit:console"', pyproject, re.M)
    files = re.compile(_field("files"))
    assert files.search("models/a.onnx") and not files.search("models/a.onnx.data")
    assert _field("language") == "python"


def test_foldable_files_fail_and_are_named(models, capsys):
    foldable, folded, external = models
    assert main([str(folded), str(foldable), str(external)]) == 3
    err = capsys.readouterr().err
    summary = err.strip().splitlines()[-1]
    assert summary.startswith("onnxfold-check: 2 of 3 model(s) can be folded")
    assert str(foldable) in summary and str(external) in summary and str(folded) not in summary
    assert err.count("FOLDABLE | ") == 2 and err.count("PASSED | ") == 1


def test_folded_files_pass(models, capsys):
    _, folded, _ = models
    assert main([str(folded), str(folded)]) == 0
    assert "can be folded" not in capsys.readouterr().err


def test_options_apply_to_every_file(models):
    foldable, _, external = models
    assert main(["--disable", "conv_bn", str(foldable), str(external)]) == 0  # its only folds are conv_bn


def test_unreadable_file_is_an_input_error_over_foldable(models, tmp_path, capsys):
    foldable, _, _ = models
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    assert main([str(foldable), str(broken)]) == 2
    err = capsys.readouterr().err
    assert f"could not be checked: {broken}" in err and "Traceback" not in err


def test_no_files_is_a_usage_error(capsys):
    assert main([]) == 2
    assert capsys.readouterr().err == "onnxfold-check: error: expected one or more .onnx files\n"


@pytest.mark.skipif(not shutil.which("pre-commit") or not os.environ.get("ONNXFOLD_LONG_TESTS"),
                    reason="needs pre-commit and ONNXFOLD_LONG_TESTS=1 (installs the hook's environment "
                           "from PyPI, ~1 min)")
def test_pre_commit_try_repo(models, tmp_path):
    """The hook from this repository (its working tree, staged changes included) refuses a foldable model."""
    foldable, folded, _ = models
    repo = tmp_path / "repo"
    (repo / "models").mkdir(parents=True)
    shutil.copy(foldable, repo / "models" / "unfolded.onnx")
    shutil.copy(folded, repo / "models" / "folded.onnx")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "."], cwd=repo, check=True)

    def try_repo() -> subprocess.CompletedProcess:
        return subprocess.run(["pre-commit", "try-repo", str(ROOT), "onnxfold-check", "--all-files"], cwd=repo,
                              capture_output=True, text=True)

    proc = try_repo()
    assert proc.returncode == 1 and "exit code: 3" in proc.stdout, proc.stdout + proc.stderr
    assert "can be folded (python -m onnxfold IN.onnx OUT.onnx): models/unfolded.onnx" in proc.stdout
    subprocess.run([sys.executable, "-m", "onnxfold", "models/unfolded.onnx", "models/unfolded.onnx", "-q"], cwd=repo,
                   check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    proc = try_repo()
    assert proc.returncode == 0 and "Passed" in proc.stdout, proc.stdout + proc.stderr
