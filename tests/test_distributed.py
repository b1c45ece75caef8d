"""examples/fold_on_dask.py: many models folded on a Dask cluster (a local one, two worker processes),
results gathered as FoldResult.to_dict(), a failure reported with its own model while the others are
written; FoldResult pickles (for engines that return objects)."""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import onnx
import pytest

from builders import conv_bn_model
from checks import assert_close, feeds_for, run
from onnxfold import fold_file

ROOT = Path(__file__).resolve().parent.parent


def _example():
    spec = importlib.util.spec_from_file_location("fold_on_dask_example", ROOT / "examples" / "fold_on_dask.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fold_result_pickles(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(seed=2), src)
    result = fold_file(src, tmp_path / "o.onnx")
    again = pickle.loads(pickle.dumps(result))
    assert again.to_dict() == result.to_dict() and bool(again) and again.report.folded


def test_models_fold_on_a_local_dask_cluster(tmp_path):
    pytest.importorskip("dask.distributed")
    from dask.distributed import Client, LocalCluster

    example = _example()
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    (in_dir / "sub").mkdir(parents=True)
    models = {"a.onnx": conv_bn_model(seed=1), "sub/b.onnx": conv_bn_model(cin=4, cout=6, seed=2)}
    for name, model in models.items():
        onnx.save(model, in_dir / name)
    (in_dir / "broken.onnx").write_bytes(b"not a model")
    pairs = example.pairs_below(in_dir, out_dir)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        results = example.fold_many(client, pairs)
    by_input = {Path(r["input"]).relative_to(in_dir).as_posix(): r for r in results}
    assert set(by_input) == {"a.onnx", "sub/b.onnx", "broken.onnx"}
    assert by_input["broken.onnx"]["status"].startswith("error: ") and "not a readable ONNX model" in \
        by_input["broken.onnx"]["status"]
    assert not (out_dir / "broken.onnx").exists()
    for name, model in models.items():
        r = by_input[name]
        assert r["status"] == "written" and len(r["folded"]) == 1 and r["verification"]["passed"], r
        folded = onnx.load(out_dir / name)
        assert [n.op_type for n in folded.graph.node] == ["Conv"]
        feeds = feeds_for(model, 0)
        assert_close(run(model, feeds), run(folded, feeds), name)


def test_fold_task_never_raises(tmp_path, monkeypatch):
    """A task reports what went wrong with its own model: the user's file (error: one line) or a bug
    (crashed: with the traceback), so one model cannot take a whole job array or cluster map down."""
    import onnxfold.api as api

    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x00\x01")
    data = api.fold_task(broken, tmp_path / "o.onnx")
    assert data["status"].startswith("error: ") and "traceback" not in data
    src = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(seed=4), src)

    def boom(*args, **kwargs):
        raise RuntimeError("planted bug")

    monkeypatch.setattr(api, "fold_model", boom)
    data = api.fold_task(src, tmp_path / "o.onnx")
    assert data["status"] == "crashed: RuntimeError: planted bug" and "planted bug" in data["traceback"]
    assert not (tmp_path / "o.onnx").exists()
