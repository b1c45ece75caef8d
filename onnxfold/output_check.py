"""The written model's check: exit 0 promises a model that loads.

``onnx.checker`` runs on the written file (from its path, so external data is checked where it lies)
and, when verification did not already load it, an onnxruntime session is made of it in a child
process (:mod:`onnxfold.isolation`: a crash of the runtime cannot take onnxfold down) forked before the
fold (:func:`start_check`): it makes its memory ready (:mod:`onnxfold.heap`) and imports onnxruntime
while the parent folds and writes. The checker runs in the parent beside that load for a model of
:data:`CHECK_HERE_BYTES` at most, else in the child (after its load, or while verification runs the
models). Where no child can be forked, the checker runs here and the load in onnxfold's worker. A
failure is onnxfold's fault, not the user's (:class:`~onnxfold.errors.OutputBroken`), unless the input
fails the same way: then it is a warning about the input, which onnxfold does not repair.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import onnx

from . import heap, isolation
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


def start_check(path: Path, model_bytes: int, session: bool = True) -> isolation.Child | None:
    """The check of the model to be written at ``path``, begun before the fold: a child makes the
    memory its parse will need ready (``model_bytes``: the size the model file is expected to have) and,
    where onnxruntime is to load the model (``session``: without verification, which loads it itself),
    imports onnxruntime meanwhile; then it checks the file once :meth:`~onnxfold.isolation.Child.open_gate`
    says it is written (its value: whether onnxruntime loads it too: then imported, if not before).
    :func:`check_output` (``checking=``) takes its verdicts. None where no child can be forked."""
    if not isolation.can_fork():
        return None
    return isolation.Child(_check, str(path), heap.budget(model_bytes), session, gated=True)


# A written model up to this size is checked by onnx.checker in the parent while the check child loads it
# in onnxruntime (the two side by side, on two cores); a larger one by the child after its load, so that
# the parent does not hold a second copy of it.
CHECK_HERE_BYTES = 64 << 20


def open_check(checking: isolation.Child, files: list[Path], session: bool) -> bool:
    """Let the check child of :func:`start_check` check the written ``files``: with ``session``
    (onnxruntime loads it) and a model of :data:`CHECK_HERE_BYTES` at most, onnx.checker is left to this
    process, which runs it in :func:`check_output` (``checker_here``) while the child loads the model;
    returns whether it is. A gate opened already stays as it was (verification's path: the child checks)."""
    here = session and sum(_size(f) for f in files) <= CHECK_HERE_BYTES
    checking.open_gate((session, not here))
    return here


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return CHECK_HERE_BYTES + 1  # unknown: as if large


def check_output(path: Path, src: Path, *, session: bool, timings: dict[str, float] | None = None,
                 checked: Checked | None = None, meanwhile: Callable[[], None] | None = None,
                 checking: isolation.Child | None = None, checker_here: bool = False) -> list[str]:
    """Check the model written at ``path`` (folded from ``src``); returns warnings about the input.
    ``session``: whether onnxruntime must load it (verification did not).
    ``checking``: the child of :func:`start_check`, its gate opened (:func:`open_check`): it gives both
    verdicts, or onnxruntime's alone while onnx.checker runs here (``checker_here``). Else ``checked``:
    onnx.checker's verdict taken already (:func:`run_checker`), or taken here, while onnxruntime's load
    runs in onnxfold's worker.
    ``meanwhile``: run once the checks have started.
    ``timings`` gets check_checker_s (onnx.checker's time) and check_session_s (the wait for the
    verdicts after ``meanwhile``, or for onnxruntime's load after the checker)."""
    timings = {} if timings is None else timings
    if checking is not None:
        checker_error, loading_error = _verdicts(checking, path, meanwhile, timings, session, checker_here)
    else:
        checker_error, loading_error = _here(path, session, checked, meanwhile, timings)
    warnings: list[str] = []
    _judge("onnx.checker", checker_error, lambda: _error(_input_checker, src), warnings)
    _judge("onnxruntime", loading_error, lambda: _result(isolation.Child(_load, str(src), "the input")), warnings,
           valid=sessions.no_kernel)
    return warnings


def _verdicts(checking: isolation.Child, path: Path, meanwhile: Callable[[], None] | None,
              timings: dict[str, float], session: bool, checker_here: bool) -> tuple[str | None, str | None]:
    """(onnx.checker's error, onnxruntime's) from the check child (and onnx.checker's from here, with
    ``checker_here``): a child that died (onnxruntime crashed loading the model) is onnxruntime's error,
    and the checker runs here."""
    try:
        if meanwhile is not None:
            meanwhile()
        checked = run_checker(path) if checker_here else None  # while the child loads the model
        now = time.perf_counter()
        try:
            checker_error, seconds, loading_error = checking.result()
        except ChildFailed as e:
            checked = checked or run_checker(path)
            checker_error, seconds, loading_error = None, None, str(e)
        if checked is not None:
            checker_error, seconds = checked.error, checked.seconds
        if session:  # (else the child ran onnx.checker alone, timed as such)
            timings["check_session_s"] = time.perf_counter() - now
        timings["check_checker_s"] = seconds or 0.0
    finally:
        checking.close()
    return checker_error, loading_error


def _here(path: Path, session: bool, checked: Checked | None, meanwhile: Callable[[], None] | None,
          timings: dict[str, float]) -> tuple[str | None, str | None]:
    """(onnx.checker's error, onnxruntime's): the checker here, the load in onnxfold's worker."""
    loading = isolation.Child(_load, str(path), "the written model") if session else None
    try:
        if meanwhile is not None:
            meanwhile()
        if checked is None:
            checked = run_checker(path)
        timings["check_checker_s"] = checked.seconds
        now = time.perf_counter()
        loading_error = _result(loading) if loading is not None else None
        if loading is not None:
            timings["check_session_s"] = time.perf_counter() - now
    finally:
        if loading is not None:
            loading.close()
    return checked.error, loading_error


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
    """The worker's side: None when onnxruntime loads the model, else the first line of its error."""
    send(("stage", "onnxruntime", f"loading {what}"))
    return _error(_session, Path(path))


def _check(path: str, ready: int, expected: bool, send) -> tuple[str | None, float | None, str | None]:
    """The check child's side (:func:`start_check`): (onnx.checker's error, its seconds, onnxruntime's
    error), each None when it accepts the model; the checker's seconds None where the parent runs it
    (:func:`open_check`). ``expected``: onnxruntime is to load the model (imported now, while the model is
    folded and written; else not, so as not to take a core from the fold and verification's child: 0.06 s
    of CPU)."""
    send(("stage", "onnx.checker", "making memory ready"))
    heap.prefault(ready)
    if expected:
        send(("stage", "onnxruntime", "importing onnxruntime"))
        import onnxruntime  # noqa: F401 - while the model is folded and written

    send(("stage", "onnx.checker", "waiting for the written model"))
    session, checker = isolation.wait_first()
    checked = None
    if checker:
        send(("stage", "onnx.checker", "checking the written model"))
        checked = run_checker(Path(path))
    loading_error = None
    if session:
        send(("stage", "onnxruntime", "loading the written model"))
        loading_error = _error(_session, Path(path))
    return (checked.error, checked.seconds, loading_error) if checked else (None, None, loading_error)
