"""onnxfold as an onnx_ir pass, to compose in a ``PassManager`` beside onnxscript's and onnx_ir's passes.

    import onnx_ir as ir
    from onnxfold.ir_pass import FoldBatchNormPass

    passes = ir.passes.PassManager([FoldBatchNormPass(), ir.passes.common.RemoveUnusedNodesPass()])
    result = passes(model)  # in place: result.model is model; result.modified says whether it changed

The pass folds in place, as :func:`onnxfold.fold_conv_bn` does for an ``onnx_ir.Model``
(:mod:`onnxfold._onnx_ir`), and keeps the last run's :class:`~onnxfold.report.FoldReport` in
``report``. It verifies nothing: compare the models with :func:`onnxfold.verify` where it matters.
Importing this module imports onnx_ir (which ``import onnxfold`` never does).
"""

from __future__ import annotations

import onnx_ir as ir

from ._onnx_ir import fold_ir_model
from .report import FoldReport


class FoldBatchNormPass(ir.passes.InPlacePass):
    """Fold every safe producer -> affine pair (BatchNormalization, Mul/Add/Sub/Div by constants) of the
    model in place; ``disable``: rule names to switch off, ``enable``: rules that are off by default to
    switch on (:func:`onnxfold.rule_names`)."""

    def __init__(self, disable: str | tuple[str, ...] | list[str] = (),
                 enable: str | tuple[str, ...] | list[str] = ()):
        super().__init__()
        self.disable = disable
        self.enable = enable
        self.report: FoldReport | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        _, self.report = fold_ir_model(model, disable=self.disable, enable=self.enable)
        return ir.passes.PassResult(model, modified=bool(self.report.folded))
