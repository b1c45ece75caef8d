"""``python -m onnxfold IN OUT``: fold, verify, write atomically, and say what happened.

Exit codes: 0 success (a written model that onnx.checker and onnxruntime accept), 1 verification
failed, 2 usage or input error (one line, nothing written), 3 ``--check`` found folds, 70 a bug in
onnxfold (the traceback, and a line saying so), 128 + N interrupted by signal N: 130 SIGINT, 143
SIGTERM, 129 SIGHUP, 131 SIGQUIT, 138 / 140 SIGUSR1 / SIGUSR2 (one line, temporary files removed,
nothing written). Every run ends with one line:
``PASSED | Runtime: 0.41s | Command: ...``.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import shlex
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import heap, signals
from ._version import __version__
from .api import FoldOptions, FoldResult, Summary, fold_path, make_options
from .commit import json_text, write_json
from .errors import USER_ERRORS, InputError, Interrupted, OutputBroken, message, printable
from .output_plan import check_report, real
from .rules import describe_rules, off_by_default, rule_names
from .verification import DEFAULT_MEMORY, DEFAULT_TIMEOUT
from .verification.inputs import parse_shape

# The exit codes, defined here once (the pre-commit hook and the README use these)
EXIT_OK, EXIT_VERIFY, EXIT_USAGE, EXIT_CHECK = 0, 1, 2, 3
EXIT_BUG = 70  # EX_SOFTWARE: an unexpected exception, never 1 (which means "verification failed")
WORST_FIRST = (EXIT_BUG, EXIT_USAGE, EXIT_VERIFY, EXIT_CHECK)  # a run of many models exits with the worst


def _negative(text: str) -> bool:
    return len(text) > 1 and text[0] == "-" and (text[1].isdigit() or text[1] == ".")


def _fix_negative_values(argv: list[str]) -> list[str]:
    """``--input-range -2,2``: argparse takes ``-2,2`` for an option; join it to its flag."""
    out = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("--input-range", "--atol", "--rtol", "--seed") and i + 1 < len(argv) and _negative(argv[i + 1]):
            out.append(f"{a}={argv[i + 1]}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, like every other usage error here
        raise InputError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="onnxfold",
        description="Fold BatchNormalization into the Conv/ConvTranspose/Gemm/MatMul before it, and prove the result "
        "equivalent in onnxruntime.",
    )
    p.add_argument("input", nargs="?", help="the model to fold (.onnx; external data is read beside it), "
                   "or a folder: every *.onnx below it")
    p.add_argument("output", nargs="?", help="where to write the folded model (may be the input path), "
                   "or a folder for the same relative paths")
    v = p.add_argument_group("verification (on by default, on the CPU)")
    v.add_argument("--no-verify", action="store_true", help="skip verification")
    v.add_argument("--providers", default="cpu", help="comma-separated: cpu, cuda (default: cpu)")
    v.add_argument("--input-shape", action="append", default=[], metavar="NAME:DIMS",
                   help="shape for an input with dynamic dimensions, e.g. input:1x3x224x224 (repeatable)")
    v.add_argument("--inputs", metavar="FILE.npz", help="feed these inputs instead of random ones")
    v.add_argument("--input-range", default="-1,1", metavar="LO,HI",
                   help="range of random float inputs (default: -1,1)")
    v.add_argument("--seed", type=int, default=0, help="seed of random inputs (default: 0)")
    v.add_argument("--atol", type=float, help="absolute tolerance for every output (default: by dtype and scale)")
    v.add_argument("--rtol", type=float, help="relative tolerance for every output (default: by dtype)")
    v.add_argument("--verify-timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help=f"stop verification after this long, exit 2 (default: {DEFAULT_TIMEOUT:g}; 0: no limit)")
    v.add_argument("--verify-memory", type=float, default=DEFAULT_MEMORY, metavar="GIB",
                   help="refuse a verification estimated to need more memory, exit 2 (default: this machine's, "
                        f"{DEFAULT_MEMORY:.1f}; 0: no limit)")
    v.add_argument("--force-write", action="store_true", help="write the output even if verification fails")
    o = p.add_argument_group("output")
    o.add_argument("--external-data", choices=("auto", "always", "never"), default="auto",
                   help="auto: when the input had it or the model passes 2 GiB (default)")
    o.add_argument("--data-name", help="file name for external data (default: OUTPUT's name + .data)")
    o.add_argument("--report", metavar="FILE.json", help="write what was folded and declined as JSON (- : to stdout)")
    o.add_argument("--check", action="store_true",
                   help="fold nothing, write nothing; exit 3 if anything foldable remains")
    r = p.add_argument_group("rules")
    r.add_argument("--disable", action="append", default=[], metavar="RULE",
                   help=f"switch a rule off (repeatable): {', '.join(rule_names())}")
    r.add_argument("--enable", action="append", default=[], metavar="RULE",
                   help="switch on a rule that is off by default (repeatable): "
                        f"{', '.join(off_by_default())}")
    r.add_argument("--list-rules", action="store_true", help="print the rules and what each declines")
    p.add_argument("-j", "--jobs", type=int, default=1, metavar="N",
                   help="folder mode (INPUT and OUTPUT are folders): fold N models at once (default: 1)")
    g = p.add_argument_group("messages")
    g.add_argument("-q", "--quiet", action="store_true", help="print only errors and the final line")
    g.add_argument("-v", "--verbose", action="store_true", help="print every fold")
    g.add_argument("--version", action="version", version=f"onnxfold {__version__}")
    return p


def _range(text: str) -> tuple[float, float]:
    """``--input-range LO,HI`` as numbers (:func:`onnxfold.api.make_options` checks their values)."""
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise InputError(f"--input-range {text!r}: expected LO,HI, for example -1,1") from None
    return lo, hi


@dataclass(frozen=True)
class Options:
    """The command line, parsed and checked once, before any work. Frozen and picklable: folder mode's
    worker processes receive it. ``report``: a path, ``-`` (stdout) or None."""

    input: str
    output: str | None
    fold: FoldOptions = field(default_factory=FoldOptions)
    check: bool = False
    report: str | None = None
    jobs: int = 1
    quiet: bool = False
    verbose: bool = False

    @property
    def level(self) -> int:
        """The least important log record printed: -q errors only, -v every fold and its check."""
        return logging.ERROR if self.quiet else logging.DEBUG if self.verbose else logging.INFO

    @property
    def report_file(self) -> str | None:
        return None if self.report in (None, "-") else self.report


def parse_options(args: argparse.Namespace) -> Options:
    """The user's words, checked before any work; a ValueError later on is a bug."""
    if not args.input or (not args.output and not args.check):
        raise InputError("expected INPUT and OUTPUT paths (or INPUT with --check); see --help")
    if args.jobs < 1:
        raise InputError(f"-j {args.jobs}: expected at least 1")
    shapes = {}
    for text in args.input_shape:
        try:
            name, shape = parse_shape(text)
        except ValueError as e:
            raise InputError(str(e)) from None
        shapes[name] = shape
    fold = make_options(
        verify=not (args.no_verify or args.check), providers=args.providers, input_shapes=shapes,
        inputs=args.inputs, input_range=_range(args.input_range), seed=args.seed, atol=args.atol, rtol=args.rtol,
        force_write=args.force_write, external_data=args.external_data, data_name=args.data_name,
        disable=args.disable, enable=args.enable, verify_timeout=args.verify_timeout, verify_memory=args.verify_memory)
    if args.report and args.report != "-":
        check_report(args.report, {real(args.input)} | ({real(args.output)} if args.output else set()))
    return Options(input=args.input, output=None if args.check else args.output, fold=fold, check=args.check,
                   report=args.report, jobs=args.jobs, quiet=args.quiet, verbose=args.verbose)


