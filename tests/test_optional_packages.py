"""torch and onnx-graphsurgeon are optional: without them the suite still collects, and the tests that need
them skip with the reason (``pytest.importorskip``) instead of failing. conftest.py's ``--without`` hides
an installed package, so this runs on a machine that has both."""

from __future__ import annotations

import re
import subprocess
import sys

from checks import ROOT

HIDDEN = ["--without", "torch", "--without", "onnx_graphsurgeon"]


def _pytest(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *HIDDEN, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_the_suite_collects_without_torch_and_graphsurgeon():
    proc = _pytest("--collect-only", "tests")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"^\d+ tests collected", proc.stdout, re.M), proc.stdout[-3000:]


def test_their_tests_skip_with_the_reason_and_the_rest_pass():
    proc = _pytest("-rs", "tests/test_affine.py::test_matches_torch_fuse_conv_bn_weights",
                   "tests/test_bn_before_conv.py", "tests/test_api.py",
                   "tests/test_readme.py::test_python_example_runs_as_written")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "could not import 'torch'" in proc.stdout and "could not import 'onnx_graphsurgeon'" in proc.stdout
    counts = dict((k, int(n)) for n, k in re.findall(r"(\d+) (passed|skipped|failed|error)", proc.stdout))
    # 4 torch-oracle cases in test_affine, the torch test in test_bn_before_conv, 4 graphsurgeon tests in
    # test_api, the README's Python example (it ends with graphsurgeon)
    assert counts.get("skipped") == 10 and counts.get("passed", 0) > 0 and "failed" not in counts, proc.stdout[-3000:]
