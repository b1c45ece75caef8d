"""Verification that begins before the fold (issue 20, item 2): fold_file forks verification's child after
the load; it runs the original with the tensors a fold may be compared at exposed while the parent folds
and writes, and gets the plan through isolation's gate (``call(first=...)``, ``join``). Each test makes
the order or the fallback observable with marker files written by the child (gates, not sleeps)."""

import importlib
import os
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from builders import bn_stats, tensor
from onnxfold import fold_file, isolation

api = importlib.import_module("onnxfold.api")
job_module = importlib.import_module("onnxfold.verification.job")
sessions = importlib.import_module("onnxfold.verification.sessions")


def two_folds(seed: int = 0) -> onnx.ModelProto:
    """x -> Conv -> BN -> Relu -> Conv -> BN -> y, statistics random and far from the defaults."""
    rng = np.random.default_rng(seed)
    inits, nodes, src = [], [], "x"
    for i, (cin, cout) in enumerate(((3, 8), (8, 5))):
        inits.append(tensor(f"w{i}", rng.normal(0, 0.5, (cout, cin, 3, 3)).astype(np.float32)))
        names = [f"{p}{i}" for p in ("gamma", "beta", "mean", "var")]
        inits += [tensor(n, a) for n, a in zip(names, bn_stats(rng, cout))]
        nodes.append(helper.make_node("Conv", [src, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("BatchNormalization", [f"c{i}", *names], [f"bn{i}"], epsilon=1e-3))
        src = f"bn{i}"
        if i == 0:
            nodes.append(helper.make_node("Relu", [src], ["r0"]))
            src = "r0"
    nodes.append(helper.make_node("Identity", [src], ["y"]))
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 5, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _wait_for(path: Path, seconds: float = 60.0) -> bool:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture
def logged(tmp_path, monkeypatch):
    """Marker files the verification child writes (the patches are inherited through the fork): ``early``
    once the original has run before the plan, and one line in ``loads`` per model run_pair loads."""
    monkeypatch.setattr(isolation, "WORKER", "fork")
    marks = tmp_path / "marks"
    marks.mkdir()
    real_alone, real_load = sessions.run_alone, sessions._load

    def run_alone(reference, feeds, provider, expose, stage, timings):
        out = real_alone(reference, feeds, provider, expose, stage, timings)
        (marks / "early").write_text(",".join(sorted(name for name, _ in expose)))
        return out

    def load(model, expose, nodes, provider):
        with open(marks / "loads", "a") as fh:
            fh.write(f"{os.path.basename(os.fspath(model))}\n")
        return real_load(model, expose, nodes, provider)

    monkeypatch.setattr(sessions, "run_alone", run_alone)
    monkeypatch.setattr(job_module, "run_alone", run_alone)
    monkeypatch.setattr(sessions, "_load", load)
    return marks


def _loads(marks: Path) -> list[str]:
    return (marks / "loads").read_text().split() if (marks / "loads").exists() else []


def test_the_original_runs_while_the_model_is_folded_and_written(tmp_path, monkeypatch, logged):
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(two_folds(), src)
    real_write = api.write
    seen = []

    def write(model, path, **kwargs):  # the parent writes only once the child has run the original
        seen.append(_wait_for(logged / "early"))
        return real_write(model, path, **kwargs)

    monkeypatch.setattr(api, "write", write)
    result = fold_file(src, out)
    assert seen == [True], "the original had not run when the folded model was written"
    assert result.verification and out.exists()
    folds = result.verification.results[0].folds
    assert sorted(f.name for f in folds) == ["bn0", "bn1"] and all(f.passed and f.compared for f in folds)
    assert set(logged.joinpath("early").read_text().split(",")) >= {"bn0", "bn1"}
    # the planned run loaded the folded model alone: the original was not loaded again
    loads = _loads(logged)
    assert len(loads) == 1 and loads[0] != "m.onnx"


def test_a_planned_tensor_the_early_run_lacks_runs_the_original_again(tmp_path, monkeypatch, logged):
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(two_folds(1), src)
    monkeypatch.setattr(job_module, "candidates", lambda model: ["bn0"])  # bn1 is not exposed early
    result = fold_file(src, out)
    assert (logged / "early").read_text() == "bn0"
    assert "m.onnx" in _loads(logged), "the original was not run again with the planned exposure"
    folds = result.verification.results[0].folds
    assert sorted(f.name for f in folds) == ["bn0", "bn1"] and all(f.passed and f.compared for f in folds)


@pytest.mark.parametrize("why", ["too large", "refused"])
def test_an_original_the_early_run_cannot_take_is_run_as_planned(tmp_path, monkeypatch, logged, why):
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(two_folds(2), src)
    if why == "too large":  # its tensors are above the early run's limit: nothing runs before the plan
        monkeypatch.setattr(job_module, "EARLY_BYTES", 0)
    else:  # onnxruntime refuses the model with these outputs (as it may a type it cannot infer)
        real = sessions.session

        def session(source, *args, **kwargs):
            if not isinstance(source, str) or not source.endswith("o.onnx"):
                if os.path.exists(logged / "planned"):
                    return real(source, *args, **kwargs)
                (logged / "planned").write_text("")
                raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : refused")
            return real(source, *args, **kwargs)

        monkeypatch.setattr(sessions, "session", session)
    result = fold_file(src, out)
    assert "m.onnx" in _loads(logged), "the original was not run as planned"
    assert result.verification and out.exists()
    assert all(f.passed and f.compared for f in result.verification.results[0].folds)


@pytest.mark.parametrize("channel", [0, 3])
def test_a_wrong_fold_is_caught_when_the_original_ran_early(tmp_path, monkeypatch, logged, channel):
    """A wrong channel planted in the written model (after the fold, as a bug in the writer would) fails
    verification against the outputs the child took before the model existed."""
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(two_folds(3), src)
    real_write = api.write

    def write(model, path, **kwargs):
        conv = next(n for n in model.graph.node if n.op_type == "Conv")
        t = next(t for t in model.graph.initializer if t.name == conv.input[1])
        a = numpy_helper.to_array(t).copy()
        a[channel] *= -1.0
        t.CopyFrom(numpy_helper.from_array(a, t.name))
        return real_write(model, path, **kwargs)

    monkeypatch.setattr(api, "write", write)
    result = fold_file(src, out)
    assert (logged / "early").exists() and "m.onnx" not in _loads(logged)
    assert not result.verification and result.status == "verification failed, not written" and not out.exists()
    bad = {f.name for f in result.verification.results[0].folds if not f.passed}
    assert "bn0" in bad  # the planted fold (bn1, downstream, reads its wrong channel)


# -- isolation's gate --------------------------------------------------------------------------------------

def _gated(marker: str, send):
    Path(marker).write_text("started")  # before the parent's first() has returned
    return ("got", isolation.wait_first())


@pytest.fixture
def worker_path(monkeypatch):
    """The worker (python -c) imports this module to find its target."""
    isolation._stop_worker()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                                   os.environ.get("PYTHONPATH")])))
    yield
    isolation._stop_worker()


