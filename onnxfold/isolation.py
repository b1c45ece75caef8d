"""The one way onnxfold runs something in a child process: verification, the written model's check
and the provider check all go through :class:`Child`.

onnxruntime segfaults on some valid models; run in a child, that is one line ("onnxruntime crashed
(signal 11, SIGSEGV) running the original model on cpu") instead of the death of the caller. The
child is forked when that is safe (Linux, this process has not imported onnxruntime and runs no other
thread: the command line); otherwise it is a worker process started once (``python -c``, never
re-running the caller's ``__main__``) and reused. Either way the child dies with its parent and the
same crash message names what it was doing.

The target is a module-level function ``fn(*args, send)``: ``send(("stage", subject, doing))`` says
what runs next (so that a crash can be named), any other message goes to ``on_message``, and its
return value is the call's result. A :class:`~onnxfold.errors.FoldError` it raises is raised again in
the parent; any other exception comes back as a bug, with its traceback.

``call(..., first=fn)`` lets the child start before the parent has finished: ``fn`` runs in the parent
while a forked child works up to :func:`wait_first`, where it waits until ``fn`` has returned
(verification loads and runs the original model while the parent writes the folded one). A worker
is not forked for the call: there ``fn`` runs before the call is sent, and :func:`wait_first` returns
at once.
"""

from __future__ import annotations

import atexit
import importlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NoReturn

from . import signals
from .errors import ChildFailed, ChildTimeout, FoldError, Interrupted

WORKER = os.environ.get("ONNXFOLD_VERIFY_WORKER", "auto")  # "fork", "spawn" or "auto"

_lock = threading.Lock()  # one call at a time through the worker (and through this module)
_worker: _Worker | None = None  # the worker of this process, started on first use, stopped at exit
_gate: int | None = None  # in a forked child of call(first=...): the pipe wait_first() reads
_given: Any = None  # in the worker: what wait_first() gives the call running (first's value)
_SLICE = 0.25  # seconds a wait for a child lasts before it looks for a signal again (signals.swallowed)
_ends: set[int] = set()  # this process's ends of its forked children's pipes, which a child closes


def can_fork() -> bool:
    """Whether a child may be forked from this process (else a worker runs it)."""
    if WORKER != "auto":
        return WORKER == "fork"
    return (hasattr(os, "fork") and sys.platform.startswith("linux") and "onnxruntime" not in sys.modules
            and threading.active_count() == 1)


def crash_message(status: int, where: tuple[str, str] | None) -> str:
    """The one line for a child that died: ``onnxruntime crashed (signal 11, SIGSEGV) loading ...``."""
    subject, doing = where or ("the child process", "starting")
    if status < 0:
        return f"{subject} crashed (signal {-status}, {signals.name(-status)}) {doing}"
    return f"the {subject} process ended with exit code {status} {doing}"


def call(target: Callable, *args, on_message: Callable[[Any], None] | None = None,
         timeout: float | None = None, meanwhile: Callable[[], None] | None = None,
         first: Callable[[], Any] | None = None) -> Any:
    """``target(*args, send)`` in a child; its return value (see the module's docstring). ``timeout``:
    seconds to wait for it (None: no limit); past it the child is killed and :class:`ChildTimeout` raised.
    ``first``: run in this process as the child starts; the child's :func:`wait_first` returns what it
    returned, once it has (when it raises, the child is killed and the error raised here). ``meanwhile``:
    run in this process after ``first``, while the child works. Both count in ``timeout``."""
    began = time.monotonic()
    if first is not None and not can_fork():  # a worker: the call is sent once its inputs exist
        child = Child(target, *args, on_message=on_message, given=first())
        first = None
    else:
        child = Child(target, *args, on_message=on_message, gated=first is not None)
    return join(child, first=first, meanwhile=meanwhile, timeout=timeout, began=began)


def join(child: Child, *, first: Callable[[], Any] | None = None, meanwhile: Callable[[], None] | None = None,
         timeout: float | None = None, began: float | None = None) -> Any:
    """The end of :func:`call`, for a :class:`Child` started earlier: ``first`` (its value to the
    child's :func:`wait_first`: the child was made ``gated``), ``meanwhile``, then its result within
    ``timeout`` seconds of ``began`` (time.monotonic(); default now). The child is closed in any case."""
    began = time.monotonic() if began is None else began
    try:
        if first is not None:
            child.open_gate(first())
        if meanwhile is not None:
            meanwhile()
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - began))
        try:
            return child.result(left)
        except ChildTimeout as e:
            if timeout is None:
                raise
            raise ChildTimeout(timeout, e.where) from None  # said with the limit given
    finally:
        child.close()


