"""Hostile and broken inputs through the command line: one line on stderr, the right exit code, nothing
at OUT (issue 10, "Errors: one line, and exit 1 only for a failed verification"). Each case failed on
eadbfe9 with a traceback and exit 1, a hang, or a wrong file written with exit 0."""

import os
import resource
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from builders import conv_bn_model
from checks import assert_user_error, cli, session


def nothing_at(folder: Path, *keep: str):
    """Nothing written beside the input: no output, no data file, no temp folder."""
    assert sorted(os.listdir(folder)) == sorted(keep)


def save(model, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def init(model, name):
    return next(t for t in model.graph.initializer if t.name == name)


# -- malformed files and tensors ------------------------------------------------------------------


def test_random_bytes_and_truncated_protobuf(tmp_path):
    (tmp_path / "r.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    assert_user_error(cli(tmp_path / "r.onnx", tmp_path / "o.onnx"), "not a readable ONNX model")
    good = conv_bn_model().SerializeToString()
    (tmp_path / "t.onnx").write_bytes(good[: len(good) // 2])
    assert_user_error(cli(tmp_path / "t.onnx", tmp_path / "o.onnx"))
    nothing_at(tmp_path, "r.onnx", "t.onnx")


def test_zero_size_weights(tmp_path):
    """A Conv with 0 output channels (weight [0, 4, 3, 3]) and BN statistics of size 0."""
    m = conv_bn_model()
    for t in list(m.graph.initializer):
        a = numpy_helper.to_array(t)
        t.CopyFrom(numpy_helper.from_array(a[:0], t.name))
    src = save(m, tmp_path / "z.onnx")
    proc = cli(src, tmp_path / "o.onnx", "-q")  # -q: the fold's summary comes before verification finds it
    # Either declined (nothing to fold, the model written as is, exit 0) or one line, exit 2: never a crash.
    assert proc.returncode in (0, 2) and "Traceback" not in proc.stderr, proc.stderr
    if proc.returncode == 0:
        onnx.checker.check_model(str(tmp_path / "o.onnx"))
    else:
        assert_user_error(proc, began=True)  # found by verification, after the fold
        nothing_at(tmp_path, "z.onnx")


def test_raw_data_length_not_matching_dims(tmp_path):
    m = conv_bn_model()
    w = init(m, "w")
    w.raw_data = w.raw_data[:-4]
    src = save(m, tmp_path / "m.onnx")
    assert_user_error(cli(src, tmp_path / "o.onnx"), "raw_data")
    nothing_at(tmp_path, "m.onnx")


def test_dims_of_two_to_the_forty(tmp_path):
    m = conv_bn_model()
    w = init(m, "w")
    del w.dims[:]
    w.dims.extend([1 << 40, 4, 3, 3])
    src = save(m, tmp_path / "m.onnx")
    assert_user_error(cli(src, tmp_path / "o.onnx"), "2^40")
    nothing_at(tmp_path, "m.onnx")


# -- external data fields ---------------------------------------------------------------------------


def external(tmp_path, **fields) -> Path:
    """Conv -> BN with the weight in w.bin; ``fields`` override its external_data entries."""
    m = conv_bn_model()
    w = init(m, "w")
    (tmp_path / "w.bin").write_bytes(w.raw_data)
    entries = {"location": "w.bin", "offset": "0", "length": str(len(w.raw_data)), **fields}
    w.ClearField("raw_data")
    w.data_location = onnx.TensorProto.EXTERNAL
    for k, v in entries.items():
        if v is not None:
            e = w.external_data.add()
            e.key, e.value = k, v
    return save(m, tmp_path / "m.onnx")


@pytest.mark.parametrize("fields, text", [
    ({"offset": "-1"}, "offset"),
    ({"offset": "abc"}, "offset"),
    ({"length": "12x"}, "length"),
    ({"offset": "9" * 40}, "offset"),
    ({"length": "8"}, "length"),
    ({"location": "w\0.bin"}, "location"),
    ({"location": ""}, "location"),
    ({"location": "x" * 5000}, "location"),
    ({"location": "../w.bin"}, "outside"),
])
def test_bad_external_data_fields(tmp_path, fields, text):
    src = external(tmp_path, **fields)
    assert_user_error(cli(src, tmp_path / "o.onnx"), text)
    nothing_at(tmp_path, "m.onnx", "w.bin")


def test_absolute_location_outside_the_folder_is_refused(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    src = external(model_dir, location=str(outside / "w.bin"))
    (model_dir / "w.bin").rename(outside / "w.bin")
    for flags in ([], ["--external-data", "never"]):
        assert_user_error(cli(src, model_dir / "o.onnx", *flags), "outside")
        nothing_at(model_dir, "m.onnx")


def test_absolute_location_inside_the_folder_with_external_data_never(tmp_path):
    """eadbfe9 copied such a tensor for an external output but crashed (onnx's loader refuses absolute
    locations, traceback, exit 1) for a single-file one. Both read it the same way now."""
    src = external(tmp_path, location=str(tmp_path / "w.bin"))
    out = tmp_path / "out"
    out.mkdir()
    proc = cli(src, out / "o.onnx", "--external-data", "never", "--disable", "conv_bn")
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out)) == ["o.onnx"]
    written = onnx.load(str(out / "o.onnx"))
    assert np.array_equal(numpy_helper.to_array(init(written, "w")), numpy_helper.to_array(init(conv_bn_model(), "w")))


def test_external_tensor_without_length_is_copied_exactly(tmp_path):
    """The `length` key is optional: the copy is the tensor's size from its dims, not the rest of the file
    (eadbfe9 copied to the end of the data file, and wrote a model onnxruntime rejects, exit 0)."""
    src = external(tmp_path, length=None)
    with open(tmp_path / "w.bin", "ab") as f:  # more bytes after the tensor: another tensor's, say
        f.write(np.arange(100, dtype=np.float32).tobytes())
    for flags in (["--no-verify", "--external-data", "always"], ["--disable", "conv_bn", "--external-data", "always"],
                  ["--external-data", "always"]):
        out = tmp_path / "o.onnx"
        proc = cli(src, out, *flags)
        assert proc.returncode == 0, proc.stderr
        onnx.checker.check_model(str(out))
        session(out)
        written = onnx.load(str(out))
        if "--disable" in flags:
            assert np.array_equal(numpy_helper.to_array(init(written, "w")),
                                  numpy_helper.to_array(init(conv_bn_model(), "w")))


def test_sparse_initializer_with_external_data_keeps_its_data(tmp_path):
    """eadbfe9 wrote the sparse initializer pointing to a data file it did not copy."""
    m = conv_bn_model()
    values = np.array([1.5, -2.0, 3.25], dtype=np.float32)
    indices = np.array([0, 5, 7], dtype=np.int64)
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(values, "sp"),
                                       numpy_helper.from_array(indices, "sp_idx"), [12])
    (tmp_path / "sp.bin").write_bytes(values.tobytes())
    sparse.values.ClearField("raw_data")
    sparse.values.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", "sp.bin"), ("offset", "0"), ("length", "12")):
        e = sparse.values.external_data.add()
        e.key, e.value = k, v
    m.graph.sparse_initializer.append(sparse)
    m.graph.node.append(helper.make_node("ReduceSum", ["sp"], ["sp_sum"], keepdims=0))
    m.graph.output.append(helper.make_tensor_value_info("sp_sum", onnx.TensorProto.FLOAT, []))
    src = save(m, tmp_path / "m.onnx")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = cli(src, out_dir / "o.onnx", "--no-verify")
    assert proc.returncode == 0, proc.stderr
    written = onnx.load(str(out_dir / "o.onnx"))
    assert np.array_equal(numpy_helper.to_array(written.graph.sparse_initializer[0].values), values)
    got = session(out_dir / "o.onnx").run(
        ["sp_sum"], {"x": np.zeros((1, 4, 6, 6), np.float32)})[0]
    assert got == pytest.approx(values.sum())


# -- cycles ---------------------------------------------------------------------------------------


def cyclic(kind: str) -> onnx.ModelProto:
    m = conv_bn_model()
    g = m.graph
    if kind == "self-loop":  # BN reads the Identity that reads itself
        g.node.insert(0, helper.make_node("Identity", ["i"], ["i"]))
        g.node[2].input[0] = "i"
    elif kind == "2-cycle":
        g.node.insert(0, helper.make_node("Identity", ["j"], ["i"]))
        g.node.insert(0, helper.make_node("Identity", ["i"], ["j"]))
        g.node[3].input[0] = "i"
    elif kind == "conv-input":  # bn_conv walks up from a Conv's input
        g.node.insert(0, helper.make_node("Identity", ["j"], ["i"]))
        g.node.insert(0, helper.make_node("Identity", ["i"], ["j"]))
        g.node[2].input[0] = "i"
    elif kind == "function":
        body = [helper.make_node("Identity", ["b"], ["a"]), helper.make_node("Identity", ["a"], ["b"]),
                helper.make_node("BatchNormalization", ["a", "g", "bt", "mu", "v"], ["out"])]
        fn = helper.make_function("local", "F", ["g", "bt", "mu", "v"], ["out"], body,
                                  [helper.make_opsetid("", 17)])
        m.functions.append(fn)
        g.node.append(helper.make_node("F", ["gamma", "beta", "mean", "var"], ["f"], domain="local"))
        g.output.append(helper.make_tensor_value_info("f", onnx.TensorProto.FLOAT, None))
        m.opset_import.append(helper.make_opsetid("local", 1))
    return m


@pytest.mark.parametrize("kind", ["self-loop", "2-cycle", "conv-input", "function"])
def test_identity_cycles_are_refused_not_a_hang(tmp_path, kind):
    """eadbfe9 looped forever with growing memory in Scope.upstream / _reads_weights_from_inputs."""
    src = save(cyclic(kind), tmp_path / "m.onnx")
    assert_user_error(cli(src, tmp_path / "o.onnx", timeout=60), "cycle")
    nothing_at(tmp_path, "m.onnx")


@pytest.mark.parametrize("kind", ["self-loop", "2-cycle", "conv-input", "function"])
def test_identity_cycles_in_the_api_do_not_hang(kind):
    """The API has no load step: fold_model walks up an Identity cycle and stops (nothing folds through)."""
    import threading

    from onnxfold import fold_model

    done = []
    t = threading.Thread(target=lambda: done.append(fold_model(cyclic(kind))), daemon=True)
    t.start()
    t.join(30)
    assert done, "fold_model hangs on an Identity cycle"
    folded, report = done[0]
    assert not any(f.consumer.startswith("BatchNormalization") and "i" in f.consumer for f in report.folded)


def test_cycle_in_folder_mode_does_not_hang_the_run(tmp_path):
    src_dir, out_dir = tmp_path / "in", tmp_path / "out"
    src_dir.mkdir()
    save(cyclic("2-cycle"), src_dir / "bad.onnx")
    save(conv_bn_model(), src_dir / "good.onnx")
    proc = cli(src_dir, out_dir, "-j", "2", "-q", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "cycle" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(os.listdir(out_dir)) == ["good.onnx"]


# -- the disk, names and folders --------------------------------------------------------------------


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


def test_file_size_limit_is_one_line_that_mentions_twice_the_size(tmp_path):
    """A single file larger than the limit: EFBIG (the same path as a full disk), not a traceback."""
    m = conv_bn_model(cin=16, cout=16)
    src = tmp_path / "m.onnx"
    src.write_bytes(m.SerializeToString())
    assert src.stat().st_size > 4096
    proc = cli(src, tmp_path / "o.onnx", "--no-verify", preexec_fn=_limit_file_size)
    assert_user_error(proc, "twice its size", began=True)  # while writing
    nothing_at(tmp_path, "m.onnx")


def test_out_name_of_250_characters(tmp_path):
    src = save(conv_bn_model(), tmp_path / "m.onnx")
    assert_user_error(cli(src, tmp_path / ("o" * 245 + ".onnx")), "too long")
    nothing_at(tmp_path, "m.onnx")


def test_out_dir_below_a_file(tmp_path):
    src_dir = tmp_path / "in"
    src_dir.mkdir()
    save(conv_bn_model(), src_dir / "m.onnx")
    (tmp_path / "file").write_text("x")
    assert_user_error(cli(src_dir, tmp_path / "file" / "out"), "is a file")


def test_data_name_is_an_existing_directory(tmp_path):
    src = save(conv_bn_model(), tmp_path / "m.onnx")
    (tmp_path / "d").mkdir()
    assert_user_error(cli(src, tmp_path / "o.onnx", "--external-data", "always", "--data-name", "d"), "directory")
    nothing_at(tmp_path, "m.onnx", "d")


# -- options --------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, text", [
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**32)], "--seed"),
    (["--input-range", "0,inf"], "finite"),
    (["--input-range", "nan,1"], "finite"),
    (["--input-shape", "x:100000x100000x100000x100000"], "elements"),
    (["--atol", "-1"], "--atol"),
])
def test_bad_option_values(tmp_path, flags, text):
    src = save(conv_bn_model(), tmp_path / "m.onnx")
    assert_user_error(cli(src, tmp_path / "o.onnx", *flags), text)
    nothing_at(tmp_path, "m.onnx")


