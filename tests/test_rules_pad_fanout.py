"""<affine>_pad_conv (an affine -> Pad -> Conv, into the Conv's input channels) and the input-side fan-out
(an affine read by several Conv, Gemm and MatMul nodes folds into each of them).

Checks as in test_rules_input_side.py (rulekit.folds / rulekit.declines): exact rules, onnx.checker,
equivalence in onnxruntime (ORT_DISABLE_ALL, k = 1e-4 float32 / 1e-2 float16), one test per decline
sentence; torch exports (legacy and dynamo) of a speechbrain-style Conv1d with reflect padding after BN.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxfold import fold_model, verify
from rulekit import G, declines, equivalent, folds, op_types, via_entry

DTYPES = [np.float32, np.float16]
AFFINES = ["bn", "Mul", "Add", "Sub", "Div"]


def _affine(g: G, kind: str, x: str, channels: int, rank: int) -> str:
    if kind == "bn":
        return g.bn(x, channels)
    return g.arith(kind, x, [channels] + [1] * (rank - 2), const_left=kind == "Sub")


def _pad(g: G, x: str, pads, mode: str | None = "reflect", value=None, axes=None) -> str:
    """A Pad in the model's opset's form: attributes before 11, inputs after (axes from 18)."""
    attrs = {} if mode is None else {"mode": mode}
    if g.opset < 11:
        if value is not None:
            attrs["value"] = float(value)
        return g.node("Pad", [x], **{"paddings" if g.opset < 2 else "pads": list(pads)}, **attrs)
    inputs = [x, g.ints(list(pads))]
    if value is not None or axes is not None:
        inputs.append(g.init(np.asarray(value if value is not None else 0, g.dtype), "cv") if value is not None else "")
    if axes is not None:
        inputs.append(g.ints(list(axes), "axes"))
    return g.node("Pad", inputs, **attrs)


# -- item 5: through a Pad ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", AFFINES)
@pytest.mark.parametrize("mode", ["reflect", "edge", "wrap"])
def test_affine_through_reflect_edge_wrap_pad(dtype, kind, mode):
    g = G(dtype=dtype, opset=19)
    x = g.input("x", [2, 4, 7, 7])
    h = _pad(g, _affine(g, kind, x, 4, 4), [0, 0, 1, 2, 0, 0, 2, 1], mode)
    folded, _ = folds(g.model(g.conv(h, 4, 6, group=2)), [f"{kind.lower()}_pad_conv"])
    assert op_types(folded) == ["Pad", "Conv"]


@pytest.mark.parametrize("opset", [10, 11, 13, 18])
def test_pad_versions(opset):
    """Pad-2 (pads attribute, in effect at opsets 2-10), Pad-11/13 (pads input), Pad-18 (axes input):
    BN -> reflect Pad -> Conv1d, as speechbrain's Conv1d pads."""
    g = G(opset=opset)
    x = g.input("x", [1, 4, 9])
    h = g.bn(x, 4)
    if opset < 11:
        h = g.node("Pad", [h], pads=[0, 0, 1, 0, 0, 2], mode="reflect")
    elif opset < 18:
        h = _pad(g, h, [0, 0, 1, 0, 0, 2])
    else:
        h = _pad(g, h, [1, 2], axes=[-1])
    folds(g.model(g.conv(h, 4, 6, k=3, dims=1)), ["bn_pad_conv"])


@pytest.mark.parametrize("pads,folded", [([0, 0, 2, 0, 0, 1], True), ([0, 1, 0, 0, 0, 0], False)])
def test_pad1_paddings_attribute(pads, folded):
    """Pad-1 names its amounts ``paddings`` (read as the spec says: a padded channel axis declines).
    onnxruntime runs no opset-1 model, so this checks the rule's reading only."""
    g = G(opset=1)
    x = g.input("x", [1, 4, 9])
    stats = [g.init(g.values([4], 0.5, 1.5, signed=False), n) for n in ("gamma", "beta", "mean", "var")]
    h = g.node("BatchNormalization", [x, *stats], is_test=1, consumed_inputs=[0, 0, 0, 1, 1])
    h = g.node("Pad", [h], mode="edge", paddings=pads)
    y = g.node("Conv", [h, g.weight((6, 4 + sum(pads[1::3]), 3))], kernel_shape=[3])
    graph = onnx.helper.make_graph(g.nodes, "g", g.inputs, [onnx.helper.make_tensor_value_info(y, 1, None)], g.inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 1)])
    model.ir_version = 3
    _, report = fold_model(model)
    assert [f.rule for f in report.folded] == (["bn_pad_conv"] if folded else []), report.summary(verbose=True)
    if not folded:
        assert "the Pad changes the channel axis 1" in report.declined[0].reason


