"""``onnxfold-check FILE.onnx [FILE.onnx ...] [options]``: ``onnxfold --check`` on each file.

For pre-commit (``.pre-commit-hooks.yaml``), which passes every staged ``.onnx`` file at once, and for
CI steps that check a list of files. Each file gets the command line's own ``--check`` run, its
messages and its final line; the options (``--disable RULE``, ``-q``, ...) apply to every file.

Exit code: the worst of the files': 70 (a bug) over 2 (a file could not be read, or a usage error)
over 3 (something is foldable) over 0; an interruption stops at once with its own code.
"""

from __future__ import annotations

import sys

from .cli import EXIT_CHECK, EXIT_OK, EXIT_USAGE, WORST_FIRST, say
from .cli import main as onnxfold_main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    files = [a for a in argv if a.endswith(".onnx") and not a.startswith("-")]
    options = [a for a in argv if a not in files]
    if not files:
        say("onnxfold-check: error: expected one or more .onnx files")
        return EXIT_USAGE
    codes: dict[str, int] = {}
    for path in files:
        code = onnxfold_main([path, "--check", *options])
        if code >= 128:  # interrupted: 130 (SIGINT) or 143 (SIGTERM)
            return code
        codes[path] = code
    foldable = [p for p, c in codes.items() if c == EXIT_CHECK]
    failed = [p for p, c in codes.items() if c not in (EXIT_OK, EXIT_CHECK)]
    if foldable:
        say(f"onnxfold-check: {len(foldable)} of {len(files)} model(s) can be folded "
            f"(python -m onnxfold IN.onnx OUT.onnx): {', '.join(foldable)}")
    if failed:
        say(f"onnxfold-check: {len(failed)} of {len(files)} model(s) could not be checked: {', '.join(failed)}")
    return next((c for c in WORST_FIRST if c in codes.values()), EXIT_OK)


def console() -> None:
    raise SystemExit(main())
