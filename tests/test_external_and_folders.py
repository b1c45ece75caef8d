"""External data (read lazily, written once, copied as bytes), folder mode, the JSON report, --check."""

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import builders
from builders import conv_bn_model, count
from checks import MODELS, cli
from onnxfold import fold_model, verify
from onnxfold.load import load
from onnxfold.tensors import DataSink
from onnxfold.write import write


def external_model(folder: Path, name="m.onnx", channels=32) -> Path:
    """Conv -> BN plus an unrelated large constant that the fold must copy byte for byte."""
    return builders.external_model(folder, name, channels=channels, keep=channels, keep_seed=9)


def test_external_data_is_read_lazily_and_streamed(tmp_path):
    src = external_model(tmp_path)
    model, external = load(src)
    assert external and not model.graph.initializer[0].raw_data  # nothing read yet
    out = tmp_path / "out"
    out.mkdir()
    sink = DataSink(out / "f.onnx.data")
    folded, report = fold_model(model, copy=False, base_dir=tmp_path, sink=sink)
    assert len(report.folded) == 1
    w = next(t for t in folded.graph.initializer if t.name == "w_folded")
    assert w.data_location == onnx.TensorProto.EXTERNAL  # written to the data file as it was made
    files = write(folded, out / "f.onnx", base_dir=tmp_path, sink=sink, external=True)
    assert [f.name for f in files] == ["f.onnx", "f.onnx.data"]
    reloaded = onnx.load(out / "f.onnx")
    original = onnx.load(src)
    keep = lambda m: next(t for t in m.graph.initializer if t.name == "keep")  # noqa: E731
    assert numpy_helper.to_array(keep(reloaded)).tobytes() == numpy_helper.to_array(keep(original)).tobytes()
    assert verify(src, out / "f.onnx")


def test_command_line_with_external_data_out_equals_in(tmp_path):
    src = external_model(tmp_path)
    proc = cli(src, src)
    assert proc.returncode == 0, proc.stderr
    # The new data goes under a fresh name (the old model reads m.onnx.data until the model's rename),
    # and the old data file is removed after: one model, one data file.
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.1.data"]
    assert count(onnx.load(src), "BatchNormalization") == 0
    proc = cli(src, src)  # folding again in place goes back to the default name
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]
    assert verify(src, src)


def test_missing_or_truncated_data_file_is_an_input_error(tmp_path):
    src = external_model(tmp_path)
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    proc = cli(src, tmp_path / "o.onnx")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "truncated" in proc.stderr
    data.unlink()
    proc = cli(src, tmp_path / "o.onnx")
    assert proc.returncode == 2 and "is missing" in proc.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_external_data_options(tmp_path):
    src = tmp_path / "inline.onnx"
    onnx.save(conv_bn_model(cin=32, cout=32), src)
    assert cli(src, tmp_path / "a.onnx", "--external-data", "always", "--data-name", "weights.bin").returncode == 0
    assert (tmp_path / "weights.bin").exists()
    assert verify(src, tmp_path / "a.onnx")
    assert cli(src, tmp_path / "b.onnx").returncode == 0 and not (tmp_path / "b.onnx.data").exists()
    ext = external_model(tmp_path, "e.onnx")
    assert cli(ext, tmp_path / "c.onnx", "--external-data", "never").returncode == 0
    assert not (tmp_path / "c.onnx.data").exists() and verify(ext, tmp_path / "c.onnx")
    assert cli(src, tmp_path / "d.onnx", "--data-name", "../x").returncode == 2


def test_declined_fold_leaves_nothing_in_the_data_file(tmp_path):
    """A value that overflows is found while streaming: the data file is cut back."""
    model = conv_bn_model(dtype="float16", cin=64, cout=64, epsilon=1e-10)
    var = next(t for t in model.graph.initializer if t.name == "var")
    v = numpy_helper.to_array(var).copy()
    v[-1] = 0
    var.CopyFrom(numpy_helper.from_array(v, "var"))
    g = next(t for t in model.graph.initializer if t.name == "gamma")
    g.CopyFrom(numpy_helper.from_array(np.full(64, 4.0, np.float16), "gamma"))
    sink = DataSink(tmp_path / "d.data")
    _, report = fold_model(model, sink=sink)
    assert not report.folded and "overflows float16" in report.declined[0].reason
    sink.close()
    assert sink.offset == 0 and (tmp_path / "d.data").stat().st_size == 0


