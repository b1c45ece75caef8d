"""A single-file model's large weights are left in its file at the load, not parsed (issue 20: parsing
ResNet-50's 103 MB took 0.13 s of a 0.5 s run), read from there by the fold and copied from there by
the write; the file is held open from the load on, so every read of the run sees the file as it was
loaded, whatever is renamed over its path meanwhile."""

import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from checks import assert_user_error, cli, feeds_for, run
from onnxfold import InputError, fold_conv_bn, fold_file
from onnxfold import api as onnxfold_api
from onnxfold.load import LEFT_FROM, load
from onnxfold.protobuf import GRAPH_INITIALIZER, MODEL_GRAPH, TENSOR_RAW_DATA, length_delimited
from onnxfold.tensors import Held, read_tensor


def two_conv_model(seed: int) -> onnx.ModelProto:
    """Conv -> BatchNormalization -> Relu -> Conv: the first weight is folded, the second (over
    LEFT_FROM bytes, like the first) is written unchanged. Statistics random and non-trivial."""
    rng = np.random.default_rng(seed)
    c = 64
    w1 = rng.normal(0, 0.1, (c, c, 3, 3)).astype(np.float32)
    w2 = rng.normal(0, 0.1, (c, c, 3, 3)).astype(np.float32)
    assert w1.nbytes > LEFT_FROM
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
             numpy_helper.from_array(rng.normal(0, 1, c).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.normal(0.3, 0.5, c).astype(np.float32), "beta"),
             numpy_helper.from_array(rng.normal(0.2, 0.5, c).astype(np.float32), "mean"),
             numpy_helper.from_array(rng.uniform(0.5, 2.0, c).astype(np.float32), "var")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["n1"], epsilon=1e-3),
             helper.make_node("Relu", ["n1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, c, 8, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, c, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_large_weights_stay_in_the_file_and_the_output_is_the_fold_of_the_parsed_model(tmp_path):
    m = two_conv_model(1)
    src, dst = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(m, src)
    held = Held()
    try:
        loaded, external = load(src, held)
    finally:
        held.close()
    left = {t.name for t in loaded.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert left == {"w1", "w2"} and not external  # the model's own file is not external data
    assert all(e.value == "m.onnx" for t in loaded.graph.initializer for e in t.external_data if e.key == "location")
    result = fold_file(src, dst)
    assert result and result.verification
    written = onnx.load(dst)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in written.graph.initializer)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "out.onnx"]
    expected = values(fold_conv_bn(onnx.load(src)))
    got = values(written)
    assert got.keys() == expected.keys()
    for name in got:
        assert np.array_equal(got[name], expected[name]), name
    assert np.array_equal(got["w2"], numpy_helper.to_array(m.graph.initializer[1]))


def test_external_data_output_copies_the_weights_from_the_input_file(tmp_path):
    m = two_conv_model(2)
    src, dst = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(m, src)
    assert fold_file(src, dst, external_data="always")
    written = onnx.load(dst)  # with its data file
    assert (tmp_path / "out.onnx.data").is_file()
    expected = values(fold_conv_bn(onnx.load(src)))
    for name, value in values(written).items():
        assert np.array_equal(value, expected[name]), name


def test_the_run_reads_the_file_as_loaded_though_another_is_renamed_over_it(tmp_path, monkeypatch):
    """Another run writes the input's path (a rename) after this run's load, before its fold: the fold
    and the write still read the weights of the file loaded, at the same offsets of a same-shaped file
    that holds other values."""
    src, dst = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(two_conv_model(3), src)
    expected = values(fold_conv_bn(onnx.load(src)))
    other = tmp_path / "other.onnx"
    onnx.save(two_conv_model(4), other)
    real_fold = onnxfold_api.fold_model

    def fold_after_rename(*args, **kwargs):
        os.replace(other, src)  # the gate: between this run's load and its fold
        return real_fold(*args, **kwargs)

    monkeypatch.setattr(onnxfold_api, "fold_model", fold_after_rename)
    assert fold_file(src, dst, verify=False)
    assert not other.exists()
    got = values(onnx.load(dst))
    for name in got:
        assert np.array_equal(got[name], expected[name]), name


def test_the_run_reads_external_data_as_loaded_though_another_file_is_renamed_over_it(tmp_path, monkeypatch):
    """The same for a model with external data: its data file is held open from the load on (each read a
    pread there, not an open of the path), so a data file renamed over it before the fold is not read."""
    src, dst = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(two_conv_model(5), src, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    expected = values(fold_conv_bn(onnx.load(src)))
    (tmp_path / "other").mkdir()
    onnx.save(two_conv_model(6), tmp_path / "other" / "m.onnx", save_as_external_data=True,
              location="m.onnx.data", size_threshold=0)
    real_fold = onnxfold_api.fold_model

    def fold_after_rename(*args, **kwargs):
        os.replace(tmp_path / "other" / "m.onnx.data", tmp_path / "m.onnx.data")  # the gate
        return real_fold(*args, **kwargs)

    monkeypatch.setattr(onnxfold_api, "fold_model", fold_after_rename)
    assert fold_file(src, dst, verify=False, external_data="never")
    got = values(onnx.load(dst))
    for name in got:
        assert np.array_equal(got[name], expected[name]), name


def test_data_files_past_the_held_ones_are_read_by_their_path(tmp_path, monkeypatch):
    """A model with a data file per tensor holds the first HELD_DATA_FILES (here 2) from the load and
    reads the others by their path: the fold is the same."""
    from onnxfold import load as onnxfold_load

    monkeypatch.setattr(onnxfold_load, "HELD_DATA_FILES", 2)
    src, dst = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(two_conv_model(7), src, save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    assert len([f for f in os.listdir(tmp_path) if f != "m.onnx"]) == 7
    opened = []
    real_open = Held.open

    def counting(self, path):
        opened.append(os.path.basename(path))
        return real_open(self, path)

    monkeypatch.setattr(Held, "open", counting)
    assert fold_file(src, dst, external_data="never")
    assert len(opened) == 2 and "m.onnx" not in opened  # two data files; the model's own is small
    expected = values(fold_conv_bn(onnx.load(src)))
    got = values(onnx.load(dst))
    for name in got:
        assert np.array_equal(got[name], expected[name]), name


def test_a_left_weight_of_the_wrong_size_is_one_line(tmp_path):
    m = two_conv_model(5)
    w2 = m.graph.initializer[1]
    w2.raw_data = w2.raw_data[:-4]
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    proc = cli(src, tmp_path / "out.onnx")
    assert_user_error(proc, f"tensor 'w2' has {len(w2.raw_data)} bytes of raw_data, but its dims [64, 64, 3, 3] "
                            f"need {len(w2.raw_data) + 4}")
    assert not (tmp_path / "out.onnx").exists()


def test_a_truncated_file_is_one_line(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(two_conv_model(6), src)
    data = src.read_bytes()
    src.write_bytes(data[: len(data) - 1000])
    with pytest.raises(InputError, match="not a readable ONNX model"):
        fold_file(src, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_a_graph_in_two_fields_and_a_tensor_with_two_raw_data_fields_load_as_protobuf_reads_them(tmp_path):
    """Protobuf merges a message field given twice (the initializers appended) and keeps the last of a
    bytes field given twice: the weights left in the file must be the ones protobuf would read."""
    rng = np.random.default_rng(7)
    m = two_conv_model(7)
    w2 = m.graph.initializer[1]
    first = rng.normal(size=(64, 64, 3, 3)).astype(np.float32)
    second = numpy_helper.to_array(w2)
    head = onnx.TensorProto()
    head.CopyFrom(w2)
    head.ClearField("raw_data")
    del m.graph.initializer[1]

    def model_bytes(*raw: bytes) -> bytes:
        tensor = head.SerializeToString() + b"".join(length_delimited(TENSOR_RAW_DATA, len(r)) + r for r in raw)
        extra_graph = length_delimited(GRAPH_INITIALIZER, len(tensor)) + tensor
        return m.SerializeToString() + length_delimited(MODEL_GRAPH, len(extra_graph)) + extra_graph

    src = tmp_path / "m.onnx"
    # w2 (the 7th initializer, in the second graph field) left in the file, and checked as such
    for raw in ([second.tobytes()[:-4]], [first.tobytes(), second.tobytes()[:-4]]):  # the last is kept: short
        src.write_bytes(model_bytes(*raw))
        with pytest.raises(InputError, match=f"tensor 'w2' has {second.nbytes - 4} bytes of raw_data"):
            fold_file(src, tmp_path / "out.onnx")
    src.write_bytes(model_bytes(second.tobytes()))
    held = Held()
    try:
        loaded, _ = load(src, held)
    finally:
        held.close()
    assert [t.name for t in loaded.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL] == ["w1", "w2"]
    src.write_bytes(model_bytes(first.tobytes(), second.tobytes()))
    parsed = onnx.load(src)
    assert np.array_equal(values(parsed)["w2"], second)
    held = Held()
    try:
        loaded, _ = load(src, held)
        got = {t.name: np.array(read_tensor(t, tmp_path)) for t in loaded.graph.initializer}
    finally:
        held.close()
    for name, value in values(parsed).items():
        assert np.array_equal(got[name], value), name
    dst = tmp_path / "out.onnx"
    assert fold_file(src, dst)
    feeds = feeds_for(parsed)
    ref, out = run(parsed, feeds)["y"], run(onnx.load(dst), feeds)["y"]
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


@pytest.mark.parametrize("folder", [False, True])
def test_a_model_linked_from_another_folder_folds(tmp_path, folder):
    """The input a link to a model in another folder (a Hugging Face cache's snapshot links to its blob,
    a folder of links to a corpus): its weights, pointed to by the link's name, would resolve outside
    the link's folder, which external data may not; 71f9a92 refused every such model with a weight
    over LEFT_FROM bytes. Such a file is parsed as before."""
    (tmp_path / "blobs").mkdir()
    (tmp_path / "in").mkdir()
    m = two_conv_model(7)
    onnx.save(m, tmp_path / "blobs" / "m.onnx")
    os.symlink(tmp_path / "blobs" / "m.onnx", tmp_path / "in" / "m.onnx")
    if folder:
        r = cli(tmp_path / "in", tmp_path / "out", "-j", "2")
        out = tmp_path / "out" / "m.onnx"
    else:
        out = tmp_path / "out.onnx"
        r = cli(tmp_path / "in" / "m.onnx", out)
    assert r.returncode == 0, r.stdout + r.stderr
    folded = onnx.load(out)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu", "Conv"]
    x = feeds_for(m)
    want = run(m, x)["y"]
    np.testing.assert_allclose(run(folded, x)["y"], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
