"""``python -m onnxfold IN OUT``: fold, verify, write atomically, and say what happened.

Exit codes: 0 success, 1 verification failed, 2 usage or input error, 3 ``--check`` found folds.
A known user error prints one line and no traceback; an unexpected exception keeps its traceback
(it is a bug). Every run ends with one line: ``PASSED | Runtime: 0.41s | Command: ...``.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

from . import __version__
from .fold import fold_model
from .io import DataSink, InputError, commit, load, staged, write
from .rules import describe_rules, rule_names, select_rules
from .verify import VerifyError, annotate, load_inputs, parse_shape, verify

EXIT_OK, EXIT_VERIFY, EXIT_USAGE, EXIT_CHECK = 0, 1, 2, 3


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
    if not lo < hi:
        raise InputError(f"--input-range {text!r}: LO must be below HI")
    return lo, hi


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = "onnxfold " + shlex.join(argv)
    start = time.perf_counter()

    def say(msg: str) -> None:
        print(msg, file=sys.stderr)

    def finish(code: int) -> int:
        state = "PASSED" if code == EXIT_OK else "FAILED"
        say(f"{state} | Runtime: {time.perf_counter() - start:.2f}s | Command: {command}")
        return code

    try:
        args = build_parser().parse_args(argv)
        if args.list_rules:
            print(describe_rules())
            return EXIT_OK
        if not args.input or (not args.output and not args.check):
            raise InputError("expected INPUT and OUTPUT paths (or INPUT with --check); see --help")
        if args.jobs < 1:
            raise InputError(f"-j {args.jobs}: expected at least 1")
        if args.data_name and (Path(args.data_name).name != args.data_name or args.data_name in (".", "..")):
            raise InputError(f"--data-name {args.data_name!r}: a file name, without a folder")
        try:  # the user's words, checked before any work; a ValueError later on is a bug
            select_rules(args.disable)
            for text in args.input_shape:
                parse_shape(text)
        except ValueError as e:
            raise InputError(str(e)) from None
        return finish(_run(args, say))
    except (InputError, VerifyError) as e:
        say(f"onnxfold: error: {e}")
        return finish(EXIT_USAGE)


def _run(args, say) -> int:
    src = Path(args.input)
    if src.is_dir():
        return _run_folder(args, say)
    code, data = fold_file(args, src, None if args.check else Path(args.output), say)
    _write_json(args.report, data)
    return code


def fold_file(args, src: Path, dst: Path | None, say) -> tuple[int, dict]:
    """Fold one model as the options say. Returns the exit code and the report's data for it."""
    quiet = args.quiet
    shapes = dict(parse_shape(s) for s in args.input_shape)
    value_range = _range(args.input_range)
    feeds = load_inputs(args.inputs) if args.inputs else None
    timings: dict[str, float] = {}
    t = time.perf_counter()
    model, external = load(src)
    timings["load_s"] = time.perf_counter() - t
    data = {"input": str(src), "output": None if dst is None else str(dst)}
    if dst is None:  # --check
        _, report = fold_model(model, disable=args.disable, copy=False, base_dir=src.parent)
        if not quiet:
            say(report.summary(verbose=args.verbose))
        data.update(report.to_dict(), timings={**timings, "fold_s": report.seconds})
        data["status"] = "foldable" if report.folded else "nothing to fold"
        return (EXIT_CHECK if report.folded else EXIT_OK), data
    result = None
    with staged(dst) as tmp:
        want_external = {"always": True, "never": False}.get(args.external_data, True if external else None)
        # Large folded tensors go to the data file as they are made, whatever the output's form:
        # for a single-file output they are read back once, a tensor at a time.
        sink = DataSink(tmp.parent / (args.data_name or dst.name + ".data"))
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
                return EXIT_VERIFY, data
        commit(files, dst)
    data.update(timings=timings, status="written" if result is None or result else "verification failed, written")
    if not quiet:
        say(f"wrote {dst}" + (f" (+ {files[1].name})" if len(files) > 1 else ""))
    return (EXIT_OK if result is None or result else EXIT_VERIFY), data


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
    if not path:
        return
    try:
        Path(path).write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    except OSError as e:
        raise InputError(f"{path}: cannot write the report ({e.strerror})") from None


def _jsonable(value):
    if isinstance(value, float) or hasattr(value, "__float__"):
        v = float(value)
        return v if math.isfinite(v) else str(v)
    return str(value)


# -- folder mode ------------------------------------------------------------------------------------


def _folder_job(options: dict, src: str, dst: str | None) -> tuple[int, dict, list[str]]:
    """One model of a folder, in a worker process: never raises, returns its code, data and messages."""
    args = argparse.Namespace(**options)
    lines: list[str] = []
    start = time.perf_counter()
    try:
        code, data = fold_file(args, Path(src), None if dst is None else Path(dst), lines.append)
    except (InputError, VerifyError) as e:
        code, data = EXIT_USAGE, {"input": src, "output": dst, "status": f"error: {e}"}
        lines.append(f"onnxfold: error: {e}")
    except Exception as e:  # a bug: keep the traceback in the log, and go on with the other models
        import traceback

        code, data = EXIT_USAGE, {"input": src, "output": dst, "status": f"crashed: {type(e).__name__}: {e}"}
        lines.append(traceback.format_exc())
    data["seconds"] = time.perf_counter() - start
    return code, data, lines


def _run_folder(args, say) -> int:
    src_dir = Path(args.input)
    models = sorted(p for p in src_dir.rglob("*.onnx") if p.is_file())
    if not models:
        raise InputError(f"{src_dir}: no *.onnx files below it")
    dst_dir = None if args.check else Path(args.output)
    if dst_dir is not None:
        if dst_dir.exists() and not dst_dir.is_dir():
            raise InputError(f"{dst_dir}: the input is a folder, so the output must be one too")
        dst_dir.mkdir(parents=True, exist_ok=True)
    jobs = []
    for path in models:
        rel = path.relative_to(src_dir)
        out = None
        if dst_dir is not None:
            out = dst_dir / rel
            out.parent.mkdir(parents=True, exist_ok=True)
        jobs.append((str(path), None if out is None else str(out)))
    options = {**vars(args), "quiet": True, "report": None}
    results: dict[str, tuple[int, dict, list[str]]] = {}
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), unit="model", file=sys.stderr, disable=args.quiet or None, desc="folding")
    if args.jobs > 1 and len(jobs) > 1:
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            futures = {pool.submit(_folder_job, options, s, d): s for s, d in jobs}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update()
    else:
        for s, d in jobs:
            results[s] = _folder_job(options, s, d)
            bar.update()
    bar.close()
    rows = [results[s] for s, _ in jobs]
    for code, data, lines in rows:
        if code not in (EXIT_OK, EXIT_CHECK) and lines:
            say(f"{data['input']}:")
            say("\n".join("  " + line for line in "\n".join(lines).splitlines()))
    if not args.quiet:
        say(_table(src_dir, rows))
    codes = [code for code, _, _ in rows]
    failed = sum(1 for c in codes if c in (EXIT_VERIFY, EXIT_USAGE))
    say(f"{len(rows)} models: {len(rows) - failed} ok, {failed} failed")
    _write_json(args.report, {"models": [data for _, data, _ in rows],
                              "totals": {"models": len(rows), "failed": failed,
                                         "folded": sum(len(d.get("folded", [])) for _, d, _ in rows)}})
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
            data.get("status", ""),
        ))
    widths = [max(len(h), *(len(r[i]) for r in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in lines])


def console() -> None:
    """The ``onnxfold`` console script."""
    raise SystemExit(main())