def test_negative_input_range_needs_no_equals_sign(tmp_path):
    """`--input-range -2,2` was taken for an unknown option; `--input-range=-2,2` worked."""
    src = save(conv_bn_model(), tmp_path / "m.onnx")
    proc = cli(src, tmp_path / "o.onnx", "--input-range", "-2,2")
    assert proc.returncode == 0, proc.stderr
    onnx.checker.check_model(str(tmp_path / "o.onnx"))


def test_report_path_that_cannot_be_written_fails_before_any_output(tmp_path):
    """eadbfe9 wrote the model, then failed on the report with exit 2 ("no output"): now the report path
    is checked first, and a failure leaves nothing."""
    src = save(conv_bn_model(), tmp_path / "m.onnx")
    assert_user_error(cli(src, tmp_path / "o.onnx", "--report", tmp_path / "no" / "r.json"), "--report")
    (tmp_path / "rdir").mkdir()
    assert_user_error(cli(src, tmp_path / "o.onnx", "--report", tmp_path / "rdir"), "directory")
    nothing_at(tmp_path, "m.onnx", "rdir")


# -- a bug is a bug -------------------------------------------------------------------------------


def test_an_unexpected_exception_says_bug_and_exits_70(tmp_path, monkeypatch, capsys):
    """Not exit 1 (verification failed): its own code, the traceback, and a sentence saying it is a bug."""
    from onnxfold import api
    from onnxfold import cli as cli_module

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(api, "fold_model", boom)
    src = save(conv_bn_model(), tmp_path / "m.onnx")
    code = cli_module.main([str(src), str(tmp_path / "o.onnx")])
    err = capsys.readouterr().err
    assert code == 70
    assert "Traceback" in err and "this is a bug in onnxfold" in err
    nothing_at(tmp_path, "m.onnx")


