"""onnxfold: fold BatchNormalization into the Conv or ConvTranspose before it, and prove it.

    from onnxfold import fold_conv_bn, fold_model, verify

    folded = fold_conv_bn(model)             # onnx.ModelProto / GraphProto: a new, folded object
    graph = fold_conv_bn(gs_graph)           # onnx_graphsurgeon.Graph: folded in place, returned
    folded, report = fold_model(model)       # and what happened: folds, declines and reasons
    assert verify(model, folded)             # both in onnxruntime, optimizations off
"""

from __future__ import annotations

__version__ = "0.1.0"

# The public names are imported on first use (PEP 562): `python -m onnxfold` then installs its
# SIGINT/SIGTERM handlers before onnx and onnxruntime load (about a second), so a Ctrl-C at start-up
# prints one line, not an import traceback.
_LAZY = {
    "NotFoldable": ".affine",
    "fold_model": ".fold",
    "InputError": ".io",
    "FoldReport": ".report",
    "rule_names": ".rules",
    "VerifyError": ".verify",
    "VerifyResult": ".verify",
    "verify": ".verify",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'onnxfold' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "fold_conv_bn",
    "fold_model",
    "verify",
    "FoldReport",
    "VerifyResult",
    "VerifyError",
    "InputError",
    "NotFoldable",
    "rule_names",
    "__version__",
]


def fold_conv_bn(obj, *, disable=()):
    """Fold every safe producer -> BatchNormalization pair in ``obj``.

    - ``onnx.ModelProto``: returns a new folded model; the argument is untouched.
    - ``onnx.GraphProto``: returns a new folded graph (read with the latest opset).
    - ``onnx_graphsurgeon.Graph``: folds in place and returns the same graph, so it chains with
      ``.cleanup().toposort()``.

    Use :func:`fold_model` to also get the :class:`FoldReport`.
    """
    import onnx

    from .fold import fold_model

    if isinstance(obj, onnx.ModelProto):
        return fold_model(obj, disable=disable)[0]
    if isinstance(obj, onnx.GraphProto):
        from onnx import helper

        model = helper.make_model(obj, opset_imports=[helper.make_opsetid("", onnx.defs.onnx_opset_version())])
        return fold_model(model, disable=disable, copy=False)[0].graph
    if type(obj).__name__ == "Graph" and type(obj).__module__.startswith("onnx_graphsurgeon"):
        from ._graphsurgeon import fold_graph

        return fold_graph(obj, disable=disable)[0]
    raise TypeError(f"fold_conv_bn takes an onnx.ModelProto, onnx.GraphProto or onnx_graphsurgeon.Graph, not {type(obj).__name__}")


def _console() -> None:
    """``python -m onnxfold`` and the ``onnxfold`` script: a signal before the command line's own handlers
    are in place (while onnx loads) ends the run with one line; nothing has been opened yet."""
    import os
    import signal
    import sys

    def early(signum, frame):
        sys.stderr.write(f"onnxfold: interrupted by {signal.Signals(signum).name}: nothing written\n")
        sys.stderr.flush()
        os._exit(128 + signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, early)
    from .cli import main

    raise SystemExit(main())