def _folder(tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    onnx.save(conv_bn_model(), src / "a.onnx")
    onnx.save(conv_bn_model(transpose=True, groups=2), src / "sub" / "b.onnx")
    external_model(src / "sub", "c.onnx")
    (src / "broken.onnx").write_bytes(b"not a model at all")
    return src


@pytest.mark.parametrize("jobs", [1, 2])
def test_folder_mode_with_a_broken_model(tmp_path, jobs):
    src = _folder(tmp_path)
    dst = tmp_path / "out"
    report = tmp_path / "r.json"
    proc = cli(src, dst, "-j", jobs, "--report", report)
    assert proc.returncode == 2, proc.stderr  # one failed: the exit code says so
    assert "broken.onnx:" in proc.stderr and "not a readable ONNX model" in proc.stderr
    assert "4 models: 3 ok, 1 failed" in proc.stderr
    assert "model" in proc.stderr and "BN before" in proc.stderr  # the summary table
    assert sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file()) == [
        "a.onnx", "sub/b.onnx", "sub/c.onnx", "sub/c.onnx.data"]
    for rel in ("a.onnx", "sub/b.onnx", "sub/c.onnx"):
        assert count(onnx.load(dst / rel), "BatchNormalization") == 0
    data = json.loads(report.read_text())
    assert data["totals"] == {"models": 4, "failed": 1, "folded": 3}
    by_name = {Path(m["input"]).name: m for m in data["models"]}
    assert by_name["broken.onnx"]["status"].startswith("error:")
    assert by_name["a.onnx"]["verification"]["passed"] is True


def test_folder_mode_all_good_and_check(tmp_path):
    src = _folder(tmp_path)
    (src / "broken.onnx").unlink()
    dst = tmp_path / "out"
    assert cli(src, dst, "-q").returncode == 0
    assert cli(src, "--check", "-q").returncode == 3
    assert cli(dst, "--check", "-q").returncode == 0


def test_json_report_schema(tmp_path):
    report = tmp_path / "r.json"
    proc = cli(MODELS / "net3d.onnx", tmp_path / "o.onnx", "--report", report)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    assert set(data) >= {"input", "output", "status", "bn_before", "bn_after", "rounds", "folded", "declined",
                         "left", "inlined_functions", "verification", "timings"}
    assert set(data["folded"][0]) == {"rule", "producer", "consumer", "graph", "dtype", "weight", "max_abs_weight",
                                      "output", "max_abs", "max_rel", "atol", "passed", "note"}
    # each fold is verified at its own tensor: its error and tolerance are in the report
    assert all(f["passed"] is True and 0 <= f["max_abs"] <= f["atol"] for f in data["folded"])
    assert set(data["declined"][0]) == {"rule", "producer", "consumer", "graph", "reason"}
    assert set(data["timings"]) >= {"load_s", "fold_s", "write_s", "verify_s"}
    v = data["verification"]
    assert v["passed"] and v["providers"][0]["provider"] == "cpu"
    assert set(v["providers"][0]["outputs"][0]) == {"name", "dtype", "shape", "max_abs", "max_rel", "atol", "rtol",
                                                    "passed"}
    assert data["status"] == "written"


def test_check_exit_codes(tmp_path):
    assert cli(MODELS / "resnet_block.onnx", "--check").returncode == 3
    assert cli(MODELS / "resnet_block.onnx", tmp_path / "o.onnx", "-q").returncode == 0
    proc = cli(tmp_path / "o.onnx", "--check")
    assert proc.returncode == 0 and not list(tmp_path.glob("*.tmp*"))
    report = tmp_path / "c.json"
    assert cli(MODELS / "net1d.onnx", "--check", "--report", report).returncode == 3
    assert json.loads(report.read_text())["status"] == "foldable"


def test_single_file_output_is_written_in_pieces_and_reads_back_whole(tmp_path):
    """Streamed tensors are appended to the graph in protobuf's wire format: onnx reads the same model."""
    model = conv_bn_model(cin=64, cout=64, spatial=5)
    model.doc_string = "doc"
    helper.set_model_props(model, {"k": "v"})
    sink = DataSink(tmp_path / "x.onnx.data")
    folded, report = fold_model(model, sink=sink)
    assert "w_folded" in sink.written
    expected = onnx.ModelProto()
    expected.CopyFrom(folded)
    for t in expected.graph.initializer:
        if t.name in sink.written:
            sink.file.flush()
            onnx.external_data_helper.load_external_data_for_tensor(t, str(tmp_path))
            t.data_location = onnx.TensorProto.DEFAULT  # inline now (onnx before 1.23 leaves it marked external)
            del t.external_data[:]
    files = write(folded, tmp_path / "x.onnx", sink=sink)
    assert files == [tmp_path / "x.onnx"]
    back = onnx.load(tmp_path / "x.onnx")
    onnx.checker.check_model(back, full_check=True)
    assert back.doc_string == "doc" and back.metadata_props[0].value == "v"
    by_name = lambda m: {t.name: numpy_helper.to_array(t).tobytes() for t in m.graph.initializer}  # noqa: E731
    assert by_name(back) == by_name(expected)
    assert verify(model, back)
