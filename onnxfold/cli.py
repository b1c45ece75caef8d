"""``python -m onnxfold IN OUT``: fold, verify, write atomically, and say what happened.

Exit codes: 0 success (a written model that onnx.checker and onnxruntime accept), 1 verification
failed, 2 usage or input error (one line, nothing written), 3 ``--check`` found folds, 70 a bug in
onnxfold (the traceback, and a line saying so), 130 / 143 interrupted by SIGINT / SIGTERM (one line,
temporary files removed, nothing written). Every run ends with one line:
``PASSED | Runtime: 0.41s | Command: ...``.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import shlex
import signal
import sys
import time
from pathlib import Path

from . import __version__
from .fold import fold_model
from .io import DataSink, InputError, OutputBroken, check_output, commit, load, staged, write
from .paths import check_report, data_files, plan_output, real
from .rules import describe_rules, rule_names, select_rules
from .verify import VerifyError, annotate, check_providers, load_inputs, model_inputs, parse_shape, verify

EXIT_OK, EXIT_VERIFY, EXIT_USAGE, EXIT_CHECK = 0, 1, 2, 3
EXIT_BUG = 70  # EX_SOFTWARE: an unexpected exception, never 1 (which means "verification failed")
MAX_INPUT_ELEMENTS = 1 << 31  # per --input-shape: larger inputs cannot be generated and run


class Interrupted(BaseException):
    """SIGINT or SIGTERM: unwinds like KeyboardInterrupt, so every temporary folder is removed."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_SIGNALLED: list[int] = []


def _on_signal(signum, frame):
    _SIGNALLED.append(signum)  # an import (onnxruntime's) may turn the exception into an ImportError
    for s in (signal.SIGINT, signal.SIGTERM):  # a second signal must not cut the cleanup short
        signal.signal(s, signal.SIG_IGN)
    raise Interrupted(signum)