def _hold_gate(fd: int | None, given: Any = None) -> None:
    global _gate, _given
    _gate, _given = fd, given


def first_pending() -> bool:
    """In a gated child: whether :func:`wait_first` would wait now (the parent's ``first`` has not
    returned yet), so that work needed later may be done meanwhile. False where nothing is awaited."""
    if _gate is None:
        return False
    return not select.select([_gate], [], [], 0)[0]


def wait_first() -> Any:
    """In the child of ``call(first=...)`` (or of a gated :class:`Child`): wait until the parent's
    ``first`` has returned, and give what it returned (None elsewhere, at once). Were ``first`` to
    fail, the parent kills this child: an end of the pipe without its word ends the child too."""
    global _gate, _given
    if _gate is None:
        value, _given = _given, None
        return value
    fd, _gate = _gate, None
    with Connection(fd, writable=False) as conn:
        try:
            return conn.recv()
        except (EOFError, OSError):
            os._exit(1)


class Child:
    """A call of ``target(*args, send)`` running in a child while this process goes on; :meth:`result`
    waits for it. :meth:`close` ends it if its result was never asked for (the parent was interrupted)."""

    def __init__(self, target: Callable, *args, on_message: Callable[[Any], None] | None = None,
                 gated: bool = False, given: Any = None):
        """``gated`` (forked children only): the child's :func:`wait_first` waits for :meth:`open_gate`
        and gives its value. ``given``: what :func:`wait_first` gives at once (not gated)."""
        self.on_message = on_message
        self.where: tuple[str, str] | None = None
        self.pid: int | None = None
        self.done = False
        self.gate: int | None = None  # the write end of the gate's pipe, until open_gate()
        self.locked = False
        try:
            if gated and not can_fork():
                raise ValueError("a gated child must be forked")
            if can_fork():  # forked children run side by side (verification's and the check's)
                self._fork(target, args, gated, given)
            else:  # the worker answers one call at a time
                _lock.acquire()
                self.locked = True
                self._spawn(target, args, given)
        except BaseException:
            self.close()  # a child forked already (a signal came as it started) is killed and reaped
            raise

    def _fork(self, target: Callable, args: tuple, gated: bool = False, given: Any = None) -> None:
        r, w = os.pipe()
        gate = os.pipe() if gated else None
        # A signal during os.fork() would run its handler inside the at-fork hooks (logging's), where the
        # exception it raises is printed and dropped: the run went on. Blocked, it arrives once the child
        # is known (and close() can kill it), at the end of the block.
        with signals.deferred():
            pid = os.fork()
            if pid == 0:  # the child: run, send, and leave without running the parent's exit handlers
                code = 0
                try:
                    os.close(r)
                    if gate is not None:
                        os.close(gate[1])
                    for fd in _ends:  # another child's: its gate must see the parent's end alone
                        os.close(fd)
                    _ends.clear()
                    _hold_gate(gate[0] if gate is not None else None, given)
                    signals.default_actions()
                    signals.forked()
                    signals.die_with_parent()
                    _run(target, args, Connection(w, readable=False).send)
                except BaseException:
                    code = 1
                finally:
                    os._exit(code)
            os.close(w)
            _ends.add(r)
            if gate is not None:
                os.close(gate[0])
                self.gate = gate[1]
                _ends.add(gate[1])
            self.pid = pid
            self.conn = Connection(r, writable=False)
            self.recv = self.conn.recv
            self.poll = self.conn.poll

    def open_gate(self, value: Any = None) -> None:
        """Let the child's :func:`wait_first` return ``value``."""
        if self.gate is not None:
            fd, self.gate = self.gate, None
            _ends.discard(fd)
            with Connection(fd, readable=False) as conn:
                try:
                    conn.send(value)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the child died: result() says how

    def _spawn(self, target: Callable, args: tuple, given: Any = None) -> None:
        global _worker
        if _worker is not None and _worker.owner != os.getpid():
            _worker = None  # inherited through a fork: its pipes belong to the parent's conversation
        if _worker is None or _worker.proc.poll() is not None:
            _stop_worker()
            _worker = _Worker()
        self.worker = _worker
        try:
            _worker.send.send((target.__module__, target.__qualname__, args, given))
        except OSError:
            self._finished()
        self.recv = _worker.recv.recv
        self.poll = _worker.recv.poll

    def _status(self) -> int:
        """Wait for a forked child (or the dead worker) and give its exit status."""
        if self.pid is not None:
            pid, self.pid = self.pid, None
            return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        return self.worker.proc.wait()

    def _finished(self) -> NoReturn:
        """The child died before it answered: reap it and say how."""
        status = self._status()
        if self.pid is None and not hasattr(self, "conn"):  # the worker died: the next call starts anew
            _stop_worker()
        raise ChildFailed(crash_message(status, self.where))

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the call's return value; raises what the target raised, or :class:`ChildFailed`.
        ``timeout``: seconds from now (None: no limit); past it the child is killed (a worker too: the
        next call starts another) and :class:`ChildTimeout` raised."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                try:
                    while not self.poll(_SLICE if deadline is None else
                                        min(_SLICE, max(0.0, deadline - time.monotonic()))):
                        if (signum := signals.swallowed()) is not None:  # its exception lost (an import's)
                            raise Interrupted(signum)
                        if deadline is not None and time.monotonic() >= deadline:
                            self._kill()
                            raise ChildTimeout(float(timeout or 0), self.where)
                    msg = self.recv()
                except (EOFError, OSError):
                    self._finished()
                kind = msg[0]
                if kind == "stage":
                    self.where = (msg[1], msg[2])
                elif kind == "return":
                    self.done = True
                    return msg[1]
                elif kind == "raise":
                    self.done = True
                    raise msg[1]
                elif kind == "oom":
                    self.done = True
                    subject, doing = self.where or ("the child process", "running")
                    raise FoldError(f"out of memory: {subject} ran out of memory {doing}")
                elif kind == "bug":
                    self.done = True
                    raise RuntimeError(f"{msg[1]} failed in its child process (this is a bug):\n{msg[2]}")
                elif self.on_message is not None:
                    self.on_message(msg)
        finally:
            if self.done and self.pid is not None:
                self._status()

    def _kill(self) -> None:
        """Kill the child and reap it: a forked child by its pid; the worker, whose answer the next
        call would read, is stopped (the next call starts another)."""
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._status()
        elif hasattr(self, "worker"):
            _stop_worker(kill=True)

    def close(self) -> None:
        """End the child if its answer was not read (interrupted): a forked child is killed, the worker,
        whose answer the next call would read, is stopped."""
        try:
            if not self.done:
                self._kill()
            if self.gate is not None:
                _ends.discard(self.gate)
                os.close(self.gate)
                self.gate = None
            if hasattr(self, "conn"):
                _ends.discard(self.conn.fileno())
                self.conn.close()
                del self.conn
        finally:
            if self.locked:
                self.locked = False
                _lock.release()


