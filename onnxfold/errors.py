"""The one exception type of onnxfold's file-level work, and the one-line message for each user error.

:class:`FoldError` is what a user's input or environment causes: a broken or hostile file, a bad option,
a path that cannot be written, a disk that is full. Its message is one line, the line the command line
prints after ``onnxfold: error:`` (exit 2). :class:`onnxfold.InputError` and :class:`onnxfold.VerifyError`
are kinds of it. Any other exception is a bug in onnxfold.
"""

from __future__ import annotations

import errno


class FoldError(Exception):
    """What the user's input or environment causes; ``str()`` is one line saying what and where."""


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
        return os_error(e)
    return str(e)
