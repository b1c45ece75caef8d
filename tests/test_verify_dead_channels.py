"""A channel the inputs never reach (found at stop 26 by planting wrong folds into corpus models by hand).

Verification runs both models on its inputs and compares each fold tensor per channel. Where a channel
of a depthwise Conv's input is zero on those inputs (a ReLU after a BatchNormalization whose shift
drives it negative: 29 of 48 input channels of Hugging Face's random-weight MobileNetV2 legacy export,
at its first depthwise Conv), the folded weights of that output channel are multiplied by zeros: a
wrong fold there (its sign flipped) gave the same tensors, and verification passed it. A fold tensor
with a channel that is one value on the inputs is now compared again where its inputs are random
values (verification.local.compare_on_random): the folded model's nodes for it against the original's,
from the same tensors.
"""

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxfold.driver as driver
from builders import bn_stats, tensor
from onnxfold import fold_file


def _dead_channel_model(seed: int = 0, c: int = 4) -> onnx.ModelProto:
    """x -> Conv 1x1 -> BN (channel 0's shift -100: dead after the ReLU) -> Relu -> depthwise Conv 3x3 -> BN -> y."""
    rng = np.random.default_rng(seed)
    g0, b0, m0, v0 = bn_stats(rng, c)
    b0[0] = -100.0  # channel 0 of the ReLU's output is 0 for any input in [-1, 1]
    g1, b1, m1, v1 = bn_stats(rng, c)
    inits = [tensor("w0", rng.normal(0, 0.5, (c, c, 1, 1)).astype(np.float32)),
             tensor("w1", rng.normal(0, 0.5, (c, 1, 3, 3)).astype(np.float32))]
    inits += [tensor(n, a) for n, a in zip(("g0", "b0", "m0", "v0", "g1", "b1", "m1", "v1"),
                                          (g0, b0, m0, v0, g1, b1, m1, v1))]
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"]),
        helper.make_node("BatchNormalization", ["c0", "g0", "b0", "m0", "v0"], ["bn0"]),
        helper.make_node("Relu", ["bn0"], ["r0"]),
        helper.make_node("Conv", ["r0", "w1"], ["c1"], group=c, pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "g1", "b1", "m1", "v1"], ["bn1"]),
        helper.make_node("Relu", ["bn1"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "dead", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, c, 6, 6])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, c, 6, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _plant(monkeypatch, which: int) -> None:
    """The ``which``-th folded weight made with its output channel 0 negated (a wrong fold)."""
    real, seen = driver._tensor, []

    def planted(g, value, dtype, what, name, sink):
        if what == "weight":
            seen.append(name)
            if len(seen) == which:
                value = np.array(np.asarray(value), copy=True)
                value[0] = -value[0]
        return real(g, value, dtype, what, name, sink)

    monkeypatch.setattr(driver, "_tensor", planted)


def test_a_wrong_fold_of_a_live_channel_fails(tmp_path, monkeypatch):
    """The control: the same plant on the first Conv (its input channels all live) fails verification."""
    src = tmp_path / "m.onnx"
    onnx.save(_dead_channel_model(), src)
    _plant(monkeypatch, 1)
    result = fold_file(src, tmp_path / "o.onnx")
    assert not result.verification and not (tmp_path / "o.onnx").exists()


def test_a_wrong_fold_of_a_channel_no_input_reaches_fails(tmp_path, monkeypatch):
    src = tmp_path / "m.onnx"
    onnx.save(_dead_channel_model(), src)
    _plant(monkeypatch, 2)  # the depthwise Conv: its output channel 0 reads only the dead channel 0
    result = fold_file(src, tmp_path / "o.onnx")
    assert not result.verification and not (tmp_path / "o.onnx").exists()
    fold = next(f for f in result.verification.results[0].folds if f.name == "bn1")
    assert not fold.passed and fold.channel == 0 and "on random values at its own inputs it fails" in fold.note


@pytest.mark.parametrize("external", [False, True])
def test_a_right_fold_of_a_channel_no_input_reaches_passes_and_says_so(tmp_path, external):
    """The right fold passes, compared on random values too; the note names the channel; with external
    data both models' local nodes read their weights where they lie."""
    src = tmp_path / "m.onnx"
    onnx.save(_dead_channel_model(1), src, save_as_external_data=external, all_tensors_to_one_file=True,
              size_threshold=0)
    result = fold_file(src, tmp_path / "o.onnx")
    assert result and (tmp_path / "o.onnx").exists()
    fold = next(f for f in result.verification.results[0].folds if f.name == "bn1")
    assert fold.passed and "1 channel(s) one value on these inputs (channel 0): on random values" in fold.note
    assert result.timings["verify_random_s"] > 0