def test_a_written_model_that_does_not_load_is_never_exit_0(tmp_path, monkeypatch, capsys):
    """Exit 0 means the written model passes onnx.checker and loads in onnxruntime: a writer that breaks
    the model (simulated here) is caught before the commit, reported as a bug, and nothing is written."""
    from onnxfold import api
    from onnxfold import cli as cli_module
    from onnxfold import write as io

    real_write = io.write

    def broken_write(model, path, **kw):
        files = real_write(model, path, **kw)
        files[0].write_bytes(files[0].read_bytes()[:-7])
        return files

    monkeypatch.setattr(api, "write", broken_write)
    src = save(conv_bn_model(), tmp_path / "m.onnx")
    code = cli_module.main([str(src), str(tmp_path / "o.onnx"), "--no-verify"])
    err = capsys.readouterr().err
    assert code == 70, err
    assert "this is a bug in onnxfold" in err
    nothing_at(tmp_path, "m.onnx")


# -- the API --------------------------------------------------------------------------------------


def test_api_type_errors_and_exports():
    import onnxfold
    from onnxfold import fold_model, verify

    with pytest.raises(TypeError, match="onnx.ModelProto"):
        fold_model(b"not a model")
    with pytest.raises(TypeError, match="onnx.ModelProto"):
        fold_model(conv_bn_model().graph)
    with pytest.raises(TypeError):
        verify(None, None)
    assert issubclass(onnxfold.InputError, Exception) and "InputError" in onnxfold.__all__
    # A string is one rule's name, not a list of letters.
    folded, report = fold_model(conv_bn_model(), disable="conv_bn")
    assert not report.folded and "rule conv_bn is disabled" in report.left[0].reason
    with pytest.raises(ValueError, match="unknown rule 'conv_bm'"):
        fold_model(conv_bn_model(), disable="conv_bm")


