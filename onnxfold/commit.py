"""Staging and the atomic commit: what is written goes to a temporary folder (or file) beside its
destination, and is moved into place by renames, so a destination always holds a whole file, old or new.

Every temporary name onnxfold makes is ``.<name>.onnxfold-<pid>-<random>`` beside its destination (a
folder for a model, a file for a report): a run killed outright cannot remove its own, so the next run
to the same folder removes those whose process no longer runs (:func:`remove_stale_temps`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from . import signals
from .errors import InputError

log = logging.getLogger("onnxfold")

TEMP_MARK = ".onnxfold-"
_TEMP = re.compile(r"^\..*\.onnxfold-(\d+)-[A-Za-z0-9_]+$")


def _temp_prefix(path: Path) -> str:
    return f".{path.name[:64]}{TEMP_MARK}{os.getpid()}-"


@contextlib.contextmanager
def staged(path: str | os.PathLike):
    """A temporary folder beside ``path``; :func:`commit` moves what was written there into place.

    Nothing is left behind when the block raises (an interruption included: SIGINT and SIGTERM raise
    in the CLI). A fold killed outright leaves its folder, ``.<name>.onnxfold-<pid>-<random>``; the next
    run to the same folder removes it once that pid no longer runs.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{path}: the folder {parent} is not writable")
    if path.is_dir():
        raise InputError(f"{path}: is a directory")
    remove_stale_temps(parent)
    tmp = None
    try:
        with signals.deferred():  # a signal waits until the folder is made and known here, or removed
            tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=parent))
        yield tmp / path.name
    finally:
        if tmp is not None:
            with signals.deferred():
                shutil.rmtree(tmp, ignore_errors=True)


_UMASK: int | None = None


def umask() -> int:
    """This process's umask (read once: reading it means setting it)."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return _UMASK


def staged_file(path: str | os.PathLike, text: str) -> Path:
    """``text`` written to a temporary file beside ``path`` (the caller renames it into place with
    :func:`os.replace`, or unlinks it)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), dir=path.parent if str(path.parent) else ".")
    try:
        os.fchmod(fd, 0o666 & ~umask())  # as open() would make it, not mkstemp's 0600
        with os.fdopen(fd, "w") as f:
            f.write(text)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # a folder on a filesystem that cannot sync one: nothing more to do
        pass
    finally:
        os.close(fd)


def commit(files: list[Path], destination: Path, *, mode: int | None = None, stale=()) -> None:
    """Move staged files into place so that ``destination`` always holds a whole model, old or new.

    The data file goes first, under its own name (a name neither the input nor the model now at
    ``destination`` reads: see :func:`onnxfold.output_plan.plan_output`), then the model replaces the old
    one in one rename, then the old model's data files (``stale``) are removed. Files are synced
    before the renames and the folder after, so a crash cannot leave a renamed but empty file.
    SIGINT and SIGTERM wait until the commit is done.
    """
    folder = destination.parent if str(destination.parent) else Path(".")
    for f in files:
        if mode is not None:
            os.chmod(f, mode)
        _fsync(f)
    with signals.deferred():
        for f in files[1:]:
            os.replace(f, folder / f.name)
        if len(files) > 1:
            _fsync(folder)
        os.replace(files[0], destination)
        _fsync(folder)
        for old in stale:
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
    """Remove temporary folders and files of onnxfold's own pattern whose run is gone (its process no
    longer runs).

    A fold killed by SIGKILL cannot clean up; the next run to the same folder does. The folder name holds
    the pid of the fold that made it, so a running fold's folder is never touched.
    """
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        m = _TEMP.match(entry.name)
        if not m or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
            continue
        log.debug("removing %s, left by onnxfold process %s, which no longer runs", entry.path, m.group(1))
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        elif entry.is_file(follow_symlinks=False):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)

