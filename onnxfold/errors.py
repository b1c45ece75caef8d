"""Every exception type of onnxfold, and the one-line message for each user error.

:class:`FoldError` is what a user's input or environment causes: a broken or hostile file, a bad option,
a path that cannot be written, a disk that is full. Its message is one line, the line the command line
prints after ``onnxfold: error:`` (exit 2). :class:`InputError` and :class:`VerifyError` are kinds of it.
:class:`NotFoldable` is a rule declining a fold (a sentence for the report, never an error of the run);
:class:`OutputBroken` is the written model failing its check (a bug in onnxfold). Any other exception is
a bug in onnxfold.
"""

from __future__ import annotations

import errno
import re


class FoldError(Exception):
    """What the user's input or environment causes; ``str()`` is one line saying what and where."""

    # raised once work began (the fold, a write): the command line ends such a run with its final
    # ``FAILED |`` line, where an error found before any work is its one line alone
    after_work = False


class InputError(FoldError):
    """A problem with what the user gave us: one line, no traceback, exit code 2."""


class VerifyError(FoldError):
    """Verification could not run (provider missing, bad inputs, a crash): the message says why."""


class NotFoldable(Exception):
    """A fold that is not safe: the message is the sentence the report gives as the reason."""


class OutputBroken(Exception):
    """The model onnxfold wrote does not load: a bug, never exit 0."""


# -- inside onnxfold: caught where they are raised, never a user's error or a bug on their own ------


class ChildFailed(Exception):
    """The child died (a signal, an exit code) before it answered; ``str`` is the one line saying so."""


class ChildTimeout(ChildFailed):
    """The child did not answer within the time given to :meth:`Child.result`: it was killed (a worker
    is replaced on the next call). ``where`` is what it said it was doing, ``seconds`` the limit."""

    def __init__(self, seconds: float, where: tuple[str, str] | None):
        subject, doing = where or ("the child process", "starting")
        super().__init__(f"{subject} took longer than {seconds:g} s {doing}: stopped")
        self.seconds = seconds
        self.where = where


class ExposureRefused(Exception):
    """onnxruntime loads the model, but not with the fold tensors as extra outputs."""


class Interrupted(BaseException):
    """A signal of :data:`onnxfold.signals.HANDLED`: unwinds like KeyboardInterrupt, so every temporary
    folder is removed."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class TooLarge(Exception):
    """A single-file model would pass protobuf's 2 GiB limit: it is written with external data instead."""


_OS_ERRORS = {
    errno.ENOSPC: "the disk is full (a single-file output briefly needs about twice its size on disk: its "
                  "pieces are staged before they are joined)",
    errno.EFBIG: "the file is too large for this filesystem or the file size limit (a single-file output "
                 "briefly needs about twice its size)",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.ENAMETOOLONG: "the file name is too long",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EROFS: "the filesystem is read-only",
    errno.EACCES: "permission denied",
}


def os_error(e: OSError) -> str:
    """``path: what went wrong``, in words a user acts on."""
    what = _OS_ERRORS.get(e.errno or 0, e.strerror or type(e).__name__)
    return f"{e.filename}: {what}" if e.filename else what


# What a user's input or environment causes (a bad file or option; the disk, permissions, names; memory).
USER_ERRORS = (FoldError, OSError, MemoryError)


def message(e: BaseException) -> str:
    """The one line for a user error (one of :data:`USER_ERRORS`)."""
    if isinstance(e, MemoryError):
        return "out of memory"
    if isinstance(e, OSError):
        return printable(os_error(e))
    return printable(str(e))


_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\udc80-\udcff]")


def printable(text: str) -> str:
    """``text`` kept on one line: a control character (a newline in a path) written as repr writes it,
    a byte of a name that is not UTF-8 (``os.fsdecode``'s surrogate) as ``\\xNN``."""
    def escape(m: re.Match) -> str:
        c = m.group()
        return f"\\x{ord(c) - 0xDC00:02x}" if ord(c) >= 0xDC80 else repr(c)[1:-1]

    return _UNPRINTABLE.sub(escape, text)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