@pytest.mark.parametrize("worker", ["fork", "spawn"])
def test_first_runs_while_the_child_starts_and_its_value_reaches_wait_first(tmp_path, monkeypatch, worker,
                                                                           worker_path):
    monkeypatch.setattr(isolation, "WORKER", worker)
    marker = tmp_path / "started"
    order = []

    def first():
        if worker == "fork":  # the forked child is running already: first() waits for its word
            order.append(_wait_for(marker))
        return {"plan": [1, 2]}

    assert isolation.call(_gated, str(marker), first=first) == ("got", {"plan": [1, 2]})
    assert order == ([True] if worker == "fork" else [])


def _wait_only(send):
    isolation.wait_first()
    return "not reached"


def test_a_first_that_fails_ends_the_child(monkeypatch):
    monkeypatch.setattr(isolation, "WORKER", "fork")
    pids = []

    def first():
        pids.append(child_pid())
        raise OSError("disk full")

    def child_pid():
        import gc
        return next(o.pid for o in gc.get_objects() if isinstance(o, isolation.Child) and o.pid)

    with pytest.raises(OSError, match="disk full"):
        isolation.call(_wait_only, first=first)
    with pytest.raises(ChildProcessError):
        os.waitpid(pids[0], os.WNOHANG)  # killed and reaped


