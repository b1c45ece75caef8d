"""Verification that passed a wrong model, and the verification child's limits (issue 18 items 5-8, 10,
11). Each test plants a wrong fold (or a stuck or hungry verification) and shows what verification says;
each failed on 0e3a27c."""

import importlib
import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import bn_stats, conv_bn_model
from checks import assert_user_error, child_env, cli
from onnxfold import FoldError, InputError, VerifyError, fold_file, fold_model, isolation, verify
from onnxfold.verification import annotate

planning = importlib.import_module("onnxfold.verification.planning")


def _plant(folded, name="w", channel=0, factor=-1.0):
    """One wrong channel in the folded model's weight ``name`` (axis 0: a Conv's output channel)."""
    t = next(t for t in folded.graph.initializer if t.name == name)
    a = numpy_helper.to_array(t).copy()
    a[channel] *= factor
    t.CopyFrom(numpy_helper.from_array(a, name))
    return folded


def _folded_conv_name(folded):
    return next(n.input[1] for n in folded.graph.node if n.op_type == "Conv")


# -- item 5: inputs with nothing finite ------------------------------------------------------------------


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_inputs_prove_nothing(tmp_path, value):
    """All-NaN or all-Inf inputs printed "verification passed ... max abs 0" over a planted wrong fold:
    no finite element was compared. Now a VerifyError (exit 2, nothing written)."""
    model = conv_bn_model()
    folded, report = fold_model(model)
    _plant(folded, _folded_conv_name(folded))
    x = np.full((1, 4, 6, 6), value, np.float32)
    assert not verify(model, folded, folds=report.folded)  # random inputs catch it
    with pytest.raises(VerifyError, match="no finite element"):
        verify(model, folded, folds=report.folded, inputs={"x": x})
    src, out, npz = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "nan.npz"
    onnx.save(model, src)
    np.savez(npz, x=x)
    proc = cli(src, out, "--inputs", npz)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "onnxfold: error: nothing to compare on cpu: no finite element" in proc.stderr
    assert "verification passed" not in proc.stderr and not out.exists()


def test_an_output_with_nothing_finite_says_so():
    """One output all NaN on both sides beside one that is finite: the finite one is the proof, and the
    comparison of the other says it compared nothing."""
    model = conv_bn_model()
    model.graph.node.append(helper.make_node("Log", ["y"], ["l"]))  # NaN where y < 0 ...
    model.graph.node.append(helper.make_node("Sqrt", ["m"], ["s"]))
    model.graph.node.append(helper.make_node("Neg", ["one"], ["m"]))
    model.graph.initializer.append(numpy_helper.from_array(np.ones((1,), np.float32), "one"))
    model.graph.output.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, None))
    folded, report = fold_model(model)
    result = verify(model, folded, folds=report.folded)
    assert result
    s = next(o for o in result.results[0].outputs if o.name == "s")
    assert s.finite == 0 and "no finite element" in s.note


# -- item 7: per channel on the fold's own channel axis --------------------------------------------------


