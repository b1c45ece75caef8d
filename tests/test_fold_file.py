"""``onnxfold.fold_file``: the command line's single-file path as an API (issue 13), and what the library
says: log records to the "onnxfold" logger, nothing printed; ``--report -`` puts the JSON on stdout.

Every verification below runs in onnxruntime with ORT_DISABLE_ALL (onnxfold.verify) at its default
tolerances: float32 outputs atol 1e-4 x the output's scale, rtol 1e-4.
"""

import errno
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import subprocess
import sys
from dataclasses import FrozenInstanceError
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxfold
from builders import conv_bn_model, count
from checks import cli as run_cli
from onnxfold import FoldError, InputError, VerifyError, cli, fold_file, verify

ROOT = Path(__file__).resolve().parent.parent


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


def external(folder: Path, name: str = "m.onnx") -> Path:
    """Conv -> BN with every tensor of at least 256 bytes in ``<name>.data``."""
    path = folder / name
    onnx.save(conv_bn_model(cin=8, cout=8, seed=3), path, save_as_external_data=True, all_tensors_to_one_file=True,
              location=name + ".data", size_threshold=256)
    return path


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def flip_channel_one(monkeypatch) -> None:
    """A planted bug: the fold's new weight has output channel 1 negated (the weights of conv_bn_model
    are small enough to stay inline, where this reaches them)."""
    real = onnxfold.api.fold_model

    def flipped(model, **kw):
        folded, report = real(model, **kw)
        (weight,) = [t for t in folded.graph.initializer if t.name == report.folded[0].weight]
        assert weight.HasField("raw_data") or weight.float_data, "the planted bug needs an inline weight"
        w = numpy_helper.to_array(weight).copy()
        w[1] = -w[1]
        weight.CopyFrom(numpy_helper.from_array(w, weight.name))
        return folded, report

    monkeypatch.setattr(onnxfold.api, "fold_model", flipped)


# The phases of a run in ``FoldResult.timings`` (and the report's "timings"), besides the five it always had
PHASES = {"startup_s", "lock_s", "plan_s", "stage_s", "check_checker_s", "commit_s", "total_s"}
VERIFY_PARTS = {f"verify_{p}" for p in ("reference_s", "plan_s", "inputs_s", "child_s", "import_s",
                                        "session_original_s", "session_folded_s", "run_original_s", "run_folded_s",
                                        "wait_s", "compare_s")}


# -- success ------------------------------------------------------------------------------------------


def test_a_fold_that_verifies_is_written_and_the_result_says_what_happened(tmp_path):
    src = save(conv_bn_model(seed=1), tmp_path / "m.onnx")
    before = digests(tmp_path)
    dst = tmp_path / "o.onnx"
    result = fold_file(src, dst)
    assert result and result.passed and result.status == "written"
    assert result.input == src and result.output == dst and result.written == [dst]
    assert result.report.bn_before == 1 and result.report.bn_after == 0 and len(result.report.folded) == 1
    assert result.verification and result.verification.results[0].provider == "cpu"
    assert set(result.timings) == {"load_s", "fold_s", "write_s", "verify_s", "check_s", *PHASES, *VERIFY_PARTS}
    assert all(v >= 0 for v in result.timings.values())
    assert result.report.folded[0].passed is True  # its own check at its tensor, per channel
    assert count(onnx.load(dst), "BatchNormalization") == 0
    assert verify(src, dst)  # independently of the result
    assert digests(tmp_path) == {**before, "o.onnx": digests(tmp_path)["o.onnx"]}  # the input untouched
    data = result.to_dict()
    assert data["status"] == "written" and data["verification"]["passed"] is True
    assert data["input"] == str(src) and data["output"] == str(dst) and len(data["folded"]) == 1
    json.dumps(data)
    assert str(result).startswith("folded 1 of 1 BatchNormalization")


def test_check_only_writes_nothing_and_says_whether_anything_folds(tmp_path):
    src = save(conv_bn_model(), tmp_path / "m.onnx")
    report = tmp_path / "r.json"
    result = fold_file(src, None, report=report)
    assert result and result.foldable and result.status == "foldable" and result.written == [report]
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "r.json"]
    assert json.loads(report.read_text())["status"] == "foldable"
    folded = tmp_path / "f.onnx"
    fold_file(src, folded, verify=False)
    again = fold_file(folded, None)
    assert again and not again.foldable and again.status == "nothing to fold"


