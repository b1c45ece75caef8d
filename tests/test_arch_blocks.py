"""The architecture blocks of tools/arch_blocks.py, exported as torch writes them, against onnxfold.layout.

Each exported model must run in onnxruntime (ORT_DISABLE_ALL) like torch does (float32, atol 1e-5 at
outputs of order 1), keep its BatchNormalization, and put between producer and BatchNormalization the
layout node that onnxfold.layout follows to the BatchNormalization's channel axis 1.
"""

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxfold.affine import NotFoldable
from onnxfold.layout import follow_layout, split_slices

torch = pytest.importorskip("torch")  # tools/arch_blocks.py builds the blocks in torch

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("onnxfold_arch_blocks", ROOT / "tools" / "arch_blocks.py")
arch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(arch)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("arch")
    return {name: arch.export(name, out / f"{name}.onnx") for name in arch.BLOCKS}


def _graph(path):
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    g = model.graph
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = onnx.numpy_helper.to_array(n.attribute[0].t)
    shapes = {}
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim)
    made = {o: n for n in g.node for o in n.output}
    return model, consts, shapes, made


def _attrs(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("name", list(arch.BLOCKS))
def test_export_runs_like_torch_and_keeps_bn(exported, name):
    make, shape = arch.BLOCKS[name]
    torch.manual_seed(arch.SEED)
    module = make().eval()
    arch.randomize_bn(module, arch.BN_SEED)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = module(x).numpy()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(exported[name]), opts, providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"x": x.numpy()})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert arch.count_bn(exported[name]) >= 1


@pytest.mark.parametrize(
    "name, layout_op, producer",
    [("levit_mlp", "Flatten", "MatMul"), ("ocr_squeeze", "Squeeze", "Conv"), ("seq_transpose", "Transpose", "Add")],
)
def test_layout_between_producer_and_bn_is_followed_to_axis_1(exported, name, layout_op, producer):
    model, consts, shapes, made = _graph(exported[name])
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    for bn in bns:
        node = made[bn.input[0]]
        assert node.op_type == layout_op
        src = made[node.input[0]]
        assert src.op_type == producer
        in_shape = shapes[node.input[0]]
        channels = len(consts[bn.input[1]])
        axis = len(in_shape) - 1 if src.op_type in ("MatMul", "Add") else 1  # MatMul: last; Conv: 1
        assert in_shape[axis] == channels
        result = follow_layout(layout_op, in_shape, axis, _attrs(node), [consts.get(i) for i in node.input[1:]], 17)
        assert result.axis == 1
        assert result.shape[1] == channels


def test_levit_bn_of_the_wrong_axis_declines(exported):
    """Flatten(axis=1) of the same [B, N, C] would merge N and C: the channel axis cannot be followed."""
    _, _, shapes, made = _graph(exported["levit_mlp"])
    flatten = next(n for n in made.values() if n.op_type == "Flatten")
    with pytest.raises(NotFoldable, match="merges or splits"):
        follow_layout("Flatten", shapes[flatten.input[0]], 2, {"axis": 1})


def test_split_branches_slices_match_the_bn_sizes(exported):
    model, consts, shapes, _made = _graph(exported["split_branches"])
    split = next(n for n in model.graph.node if n.op_type == "Split")
    assert _attrs(split)["axis"] == 1
    channels = shapes[split.input[0]][1]
    slices = split_slices(channels, len(split.output), consts[split.input[1]], None, 17)
    by_output = {o: s for o, s in zip(split.output, slices)}
    for bn in (n for n in model.graph.node if n.op_type == "BatchNormalization"):
        a, b = by_output[bn.input[0]]
        assert b - a == len(consts[bn.input[1]])


def test_mixnet_concat_counts_match_the_bn(exported):
    model, consts, shapes, made = _graph(exported["mixnet_mixconv"])
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    concat = made[bn.input[0]]
    assert concat.op_type == "Concat" and _attrs(concat)["axis"] == 1
    counts = [shapes[i][1] for i in concat.input]
    assert all(made[i].op_type == "Conv" for i in concat.input)
    assert sum(counts) == len(consts[bn.input[1]]) and len(set(counts)) == 1


# What fold_model does with each exported block: the rules of issue 12 fold every BatchNormalization;
# torch.chunk, which the legacy exporter writes as Slice nodes, is followed by split_affine since issue 19.
FOLDS = {
    "bn_linear_head": ["bn_gemm"],
    "levit_mlp": ["matmul_bn", "matmul_bn"],
    "mixnet_mixconv": ["concat_bn"],
    "ocr_squeeze": ["conv_bn"],
    "seq_transpose": ["linear_bn"],
    "split_branches": ["split_affine"],
    "chunk_branches": ["split_affine"],
}


@pytest.mark.parametrize("name", list(arch.BLOCKS))
def test_fold_each_block(exported, name):
    """The folded block: the rules expected, BatchNormalization left only where nothing folds, valid, and
    equal to the export in onnxruntime (ORT_DISABLE_ALL; checks.py bound, k = 1e-4 for float32)."""
    from checks import assert_close, check_valid, feeds_for, run
    from onnxfold import fold_model

    model = onnx.load(str(exported[name]))
    folded, report = fold_model(model)
    assert sorted(f.rule for f in report.folded) == sorted(FOLDS[name]), report.summary()
    assert report.bn_after == (arch.count_bn(exported[name]) if not FOLDS[name] else 0), report.summary()
    check_valid(folded)
    feeds = feeds_for(model, seed=3)
    assert_close(run(model, feeds), run(folded, feeds), name)
