"""Verification catches a wrong fold, on every kind of input and output, and says what it would need."""

import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import conv_bn_model
from checks import child_env, cli
from onnxfold import VerifyError, fold_model, verify
from onnxfold.verification import compare, make_inputs, parse_shape

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def _perturb(model, name, delta):
    t = next(t for t in model.graph.initializer if t.name == name)
    a = numpy_helper.to_array(t).copy()
    a.flat[0] += delta
    t.CopyFrom(numpy_helper.from_array(a, name))


def test_planted_bias_error_is_caught_and_explained():
    model = conv_bn_model()
    folded, _ = fold_model(model)
    assert verify(model, folded)
    _perturb(folded, "b_folded", 1e-2)
    result = verify(model, folded)
    assert not result
    text = str(result)
    assert "verification FAILED: worst output 'y'" in text and "would need atol >=" in text
    worst = result.worst
    assert worst.name == "y" and 0.009 < worst.max_abs < 0.011 and worst.needed_atol > worst.atol


def test_dropped_epsilon_is_caught():
    """A fold that forgets epsilon: visible when var is small against eps (here eps = 0.1)."""
    model = conv_bn_model(epsilon=0.1)
    wrong_input = onnx.ModelProto()
    wrong_input.CopyFrom(model)
    for a in wrong_input.graph.node[-1].attribute:
        if a.name == "epsilon":
            a.f = 0.0
    wrong, _ = fold_model(wrong_input)
    assert not verify(model, wrong)
    right, _ = fold_model(model)
    assert verify(model, right)


