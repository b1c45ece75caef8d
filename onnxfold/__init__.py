"""onnxfold: fold BatchNormalization (and per-channel Mul/Add/Sub/Div) into the Conv, ConvTranspose,
Gemm or MatMul next to it, and prove the folded model equivalent.

    from onnxfold import fold_conv_bn, fold_file, fold_model, verify

    folded = fold_conv_bn(model)             # onnx.ModelProto / GraphProto: a new, folded object
    graph = fold_conv_bn(gs_graph)           # onnx_graphsurgeon.Graph: folded in place, returned
    program = fold_conv_bn(onnx_program)     # torch.onnx.ONNXProgram, onnx_ir.Model/Graph: in place too
    folded, report = fold_model(model)       # and what happened: folds, declines and reasons
    assert verify(model, folded)             # both in onnxruntime, optimizations off
    result = fold_file("in.onnx", "out.onnx")  # a file: fold, verify, write atomically (the command line)

The library prints nothing: it logs to the ``"onnxfold"`` logger (:mod:`logging`), and raises
:class:`FoldError` (one line) for what a user's file, option or environment causes.
"""

from __future__ import annotations

from . import signals as _signals
from ._version import __version__


def _run_as_main() -> bool:
    """Whether this import is ``python -m onnxfold`` starting (not a library user importing us)."""
    import sys

    argv = getattr(sys, "orig_argv", [])
    for i, a in enumerate(argv[:-1]):
        if a == "-m":
            return argv[i + 1] == "onnxfold"
    return "-monnxfold" in argv


# `python -m onnxfold`: a Ctrl-C or SIGTERM while onnx and onnxruntime load (about a second) ends the run
# with one line, not an import traceback; nothing has been opened yet. Library users are not affected.
if _run_as_main():
    _signals.install_early()

import logging as _logging  # noqa: E402

from . import _graphsurgeon, _onnx_ir  # noqa: E402  (each imports its optional dependency only when called)
from .api import FoldResult, fold_file  # noqa: E402
from .driver import fold_model as _fold_proto  # noqa: E402
from .errors import FoldError, InputError, NotFoldable, VerifyError  # noqa: E402
from .report import FoldReport  # noqa: E402
from .rules import rule_names  # noqa: E402
from .verification import VerifyResult, verify  # noqa: E402

_logging.getLogger("onnxfold").addHandler(_logging.NullHandler())  # a library: the application decides

__all__ = [
    "fold_conv_bn",
    "fold_model",
    "fold_file",
    "verify",
    "FoldReport",
    "FoldResult",
    "FoldError",
    "VerifyResult",
    "VerifyError",
    "InputError",
    "NotFoldable",
    "rule_names",
    "__version__",
]


def _ir_kind(obj) -> str | None:
    """onnx_ir and torch objects, told by their type's module name: neither is imported for others."""
    if not any(c.__module__.split(".")[0] in ("onnx_ir", "torch") for c in type(obj).__mro__):
        return None
    return _onnx_ir.kind(obj)


def fold_model(model, *, disable=(), enable=(), copy: bool = True, base_dir=None, sink=None):
    """Fold every safe producer -> consumer pair. Returns the folded model and a :class:`FoldReport`.

    - ``onnx.ModelProto``: a new folded model; the argument is left untouched unless ``copy=False``.
      ``base_dir`` is the model's folder, for tensors whose external data has not been loaded;
      ``sink`` (an ``onnxfold.tensors.DataSink``) receives large folded tensors as they are made.
    - ``onnx_ir.Model``, ``onnx_ir.Graph`` (also as ``onnxscript.ir``) and ``torch.onnx.ONNXProgram``
      (``torch.onnx.export(..., dynamo=True)``): folded in place and returned, the convention of
      onnx_ir's passes and of ``ONNXProgram.optimize()``; ``copy``, ``base_dir`` and ``sink`` do not
      apply. A program's inference session is released, so calling it, ``call_reference()`` and
      ``save()`` run the folded model. Weights are copied once (see ``onnxfold._onnx_ir``).

    ``disable``: rule names to switch off; ``enable``: rules that are off by default to switch on
    (``concat_branch``); :func:`rule_names` lists them.
    """
    if _ir_kind(model) is not None:
        return _onnx_ir.fold_in_place(model, disable=disable, enable=enable)
    return _fold_proto(model, disable=disable, enable=enable, copy=copy, base_dir=base_dir, sink=sink)


def fold_conv_bn(obj, *, disable=(), enable=()):
    """Fold every safe producer -> BatchNormalization pair in ``obj``.

    - ``onnx.ModelProto``: returns a new folded model; the argument is untouched.
    - ``onnx.GraphProto``: returns a new folded graph (read with the latest opset).
    - ``onnx_graphsurgeon.Graph``: folds in place and returns the same graph, so it chains with
      ``.cleanup().toposort()``.
    - ``onnx_ir.Model`` / ``onnx_ir.Graph`` and ``torch.onnx.ONNXProgram``: folds in place and returns
      the same object (see :func:`fold_model`).

    ``disable``: rule names to switch off; ``enable``: rules that are off by default to switch on
    (:func:`rule_names`). Use :func:`fold_model` to also get the :class:`FoldReport`.
    """
    import onnx

    if isinstance(obj, onnx.ModelProto):
        return fold_model(obj, disable=disable, enable=enable)[0]
    if isinstance(obj, onnx.GraphProto):
        from onnx import helper

        model = helper.make_model(obj, opset_imports=[helper.make_opsetid("", onnx.defs.onnx_opset_version())])
        return fold_model(model, disable=disable, enable=enable, copy=False)[0].graph
    if type(obj).__name__ == "Graph" and type(obj).__module__.startswith("onnx_graphsurgeon"):
        return _graphsurgeon.fold_graph(obj, disable=disable, enable=enable)[0]
    if _ir_kind(obj) is not None:
        return _onnx_ir.fold_in_place(obj, disable=disable, enable=enable)[0]
    raise TypeError("fold_conv_bn takes an onnx.ModelProto, onnx.GraphProto, onnx_graphsurgeon.Graph, onnx_ir.Model, "
                    f"onnx_ir.Graph or torch.onnx.ONNXProgram, not {type(obj).__name__}")