# -- what to say --------------------------------------------------------------------------------------


def _say(text: str) -> None:
    write(sys.stderr, text + "\n")


say = _say  # for onnxfold-check


def write(stream, text: str) -> None:
    """Write to a standard stream. A reader that went away (``2>&1 | head -1``) or a stream that cannot
    be written changes nothing else: the run goes on, writes its output and exits as it would; what
    follows for that stream goes to os.devnull (the interpreter's last flush included)."""
    try:
        stream.write(text)
        stream.flush()
    except (OSError, ValueError):
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, stream.fileno())
            os.close(null)
        except (OSError, ValueError):
            pass


class _Stderr:
    """sys.stderr through :func:`write`, for the progress bar."""

    def write(self, text: str) -> None:
        write(sys.stderr, text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return sys.stderr.isatty()


class _Messages(logging.Formatter):
    """The one place that turns the library's log records into the command line's lines (which records
    are printed is the level: :attr:`Options.level`). At -v the fold's summary lists every decline; a
    warning reads ``warning: ...``; an error sentence ``onnxfold: ...`` (a failed comparison, logged as
    the result itself, prints as it is)."""

    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        if isinstance(record.msg, Summary):
            return record.msg.text(verbose=self.verbose)
        text = record.getMessage()
        if isinstance(record.msg, str):  # a sentence: one line, whatever the paths in it hold
            text = printable(text)
        if record.levelno >= logging.ERROR and isinstance(record.msg, str):
            return "onnxfold: " + text
        if record.levelno == logging.WARNING:
            return "warning: " + text
        return text


class _Lines(logging.Handler):
    """Each record the level lets through, formatted by :class:`_Messages`, to ``say``."""

    def __init__(self, say: Callable[[str], None], options: Options):
        super().__init__(options.level)
        self.say = say
        self.setFormatter(_Messages(options.verbose))

    def emit(self, record: logging.LogRecord) -> None:
        self.say(self.format(record))


@contextlib.contextmanager
def _messages(say: Callable[[str], None], options: Options) -> Iterator[None]:
    """While the block runs, the ``onnxfold`` logger's records go to ``say`` as the options say."""
    logger = logging.getLogger("onnxfold")
    handler = _Lines(say, options)
    level = logger.level
    if level == logging.NOTSET or level > options.level:
        logger.setLevel(options.level)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _prog() -> str:
    """How the user ran us: ``python -m onnxfold`` or the ``onnxfold`` script."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return "python -m onnxfold" if name == "__main__.py" else "onnxfold"


# -- one run ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    prog = _prog() if argv is None else "onnxfold"
    argv = sys.argv[1:] if argv is None else list(argv)
    command = printable(prog + " " + shlex.join(argv))
    start = time.perf_counter()

    def finish(code: int) -> int:
        # --check finding something to fold is a finding, not a failure
        state = {EXIT_OK: "PASSED", EXIT_CHECK: "FOLDABLE"}.get(code, "FAILED")
        _say(f"{state} | Runtime: {time.perf_counter() - start:.2f}s | Command: {command}")
        return code

    with signals.handled():
        return _main(argv, finish)


def _main(argv: list[str], finish: Callable[[int], int]) -> int:
    """Parse, run, and turn each way a run can end into its exit code and lines."""
    try:
        args = build_parser().parse_args(_fix_negative_values(argv))
        if args.list_rules:
            write(sys.stdout, describe_rules() + "\n")
            return EXIT_OK
        return finish(_run(parse_options(args)))
    except USER_ERRORS as e:  # a usage or input error: one line, exit 2 (and the final line once work began)
        _say(f"onnxfold: error: {message(e)}")
        return finish(EXIT_USAGE) if getattr(e, "after_work", False) else EXIT_USAGE
    except (Interrupted, KeyboardInterrupt) as e:  # KeyboardInterrupt: a SIGINT before our handler
        return finish(_interrupted(getattr(e, "signum", signal.SIGINT)))
    except OutputBroken as e:
        write(sys.stderr, traceback.format_exc())
        _say(f"onnxfold: error: {e}; nothing written: this is a bug in onnxfold, please report it")
        return finish(EXIT_BUG)
    except Exception:
        if signals.SIGNALLED:  # the signal's exception, wrapped by the code it interrupted
            return finish(_interrupted(signals.SIGNALLED[0]))
        write(sys.stderr, traceback.format_exc())
        _say("onnxfold: this is a bug in onnxfold, please report it (with the traceback above)")
        return finish(EXIT_BUG)


def _interrupted(signum: int) -> int:
    _say(f"onnxfold: interrupted by {signals.name(signum)}: nothing written, temporary files removed")
    return 128 + signum


def _run(options: Options) -> int:
    """One model through :func:`onnxfold.api.fold_path`, or a folder; ``--report -``: the JSON to stdout."""
    if Path(options.input).is_dir():
        return _run_folder(options)
    with _messages(_say, options):
        result = fold_path(options.input, options.output, options.fold, report=options.report_file)
    if options.report == "-":
        write(sys.stdout, json_text(result.to_dict()))
    return _exit_code(result)


def _exit_code(result: FoldResult) -> int:
    if result.output is None:  # --check
        return EXIT_CHECK if result.foldable else EXIT_OK
    return EXIT_OK if result else EXIT_VERIFY


# -- folder mode ------------------------------------------------------------------------------------


@dataclass
class ModelRun:
    """One model of a folder: its exit code, its report's data (or what went wrong), what it said."""

    input: str
    output: str | None
    code: int
    data: dict
    lines: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.code not in (EXIT_OK, EXIT_CHECK)

    def to_dict(self) -> dict:
        return {**self.data, "seconds": self.seconds}


def _folder_job(options: Options, src: str, dst: str | None, protect: frozenset[Path] = frozenset(),
                shared_folder: bool = False) -> ModelRun:
    """One model of a folder, in a worker process: never raises; its messages are kept, not printed."""
    lines: list[str] = []
    start = time.perf_counter()
    try:
        with signals.folder_job(), _messages(lines.append, options):
            result = fold_path(src, dst, options.fold, protect=protect, shared_folder=shared_folder)
        run = ModelRun(src, dst, _exit_code(result), result.to_dict(), lines)
    except USER_ERRORS as e:
        run = ModelRun(src, dst, EXIT_USAGE, {"input": src, "output": dst, "status": f"error: {message(e)}"}, lines)
        lines.append(f"onnxfold: error: {message(e)}")
    except (Interrupted, KeyboardInterrupt) as e:
        if signals.in_worker():  # temp folder removed on the way here; a worker does not go on with other models
            os._exit(128 + getattr(e, "signum", signal.SIGINT))
        raise
    except Exception as e:  # a bug: keep the traceback in the log, and go on with the other models
        status = f"crashed: {type(e).__name__}: {e}"
        run = ModelRun(src, dst, EXIT_BUG, {"input": src, "output": dst, "status": status}, lines)
        lines.append(traceback.format_exc())
        lines.append("this is a bug in onnxfold, please report it (with the traceback above)")
    run.seconds = time.perf_counter() - start
    return run


def _walk(src_dir: Path, skip: Path | None) -> list[Path]:
    """Every *.onnx below ``src_dir``, not descending into ``skip`` (an output folder inside it) nor into
    onnxfold's own temporary folders."""
    found = []
    for root, dirs, files in os.walk(src_dir):
        dirs[:] = sorted(d for d in dirs if ".onnxfold-" not in d
                         and (skip is None or real(Path(root) / d) != skip))
        found += [Path(root) / f for f in files if f.endswith(".onnx") and (Path(root) / f).is_file()]
    return sorted(found)


_Job = tuple[str, "str | None", frozenset]  # (input, output or None for --check, the other models' inputs)


def _run_folder(options: Options) -> int:
    src_dir = Path(options.input)
    dst_dir = None if options.output is None else Path(options.output)
    jobs, shared = _folder_jobs(options, src_dir, dst_dir)
    runs = _run_jobs(options, jobs, shared)
    return _folder_summary(options, src_dir, [runs[src] for src, _, _ in jobs])


def _folder_jobs(options: Options, src_dir: Path, dst_dir: Path | None) -> tuple[list[_Job], bool]:
    """Each model below ``src_dir`` with its output path (folders made), and whether the output folder
    is also an input folder (see :func:`onnxfold.output_plan.plan_output`)."""
    if dst_dir is not None:
        for folder in (dst_dir, *dst_dir.parents):
            if folder.exists() and not folder.is_dir():
                kind = "a file, not a folder" if folder.is_file() else "not a folder"
                raise InputError(f"{dst_dir}: {folder} is {kind} (the input is a folder, so the output must be "
                                 "one too)")
    models = _walk(src_dir, real(dst_dir) if dst_dir is not None else None)
    if not models:
        raise InputError(f"{src_dir}: no *.onnx files below it")
    inputs = {real(m) for m in models}
    shared = False
    if dst_dir is not None:
        s, d = real(src_dir), real(dst_dir)
        shared = s == d or s in d.parents or d in s.parents
        if options.fold.data_name:
            _one_data_file_per_folder(options.fold.data_name, models, src_dir, dst_dir)
        dst_dir.mkdir(parents=True, exist_ok=True)
    jobs: list[_Job] = []
    for path in models:
        out = None
        if dst_dir is not None:
            out = dst_dir / path.relative_to(src_dir)
            out.parent.mkdir(parents=True, exist_ok=True)
        jobs.append((str(path), None if out is None else str(out), frozenset(inputs - {real(path)})))
    return jobs, shared


def _one_data_file_per_folder(data_name: str, models: list[Path], src_dir: Path, dst_dir: Path) -> None:
    folders: dict[Path, Path] = {}
    for m in models:
        rel_parent = m.parent.relative_to(src_dir)
        if rel_parent in folders:
            raise InputError(f"--data-name {data_name!r}: {folders[rel_parent].name} and {m.name} would "
                             f"write the same data file in {dst_dir / rel_parent}; leave --data-name out")
        folders[rel_parent] = m


def _run_jobs(options: Options, jobs: list[_Job], shared: bool) -> dict[str, ModelRun]:
    """Each model, in this process or in ``-j`` workers, with a progress bar on stderr."""
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), unit="model", file=_Stderr(), disable=options.quiet or None, desc="folding")
    runs: dict[str, ModelRun] = {}
    if options.jobs > 1 and len(jobs) > 1:
        _run_pool(options, jobs, shared, runs, bar.update)
    else:
        for s, d, p in jobs:
            runs[s] = _folder_job(options, s, d, p, shared)
            bar.update()
    bar.close()
    return runs