PLANT = """
import sys
import onnxfold.rules.consumers as rules
real = rules.bn_affine
rules.bn_affine = lambda g, b, m, v, eps: real(g, b, m, v, 0.0)   # the planted bug: epsilon dropped
from onnxfold.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def test_planted_error_through_the_command_line(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(epsilon=0.1), src)
    out = tmp_path / "o.onnx"
    env = child_env()
    proc = subprocess.run([sys.executable, "-c", PLANT, str(src), str(out)], capture_output=True, text=True, env=env)
    assert proc.returncode == 1, proc.stderr
    assert "verification FAILED" in proc.stderr and "not written" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("FAILED | Runtime:")
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["m.onnx"]
    proc = subprocess.run([sys.executable, "-c", PLANT, str(src), str(out), "--force-write"], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 1 and out.exists()


def test_symbolic_dimensions_take_a_default_with_a_warning_or_the_users_shape():
    model = conv_bn_model(batch="N")
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_param = "H"
    folded, _ = fold_model(model)
    result = verify(model, folded)
    assert result
    assert any("axis 0 is dynamic (N): using 1" in w for w in result.warnings)
    assert any("axis 2 is dynamic (H): using 32" in w for w in result.warnings)
    assert len(result.warnings) == 2  # the same name takes the same value once
    result = verify(model, folded, input_shapes={"x": (3, 4, 8, 8)})
    assert result and not result.warnings
    assert result.results[0].outputs[0].shape == (3, 6, 6, 6)


def test_parse_shape():
    assert parse_shape("input:1x3x224x224") == ("input", (1, 3, 224, 224))
    assert parse_shape("a:b:2x2") == ("a:b", (2, 2))
    with pytest.raises(ValueError):
        parse_shape("1x3")


def test_integer_and_bool_inputs_and_several_outputs():
    """x -> Conv -> BN -> y; plus idx (int64) gathers from y, and flag (bool) picks a branch."""
    model = conv_bn_model()
    g = model.graph
    g.input.extend([helper.make_tensor_value_info("idx", TensorProto.INT64, [2]),
                    helper.make_tensor_value_info("flag", TensorProto.BOOL, [1])])
    g.node.extend([
        helper.make_node("Gather", ["y", "idx"], ["picked"], axis=1),
        helper.make_node("Cast", ["flag"], ["flag_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["picked", "flag_f"], ["z"]),
        helper.make_node("Shape", ["y"], ["shape"]),
    ])
    g.output.extend([helper.make_tensor_value_info("z", TensorProto.FLOAT, None),
                     helper.make_tensor_value_info("shape", TensorProto.INT64, None)])
    feeds = make_inputs(model, seed=3)
    assert feeds["idx"].dtype == np.int64 and feeds["flag"].dtype == bool
    assert feeds["idx"].min() >= 0 and feeds["idx"].max() < 4
    folded, report = fold_model(model)
    assert len(report.folded) == 1
    result = verify(model, folded, inputs={**feeds, "flag": np.array([True])})
    assert result and [o.name for o in result.results[0].outputs] == ["y", "z", "shape"]
    _perturb(folded, "w_folded", 0.5)  # channel 0, which idx picks
    result = verify(model, folded, inputs={**feeds, "flag": np.array([True]), "idx": np.array([0, 2])})
    failing = [o.name for o in result.results[0].outputs if not o.passed]
    assert failing == ["y", "z"]  # the shape output is integer: equal, so it passes


def test_float16_model_default_tolerance_and_planted_error():
    model = conv_bn_model(dtype="float16")
    folded, _ = fold_model(model)
    result = verify(model, folded)
    assert result and result.results[0].outputs[0].dtype == "float16"
    assert result.results[0].outputs[0].rtol == 1e-2
    _perturb(folded, "b_folded", 0.5)
    assert not verify(model, folded)


def test_nan_in_the_candidate_where_the_reference_is_finite_always_fails():
    ref = np.array([1.0, 2.0, np.nan], np.float32)
    assert compare("o", ref, ref.copy()).passed  # NaN where the reference has NaN: fine
    bad = np.array([1.0, np.inf, np.nan], np.float32)
    c = compare("o", ref, bad, atol=1e9, rtol=1e9)
    assert not c.passed and "NaN/Inf" in c.note


def test_tolerances_global_and_per_output():
    model = conv_bn_model()
    folded, _ = fold_model(model)
    _perturb(folded, "b_folded", 1e-3)
    assert not verify(model, folded)
    assert verify(model, folded, atol=1e-2)
    assert verify(model, folded, tolerances={"y": (1e-2, None)})
    assert not verify(model, folded, tolerances={"other": (1e-2, None)})


def test_inputs_from_npz_on_the_command_line(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(batch="N"), src)
    np.savez(tmp_path / "in.npz", x=np.random.default_rng(0).uniform(-3, 3, (5, 4, 6, 6)).astype(np.float32))
    proc = cli(src, tmp_path / "o.onnx", "--inputs", tmp_path / "in.npz")
    assert proc.returncode == 0, proc.stderr
    assert "y float32[5, 6, 4, 4]" in proc.stderr and "dynamic" not in proc.stderr


@pytest.mark.skipif(HAS_CUDA, reason="this checks the error when CUDAExecutionProvider is absent")
def test_missing_cuda_provider_is_an_error_never_a_silent_cpu_run(tmp_path):
    model = conv_bn_model()
    folded, _ = fold_model(model)
    with pytest.raises(VerifyError, match="CUDAExecutionProvider is not available"):
        verify(model, folded, providers=("cpu", "cuda"))
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    proc = cli(src, tmp_path / "o.onnx", "--providers", "cpu,cuda")
    assert proc.returncode == 2 and "CUDAExecutionProvider is not available" in proc.stderr
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.skipif(not HAS_CUDA, reason="CUDAExecutionProvider is not available in this onnxruntime build")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cuda_verification(dtype):
    model = conv_bn_model(dtype=dtype)
    folded, _ = fold_model(model)
    result = verify(model, folded, providers=("cpu", "cuda"))
    assert result, str(result)
    assert result.results[1].engine.startswith("onnxruntime CUDAExecutionProvider")
    _perturb(folded, "b_folded", 0.5)
    assert not verify(model, folded, providers=("cuda",))


@pytest.mark.parametrize("block", [1 << 15, 7, 1])
def test_the_all_finite_comparison_gives_the_same_numbers_as_the_general_one(monkeypatch, block):
    """compare() takes a shorter way when both tensors are finite everywhere (issue 20: verification's
    comparison of ResNet-50's 53 fold tensors took 0.15 s), a block at a time, in float32 for float32
    and narrower tensors; its result is the general way's (float64), per tensor and per channel, with
    zeros in either tensor, in each float dtype, whatever the blocks (a block of 7 elements cuts these
    shapes along every axis): every number the same in float64, and in the narrower types the same
    verdict, channel, scale and atol, the relative error and the atol needed within float32's rounding
    of them (2**-23 of themselves, where the smallest atol is 64 units of the scale)."""
    import ml_dtypes

    from onnxfold.verification import tolerances

    rng = np.random.default_rng(20)
    monkeypatch.setattr(tolerances, "BLOCK", block)

    def numbers(r):
        return (r.dtype, r.shape, r.max_abs, r.max_rel, r.atol, r.rtol, r.needed_atol, r.passed, r.note, r.channel,
                r.finite)

    def verdict(r):  # numbers() less the two that float32 rounds
        return (r.dtype, r.shape, r.max_abs, r.atol, r.rtol, r.passed, r.note, r.channel, r.finite)

    cases = 0
    for dtype in (np.float32, np.float64, np.float16, ml_dtypes.bfloat16):
        for shape in [(), (5,), (2, 3), (1, 4, 3, 3), (3, 4, 5), (2, 5, 4, 3)]:
            for trial in range(12):
                ref = rng.standard_normal(shape) * 10 ** rng.uniform(-8, 3)
                cand = ref * (1 + rng.standard_normal(shape) * 10 ** rng.uniform(-9, -1))
                if trial % 3 == 1:
                    ref.flat[rng.integers(ref.size)] = 0  # a zero in the reference: max rel from the others
                if trial % 4 == 2:
                    cand.flat[rng.integers(ref.size)] = 0
                ref, cand = ref.astype(dtype), cand.astype(dtype)
                for kw in ({}, {"per_channel": True}, {"per_channel": True, "axis": -1}, {"atol": 1e-3},
                           {"rtol": 0.0, "atol_floor": 1e-6}):
                    fast = compare("t", ref, cand, **kw)
                    with monkeypatch.context() as m:
                        m.setattr(tolerances, "_finite", lambda *args: None)  # the general way
                        general = compare("t", ref, cand, **kw)
                    if dtype == np.float64:
                        assert numbers(fast) == numbers(general), (dtype, shape, kw)
                    else:
                        assert verdict(fast) == verdict(general), (dtype, shape, kw)
                        assert fast.max_rel == pytest.approx(general.max_rel, rel=2**-22), (dtype, shape, kw)
                        assert fast.needed_atol == pytest.approx(general.needed_atol, rel=2**-20,
                                                                 abs=2**-22 * general.atol), (dtype, shape, kw)
                    cases += 1
                assert tolerances.scale_of(ref) == float(np.max(np.abs(ref.astype(np.float64))))
    assert cases == 4 * 6 * 12 * 5


@pytest.mark.parametrize("memory_files", [True, False])
def test_a_model_with_outputs_added_is_read_from_a_memory_file_with_its_external_data(tmp_path, monkeypatch,
                                                                                      memory_files):
    """With fold tensors exposed, onnxruntime gets each model file with the outputs appended: on Linux as a
    memory file (a path: read about twice as fast as bytes, issue 20), its external data still read from
    the model's own folder (a folder whose name is not UTF-8 included); elsewhere as bytes. Either way the
    same comparison."""
    from onnxfold.verification import sessions

    model = conv_bn_model(cin=8, cout=8, seed=4)
    out = model.graph.output[0]
    model.graph.node.append(helper.make_node("Sigmoid", [out.name], ["z"]))  # the fold's tensor: not an output
    out.name = "z"
    folded, report = fold_model(model)
    (tmp_path / "d").mkdir()  # onnx saves in a folder named in UTF-8 only: renamed after
    for m, name in ((model, "m"), (folded, "f")):
        onnx.save(m, tmp_path / "d" / f"{name}.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                  location=f"{name}.data", size_threshold=0)
    folder = tmp_path / os.fsdecode(b"d\xff")
    os.rename(tmp_path / "d", folder)
    src, dst = folder / "m.onnx", folder / "f.onnx"
    monkeypatch.setattr(sessions, "MEMORY_FILES", memory_files)
    opened = []
    real = sessions._memory_file
    monkeypatch.setattr(sessions, "_memory_file", lambda joined: opened.append(joined.path) or real(joined))
    monkeypatch.setattr(sessions.isolation, "call",
                        lambda fn, *args, timeout=None, meanwhile=None, first=None: fn(*args, lambda msg: None))
    result = verify(src, dst, folds=report.folded)
    assert result and len(result.results[0].folds) == 1 and result.results[0].folds[0].passed
    assert opened == ([str(src), str(dst)] if memory_files else [])
    (folder / "m.data").write_bytes(b"\0" * (folder / "m.data").stat().st_size)  # its weights, read from the folder
    assert not verify(src, dst, folds=report.folded)


def test_verification_sessions_do_not_spin(tmp_path):
    """A session runs once, while the parent runs onnx.checker: its idle threads sleep (measured on the
    ResNet-50-shaped model with other load on the 2 cores: 1.69 s -> 1.48 s a verified run)."""
    import onnx

    from builders import conv_bn_model
    from onnxfold.verification import sessions

    path = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), str(path))
    sess = sessions.session(str(path), provider="cpu")
    assert sess.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