def test_typed_tensors_are_not_mistaken_for_bad_sizes(tmp_path):
    """The size checks apply to raw and external data only: a string Constant and float_data stay valid."""
    m = conv_bn_model()
    strings = helper.make_tensor("labels", onnx.TensorProto.STRING, [2], [b"cat", b"dog"])
    m.graph.node.append(helper.make_node("Constant", [], ["labels"], value=strings))
    m.graph.output.append(helper.make_tensor_value_info("labels", onnx.TensorProto.STRING, [2]))
    w = init(m, "b")
    w.CopyFrom(helper.make_tensor("b", onnx.TensorProto.FLOAT, [6], [0.5, -1.0, 2.0, 0.25, -0.75, 1.5]))
    src = save(m, tmp_path / "m.onnx")
    proc = cli(src, tmp_path / "o.onnx")
    assert proc.returncode == 0, proc.stderr
    onnx.checker.check_model(str(tmp_path / "o.onnx"))


def test_single_file_output_over_the_limit_falls_back_to_external_data_whole(tmp_path, monkeypatch, capsys):
    """eadbfe9: when a single-file output turned out over protobuf's limit, the fallback to external
    data lost the streamed folded weights (onnxruntime: "Node input 'w_folded' is not ... an
    initializer"). The limit is lowered here so a small model takes that path."""
    from onnxfold import cli as cli_module
    from onnxfold import protobuf as io
    from onnxfold import verify

    src = save(conv_bn_model(cin=16, cout=16), tmp_path / "m.onnx")
    monkeypatch.setattr(io, "PROTOBUF_LIMIT", 3000)
    code = cli_module.main([str(src), str(tmp_path / "o.onnx"), "--no-verify"])
    assert code == 0, capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "o.onnx", "o.onnx.data"]
    assert verify(src, tmp_path / "o.onnx")