@pytest.mark.parametrize("link", [False, True])
def test_large_inline_weights_are_read_where_they_lie_in_the_originals_file(tmp_path, monkeypatch, link):
    """The random comparison's local models take weights over memory.SMALL bytes (here the first Conv's,
    40x40 float32) by reference to where they lie in the model's file, not parsed (local._weights_in_place),
    through a symbolic link to the file too: the right fold passes on random values, a wrong one fails."""
    import importlib

    from onnxfold import isolation

    local = importlib.import_module("onnxfold.verification.local")
    said = tmp_path / "pointed.txt"  # the spy runs in verification's child: it tells through a file
    real_parse = local.parse_in_place

    def spy(fd, small, location):
        model, indices = real_parse(fd, small, location)
        with open(said, "a") as fh:
            fh.write(f"{location} {' '.join(map(str, indices))}\n")
        return model, indices

    monkeypatch.setattr(isolation, "WORKER", "fork")  # the spy reaches the child through the fork
    monkeypatch.setattr(local, "parse_in_place", spy)
    model = _dead_channel_model(1, c=40)
    assert len(model.graph.initializer[0].raw_data) > local.SMALL
    (tmp_path / "real").mkdir()
    onnx.save(model, tmp_path / "real" / "m.onnx")
    src = tmp_path / "m.onnx"
    if link:
        src.symlink_to(tmp_path / "real" / "m.onnx")
    else:
        src = tmp_path / "real" / "m.onnx"
    right = fold_file(src, tmp_path / "right.onnx")
    fold = next(f for f in right.verification.results[0].folds if f.name == "bn1")
    assert right and fold.passed and "on random values at its own inputs too" in fold.note
    _plant(monkeypatch, 2)
    wrong = fold_file(src, tmp_path / "o.onnx")
    assert not wrong.verification and not (tmp_path / "o.onnx").exists()
    fold = next(f for f in wrong.verification.results[0].folds if f.name == "bn1")
    assert not fold.passed and "on random values at its own inputs it fails" in fold.note
    lines = said.read_text().splitlines()  # each run read the original's first weight where it lies
    assert [line for line in lines if line.startswith("m.onnx")] == ["m.onnx 0", "m.onnx 0"]


def test_uniform_values_keep_to_their_scale_in_every_float_type():
    import ml_dtypes

    from onnxfold.verification.local import _uniform

    rng = np.random.default_rng(0)
    for dtype in (np.float16, ml_dtypes.bfloat16, np.float32, np.float64):
        dtype = np.dtype(dtype)
        top = float(ml_dtypes.finfo(dtype).max)  # a scale is a value of the dtype: its largest here
        for scale in (1.0, 3.0, top):
            v = _uniform(rng, (4, 1000), dtype, scale)
            wide = v.astype(np.float64)
            assert v.dtype == dtype and v.shape == (4, 1000)
            assert np.all(np.isfinite(wide)) and np.max(np.abs(wide)) <= scale
            assert wide.min() < -0.5 * scale and wide.max() > 0.5 * scale  # both signs, spread to the scale


def test_a_wrong_input_side_fold_into_a_depthwise_channel_no_input_reaches_fails(tmp_path, monkeypatch):
    """A Mul by a constant before the depthwise Conv folds into its input channels (rules.input_side):
    the same dead channel hides a wrong scale there; compared on random values, it fails."""
    model = _dead_channel_model(2)
    rng = np.random.default_rng(5)
    model.graph.initializer.append(tensor("s", rng.uniform(0.5, 2.0, (1, 4, 1, 1)).astype(np.float32)))
    relu = next(i for i, n in enumerate(model.graph.node) if n.op_type == "Relu")
    model.graph.node.insert(relu + 1, helper.make_node("Mul", ["r0", "s"], ["scaled"]))
    conv = next(n for n in model.graph.node if n.op_type == "Conv" and n.input[0] == "r0")
    conv.input[0] = "scaled"
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    right = fold_file(src, tmp_path / "right.onnx")
    assert right and [f.rule for f in right.report.folded] == ["conv_bn", "mul_conv", "conv_bn"]
    _plant(monkeypatch, 2)  # the Mul's fold into the depthwise Conv (the folds: conv_bn, mul_conv, conv_bn)
    result = fold_file(src, tmp_path / "o.onnx")
    assert not result.verification and not (tmp_path / "o.onnx").exists()