_WRITE_ERRORS = {
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


def _os_error(e: OSError) -> str:
    what = _WRITE_ERRORS.get(e.errno, e.strerror or type(e).__name__)
    return f"{e.filename}: {what}" if e.filename else what


# What a user's input or environment causes (a bad file or option; the disk, permissions, names; memory):
# one line and exit 2, for one model or for one model of a folder.
USER_ERRORS = (InputError, VerifyError, OSError, MemoryError)


def _user_error(e: BaseException) -> str:
    if isinstance(e, MemoryError):
        return "out of memory"
    if isinstance(e, OSError):
        return _os_error(e)
    return str(e)


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
    v.add_argument("--force-write", action="store_true", help="write the output even if verification fails")
    o = p.add_argument_group("output")
    o.add_argument("--external-data", choices=("auto", "always", "never"), default="auto",
                   help="auto: when the input had it or the model passes 2 GiB (default)")
    o.add_argument("--data-name", help="file name for external data (default: OUTPUT's name + .data)")
    o.add_argument("--report", metavar="FILE.json", help="write what was folded and declined as JSON")
    o.add_argument("--check", action="store_true",
                   help="fold nothing, write nothing; exit 3 if anything foldable remains")
    r = p.add_argument_group("rules")
    r.add_argument("--disable", action="append", default=[], metavar="RULE",
                   help=f"switch a rule off (repeatable): {', '.join(rule_names())}")
    r.add_argument("--list-rules", action="store_true", help="print the rules and what each declines")
    p.add_argument("-j", "--jobs", type=int, default=1, metavar="N",
                   help="folder mode (INPUT and OUTPUT are folders): fold N models at once (default: 1)")
    g = p.add_argument_group("messages")
    g.add_argument("-q", "--quiet", action="store_true", help="print only errors and the final line")
    g.add_argument("-v", "--verbose", action="store_true", help="print every fold")
    g.add_argument("--version", action="version", version=f"onnxfold {__version__}")
    return p


def _range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise InputError(f"--input-range {text!r}: expected LO,HI, for example -1,1") from None
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise InputError(f"--input-range {text!r}: LO and HI must be finite numbers")
    if not lo < hi:
        raise InputError(f"--input-range {text!r}: LO must be below HI")
    return lo, hi


def _prog() -> str:
    """How the user ran us: ``python -m onnxfold`` or the ``onnxfold`` script."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return "python -m onnxfold" if name == "__main__.py" else "onnxfold"


def main(argv: list[str] | None = None) -> int:
    prog = _prog() if argv is None else "onnxfold"
    argv = sys.argv[1:] if argv is None else list(argv)
    command = prog + " " + shlex.join(argv)
    start = time.perf_counter()

    def say(msg: str) -> None:
        print(msg, file=sys.stderr)

    def finish(code: int) -> int:
        # --check finding something to fold is a finding, not a failure
        state = {EXIT_OK: "PASSED", EXIT_CHECK: "FOLDABLE"}.get(code, "FAILED")
        say(f"{state} | Runtime: {time.perf_counter() - start:.2f}s | Command: {command}")
        return code

    def error(text: str) -> int:  # a usage or input error: one line, exit 2
        say(f"onnxfold: error: {text}")
        return EXIT_USAGE

    handlers = {}
    _SIGNALLED.clear()
    try:
        if _is_main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                handlers[signum] = signal.signal(signum, _on_signal)
        try:
            args = build_parser().parse_args(_fix_negative_values(argv))
            if args.list_rules:
                print(describe_rules())
                return EXIT_OK
            _check_args(args)
            return finish(_run(args, say))
        except USER_ERRORS as e:
            return error(_user_error(e))
        except (Interrupted, KeyboardInterrupt) as e:  # KeyboardInterrupt: a SIGINT before our handler
            return finish(_interrupted(getattr(e, "signum", signal.SIGINT), say))
        except OutputBroken as e:
            import traceback

            traceback.print_exc()
            say(f"onnxfold: error: {e}; nothing written: this is a bug in onnxfold, please report it")
            return finish(EXIT_BUG)
        except Exception:
            if _SIGNALLED:  # the signal's exception, wrapped by the code it interrupted
                return finish(_interrupted(_SIGNALLED[0], say))
            import traceback

            traceback.print_exc()
            say("onnxfold: this is a bug in onnxfold, please report it (with the traceback above)")
            return finish(EXIT_BUG)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def _interrupted(signum: int, say) -> int:
    say(f"onnxfold: interrupted by {signal.Signals(signum).name}: nothing written, temporary files removed")
    return 128 + signum


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _check_args(args) -> None:
    """The user's words, checked before any work; a ValueError later on is a bug."""
    if not args.input or (not args.output and not args.check):
        raise InputError("expected INPUT and OUTPUT paths (or INPUT with --check); see --help")
    if args.jobs < 1:
        raise InputError(f"-j {args.jobs}: expected at least 1")
    if args.data_name and (Path(args.data_name).name != args.data_name or args.data_name in (".", "..")
                           or "\0" in args.data_name):
        raise InputError(f"--data-name {args.data_name!r}: a file name, without a folder")
    if not 0 <= args.seed < 2**32:
        raise InputError(f"--seed {args.seed}: expected an integer from 0 to 2^32 - 1")
    for name in ("atol", "rtol"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise InputError(f"--{name} {value}: expected a finite number >= 0")
    _range(args.input_range)
    try:  # with nothing to verify, the names only
        args.providers = check_providers(args.providers, available=not (args.no_verify or args.check))
    except VerifyError as e:
        raise InputError(str(e)) from None
    if isinstance(args.disable, str):
        args.disable = [args.disable]
    try:
        select_rules(args.disable)
        for text in args.input_shape:
            _, shape = parse_shape(text)
            if math.prod(shape) > MAX_INPUT_ELEMENTS:
                raise ValueError(f"--input-shape {text!r}: {math.prod(shape)} elements, more than onnxfold can "
                                 f"generate and run (at most 2^31)")
    except ValueError as e:
        raise InputError(str(e)) from None
    if args.report:
        check_report(args.report, {real(args.input)} | ({real(args.output)} if args.output else set()))


def _run(args, say) -> int:
    src = Path(args.input)
    if src.is_dir():
        return _run_folder(args, say)
    code, _ = fold_file(args, src, None if args.check else Path(args.output), say, report_path=args.report)
    return code


def fold_file(args, src: Path, dst: Path | None, say, *, report_path=None, protect=frozenset(),
              shared_folder=False) -> tuple[int, dict]:
    """Fold one model as the options say. Returns the exit code and the report's data for it.

    ``report_path``: where to write the JSON report; it is written before the model is committed, so a
    report that cannot be written leaves no output either. ``protect`` and ``shared_folder``: see
    :func:`onnxfold.paths.plan_output` (folder mode).
    """
    quiet = args.quiet
    shapes = dict(parse_shape(s) for s in args.input_shape)
    value_range = _range(args.input_range)
    feeds = load_inputs(args.inputs) if args.inputs else None
    timings: dict[str, float] = {}
    t = time.perf_counter()
    model, external = load(src)
    timings["load_s"] = time.perf_counter() - t
    _check_inputs(model, shapes, feeds, args)
    reads = {real(src)} | data_files(model, src)
    plan = None
    if dst is not None:
        plan = plan_output(src, reads, dst, args.data_name, protect=protect, shared_folder=shared_folder)
    if report_path:
        check_report(report_path, reads | ({real(dst), real(dst.parent / plan.data_name)} if plan else set()))
    data = {"input": str(src), "output": None if dst is None else str(dst)}
    if dst is None:  # --check
        _, report = fold_model(model, disable=args.disable, copy=False, base_dir=src.parent)
        if not quiet:
            say(report.summary(verbose=args.verbose, check=True))
        data.update(report.to_dict(), timings={**timings, "fold_s": report.seconds})
        data["status"] = "foldable" if report.folded else "nothing to fold"
        _write_json(report_path, data)
        return (EXIT_CHECK if report.folded else EXIT_OK), data
    result = None
    with staged(dst) as tmp:
        want_external = {"always": True, "never": False}.get(args.external_data, True if external else None)
        # Large folded tensors go to the data file as they are made, whatever the output's form:
        # for a single-file output they are read back once, a tensor at a time.
        sink = DataSink(tmp.parent / plan.data_name)
        try:
            folded, report = fold_model(model, disable=args.disable, copy=False, base_dir=src.parent, sink=sink)
            timings["fold_s"] = report.seconds
            del model  # folded in place: the input file stays as it is on disk
            if not quiet:
                say(report.summary(verbose=args.verbose))
                if args.verbose:
                    for f in report.folded:
                        say(f"  folded {f.rule} {f.producer} + {f.consumer} [{f.graph}] {f.dtype}, "
                            f"max |w'| {f.max_abs_weight:.4g}")
            t = time.perf_counter()
            files = write(folded, tmp, base_dir=src.parent, sink=sink, external=want_external)
            timings["write_s"] = time.perf_counter() - t
        finally:
            sink.close()
        del folded
        data.update(report.to_dict())
        if args.no_verify:
            if not quiet:
                say("verification skipped (--no-verify)")
        elif not report.folded:
            if not quiet:
                say("nothing folded: verification skipped")
        else:
            t = time.perf_counter()
            result = verify(src, tmp, args.providers, inputs=feeds, input_shapes=shapes, input_range=value_range,
                            seed=args.seed, atol=args.atol, rtol=args.rtol, folds=report.folded)
            timings["verify_s"] = time.perf_counter() - t
            annotate(report.folded, result)  # each fold's own check, into folded[]
            data.update(report.to_dict())
            data["verification"] = _verification(result)
            if not quiet:
                for w in result.warnings:
                    say(f"warning: {w}")
            if not quiet or not result:
                say(str(result))
            if args.verbose and not quiet:
                for f in report.folded:
                    say(f.check_line())
            if not result and not args.force_write:
                say(f"onnxfold: {dst} not written: the folded model does not match the original "
                    "(--force-write writes it anyway)")
                data.update(timings=timings, status="verification failed, not written")
                _write_json(report_path, data)
                return EXIT_VERIFY, data
        # Exit 0 promises a model that loads: check it where it lies, before it replaces anything.
        t = time.perf_counter()
        for w in check_output(tmp, src, session=result is None):
            say(f"warning: {w}")
        timings["check_s"] = time.perf_counter() - t
        data.update(timings=timings, status="written" if result is None or result else "verification failed, written")
        staged_report = _stage_json(report_path, data)
        try:
            commit(files, dst, mode=plan.mode, stale=plan.stale)
        except BaseException:
            if staged_report:
                staged_report.unlink(missing_ok=True)
            raise
        if staged_report:
            os.replace(staged_report, report_path)
    if not quiet:
        say(f"wrote {dst}" + (f" (+ {files[1].name})" if len(files) > 1 else ""))
    return (EXIT_OK if result is None or result else EXIT_VERIFY), data


def _check_inputs(model, shapes: dict, feeds: dict | None, args) -> None:
    """--input-shape and --inputs against the model's inputs, before any work (verification would
    find out only after the fold)."""
    if args.no_verify or args.check or not (shapes or feeds):
        return
    names = [v.name for v in model_inputs(model)]
    unknown = sorted(set(shapes) - set(names))
    if unknown:
        raise InputError(f"--input-shape names no input of the model: {', '.join(unknown)} "
                         f"(its inputs: {', '.join(names)})")
    missing = [n for n in names if feeds is not None and n not in feeds]
    if missing:
        raise InputError(f"--inputs {args.inputs}: lacks the model's input(s) {', '.join(missing)}")


def _verification(result) -> dict:
    return {
        "passed": bool(result),
        "max_abs": result.max_abs(),
        "providers": [
            {"provider": r.provider, "engine": r.engine, "note": r.note,
             "outputs": [{"name": o.name, "dtype": o.dtype, "shape": list(o.shape), "max_abs": o.max_abs,
                          "max_rel": o.max_rel, "atol": o.atol, "rtol": o.rtol, "passed": o.passed}
                         for o in r.outputs],
             "folds": [{"name": o.name, "shape": list(o.shape), "max_abs": o.max_abs, "max_rel": o.max_rel,
                        "atol": o.atol, "channel": o.channel, "passed": o.passed} for o in r.folds]}
            for r in result.results
        ],
        "warnings": list(result.warnings),
        "notes": list(result.notes),
    }


def _write_json(path, data) -> None:
    staged_report = _stage_json(path, data)
    if staged_report:
        os.replace(staged_report, path)


def _stage_json(path, data) -> Path | None:
    """The report, written to a temporary file beside ``path`` (renamed into place by the caller)."""
    if not path:
        return None
    path = Path(path)
    tmp = path.with_name(f".{path.name[:64]}.onnxfold-{os.getpid()}.json")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise InputError(f"{path}: cannot write the report ({_os_error(e)})") from None
    return tmp


def _jsonable(value):
    if isinstance(value, float) or hasattr(value, "__float__"):
        v = float(value)
        return v if math.isfinite(v) else str(v)
    return str(value)


# -- folder mode ------------------------------------------------------------------------------------


_IN_WORKER = False
_IN_JOB = False


def _on_worker_signal(signum, frame):
    if _IN_JOB:  # unwind the fold, which removes its temp folder; _folder_job then exits
        _on_signal(signum, frame)
    os._exit(128 + signum)  # idle, between models: nothing to clean


def _worker_init() -> None:
    """A folder-mode worker: dies with its parent (Linux: the kernel sends SIGTERM when the parent goes;
    elsewhere a thread watches the parent's pid), and removes its temp folder on SIGTERM/SIGINT."""
    global _IN_WORKER
    _IN_WORKER = True
    signal.signal(signal.SIGTERM, _on_worker_signal)
    signal.signal(signal.SIGINT, _on_worker_signal)
    parent = os.getppid()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent went before prctl took effect
        os._exit(128 + signal.SIGTERM)

    import threading

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=watch, daemon=True).start()


def _folder_job(options: dict, src: str, dst: str | None, protect=frozenset(),
                shared_folder=False) -> tuple[int, dict, list[str]]:
    """One model of a folder, in a worker process: never raises, returns its code, data and messages."""
    global _IN_JOB
    args = argparse.Namespace(**options)
    lines: list[str] = []
    start = time.perf_counter()
    _IN_JOB = True
    try:
        code, data = fold_file(args, Path(src), None if dst is None else Path(dst), lines.append,
                               protect=protect, shared_folder=shared_folder)
    except USER_ERRORS as e:
        code, data = EXIT_USAGE, {"input": src, "output": dst, "status": f"error: {_user_error(e)}"}
        lines.append(f"onnxfold: error: {_user_error(e)}")
    except (Interrupted, KeyboardInterrupt) as e:
        if _IN_WORKER:  # temp folder removed on the way here; a worker does not go on with other models
            os._exit(128 + getattr(e, "signum", signal.SIGINT))
        raise
    except Exception as e:  # a bug: keep the traceback in the log, and go on with the other models
        import traceback

        code, data = EXIT_BUG, {"input": src, "output": dst, "status": f"crashed: {type(e).__name__}: {e}"}
        lines.append(traceback.format_exc())
        lines.append("this is a bug in onnxfold, please report it (with the traceback above)")
    finally:
        _IN_JOB = False
    data["seconds"] = time.perf_counter() - start
    return code, data, lines


def _walk(src_dir: Path, skip: Path | None) -> list[Path]:
    """Every *.onnx below ``src_dir``, not descending into ``skip`` (an output folder inside it) nor into
    onnxfold's own temporary folders."""
    found = []
    for root, dirs, files in os.walk(src_dir):
        dirs[:] = sorted(d for d in dirs if ".onnxfold-" not in d
                         and (skip is None or real(Path(root) / d) != skip))
        found += [Path(root) / f for f in files if f.endswith(".onnx") and (Path(root) / f).is_file()]
    return sorted(found)


def _run_folder(args, say) -> int:
    src_dir = Path(args.input)
    dst_dir = None if args.check else Path(args.output)
    if dst_dir is not None:
        for folder in (dst_dir, *dst_dir.parents):
            if folder.exists() and not folder.is_dir():
                raise InputError(f"{dst_dir}: {folder} is a file, not a folder (the input is a folder, so the "
                                 "output must be one too)")
    models = _walk(src_dir, real(dst_dir) if dst_dir is not None else None)
    if not models:
        raise InputError(f"{src_dir}: no *.onnx files below it")
    inputs = {real(m) for m in models}
    shared = False
    if dst_dir is not None:
        s, d = real(src_dir), real(dst_dir)
        shared = s == d or s in d.parents or d in s.parents
        if args.data_name:
            folders = {}
            for m in models:
                rel_parent = m.parent.relative_to(src_dir)
                if rel_parent in folders:
                    raise InputError(f"--data-name {args.data_name!r}: {folders[rel_parent].name} and {m.name} would "
                                     f"write the same data file in {dst_dir / rel_parent}; leave --data-name out")
                folders[rel_parent] = m
        dst_dir.mkdir(parents=True, exist_ok=True)
    jobs = []
    for path in models:
        rel = path.relative_to(src_dir)
        out = None
        if dst_dir is not None:
            out = dst_dir / rel
            out.parent.mkdir(parents=True, exist_ok=True)
        jobs.append((str(path), None if out is None else str(out), frozenset(inputs - {real(path)})))
    options = {**vars(args), "report": None}  # each model's messages are collected, shown below
    results: dict[str, tuple[int, dict, list[str]]] = {}
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), unit="model", file=sys.stderr, disable=args.quiet or None, desc="folding")
    if args.jobs > 1 and len(jobs) > 1:
        from concurrent.futures import ProcessPoolExecutor, as_completed

        pool = ProcessPoolExecutor(max_workers=args.jobs, initializer=_worker_init)
        try:
            futures = {pool.submit(_folder_job, options, s, d, p, shared): s for s, d, p in jobs}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update()
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
    else:
        for s, d, p in jobs:
            results[s] = _folder_job(options, s, d, p, shared)
            bar.update()
    bar.close()
    rows = [results[s] for s, _, _ in jobs]
    for code, data, lines in rows:
        failed = code not in (EXIT_OK, EXIT_CHECK)
        if failed and args.quiet:  # one line a model, whatever it was (a traceback is in the report)
            status = data.get("status") or ""
            say(f"{data['input']}: {status.splitlines()[0] if status else ''}")
        elif (failed or args.verbose) and lines:
            say(f"{data['input']}:")
            say("\n".join("  " + line for line in "\n".join(lines).splitlines()))
    if not args.quiet:
        say(_table(src_dir, rows))
    codes = [code for code, _, _ in rows]
    failed = sum(1 for c in codes if c in (EXIT_VERIFY, EXIT_USAGE, EXIT_BUG))
    say(f"{len(rows)} models: {len(rows) - failed} ok, {failed} failed")
    _write_json(args.report, {"models": [data for _, data, _ in rows],
                              "totals": {"models": len(rows), "failed": failed,
                                         "folded": sum(len(d.get("folded", [])) for _, d, _ in rows)}})
    if EXIT_BUG in codes:
        return EXIT_BUG
    if EXIT_USAGE in codes:
        return EXIT_USAGE
    if EXIT_VERIFY in codes:
        return EXIT_VERIFY
    return EXIT_CHECK if EXIT_CHECK in codes else EXIT_OK


def _table(root: Path, rows) -> str:
    header = ("model", "BN before", "BN after", "folds", "declined", "max abs err", "seconds", "status")
    lines = []
    for code, data, _ in rows:
        verification = data.get("verification") or {}
        err = verification.get("max_abs")
        lines.append((
            str(Path(data["input"]).relative_to(root)),
            str(data.get("bn_before", "-")),
            str(data.get("bn_after", "-")),
            str(len(data.get("folded", []))) if "folded" in data else "-",
            str(len(data.get("declined", []))) if "declined" in data else "-",
            "-" if err is None else f"{err:.2g}",
            f"{data.get('seconds', 0):.2f}",
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
    """The ``onnxfold`` console script (``python -m onnxfold`` also installs its signal handlers before
    this module's imports: see :func:`onnxfold._console`)."""
    from . import _console

    _console()
