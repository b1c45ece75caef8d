"""branch_sum (issue 19, items 1-3): parallel branches of one tensor, summed, become one Conv.

Built with onnx.helper (rulekit.G) for every shape of the pattern and every sentence it declines with,
and exported from torch training-form blocks (RepVGG, ACNet, MobileOne, a DBB-like block) whose merged
Conv is compared with the block's own re-parameterization done in torch.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from checks import check_valid
from onnxfold import fold_model
from onnxfold.branches import Kernel, identity, merge, regroup
from rulekit import G, declines, equivalent, folds, nothing, op_types, via_entry

P1 = [1, 1, 1, 1]


def _convs(model) -> int:
    return op_types(model).count("Conv")


def _sum(g: G, *branches: str) -> str:
    """A chain of Adds, as torch writes ``a + b + c``."""
    out = branches[0]
    for b in branches[1:]:
        out = g.node("Add", [out, b])
    return out


# -- the pure math ----------------------------------------------------------------------------------
def test_regroup_puts_each_channel_on_its_own_input():
    k = identity(6, 2)
    w = regroup(k, 3)  # 3 groups of 2 channels
    assert w.shape == (6, 2, 1, 1)
    assert [list(np.flatnonzero(w[m, :, 0, 0])) for m in range(6)] == [[0], [1], [0], [1], [0], [1]]


def test_merge_pads_a_smaller_kernel_at_its_offset():
    big = Kernel(np.zeros((2, 2, 3, 3)), np.zeros(2), 1, (1, 1), (1, 1), (1, 1), (1, 1))
    row = Kernel(np.ones((2, 2, 1, 3)), np.ones(2), 1, (0, 1), (0, 1), (1, 1), (1, 1))  # ACNet's 1x3
    m = merge([big, row])
    assert m.spatial == (3, 3) and m.begins == (1, 1) and m.ends == (1, 1)
    assert np.all(m.weight[:, :, 1, :] == 1) and not np.any(m.weight[:, :, 0]) and list(m.bias) == [1, 1]


# -- helper-built: what folds -----------------------------------------------------------------------
def _repvgg(g: G, x: str, c: int, identity_bn: bool = True, group: int = 1) -> str:
    a = g.bn(g.conv(x, c, c, 3, group=group, bias=False, pads=P1), c)
    b = g.bn(g.conv(x, c, c, 1, group=group, bias=False), c)
    return _sum(g, a, b, g.bn(x, c)) if identity_bn else _sum(g, a, b)


@pytest.mark.parametrize("group", [1, 2, 4])  # dense, grouped, depthwise (MobileOne's depthwise stage)
def test_repvgg_block(group):
    g = G(seed=group)
    x = g.input("x", [2, 4, 7, 6])
    model = g.model(g.node("Relu", [_repvgg(g, x, 4, group=group)]))
    folded, _ = folds(model, ["conv_bn", "conv_bn", "branch_sum"])
    assert op_types(folded) == ["Conv", "Relu"]


def test_a_branch_sum_reads_each_weight_once(monkeypatch):
    """The Conv that stays is read once by its merge (its kernel, its dtype: three reads before, each a
    read of a data file for a large weight): every weight of a RepVGG block is read once in the fold."""
    import collections

    import onnxfold.const_resolve as const_resolve

    reads: collections.Counter[str] = collections.Counter()
    real = const_resolve.Constants.value

    def counting(self, name, what):
        value = real(self, name, what)
        if np.ndim(value) == 4:
            reads[name] += 1
        return value

    monkeypatch.setattr(const_resolve.Constants, "value", counting)
    g = G(seed=1)
    x = g.input("x", [2, 4, 7, 6])
    model = g.model(g.node("Relu", [_repvgg(g, x, 4)]))
    folds(model, ["conv_bn", "conv_bn", "branch_sum"])
    assert len(reads) == 4 and set(reads.values()) == {1}, reads


def test_repvgg_stack_folds_every_block_to_one_conv():
    g = G(seed=3)
    y = g.input("x", [1, 4, 8, 8])
    for _ in range(3):
        y = g.node("Relu", [_repvgg(g, y, 4)])
    folded, report = fold_model(g.model(y))
    assert op_types(folded) == ["Conv", "Relu"] * 3
    assert report.bn_after == 0
    equivalent(g.model(y), folded)


def test_acnet_block():
    g = G(seed=4)
    x = g.input("x", [1, 3, 6, 9])
    a = g.bn(g.conv(x, 3, 5, 3, bias=False, pads=P1), 5)
    h = g.bn(g.node("Conv", [x, g.weight((5, 3, 1, 3))], kernel_shape=[1, 3], pads=[0, 1, 0, 1]), 5)
    v = g.bn(g.node("Conv", [x, g.weight((5, 3, 3, 1))], kernel_shape=[3, 1], pads=[1, 0, 1, 0]), 5)
    folded, _ = folds(g.model(_sum(g, a, h, v)), ["conv_bn"] * 3 + ["branch_sum"])
    assert _convs(folded) == 1 and len(folded.graph.node) == 1


def test_sum_node_plain_identity_and_mul_add_affine():
    g = G(seed=5)
    x = g.input("x", [1, 4, 5, 5])
    conv = g.conv(x, 4, 4, 3, pads=P1)
    scaled = g.arith("Add", g.arith("Mul", x, [1, 4, 1, 1]), [1, 4, 1, 1])
    folded, _ = folds(g.model(g.node("Sum", [conv, x, scaled])), ["branch_sum"])
    assert op_types(folded) == ["Conv"]


def test_dbb_like_block_with_average_pool_and_1x1_kxk():
    g = G(seed=6)
    x = g.input("x", [1, 4, 8, 8])
    kxk = g.bn(g.conv(x, 4, 4, 3, bias=False, pads=P1), 4)
    one = g.bn(g.conv(x, 4, 4, 1, bias=False), 4)
    pool = g.bn(g.node("AveragePool", [x], kernel_shape=[3, 3], pads=P1, count_include_pad=1), 4)
    seq = g.bn(g.conv(g.conv(x, 4, 4, 1, bias=False), 4, 4, 3, bias=False, pads=P1), 4)  # 1x1 without bias
    folded, _ = folds(g.model(_sum(g, kxk, one, pool, seq)), ["conv_bn"] * 3 + ["branch_sum"])
    assert op_types(folded) == ["Conv"]


def test_downsampling_block_with_strides_and_pool():
    g = G(seed=7)
    x = g.input("x", [1, 4, 9, 9])
    a = g.conv(x, 4, 6, 3, pads=P1, strides=[2, 2])
    b = g.conv(x, 4, 6, 1, strides=[2, 2])
    pool = g.node("AveragePool", [g.conv(x, 4, 6, 1)], kernel_shape=[3, 3], pads=P1, strides=[2, 2],
                  count_include_pad=1)  # the 1x1 before it has a bias: padded, that is not exact
    _declines(g.model(_sum(g, a, b, pool)), "pads the earlier 1x1 stage's output")
    g = G(seed=8)
    x = g.input("x", [1, 4, 9, 9])
    a = g.conv(x, 4, 6, 3, strides=[2, 2])
    pool = g.node("AveragePool", [g.conv(x, 4, 6, 1)], kernel_shape=[3, 3], strides=[2, 2])  # no padding: exact
    folded, _ = folds(g.model(_sum(g, a, pool)), ["branch_sum"])
    assert _convs(folded) == 1


def test_sequential_1x1_kxk_without_padding_keeps_the_bias():
    g = G(seed=9)
    x = g.input("x", [1, 3, 7, 7])
    seq = g.conv(g.conv(x, 3, 5, 1), 5, 4, 3)  # the 1x1 has a bias, the 3x3 no padding: exact
    folded, _ = folds(g.model(_sum(g, g.conv(x, 3, 4, 3), seq)), ["branch_sum"])
    assert _convs(folded) == 1


def test_dilated_and_1d():
    g = G(seed=10)
    x = g.input("x", [1, 4, 11, 11])
    a = g.conv(x, 4, 4, 3, pads=[2, 2, 2, 2], dilations=[2, 2])
    folds(g.model(_sum(g, a, g.conv(x, 4, 4, 1), x)), ["branch_sum"])
    g = G(seed=11)
    x = g.input("x", [2, 4, 12])
    a = g.bn(g.conv(x, 4, 4, 5, dims=1, pads=[2, 2]), 4)
    folded, _ = folds(g.model(_sum(g, a, g.conv(x, 4, 4, 3, dims=1, pads=[1, 1]), g.bn(x, 4))),
                      ["conv_bn", "branch_sum"])
    assert _convs(folded) == 1


def test_an_unrelated_operand_leaves_the_inner_sum_to_merge_alone():
    g = G(seed=12)
    x = g.input("x", [1, 4, 6, 6])
    r = g.input("r", [1, 4, 6, 6])
    inner = _sum(g, g.conv(x, 4, 4, 3, pads=P1), g.conv(x, 4, 4, 1))
    folded, _ = folds(g.model(g.node("Add", [inner, r])), ["branch_sum"])
    assert op_types(folded) == ["Conv", "Add"]


def test_residual_add_of_unrelated_convs_is_no_candidate():
    g = G(seed=13)
    x = g.input("x", [1, 4, 6, 6])
    y = g.node("Relu", [g.conv(x, 4, 4, 3, pads=P1)])
    nothing(g.model(g.node("Add", [g.conv(y, 4, 4, 3, pads=P1), g.conv(x, 4, 4, 1)])))


# -- helper-built: each sentence it declines with ---------------------------------------------------
def _declines(model, reason):
    return declines(model, reason, rule="branch_sum")


def test_declines_different_strides():
    g = G(seed=20)
    x = g.input("x", [1, 4, 4, 4])
    _declines(g.model(_sum(g, g.conv(x, 4, 4, 3), g.conv(x, 4, 4, 1, strides=[2, 2]))), "different strides")


def test_declines_different_dilations():
    g = G(seed=21)
    x = g.input("x", [1, 4, 8, 8])
    a, b = g.conv(x, 4, 4, 3, pads=P1), g.conv(x, 4, 4, 3, pads=[2, 2, 2, 2], dilations=[2, 2])
    _declines(g.model(_sum(g, a, b)), "different dilations")


def test_declines_different_groups():
    g = G(seed=22)
    x = g.input("x", [1, 4, 6, 6])
    _declines(g.model(_sum(g, g.conv(x, 4, 4, 3, pads=P1), g.conv(x, 4, 4, 3, pads=P1, group=2))),
              "different group counts")


def test_declines_auto_pad():
    g = G(seed=23)
    x = g.input("x", [1, 4, 6, 6])
    _declines(g.model(_sum(g, g.conv(x, 4, 4, 3, auto_pad="SAME_UPPER"), g.conv(x, 4, 4, 1))), "auto_pad=SAME_UPPER")


@pytest.mark.parametrize("case", ["broadcast", "offset"])
def test_declines_pads_that_do_not_line_up(case):
    g = G(seed=24)
    if case == "broadcast":  # a 3x3 without padding makes 1x1, broadcast against the 1x1 Conv's 3x3
        x = g.input("x", [1, 4, 3, 3])
        model = g.model(_sum(g, g.conv(x, 4, 4, 3), g.conv(x, 4, 4, 1)))
    else:  # dilation 2: a 2x2 with pads 1 sits half a tap off a 3x3 with pads 2
        x = g.input("x", [1, 4, 8, 8])
        a = g.conv(x, 4, 4, 3, pads=[2, 2, 2, 2], dilations=[2, 2])
        model = g.model(_sum(g, a, g.conv(x, 4, 4, 2, pads=P1, dilations=[2, 2])))
    _declines(model, "padding does not line up")


def test_declines_identity_where_channels_differ():
    g = G(seed=25)
    x = g.input("x", [1, 1, 5, 5])  # broadcast over the Conv's 4 channels
    _declines(g.model(_sum(g, g.conv(x, 1, 4, 3, pads=P1), x)), "as many output channels as input")


def test_declines_pool_that_does_not_count_its_padding():
    g = G(seed=26)
    x = g.input("x", [1, 4, 6, 6])
    pool = g.node("AveragePool", [x], kernel_shape=[3, 3], pads=P1)  # count_include_pad=0 by default
    _declines(g.model(_sum(g, g.conv(x, 4, 4, 3, pads=P1), pool)), "count_include_pad=0")


def test_declines_pool_with_ceil_mode_and_strides():
    g = G(seed=27)
    x = g.input("x", [1, 4, 9, 9])
    pool = g.node("AveragePool", [x], kernel_shape=[3, 3], pads=P1, strides=[2, 2], count_include_pad=1, ceil_mode=1)
    _declines(g.model(_sum(g, g.conv(x, 4, 4, 3, pads=P1, strides=[2, 2]), pool)), "ceil_mode=1")


def test_declines_padding_after_a_1x1_with_bias():
    g = G(seed=28)
    x = g.input("x", [1, 4, 6, 6])
    seq = g.conv(g.conv(x, 4, 4, 1), 4, 4, 3, pads=P1)
    _declines(g.model(_sum(g, g.conv(x, 4, 4, 3, pads=P1), seq)), "pads the earlier 1x1 stage's output")


def test_declines_a_stage_after_a_larger_kernel():
    g = G(seed=29)
    x = g.input("x", [1, 4, 8, 8])
    seq = g.conv(g.conv(x, 4, 4, 3, pads=P1), 4, 4, 3, pads=P1)
    _declines(g.model(_sum(g, g.conv(x, 4, 4, 3, pads=P1), seq)), "only a branch whose earlier stages are 1x1")


def test_declines_a_branch_output_with_another_reader():
    g = G(seed=30)
    x = g.input("x", [1, 4, 6, 6])
    a = g.conv(x, 4, 4, 3, pads=P1)
    _declines(g.model([_sum(g, a, g.conv(x, 4, 4, 1)), g.node("Relu", [a])]), "has 2 readers")


def test_declines_a_weight_that_is_not_constant():
    g = G(seed=31)
    x = g.input("x", [1, 4, 6, 6])
    w = g.input("w", [4, 4, 1, 1])
    b = g.node("Conv", [x, w], kernel_shape=[1, 1])
    _declines(g.model(_sum(g, g.conv(x, 4, 4, 3, pads=P1), b)), "'w' is a graph input, not a constant")


def test_disabled():
    g = G(seed=32)
    x = g.input("x", [1, 4, 6, 6])
    model = g.model(_sum(g, g.conv(x, 4, 4, 3, pads=P1), g.conv(x, 4, 4, 1)))
    folded, report = fold_model(model, disable=["branch_sum"])
    assert not report.folded and op_types(folded) == op_types(model)


# -- torch training-form blocks (skipped without torch) ----------------------------------------------
def _blocks():
    return pytest.importorskip("branch_blocks", reason="torch is not installed")


def _fold_export(module, shape, **kw):
    model = _blocks().export(module, shape, **kw)
    check_valid(model)
    folded, report = fold_model(model)
    equivalent(model, folded, report.summary(verbose=True))
    return model, folded, report


@pytest.mark.parametrize("dynamo", [False, True])
def test_torch_repvgg_block_matches_its_deploy_form(dynamo):
    bb = _blocks()
    block = bb.randomize_bn(bb.RepVGGBlock(8, 8), seed=1)
    model, folded, report = _fold_export(block, (1, 8, 10, 10), dynamo=dynamo)
    assert report.bn_after == 0 and _convs(folded) == 1 and _convs(model) == 2
    assert [f.rule for f in report.folded].count("branch_sum") == 1
    weight, bias = bb.repvgg_deploy(block)
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    inits = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    np.testing.assert_allclose(inits[conv.input[1]], weight, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(inits[conv.input[2]], bias, rtol=1e-5, atol=1e-6)


def _stack(bb, name):
    if name == "repvgg":
        return bb.torch.nn.Sequential(bb.RepVGGBlock(4, 8, stride=2), bb.RepVGGBlock(8, 8), bb.RepVGGBlock(8, 8))
    if name == "mobileone":
        return bb.torch.nn.Sequential(bb.MobileOneBlock(6, 6, 3, groups=6, branches=2),  # depthwise
                                      bb.MobileOneBlock(6, 10, 1, branches=2),  # pointwise, no identity
                                      bb.MobileOneBlock(10, 10, 1, branches=3))
    return bb.ACNetBlock(4, 6) if name == "acnet" else bb.DBBLike(6, groups=2)


@pytest.mark.parametrize("name,shape,blocks", [("repvgg", (1, 4, 12, 12), 3), ("mobileone", (1, 6, 9, 9), 3),
                                               ("acnet", (1, 4, 7, 9), 1), ("dbb", (1, 6, 8, 8), 1)])
def test_torch_blocks_reach_the_deploy_conv_count(name, shape, blocks):
    bb = _blocks()
    block = bb.randomize_bn(_stack(bb, name), seed=2)
    _, folded, report = _fold_export(block, shape)
    assert report.bn_after == 0, report.summary(verbose=True)
    assert _convs(folded) == blocks
    assert [f.rule for f in report.folded].count("branch_sum") == blocks


@pytest.mark.parametrize("entry", ["graphproto", "graphsurgeon", "cli"])
def test_entry_points(entry, tmp_path):
    if entry == "graphsurgeon":
        pytest.importorskip("onnx_graphsurgeon")
    g = G(seed=40)
    x = g.input("x", [1, 4, 6, 6])
    model = g.model(g.node("Relu", [_repvgg(g, x, 4)]))  # 8 nodes -> Conv, Relu
    via_entry(model, entry, 6, tmp_path)


def test_sub_of_branches_fastvit_repmixer():
    """FastViT's RepMixer: x + layer_scale * (mixer(x) - norm(x)), the mixer a depthwise Conv + BN and
    the norm BN(x): the Sub merges, the layer scale folds, the residual merges: one Conv."""
    g = G(seed=41)
    x = g.input("x", [1, 4, 6, 6])
    mixer = g.bn(g.conv(x, 4, 4, 3, group=4, bias=False, pads=P1), 4)
    diff = g.node("Sub", [mixer, g.bn(x, 4)])
    model = g.model(g.node("Add", [x, g.arith("Mul", diff, [4, 1, 1])]))
    folded, report = folds(model, ["conv_bn", "branch_sum", "conv_mul", "branch_sum"])
    assert op_types(folded) == ["Conv"]


def test_an_affine_add_is_a_stage_not_a_sum():
    """(conv3(x) + conv1(x)) + (x + c): the x + c is an affine branch of x; all three merge at once."""
    g = G(seed=42)
    x = g.input("x", [1, 4, 6, 6])
    inner = _sum(g, g.conv(x, 4, 4, 3, pads=P1), g.conv(x, 4, 4, 1))
    folded, _ = folds(g.model(g.node("Add", [inner, g.arith("Add", x, [1, 4, 1, 1])])), ["branch_sum"])
    assert op_types(folded) == ["Conv"]


def test_declines_branches_of_different_channel_counts():
    g = G(seed=43)
    x = g.input("x", [1, 4, 6, 6])  # a one-channel Conv broadcast against a four-channel one
    _declines(g.model(_sum(g, g.conv(x, 4, 4, 3, pads=P1), g.conv(x, 4, 1, 1))), "different numbers of channels")


def test_declines_a_1x1_kxk_of_different_groups():
    g = G(seed=44)
    x = g.input("x", [1, 4, 6, 6])
    seq = g.conv(g.conv(x, 4, 4, 1, bias=False, group=2), 4, 4, 3, pads=P1)
    _declines(g.model(_sum(g, g.conv(x, 4, 4, 3, pads=P1), seq)), "after a 1x1 stage of group 2")


def test_declines_a_dilated_pool():
    g = G(seed=45, opset=19)
    x = g.input("x", [1, 4, 8, 8])
    pool = g.node("AveragePool", [x], kernel_shape=[3, 3], pads=[2, 2, 2, 2], dilations=[2, 2], count_include_pad=1)
    _declines(g.model(_sum(g, g.conv(x, 4, 4, 3, pads=[2, 2, 2, 2], dilations=[2, 2]), pool)),
              "AveragePool has dilations")
