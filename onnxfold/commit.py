"""Staging and the atomic commit: what is written goes to a temporary folder (or file) beside its
destination, and is moved into place by renames, so a destination always holds a whole file, old or new.

Every temporary name onnxfold makes is ``.<name>.onnxfold-<pid>-<random>`` beside its destination (a
folder for a model, a file for a report). The run that made it holds an ``flock`` on it for as long as it
lives; a run killed outright cannot remove its own, so the next run to the same folder removes those whose
lock is free (:func:`remove_stale_temps`): a lock, not the pid, since a run in another PID namespace
(another container sharing the folder) has a pid this one cannot see.

Runs writing the same ``OUT`` take turns (:func:`output_lock`): each holds an ``flock`` on
``.<OUT's name>.onnxfold-lock`` beside ``OUT`` from planning its output to removing the old model's data
files, so ``OUT`` always holds one whole model and no run removes a file the model now at ``OUT`` reads.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from . import signals
from .errors import FoldError, InputError, message

log = logging.getLogger("onnxfold")

TEMP_MARK = ".onnxfold-"
LOCK_SUFFIX = ".onnxfold-lock"
_TEMP = re.compile(r"^\..*\.onnxfold-(\d+)-[A-Za-z0-9_]+$")
# A folder's fsync may fail with these where the filesystem cannot sync a folder: nothing more to do.
_FOLDER_SYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.ENOSYS}


def _temp_prefix(path: Path) -> str:
    return f".{path.name[:64]}{TEMP_MARK}{os.getpid()}-"


def folder_of(path: Path) -> Path:
    """The folder a path is in."""
    return path.parent if str(path.parent) else Path(".")


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` is still the file open as ``fd`` (not removed, nor replaced by another)."""
    try:
        return os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _lock_path(path: Path) -> Path:
    name = path.name
    if len(os.fsencode(name)) > 200:  # the lock file's name must fit (255 bytes)
        name = hashlib.sha256(os.fsencode(name)).hexdigest()
    return folder_of(path) / f".{name}{LOCK_SUFFIX}"


@contextlib.contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[None]:
    """Runs writing ``path`` take turns: an exclusive ``flock`` on ``.<name>.onnxfold-lock`` beside it,
    held while the block runs (the caller plans, writes, commits and removes the old data in it).

    A run that has to wait says so. The lock file is removed by its holder on the way out; a waiter that
    then gets the lock of a removed file tries again. Where no lock file can be made (the folder is
    missing or not writable) the block runs unlocked: it will fail before it writes anything.
    """
    path = Path(path)
    folder = folder_of(path)
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        yield  # nothing can be written there: the run fails before it writes (see staged)
        return
    lock = _lock_path(path)
    fd: int | None = None
    held = False
    try:
        while not held:
            with signals.deferred():  # the descriptor is known here before a signal can unwind
                fd = os.open(lock, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666 & ~umask())
            held = _take(fd, lock, wait=path)
            if not held:  # its holder removed it as we waited: take the lock file that is there now
                os.close(fd)
                fd = None
        yield
    finally:
        always(lambda: _drop(fd, lock, held))


def _take(fd: int, lock: Path, *, wait: Path | None) -> bool:
    """The lock of ``fd`` (``lock`` opened), waiting for it unless ``wait`` is None; True when it is taken
    and ``lock`` is still that file."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if wait is None:
            return False
        log.info("waiting for another onnxfold run writing %s", wait)
        fcntl.flock(fd, fcntl.LOCK_EX)
    return _same_file(fd, lock)


def _drop(fd: int | None, lock: Path, held: bool) -> None:
    """Remove the lock file (only while holding its lock, and only the file locked: a waiter then tries
    again) and close it."""
    if fd is None:
        return
    with contextlib.suppress(OSError):
        if not held:  # interrupted before the lock was taken: take it if it is free
            held = _take(fd, lock, wait=None)
        elif not _same_file(fd, lock):
            held = False
        if held:
            os.unlink(lock)
    os.close(fd)


def own_name(name: str) -> bool:
    """A name onnxfold gives its lock files and temporaries: never an output's."""
    return name.startswith(".") and (name.endswith(LOCK_SUFFIX) or bool(_TEMP.match(name)))