def _linear_mul(rank=3):
    """x[1, 8, 16] -> MatMul W[16, 4] -> Add b -> Mul s: channels on the last axis, scales 0.005 .. 850."""
    rng = np.random.default_rng(7)
    w = rng.normal(0, 0.5, (16, 4)).astype(np.float32)
    b = rng.normal(0, 0.5, 4).astype(np.float32)
    s = np.array([0.005, 850.0, 1.3, -2.1], np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
             helper.make_node("Add", ["mm", "b"], ["lin"], name="add"),
             helper.make_node("Mul", ["lin", "s"], ["y"], name="mul")]
    shape = [1, 8, 16] if rank == 3 else [8, 16]
    graph = helper.make_graph(nodes, "linear_mul", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(a, n) for n, a in (("w", w), ("b", b), ("s", s))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("rank", [3, 2])
def test_a_channel_last_fold_is_compared_per_its_own_channel(rank):
    """A MatMul's channels are on its last axis: compared per axis 1 (the tokens), a flipped channel at
    scale 0.005 beside one at 850 passed. Now each fold is compared per its own channel axis."""
    model = _linear_mul(rank)
    folded, report = fold_model(model)
    assert len(report.folded) >= 1 and report.folded[-1].axis == rank - 1
    assert verify(model, folded, folds=report.folded)
    mm = next(n for n in folded.graph.node if n.op_type in ("MatMul", "Gemm"))
    t = next(t for t in folded.graph.initializer if t.name == mm.input[1])
    a = numpy_helper.to_array(t).copy()
    a[:, 0] *= -1  # channel 0 (scale 0.005) flipped
    t.CopyFrom(numpy_helper.from_array(a, t.name))
    for o in folded.graph.initializer:  # and its bias, so that the channel is all wrong
        if o.name in (n.input[1] for n in folded.graph.node if n.op_type == "Add"):
            v = numpy_helper.to_array(o).copy()
            v[..., 0] *= -1
            o.CopyFrom(numpy_helper.from_array(v, o.name))
    result = verify(model, folded, folds=report.folded)
    assert not result
    bad = [f for f in result.results[0].folds if not f.passed]
    assert bad and bad[0].channel == 0


def test_a_conv_fold_is_still_compared_per_axis_1():
    model = conv_bn_model()
    folded, report = fold_model(model)
    assert report.folded[0].axis == 1
    _plant(folded, _folded_conv_name(folded), channel=2)
    result = verify(model, folded, folds=report.folded)
    assert not result and result.results[0].folds[0].channel == 2


# -- item 10: the child dies with its parent; a time limit -------------------------------------------------


def _endless_model():
    """Conv -> BN (a fold, so verification runs) beside a Loop of 10^15 iterations: onnxruntime runs it
    as long as it is let (the gate: a verification that never ends by itself)."""
    model = conv_bn_model()
    body = helper.make_graph(
        [helper.make_node("Identity", ["c_in"], ["c_out"]), helper.make_node("Identity", ["s_in"], ["s_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [1])])
    model.graph.initializer.extend([numpy_helper.from_array(np.array(10**15, np.int64), "trip"),
                                    numpy_helper.from_array(np.ones(1, np.float32), "s0")])
    model.graph.node.append(helper.make_node("Loop", ["trip", "", "s0"], ["z"], body=body))
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1]))
    return model


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except FileNotFoundError:
        return []


def _in_onnxruntime(pid):
    """The children of ``pid`` that have loaded onnxruntime's library."""
    found = []
    for child in _children(pid):
        try:
            with open(f"/proc/{child}/maps") as fh:
                if "onnxruntime" in fh.read():
                    found.append(child)
        except OSError:
            pass
    return found


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _poll(predicate, what, limit=120.0):
    """Wait for ``predicate`` by polling /proc (the limit only stops a hung test: no speed is asserted)."""
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG")
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_the_verification_child_dies_with_a_killed_run(tmp_path, signum):
    """SIGKILL (what subprocess timeouts, CI and the OOM killer send) of a run mid-verification left its
    onnxruntime child running the Loop on: it must die with the run. SIGTERM: the run ends (128 + 15)
    while onnxruntime runs, and its child with it."""
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(_endless_model(), src)
    proc = subprocess.Popen([sys.executable, "-m", "onnxfold", str(src), str(out)], env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # the gate: a child of the run that has loaded onnxruntime (it is verifying: the Loop never ends)
        _poll(lambda: _in_onnxruntime(proc.pid) or proc.poll() is not None, "the verification child never started")
        assert proc.poll() is None, proc.stderr.read()
        child = _in_onnxruntime(proc.pid)[0]
        os.kill(proc.pid, signum)
        code = proc.wait(timeout=120)
        assert code == (-signum if signum == signal.SIGKILL else 128 + signum), proc.stderr.read()
        _poll(lambda: not _alive(child), f"the verification child outlived its parent ({signum})")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()
    assert not out.exists()


def test_a_verification_past_its_time_limit_is_stopped(tmp_path):
    """A Loop of 10^15 iterations verified forever; now one line, exit 2, naming the model and provider,
    the child killed."""
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(_endless_model(), src)
    proc = cli(src, out, "--verify-timeout", "1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("onnxfold: error:")]
    assert len(errors) == 1 and f"{src}: verification on cpu took longer than 1 s" in errors[0], proc.stderr
    assert not out.exists()
    with pytest.raises(VerifyError, match="verification on cpu took longer than 0.5 s"):
        fold_file(src, out, verify_timeout=0.5)
    assert not out.exists()
    with pytest.raises(InputError, match="--verify-timeout -1"):
        fold_file(src, out, verify_timeout=-1)


def test_a_worker_killed_for_time_is_replaced(monkeypatch):
    """A worker (this process has imported onnxruntime) past its time is killed; the next call gets a
    new one and works."""
    monkeypatch.setattr(isolation, "WORKER", "spawn")
    model = _endless_model()
    folded, report = fold_model(model)
    with pytest.raises(VerifyError, match="took longer than 0.5 s"):
        verify(model, folded, folds=report.folded, timeout=0.5)
    assert isolation._worker is None
    good = conv_bn_model()
    folded, report = fold_model(good)
    assert verify(good, folded, folds=report.folded, timeout=600)
    first = isolation._worker.proc.pid
    assert verify(good, folded, folds=report.folded)
    assert isolation._worker.proc.pid == first  # reused while it answers


# -- item 6: a fold in an If branch the inputs never take ---------------------------------------------------


def _if_model():
    """cond ? Conv->BN : Conv->BN, each branch with its own weights (tests/test_subgraphs.py's shape)."""
    rng = np.random.default_rng(0)

    def body(prefix, out):
        w = numpy_helper.from_array(rng.normal(0, 0.5, (4, 4, 3, 3)).astype(np.float32), f"{prefix}w")
        stats = [f"{prefix}{n}" for n in ("g", "b", "m", "v")]
        inits = [w, *(numpy_helper.from_array(a, n) for a, n in zip(bn_stats(rng, 4), stats))]
        nodes = [helper.make_node("Conv", ["x", w.name], [f"{prefix}c"], pads=[1, 1, 1, 1], name=f"{prefix}conv"),
                 helper.make_node("BatchNormalization", [f"{prefix}c", *stats], [out], epsilon=1e-3,
                                  name=f"{prefix}bn")]
        return helper.make_graph(nodes, prefix, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT,
                                                                                   [1, 4, 6, 6])], inits)

    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=body("then_", "t"), else_branch=body("else_", "e"))],
        "if_model", [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                     helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _plant_in_branch(folded, branch):
    g = next(a.g for a in folded.graph.node[0].attribute if a.name == branch)
    conv = next(n for n in g.node if n.op_type == "Conv")
    _plant_graph(g, conv.input[1])


def _plant_graph(graph, name):
    t = next(t for t in graph.initializer if t.name == name)
    a = numpy_helper.to_array(t).copy()
    a[1] *= -1
    t.CopyFrom(numpy_helper.from_array(a, name))


@pytest.mark.parametrize("wrong", ["then_branch", "else_branch"])
def test_a_wrong_fold_in_an_if_branch_the_inputs_never_take_fails(wrong):
    """The inputs take the other branch: it printed "verification passed" and called the wrong fold
    "covered by the graph outputs". Now the branch runs on its own (its condition forced) and fails."""
    model = _if_model()
    folded, report = fold_model(model)
    assert {f.graph for f in report.folded} == {"main/If#0.then_branch", "main/If#0.else_branch"}
    x = np.random.default_rng(1).uniform(-1, 1, (1, 4, 6, 6)).astype(np.float32)
    taken = np.array(wrong == "else_branch")  # the other branch
    good = verify(model, folded, folds=report.folded, inputs={"cond": taken, "x": x})
    assert good, str(good)
    annotate(report.folded, good)
    assert all("that branch was run on its own" in f.note for f in report.folded), [f.note for f in report.folded]
    _plant_in_branch(folded, wrong)
    result = verify(model, folded, folds=report.folded, inputs={"cond": taken, "x": x})
    assert not result, str(result)
    assert "verification passed" not in str(result)
    bad = [o.name for o in result.results[0].outputs if not o.passed]
    assert bad == ["y__onnxfold_" + wrong.split("_")[0]]


def test_a_fold_in_a_nested_if_branch_is_refused():
    """An If inside a branch cannot be forced from the main graph: its folds are not verified, and a
    verification that cannot verify a fold does not pass (VerifyError, exit 2)."""
    outer = _if_model()
    inner = _if_model().graph.node[0]
    inner.name = "inner"
    then = next(a.g for a in outer.graph.node[0].attribute if a.name == "then_branch")
    del then.node[:]
    del then.initializer[:]
    inner.output[0] = "t"
    then.node.append(inner)
    folded, report = fold_model(outer)
    assert any("/inner." in f.graph for f in report.folded)
    x = np.random.default_rng(1).uniform(-1, 1, (1, 4, 6, 6)).astype(np.float32)
    with pytest.raises(VerifyError, match="cannot run on their own"):
        verify(outer, folded, folds=report.folded, inputs={"cond": np.array(True), "x": x})


# -- item 8: errors reachable only outside [-1, 1] ------------------------------------------------------------


def test_an_error_only_reachable_above_1_is_caught_on_random_values_at_the_fold():
    """x -> Relu(x - 1) -> Conv -> BN: on the default inputs in [-1, 1] the Conv sees only zeros, so a
    wrong weight cannot show on them; it passed, and only the range of the real inputs (images:
    --input-range 0,255) caught it. Its fold tensor is one value per channel on those inputs, so it is
    now compared again on random values at its own inputs, where the wrong weight fails (stop 26)."""
    model = conv_bn_model()
    model.graph.initializer.append(numpy_helper.from_array(np.ones((1,), np.float32), "one"))
    model.graph.node.insert(0, helper.make_node("Sub", ["x", "one"], ["xm"]))
    model.graph.node.insert(1, helper.make_node("Relu", ["xm"], ["xr"]))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    conv.input[0] = "xr"
    folded, report = fold_model(model)
    assert verify(model, folded, folds=report.folded, input_range=(0, 255))
    _plant(folded, _folded_conv_name(folded), channel=3, factor=1.5)
    default = verify(model, folded, folds=report.folded)  # its inputs reach no channel: on random values
    assert not default and "on random values at its own inputs it fails" in default.results[0].folds[0].note
    assert default.results[0].folds[0].channel == 3
    assert not verify(model, folded, folds=report.folded, input_range=(0, 255))


# -- item 11: memory ------------------------------------------------------------------------------------


def test_jobs_are_capped_at_the_models_and_the_cpus(tmp_path, monkeypatch):
    """-j 200 forked 200 workers for 2 models."""
    import concurrent.futures

    from onnxfold import cli as cli_module

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert cli_module.pool_size(200, 2) == 2
    assert cli_module.pool_size(200, 50) == 8
    assert cli_module.pool_size(3, 50) == 3
    seen = []

    class Recording(concurrent.futures.ProcessPoolExecutor):
        def __init__(self, max_workers=None, **kw):
            seen.append(max_workers)
            super().__init__(max_workers=max_workers, **kw)

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", Recording)
    src = tmp_path / "in"
    src.mkdir()
    for k in range(2):
        onnx.save(conv_bn_model(seed=k), src / f"m{k}.onnx")
    assert cli_module.main([str(src), str(tmp_path / "out"), "-j", "200", "--no-verify", "-q"]) == 0
    assert seen == [2]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the fault is planted in a forked child")
def test_out_of_memory_in_the_verification_child_is_one_line_not_a_bug(monkeypatch, tmp_path):
    """A MemoryError in the verification child was "this is a bug", exit 70: the model or the inputs are
    too big for this machine, a user's matter (FoldError: one line, exit 2)."""
    job = importlib.import_module("onnxfold.verification.job")

    def hungry(job_, provider, stage, early=None, shapes=None, parsed=None):
        stage("running the original model")
        raise MemoryError

    monkeypatch.setattr(isolation, "WORKER", "fork")
    monkeypatch.setattr(job, "compare_provider", hungry)
    model = conv_bn_model()
    folded, report = fold_model(model)
    with pytest.raises(FoldError, match="^out of memory: onnxruntime ran out of memory running the original model"):
        verify(model, folded, folds=report.folded)
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(model, src)
    with pytest.raises(FoldError, match="^out of memory"):
        fold_file(src, out)
    assert not out.exists()


@pytest.mark.parametrize("x,text", [
    (np.zeros((1, 4, 6, 6), np.float64), "input 'x' is float64 [1, 4, 6, 6], the model declares float32 [1, 4, 6, 6]"),
    (np.zeros((1, 4, 6), np.float32), "input 'x' is float32 [1, 4, 6], the model declares float32 [1, 4, 6, 6]"),
    (np.zeros((1, 3, 6, 6), np.float32), "input 'x' is float32 [1, 3, 6, 6]"),
])
def test_npz_inputs_are_checked_against_the_model_before_any_work(tmp_path, x, text):
    """A wrong dtype or shape was found only by onnxruntime after the fold (two lines), though the README
    says inputs are checked before any work."""
    src, out, npz = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "in.npz"
    onnx.save(conv_bn_model(), src)
    np.savez(npz, x=x)
    proc = cli(src, out, "--inputs", npz)
    assert_user_error(proc, f"--inputs {npz}: {text}")
    assert not out.exists()
    with pytest.raises(VerifyError, match="the inputs given: input 'x' is"):
        fold_file(src, out, inputs={"x": x})


def test_npz_reads_only_the_keys_the_model_needs(tmp_path, monkeypatch):
    """Every key was decompressed (a 1 MB npz with an unused 1 GiB key reached 1.1 GB)."""
    src, out, npz = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "in.npz"
    onnx.save(conv_bn_model(), src)
    x = np.random.default_rng(0).uniform(-1, 1, (1, 4, 6, 6)).astype(np.float32)
    np.savez_compressed(npz, x=x, unused=np.zeros((1000, 1000), np.float32))
    read = []
    original = np.lib.npyio.NpzFile.__getitem__

    def spy(self, key):
        read.append(key)
        return original(self, key)

    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", spy)
    assert fold_file(src, out, inputs=npz)
    assert read == ["x"]


def test_a_verification_over_its_memory_budget_is_refused(tmp_path):
    """--input-shape x:1x4x3000x3000 (144 MB of input) peaked at 5.3 GB, and the size cap let ~8 GiB
    inputs through. Verification now estimates what it needs (inputs, outputs and fold tensors, times
    the two models) and refuses above its budget, one line, exit 2, before making the inputs."""
    from onnxfold.verification import memory

    model = conv_bn_model()
    for axis, name in ((2, "H"), (3, "W")):
        model.graph.input[0].type.tensor_type.shape.dim[axis].dim_param = name
    specs = {"x": (np.dtype(np.float32), (1, 4, 3000, 3000))}
    need, how = memory.estimate(model, specs, ["y"])
    weights = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    assert need == 2 * (4 * 3000 * 3000 * 4 + 6 * 2998 * 2998 * 4 + weights), how
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(model, src)
    proc = cli(src, out, "--input-shape", "x:1x4x3000x3000", "--verify-memory", "0.5")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("onnxfold: error:")]
    assert len(errors) == 1 and "verification needs at least 0.7 GiB" in errors[0], proc.stderr
    assert "above its memory budget of 0.5 GiB" in errors[0] and not out.exists()
    with pytest.raises(InputError, match="--verify-memory -2"):
        fold_file(src, out, verify_memory=-2)
    assert fold_file(src, out, verify_memory=0.5)  # the declared 6x6 input fits


