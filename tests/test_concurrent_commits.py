"""Runs writing the same OUT at once, and temporary folders of runs this one cannot see (issue 18, items
2 and 13).

0e3a27c: run P removed the data file that the model of run Q, committed between P's rename and P's
cleanup, reads (OUT no longer loads, both exit 0); when both planned before either committed, Q's data
rename replaced P's live data before Q's model rename (for that moment OUT was P's graph with Q's
weights); unused OUT.<n>.data piled up; a temporary folder whose pid this process cannot see (a run in
another PID namespace) was removed mid-fold.

The interleavings are forced with gates in the committing threads (fold_file in two threads; runs to one
OUT take turns through an flock, which conflicts between two descriptors of one process too), not with
sleeps. After every rename into OUT's folder, OUT is checked: it must load and compute one of the models.
"""

import fcntl
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest

import builders
import onnxfold.api as api
from checks import run, session
from onnxfold import fold_file
from onnxfold.commit import remove_stale_temps

WAIT = 120  # seconds: only a hung run ever waits this long


def external_model(folder: Path, name: str, seed: int) -> Path:
    return builders.external_model(folder, name, channels=8, seed=seed, threshold=128)


def outputs(path: Path) -> np.ndarray:
    x = np.random.default_rng(7).normal(size=(1, 8, 6, 6)).astype(np.float32)
    got = run(path, {session(path).get_inputs()[0].name: x})
    return np.concatenate([np.ravel(got[k]) for k in sorted(got)])


def referenced(path: Path) -> set:
    model = onnx.load(str(path), load_external_data=False)
    return {path.name} | {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}


class Runs:
    """Two runs (P, Q) folding into one OUT, with gates, and a check of OUT after every rename."""

    def __init__(self, tmp_path: Path, monkeypatch, caplog):
        self.src = tmp_path / "in"
        self.src.mkdir()
        self.models = {name: external_model(self.src, f"{name}.onnx", seed) for name, seed in
                       (("zero", 1), ("P", 2), ("Q", 3))}
        self.expected = {name: outputs(path) for name, path in self.models.items()}
        self.out_dir = tmp_path / "out"
        self.out_dir.mkdir()
        self.out = self.out_dir / "out.onnx"
        fold_file(self.models["zero"], self.out, verify=False)  # OUT reads out.onnx.data
        assert referenced(self.out) == {"out.onnx", "out.onnx.data"}
        self.bad: list[str] = []
        self.gates: dict[tuple[str, str], tuple[threading.Event, threading.Event]] = {}
        self.releases: dict[tuple[str, str], threading.Event] = {}
        self.waiting = {name: threading.Event() for name in ("P", "Q")}
        self.errors: dict[str, BaseException] = {}
        real_replace = os.replace

        def replace(a, b, *args, **kw):
            real_replace(a, b, *args, **kw)
            if Path(b).parent == self.out_dir:
                self.check(f"after {threading.current_thread().name} renamed {Path(b).name}")
                if Path(b) == self.out:
                    self.gate("model renamed")

        monkeypatch.setattr(os, "replace", replace)
        real_plan = api.plan_output

        def plan(*args, **kw):
            result = real_plan(*args, **kw)
            self.gate("planned")
            return result

        monkeypatch.setattr(api, "plan_output", plan)
        caplog.set_level(logging.INFO, logger="onnxfold")
        runs = self

        class Waiting(logging.Handler):
            def emit(self, record):
                if record.getMessage().startswith("waiting for another onnxfold run"):
                    runs.waiting[threading.current_thread().name].set()

        handler = Waiting()
        logging.getLogger("onnxfold").addHandler(handler)
        self.handler = handler

    def check(self, when: str) -> None:
        try:
            got = outputs(self.out)
        except Exception as e:  # does not load: its data file is gone or wrong
            self.bad.append(f"{when}: OUT does not load ({type(e).__name__})")
            return
        if not any(np.allclose(got, want, rtol=1e-5, atol=1e-5) for want in self.expected.values()):
            self.bad.append(f"{when}: OUT computes none of the models (one model's graph, another's weights)")

    def hold(self, name: str, point: str) -> threading.Event:
        """Run ``name`` stops at ``point`` (once); returns the event set when it gets there."""
        reached, release = threading.Event(), threading.Event()
        self.gates[(name, point)] = (reached, release)
        self.releases[(name, point)] = release
        return reached

    def release(self, name: str, point: str) -> None:
        self.releases[(name, point)].set()

    def gate(self, point: str) -> None:
        g = self.gates.pop((threading.current_thread().name, point), None)
        if g:
            g[0].set()
            assert g[1].wait(WAIT)

    def start(self, name: str) -> threading.Thread:
        def body():
            try:
                fold_file(self.models[name], self.out, verify=False)
            except BaseException as e:
                self.errors[name] = e
        t = threading.Thread(target=body, name=name)
        t.start()
        return t

    def finish(self, *threads) -> None:
        for t in threads:
            t.join(WAIT)
            assert not t.is_alive()
        logging.getLogger("onnxfold").removeHandler(self.handler)
        assert not self.errors, self.errors
        assert not self.bad, self.bad
        self.check("at the end")
        assert not self.bad, self.bad
        # one whole model and the data file it reads: no lock file, no temporary, no unused data files
        assert {p.name for p in self.out_dir.iterdir()} == referenced(self.out)


