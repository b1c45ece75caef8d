"""concat_branch (issue 19, item 4): parallel Convs of one tensor, concatenated along the channels, become
one Conv. Off by default (tools/measure_concat_merge.py: onnxruntime ran the merged Conv slower where
the kernel sizes differ); ``enable=["concat_branch"]`` / ``--enable concat_branch`` switches it on.

Built with onnx.helper (rulekit.G) for every shape of the pattern and every sentence it declines with,
and exported from torch blocks (Inception-like, ACNet-like; BN statistics random), both exporters.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from checks import assert_user_error, check_valid, cli
from onnxfold import fold_file, fold_model
from onnxfold.branches import Kernel, stack
from onnxfold.errors import NotFoldable
from onnxfold.rules import describe_rules
from rulekit import G, equivalent, folds, op_types

ON = {"enable": ["concat_branch"]}
P1 = [1, 1, 1, 1]
P2 = [2, 2, 2, 2]


def _inception(g: G, x: str, c: int, bn: bool = False, bias: bool = True) -> str:
    """1x1, 3x3 (pads 1), 5x5 (pads 2) Convs of x, concatenated."""
    outs = [g.conv(x, c, m, k, pads=[k // 2] * 4, bias=bias) for m, k in ((3, 1), (5, 3), (2, 5))]
    if bn:
        outs = [g.bn(o, m) for o, m in zip(outs, (3, 5, 2))]
    return g.node("Concat", outs, axis=1)


# -- the pure math ----------------------------------------------------------------------------------
def test_stack_pads_each_kernel_at_its_offset_and_concatenates_the_biases():
    big = Kernel(np.full((2, 3, 3, 3), 2.0), np.array([1.0, 2.0]), 1, (1, 1), (1, 1), (1, 1), (1, 1))
    row = Kernel(np.ones((1, 3, 1, 3)), np.array([5.0]), 1, (0, 1), (0, 1), (1, 1), (1, 1))  # a 1x3
    m = stack([row, big])
    assert m.weight.shape == (3, 3, 3, 3) and m.begins == (1, 1) and m.ends == (1, 1) and m.group == 1
    assert np.all(m.weight[0, :, 1, :] == 1) and not np.any(m.weight[0, :, [0, 2], :])
    assert np.all(m.weight[1:] == 2) and list(m.bias) == [5, 1, 2]


def test_stack_declines_grouped_kernels():
    k = Kernel(np.ones((4, 2, 3, 3)), np.zeros(4), 2, (1, 1), (1, 1), (1, 1), (1, 1))
    with pytest.raises(NotFoldable, match="grouped"):
        stack([k, k])


# -- helper-built: what folds -----------------------------------------------------------------------
def test_off_by_default():
    g = G(seed=1)
    x = g.input("x", [1, 4, 7, 7])
    model = g.model(_inception(g, x, 4))
    folded, report = fold_model(model)
    assert not report.folded and not report.declined and op_types(folded) == op_types(model)
    assert "concat_branch" in describe_rules() and "off by default" in describe_rules()


@pytest.mark.parametrize("bias", [True, False])
def test_inception_branches_become_one_conv(bias):
    g = G(seed=2)
    x = g.input("x", [2, 4, 7, 6])
    model = g.model(g.node("Relu", [_inception(g, x, 4, bias=bias)]))
    folded, _ = folds(model, ["concat_branch"], **ON)
    assert op_types(folded) == ["Conv", "Relu"]
    conv = folded.graph.node[0]
    inits = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    assert inits[conv.input[1]].shape == (10, 4, 5, 5)
    assert conv.output[0] == model.graph.node[3].output[0]  # the Concat's output name is kept


def test_mixed_bias_and_bn_branches():
    g = G(seed=3)
    x = g.input("x", [1, 4, 6, 6])
    a = g.bn(g.conv(x, 4, 3, 3, pads=P1, bias=False), 3)
    b = g.conv(x, 4, 2, 1, bias=False)  # no bias: zeros
    c = g.conv(x, 4, 5, 3, pads=P1)
    model = g.model(g.node("Concat", [a, b, c], axis=-3))  # axis -3 of a rank-4 tensor: the channels
    folded, _ = folds(model, ["conv_bn", "concat_branch"], **ON)
    assert op_types(folded) == ["Conv"]


def test_acnet_like_asymmetric_kernels_strided():
    g = G(seed=4)
    x = g.input("x", [1, 3, 9, 8])
    a = g.conv(x, 3, 4, 3, pads=P1, strides=[2, 2])
    row = g.node("Conv", [x, g.weight((2, 3, 1, 3)), g.bias(2)], kernel_shape=[1, 3], pads=[0, 1, 0, 1], strides=[2, 2])
    col = g.node("Conv", [x, g.weight((2, 3, 3, 1))], kernel_shape=[3, 1], pads=[1, 0, 1, 0], strides=[2, 2])
    folded, _ = folds(g.model(g.node("Concat", [a, row, col], axis=1)), ["concat_branch"], **ON)
    assert op_types(folded) == ["Conv"]


def test_dilated_and_1d():
    g = G(seed=5)
    x = g.input("x", [1, 4, 12])
    a = g.conv(x, 4, 3, 3, dims=1, pads=[2, 2], dilations=[2])
    b = g.conv(x, 4, 2, 1, dims=1)
    c = g.conv(x, 4, 2, 5, dims=1, pads=[4, 4], dilations=[2])
    folds(g.model(g.node("Concat", [a, b, c], axis=1)), ["concat_branch"], **ON)


def test_with_the_affine_after_the_concat():
    """concat_batchnormalization (at the BN after a Concat) and concat_branch (at the Concat) do not fight:
    on, everything becomes one Conv; off, the BN folds into each Conv and the Concat stays."""
    g = G(seed=6)
    x = g.input("x", [1, 4, 6, 6])
    model = g.model(g.bn(_inception(g, x, 4, bn=True), 10))
    on, report = fold_model(model, **ON)
    assert op_types(on) == ["Conv"], report.summary(verbose=True)
    assert sorted(f.rule for f in report.folded).count("concat_branch") == 1
    assert "and 1 Concat of branches into one Conv (" in report.summary() and "Mul/Add" not in report.summary()
    equivalent(model, on)
    off, report = fold_model(model)
    assert op_types(off) == ["Conv", "Conv", "Conv", "Concat"] and "concat_branch" not in report.summary(verbose=True)
    equivalent(model, off)


# -- what it leaves ---------------------------------------------------------------------------------
def _left_alone(model):
    folded, report = fold_model(model, **ON)
    assert not report.folded and not report.declined, report.summary(verbose=True)
    assert op_types(folded) == op_types(model)


def test_mixnet_split_branches_are_not_this_pattern():
    """MixNet: each depthwise Conv reads its own channel slice of X (a Split): not Convs of one X."""
    g = G(seed=7)
    x = g.input("x", [1, 4, 7, 7])
    s1, s2 = g.node("Split", [x, g.ints([2, 2])], n_out=2, axis=1)
    a = g.conv(s1, 2, 2, 3, group=2, pads=P1)
    b = g.conv(s2, 2, 2, 5, group=2, pads=P2)
    _left_alone(g.model(g.node("Concat", [a, b], axis=1)))


def test_a_concat_input_that_is_no_conv():
    g = G(seed=8)
    x = g.input("x", [1, 4, 6, 6])
    _left_alone(g.model(g.node("Concat", [g.conv(x, 4, 4, 3, pads=P1), g.node("Relu", [x])], axis=1)))


def test_the_same_conv_twice_is_left():
    g = G(seed=9)
    x = g.input("x", [1, 4, 6, 6])
    a = g.conv(x, 4, 4, 3, pads=P1)
    _left_alone(g.model(g.node("Concat", [a, a], axis=1)))


# -- helper-built: each sentence it declines with ---------------------------------------------------
def _declines(model, reason):
    folded, report = fold_model(model, **ON)
    assert not report.folded, report.summary(verbose=True)
    reasons = [d.reason for d in report.declined if d.rule == "concat_branch"]
    assert any(reason in r for r in reasons), f"{reason!r} not in {reasons}"
    assert op_types(folded) == op_types(model)
    assert [list(n.input) for n in folded.graph.node] == [list(n.input) for n in model.graph.node]
    equivalent(model, folded, "declined", seeds=(1,))


def _cat(g: G, *outs: str, axis: int = 1) -> onnx.ModelProto:
    return g.model(g.node("Concat", list(outs), axis=axis))


@pytest.mark.parametrize("groups", [(2, 2), (1, 2), (4, 4)])  # grouped, mixed, depthwise (MixNet on one X)
def test_declines_grouped_convs(groups):
    g = G(seed=20)
    x = g.input("x", [1, 4, 6, 6])
    _declines(_cat(g, g.conv(x, 4, 4, 3, pads=P1, group=groups[0]), g.conv(x, 4, 4, 5, pads=P2, group=groups[1])),
              "the Convs are grouped")


def test_declines_different_strides():
    g = G(seed=21)
    x = g.input("x", [1, 4, 4, 4])  # a 3x3 without pads and a strided 1x1: both 2x2
    _declines(_cat(g, g.conv(x, 4, 4, 3), g.conv(x, 4, 4, 1, strides=[2, 2])), "different strides")


def test_declines_different_dilations():
    g = G(seed=22)
    x = g.input("x", [1, 4, 8, 8])
    _declines(_cat(g, g.conv(x, 4, 4, 3, pads=P1), g.conv(x, 4, 4, 3, pads=P2, dilations=[2, 2])),
              "different dilations")


def test_declines_auto_pad():
    g = G(seed=23)
    x = g.input("x", [1, 4, 6, 6])
    _declines(_cat(g, g.conv(x, 4, 4, 3, auto_pad="SAME_UPPER"), g.conv(x, 4, 4, 1)), "auto_pad=SAME_UPPER")


def test_declines_pads_that_do_not_line_up():
    g = G(seed=24)
    x = g.input("x", [1, 4, 8, 8])  # dilation 2: a 2x2 with pads 1 sits half a tap off a 3x3 with pads 2
    a = g.conv(x, 4, 4, 3, pads=P2, dilations=[2, 2])
    _declines(_cat(g, a, g.conv(x, 4, 4, 2, pads=P1, dilations=[2, 2])), "padding does not line up")


def test_declines_a_concat_along_another_axis():
    g = G(seed=25)
    x = g.input("x", [1, 4, 6, 6])
    _declines(_cat(g, g.conv(x, 4, 4, 3, pads=P1), g.conv(x, 4, 4, 1), axis=2), "joins axis 2")


def test_declines_a_branch_output_with_another_reader():
    g = G(seed=26)
    x = g.input("x", [1, 4, 6, 6])
    a = g.conv(x, 4, 4, 3, pads=P1)
    model = g.model([g.node("Concat", [a, g.conv(x, 4, 4, 1)], axis=1), g.node("Relu", [a])])
    _declines(model, "has 2 readers")


def test_declines_a_weight_that_is_not_constant():
    g = G(seed=27)
    x = g.input("x", [1, 4, 6, 6])
    w = g.input("w", [4, 4, 1, 1])
    _declines(_cat(g, g.conv(x, 4, 4, 3, pads=P1), g.node("Conv", [x, w], kernel_shape=[1, 1])),
              "'w' is a graph input, not a constant")


def test_disable_wins_over_enable():
    g = G(seed=28)
    x = g.input("x", [1, 4, 6, 6])
    model = g.model(_inception(g, x, 4))
    folded, report = fold_model(model, enable="concat_branch", disable=["concat_branch"])
    assert not report.folded and op_types(folded) == op_types(model)
    with pytest.raises(ValueError, match="unknown rule 'nope'"):
        fold_model(model, enable=["nope"])


# -- torch blocks (skipped without torch) -------------------------------------------------------------
def _torch_block(kind: str):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    bb = pytest.importorskip("branch_blocks")
    nn = torch.nn

    class Parallel(nn.Module):
        def __init__(self, branches):
            super().__init__()
            self.branches = nn.ModuleList(branches)

        def forward(self, x):
            return torch.relu(torch.cat([b(x) for b in self.branches], dim=1))

    if kind == "inception":
        branches = [bb.conv_bn(8, 6, 1), bb.conv_bn(8, 10, 3, padding=1), bb.conv_bn(8, 4, 5, padding=2)]
    else:  # ACNet-like kernels, concatenated
        branches = [bb.conv_bn(8, 6, 3, padding=1), bb.conv_bn(8, 6, (1, 3), padding=(0, 1)),
                    bb.conv_bn(8, 6, (3, 1), padding=(1, 0))]
    return bb, bb.randomize_bn(Parallel(branches), seed=3)


@pytest.mark.parametrize("dynamo", [False, True])
@pytest.mark.parametrize("kind", ["inception", "acnet"])
def test_torch_blocks(kind, dynamo):
    bb, block = _torch_block(kind)
    model = bb.export(block, (1, 8, 9, 9), dynamo=dynamo)
    check_valid(model)
    folded, report = fold_model(model, **ON)
    assert report.bn_after == 0 and op_types(folded).count("Conv") == 1, report.summary(verbose=True)
    assert [f.rule for f in report.folded].count("concat_branch") == 1
    assert "Concat" not in op_types(folded)
    equivalent(model, folded, report.summary(verbose=True))
    # the merged Conv computes what the torch block computes
    x = np.random.default_rng(0).standard_normal((1, 8, 9, 9)).astype(np.float32)
    with bb.torch.no_grad():
        expected = block(bb.torch.from_numpy(x)).numpy()
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    got = ort.InferenceSession(folded.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        None, {folded.graph.input[0].name: x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


# -- entry points -----------------------------------------------------------------------------------
def _model() -> onnx.ModelProto:
    g = G(seed=40)
    x = g.input("x", [1, 4, 6, 6])
    return g.model(g.node("Relu", [_inception(g, x, 4, bn=True)]))  # 3 Conv, 3 BN, Concat, Relu


def test_fold_file(tmp_path):
    model = _model()
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(src))
    result = fold_file(src, dst, enable=["concat_branch"])
    assert result and op_types(onnx.load(str(dst))) == ["Conv", "Relu"]
    result = fold_file(src, dst)  # off by default
    assert result and op_types(onnx.load(str(dst))) == ["Conv", "Conv", "Conv", "Concat", "Relu"]


def test_fold_model_on_onnx_ir():
    ir = pytest.importorskip("onnx_ir")
    model = _model()
    ir_model = ir.serde.deserialize_model(model)
    out, report = fold_model(ir_model, **ON)
    assert out is ir_model and [n.op_type for n in ir_model.graph] == ["Conv", "Relu"]
    assert [f.rule for f in report.folded].count("concat_branch") == 1
    equivalent(model, ir.serde.serialize_model(ir_model))


def test_every_entry_point_takes_enable():
    """fold_conv_bn (ModelProto, GraphProto, onnx-graphsurgeon, onnx_ir) and FoldBatchNormPass switch the
    rule on as fold_model does; without ``enable`` each leaves the branches."""
    from onnxfold import fold_conv_bn

    model = _model()
    assert op_types(fold_conv_bn(model)) == ["Conv", "Conv", "Conv", "Concat", "Relu"]  # off by default
    folded = fold_conv_bn(model, **ON)
    assert op_types(folded) == ["Conv", "Relu"]
    equivalent(model, folded, "ModelProto")
    assert [n.op_type for n in fold_conv_bn(model.graph, **ON).node] == ["Conv", "Relu"]
    gs = pytest.importorskip("onnx_graphsurgeon")
    graph = gs.import_onnx(model)
    assert fold_conv_bn(graph, **ON) is graph
    graph.cleanup().toposort()
    assert [n.op for n in graph.nodes] == ["Conv", "Relu"]
    equivalent(model, gs.export_onnx(graph), "graphsurgeon")
    ir = pytest.importorskip("onnx_ir")
    from onnxfold.ir_pass import FoldBatchNormPass

    ir_model = ir.serde.deserialize_model(model)
    pass_ = FoldBatchNormPass(**ON)
    result = pass_(ir_model)
    assert result.modified and [n.op_type for n in ir_model.graph] == ["Conv", "Relu"]
    assert pass_.report is not None and "concat_branch" in [f.rule for f in pass_.report.folded]
    equivalent(model, ir.serde.serialize_model(ir_model), "onnx_ir pass")


def test_cli_enable(tmp_path):
    model = _model()
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(src))
    proc = cli(src, out, "--enable", "concat_branch")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("PASSED | "), proc.stderr
    folded = onnx.load(str(out))
    assert op_types(folded) == ["Conv", "Relu"]
    equivalent(model, folded, "cli")
    assert_user_error(cli(src, tmp_path / "other.onnx", "--enable", "nope"), "unknown rule 'nope'")
    assert not (tmp_path / "other.onnx").exists()
    listed = cli("--list-rules")
    assert listed.returncode == 0 and "--enable NAME" in listed.stdout and "concat_branch" in listed.stdout


def test_fold_file_verifies_with_the_affine_after_the_concat(tmp_path):
    """The BN after the Concat folds into the merged Conv after concat_branch made it (or before, into each
    Conv): either way verification passes and one Conv is left."""
    g = G(seed=41)
    x = g.input("x", [1, 4, 6, 6])
    model = g.model(g.node("Relu", [g.bn(_inception(g, x, 4, bn=True), 10)]))
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(src))
    result = fold_file(src, dst, enable="concat_branch")
    assert result, result
    folded = onnx.load(str(dst))
    assert op_types(folded) == ["Conv", "Relu"]
    equivalent(model, folded)