def pool_size(jobs: int, models: int) -> int:
    """``-j``, capped at the number of models and of CPUs: a worker more runs nothing, and each holds a
    model and its verification in memory (``-j 200`` forked 200 workers for 2 models)."""
    return max(1, min(jobs, models, os.cpu_count() or 1))


def _run_pool(options: Options, jobs: list[_Job], shared: bool, runs: dict[str, ModelRun],
              done: Callable[[], object]) -> None:
    from concurrent.futures import ProcessPoolExecutor, as_completed

    pool = ProcessPoolExecutor(max_workers=pool_size(options.jobs, len(jobs)), initializer=signals.folder_worker)
    try:
        with signals.deferred():  # the workers fork here: a signal then is taken after, not lost in a fork hook
            futures = {pool.submit(_folder_job, options, s, d, p, shared): s for s, d, p in jobs}
        for future in as_completed(futures):
            runs[futures[future]] = future.result()
            done()
    except BaseException:  # interrupted (or a broken pool): the workers stop too, and clean up
        workers = list((getattr(pool, "_processes", None) or {}).values())
        for proc in workers:
            if proc.is_alive():
                proc.terminate()
        for proc in workers:  # each removes its temp folder before it exits
            proc.join(timeout=60)
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _folder_summary(options: Options, src_dir: Path, runs: list[ModelRun]) -> int:
    """What each model said (a failed one always, each with -v; -q: one line a failed model), the table,
    the totals, the report; the exit code of the worst model."""
    for run in runs:
        if run.failed and options.quiet:  # one line a model, whatever it was (a traceback is in the report)
            status = run.data.get("status") or ""
            _say(printable(f"{run.input}: {status.splitlines()[0] if status else ''}"))
        elif (run.failed or options.verbose) and run.lines:
            _say(printable(f"{run.input}:"))
            _say("\n".join("  " + line for line in "\n".join(run.lines).splitlines()))
    if not options.quiet:
        _say(_table(src_dir, runs))
    failed = sum(1 for r in runs if r.failed)
    _say(f"{len(runs)} models: {len(runs) - failed} ok, {failed} failed")
    data = {"models": [r.to_dict() for r in runs],
            "totals": {"models": len(runs), "failed": failed,
                       "folded": sum(len(r.data.get("folded", [])) for r in runs)}}
    if options.report == "-":
        write(sys.stdout, json_text(data))
    else:
        write_json(options.report, data)
    codes = {r.code for r in runs}
    return next((code for code in WORST_FIRST if code in codes), EXIT_OK)


