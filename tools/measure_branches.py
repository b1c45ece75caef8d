#!/usr/bin/env python3
"""branch_sum against timm's own re-parameterization (issue 19).

For each timm model (training form, random non-trivial BatchNorm statistics, eval mode), exported by
the legacy exporter (do_constant_folding=False) or dynamo: Conv and BatchNormalization counts before
and after onnxfold, the Conv count of timm's ``reparameterize_model`` deploy form exported the same
way, the largest difference between the folded and the deploy Conv weights taken in graph order (only
meaningful where both exports order their Convs alike), and the folded model's largest relative output
error against the original (onnxruntime, ORT_DISABLE_ALL) and against the deploy module (torch).

Usage:  python tools/measure_branches.py [--dynamo] [NAME ...]
        (default: repvgg_a0 mobileone_s0 repghostnet_050 repvit_m0_9 fastvit_t8; timm as tools/corpus.py
        says: pip install --no-deps timm==1.0.31 pillow; a torchvision stand-in is put on sys.path)
"""

from __future__ import annotations

import copy
import io
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from corpus import TORCHVISION_STAND_IN, randomize_bn  # noqa: E402
from onnxfold import fold_model  # noqa: E402

DEFAULT = ["repvgg_a0", "mobileone_s0", "repghostnet_050", "repvit_m0_9", "fastvit_t8"]
SHAPE = (1, 3, 64, 64)


def export(module, x, dynamo: bool) -> onnx.ModelProto:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            return torch.onnx.export(module, (x,), dynamo=True, verbose=False).model_proto
        buf = io.BytesIO()
        torch.onnx.export(module, x, buf, dynamo=False, do_constant_folding=False)
    return onnx.load_from_string(buf.getvalue())


def ops(m: onnx.ModelProto, op: str) -> int:
    return sum(n.op_type == op for n in m.graph.node)


def run(m: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, {m.graph.input[0].name: x})[0]


def conv_weights(m: onnx.ModelProto) -> list[np.ndarray | None]:
    inits = {t.name: t for t in m.graph.initializer}
    return [numpy_helper.to_array(inits[n.input[1]]) if n.input[1] in inits else None
            for n in m.graph.node if n.op_type == "Conv"]


def main(argv: list[str]) -> int:
    import torch

    dynamo = "--dynamo" in argv
    names = [a for a in argv if not a.startswith("--")] or DEFAULT
    stand_in = Path(tempfile.mkdtemp())
    (stand_in / "torchvision").mkdir()
    (stand_in / "torchvision" / "__init__.py").write_text(TORCHVISION_STAND_IN)
    sys.path.insert(0, str(stand_in))
    import timm
    from timm.utils.model import reparameterize_model

    for i, name in enumerate(names):
        net = timm.create_model(name, pretrained=False, num_classes=10).eval()
        randomize_bn(net, 1000 + i)
        x = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(i))
        model = export(net, x, dynamo)
        folded, report = fold_model(model)
        deploy = reparameterize_model(copy.deepcopy(net)).eval()
        dmodel = export(deploy, x, dynamo)
        ref, got = run(model, x.numpy()), run(folded, x.numpy())
        dout = deploy(x).detach().numpy()
        pairs = [(a, b) for a, b in zip(conv_weights(folded), conv_weights(dmodel))
                 if a is not None and b is not None and a.shape == b.shape]
        wdiff = max((float(np.max(np.abs(a - b))) for a, b in pairs), default=float("nan"))
        print(f"{name:<18} {'dynamo' if dynamo else 'legacy'}  Conv {ops(model, 'Conv')} -> {ops(folded, 'Conv')} "
              f"(deploy {ops(dmodel, 'Conv')})  BN {report.bn_before} -> {report.bn_after}  "
              f"branch_sum {sum(f.rule == 'branch_sum' for f in report.folded)}  "
              f"max|w - w_deploy| in order {wdiff:.1e}  "
              f"rel.err vs original {np.max(np.abs(ref - got)) / np.max(np.abs(ref)):.1e}, "
              f"vs deploy {np.max(np.abs(dout - got)) / np.max(np.abs(dout)):.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
