"""Real models nobody on this project wrote, folded through the command line (issue 9).

Two sets, same checks:

- ``tests/corpus/``: a few small models built by tools/corpus.py and committed with their
  manifest (tiny transformers ResNet and LeViT exports, one PaddleOCR model from a PyPI wheel),
  plus the onnx wheel's own ``onnx/backend/test/data/light/*.onnx`` (IR 3; installed with onnx).
  These always run, in CI too.
- the full corpus cache built by ``python tools/corpus.py`` (``$ONNXFOLD_CORPUS`` or
  ``~/.cache/onnxfold-corpus``): skipped, with the reason, when it is absent.

For each model: ``python -m onnxfold IN OUT --report R.json`` in a subprocess with default
verification (dynamic dimensions left to onnxfold's defaults, as a new user runs it; a record's
``cli_args`` in the manifest would add options, none needs any today); the exit code is 0; the output
passes ``onnx.checker`` (full check); it has no more BatchNormalization than the input; and it matches
the original in onnxruntime (ORT_DISABLE_ALL, CPU) on seeded random inputs within
``corpus.TOL_K[dtype] * max(1, max|ref|)`` (1e-4 for float32: about 1000 ulp at 1; see tools/corpus.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import onnx
import pytest

from checks import ROOT, cli

COMMITTED = ROOT / "tests" / "corpus"
LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
CACHE = Path(os.environ.get("ONNXFOLD_CORPUS") or Path.home() / ".cache" / "onnxfold-corpus").expanduser()

_spec = importlib.util.spec_from_file_location("onnxfold_corpus_tool", ROOT / "tools" / "corpus.py")
corpus = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(corpus)

pytestmark = pytest.mark.corpus

# Known defects, by path in the corpus: {path: (name, text)} or a list of them in the order a model
# meets them. The command line is expected to fail with that text in its output (strict: once fixed,
# the test passes its checks and then fails, telling to delete the entry). Issue 9's defects 1, 2 and 8
# (10 models crashed with FileNotFoundError on chained folds, 1 on a dim_value of -1, PaddleOCR's
# detector was a false alarm) are fixed: none is left.
KNOWN_DEFECTS: dict = {}


def _committed_cases():
    cases = [pytest.param(COMMITTED, r, id=f"committed/{r['file']}") for r in corpus.load_records(COMMITTED)]
    for src in sorted(LIGHT.glob("*.onnx")):
        record = {"file": src.name, "key": f"backend/{src.name}", "kind": "onnx-backend"}
        cases.append(pytest.param(LIGHT, record, id=f"onnx-light/{src.name}"))
    return cases


def _cache_cases():
    records = corpus.load_records(CACHE)
    if not records:
        return [pytest.param(None, None, id="cache", marks=pytest.mark.skip(
            reason=f"no corpus cache at {CACHE} (build it with `python tools/corpus.py`, "
                   f"or set ONNXFOLD_CORPUS)"))]
    return [pytest.param(CACHE, r, id=f"cache/{r['file']}") for r in records]


def fold_and_check(root: Path, record: dict, tmp_path: Path) -> None:
    src = root / record["file"]
    defects = KNOWN_DEFECTS.get(record.get("key", record["file"]))
    defects = [defects] if isinstance(defects, tuple) else (defects or [])
    out = tmp_path / "folded.onnx"
    rep = tmp_path / "report.json"
    proc = cli(src, out, "--report", rep, *record.get("cli_args", []), timeout=600)
    if defects and proc.returncode != 0:
        hit = [d for d in defects if d[1] in proc.stdout + proc.stderr]
        assert hit, f"exit {proc.returncode}, expected one of {defects}\n{proc.stdout[-1500:]}\n{proc.stderr[-2000:]}"
        pytest.xfail(f"{hit[0][0]}: {hit[0][1]}")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]

    onnx.checker.check_model(str(out), full_check=True)
    report = json.loads(rep.read_text())
    before, after = corpus.count_bn(src), corpus.count_bn(out)
    assert (report["bn_before"], report["bn_after"]) == (before, after)
    assert after <= before
    if report["folded"]:
        assert report["verification"]["passed"] is True
    else:  # nothing folded: onnxfold skips verification and says so
        assert "verification" not in report and "verification skipped" in proc.stderr + proc.stdout
    # every BatchNormalization left in the main graph is explained, with a sentence, in left[]
    # or declined[] of the report (its name there is the node's name)
    explained = {d["consumer"]: d["reason"] for d in report["left"] + report["declined"]}
    folded_graph = onnx.load(str(out), load_external_data=False).graph
    for node in folded_graph.node:
        if node.op_type == "BatchNormalization" and node.name:
            assert explained.get(node.name, "").strip(), f"{node.name} left without a reason"

    feeds = corpus.make_inputs(src, record, seed=7)
    rows = corpus.compare_outputs(corpus.run_ort(src, feeds), corpus.run_ort(out, feeds))
    bad = [r for r in rows if not r["passed"]]
    assert not bad, bad
    if defects:
        pytest.fail(f"{src.name} no longer hits {[d[0] for d in defects]}: delete its KNOWN_DEFECTS entry")


@pytest.mark.parametrize("root,record", _committed_cases())
def test_committed_corpus(root, record, tmp_path):
    fold_and_check(root, record, tmp_path)


@pytest.mark.parametrize("root,record", _cache_cases())
def test_cache_corpus(root, record, tmp_path):
    fold_and_check(root, record, tmp_path)


def test_committed_manifest_matches_files():
    """The committed models are the bytes their manifest records (source, license, sha256)."""
    records = corpus.load_records(COMMITTED)
    manifest = json.loads((COMMITTED / "manifest.json").read_text())["models"]
    assert len(records) == len(manifest) >= 4
    for r in records:
        assert corpus.sha256(COMMITTED / r["file"]) == r["sha256"], r["file"]
        assert r["source"] and r["license"]
        if r.get("data_file"):
            assert (COMMITTED / r["data_file"]).exists()
        assert corpus.count_bn(COMMITTED / r["file"]) == r["bn_nodes"] > 0


def test_comparison_catches_a_wrong_model(tmp_path):
    """Guards the oracle of this file: the onnxruntime comparison must fail when one
    BatchNormalization's scale is off by 1% in a committed real model (a wrong fold would look
    like this), and pass on the unchanged model."""
    import numpy as np
    from onnx import numpy_helper

    record = next(r for r in corpus.load_records(COMMITTED) if r["file"] == "hf/resnet_basic_legacy.onnx")
    src = COMMITTED / record["file"]
    model = onnx.load(str(src))
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    inits = {t.name: t for t in model.graph.initializer}
    scale = numpy_helper.to_array(inits[bn.input[1]])
    inits[bn.input[1]].CopyFrom(numpy_helper.from_array((scale * np.float32(1.01)).astype(scale.dtype),
                                                        bn.input[1]))
    wrong = tmp_path / "wrong.onnx"
    onnx.save(model, str(wrong))
    feeds = corpus.make_inputs(src, record, seed=7)
    ref = corpus.run_ort(src, feeds)
    assert all(r["passed"] for r in corpus.compare_outputs(ref, corpus.run_ort(src, feeds)))
    rows = corpus.compare_outputs(ref, corpus.run_ort(wrong, feeds))
    assert not all(r["passed"] for r in rows), rows