def test_a_channel_no_input_reaches_and_no_random_comparison_can_check_is_a_warning(tmp_path, monkeypatch, caplog):
    """Where the random comparison cannot be made (no walk from the fold tensor to tensors both models
    share), the fold passes as its inputs showed, and the run says which fold tensors went unexercised."""
    import importlib
    import logging

    from onnxfold import isolation

    job = importlib.import_module("onnxfold.verification.job")
    monkeypatch.setattr(isolation, "WORKER", "fork")  # the patch reaches the child through the fork
    monkeypatch.setattr(job, "compare_on_random", lambda *args, **kwargs: {})
    src = tmp_path / "m.onnx"
    onnx.save(_dead_channel_model(1), src)
    with caplog.at_level(logging.WARNING, logger="onnxfold"):
        result = fold_file(src, tmp_path / "o.onnx")
    assert result and (tmp_path / "o.onnx").exists()
    fold = next(f for f in result.verification.results[0].folds if f.name == "bn1")
    assert fold.passed and "not exercised by them, and not compared on random values" in fold.note
    warned = [w for w in result.verification.warnings if "not be compared on random values" in w]
    assert len(warned) == 1 and "(bn1)" in warned[0]
    assert any("not be compared on random values" in r.getMessage() for r in caplog.records)


def test_idle_channels_are_the_channels_of_one_value_along_the_axis_given():
    from onnxfold.verification.local import idle_channels

    rng = np.random.default_rng(0)
    a, b = (rng.normal(size=(3, 4, 5)).astype(np.float32) for _ in range(2))
    a[:, 2, :] = 0.5  # channel 2 of axis 1
    b[1, :, :] = 7.0  # channel 1 of axis 0
    assert idle_channels(a, 1) == [2] and idle_channels(a, 0) == [] and idle_channels(a, -1) == []
    assert idle_channels(b, 0) == [1] and idle_channels(b, 1) == []
    assert idle_channels(a[:1, :, :1], 1) == []  # one element a channel: nothing to tell
    assert idle_channels(np.zeros(5, np.float32), 0) == []  # no channels


def test_the_random_comparison_takes_its_shapes_from_the_early_runs_inference(tmp_path, monkeypatch):
    """Verification's child infers the original's shapes once, for its early run, while the parent folds:
    the random comparison reads its inputs' shapes from there (0.04 s of a second inference on a corpus
    model otherwise). With that second inference made to fail, the comparison is still made."""
    import importlib

    from onnxfold import isolation

    local = importlib.import_module("onnxfold.verification.local")

    def no_second_inference(*args, **kwargs):
        raise AssertionError("inferred again")

    monkeypatch.setattr(isolation, "WORKER", "fork")  # the patch reaches the child through the fork
    monkeypatch.setattr(local, "inferred_shapes", no_second_inference)
    src = tmp_path / "m.onnx"
    onnx.save(_dead_channel_model(1), src)
    result = fold_file(src, tmp_path / "o.onnx")
    assert result and (tmp_path / "o.onnx").exists()
    fold = next(f for f in result.verification.results[0].folds if f.name == "bn1")
    assert fold.passed and "on random values at its own inputs too" in fold.note
    # and the control: where the early run's inference is not there, the comparison infers again
    monkeypatch.setattr(importlib.import_module("onnxfold.verification.job"), "infer_candidates", lambda job_: None)
    again = fold_file(src, tmp_path / "o2.onnx")
    fold = next(f for f in again.verification.results[0].folds if f.name == "bn1")
    assert fold.passed and "not compared on random values (inferred again)" in fold.note


def test_random_values_of_a_graph_input_take_the_inputs_shape_and_dtype():
    """A walk that reads a graph input (the first fold of a model) is fed random values of the input's own
    shape and dtype, without shape inference."""
    from types import SimpleNamespace

    from onnxfold.verification import local

    feeds = {"x": np.ones((1, 4, 6, 6), np.float32), "k": np.ones((2,), np.int64)}
    job = SimpleNamespace(feeds=feeds)
    model = _dead_channel_model()
    values = local._random_values(job, "CPUExecutionProvider", model, ["x"], {}, np.random.default_rng(0), known={})
    assert values["x"].shape == (1, 4, 6, 6) and values["x"].dtype == np.float32
    assert np.std(values["x"]) > 0.5 and not np.all(values["x"] == 1)
    both = local._random_values(job, "CPUExecutionProvider", model, ["x", "r0"], {}, np.random.default_rng(0),
                                known={"r0": (onnx.TensorProto.FLOAT, (1, 4, 6, 6))})
    assert both["r0"].shape == (1, 4, 6, 6) and both["r0"].dtype == np.float32


# -- the original parsed for the random comparison while the parent folds ---------------------------------