# -- verification failure -----------------------------------------------------------------------------


def test_a_failed_verification_is_falsy_and_writes_nothing(tmp_path, monkeypatch):
    flip_channel_one(monkeypatch)
    src = save(conv_bn_model(seed=2), tmp_path / "m.onnx")
    report = tmp_path / "r.json"
    result = fold_file(src, tmp_path / "o.onnx", report=report)
    assert not result and result.status == "verification failed, not written"
    assert result.verification is not None and not result.verification
    assert result.report.folded[0].passed is False
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "r.json"] and result.written == [report]
    assert json.loads(report.read_text())["status"] == "verification failed, not written"


def test_force_write_writes_a_model_that_failed_verification_and_is_still_falsy(tmp_path, monkeypatch):
    flip_channel_one(monkeypatch)
    src = save(conv_bn_model(seed=2), tmp_path / "m.onnx")
    dst = tmp_path / "o.onnx"
    result = fold_file(src, dst, force_write=True)
    assert not result and result.status == "verification failed, written" and result.written == [dst]
    assert not verify(src, dst)  # what was written is the model that failed


# -- errors: one type, the command line's line --------------------------------------------------------


def _garbage(tmp_path):
    (tmp_path / "g.onnx").write_bytes(b"\x08\x07garbage, not a model")
    return tmp_path / "g.onnx", tmp_path / "o.onnx", {}, []


def _missing(tmp_path):
    return tmp_path / "nope.onnx", tmp_path / "o.onnx", {}, []


def _unknown_input(tmp_path):
    return save(conv_bn_model(), tmp_path / "m.onnx"), tmp_path / "o.onnx", {"input_shapes": {"bogus": (1, 3)}}, \
        ["--input-shape", "bogus:1x3"]


def _bad_seed(tmp_path):
    return save(conv_bn_model(), tmp_path / "m.onnx"), tmp_path / "o.onnx", {"seed": -1}, ["--seed=-1"]


def _bad_provider(tmp_path):
    return save(conv_bn_model(), tmp_path / "m.onnx"), tmp_path / "o.onnx", {"providers": "tensorrt"}, \
        ["--providers", "tensorrt"]


def _unknown_rule(tmp_path):
    return save(conv_bn_model(), tmp_path / "m.onnx"), tmp_path / "o.onnx", {"disable": ["conv_bm"]}, \
        ["--disable", "conv_bm"]


def _data_name_with_folder(tmp_path):
    return save(conv_bn_model(), tmp_path / "m.onnx"), tmp_path / "o.onnx", {"data_name": "sub/x.data"}, \
        ["--data-name", "sub/x.data"]


def _output_is_the_inputs_data(tmp_path):
    return external(tmp_path), tmp_path / "m.onnx.data", {}, []


def _output_is_a_folder(tmp_path):
    (tmp_path / "dir").mkdir()
    return save(conv_bn_model(), tmp_path / "m.onnx"), tmp_path / "dir", {}, []


def _empty_batch(tmp_path):  # verification cannot run: nothing to compare
    return save(conv_bn_model(batch="N"), tmp_path / "m.onnx"), tmp_path / "o.onnx", \
        {"input_shapes": {"x": (0, 4, 6, 6)}}, ["--input-shape", "x:0x4x6x6"]


@pytest.mark.parametrize("case", [_garbage, _missing, _unknown_input, _bad_seed, _bad_provider, _unknown_rule,
                                  _data_name_with_folder, _output_is_the_inputs_data, _output_is_a_folder,
                                  _empty_batch])