def either(*events: threading.Event) -> bool:
    """Wait until one of the events is set (a gate, or a log line): no sleep decides anything."""
    done = threading.Event()
    for e in events:
        threading.Thread(target=lambda e=e: e.wait(WAIT) and done.set(), daemon=True).start()
    return done.wait(WAIT)


def test_a_run_committing_between_anothers_rename_and_cleanup_keeps_its_data(tmp_path, monkeypatch, caplog):
    """P renames its model into OUT and stops before removing OUT's old data file (out.onnx.data); Q
    runs meanwhile. 0e3a27c: Q wrote its data as out.onnx.data (no model read it any more), committed,
    and P then removed it: OUT no longer loaded."""
    runs = Runs(tmp_path, monkeypatch, caplog)
    at = runs.hold("P", "model renamed")
    p = runs.start("P")
    assert at.wait(WAIT)
    q_done = threading.Event()
    q = runs.start("Q")
    threading.Thread(target=lambda: (q.join(WAIT), q_done.set()), daemon=True).start()
    assert either(runs.waiting["Q"], q_done)  # Q waits for P's lock (0e3a27c: Q ran to its end)
    runs.release("P", "model renamed")
    runs.finish(p, q)
    assert np.allclose(outputs(runs.out), runs.expected["Q"], rtol=1e-5, atol=1e-5)  # the last run's model


def test_two_runs_planned_at_once_never_show_one_graph_with_the_others_weights(tmp_path, monkeypatch, caplog):
    """P plans and stops; Q plans (0e3a27c: both chose out.onnx.1.data) or waits for P's lock; P commits;
    then Q. 0e3a27c: Q's data rename replaced P's live data before Q's model rename."""
    runs = Runs(tmp_path, monkeypatch, caplog)
    p_planned = runs.hold("P", "planned")
    q_planned = runs.hold("Q", "planned")
    p = runs.start("P")
    assert p_planned.wait(WAIT)
    q = runs.start("Q")
    assert either(runs.waiting["Q"], q_planned)
    runs.release("P", "planned")
    p.join(WAIT)
    runs.release("Q", "planned")
    runs.finish(p, q)
    assert runs.waiting["Q"].is_set()
    assert np.allclose(outputs(runs.out), runs.expected["Q"], rtol=1e-5, atol=1e-5)