def _run(target: Callable, args: tuple, send: Callable[[Any], None]) -> None:
    """The child's side of one call."""
    try:
        value = target(*args, send)
    except FoldError as e:
        send(("raise", e))
        return
    except MemoryError:  # the user's model or inputs, not a bug: the parent says "out of memory"
        send(("oom",))
        return
    except Exception:  # a bug: its traceback goes back to the parent
        send(("bug", getattr(target, "__qualname__", "the call"), traceback.format_exc()))
        return
    send(("return", value))


class _Worker:
    """A persistent worker process, for processes that cannot fork safely (onnxruntime imported)."""

    def __init__(self):
        to_child, from_parent = os.pipe()
        to_parent, from_child = os.pipe()
        root = str(Path(__file__).resolve().parent.parent)
        code = (f"import sys; sys.path.insert(0, {root!r}); from onnxfold.isolation import serve; "
                f"serve({to_child}, {from_child})")
        self.proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(to_child, from_child),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        os.close(to_child)
        os.close(from_child)
        self.send = Connection(from_parent, readable=False)
        self.recv = Connection(to_parent, writable=False)
        self.owner = os.getpid()

    def close(self) -> None:
        self.send.close()
        self.recv.close()
        try:
            self.proc.wait(timeout=5)
        except Exception:
            self.proc.kill()
            self.proc.wait()


def serve(read_fd: int, write_fd: int) -> None:
    """The worker process's loop: a call in, its messages out, until the parent closes the pipe."""
    signals.ignore_interrupt()
    signals.die_with_parent()
    recv = Connection(read_fd, writable=False)
    send = Connection(write_fd, readable=False)
    while True:
        try:
            module, qualname, args, given = recv.recv()
        except (EOFError, OSError):
            return
        target: Any = importlib.import_module(module)
        for part in qualname.split("."):
            target = getattr(target, part)
        _hold_gate(None, given)
        _run(target, args, send.send)


def _stop_worker(kill: bool = False) -> None:
    global _worker
    if _worker is not None and _worker.owner == os.getpid():
        w, _worker = _worker, None
        if kill and w.proc.poll() is None:
            w.proc.kill()
        w.close()


atexit.register(_stop_worker)
