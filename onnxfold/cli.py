"""``python -m onnxfold IN OUT``: fold, verify, write atomically, and say what happened.

Exit codes: 0 success, 1 verification failed, 2 usage or input error, 3 ``--check`` found folds.
A known user error prints one line and no traceback; an unexpected exception keeps its traceback
(it is a bug). Every run ends with one line: ``PASSED | Runtime: 0.41s | Command: ...``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from . import __version__
from .fold import fold_model
from .io import DataSink, InputError, commit, load, staged, write
from .rules import describe_rules, rule_names
from .verify import VerifyError, load_inputs, parse_shape, verify

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
    p.add_argument("input", nargs="?", help="the model to fold (.onnx; external data is read beside it)")
    p.add_argument("output", nargs="?", help="where to write the folded model (may be the input path)")
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
        return finish(_run(args, say))
    except (InputError, VerifyError, ValueError) as e:
        say(f"onnxfold: error: {e}")
        return finish(EXIT_USAGE)


def _run(args, say) -> int:
    quiet = args.quiet
    shapes = dict(parse_shape(s) for s in args.input_shape)
    value_range = _range(args.input_range)
    feeds = load_inputs(args.inputs) if args.inputs else None
    src = Path(args.input)
    model, external = load(src)
    if args.check:
        _, report = fold_model(model, disable=args.disable, copy=False, base_dir=src.parent)
        if not quiet:
            say(report.summary(verbose=args.verbose))
        _write_report(args.report, report, None, {})
        return EXIT_CHECK if report.folded else EXIT_OK
    if args.data_name and (Path(args.data_name).name != args.data_name or args.data_name in (".", "..")):
        raise InputError(f"--data-name {args.data_name!r}: a file name, without a folder")
    timings = {}
    dst = Path(args.output)
    result = None
    with staged(dst) as tmp:
        want_external = {"always": True, "never": False}.get(args.external_data, external)
        sink = DataSink(tmp.parent / (args.data_name or dst.name + ".data")) if want_external else None
        try:
            t = time.perf_counter()
            folded, report = fold_model(model, disable=args.disable, copy=False, base_dir=src.parent, sink=sink)
            timings["fold_s"] = time.perf_counter() - t
            del model  # folded in place: the input file stays as it is on disk
            if not quiet:
                say(report.summary(verbose=args.verbose))
                if args.verbose:
                    for f in report.folded:
                        say(f"  folded {f.rule} {f.producer} + {f.consumer} [{f.graph}] {f.dtype}, "
                            f"max |w'| {f.max_abs_weight:.4g}")
            t = time.perf_counter()
            files = write(folded, tmp, base_dir=src.parent, sink=sink,
                          external=None if args.external_data == "auto" else want_external)
            timings["write_s"] = time.perf_counter() - t
        finally:
            if sink is not None:
                sink.close()
        del folded
        if args.no_verify:
            if not quiet:
                say("verification skipped (--no-verify)")
        elif not report.folded:
            if not quiet:
                say("nothing folded: verification skipped")
        else:
            t = time.perf_counter()
            result = verify(src, tmp, args.providers, inputs=feeds, input_shapes=shapes, input_range=value_range,
                            seed=args.seed, atol=args.atol, rtol=args.rtol)
            timings["verify_s"] = time.perf_counter() - t
            if not quiet:
                for w in result.warnings:
                    say(f"warning: {w}")
            if not quiet or not result:
                say(str(result))
            if not result and not args.force_write:
                say(f"onnxfold: {dst} not written: the folded model does not match the original "
                    "(--force-write writes it anyway)")
                _write_report(args.report, report, result, timings)
                return EXIT_VERIFY
        commit(files, dst)
    _write_report(args.report, report, result, timings)
    if not quiet:
        say(f"wrote {dst}" + (f" (+ {files[1].name})" if len(files) > 1 else ""))
    return EXIT_OK if result is None or result else EXIT_VERIFY


def _write_report(path, report, result, timings) -> None:
    if not path:
        return
    data = report.to_dict()
    data["timings"] = {"fold_s": report.seconds, **timings}
    if result is not None:
        data["verification"] = {
            "passed": bool(result),
            "providers": [
                {"provider": r.provider, "engine": r.engine, "note": r.note,
                 "outputs": [{"name": o.name, "dtype": o.dtype, "max_abs": o.max_abs, "max_rel": o.max_rel,
                              "atol": o.atol, "rtol": o.rtol, "passed": o.passed} for o in r.outputs]}
                for r in result.results
            ],
        }
    try:
        Path(path).write_text(json.dumps(data, indent=2, default=float) + "\n")
    except OSError as e:
        raise InputError(f"{path}: cannot write the report ({e.strerror})") from None


def console() -> None:
    """The ``onnxfold`` console script."""
    raise SystemExit(main())