@pytest.mark.parametrize("kind", ["Mul", "Div"])
@pytest.mark.parametrize("value", [None, 0.0])
def test_pure_scale_through_zero_pad(kind, value):
    g = G(opset=17)
    x = g.input("x", [1, 4, 6, 6])
    h = _pad(g, _affine(g, kind, x, 4, 4), [0, 0, 1, 1, 0, 0, 1, 1], mode="constant", value=value)
    folds(g.model(g.conv(h, 4, 6)), [f"{kind.lower()}_pad_conv"])


@pytest.mark.parametrize("kind", AFFINES)
def test_any_affine_through_zero_amount_or_crop_pad(kind):
    """Constant padding that adds nothing (all amounts 0, or a crop) commutes with a shift too."""
    for pads in ([0] * 8, [0, 0, -1, 0, 0, 0, 0, -1]):
        g = G(opset=17)
        x = g.input("x", [1, 4, 6, 6])
        h = _pad(g, _affine(g, kind, x, 4, 4), pads, mode="constant", value=0.5)
        folds(g.model(g.conv(h, 4, 6)), [f"{kind.lower()}_pad_conv"])


@pytest.mark.parametrize("entry", ["graphproto", "graphsurgeon", "cli"])
def test_pad_entry_points(entry, tmp_path):
    g = G(opset=17)
    x = g.input("x", [1, 4, 9])
    via_entry(g.model(g.conv(_pad(g, g.bn(x, 4), [0, 0, 1, 0, 0, 1]), 4, 6, dims=1)), entry, 1, tmp_path)


def test_pad_declines():
    """One test per sentence: the channel axis padded, constant fill value, zero padding with a shift,
    pads not a constant, mode 'wrap' before Pad-19, the Conv's own padding with a shift."""
    g = G(opset=17)
    x = g.input("x", [1, 4, 6, 6])
    h = _pad(g, g.arith("Mul", x, [4, 1, 1]), [0, 1, 0, 0, 0, 1, 0, 0], mode="edge")
    declines(g.model(g.conv(h, 6, 6)), "the Pad changes the channel axis 1", "mul_pad_conv")

    g = G(opset=17)
    x = g.input("x", [1, 4, 6, 6])
    h = _pad(g, g.arith("Mul", x, [4, 1, 1]), [0, 0, 1, 1, 0, 0, 1, 1], mode="constant", value=0.5)
    declines(g.model(g.conv(h, 4, 6)), "the Pad fills with the constant 0.5", "mul_pad_conv")

    g = G(opset=17)
    x = g.input("x", [1, 4, 6, 6])
    h = _pad(g, g.bn(x, 4), [0, 0, 1, 1, 0, 0, 1, 1], mode=None)
    declines(g.model(g.conv(h, 4, 6)), "the Pad pads with zeros after the affine, so its shift", "bn_pad_conv")

    g = G(opset=17)
    x = g.input("x", [1, 4, 6, 6])
    amounts = g.node("Concat", [g.ints([0, 0, 1, 1]), g.node("Shape", [g.input("y", [0, 0, 1, 1])])], axis=0)
    h = g.node("Pad", [g.bn(x, 4), amounts], mode="reflect")
    declines(g.model(g.conv(h, 4, 6)), "Pad pads", "bn_pad_conv")

    g = G(opset=18)
    x = g.input("x", [1, 4, 6, 6])
    h = g.node("Pad", [g.bn(x, 4), g.ints([0, 0, 1, 1, 0, 0, 1, 1])], mode="wrap")
    report = _declined_unchecked(g, g.conv(h, 4, 6))  # not a valid Pad-18: onnxruntime refuses it too
    assert "the Pad has mode 'wrap', which Pad-18 does not define" in report, report

    g = G(opset=17)
    x = g.input("x", [1, 4, 6, 6])
    h = _pad(g, g.bn(x, 4), [0, 0, 1, 1, 0, 0, 1, 1])
    declines(g.model(g.conv(h, 4, 6, pads=[1] * 4)), "zero padding after BatchNormalization", "bn_pad_conv")


