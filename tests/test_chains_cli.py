"""Chains of folds into one producer, through the command line, with weights of real size.

Guards issue 9 defect 1: the first fold streams the producer's new weight to the output's data file
(weights of DataSink.THRESHOLD bytes or more); the next fold into the same producer must read it back
from there, not from the input's folder (it crashed with FileNotFoundError: <input dir>/<OUT>.onnx.data).
The superseded weight must not stay in the output's data file either.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from builders import bn_stats, count
from checks import cli, session
from onnxfold.tensors import DataSink


def _bn(rng, name, x, y, c):
    stats = bn_stats(rng, c)
    names = [f"{name}_{k}" for k in ("g", "b", "m", "v")]
    return helper.make_node("BatchNormalization", [x, *names], [y], name=name), [
        numpy_helper.from_array(a, n) for a, n in zip(stats, names)]


def chain_model(kind: str, channels: int = 32, kernel: int = 3, seed: int = 0) -> onnx.ModelProto:
    """x -> producer -> two or three per-channel affines, nodes in topological order, opset 13."""
    rng = np.random.default_rng(seed)
    c = channels
    inits, nodes = [], []
    transpose = kind.startswith("convtranspose")
    w = rng.normal(0, 0.2, (c, c, kernel, kernel)).astype(np.float32)
    inits += [numpy_helper.from_array(w, "W"), numpy_helper.from_array(rng.normal(0, 0.5, c).astype(np.float32), "B")]
    op = "ConvTranspose" if transpose else "Conv"
    nodes.append(helper.make_node(op, ["x", "W", "B"], ["p"], name="producer", pads=[1, 1, 1, 1]))
    per_channel = lambda: rng.uniform(0.5, 1.5, (1, c, 1, 1)).astype(np.float32)  # noqa: E731
    if kind == "conv_mul_bn":
        inits.append(numpy_helper.from_array(per_channel(), "s"))
        nodes.append(helper.make_node("Mul", ["p", "s"], ["t"], name="mul"))
        bn, stats = _bn(rng, "bn", "t", "y", c)
        nodes.append(bn)
        inits += stats
    elif kind == "conv_bn_add":
        bn, stats = _bn(rng, "bn", "p", "t", c)
        nodes.append(bn)
        inits += stats
        inits.append(numpy_helper.from_array(per_channel(), "a"))
        nodes.append(helper.make_node("Add", ["t", "a"], ["y"], name="add"))
    elif kind == "convtranspose_add_bn":
        inits.append(numpy_helper.from_array(per_channel(), "a"))
        nodes.append(helper.make_node("Add", ["p", "a"], ["t"], name="add"))
        bn, stats = _bn(rng, "bn", "t", "y", c)
        nodes.append(bn)
        inits += stats
    elif kind == "conv_bn_add0":  # an Add of zeros after BN: a second fold that changes nothing
        bn, stats = _bn(rng, "bn", "p", "t", c)
        nodes.append(bn)
        inits += stats
        inits.append(numpy_helper.from_array(np.zeros((1, c, 1, 1), np.float32), "zero"))
        nodes.append(helper.make_node("Add", ["t", "zero"], ["y"], name="add0"))
    elif kind == "conv_mul_bn_sub":  # three folds into one producer
        inits.append(numpy_helper.from_array(per_channel(), "s"))
        nodes.append(helper.make_node("Mul", ["p", "s"], ["t"], name="mul"))
        bn, stats = _bn(rng, "bn", "t", "u", c)
        nodes.append(bn)
        inits += stats
        inits.append(numpy_helper.from_array(per_channel(), "d"))
        nodes.append(helper.make_node("Sub", ["u", "d"], ["y"], name="sub"))
    else:
        raise ValueError(kind)
    graph = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, c, 8, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, c, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


FOLDS = {"conv_mul_bn": 2, "conv_bn_add": 2, "convtranspose_add_bn": 2, "conv_bn_add0": 2, "conv_mul_bn_sub": 3}


def _run(path, x):
    return session(path).run(None, {"x": x})[0]


def _external_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            total += int({e.key: e.value for e in t.external_data}["length"])
    return total


@pytest.mark.parametrize("kind", sorted(FOLDS))
@pytest.mark.parametrize("options", [[], ["--external-data", "always"], ["--external-data", "never"], ["--no-verify"]],
                         ids=["auto", "always", "never", "no-verify"])
def test_chain_folds_through_the_command_line(tmp_path, kind, options):
    model = chain_model(kind)
    assert numpy_helper.to_array(model.graph.initializer[0]).nbytes >= DataSink.THRESHOLD  # streamed
    src = tmp_path / "in.onnx"
    onnx.save(model, src)
    out = tmp_path / "out" / "folded.onnx"
    out.parent.mkdir()
    proc = cli(src, out, *options)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    folded = onnx.load(out, load_external_data=False)
    assert [n.op_type for n in folded.graph.node] == [model.graph.node[0].op_type]
    onnx.checker.check_model(str(out), full_check=True)
    data = out.parent / "folded.onnx.data"
    if options == ["--external-data", "always"]:
        # only live tensors in the data file: the first fold's weight was superseded by the second's
        live = _external_bytes(folded)
        assert live > 0 and data.stat().st_size == live
    else:
        assert not data.exists()
    x = np.random.default_rng(1).uniform(-1, 1, (1, 32, 8, 8)).astype(np.float32)
    ref, got = _run(src, x), _run(out, x)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


def test_chain_folds_in_folder_mode(tmp_path):
    src_dir = tmp_path / "in"
    src_dir.mkdir()
    for kind in FOLDS:
        onnx.save(chain_model(kind), src_dir / f"{kind}.onnx")
    proc = cli(src_dir, tmp_path / "out", "-j", "2", "--external-data", "always")
    assert proc.returncode == 0, proc.stderr
    for kind in FOLDS:
        out = tmp_path / "out" / f"{kind}.onnx"
        onnx.checker.check_model(str(out), full_check=True)
        assert count(onnx.load(out), "BatchNormalization") == 0


def test_chain_weight_of_several_mib_is_written_once(tmp_path):
    """Above the 1 MiB alignment threshold: the compacted data file keeps alignment and only live bytes."""
    model = chain_model("conv_mul_bn_sub", channels=128, kernel=5)  # 1.6 MB weight
    src = tmp_path / "in.onnx"
    onnx.save(model, src)
    out = tmp_path / "out.onnx"
    proc = cli(src, out, "--external-data", "always")
    assert proc.returncode == 0, proc.stderr
    folded = onnx.load(out, load_external_data=False)
    weight = next(t for t in folded.graph.initializer if t.name == folded.graph.node[0].input[1])
    info = {e.key: int(e.value) if e.key != "location" else e.value for e in weight.external_data}
    assert info["offset"] % DataSink.ALIGN == 0
    size = (tmp_path / "out.onnx.data").stat().st_size
    assert size < 2 * info["length"]  # three folds wrote it three times; one copy is left
    x = np.random.default_rng(2).uniform(-1, 1, (1, 128, 8, 8)).astype(np.float32)
    ref, got = _run(src, x), _run(out, x)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))
