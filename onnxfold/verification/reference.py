"""onnx.reference, corrected: where onnxruntime's CPU provider has no kernel (float64 or bfloat16 Conv),
both models run in ``onnx.reference.ReferenceEvaluator``, with BatchNormalization computed by
:func:`batch_norm` as the spec says (onnx.reference's own normalizes with batch statistics at opsets
9-13 and raises at 6-7)."""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import external_data_helper, helper

from ..affine import DEFAULT_EPSILON
from ..errors import VerifyError
from ..tensors import utf8_folder

_BN = None


def reference_ops() -> list:
    """OpRun classes that replace onnx.reference's own where they are wrong."""
    global _BN
    if _BN is None:
        from onnx.reference.op_run import OpRun

        class BatchNormalization(OpRun):
            """BatchNormalization of every opset, as the spec says (``batch_norm`` below)."""

            op_domain = ""

            def _run(self, x, scale, bias, mean, var, **_attributes):
                opsets = self.run_params.get("opsets") or {}
                opset = opsets.get("", opsets.get("ai.onnx", onnx.defs.onnx_opset_version()))
                since = onnx.defs.get_schema("BatchNormalization", opset, "").since_version
                attrs = {a.name: helper.get_attribute_value(a) for a in self.onnx_node.attribute}
                return batch_norm(x, scale, bias, mean, var, since=since,
                                  outputs=[bool(o) for o in self.onnx_node.output], **attrs)

        _BN = BatchNormalization
    return [_BN]


def batch_norm(x, scale, bias, mean, var, *, since: int, outputs=(True,), epsilon=DEFAULT_EPSILON, momentum=0.9,
               is_test=0, spatial=1, training_mode=0, **_ignored):
    """BatchNormalization-``since`` (6, 7, 9, 14, 15) as its spec defines it, computed in float64.
    ``epsilon`` is a float attribute: its default 1e-5 is the float32 nearest 1e-5, as when written.

    Inference mode: ``Y = (X - mean) / sqrt(var + epsilon) * scale + B`` with the statistics on axis 1,
    or, with ``spatial=0`` (6 and 7), per activation (shape ``X.shape[1:]``). The mode: ``is_test`` at
    opset 6; at 7-13 the number of outputs present (only Y: inference); from 14 ``training_mode``.
    Training mode normalizes with the batch's mean and (population) variance and returns the running
    statistics ``input * momentum + batch * (1 - momentum)``; the saved_mean/saved_var outputs of
    opsets 6-13 are not defined precisely enough by the spec to compute, and raise.
    """
    present = [i for i, p in enumerate(outputs) if p]
    if since < 7:
        training = int(is_test) == 0
    elif since < 14:
        training = len(present) > 1
    else:
        training = int(training_mode) != 0
    x64 = np.asarray(x).astype(np.float64)
    per_activation = since < 9 and int(spatial) == 0
    axes = (0,) if per_activation else tuple(a for a in range(x64.ndim) if a != 1)
    stat_shape = (1, *x64.shape[1:]) if per_activation else (1, -1) + (1,) * (x64.ndim - 2)

    def stat(a):
        return np.asarray(a).astype(np.float64).reshape(stat_shape)

    eps = float(epsilon)
    if not training:
        y = (x64 - stat(mean)) / np.sqrt(stat(var) + eps) * stat(scale) + stat(bias)
        return (y.astype(np.asarray(x).dtype),)
    if any(i >= 3 for i in present):
        raise NotImplementedError(f"BatchNormalization-{since} in training mode with saved_mean/saved_var outputs")
    batch_mean = x64.mean(axis=axes, keepdims=True)
    batch_var = ((x64 - batch_mean) ** 2).mean(axis=axes, keepdims=True)
    y = (x64 - batch_mean) / np.sqrt(batch_var + eps) * stat(scale) + stat(bias)
    m = float(momentum)
    running_mean = np.asarray(mean) * m + batch_mean.reshape(np.shape(mean)) * (1 - m)
    running_var = np.asarray(var) * m + batch_var.reshape(np.shape(var)) * (1 - m)
    result = [y.astype(np.asarray(x).dtype), running_mean.astype(np.asarray(mean).dtype),
              running_var.astype(np.asarray(var).dtype)]
    return tuple(result[: max(present) + 1])


def run_reference(model, feeds, expose=(), nodes: bytes = b""):
    from onnx.reference import ReferenceEvaluator

    if isinstance(model, (str, os.PathLike)):
        m = onnx.load(str(model), load_external_data=False)
        with utf8_folder(os.path.dirname(os.path.abspath(model))) as folder:  # onnx reads data by UTF-8 names only
            external_data_helper.load_external_data_for_model(m, folder)
    elif isinstance(model, bytes):
        m = onnx.load_from_string(model)
    else:
        m = model  # a forked child's copy: ours to change
    m.graph.output.extend(helper.make_tensor_value_info(name, elem, None) for name, elem in expose)
    if nodes:
        m.MergeFromString(nodes)
    try:
        outs = ReferenceEvaluator(m, new_ops=reference_ops()).run(None, feeds)
    except Exception as e:
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise VerifyError(f"onnx.reference cannot run the model either: {type(e).__name__}: {first}") from None
    return dict(zip([o.name for o in m.graph.output], outs))