@pytest.fixture
def parsed_ahead(tmp_path, monkeypatch):
    """The parent writes only once verification's child has run the original early (a marker file, a gate
    not a sleep), so the plan is still pending when the child looks; the child's parse ahead leaves a
    marker, and a parse in the random comparison itself (the path without it) raises there."""
    import importlib
    import time

    from onnxfold import isolation

    api = importlib.import_module("onnxfold.api")
    job = importlib.import_module("onnxfold.verification.job")
    local = importlib.import_module("onnxfold.verification.local")
    sessions = importlib.import_module("onnxfold.verification.sessions")
    marks = tmp_path / "marks"
    marks.mkdir()
    real_alone, real_write, real_parsed = sessions.run_alone, api.write, local.Parsed

    def run_alone(*args, **kwargs):
        out = real_alone(*args, **kwargs)
        (marks / "early").write_text("ran")
        return out

    def write(*args, **kwargs):
        deadline = time.monotonic() + 60
        while not (marks / "early").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return real_write(*args, **kwargs)

    class Ahead(real_parsed):
        def __init__(self, model):
            super().__init__(model)
            with open(marks / "ahead", "a") as fh:
                fh.write(f"{isolation.first_pending()}\n")

    class NotAgain(real_parsed):
        def __init__(self, model):
            raise RuntimeError("parsed again after the plan")

    monkeypatch.setattr(isolation, "WORKER", "fork")  # the patches reach the child through the fork
    monkeypatch.setattr(job, "run_alone", run_alone)
    monkeypatch.setattr(api, "write", write)
    monkeypatch.setattr(job, "Parsed", Ahead)
    monkeypatch.setattr(local, "Parsed", NotAgain)
    return marks


@pytest.mark.parametrize("external", [False, True])
def test_the_original_is_parsed_for_the_random_comparison_while_the_model_is_folded(tmp_path, parsed_ahead,
                                                                                     external):
    """A dead channel shows in the early run's outputs while the plan is pending: the child parses the
    original then, and the random comparison after the plan uses that parse (a second one would fail it)."""
    src = tmp_path / "m.onnx"
    onnx.save(_dead_channel_model(1), src, save_as_external_data=external, all_tensors_to_one_file=True,
              size_threshold=0)
    result = fold_file(src, tmp_path / "o.onnx")
    assert result and (tmp_path / "o.onnx").exists()
    assert (parsed_ahead / "ahead").read_text() == "True\n"  # once, the plan still pending
    fold = next(f for f in result.verification.results[0].folds if f.name == "bn1")
    assert fold.passed and "on random values at its own inputs too" in fold.note


def test_a_wrong_fold_of_a_dead_channel_fails_against_the_original_parsed_ahead(tmp_path, monkeypatch,
                                                                                parsed_ahead):
    src = tmp_path / "m.onnx"
    onnx.save(_dead_channel_model(), src)
    _plant(monkeypatch, 2)
    result = fold_file(src, tmp_path / "o.onnx")
    assert not result.verification and not (tmp_path / "o.onnx").exists()
    assert (parsed_ahead / "ahead").read_text() == "True\n"
    fold = next(f for f in result.verification.results[0].folds if f.name == "bn1")
    assert not fold.passed and "on random values at its own inputs it fails" in fold.note


def test_no_parse_ahead_without_a_channel_the_inputs_miss(tmp_path, parsed_ahead):
    """The early run shows no dead channel: nothing is parsed ahead (nor after: no random comparison)."""
    from test_verify_early import two_folds

    src = tmp_path / "m.onnx"
    onnx.save(two_folds(2), src)
    result = fold_file(src, tmp_path / "o.onnx")
    assert result and (parsed_ahead / "early").exists() and not (parsed_ahead / "ahead").exists()
    assert "verify_random_s" not in result.timings


def test_first_pending_is_whether_the_parents_word_is_still_to_come(monkeypatch):
    import os

    from onnxfold import isolation

    assert isolation.first_pending() is False  # not a gated child: nothing awaited
    r, w = os.pipe()
    monkeypatch.setattr(isolation, "_gate", r)
    try:
        assert isolation.first_pending() is True
        os.write(w, b"x")
        assert isolation.first_pending() is False
    finally:
        os.close(r)
        os.close(w)


def test_the_early_outputs_tell_a_channel_of_one_value_on_axis_1_or_the_last_of_2d():
    from onnxfold.verification.job import Early

    rng = np.random.default_rng(0)
    live4, live2 = rng.normal(size=(1, 3, 4, 4)), rng.normal(size=(2, 3))
    dead4 = live4.copy()
    dead4[:, 1] = 0.0
    dead2 = live2.copy()
    dead2[:, 2] = 5.0
    assert not Early({"a": live4, "b": live2}, {"a", "b"}, {}).idle()
    assert Early({"a": dead4, "b": live2}, {"a", "b"}, {}).idle()
    assert Early({"a": live4, "b": dead2}, {"a", "b"}, {}).idle()
    assert not Early({"y": dead4}, set(), {}).idle()  # a graph output the fold tensors do not include
    # looked for only while the plan is pending: once it has come, no tensor more is scanned
    asked = []
    assert not Early({"a": dead4}, {"a"}, {}).idle(while_=lambda: asked.append(1) or False) and asked == [1]