def _hold(fd: int, path: Path) -> bool:
    """Take the temporary ``path``'s lock (open as ``fd``); False when the cleaner removed it first."""
    fcntl.flock(fd, fcntl.LOCK_EX)
    return _same_file(fd, path)


@contextlib.contextmanager
def staged(path: str | os.PathLike):
    """A temporary folder beside ``path``; :func:`commit` moves what was written there into place.

    Nothing is left behind when the block raises (an interruption included: the command line's signals
    raise, see :mod:`onnxfold.signals`). A fold killed outright leaves its folder,
    ``.<name>.onnxfold-<pid>-<random>``; the next run to the same folder removes it once its lock is free.
    """
    path = Path(path)
    parent = folder_of(path)
    if not parent.is_dir():
        raise InputError(f"{path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{path}: the folder {parent} is not writable")
    if path.is_dir():
        raise InputError(f"{path}: is a directory")
    remove_stale_temps(parent)
    tmp = None
    fd = None
    try:
        while tmp is None:
            with signals.deferred():  # a signal waits until the folder is made, locked and known here
                made = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=parent))
                try:
                    fd = os.open(made, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                except OSError:  # too many open files, say: the folder goes, the error is the run's
                    shutil.rmtree(made, ignore_errors=True)
                    raise
                if _hold(fd, made):
                    tmp = made
                else:
                    os.close(fd)
                    fd = None
        yield tmp / path.name
    finally:
        _remove(tmp, fd)


def always(step: Callable[[], None]) -> None:
    """Run a cleanup ``step`` once, with signals deferred; also when a signal's exception comes first (a
    signal that was pending runs its handler as they are blocked: see :func:`onnxfold.signals.deferred`):
    then the step runs all the same (the handler ignores further signals) and the exception goes on."""
    done: list[bool] = []

    def once() -> None:
        if not done:
            done.append(True)
            step()

    try:
        with signals.deferred():
            once()
    except BaseException:
        once()
        raise


def _remove(tmp: Path | None, fd: int | None) -> None:
    """Remove a temporary folder and drop its lock."""
    def step() -> None:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    always(step)


_UMASK: int | None = None


def umask() -> int:
    """This process's umask (read once: reading it means setting it)."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return _UMASK


_HELD: dict[Path, int] = {}  # staged files and the descriptors that hold their locks


def staged_file(path: str | os.PathLike, text: str) -> Path:
    """``text`` written to a temporary file beside ``path``, locked (see :func:`remove_stale_temps`)
    until :func:`place` renames it into place or :func:`discard` removes it."""
    path = Path(path)
    tmp = None
    try:
        with signals.deferred():
            fd, name = tempfile.mkstemp(prefix=_temp_prefix(path), dir=folder_of(path))
            tmp = Path(name)
            _HELD[tmp] = fd
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.fchmod(fd, 0o666 & ~umask())  # as open() would make it, not mkstemp's 0600
        with open(os.dup(fd), "w") as f:
            f.write(text)
    except BaseException:
        if tmp is not None:
            discard(tmp)
        raise
    return tmp


def place(tmp: Path, path: str | os.PathLike) -> None:
    """A staged file renamed to ``path``, and its lock dropped."""
    def step() -> None:
        try:
            os.replace(tmp, path)
        finally:
            _release(tmp)

    always(step)


def discard(tmp: Path) -> None:
    def step() -> None:
        try:
            tmp.unlink(missing_ok=True)
        finally:
            _release(tmp)

    always(step)


def _release(tmp: Path) -> None:
    fd = _HELD.pop(tmp, None)
    if fd is not None:
        os.close(fd)


def _fsync(path: Path, *, folder: bool = False) -> None:
    """Sync ``path`` to disk. A failure fails the run (one line), except a folder's sync that the
    filesystem does not support."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if folder and e.errno in _FOLDER_SYNC_UNSUPPORTED:
            return
        raise FoldError(f"{path}: cannot sync {'the folder' if folder else 'the file'} to disk "
                        f"({e.strerror or e})") from None
    finally:
        os.close(fd)


def sync(files: list[Path], *, mode: int | None = None) -> None:
    """The staged files given ``mode`` and synced to disk: :func:`commit`'s first step, which a caller
    may take before (and then tells :func:`commit` ``synced=True``)."""
    for f in files:
        if mode is not None:
            os.chmod(f, mode)
        _fsync(f)


class Syncing:
    """:func:`sync` in a thread, begun at once (it waits on the disk, while the written model is
    checked); :meth:`wait` joins it and raises what it raised. Start it after the last fork of the run:
    a process with a second thread runs its children through the worker instead (isolation.can_fork)."""

    def __init__(self, files: list[Path], *, mode: int | None = None):
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(list(files), mode), name="onnxfold-sync", daemon=True)
        self.thread.start()

    def _run(self, files: list[Path], mode: int | None) -> None:
        try:
            sync(files, mode=mode)
        except BaseException as e:  # noqa: BLE001 - raised again by wait(), in the caller's thread
            self.error = e

    def wait(self) -> None:
        self.thread.join()
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def commit(files: list[Path], destination: Path, *, mode: int | None = None,
           stale: Callable[[], Iterable[Path]] = tuple, synced: bool = False) -> None:
    """Move staged files into place so that ``destination`` always holds a whole model, old or new.

    The data file goes first, under its own name (a name neither the input nor the model now at
    ``destination`` reads: see :func:`onnxfold.output_plan.plan_output`), then the model replaces the old
    one in one rename, then the files ``stale()`` names are removed (it is asked after the rename, so it
    can read what the model now at ``destination`` reads). Files are synced before the renames and the
    folder after, so a crash cannot leave a renamed but empty file; a sync that fails stops the commit
    before the model's rename (the moved data file is taken back) or, after it, before anything old is
    removed. Signals wait until the commit is done. Callers hold :func:`output_lock`. ``synced``: the
    files were given their mode and synced already (:func:`sync`).
    """
    folder = folder_of(destination)
    if not synced:
        sync(files, mode=mode)
    with signals.deferred():
        moved = []
        try:
            for f in files[1:]:
                os.replace(f, folder / f.name)
                moved.append(folder / f.name)
            if moved:
                _fsync(folder, folder=True)
        except BaseException:
            for m in moved:  # a fresh name no model reads: back out
                with contextlib.suppress(OSError):
                    os.unlink(m)
            raise
        os.replace(files[0], destination)
        try:
            _fsync(folder, folder=True)
        except FoldError as e:
            raise FoldError(f"{e}; {destination} was replaced, but may not survive a crash; the old data files "
                            "were kept") from None
        for old in stale():
            with contextlib.suppress(OSError):
                os.unlink(old)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temps(folder: Path) -> None:
    """Remove temporary folders and files of onnxfold's own pattern whose run is gone.

    A fold killed by SIGKILL cannot clean up; the next run to the same folder does. A run holds an
    ``flock`` on its temporary folder (or file) for as long as it lives: one whose lock this process can
    take is removed while the lock is held; one whose pid still runs here is left alone too (a run that
    has just made its folder, or one of a version that did not lock).
    """
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        m = _TEMP.match(entry.name)
        if not m or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
            continue
        is_dir = entry.is_dir(follow_symlinks=False)
        if not is_dir and not entry.is_file(follow_symlinks=False):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held: its run is alive (in another PID namespace, perhaps)
                continue
            log.debug("removing %s, left by an onnxfold run that is gone (process %s)", entry.path, m.group(1))
            if is_dir:
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
        finally:
            os.close(fd)


# -- the report file (JSON), written as a model is: staged, then renamed into place ----------------------
def json_text(data: object) -> str:
    """The report as JSON text (numbers that are not finite as strings: "inf", "nan")."""
    return json.dumps(data, indent=2, default=_jsonable) + "\n"


def write_json(path: str | os.PathLike | None, data: object) -> None:
    staged_report = None
    try:
        staged_report = stage_json(path, data)
        if staged_report:
            place(staged_report, path)  # type: ignore[arg-type]
    except BaseException:
        if staged_report:
            discard(staged_report)  # (gone already once placed)
        raise


def stage_json(path: str | os.PathLike | None, data: object) -> Path | None:
    """The report, written to a temporary file beside ``path`` (renamed into place by the caller)."""
    if not path:
        return None
    path = Path(path)
    try:
        return staged_file(path, json_text(data))
    except OSError as e:
        raise InputError(f"{path}: cannot write the report ({message(e)})") from None


def _jsonable(value: object) -> object:
    if isinstance(value, float) or hasattr(value, "__float__"):
        v = float(value)
        return v if math.isfinite(v) else str(v)
    return str(value)