def test_unused_data_files_of_out_do_not_pile_up(tmp_path):
    """OUT.<n>.data that no model reads are removed with OUT's old data; one that another model beside
    OUT reads, and the input's own, stay."""
    src = external_model(tmp_path, "m.onnx", 1)
    out = tmp_path / "out.onnx"
    fold_file(src, out, verify=False)
    for n in (2, 3, 7):
        (tmp_path / f"out.onnx.{n}.data").write_bytes(b"left by an earlier run")
    other = external_model(tmp_path, "c.onnx", 2)
    os.replace(tmp_path / "c.onnx.data", tmp_path / "out.onnx.5.data")
    model = onnx.load(str(other), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "out.onnx.5.data"
    onnx.save(model, other)
    for _ in range(3):
        fold_file(src, out, verify=False)
        fold_file(out, out, verify=False)  # in place too
    session(other)
    assert {p.name for p in tmp_path.iterdir()} == {"m.onnx", "m.onnx.data", "c.onnx", "out.onnx.5.data"} | \
        referenced(out)
    assert len(referenced(out)) == 2


def test_a_lock_file_left_by_a_killed_run_is_taken_and_removed(tmp_path):
    src = external_model(tmp_path, "m.onnx", 1)
    (tmp_path / ".out.onnx.onnxfold-lock").write_bytes(b"")
    fold_file(src, tmp_path / "out.onnx", verify=False)
    assert not (tmp_path / ".out.onnx.onnxfold-lock").exists()


# -- item 13: a temporary folder is stale when its lock is free, not when its pid is not visible ----------


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_a_temporary_whose_lock_is_held_is_kept_though_its_pid_is_not_seen(tmp_path, kind):
    """A run in another PID namespace: its pid is not alive here, but it holds its temporary's lock
    (here a second descriptor of this process, whose flock conflicts with the cleaner's)."""
    temp = tmp_path / f".m.onnx.onnxfold-{dead_pid()}-abc_123"
    if kind == "folder":
        temp.mkdir()
        (temp / "m.onnx").write_bytes(b"half written")
    else:
        temp.write_bytes(b"{}")
    fd = os.open(temp, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        remove_stale_temps(tmp_path)
        assert temp.exists()
        fold_file(external_model(tmp_path, "x.onnx", 1), tmp_path / "y.onnx", verify=False)  # a run beside it
        assert temp.exists()
    finally:
        os.close(fd)
    remove_stale_temps(tmp_path)  # the lock is free: its run is gone
    assert not temp.exists()


def test_a_run_holds_the_lock_of_its_temporary_folder(tmp_path, monkeypatch):
    src = external_model(tmp_path, "m.onnx", 1)
    seen = []
    real_check = api.check_output

    def check_output(path, *args, **kw):
        fd = os.open(Path(path).parent, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            seen.append(Path(path).parent.name)
        finally:
            os.close(fd)
        return real_check(path, *args, **kw)

    monkeypatch.setattr(api, "check_output", check_output)
    fold_file(src, tmp_path / "o.onnx", verify=False)
    assert seen and seen[0].startswith(".o.onnx.onnxfold-")


def test_an_output_named_like_a_lock_file_or_temporary_is_refused(tmp_path):
    """A lock file is removed by its holder: an output under such a name would be removed with it."""
    from onnxfold import InputError

    src = external_model(tmp_path, "m.onnx", 1)
    before = sorted(p.name for p in tmp_path.iterdir())
    for kw in ({"dst": tmp_path / ".o.onnx.onnxfold-lock"}, {"dst": tmp_path / ".o.onnx.onnxfold-123-abc"},
               {"dst": tmp_path / "o.onnx", "data_name": ".o.onnx.onnxfold-lock"},
               {"dst": tmp_path / "o.onnx", "report": tmp_path / ".r.json.onnxfold-lock"}):
        dst = kw.pop("dst")
        with pytest.raises(InputError, match="onnxfold's own"):
            fold_file(src, dst, verify=False, **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_temporary_locked_by_another_process_is_kept(tmp_path):
    """The same with the lock held by another live process (as a run in another container would)."""
    temp = tmp_path / f".m.onnx.onnxfold-{dead_pid()}-xyz"
    temp.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys\n"
         f"fd = os.open({str(temp)!r}, os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        remove_stale_temps(tmp_path)
        assert temp.exists()
    finally:
        holder.stdin.close()
        holder.wait(WAIT)
    remove_stale_temps(tmp_path)
    assert not temp.exists()


@pytest.mark.skipif(os.environ.get("ONNXFOLD_LONG_TESTS") != "1", reason="ONNXFOLD_LONG_TESTS=1: eight runs at once")
def test_eight_runs_into_one_out_leave_one_whole_model(tmp_path):
    """Long variant, no forced order: eight `python -m onnxfold` runs of four models (two in place) into
    one OUT at once, while this process loads OUT over and over. OUT loads every time it is read, and in
    the end the folder holds OUT and the data file it reads."""
    from checks import child_env

    models = [external_model(tmp_path, f"m{i}.onnx", i) for i in range(4)]
    out = tmp_path / "out.onnx"
    fold_file(models[0], out, verify=False)
    procs = [subprocess.Popen([sys.executable, "-m", "onnxfold", str(models[i % 4]), str(out), "--no-verify", "-q"],
                              env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(8)]
    procs += [subprocess.Popen([sys.executable, "-m", "onnxfold", str(out), str(out), "--no-verify", "-q"],
                               env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    expected = [outputs(m) for m in models]

    def sample() -> bool:
        """OUT loads and computes one of the models; False when OUT was replaced during the read (a
        reader that opens the model, then its data file, can straddle two commits: inconclusive)."""
        before = os.stat(out).st_ino
        try:
            got = outputs(out)
        except Exception:
            if os.stat(out).st_ino != before:
                return False
            raise
        if os.stat(out).st_ino != before:
            return False
        assert any(np.allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max()) for want in expected)
        return True

    reads = 0
    while any(p.poll() is None for p in procs):
        reads += sample()
    for p in procs:
        _, err = p.communicate()
        assert p.returncode == 0, err
    assert sample()
    assert reads > 0
    inputs = {n for m in models for n in referenced(m)}
    assert {p.name for p in tmp_path.iterdir()} - inputs == referenced(out) - inputs
