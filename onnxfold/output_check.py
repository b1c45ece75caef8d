"""The written model's check: exit 0 promises a model that loads.

``onnx.checker`` runs on the written file (from its path, so external data is checked where it lies)
and, when verification did not already load it, an onnxruntime session is made in a child process
(:mod:`onnxfold.isolation`: a crash of the runtime cannot take onnxfold down) at the same time. A
failure is onnxfold's fault, not the user's (:class:`~onnxfold.errors.OutputBroken`), unless the input
fails the same way: then it is a warning about the input, which onnxfold does not repair.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import onnx

from . import isolation
from .errors import ChildFailed, OutputBroken, first_line
from .tensors import is_utf8, utf8_folder
from .verification import sessions


class Checked:
    """onnx.checker's verdict on a written model, taken ahead (:func:`run_checker`: while verification's
    child runs the models) for :func:`check_output` to judge."""

    def __init__(self, error: str | None, seconds: float):
        self.error = error
        self.seconds = seconds


def run_checker(path: Path) -> Checked:
    """onnx.checker on the model written at ``path``: its first error line, or None."""
    t = time.perf_counter()
    error = _error(_checker, path)
    return Checked(error, time.perf_counter() - t)


def start_load(path: Path) -> isolation.Child | None:
    """onnxruntime's load of the model to be written at ``path``, begun before it is written: the child
    imports onnxruntime meanwhile and loads the file once :meth:`~onnxfold.isolation.Child.open_gate`
    says it is written; :func:`check_output` (``loading=``) takes its verdict. None where the child
    cannot be forked now (check_output starts it then)."""
    if not isolation.can_fork():
        return None
    return isolation.Child(_load, str(path), "the written model", gated=True)


def check_output(path: Path, src: Path, *, session: bool, timings: dict[str, float] | None = None,
                 checked: Checked | None = None, meanwhile: Callable[[], None] | None = None,
                 loading: isolation.Child | None = None) -> list[str]:
    """Check the model written at ``path`` (folded from ``src``); returns warnings about the input.
    ``checked``: onnx.checker's verdict on it taken already (:func:`run_checker`), else taken here.
    ``meanwhile``: run once onnxruntime's load has started in its child (``session``), before the checker.
    ``loading``: that child, started already (:func:`start_load`).
    ``timings`` gets check_checker_s (onnx.checker, here or ahead) and check_session_s (the wait for
    onnxruntime's load after it)."""
    warnings: list[str] = []
    timings = {} if timings is None else timings
    if session and loading is None:
        loading = isolation.Child(_load, str(path), "the written model")
    try:
        if meanwhile is not None:
            meanwhile()
        if checked is None:
            checked = run_checker(path)
        checker_error = checked.error
        timings["check_checker_s"] = checked.seconds
        now = time.perf_counter()
        loading_error = _result(loading) if loading is not None else None
        if loading is not None:
            timings["check_session_s"] = time.perf_counter() - now
    finally:
        if loading is not None:
            loading.close()
    _judge("onnx.checker", checker_error, lambda: _error(_input_checker, src), warnings)
    _judge("onnxruntime", loading_error, lambda: _result(isolation.Child(_load, str(src), "the input")), warnings,
           valid=sessions.no_kernel)
    return warnings


def _judge(name: str, error: str | None, input_error: Callable[[], str | None], warnings: list[str],
           valid: Callable[[str], bool] = lambda error: True) -> None:
    """``valid``: whether the input's own failure leaves it a valid model (onnxruntime without a kernel
    for it: a warning); else the input is refused (exit 2)."""
    if error is None:
        return
    if (found := input_error()) is not None:
        if not valid(found):
            raise sessions.invalid("original", found)
        warnings.append(f"{name} rejects the input too ({error}): written as it was given")
        return
    raise OutputBroken(f"{name} rejects the written model, though it accepts the input: {error}")


def _checker(path: Path, staged: bool = True) -> None:
    """onnx.checker on the file, from its path (its external data is checked where it lies). onnx.checker
    takes a path in UTF-8 only: a folder that is not is reached by its descriptor, a file name that is
    not by a link with a UTF-8 name beside it, in the staging folder. The input's folder is the user's:
    an input with such a name is not checked (taken as accepted, so a written model it rejects stays
    a failure)."""
    folder = os.path.dirname(os.path.abspath(path))
    link = None
    if not is_utf8(path.name):
        if not staged:
            return
        link = os.path.join(folder, ".onnxfold-check.onnx")
        os.symlink(path.name, link)
    try:
        with utf8_folder(folder) as alias:
            onnx.checker.check_model(os.path.join(alias, os.path.basename(link or path)))
    finally:
        if link is not None:
            os.unlink(link)


def _input_checker(path: Path) -> None:
    _checker(path, staged=False)


def _error(fn: Callable[[Path], None], path: Path) -> str | None:
    """None, or the first line of what ``fn(path)`` raised."""
    try:
        fn(path)
    except Exception as e:
        return first_line(e)
    return None


def _result(child: isolation.Child) -> str | None:
    try:
        return child.result()
    except ChildFailed as e:
        return str(e)
    finally:
        child.close()


def _session(path: Path) -> None:
    """Load the model at ``path`` in onnxruntime, as verification does (CPU, optimizations off)."""
    sessions.session(str(path), provider="cpu")


def _load(path: str, what: str, send) -> str | None:
    """The child's side: None when onnxruntime loads the model, else the first line of its error."""
    send(("stage", "onnxruntime", "importing onnxruntime"))
    import onnxruntime  # noqa: F401 - while the model is written (start_load)

    send(("stage", "onnxruntime", f"waiting for {what}"))
    isolation.wait_first()
    send(("stage", "onnxruntime", f"loading {what}"))
    return _error(_session, Path(path))