def _table(root: Path, runs: list[ModelRun]) -> str:
    header = ("model", "BN before", "BN after", "folds", "declined", "max abs err", "seconds", "status")
    lines = []
    for run in runs:
        data = run.data
        err = (data.get("verification") or {}).get("max_abs")
        lines.append((
            printable(str(Path(run.input).relative_to(root))),
            str(data.get("bn_before", "-")),
            str(data.get("bn_after", "-")),
            str(len(data["folded"])) if "folded" in data else "-",
            str(len(data["declined"])) if "declined" in data else "-",
            "-" if err is None else f"{err:.2g}",
            f"{run.seconds:.2f}",
            _cell(data.get("status", "")),
        ))
    widths = [max(len(h), *(len(r[i]) for r in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in lines])


def _cell(text: str, width: int = 48) -> str:
    """A table cell: the first line, cut to ``width`` (the whole message is printed above the table)."""
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= width else line[: width - 3] + "..."


def console() -> None:
    """``python -m onnxfold`` and the ``onnxfold`` script (``python -m onnxfold`` installs its early
    signal handlers before any import: see ``onnxfold/__init__``)."""
    signals.install_early()  # until main() installs the command line's own
    # The process is onnxfold's own: memory it frees is kept for reuse (onnxfold.heap), so that a fold's
    # float64 temporaries take pages freed by the fold before, not fresh ones (timm's repvgg_a0, dynamo
    # export: its fold 0.19 -> 0.14 s, peak memory the same). main() called in a user's process (or a
    # test's) leaves its malloc settings as they are.
    heap.keep_freed()
    leave(main())


def leave(code: int) -> None:
    """End the process with ``code`` without tearing the interpreter down: freeing every object and
    module of onnx, numpy and protobuf takes about 0.1 s (a tenth of a ResNet-50 fold with --no-verify)
    and nothing a finished run needs. What an exit does that matters runs first: the exit handlers
    (isolation's worker stopped), logging's handlers and the standard streams flushed. With another
    thread still running, or a stream that cannot be flushed (a closed pipe), the ordinary exit."""
    if threading.active_count() == 1:
        try:
            atexit._run_exitfuncs()
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:
            raise SystemExit(code) from None
        os._exit(code)
    raise SystemExit(code)