# Planted in every new Python process whose path starts with the folder this is written to (the
# verification worker, started from the test's environment): the worker imports onnxfold afresh, so a
# monkeypatch of the test's own process cannot reach it. Each load is logged with the pid that made it.
_PLANT = """
import os
from pathlib import Path

import onnxfold.output_check as oc

_real = oc._session


def _picky(path):
    with open(os.environ["PLANT_LOG"], "a") as log:
        log.write(f"{os.getpid()}\\n")
    if Path(path) != Path(os.environ["PLANT_SRC"]):
        raise RuntimeError("planted: onnxruntime refuses this model")
    _real(path)


oc._session = _picky
"""


@pytest.mark.parametrize("worker", ["fork", "spawn"])
def test_a_written_model_onnxruntime_rejects_is_never_exit_0(tmp_path, tmp_path_factory, monkeypatch, capsys, worker):
    """With --no-verify, the written model is loaded in onnxruntime before the commit, in a child process:
    forked, or where forking is not safe (the caller imported onnxruntime), the worker process; never in
    the caller's own process. One that onnxruntime rejects (simulated) is a bug, exit 70, nothing
    written; the input, which it accepts, is checked to tell the two apart."""
    import importlib

    from onnxfold import cli as cli_module
    from onnxfold import output_check as io

    isolation = importlib.import_module("onnxfold.isolation")
    monkeypatch.setattr(isolation, "WORKER", worker)
    src = save(conv_bn_model(), tmp_path / "m.onnx")
    plant = tmp_path_factory.mktemp("plant")
    log = plant / "loads.log"
    monkeypatch.setenv("PLANT_LOG", str(log))
    monkeypatch.setenv("PLANT_SRC", str(src))
    if worker == "spawn":  # a fresh worker, with the plant on its path
        (plant / "sitecustomize.py").write_text(_PLANT)
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(plant), os.environ.get("PYTHONPATH", "")]))
        isolation._stop_worker()
    else:  # the forked child is a copy of this process, the patch included
        real = io._session
        exec(_PLANT, {})  # replaces io._session: put it back, and patch it the undoable way
        planted, io._session = io._session, real
        monkeypatch.setattr(io, "_session", planted)
    try:
        code = cli_module.main([str(src), str(tmp_path / "o.onnx"), "--no-verify"])
    finally:
        if worker == "spawn":
            isolation._stop_worker()  # the next test's worker starts without the plant
    err = capsys.readouterr().err
    assert code == 70, err
    assert "onnxruntime rejects the written model, though it accepts the input: planted" in err
    nothing_at(tmp_path, "m.onnx")
    pids = {int(line) for line in log.read_text().split()}
    assert len(pids) >= 1 and os.getpid() not in pids  # isolated: never loaded in the caller's process


