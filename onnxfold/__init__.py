"""onnxfold: fold BatchNormalization into the Conv or ConvTranspose before it, and prove it.

    from onnxfold import fold_conv_bn, fold_model, verify

    folded = fold_conv_bn(model)             # onnx.ModelProto / GraphProto: a new, folded object
    graph = fold_conv_bn(gs_graph)           # onnx_graphsurgeon.Graph: folded in place, returned
    folded, report = fold_model(model)       # and what happened: folds, declines and reasons
    assert verify(model, folded)             # both in onnxruntime, optimizations off
"""

from __future__ import annotations

__version__ = "0.1.0"

from .affine import NotFoldable
from .fold import fold_model
from .io import InputError
from .report import FoldReport
from .rules import rule_names
from .verify import VerifyError, VerifyResult, verify

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