def test_each_input_error_raises_fold_error_with_the_command_lines_line(tmp_path, capsys, case):
    src, dst, kwargs, options = case(tmp_path)
    before = digests(tmp_path)
    with pytest.raises(FoldError) as caught:
        fold_file(src, dst, **kwargs)
    text = str(caught.value)
    assert text and "\n" not in text
    assert digests(tmp_path) == before and not any(".onnxfold-" in n for n in os.listdir(tmp_path))
    capsys.readouterr()
    assert cli.main([str(src), str(dst), *options]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    if case is _empty_batch:  # found once work began (verification): the run ends with its final line
        assert lines.pop().startswith("FAILED | Runtime: "), err
    assert lines[-1] == f"onnxfold: error: {text}" and "Traceback" not in err, err
    assert digests(tmp_path) == before


def test_input_and_verify_errors_are_kinds_of_fold_error():
    assert issubclass(InputError, FoldError) and issubclass(VerifyError, FoldError)
    assert "FoldError" in onnxfold.__all__ and "fold_file" in onnxfold.__all__


def test_an_os_error_while_writing_is_a_fold_error_with_the_command_lines_line(tmp_path, monkeypatch, capsys):
    src = save(conv_bn_model(), tmp_path / "m.onnx")

    def full(model, path, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(onnxfold.api, "write", full)
    with pytest.raises(FoldError, match="the disk is full") as caught:
        fold_file(src, tmp_path / "o.onnx")
    assert isinstance(caught.value.__cause__, OSError)
    assert os.listdir(tmp_path) == ["m.onnx"]  # the temporary folder removed
    assert cli.main([str(src), str(tmp_path / "o.onnx")]) == 2
    temp = re.compile(r"onnxfold-\d+-\w+")  # each run stages in a folder of its own
    lines = capsys.readouterr().err.strip().splitlines()
    assert temp.sub("TEMP", lines[-2]) == temp.sub("TEMP", f"onnxfold: error: {caught.value}")
    assert lines[-1].startswith("FAILED | Runtime: ")  # work began: the run ends with its final line


# -- paths written ------------------------------------------------------------------------------------


def test_external_data_input_lists_the_data_file_and_the_report(tmp_path):
    src = external(tmp_path)
    before = digests(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    dst, report = out / "f.onnx", out / "r.json"
    result = fold_file(src, dst, report=report)
    assert result and result.written == [dst, out / "f.onnx.data", report]
    assert sorted(os.listdir(out)) == ["f.onnx", "f.onnx.data", "r.json"]
    assert digests(tmp_path) == before
    assert verify(src, dst)
    assert json.loads(report.read_text()) == json.loads(json.dumps(result.to_dict()))


def test_in_place_with_external_data(tmp_path):
    src = external(tmp_path)
    original = tmp_path / "original"
    original.mkdir()
    shutil.copy(src, original / "m.onnx")
    shutil.copy(tmp_path / "m.onnx.data", original / "m.onnx.data")
    result = fold_file(src, src)
    assert result and result.written[0] == src and len(result.written) == 2
    data = result.written[1]
    assert data.parent == tmp_path and data.name.startswith("m.onnx.") and data.name.endswith(".data")
    assert sorted(os.listdir(tmp_path)) == sorted(["m.onnx", data.name, "original"])  # the old data file removed
    assert count(onnx.load(src, load_external_data=False), "BatchNormalization") == 0
    assert verify(original / "m.onnx", src)


# -- options ------------------------------------------------------------------------------------------


def test_command_line_options_are_parsed_once_into_a_frozen_picklable_object(tmp_path):
    args = cli.build_parser().parse_args(["in.onnx", "out.onnx", "--input-shape", "x:1x4x6x6", "--seed", "7",
                                          "--disable", "conv_bn", "-j", "2", "-v"])
    options = cli.parse_options(args)
    assert options.fold.input_shapes == (("x", (1, 4, 6, 6)),) and options.fold.seed == 7
    assert options.fold.disable == ("conv_bn",) and options.jobs == 2 and options.level == logging.DEBUG
    assert pickle.loads(pickle.dumps(options)) == options  # what folder mode's workers receive
    with pytest.raises(FrozenInstanceError):
        options.jobs = 3  # type: ignore[misc]


def test_given_inputs_are_used_and_checked(tmp_path):
    src = save(conv_bn_model(batch="N"), tmp_path / "m.onnx")
    x = np.random.default_rng(4).uniform(-3, 3, (2, 4, 6, 6)).astype(np.float32)
    result = fold_file(src, tmp_path / "o.onnx", inputs={"x": x})
    assert result and not result.verification.warnings  # no dynamic dimension had to be chosen
    assert result.verification.results[0].outputs[0].shape == (2, 6, 4, 4)  # a 3x3 kernel, no padding
    with pytest.raises(FoldError, match="the inputs given: lacks the model's input"):
        fold_file(src, tmp_path / "p.onnx", inputs={"other": x})
    np.savez(tmp_path / "in.npz", x=x)
    assert fold_file(src, tmp_path / "q.onnx", inputs=tmp_path / "in.npz")


# -- what the library says ----------------------------------------------------------------------------


def test_the_library_logs_and_prints_nothing(tmp_path, caplog, capsys):
    src = save(conv_bn_model(batch="N"), tmp_path / "m.onnx")  # a dynamic batch: verification warns
    with caplog.at_level(logging.DEBUG, logger="onnxfold"):
        assert fold_file(src, tmp_path / "o.onnx")
    assert capsys.readouterr() == ("", "")
    records = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    assert all(name == "onnxfold" for name, _, _ in records)
    messages = {level: [m for _, lv, m in records if lv == level] for level in ("DEBUG", "INFO", "WARNING")}
    assert any(m.startswith("folded 1 of 1 BatchNormalization") for m in messages["INFO"])
    assert any(m.startswith("wrote ") for m in messages["INFO"])
    assert any("axis 0 is dynamic (N)" in m for m in messages["WARNING"])
    assert any(m.startswith("  folded conv_bn conv + bn") for m in messages["DEBUG"])


def test_nothing_reaches_the_terminal_without_logging_configured(tmp_path):
    """Python prints WARNING records itself when no handler is set up; onnxfold's NullHandler stops that."""
    src = save(conv_bn_model(batch="N"), tmp_path / "m.onnx")
    code = f"import onnxfold; assert onnxfold.fold_file({str(src)!r}, {str(tmp_path / 'o.onnx')!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc.stderr


def test_report_dash_writes_the_json_to_stdout_and_the_messages_to_stderr(tmp_path):
    src = save(conv_bn_model(), tmp_path / "m.onnx")
    proc = run_cli(src, tmp_path / "o.onnx", "--report", "-")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["status"] == "written" and data["verification"]["passed"] and len(data["folded"]) == 1
    assert proc.stderr.startswith("folded 1 of 1") and proc.stderr.strip().splitlines()[-1].startswith("PASSED")
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "o.onnx"]  # no file named "-"
    check = run_cli(src, "--check", "--report", "-")
    assert check.returncode == 3 and json.loads(check.stdout)["status"] == "foldable"


def test_report_dash_in_folder_mode(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(2):
        save(conv_bn_model(seed=i), folder / f"m{i}.onnx")
    proc = run_cli(folder, tmp_path / "out", "-q", "--report", "-")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["totals"] == {"models": 2, "failed": 0, "folded": 2}
    assert [Path(m["input"]).name for m in data["models"]] == ["m0.onnx", "m1.onnx"]
    assert "models: 2 ok" in proc.stderr


def test_quiet_prints_a_failed_verification_and_nothing_else(tmp_path):
    """-q: errors and the final line. The comparison that failed is printed, as the model is not written."""
    src = save(conv_bn_model(batch="N", seed=5), tmp_path / "m.onnx")
    plan = ("import sys, numpy as np, onnxfold.api as api\n"
            "from onnx import numpy_helper\n"
            "real = api.fold_model\n"
            "def flipped(model, **kw):\n"
            "    folded, report = real(model, **kw)\n"
            "    t = next(t for t in folded.graph.initializer if t.name == report.folded[0].weight)\n"
            "    w = numpy_helper.to_array(t).copy(); w[1] = -w[1]\n"
            "    t.CopyFrom(numpy_helper.from_array(w, t.name))\n"
            "    return folded, report\n"
            "api.fold_model = flipped\n"
            "from onnxfold.cli import main\n"
            "raise SystemExit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", plan, str(src), str(tmp_path / "o.onnx"), "-q"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1, proc.stderr
    assert "warning:" not in proc.stderr and "folded 1 of 1" not in proc.stderr  # -q: no warnings, no summary
    assert "verification FAILED" in proc.stderr
    assert f"onnxfold: {tmp_path / 'o.onnx'} not written: the folded model does not match" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("FAILED | ")
    assert not (tmp_path / "o.onnx").exists()


def test_the_timings_break_the_run_into_its_phases(tmp_path):
    """Each phase of a run is timed (issue 20: where the time goes): the verification's parts in the parent
    and in its child, the check's parts, the commit's sync; the report file has the same; the phases fit in
    the total."""
    src = save(conv_bn_model(seed=3), tmp_path / "m.onnx")
    result = fold_file(src, tmp_path / "o.onnx", report=tmp_path / "r.json")
    t = result.timings
    assert set(t) == {"load_s", "fold_s", "write_s", "verify_s", "check_s", *PHASES, *VERIFY_PARTS}
    assert 0 < t["startup_s"] < 3600 and all(v >= 0 for v in t.values())
    parts = ("lock_s", "load_s", "plan_s", "stage_s", "fold_s", "write_s", "verify_s", "check_s", "commit_s")
    assert sum(t[p] for p in parts) <= t["total_s"] * 1.001 + 1e-3
    child = sum(t[f"verify_{p}"] for p in ("import_s", "session_original_s", "session_folded_s", "run_original_s",
                                          "run_folded_s", "compare_s"))
    assert child <= t["verify_child_s"] * 1.001 + 1e-3
    assert t["verify_child_s"] <= t["verify_s"]
    saved = json.loads((tmp_path / "r.json").read_text())["timings"]
    assert saved == json.loads(json.dumps(t))
    unverified = fold_file(src, tmp_path / "u.onnx", verify=False).timings
    assert set(unverified) == {"load_s", "fold_s", "write_s", "check_s", "check_session_s", *PHASES}
    assert unverified["check_checker_s"] + unverified["check_session_s"] <= unverified["check_s"] * 1.001 + 1e-3


def test_with_verification_onnx_checker_runs_in_its_own_child_and_still_decides(tmp_path, monkeypatch):
    """onnx.checker checks the written model in the check's child, forked before the fold, while
    verification's child runs the models (issue 20: the parent sat idle there, and the checker's page
    faults cost 0.13 s); its verdict is judged as before: a written model it rejects, though it accepts
    the input, fails the run and nothing is written; the input is judged here."""
    from onnxfold import isolation, output_check

    monkeypatch.setattr(isolation, "WORKER", "fork")  # (this process may have imported onnxruntime)
    src = save(conv_bn_model(seed=5), tmp_path / "m.onnx")
    real = output_check._checker
    seen = tmp_path / "seen"
    parent = os.getpid()

    def checker(path, staged=True):
        with open(seen, "a") as fh:  # the child's patch is the parent's, inherited through the fork
            fh.write(f"{Path(path).name} {os.getpid() == parent}\n")
        if staged:
            raise onnx.checker.ValidationError("simulated: the written model is broken")
        return real(path, staged)

    monkeypatch.setattr(output_check, "_checker", checker)
    with pytest.raises(onnxfold.errors.OutputBroken, match="onnx.checker rejects the written model"):
        fold_file(src, tmp_path / "o.onnx")
    assert seen.read_text().splitlines() == ["o.onnx False", "m.onnx True"]  # the written model in a child
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "seen"]
    monkeypatch.setattr(output_check, "_checker", real)
    result = fold_file(src, tmp_path / "o.onnx")
    assert result and result.timings["check_checker_s"] > 0


def test_a_check_child_that_dies_is_onnxruntimes_error_and_the_checker_runs_here(tmp_path, monkeypatch):
    """onnxruntime crashing on the written model in the check's child (--no-verify) fails the run with
    the crash named (the input loads), nothing written; onnx.checker's verdict is then taken here."""
    import signal

    from onnxfold import isolation, output_check

    monkeypatch.setattr(isolation, "WORKER", "fork")  # (this process may have imported onnxruntime)
    src = save(conv_bn_model(seed=6), tmp_path / "m.onnx")
    real_session, real_checker = output_check._session, output_check._checker
    parent = os.getpid()
    checked_here = []

    def session(path):
        if os.getpid() != parent and Path(path).name != "m.onnx":
            os.kill(os.getpid(), signal.SIGSEGV)
        return real_session(path)

    def checker(path, staged=True):
        if os.getpid() == parent:
            checked_here.append(Path(path).name)
        return real_checker(path, staged)

    monkeypatch.setattr(output_check, "_session", session)
    monkeypatch.setattr(output_check, "_checker", checker)
    with pytest.raises(onnxfold.errors.OutputBroken, match=r"onnxruntime rejects the written model.*crashed"):
        fold_file(src, tmp_path / "o.onnx", verify=False)
    assert checked_here == ["o.onnx"] and sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_verification_plans_with_the_input_in_memory_and_does_not_read_its_file_again(tmp_path, monkeypatch):
    """fold_file hands verification the input's structure (its weights left out, their sizes kept), so the
    parent does not load the input's file a second time (issue 20: 0.1 s of ResNet-50); the verification
    is the one verify() gives from the files alone, fold tensor by fold tensor, memory estimate included."""
    from onnxfold import verification
    from onnxfold.verification import memory

    model = conv_bn_model(cin=8, cout=16, seed=6, spatial=12)  # weights above memory.SMALL bytes
    model.graph.node.append(onnx.helper.make_node("Relu", [model.graph.output[0].name], ["z"]))
    model.graph.output[0].name = "z"
    src = save(model, tmp_path / "m.onnx")
    assert max(len(t.raw_data) for t in model.graph.initializer) > memory.SMALL
    loads = []
    real_load = verification.onnx.load
    monkeypatch.setattr(verification.onnx, "load", lambda path, **kw: loads.append(path) or real_load(path, **kw))
    estimates = []
    real_estimate = memory.estimate
    monkeypatch.setattr(memory, "estimate", lambda *a: estimates.append(real_estimate(*a)) or estimates[-1])
    result = fold_file(src, tmp_path / "o.onnx")
    assert result and loads == [str(src)]  # loaded to fold, and not read again to verify
    alone = verify(src, tmp_path / "o.onnx", folds=result.report.folded)
    assert loads == [str(src)] * 2
    assert alone.to_dict() == result.verification.to_dict() and len(alone.results[0].folds) == 1
    # fold_file's estimate (made by verification's child, with the shapes it inferred for its early run,
    # where it forks) is verify()'s to the byte (weights counted by their size): a budget of it passes,
    # one a byte below is refused with verify()'s sentence
    need = estimates[-1][0]
    assert fold_file(src, tmp_path / "o2.onnx", verify_memory=need / memory.GIB)
    with pytest.raises(VerifyError) as direct:
        verify(src, tmp_path / "o.onnx", folds=result.report.folded, memory=(need - 1) / memory.GIB)
    with pytest.raises(VerifyError) as child:
        fold_file(src, tmp_path / "o3.onnx", verify_memory=(need - 1) / memory.GIB)
    assert str(child.value) == str(direct.value) and "above its memory budget" in str(child.value)
    assert not (tmp_path / "o3.onnx").exists()


@pytest.mark.parametrize("limit, verify, here", [(64 << 20, False, True), (0, False, False), (64 << 20, True, False)])
def test_without_verification_onnx_checker_runs_here_beside_the_load_of_a_small_model(tmp_path, monkeypatch, limit,
                                                                                      verify, here):
    """--no-verify: the check child loads the written model in onnxruntime while this process runs
    onnx.checker on it, side by side (0.01 s of a small model's run); a model over CHECK_HERE_BYTES is
    checked by the child after its load (this process holds no second copy), and with verification the
    child checks it while verification runs the models. Either way both verdicts decide."""
    from onnxfold import isolation, output_check

    monkeypatch.setattr(isolation, "WORKER", "fork")  # (this process may have imported onnxruntime)
    monkeypatch.setattr(output_check, "CHECK_HERE_BYTES", limit)
    src = save(conv_bn_model(seed=7), tmp_path / "m.onnx")
    real_session, real_checker = output_check._session, output_check._checker
    parent, seen = os.getpid(), tmp_path / "seen"

    def log(what, path):
        with open(seen, "a") as fh:  # the child's patch is the parent's, inherited through the fork
            fh.write(f"{what} {Path(path).name} {'here' if os.getpid() == parent else 'child'}\n")

    def session(path):
        log("session", path)
        return real_session(path)

    def checker(path, staged=True):
        log("checker", path)
        if staged and "broken" in os.environ.get("ONNXFOLD_TEST_PLANT", ""):
            raise onnx.checker.ValidationError("simulated: the written model is broken")
        return real_checker(path, staged)

    monkeypatch.setattr(output_check, "_session", session)
    monkeypatch.setattr(output_check, "_checker", checker)
    result = fold_file(src, tmp_path / "o.onnx", verify=verify)
    assert result and (tmp_path / "o.onnx").exists()
    lines = seen.read_text().splitlines()
    assert f"checker o.onnx {'here' if here else 'child'}" in lines and len([x for x in lines if "checker" in x]) == 1
    assert ("session o.onnx child" in lines) == (not verify)
    assert result.timings["check_checker_s"] > 0
    # the verdict of a checker run here decides as the child's did: nothing written
    seen.unlink()
    monkeypatch.setenv("ONNXFOLD_TEST_PLANT", "broken")
    with pytest.raises(onnxfold.errors.OutputBroken, match="onnx.checker rejects the written model"):
        fold_file(src, tmp_path / "p.onnx", verify=verify)
    assert not (tmp_path / "p.onnx").exists()