# -- begun before the load: the child reads the structure and makes the inputs itself ----------------------

CORPUS = Path(__file__).resolve().parent / "corpus"
MODELS = Path(__file__).resolve().parent.parent / "models"
MODEL_FILES = sorted(MODELS.glob("*.onnx")) + sorted(CORPUS.rglob("*.onnx"))


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: p.name)
def test_the_structure_read_from_the_file_is_the_one_made_from_the_loaded_model(path):
    memory = importlib.import_module("onnxfold.verification.memory")
    assert memory.structure_of_file(path) == memory.structure(onnx.load(str(path), load_external_data=False))


def test_the_child_begun_before_the_load_makes_the_inputs_the_parent_makes(tmp_path, monkeypatch, logged):
    """A dynamic batch fixed by --input-shape: the early run (begun before the load) used the same inputs
    as the plan; inputs made otherwise in the child are a bug, said so, not a silent comparison."""
    model = two_folds(4)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    result = fold_file(src, tmp_path / "o.onnx", input_shapes={"x": [3, 3, 8, 8]})
    assert (logged / "early").exists() and "m.onnx" not in _loads(logged)
    assert result.verification and all(f.passed and f.compared for f in result.verification.results[0].folds)

    real = job_module.random_inputs
    monkeypatch.setattr(job_module, "random_inputs", lambda specs, span, seed: real(specs, span, seed + 1))
    with pytest.raises(RuntimeError, match="made other inputs than the parent"):
        fold_file(src, tmp_path / "o2.onnx", input_shapes={"x": [3, 3, 8, 8]})
    assert not (tmp_path / "o2.onnx").exists()


def test_an_unreadable_input_is_one_line_though_the_child_began(tmp_path, monkeypatch, logged):
    src = tmp_path / "m.onnx"
    src.write_bytes(onnx.ModelProto(graph=two_folds().graph).SerializeToString()[:-40])  # truncated
    with pytest.raises(Exception, match="not a readable ONNX model|not an ONNX model") as e:
        fold_file(src, tmp_path / "o.onnx")
    assert type(e.value).__name__ == "InputError" and not (tmp_path / "o.onnx").exists()