def test_a_residual_chain_hundreds_of_adds_deep_is_no_recursion_error():
    """A Conv's output added to the end of a chain of 600 residual Adds (x + Relu(x), as deep ResNets and
    transformers make): asking whether that operand is a constant walked the chain by recursion, and
    Python's recursion limit crashed the fold (RecursionError, exit 70). Now nothing folds there, and
    the model is left as it was."""
    from onnxfold import fold_model

    depth = 600
    nodes = [helper.make_node("Relu", ["x"], ["r0"])]
    for k in range(depth):
        nodes.append(helper.make_node("Relu", [f"r{k}"], [f"q{k}"]))
        nodes.append(helper.make_node("Add", [f"r{k}", f"q{k}"], [f"r{k + 1}"]))
    nodes.append(helper.make_node("Conv", ["x", "w"], ["c"]))
    nodes.append(helper.make_node("Add", ["c", f"r{depth}"], ["y"]))
    graph = helper.make_graph(
        nodes, "deep", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.random.default_rng(0).normal(size=(3, 3, 1, 1)).astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folded, report = fold_model(model)
    assert not report.folded
    assert [n.op_type for n in folded.graph.node] == [n.op_type for n in model.graph.node]


def test_an_input_range_whose_width_overflows_is_refused_before_any_work(tmp_path):
    """--input-range -1e308,1e308: both ends finite, their difference not; numpy's uniform raised
    OverflowError while making the inputs, after the fold (exit 70). Now one line, exit 2, nothing written."""
    src = save(conv_bn_model(), tmp_path / "m.onnx")
    proc = cli(src, tmp_path / "o.onnx", "--input-range", "-1e308,1e308")
    assert_user_error(proc, "--input-range")
    assert "HI - LO must be a finite number" in proc.stderr
    nothing_at(tmp_path, "m.onnx")
