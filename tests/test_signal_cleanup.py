"""Every signal that ends a run leaves no temporary behind (issue 18, item 14).

0e3a27c: SIGHUP, SIGQUIT and SIGUSR1 always left the temporary folder (their default action ended the
process), and a SIGTERM still did about once in 12 under load: a signal that arrived just before the
staging folder's removal ran its handler inside the ``pthread_sigmask`` call that was to defer it, so the
removal never ran (and the signals stayed blocked). Now SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 are handled
like SIGTERM (one line, 128 + N, temporary files removed), and every cleanup runs whatever a pending
signal does on its way in.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

import builders
from checks import child_env, session
from onnxfold import errors, fold_file, signals

HOOK = """
import os, sys
import onnxfold.api as api
SIG = int(sys.argv[1])
real = api.check_output
def check_output(*args, **kw):  # the staging folder exists and holds the written model
    os.kill(os.getpid(), SIG)
    return real(*args, **kw)
api.check_output = check_output
sys.argv = ["onnxfold", *sys.argv[2:]]
from onnxfold.cli import console
console()
"""


def external_model(folder: Path) -> Path:
    return builders.external_model(folder, channels=8, seed=3, threshold=128)


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM],
                         ids=lambda s: signal.Signals(s).name)
@pytest.mark.parametrize("in_place", [False, True], ids=["to OUT", "in place"])
def test_a_signal_mid_fold_ends_the_run_with_one_line_and_no_temporary(tmp_path, sig, in_place):
    src = external_model(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    out = src if in_place else tmp_path / "o.onnx"
    proc = subprocess.run([sys.executable, "-c", HOOK, str(int(sig)), str(src), str(out), "--no-verify"],
                          capture_output=True, text=True, env=child_env(), timeout=300)
    name = signal.Signals(sig).name
    assert proc.returncode == 128 + sig, proc.stderr
    assert "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("onnxfold:")] == \
        [f"onnxfold: interrupted by {name}: nothing written, temporary files removed"]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary, no lock file, no output


def test_a_signal_pending_at_any_deferral_point_leaves_no_temporary(tmp_path, monkeypatch):
    """Deterministic: at the k-th ``pthread_sigmask`` call of a fold (each entry to and exit from a
    deferral), the SIGTERM handler runs there, as CPython runs a pending handler inside that call. For
    every k: no temporary and no lock file remain, the signal mask is as before, OUT is absent or whole."""
    src_dir, out_dir = tmp_path / "in", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    src = external_model(src_dir)
    out = out_dir / "o.onnx"
    me = os.getpid()
    real = signal.pthread_sigmask
    handlers = {s: signal.getsignal(s) for s in signals.HANDLED}
    mask = real(signal.SIG_BLOCK, [])
    k = 1
    while True:
        calls = [0]

        def pthread_sigmask(how, sigs, calls=calls, k=k):
            result = real(how, sigs)
            if os.getpid() == me:
                calls[0] += 1
                if calls[0] == k:
                    signals.on_signal(signal.SIGTERM, None)
            return result

        monkeypatch.setattr(signal, "pthread_sigmask", pthread_sigmask)
        interrupted = False
        try:
            fold_file(src, out, verify=False, report=out_dir / "r.json")
        except errors.Interrupted:
            interrupted = True
        finally:
            monkeypatch.setattr(signal, "pthread_sigmask", real)
            for s, h in handlers.items():
                signal.signal(s, h)
        assert real(signal.SIG_BLOCK, []) == mask, k
        left = sorted(p.name for p in out_dir.iterdir() if ".onnxfold-" in p.name)
        assert not left, (k, left)
        if out.exists():
            onnx.checker.check_model(str(out))
            session(out)
        if not interrupted:
            break
        for p in out_dir.iterdir():
            p.unlink()
        k += 1
    assert k > 6  # the lock, the staging folder, the commit, the report: each deferral was hit


_OTHER_THREAD = """
import signal, threading
from onnxfold import errors, signals

inside = []
ready, stop = threading.Event(), threading.Event()
other = threading.Thread(target=lambda: (ready.set(), stop.wait()))  # a queue feeder, a watcher
other.start()
ready.wait()
try:
    with signals.handled():
        with signals.deferred():
            signal.pthread_kill(other.ident, signal.SIGTERM)  # the kernel may give it to any such thread
            total = 0
            for i in range(200000):  # bytecode, where the main thread runs a pending handler
                total += i
            inside.append("done")
except errors.Interrupted:
    print("interrupted after", inside)
stop.set()
"""


def test_a_signal_another_thread_takes_still_waits_for_deferred():
    """deferred() blocks the signals in its own thread; a signal sent to the process may be taken by
    another thread (a folder-mode worker has a watcher thread and a queue feeder), and Python then runs
    the handler in the main thread, inside the block: a temporary folder made but not yet known was left
    behind (test_interrupt's folder-mode SIGTERM test failed about once in 15 runs, on 0e3a27c too).
    Forced here by sending the signal to the other thread: the handler now runs as the block ends."""
    proc = subprocess.run([sys.executable, "-c", _OTHER_THREAD], capture_output=True, text=True, env=child_env(),
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "interrupted after ['done']", proc.stdout + proc.stderr


# A signal that arrives while os.fork() runs its at-fork hooks (logging registers some): planted by a hook
# of our own that sends it once, in the parent, right after the fork.
_AT_FORK = """
import os, signal, sys
fired = []
def hook():
    if not fired:
        fired.append(1)
        os.kill(os.getpid(), signal.SIGTERM)
os.register_at_fork(after_in_parent=hook)
"""

_CHILD_CALL = _AT_FORK + """
from onnxfold import isolation, signals
from onnxfold.errors import Interrupted
def target(send):
    return 42
with signals.handled():
    try:
        print("returned", isolation.call(target))
    except Interrupted as e:
        print("interrupted", e.args[0])
try:
    print("a child left", os.waitpid(-1, os.WNOHANG))
except ChildProcessError:
    print("no child left")
"""


def test_a_signal_during_a_childs_fork_is_not_lost():
    """It ran its handler inside the at-fork hook, where Python prints the exception and drops it: the
    call returned as if nothing had happened, and the run went on to exit 0. Now the signal waits for the
    fork to end, and the child, already known, is killed and reaped."""
    proc = subprocess.run([sys.executable, "-c", _CHILD_CALL], capture_output=True, text=True, env=child_env(),
                          timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["interrupted 15", "no child left"], proc.stdout + proc.stderr


_FOLDER = _AT_FORK + """
sys.argv = ["onnxfold", *sys.argv[1:]]
from onnxfold.cli import console
console()
"""


def test_a_signal_while_folder_workers_fork_ends_the_run(tmp_path):
    """-j 2: the same signal during the pool's fork was lost and the run folded every model (exit 0).
    Now it ends the run: one line, 143, nothing written. The workers, forked while the parent deferred
    signals, must not inherit that deferral: they kept every signal for a block that never ended there,
    ignored the parent's SIGTERM and wrote their models after the parent had said nothing was written."""
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.onnx", "b.onnx", "c.onnx"):
        onnx.save(builders.conv_bn_model(), str(src / name))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", _FOLDER, str(src), str(out), "-j", "2"], capture_output=True,
                          text=True, env=child_env(), timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "interrupted by SIGTERM: nothing written" in proc.stderr, proc.stderr
    assert not list(out.rglob("*.onnx")) and not list(out.rglob(".onnxfold*")), list(out.rglob("*"))
    assert sorted(p.name for p in src.iterdir()) == ["a.onnx", "b.onnx", "c.onnx"]