def _truncating(real_write):
    """A writer bug: the written model cut in half (onnxruntime cannot load it)."""
    def broken(model, path, **kwargs):
        files = real_write(model, path, **kwargs)
        with open(files[0], "r+b") as fh:
            fh.truncate(os.path.getsize(files[0]) // 2)
        return files

    return broken


def test_without_verification_the_load_check_starts_before_the_fold(tmp_path, monkeypatch):
    """--no-verify: onnx.checker and onnxruntime's load of the written model run in a child forked before
    the fold (it makes its memory ready and imports onnxruntime meanwhile) and read the file once it is
    written; a broken write is still caught."""
    monkeypatch.setattr(isolation, "WORKER", "fork")
    output_check = importlib.import_module("onnxfold.output_check")
    marker = tmp_path / "child"
    real_check, real_write, real_fold = output_check._check, api.write, api.fold_model

    def check(path, ready, expected, send):
        marker.write_text(f"{path} {expected}")
        return real_check(path, ready, expected, send)

    seen = []

    def fold(*args, **kwargs):
        seen.append(_wait_for(marker))
        return real_fold(*args, **kwargs)

    monkeypatch.setattr(output_check, "_check", check)
    monkeypatch.setattr(api, "fold_model", fold)
    src = tmp_path / "m.onnx"
    onnx.save(two_folds(5), src)
    result = fold_file(src, tmp_path / "o.onnx", verify=False)
    assert seen == [True] and result.status == "written" and (tmp_path / "o.onnx").exists()
    assert marker.read_text().endswith(" True")  # onnxruntime imported while the model folds

    monkeypatch.setattr(api, "write", _truncating(real_write))
    with pytest.raises(Exception, match="rejects the written model") as e:
        fold_file(src, tmp_path / "o2.onnx", verify=False)
    assert type(e.value).__name__ == "OutputBroken" and not (tmp_path / "o2.onnx").exists()


def squeeze_excite_folds(seed: int = 2) -> onnx.ModelProto:
    """Conv -> BN -> x * ReduceMean(x) -> Conv -> BN, as torch's dynamo exporter writes it at opset 18: the
    ReduceMean's axes made by a Reshape of two Constants, which onnx's data propagation does not follow
    (so shape inference alone sized nothing after it: timm's efficientnet_b0, 5 of 187 tensors)."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    for i, (cin, cout) in enumerate(((3, 6), (6, 4))):
        inits.append(tensor(f"w{i}", rng.normal(0, 0.5, (cout, cin, 3, 3)).astype(np.float32)))
        names = [f"{p}{i}" for p in ("gamma", "beta", "mean", "var")]
        inits += [tensor(n, a) for n, a in zip(names, bn_stats(rng, cout))]
    nodes += [
        helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c0", "gamma0", "beta0", "mean0", "var0"], ["bn0"], epsilon=1e-3),
        helper.make_node("Constant", [], ["axes_flat"], value=numpy_helper.from_array(np.array([2, 3], np.int64))),
        helper.make_node("Constant", [], ["axes_shape"], value=numpy_helper.from_array(np.array([2], np.int64))),
        helper.make_node("Reshape", ["axes_flat", "axes_shape"], ["axes"]),
        helper.make_node("ReduceMean", ["bn0", "axes"], ["pooled"], keepdims=1),
        helper.make_node("Mul", ["bn0", "pooled"], ["excited"]),
        helper.make_node("Conv", ["excited", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "gamma1", "beta1", "mean1", "var1"], ["bn1"], epsilon=1e-3),
        helper.make_node("Relu", ["bn1"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "se", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


def test_the_early_run_covers_folds_after_a_constant_reshape_of_axes(tmp_path, logged):
    """The early run exposes what shape inference sizes; constants made by nodes it does not propagate
    (a Reshape of Constants) are evaluated first (memory._fold_small_constants), so the fold after the
    ReduceMean is sized and exposed early too: the original is not run again after the write."""
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(squeeze_excite_folds(), src)
    result = fold_file(src, out)
    early = set(logged.joinpath("early").read_text().split(","))
    assert result and early >= {"bn0", "bn1"}
    assert "excited" not in early  # a Mul of two run-time tensors is no fold's: not exposed
    assert "m.onnx" not in _loads(logged), "the original was run again: the early run lacked a fold tensor"
    folds = result.verification.results[0].folds
    assert sorted(f.name for f in folds) == ["bn0", "bn1"] and all(f.passed and f.compared for f in folds)


def test_candidates_are_the_tensors_a_rule_may_fold_at():
    """What the early run exposes: BatchNormalization outputs, affines by a constant (a Constant node's, an
    initializer's, a CastLike of one), sums with a branch from a producer or an affine (RepVGG's Add,
    a Sum) and the producers after such an affine or a Pad; not a Mul of two run-time tensors (SiLU)."""
    f = onnx.TensorProto.FLOAT
    rng = np.random.default_rng(3)
    inits = [tensor("w", rng.normal(size=(4, 4, 1, 1)).astype(np.float32)),
             tensor("s", np.full((1, 4, 1, 1), 2.0, np.float32))]
    inits += [tensor(n, a) for n, a in zip(("g", "b", "m", "v"), bn_stats(rng, 4))]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["bn"]),
        helper.make_node("Sigmoid", ["bn"], ["sig"]),
        helper.make_node("Mul", ["bn", "sig"], ["silu"]),  # two run-time tensors: no fold's
        helper.make_node("Mul", ["silu", "s"], ["scaled"]),  # by an initializer
        helper.make_node("Conv", ["scaled", "w"], ["after_scale"]),  # a producer after an affine
        helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.array(0.5, np.float32))),
        helper.make_node("CastLike", ["k", "x"], ["k_like"]),
        helper.make_node("Add", ["after_scale", "k_like"], ["shifted"]),  # by a Constant cast like x
        helper.make_node("Add", ["shifted", "x"], ["residual"]),  # a sum with a branch from an affine
        helper.make_node("Relu", ["residual"], ["r"]),
        helper.make_node("Sum", ["r", "c"], ["summed"]),  # a branch from a producer
        helper.make_node("Add", ["r", "sig"], ["plain"]),  # neither operand a branch: no fold's
        helper.make_node("Constant", [], ["pads"], value=tensor("pads", np.array([0, 0, 1, 1] * 2, np.int64))),
        helper.make_node("Pad", ["plain", "pads"], ["padded"]),
        helper.make_node("Conv", ["padded", "w"], ["after_pad"]),
        helper.make_node("Pad", ["summed", "pads"], ["summed_padded"]),
        helper.make_node("Add", ["after_pad", "summed_padded"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f, [1, 4, 5, 5])],
                              [helper.make_tensor_value_info("y", f, [1, 4, 7, 7])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    assert job_module.candidates(model) == sorted(
        ["bn", "scaled", "after_scale", "shifted", "residual", "summed", "after_pad"])


def _chains(seed: int = 4, declined_scale: bool = False) -> onnx.ModelProto:
    """x -> Conv -> BN -> Mul(s) -> Add(t) -> Relu -> Conv -> BN -> (Mul(u), Mul(v)) -> Add -> y: a chain of
    affines as Caffe2's exports have them (the BN and the Mul read by nothing but the next affine), and a
    BN read by two. ``declined_scale``: the first Mul's constant is not per channel ([1, 4, 6, 6]), so the
    chain's fold stops at the BN."""
    rng = np.random.default_rng(seed)
    f = onnx.TensorProto.FLOAT
    scale_shape = (1, 4, 6, 6) if declined_scale else (1, 4, 1, 1)
    inits = [tensor("w0", rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32)),
             tensor("w1", rng.normal(0, 0.5, (4, 4, 1, 1)).astype(np.float32)),
             tensor("s", rng.uniform(0.5, 2.0, scale_shape).astype(np.float32)),
             tensor("t", rng.normal(0, 1, (1, 4, 1, 1)).astype(np.float32)),
             tensor("u", rng.uniform(0.5, 2.0, (1, 4, 1, 1)).astype(np.float32)),
             tensor("v", rng.uniform(0.5, 2.0, (1, 4, 1, 1)).astype(np.float32))]
    for i in range(2):
        inits += [tensor(f"{p}{i}", a) for p, a in zip(("g", "b", "m", "v_"), bn_stats(rng, 4))]
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c0", "g0", "b0", "m0", "v_0"], ["bn0"]),
        helper.make_node("Mul", ["bn0", "s"], ["mul0"]),
        helper.make_node("Add", ["mul0", "t"], ["add0"]),
        helper.make_node("Relu", ["add0"], ["r0"]),
        helper.make_node("Conv", ["r0", "w1"], ["c1"]),
        helper.make_node("BatchNormalization", ["c1", "g1", "b1", "m1", "v_1"], ["bn1"]),
        helper.make_node("Mul", ["bn1", "u"], ["left"]),
        helper.make_node("Mul", ["bn1", "v"], ["right"]),
        helper.make_node("Add", ["left", "right"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "chains", [helper.make_tensor_value_info("x", f, [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", f, [1, 4, 6, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_an_affine_read_only_by_the_next_affine_of_its_chain_is_no_candidate():
    """Its fold's tensor is rewritten by the next fold and compared at that one's output: the chain's
    middle (bn0, mul0) is not exposed early; a BN read by two affines (bn1) still is."""
    names = job_module.candidates(_chains())
    assert "bn0" not in names and "mul0" not in names
    assert {"add0", "bn1", "left", "right"} <= set(names)


@pytest.mark.parametrize("declined_scale", [False, True])
def test_a_chain_of_affines_is_verified_at_its_end_and_where_it_stops(tmp_path, logged, declined_scale):
    """The whole chain folded: compared at add0, which the early run exposed (the original is not run
    again). A chain whose fold stops at the BN (its Mul not per channel): compared at bn0, which the
    early run did not expose: the original runs again with the planned exposure, and it is compared."""
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(_chains(declined_scale=declined_scale), src)
    result = fold_file(src, out)
    assert result and out.exists()
    early = set(logged.joinpath("early").read_text().split(","))
    assert "bn0" not in early and "mul0" not in early and "add0" in early
    compared = {f.name for f in result.verification.results[0].folds if f.compared and f.passed}
    if declined_scale:
        assert "bn0" in compared and "m.onnx" in _loads(logged)
    else:
        assert "add0" in compared and "bn0" not in compared and "m.onnx" not in _loads(logged)


def _reshaped_by_shapes(seed: int = 6) -> onnx.ModelProto:
    """x -> Conv -> BN -> Relu -> Reshape [1, 4, 36] -> Reshape [1, 4, 6, 6] -> Conv -> BN -> y, each Reshape's
    target a Concat with the Cast of a Slice of the Shape of the tensor it reshapes, at opset 12, as
    paddle2onnx writes them (PP-OCRv4): onnx's data propagation has no Slice before opset 13, so inference
    sizes what follows such a Reshape only once the Shape before it is a constant."""
    rng = np.random.default_rng(seed)
    f, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    inits = [tensor("w0", rng.normal(0, 0.5, (4, 4, 3, 3)).astype(np.float32)),
             tensor("w1", rng.normal(0, 0.5, (4, 4, 1, 1)).astype(np.float32)),
             tensor("zero", np.array([0], np.int64)), tensor("one", np.array([1], np.int64)),
             tensor("two", np.array([2], np.int64)),
             tensor("n36", np.array([36], np.int64)), tensor("n6", np.array([6, 6], np.int64))]
    for k in range(2):
        inits += [tensor(f"{p}{k}", a) for p, a in zip(("g", "b", "m", "v"), bn_stats(rng, 4))]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c0", "g0", "b0", "m0", "v0"], ["bn0"]),
             helper.make_node("Relu", ["bn0"], ["r0"])]
    for k, (src, tail, dst) in enumerate((("r0", "n36", "flat"), ("flat", "n6", "back"))):
        nodes += [helper.make_node("Shape", [src], [f"s{k}"]),
                  helper.make_node("Slice", [f"s{k}", "one", "two", "zero"], [f"sl{k}"]),  # axes given
                  helper.make_node("Cast", [f"sl{k}"], [f"i{k}"], to=onnx.TensorProto.INT32),
                  helper.make_node("Cast", [f"i{k}"], [f"l{k}"], to=i64),
                  helper.make_node("Concat", ["one", f"l{k}", tail], [f"t{k}"], axis=0),
                  helper.make_node("Reshape", [src, f"t{k}"], [dst])]
    nodes += [helper.make_node("Conv", ["back", "w1"], ["c1"]),
              helper.make_node("BatchNormalization", ["c1", "g1", "b1", "m1", "v1"], ["bn1"]),
              helper.make_node("Relu", ["bn1"], ["y"])]
    graph = helper.make_graph(nodes, "paddle", [helper.make_tensor_value_info("x", f, ["n", 4, "h", "w"])],
                              [helper.make_tensor_value_info("y", f, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    model.ir_version = 8
    return model


def test_inference_sizes_what_follows_reshapes_to_the_shape_of_an_activation(tmp_path, logged):
    """Each inference knows the Shape of what the last one sized (memory.inferred_shapes, passes with
    constants folded): bn1, after two such Reshapes, is sized, exposed early, and the original is not
    run again after the write."""
    from onnxfold.verification import memory

    model = _reshaped_by_shapes()
    specs = {"x": (np.dtype(np.float32), (1, 4, 6, 6))}
    assert memory.inferred_shapes(model, specs, ["bn1"]) == {"bn1": (onnx.TensorProto.FLOAT, (1, 4, 6, 6))}
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(model, src)
    result = fold_file(src, out, input_shapes={"x": [1, 4, 6, 6]})
    assert result and out.exists()
    assert {"bn0", "bn1"} <= set(logged.joinpath("early").read_text().split(","))
    assert "m.onnx" not in _loads(logged), "the original was run again: the early run lacked a fold tensor"
    folds = result.verification.results[0].folds
    assert sorted(f.name for f in folds) == ["bn0", "bn1"] and all(f.passed and f.compared for f in folds)


@pytest.mark.parametrize("ir", [3, 8])
def test_inference_takes_a_large_constant_node_by_its_type_and_shape(monkeypatch, ir):
    """paddle2onnx keeps weights in Constant nodes (PP-OCRv4 rec: 10.8 MB of them), which every inference
    pass copied, serialized and parsed: inference now gets each as an initializer of its type and shape
    alone (a graph input too at IR 3), and tells the same shapes: the Constant's own, and past a Reshape
    to the Shape of an activation (paddle2onnx's, at opset 12), the tensor it makes."""
    from onnxfold.verification import memory

    rng = np.random.default_rng(9)
    f = onnx.TensorProto.FLOAT
    weight = tensor("w", rng.normal(0, 0.5, (64, 4, 3, 3)).astype(np.float32))  # 9216 bytes: over 2 * SMALL
    inits = [tensor(n, a) for n, a in zip(("g", "b", "m", "v"), bn_stats(rng, 64))]
    inits += [tensor("zero", np.array([0], np.int64)), tensor("one", np.array([1], np.int64)),
              tensor("two", np.array([2], np.int64)), tensor("n36", np.array([36], np.int64))]
    nodes = [helper.make_node("Constant", [], ["w"], value=weight),
             helper.make_node("Conv", ["x", "w"], ["c0"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c0", "g", "b", "m", "v"], ["bn0"]),
             helper.make_node("Shape", ["bn0"], ["s"]),
             helper.make_node("Slice", ["s", "one", "two", "zero"], ["sl"]),
             helper.make_node("Concat", ["one", "sl", "n36"], ["t"], axis=0),
             helper.make_node("Reshape", ["bn0", "t"], ["y"])]
    graph = helper.make_graph(nodes, "paddle", [helper.make_tensor_value_info("x", f, ["n", 4, "h", "w"])],
                              [helper.make_tensor_value_info("y", f, None)], inits)
    if ir < 4:  # IR 3: each initializer is a graph input too
        graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    model.ir_version = ir
    assert model.graph.node[0].ByteSize() > 2 * memory.SMALL
    seen = []
    real = onnx.shape_inference.infer_shapes

    def spy(light, *args, **kwargs):
        seen.append(max((n.ByteSize() for n in light.graph.node), default=0))
        return real(light, *args, **kwargs)

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", spy)
    specs = {"x": (np.dtype(np.float32), (1, 4, 6, 6))}
    known = memory.inferred_shapes(model, specs, ["y"], every=True)
    assert known["w"] == (f, (64, 4, 3, 3)) and known["c0"] == (f, (1, 64, 6, 6))
    assert known["y"] == (f, (1, 64, 36))
    assert seen and max(seen) < 2 * memory.SMALL  # no pass was given the Constant's bytes


def test_inference_sizes_what_follows_a_reshape_to_a_ceil_of_constants():
    """Hugging Face's legacy MobileViT sizes its patches with Ceil of a Constant: const_eval evaluates
    Ceil (and Floor), so the Reshape's target is a constant and what follows it is sized."""
    from onnxfold.verification import memory

    rng = np.random.default_rng(8)
    f = onnx.TensorProto.FLOAT
    inits = [tensor("w0", rng.normal(0, 0.5, (4, 4, 3, 3)).astype(np.float32)),
             tensor("w1", rng.normal(0, 0.5, (4, 4, 1, 1)).astype(np.float32))]
    for k in range(2):
        inits += [tensor(f"{p}{k}", a) for p, a in zip(("g", "b", "m", "v"), bn_stats(rng, 4))]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c0", "g0", "b0", "m0", "v0"], ["bn0"]),
             helper.make_node("Constant", [], ["k"], value=tensor("k", np.array([1.0, 3.2, 35.5, 0.4], np.float32))),
             helper.make_node("Ceil", ["k"], ["up"]),
             helper.make_node("Floor", ["up"], ["same"]),
             helper.make_node("Cast", ["same"], ["target"], to=onnx.TensorProto.INT64),
             helper.make_node("Reshape", ["bn0", "target"], ["patches"]),
             helper.make_node("Conv", ["patches", "w1"], ["c1"]),
             helper.make_node("BatchNormalization", ["c1", "g1", "b1", "m1", "v1"], ["bn1"]),
             helper.make_node("Relu", ["bn1"], ["y"])]
    graph = helper.make_graph(nodes, "ceil", [helper.make_tensor_value_info("x", f, [1, 4, 6, 6])],
                              [helper.make_tensor_value_info("y", f, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    specs = {"x": (np.dtype(np.float32), (1, 4, 6, 6))}
    assert memory.inferred_shapes(model, specs, ["bn1"]) == {"bn1": (f, (1, 4, 36, 1))}


def test_with_verification_the_check_child_imports_onnxruntime_only_to_load_what_nothing_verified(
        tmp_path, monkeypatch):
    """With verification the check child does not import onnxruntime while the model folds (verification
    loads the folded model; the import took a core from the fold and verification's child). Where nothing
    folds, verification is skipped and the child loads the written model after all: a broken write is
    still caught."""
    monkeypatch.setattr(isolation, "WORKER", "fork")
    output_check = importlib.import_module("onnxfold.output_check")
    marker = tmp_path / "child"
    real_check, real_write = output_check._check, api.write

    def check(path, ready, expected, send):
        marker.write_text(str(expected))
        return real_check(path, ready, expected, send)

    real_session, loaded, parent = output_check._session, tmp_path / "loaded", os.getpid()

    def session(path):
        loaded.write_text(f"{Path(path).name} {'here' if os.getpid() == parent else 'child'}")
        return real_session(path)

    monkeypatch.setattr(output_check, "_check", check)
    monkeypatch.setattr(output_check, "_session", session)
    src = tmp_path / "m.onnx"
    onnx.save(two_folds(6), src)
    assert fold_file(src, tmp_path / "o.onnx") and marker.read_text() == "False" and not loaded.exists()
    plain = two_folds(6)  # nothing to fold: the BatchNormalizations gone
    for node in [n for n in plain.graph.node if n.op_type == "BatchNormalization"]:
        node.op_type, node.input[1:] = "Identity", []
        del node.attribute[:]
    onnx.save(plain, src)
    result = fold_file(src, tmp_path / "p.onnx")
    assert result and result.verification is None and marker.read_text() == "False"
    assert loaded.read_text() == "p.onnx child"  # loaded in onnxruntime by the check child after all

    monkeypatch.setattr(api, "write", _truncating(real_write))
    with pytest.raises(Exception, match="rejects the written model") as e:
        fold_file(src, tmp_path / "o2.onnx")
    assert type(e.value).__name__ == "OutputBroken" and not (tmp_path / "o2.onnx").exists()
    assert marker.read_text() == "False"