def test_a_channel_axis_moved_by_a_transpose_is_followed():
    """Conv -> Transpose to NHWC -> Mul per channel (on the last axis): the fold's tensor is the Mul's
    output, its channels on axis 3; a flipped channel at 0.005 beside one at 850 fails there."""
    rng = np.random.default_rng(3)
    w = rng.normal(0, 0.5, (6, 4, 3, 3)).astype(np.float32)
    s = np.array([0.005, 850.0, 1.0, -2.0, 0.3, 7.0], np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Transpose", ["c"], ["t"], perm=[0, 2, 3, 1]),
             helper.make_node("Mul", ["t", "s"], ["y"], name="mul")]
    graph = helper.make_graph(nodes, "nhwc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(s, "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folded, report = fold_model(model)
    assert len(report.folded) == 1 and report.folded[0].axis == 3
    assert verify(model, folded, folds=report.folded)
    _plant(folded, _folded_conv_name(folded), channel=0)
    result = verify(model, folded, folds=report.folded)
    assert not result and result.results[0].folds[0].channel == 0


def test_a_fold_tensor_with_nothing_finite_is_not_called_verified():
    """A fold tensor all NaN on both sides (a NaN input masked out before the graph output) compared
    nothing: its report record says so rather than passed."""
    model = conv_bn_model()
    model.graph.input.append(helper.make_tensor_value_info("m", TensorProto.FLOAT, [1]))
    model.graph.node[0].input[0] = "xm"
    model.graph.node.insert(0, helper.make_node("Add", ["x", "m"], ["xm"]))  # m = NaN: all NaN
    model.graph.node.append(helper.make_node("IsNaN", ["y"], ["n"]))
    model.graph.output.append(helper.make_tensor_value_info("n", TensorProto.BOOL, None))
    model.graph.output.append(helper.make_tensor_value_info("x2", TensorProto.FLOAT, None))
    model.graph.node.append(helper.make_node("Identity", ["x"], ["x2"]))
    model.graph.output.pop(0)  # y itself is not an output: it is exposed
    folded, report = fold_model(model)
    x = np.random.default_rng(0).uniform(-1, 1, (1, 4, 6, 6)).astype(np.float32)
    result = verify(model, folded, folds=report.folded, inputs={"x": x, "m": np.array([np.nan], np.float32)})
    annotate(report.folded, result)
    assert report.folded[0].passed is None and "no finite element" in report.folded[0].note


def test_an_input_shape_that_changes_a_fixed_dimension_is_refused_before_any_work(tmp_path):
    """--input-shape x:1x4x3000x3000 on an input declared [1, 4, 6, 6] was refused by onnxruntime after
    the fold; the declared fixed dimensions are checked first (one line, exit 2)."""
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(conv_bn_model(), src)
    proc = cli(src, out, "--input-shape", "x:1x4x3000x3000")
    assert_user_error(proc, "--input-shape x:1x4x3000x3000: input 'x' is [1, 4, 3000, 3000], the model declares "
                            "float32 [1, 4, 6, 6]")


def _ir3_reshape_model(default_x: bool) -> onnx.ModelProto:
    """IR 3, opset 9: x reshaped to a shape made by ConstantOfShape + Add (which onnx's data propagation
    does not follow), and y = x * c; with ``default_x``, x has an initializer (a default value) of
    another shape, which the inputs verification makes replace."""
    f = onnx.TensorProto.FLOAT
    nodes = [
        helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.array([2], np.int64))),
        helper.make_node("ConstantOfShape", ["two"], ["ones"], value=numpy_helper.from_array(np.array([1], np.int64))),
        helper.make_node("Constant", [], ["off"], value=numpy_helper.from_array(np.array([0, 191], np.int64))),
        helper.make_node("Add", ["ones", "off"], ["shape"]),
        helper.make_node("Reshape", ["x", "shape"], ["flat"]),
        helper.make_node("Mul", ["x", "c"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.full((1, 3, 1, 1), 2.0, np.float32), "c")]
    if default_x:
        inits.append(numpy_helper.from_array(np.zeros((1, 3, 2, 2), np.float32), "x"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f, [1, 3, "h", "w"]),
                                           helper.make_tensor_value_info("c", f, [1, 3, 1, 1])],
                              [helper.make_tensor_value_info(n, f, None) for n in ("flat", "y")], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 3
    return model


@pytest.mark.parametrize("default_x", [False, True])
def test_the_memory_estimate_sizes_tensors_past_constants_inference_does_not_propagate(default_x):
    """Shape inference alone does not size 'flat' (its shape comes from ConstantOfShape + Add): such
    constants are evaluated first. An input's default value is not a constant: the inputs made replace it
    (it had made inference refuse the model, sizing nothing)."""
    from onnxfold.verification import memory

    specs = {"x": (np.dtype(np.float32), (1, 3, 8, 8))}
    sizes = memory.inferred(_ir3_reshape_model(default_x), specs, ["flat", "y"])
    assert sizes == {"flat": (onnx.TensorProto.FLOAT, 768), "y": (onnx.TensorProto.FLOAT, 768)}
