"""``fold_file``: a model file in, a folded and verified model file out, as a step of an export pipeline.

    import onnxfold

    result = onnxfold.fold_file("model.onnx", "model.folded.onnx")  # load, fold, verify, write
    if not result:  # verification failed: nothing was written (force_write=True writes it anyway)
        print(result.verification)

This is the command line's single-file path (``python -m onnxfold IN OUT``); the command line calls it
and only adds parsing, printing and exit codes. Its guarantees are the command line's: the input is
never modified; the output is absent or whole (written and checked by onnx.checker in a temporary
folder beside it, then committed by renames: :func:`onnxfold.commit.commit`); runs writing one output take
turns (:func:`onnxfold.commit.output_lock`); no file written is one the input reads, nor one another
model beside the output reads (:mod:`onnxfold.output_plan`); verification runs the models in a child
process. What the input
or the environment causes raises :class:`~onnxfold.errors.FoldError` with the one line the command
line prints; any other exception is a bug. Progress goes to the ``"onnxfold"`` logger: nothing is printed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .commit import Syncing, commit, discard, output_lock, place, stage_json, staged, write_json
from .driver import fold_model
from .errors import FoldError, InputError, message
from .isolation import Child
from .load import load
from .output_check import Checked, check_output, open_check, run_checker, start_check
from .output_plan import OutputPlan, check_report, check_target, data_files, plan_output, real
from .report import FoldReport, process_age
from .rules import select_rules
from .tensors import DataSink, Held, is_utf8
from .verification import (
    DEFAULT_MEMORY,
    DEFAULT_RANGE,
    DEFAULT_TIMEOUT,
    Early,
    VerifyResult,
    annotate,
    check_feeds,
    check_providers,
    check_shapes,
    load_inputs,
    model_inputs,
    structure,
)
from .verification import begin as begin_verify
from .verification import verify as compare_models
from .write import write

log = logging.getLogger("onnxfold")

# Seconds from this process's start until onnxfold was imported (the interpreter and the imports: what
# a command-line run spends before any work); None where it is unknown.
STARTUP = process_age()
MAX_INPUT_ELEMENTS = 1 << 31  # per input shape: larger inputs cannot be generated and run
EXTERNAL_DATA = ("auto", "always", "never")
Inputs = str | os.PathLike | Mapping[str, np.ndarray]


@dataclass(frozen=True)
class FoldOptions:
    """How to fold a file: :func:`fold_file`'s keywords, checked by :func:`make_options`. Frozen and
    picklable (the command line's folder mode hands it to its worker processes)."""

    verify: bool = True
    providers: tuple[str, ...] = ("cpu",)
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    inputs: str | Mapping[str, np.ndarray] | None = None  # an .npz path, or arrays by input name
    input_range: tuple[float, float] = DEFAULT_RANGE
    seed: int = 0
    atol: float | None = None
    rtol: float | None = None
    force_write: bool = False
    external_data: str = "auto"
    data_name: str | None = None
    disable: tuple[str, ...] = ()
    enable: tuple[str, ...] = ()  # rules off by default to switch on
    verify_timeout: float | None = DEFAULT_TIMEOUT  # seconds verification may take; None: no limit
    verify_memory: float | None = DEFAULT_MEMORY  # GiB verification may need (estimated); None: no limit


def make_options(*, verify: bool = True, providers: str | Sequence[str] = ("cpu",),
                 input_shapes: Mapping[str, Sequence[int]] | None = None, inputs: Inputs | None = None,
                 input_range: tuple[float, float] = DEFAULT_RANGE, seed: int = 0, atol: float | None = None,
                 rtol: float | None = None, force_write: bool = False, external_data: str = "auto",
                 data_name: str | None = None, disable: str | Sequence[str] = (),
                 enable: str | Sequence[str] = (),
                 verify_timeout: float | None = DEFAULT_TIMEOUT,
                 verify_memory: float | None = DEFAULT_MEMORY) -> FoldOptions:
    """Check every option before any work; each message names the command-line option it comes from.
    Providers other than the CPU must be available in this onnxruntime only when ``verify``."""
    if data_name is not None and (Path(data_name).name != data_name or data_name in (".", "..")
                                  or "\0" in data_name):
        raise InputError(f"--data-name {data_name!r}: a file name, without a folder")
    if data_name is not None and not is_utf8(data_name):
        raise InputError(f"--data-name {data_name!r}: not valid UTF-8 (the model names its data file, in UTF-8)")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise InputError(f"--seed {seed}: expected an integer from 0 to 2^32 - 1")
    for name, value in (("atol", atol), ("rtol", rtol)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise InputError(f"--{name} {value}: expected a finite number >= 0")
    _check_limit("--verify-timeout", verify_timeout, "seconds")
    _check_limit("--verify-memory", verify_memory, "GiB")
    lo, hi = (float(x) for x in input_range)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise InputError(f"--input-range {lo:g},{hi:g}: LO and HI must be finite numbers")
    if not lo < hi:
        raise InputError(f"--input-range {lo:g},{hi:g}: LO must be below HI")
    if not math.isfinite(hi - lo):  # numpy's uniform draws lo + (hi - lo) * u: an infinite width overflows
        raise InputError(f"--input-range {lo:g},{hi:g}: HI - LO must be a finite number")
    if external_data not in EXTERNAL_DATA:
        raise InputError(f"--external-data {external_data!r}: expected one of {', '.join(EXTERNAL_DATA)}")
    disable = (disable,) if isinstance(disable, str) else tuple(disable)
    enable = (enable,) if isinstance(enable, str) else tuple(enable)
    try:
        select_rules(disable, enable)
    except ValueError as e:
        raise InputError(str(e)) from None
    return FoldOptions(
        verify=verify, providers=tuple(check_providers(providers, available=verify)),
        input_shapes=_shapes(input_shapes or {}),
        inputs=os.fspath(inputs) if isinstance(inputs, os.PathLike) else inputs,
        input_range=(lo, hi), seed=int(seed), atol=atol, rtol=rtol, force_write=force_write,
        external_data=external_data, data_name=data_name, disable=disable, enable=enable,
        verify_timeout=float(verify_timeout) if verify_timeout else None,
        verify_memory=float(verify_memory) if verify_memory else None)


def _check_limit(option: str, value: float | None, unit: str) -> None:
    """A limit: None, or a finite number >= 0 (0: no limit)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not (math.isfinite(value) and value >= 0)):
        raise InputError(f"{option} {value}: expected a finite number of {unit} >= 0 (0: no limit)")


def _shapes(shapes: Mapping[str, Sequence[int]]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    out = []
    for name, dims in shapes.items():
        shape = tuple(int(d) for d in dims)
        text = f"{name}:{'x'.join(map(str, shape))}"
        if any(d < 0 for d in shape):
            raise InputError(f"--input-shape {text!r}: dimensions must not be negative")
        if math.prod(shape) > MAX_INPUT_ELEMENTS:
            raise InputError(f"--input-shape {text!r}: {math.prod(shape)} elements, more than onnxfold can "
                             f"generate and run (at most 2^31)")
        out.append((name, shape))
    return tuple(out)


@dataclass
class FoldResult:
    """What :func:`fold_file` did. Truthy unless verification failed (then nothing was written, unless
    ``force_write``). ``str`` is the fold's summary; :meth:`to_dict` is the ``--report`` JSON."""

    input: Path
    output: Path | None  # None: a check (``dst=None``), nothing written
    # written | verification failed, not written | verification failed, written | foldable | nothing to fold
    status: str
    report: FoldReport
    verification: VerifyResult | None = None  # None when it did not run (verify=False, nothing folded, a check)
    # seconds: load_s, fold_s, write_s, verify_s, check_s, and their parts (README: "The report")
    timings: dict[str, float] = field(default_factory=dict)
    written: list[Path] = field(default_factory=list)  # as committed: the model, its data file, the report
    warnings: list[str] = field(default_factory=list)  # about the input (onnx.checker rejects it too, ...)

    @property
    def passed(self) -> bool:
        return not self.status.startswith("verification failed")

    def __bool__(self) -> bool:
        return self.passed

    @property
    def foldable(self) -> bool:
        """A check (``dst=None``) found something to fold."""
        return self.output is None and bool(self.report.folded)

    def __str__(self) -> str:
        return self.report.summary(check=self.output is None)

    def to_dict(self) -> dict:
        data: dict[str, object] = {"input": str(self.input),
                                   "output": None if self.output is None else str(self.output)}
        data.update(self.report.to_dict())
        if self.verification is not None:
            data["verification"] = self.verification.to_dict()
        data["timings"] = dict(self.timings)
        data["status"] = self.status
        return data


@dataclass(frozen=True)
class Summary:
    """The fold's summary as a log message: ``str`` is the short form (at most ten declines listed);
    the command line's ``-v`` asks for :meth:`text` with ``verbose=True``."""

    report: FoldReport
    check: bool = False

    def text(self, verbose: bool = False) -> str:
        return self.report.summary(verbose=verbose, check=self.check)

    def __str__(self) -> str:
        return self.text()


def fold_file(src: str | os.PathLike, dst: str | os.PathLike | None, *, verify: bool = True,
              providers: str | Sequence[str] = ("cpu",), input_shapes: Mapping[str, Sequence[int]] | None = None,
              inputs: Inputs | None = None, input_range: tuple[float, float] = DEFAULT_RANGE, seed: int = 0,
              atol: float | None = None, rtol: float | None = None, force_write: bool = False,
              external_data: str = "auto", data_name: str | None = None, disable: str | Sequence[str] = (),
              enable: str | Sequence[str] = (), report: str | os.PathLike | None = None,
              verify_timeout: float | None = DEFAULT_TIMEOUT,
              verify_memory: float | None = DEFAULT_MEMORY) -> FoldResult:
    """Fold the model at ``src`` into ``dst`` (which may be ``src``): load, fold, verify, write atomically.

    ``dst=None`` checks only: it folds in memory, writes nothing but the report, and the result's
    ``foldable`` says whether anything would fold. ``verify``: compare the two models in onnxruntime on
    ``providers`` ("cpu", "cuda") with seeded inputs (``input_shapes`` for dynamic dimensions,
    ``input_range``, ``seed``) or ``inputs`` (arrays by name, or an .npz path); ``atol``/``rtol``
    replace the default tolerances. A failed verification writes nothing unless ``force_write``; the
    result is falsy either way. ``external_data``: "auto" (when the input had it or the model passes
    2 GiB), "always" or "never"; ``data_name`` names the data file. ``disable``: rules to switch off;
    ``enable``: rules off by default to switch on (``concat_branch``).
    ``report``: a path to write the JSON report to (committed with the model). ``verify_timeout``:
    seconds verification may take (0 or None: no limit); past it, :class:`~onnxfold.errors.VerifyError`.
    ``verify_memory``: GiB it may need, estimated before it runs (0 or None: no limit; default: this
    machine's memory); above it, :class:`~onnxfold.errors.VerifyError`.

    Raises :class:`~onnxfold.errors.FoldError` (one line) for a bad file, option or path; the input is
    never modified and ``dst`` holds either its old content or the whole new model.
    """
    options = make_options(verify=verify and dst is not None, providers=providers, input_shapes=input_shapes,
                           inputs=inputs, input_range=input_range, seed=seed, atol=atol, rtol=rtol,
                           force_write=force_write, external_data=external_data, data_name=data_name,
                           disable=disable, enable=enable, verify_timeout=verify_timeout,
                           verify_memory=verify_memory)
    if report is not None:  # before any work, like the command line
        check_report(report, {real(src)} | ({real(dst)} if dst is not None else set()))
    return fold_path(src, dst, options, report=report)


def fold_task(src: str | os.PathLike, dst: str | os.PathLike | None, **options) -> dict:
    """:func:`fold_file` as one task of many (a cluster, a job array): never raises, returns the model's
    ``--report`` JSON as a dict (:meth:`FoldResult.to_dict`), or ``{"input", "output", "status"}`` saying
    what went wrong: ``"error: <the one line>"`` for the user's file, option or environment, ``"crashed:
    ..."`` (with ``"traceback"``) for a bug. A module-level function: engines pickle it by name."""
    try:
        return fold_file(src, dst, **options).to_dict()
    except FoldError as e:
        return {"input": str(src), "output": None if dst is None else str(dst), "status": f"error: {e}"}
    except Exception as e:  # a bug in onnxfold: reported with the model that caused it
        return {"input": str(src), "output": None if dst is None else str(dst),
                "status": f"crashed: {type(e).__name__}: {e}", "traceback": traceback.format_exc()}


def fold_path(src: str | os.PathLike, dst: str | os.PathLike | None, options: FoldOptions, *,
              report: str | os.PathLike | None = None, protect: frozenset[Path] = frozenset(),
              shared_folder: bool = False) -> FoldResult:
    """:func:`fold_file` with options already checked (the command line's path, one model of a folder).
    ``protect`` and ``shared_folder``: see :func:`onnxfold.output_plan.plan_output`."""
    began = False  # whether work began (the fold): errors before it are checks, one line alone
    start = time.perf_counter()
    held = Held()  # the input, read in place for the run
    try:
        if dst is None:
            job = _prepare(Path(src), None, options, report, protect, shared_folder, start, held)
            began = True
            return _check(job, options)
        check_target(dst)  # before the lock file is made beside it
        # Runs writing the same OUT take turns, from planning to the old data's removal (in place: from
        # loading the input, which the run before may have just replaced)
        with output_lock(dst):
            early = _begin_before_load(Path(src), options)
            try:
                job = _prepare(Path(src), Path(dst), options, report, protect, shared_folder, start, held)
                assert job.plan is not None
                t = time.perf_counter()
                with staged(job.plan.dst) as tmp:
                    job.timings["stage_s"] = time.perf_counter() - t
                    began = True
                    return _fold_verify_commit(job, tmp, options, early)
            finally:
                if early is not None:
                    early.close()
    except OSError as e:  # the disk, permissions, names: one line
        raise _failed(FoldError(message(e)), began) from e
    except MemoryError:
        raise _failed(FoldError("out of memory"), began) from None
    except FoldError as e:
        _failed(e, began)
        raise
    finally:
        held.close()


def _failed(e: FoldError, began: bool) -> FoldError:
    e.after_work = e.after_work or began
    return e


@dataclass
class _Job:
    """One model, checked before any work."""

    src: Path
    model: onnx.ModelProto | None  # None once folded (in place)
    external: bool  # the input has external data
    feeds: dict[str, np.ndarray] | None
    plan: OutputPlan | None  # None: a check
    report_path: Path | None
    timings: dict[str, float]
    start: float  # perf_counter when the run began (total_s)
    structure: onnx.ModelProto | None = None  # the input without its weights, for verification to plan with


def _prepare(src: Path, dst: Path | None, options: FoldOptions, report: str | os.PathLike | None,
             protect: frozenset[Path], shared_folder: bool, start: float, held: Held) -> _Job:
    """``start``: when the run began (perf_counter), before the output's lock; ``held``: see
    :func:`onnxfold.load.load`."""
    t = time.perf_counter()
    timings = {} if STARTUP is None else {"startup_s": STARTUP}
    timings["lock_s"] = t - start  # the output's lock (waiting for another run writing it included)
    model, external = load(src, held)
    timings["load_s"] = (now := time.perf_counter()) - t
    feeds = _feeds(options.inputs, model)
    shape = None
    if dst is not None and options.verify:
        _check_inputs(model, options, feeds)
        shape = structure(model)  # for verification to plan with: the model is folded in place
    reads = {real(src)} | data_files(model, src)
    plan = None if dst is None else plan_output(src, reads, dst, options.data_name, protect=protect,
                                                shared_folder=shared_folder)
    report_path = None if report is None else Path(report)
    if report_path is not None:
        writes = {real(plan.dst), real(plan.dst.parent / plan.data_name)} if plan else set()
        check_report(report_path, reads | writes)
    timings["plan_s"] = time.perf_counter() - now  # the inputs checked, the output's names chosen
    return _Job(src, model, external, feeds, plan, report_path, timings, start, shape)


def _feeds(inputs: str | Mapping[str, np.ndarray] | None,
           model: onnx.ModelProto | None) -> dict[str, np.ndarray] | None:
    """The inputs given; from an npz only the keys ``model`` needs, checked as they are read."""
    if inputs is None:
        return None
    if isinstance(inputs, str):
        return load_inputs(inputs, model)
    return {name: np.asarray(value) for name, value in inputs.items()}


def _check_inputs(model: onnx.ModelProto, options: FoldOptions, feeds: dict[str, np.ndarray] | None) -> None:
    """The input shapes and inputs against the model's inputs, before any work (verification would find
    out only after the fold)."""
    names = [v.name for v in model_inputs(model)]
    unknown = sorted({name for name, _ in options.input_shapes} - set(names))
    if unknown:
        raise InputError(f"--input-shape names no input of the model: {', '.join(unknown)} "
                         f"(its inputs: {', '.join(names)})")
    missing = [n for n in names if feeds is not None and n not in feeds]
    given = f"--inputs {options.inputs}" if isinstance(options.inputs, str) else "the inputs given"
    if missing:
        raise InputError(f"{given}: lacks the model's input(s) {', '.join(missing)}")
    if feeds is not None:
        check_feeds(model, feeds, given)
    else:
        check_shapes(model, dict(options.input_shapes))


def _check(job: _Job, options: FoldOptions) -> FoldResult:
    """``dst=None``: fold in memory, write nothing but the report."""
    assert job.model is not None
    _, report = fold_model(job.model, disable=options.disable, enable=options.enable, copy=False,
                           base_dir=job.src.parent)
    job.model = None
    log.info(Summary(report, check=True))
    result = FoldResult(job.src, None, "foldable" if report.folded else "nothing to fold", report,
                        timings={**job.timings, "fold_s": report.seconds})
    result.timings["total_s"] = time.perf_counter() - job.start
    _write_report(job, result)
    return result


def _fold_verify_commit(job: _Job, tmp: Path, options: FoldOptions, early: Early | None = None) -> FoldResult:
    """Fold, write to ``tmp`` (in the staging folder) and verify, check, commit. ``early``: verification
    begun before the load (else it begins here, before the fold)."""
    assert job.plan is not None
    early = early or _begin(job, options)
    syncing: list[Syncing] = []  # the files' sync to disk, begun once no child is left to fork
    mode = job.plan.mode
    # onnx.checker and (without verification) onnxruntime's load of the written model, in a child forked
    # before the fold: it makes its memory ready and imports onnxruntime meanwhile (without verification)
    checking = start_check(tmp, os.stat(job.src).st_size, session=not options.verify)
    try:
        with _folded(job, tmp, options) as (report, write):
            def sync_soon() -> None:  # once written and the run's last child forked
                if not syncing:
                    syncing.append(Syncing(write.files, mode=mode))

            def checker() -> None:  # while verification's child runs the written model
                sync_soon()
                if checking is not None:
                    open_check(checking, write.files, session=False)  # verification loads it in onnxruntime
                else:
                    checked.append(run_checker(tmp))

            result = FoldResult(job.src, job.plan.dst, "written", report, timings=job.timings)
            checked: list[Checked] = []  # onnx.checker's verdict, where it ran here
            if options.verify and report.folded:
                result.verification = _verify(job, tmp, options, report, write, checker, early)
            else:
                log.info("verification skipped (--no-verify)" if not options.verify else
                         "nothing folded: verification skipped")
                if early is not None:
                    early.close()
                write()
                if checking is not None:
                    sync_soon()  # else after check_output's fork
            files = write.files
        # (verification's child is closed by now: by verify, or above)
        return _check_commit(job, files, result, options, checked, sync_soon, syncing, checking)
    finally:
        if early is not None:
            early.close()
        if checking is not None:
            checking.close()
        for s in syncing:
            with contextlib.suppress(BaseException):  # its error, if any, was raised already or is moot
                s.wait()


def _check_commit(job: _Job, files: list[Path], result: FoldResult, options: FoldOptions, checked: list[Checked],
                  sync_soon: Callable[[], None], syncing: list[Syncing], checking: Child | None = None) -> FoldResult:
    """The written model checked (unless verification failed) and committed; ``sync_soon`` begins the
    files' sync (into ``syncing``) if it has not begun; ``checking``: the check's child
    (:func:`~onnxfold.output_check.start_check`)."""
    assert job.plan is not None
    if result.verification is not None and not result.verification:
        if not options.force_write:
            log.error("%s not written: the folded model does not match the original (--force-write writes it "
                      "anyway)", job.plan.dst)
            result.status = "verification failed, not written"
            job.timings["total_s"] = time.perf_counter() - job.start
            _write_report(job, result)
            return result
        result.status = "verification failed, written"
    # Exit 0 promises a model that loads: check it where it lies, before it replaces anything.
    t = time.perf_counter()
    session = result.verification is None  # else verification loaded it in onnxruntime
    here = checking is not None and open_check(checking, files, session)  # (where it is not open already)
    result.warnings = check_output(files[0], job.src, session=session, timings=job.timings,
                                   checked=checked[0] if checked else None, meanwhile=sync_soon, checking=checking,
                                   checker_here=here)
    for w in result.warnings:
        log.warning(w)
    job.timings["check_s"] = time.perf_counter() - t
    _commit(job, files, result, syncing[0])
    data = f" (+ {files[1].name})" if len(files) > 1 else ""
    if data and not is_utf8(job.plan.dst.name):
        data = (f" (+ {files[1].name}: each byte of the name that is not UTF-8 written \\xNN, as the model "
                "names its data file in UTF-8)")
    log.info("wrote %s%s", job.plan.dst, data)
    return result


class _Write:
    """Writes the folded model to the staging file once, when called (verification may call it while its
    child runs the original): ``files`` are then the files written, and the model is let go."""

    def __init__(self, job: _Job, tmp: Path, options: FoldOptions, model: onnx.ModelProto, sink: DataSink):
        self.job, self.tmp, self.sink = job, tmp, sink
        self.model: onnx.ModelProto | None = model
        self.external = {"always": True, "never": False}.get(options.external_data, True if job.external else None)
        self.files: list[Path] = []

    def __call__(self) -> None:
        assert self.model is not None, "written twice"
        model, self.model = self.model, None
        t = time.perf_counter()
        self.files = write(model, self.tmp, base_dir=self.job.src.parent, sink=self.sink, external=self.external)
        self.job.timings["write_s"] = time.perf_counter() - t


@contextlib.contextmanager
def _folded(job: _Job, tmp: Path, options: FoldOptions) -> Iterator[tuple[FoldReport, _Write]]:
    """Fold (the model in place: the input file stays as it is on disk); gives the report and the
    :class:`_Write` that writes it to ``tmp``, which must be called inside the block."""
    assert job.plan is not None and job.model is not None
    # Large folded tensors go to the data file as they are made, whatever the output's form:
    # for a single-file output they are read back once, a tensor at a time.
    sink = DataSink(tmp.parent / job.plan.data_name)
    try:
        folded, report = fold_model(job.model, disable=options.disable, enable=options.enable, copy=False,
                                    base_dir=job.src.parent, sink=sink)
        job.model = None
        job.timings["fold_s"] = report.seconds
        log.info(Summary(report))
        for f in report.folded:  # a record a line: each is kept on one line (names escaped) by itself
            log.debug("  folded %s %s + %s [%s] %s, max |w'| %.4g", f.rule, f.producer, f.consumer, f.graph, f.dtype,
                      f.max_abs_weight)
        writer = _Write(job, tmp, options, folded, sink)
        del folded
        yield report, writer
        assert writer.model is None, "the folded model was never written"
    finally:
        sink.close()


def _begin_before_load(src: Path, options: FoldOptions) -> Early | None:
    """Verification's child, started before the load: it reads the original's structure from the file
    (without its weights), makes the inputs and runs the original while this process loads and folds.
    Not with ``--inputs`` (read here, with the load) nor for what is not a regular file."""
    if not options.verify or options.inputs is not None or not src.is_file():
        return None
    return begin_verify(src, options.providers, input_shapes=dict(options.input_shapes),
                        input_range=options.input_range, seed=options.seed, memory=options.verify_memory)


def _begin(job: _Job, options: FoldOptions) -> Early | None:
    """Verification's child, started before the fold: it runs the original meanwhile."""
    if not options.verify or job.structure is None:
        return None
    return begin_verify(job.src, options.providers, structure=job.structure, inputs=job.feeds,
                        input_shapes=dict(options.input_shapes), input_range=options.input_range, seed=options.seed,
                        memory=options.verify_memory)


def _verify(job: _Job, tmp: Path, options: FoldOptions, report: FoldReport, write: _Write,
            meanwhile: Callable[[], None], early: Early | None = None) -> VerifyResult:
    """Write the folded model and compare it with the input. Verification's child loads and runs the
    original while the model is folded (``early``) or written; ``meanwhile`` runs while it runs the
    written model."""
    t = time.perf_counter()
    assert write.model is not None
    result = compare_models(job.src, tmp, options.providers, inputs=job.feeds, input_shapes=dict(options.input_shapes),
                            input_range=options.input_range, seed=options.seed, atol=options.atol,
                            rtol=options.rtol, folds=report.folded, timeout=options.verify_timeout,
                            memory=options.verify_memory, meanwhile=meanwhile, structure=job.structure,
                            write=write, planned=write.model, early=early)
    job.timings["verify_s"] = time.perf_counter() - t - job.timings.get("write_s", 0.0)
    job.timings.update({f"verify_{part}": seconds for part, seconds in result.timings.items()})
    annotate(report.folded, result)  # each fold's own check, into folded[]
    for w in result.warnings:
        log.warning(w)
    if result:
        log.info(result)
    else:
        log.error(result)
    for f in report.folded:
        log.debug(f.check_line())
    return result


def _commit(job: _Job, files: list[Path], result: FoldResult, syncing: Syncing) -> None:
    """The report (staged first: one that cannot be written leaves no output either), then the model.
    ``syncing``: the files' sync to disk, begun while they were checked."""
    assert job.plan is not None
    staged_report = None
    t = time.perf_counter()
    syncing.wait()  # the bulk of the commit's time, timed before the report is written
    # The timings end here, as the report has them: the renames and the folder's sync that follow take
    # a few milliseconds and are not timed.
    job.timings["commit_s"] = (now := time.perf_counter()) - t
    job.timings["total_s"] = now - job.start
    try:
        staged_report = stage_json(job.report_path, result.to_dict())
        commit(files, job.plan.dst, mode=job.plan.mode, stale=job.plan.stale_now, synced=True)
        if staged_report:
            place(staged_report, job.report_path)  # type: ignore[arg-type]
    except BaseException:
        if staged_report:
            discard(staged_report)  # (gone already once placed)
        raise
    dst = job.plan.dst
    result.written = [dst, *(dst.parent / f.name for f in files[1:])]
    if job.report_path is not None:
        result.written.append(job.report_path)


def _write_report(job: _Job, result: FoldResult) -> None:
    if job.report_path is not None:
        write_json(job.report_path, result.to_dict())
        result.written.append(job.report_path)


# -- JSON ---------------------------------------------------------------------------------------------
