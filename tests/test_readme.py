"""The README's commands work as written: the fold command runs verbatim; the install commands name
extras and paths that exist. (Installing inside the test suite would recurse; CI runs the test
command itself.)"""

import re
import shlex
import subprocess
import sys
from importlib.metadata import metadata, requires
from pathlib import Path

import pytest

from checks import ROOT

README = (ROOT / "README.md").read_text()


def command(tag: str) -> str:
    m = re.search(rf"<!-- readme-command: {tag} -->\s*```sh\n(.+?)\n```", README, re.S)
    assert m, f"README has no '{tag}' command"
    return m.group(1).strip()


def test_fold_command_runs_as_written(tmp_path):
    install, _, fold = command("fold").partition(" && ")
    assert install == "pip install ."
    argv = shlex.split(fold)
    assert argv[:3] == ["python", "-m", "onnxfold"]
    out = tmp_path / Path(argv[4]).name
    proc = subprocess.run([sys.executable, *argv[1:4], str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "folded 10 of 10 BatchNormalization" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("PASSED | ")


def test_test_command_names_a_real_extra():
    install, _, test = command("test").partition(" && ")
    extra = re.search(r"\[(\w+)\]", install).group(1)
    assert extra in metadata("onnxfold").get_all("Provides-Extra")
    assert any(r.startswith("pytest") and f'extra == "{extra}"' in r for r in requires("onnxfold"))
    assert test == "python -m pytest -q"


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_python_example_runs_as_written(monkeypatch):
    blocks = re.findall(r"```python\n(.+?)\n```", README, re.S)
    assert blocks, "README has no Python example"
    monkeypatch.chdir(ROOT)
    for code in blocks:
        if "import torch" in code and not all(_importable(m) for m in ("torch", "onnxscript")):
            continue  # the ONNXProgram example needs torch's dynamo exporter (the test extra has it)
        if "import onnx_ir" in code and not _importable("onnx_ir"):
            continue  # the pass example needs onnx_ir (the test extra has it, through onnxscript)
        if "import onnx_graphsurgeon" in code:  # the example's last lines; graphsurgeon is optional
            pytest.importorskip("onnx_graphsurgeon")
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
        assert namespace["result"]  # the example's verification passed
        assert namespace["report"].bn_after == 0
