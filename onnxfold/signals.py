"""Every signal onnxfold handles, in one place.

- The command line turns SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 (:data:`HANDLED`: every
  signal a user or a supervisor sends whose default action ends the process) into :class:`Interrupted`,
  which unwinds like KeyboardInterrupt, so every temporary folder is removed on the way out and the
  run ends with one line, exit 128 + the signal's number (:func:`handled`). SIGQUIT dumps no core:
  the user's folder is kept clean instead. Before its imports are done, ``python -m onnxfold`` ends at
  once with one line (:func:`early_exit`).
- Making and removing a temporary folder, and a commit, defer them (:func:`deferred`): blocked, not
  lost, until the step is done.
- A child process (verification, the written model's check, a folder-mode worker) dies with its
  parent (:func:`die_with_parent`) and takes the default action of SIGINT and SIGTERM
  (:func:`default_actions`); a folder-mode worker unwinds the fold it is in (:func:`folder_worker`).

Only the standard library is imported here: ``onnxfold/__init__`` installs the early handlers before
onnx and onnxruntime load.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

from .errors import Interrupted

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


# The signals received since handled() began: an import (onnxruntime's) may turn the exception into an
# ImportError, and the command line still knows it was a signal.
SIGNALLED: list[int] = []


# deferred() blocks the signals in the calling thread; a signal sent to the process may still reach
# another thread that does not block them (a multiprocessing queue's feeder, a watcher thread), and then
# Python runs the handler in the main thread inside the block. So the handlers also look here: while a
# deferred() block runs, a signal is kept, and its handler runs when the block ends.
_DEFERRING = 0
_PENDING: list[tuple[int, Callable[[int, object], None]]] = []


def _kept(signum: int, handler: Callable[[int, object], None]) -> bool:
    """Whether a deferred() block is running: then the signal waits for its end, where ``handler`` runs."""
    if _DEFERRING:
        _PENDING.append((signum, handler))
        return True
    return False


def on_signal(signum: int, frame: object) -> None:
    if _kept(signum, on_signal):
        return
    SIGNALLED.append(signum)
    for s in HANDLED:  # a second signal must not cut the cleanup short
        signal.signal(s, signal.SIG_IGN)
    raise Interrupted(signum)


def name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return "unknown signal"


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """While the block runs (in the main thread), the signals of :data:`HANDLED` raise :class:`Interrupted`."""
    global _HANDLING
    previous = {}
    SIGNALLED.clear()
    _HANDLING += 1
    try:
        if threading.current_thread() is threading.main_thread():
            for signum in HANDLED:
                previous[signum] = signal.signal(signum, on_signal)
        yield
    finally:
        _HANDLING -= 1
        for signum, handler in previous.items():
            signal.signal(signum, handler)


_HANDLING = 0  # handled() blocks running


def swallowed() -> int | None:
    """The signal :func:`on_signal` took inside a :func:`handled` block, whose exception the code it
    interrupted may have swallowed (C code that clears errors: numpy.random's import), or None."""
    return SIGNALLED[0] if SIGNALLED and _HANDLING else None


def early_exit(signum: int, frame: object) -> None:
    """``python -m onnxfold`` while its imports load: one line, and out (nothing has been opened yet)."""
    sys.stderr.write(f"onnxfold: interrupted by {name(signum)}: nothing written\n")
    sys.stderr.flush()
    os._exit(128 + signum)


def install_early() -> None:
    for signum in HANDLED:
        signal.signal(signum, early_exit)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """The signals of :data:`HANDLED` wait (blocked, not lost) until the block is done.

    Blocked in this thread, and kept by onnxfold's handlers whichever thread the kernel gave them to
    (:func:`_kept`): a kept signal's handler runs as the block ends, as if it had arrived just after.
    """
    global _DEFERRING
    _DEFERRING += 1
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, ())
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, set(HANDLED))
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # blocked ones arrive here, and are kept
        _DEFERRING -= 1
        if not _DEFERRING and _PENDING:
            signum, handler = _PENDING[0]
            _PENDING.clear()
            handler(signum, None)


def default_actions() -> None:
    """A child process: the signals of :data:`HANDLED` end it (the parent's handlers and cleanup are not its
    own)."""
    for signum in HANDLED:
        signal.signal(signum, signal.SIG_DFL)


def forked() -> None:
    """A process forked inside a :func:`deferred` block: none of the parent's deferral carries over (its
    handlers would keep every signal for a block that never ends here), and the signals of :data:`HANDLED`
    reach it again. Its own handlers, or the default actions, must be in place first."""
    global _DEFERRING
    _DEFERRING = 0
    _PENDING.clear()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, set(HANDLED))


def ignore_interrupt() -> None:
    """A worker process: Ctrl-C is the parent's to handle (it closes the worker's pipe)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def die_with_parent(signum: int = signal.SIGKILL, *, watch: bool = False) -> None:
    """This process gets ``signum`` when its parent dies (Linux: the kernel sends it; with ``watch``,
    elsewhere too, from a thread that checks the parent's pid each second)."""
    parent = os.getppid()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, int(signum))
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent went before prctl took effect
        os._exit(128 + int(signum))
    if not watch:
        return

    def watcher() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, set(HANDLED))  # signals go to the main thread
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os.kill(os.getpid(), signum)
                return

    threading.Thread(target=watcher, daemon=True).start()


# -- folder-mode workers ------------------------------------------------------------------------------

_IN_WORKER = False
_IN_JOB = False


def _on_worker_signal(signum: int, frame: object) -> None:
    if _kept(signum, _on_worker_signal):
        return
    if _IN_JOB:  # unwind the fold, which removes its temp folder; the job then exits
        on_signal(signum, frame)
    os._exit(128 + signum)  # idle, between models: nothing to clean


def folder_worker() -> None:
    """A folder-mode worker process: dies with its parent (SIGTERM, so it cleans up), and removes its
    temp folder on SIGTERM/SIGINT."""
    global _IN_WORKER
    _IN_WORKER = True
    for signum in HANDLED:
        signal.signal(signum, _on_worker_signal)
    forked()  # inside the parent's deferred() block
    die_with_parent(signal.SIGTERM, watch=True)


def in_worker() -> bool:
    return _IN_WORKER


@contextlib.contextmanager
def folder_job() -> Iterator[None]:
    """One model of a folder-mode worker: a signal now unwinds it (its temp folder is removed)."""
    global _IN_JOB
    _IN_JOB = True
    try:
        yield
    finally:
        _IN_JOB = False