def _declined_unchecked(g: G, y: str) -> str:
    graph = onnx.helper.make_graph(g.nodes, "g", g.inputs, [onnx.helper.make_tensor_value_info(y, 1, None)], g.inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", g.opset)])
    folded, report = fold_model(model)
    assert not report.folded and op_types(folded) == op_types(model)
    return " | ".join(d.reason for d in report.declined)


def test_pad_output_read_twice():
    g = G(opset=17)
    x = g.input("x", [1, 4, 6, 6])
    h = _pad(g, g.bn(x, 4), [0, 0, 1, 1, 0, 0, 1, 1])
    declines(g.model([g.conv(h, 4, 6), g.node("Relu", [h])]), "Pad output", "bn_pad_conv")


def _ecapa_block():
    """speechbrain.nnet.CNN.Conv1d with padding="same", padding_mode="reflect" (F.pad(x, (p, p), "reflect"),
    then an unpadded conv) after a BatchNorm1d with trained-looking statistics."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    class Conv1d(torch.nn.Module):
        def __init__(self, cin, cout, k, dilation=1):
            super().__init__()
            self.pad = dilation * (k - 1) // 2
            self.conv = torch.nn.Conv1d(cin, cout, k, dilation=dilation)

        def forward(self, x):
            return self.conv(F.pad(x, (self.pad, self.pad), mode="reflect"))

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.BatchNorm1d(8)
            self.conv = Conv1d(8, 6, 3, dilation=2)

        def forward(self, x):
            return self.conv(self.norm(x))

    torch.manual_seed(0)
    net = Block().eval()
    with torch.no_grad():
        net.norm.running_mean.uniform_(-1, 1)
        net.norm.running_var.uniform_(0.5, 2)
        net.norm.weight.uniform_(0.5, 1.5)
        net.norm.bias.uniform_(-0.5, 0.5)
    return torch, net


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_speechbrain_reflect_conv1d_after_bn(dynamo, tmp_path):
    torch, net = _ecapa_block()
    x = torch.randn(1, 8, 20)
    path = tmp_path / "ecapa.onnx"
    if dynamo:
        program = torch.onnx.export(net, (x,), dynamo=True, optimize=False, verbose=False)
        program.save(str(path))
        expected = net(x).detach().numpy()
        _, in_place = fold_model(program)  # the ONNXProgram folded in place (onnx_ir), then run by torch
        assert [f.rule for f in in_place.folded] == ["bn_pad_conv"]
        np.testing.assert_allclose(program(x)[0].numpy(), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    else:
        torch.onnx.export(net, (x,), str(path), dynamo=False, do_constant_folding=False)
    model = onnx.load(str(path))
    folded, report = fold_model(model)
    assert [f.rule for f in report.folded] == ["bn_pad_conv"], report.summary(verbose=True)
    assert report.bn_before == 1 and report.bn_after == 0
    equivalent(model, folded)
    assert verify(model, folded, folds=report.folded)


# -- item 6: fan-out ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", AFFINES)
def test_affine_read_by_five_matmul_heads(dtype, kind):
    """A converter's BatchNormalization as Mul/Add, read by 5 MatMul heads (rank 2: each becomes a Gemm
    where there is a shift), two of them sharing one weight: each head gets its own copy, except after
    an Add, whose fold leaves every weight as it is (the two heads still share theirs)."""
    g = G(dtype=dtype)
    x = g.input("x", [3, 4])
    h = _affine(g, kind, x, 4, 2)
    shared = g.weight((4, 5))
    heads = [g.node("MatMul", [h, shared]), g.node("MatMul", [h, shared])]
    heads += [g.matmul(h, 4, 3) for _ in range(3)]
    folded, report = folds(g.model(heads), [f"{kind.lower()}_matmul"])
    assert kind.upper() not in [t.upper() for t in op_types(folded)] and len(op_types(folded)) == 5
    weights = [n.input[1] for n in folded.graph.node]
    if kind == "Add":  # a pure shift goes into the biases alone
        assert weights.count(shared) == 2 and len(set(weights)) == 4
    else:
        assert len(set(weights)) == 5 and shared not in weights  # the shared weight copied per reader


def test_bn_split_into_mul_add_then_heads():
    """Mul -> Add (a BatchNormalization split by a converter) -> 5 rank-2 MatMuls: both fold, in two folds."""
    g = G()
    x = g.input("x", [3, 4])
    h = g.arith("Add", g.arith("Mul", x, [4]), [4])
    folded, _ = folds(g.model([g.matmul(h, 4, 2) for _ in range(5)]), ["add_matmul", "mul_gemm"])
    assert op_types(folded) == ["Gemm"] * 5


def test_fanout_mixed_readers():
    """One BatchNormalization read by two Convs (one grouped) and a Conv whose weight another node also
    reads (the shared weight stays for it)."""
    g = G()
    x = g.input("x", [1, 4, 6, 6])
    h = g.bn(x, 4)
    w = g.weight((3, 4, 1, 1))
    outs = [g.conv(h, 4, 6), g.conv(h, 4, 4, k=1, group=2), g.node("Conv", [h, w], kernel_shape=[1, 1]),
            g.node("Conv", [x, w], kernel_shape=[1, 1])]
    folded, _ = folds(g.model(outs), ["bn_conv"])
    assert w in [n.input[1] for n in folded.graph.node]


@pytest.mark.parametrize("entry", ["graphproto", "graphsurgeon", "cli"])
def test_fanout_entry_points(entry, tmp_path):
    g = G()
    x = g.input("x", [3, 4])
    h = g.bn(x, 4)
    via_entry(g.model([g.gemm(h, 4, 6, trans_b=1, c=(6,)), g.matmul(h, 4, 3)]), entry, 1, tmp_path)


def test_fanout_declines_naming_the_reader():
    """A reader that is no Conv, Gemm or MatMul; one whose own fold declines (a padded Conv and a shift);
    a reader that reads the affine as its weight; readers with different dtypes are not built here (the
    model would not type-check)."""
    g = G()
    x = g.input("x", [1, 4, 5, 5])
    h = g.arith("Mul", x, [4, 1, 1])
    report = declines(g.model([g.conv(h, 4, 6), g.node("Relu", [h])]), "has 2 readers", "mul_conv")
    reason = report.declined[0].reason
    assert "the Relu 'relu" in reason and "is not a Conv, Gemm or MatMul" in reason

    g = G()
    x = g.input("x", [1, 4, 5, 5])
    h = g.bn(x, 4)
    report = declines(g.model([g.conv(h, 4, 6), g.conv(h, 4, 2, pads=[1] * 4)]), "has 2 readers", "bn_conv")
    assert "the Conv 'conv" in report.declined[0].reason and "zero padding after" in report.declined[0].reason
    assert len(report.declined) == 1  # one match for the whole fan-out, not one per reader

    g = G()
    x = g.input("x", [3, 4])
    h = g.arith("Mul", x, [4])
    m = g.node("MatMul", [g.input("z", [3, 3]), h])
    declines(g.model([g.matmul(h, 4, 2), m]), "reads the value as a weight", "mul_matmul")


def test_fanout_with_a_reader_in_a_subgraph():
    """A reader the match does not cover (in an If branch): the driver's check names the count."""
    g = G()
    x = g.input("x", [1, 4, 5, 5])
    h = g.arith("Mul", x, [4, 1, 1])
    a, b = g.conv(h, 4, 6), g.conv(h, 4, 6)
    then = onnx.helper.make_graph([onnx.helper.make_node("Relu", [h], ["t"])], "then", [],
                                  [onnx.helper.make_tensor_value_info("t", 1, None)])
    other = onnx.helper.make_graph([onnx.helper.make_node("Neg", [h], ["e"])], "else", [],
                                   [onnx.helper.make_tensor_value_info("e", 1, None)])
    cond = g.input("cond", [], np.float32)
    g.inputs[-1] = onnx.helper.make_tensor_value_info(cond, onnx.TensorProto.BOOL, [])
    g.nodes.append(onnx.helper.make_node("If", [cond], ["z"], then_branch=then, else_branch=other))
    graph = onnx.helper.make_graph(g.nodes, "g", g.inputs, [onnx.helper.make_tensor_value_info(n, 1, None)
                                                            for n in (a, b, "z")], g.inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    folded, report = fold_model(model)
    assert not report.folded
    assert "has 4 readers: the 2 the fold covers (Conv)" in report.declined[0].reason, report.summary(verbose=True)


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_torch_bn_read_by_five_linear_heads(dynamo, tmp_path):
    """BatchNorm1d on the input, read by 5 Linear heads (a multi-task head): one fold into all five."""
    torch = pytest.importorskip("torch")

    class Heads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.BatchNorm1d(16)
            self.heads = torch.nn.ModuleList(torch.nn.Linear(16, 3 + k) for k in range(5))

        def forward(self, x):
            h = self.norm(x)
            return torch.cat([head(h) for head in self.heads], dim=1)

    torch.manual_seed(0)
    net = Heads().eval()
    with torch.no_grad():
        net.norm.running_mean.uniform_(-1, 1)
        net.norm.running_var.uniform_(0.5, 2)
        net.norm.weight.uniform_(0.5, 1.5)
        net.norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(4, 16)
    path = tmp_path / "heads.onnx"
    if dynamo:
        torch.onnx.export(net, (x,), dynamo=True, optimize=False, verbose=False).save(str(path))
    else:
        torch.onnx.export(net, (x,), str(path), dynamo=False, do_constant_folding=False)
    model = onnx.load(str(path))
    folded, report = fold_model(model)
    assert [f.rule for f in report.folded] == ["bn_gemm"], report.summary(verbose=True)
    assert [n.op_type for n in folded.graph.node if n.op_type != "Constant"] == ["Gemm"] * 5 + ["Concat"]
    assert report.bn_before == 1 and report.bn_after == 0 and not report.declined
    equivalent(model, folded)
    assert verify(model, folded, folds=report.folded)
