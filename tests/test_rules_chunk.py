"""torch.chunk through split_affine (Slice nodes, the legacy exporter's form; SplitToSequence -> SequenceAt,
the dynamo exporter's) and a nested Concat through concat_<consumer>.

Checks as in test_rules_concat_split.py (rulekit.folds / rulekit.declines): exact rules, onnx.checker,
equivalence in onnxruntime (ORT_DISABLE_ALL, k = 1e-4 float32 / 1e-2 float16), one test per decline
sentence; torch.chunk exported by both exporters.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxfold import fold_model, verify
from rulekit import G, declines, equivalent, folds, nothing, op_types, via_entry

DTYPES = [np.float32, np.float16]
INT64_MAX = np.iinfo(np.int64).max


def _slice(g: G, x: str, start: int, end: int, axis: int = 1, step: int | None = None) -> str:
    if g.opset < 10:
        return g.node("Slice", [x], starts=[start], ends=[end], axes=[axis])
    inputs = [x, g.ints([start]), g.ints([end]), g.ints([axis])]
    if step is not None:
        inputs.append(g.ints([step]))
    return g.node("Slice", inputs)


def _affines(g: G, parts, sizes):
    """BN, Mul, c - x on the first three parts; the rest stay."""
    outs = [g.bn(parts[0], sizes[0]), g.arith("Mul", parts[1], [sizes[1], 1, 1])]
    if len(parts) > 2:
        outs.append(g.arith("Sub", parts[2], [1, sizes[2], 1, 1], const_left=True))
    return outs + list(parts[3:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opset", [9, 13, 17])
def test_slices_of_a_conv(dtype, opset):
    """Slices covering the channels (the last to INT64_MAX, one with a negative start and axis), a Shape
    reading the Conv too (as the legacy exporter writes it)."""
    g = G(dtype=dtype, opset=opset)
    x = g.input("x", [1, 3, 5, 5])
    c = g.conv(x, 3, 7, pads=[1] * 4)
    parts = [_slice(g, c, 0, 2), _slice(g, c, -5, 5, axis=-3), _slice(g, c, 5, INT64_MAX)]
    if opset >= 10:  # the legacy exporter's form: an end computed from Shape of the Conv's output
        channels = g.node("Gather", [g.node("Shape", [c]), g.ints([1])], axis=0)
        parts.append(g.node("Slice", [c, g.ints([7]), channels, g.ints([1])]))  # empty: no channels
    folded, _ = folds(g.model(_affines(g, parts, [2, 3, 2])), ["split_affine"])
    assert op_types(folded).count("Slice") == len(parts) and "BatchNormalization" not in op_types(folded)


def test_slices_with_a_part_left_alone_and_a_spatial_crop():
    """A part without an affine keeps the identity; a Slice that also crops the height still cuts
    channels [lo, hi) (the affine commutes with the crop)."""
    g = G(opset=17)
    x = g.input("x", [1, 3, 5, 5])
    c = g.conv(x, 3, 6, pads=[1] * 4)
    a = g.node("Slice", [c, g.ints([0, 1]), g.ints([4, 4]), g.ints([1, 2]), g.ints([1, 2])])
    b = _slice(g, c, 4, 6)
    folds(g.model([g.bn(a, 4), b]), ["split_affine"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split,sizes,positions", [
    (np.int64(3), [3, 3, 1], [0, 1, 2]),
    (np.asarray([2, 4, 1], np.int64), [2, 4, 1], [0, -2, -1]),
    (None, [1] * 7, [0, 1, 2, 3, 4, 5, 6]),
], ids=["scalar", "sizes", "ones"])
def test_split_to_sequence(dtype, split, sizes, positions):
    g = G(dtype=dtype, opset=17)
    x = g.input("x", [1, 3, 5, 5])
    c = g.conv(x, 3, 7, pads=[1] * 4)
    seq = g.node("SplitToSequence", [c] + ([g.init(split, "split")] if split is not None else []), axis=1)
    parts = [g.node("SequenceAt", [seq, g.init(np.int64(p), "pos")]) for p in positions]
    folded, _ = folds(g.model(_affines(g, parts, [sizes[p] for p in positions])), ["split_affine"])
    assert op_types(folded).count("SequenceAt") == len(positions) and "BatchNormalization" not in op_types(folded)


@pytest.mark.parametrize("entry", ["graphproto", "graphsurgeon", "cli"])
@pytest.mark.parametrize("form", ["slice", "sequence"])
def test_chunk_entry_points(entry, form, tmp_path):
    g = G(opset=17)
    x = g.input("x", [1, 3, 5, 5])
    c = g.conv(x, 3, 6, pads=[1] * 4)
    if form == "slice":
        parts = [_slice(g, c, 0, 3), _slice(g, c, 3, 6)]
    else:
        seq = g.node("SplitToSequence", [c, g.init(np.int64(3), "split")], axis=1)
        parts = [g.node("SequenceAt", [seq, g.init(np.int64(p), "pos")]) for p in (0, 1)]
    via_entry(g.model([g.bn(parts[0], 3), g.bn(parts[1], 3)]), entry, 2, tmp_path)


def test_chunk_declines():
    """Overlapping parts, a step along the channels, SplitToSequence along another axis, keepdims=0
    without split, the same position read twice."""
    g = G(opset=17)
    x = g.input("x", [1, 3, 5, 5])
    c = g.conv(x, 3, 6, pads=[1] * 4)
    declines(g.model([g.bn(_slice(g, c, 0, 4), 4), _slice(g, c, 2, 6)]), "Slice parts 0 and 1 share channels",
             "split_affine")

    g = G(opset=17)
    x = g.input("x", [1, 3, 5, 5])
    c = g.conv(x, 3, 6, pads=[1] * 4)
    declines(g.model([g.bn(_slice(g, c, 0, 6, step=2), 3)]), "the Slice steps by 2 along the channel axis 1",
             "split_affine")

    g = G(opset=17)
    x = g.input("x", [1, 3, 6, 6])
    c = g.conv(x, 3, 4, pads=[1] * 4)
    seq = g.node("SplitToSequence", [c, g.init(np.int64(3), "split")], axis=2)
    parts = [g.node("SequenceAt", [seq, g.init(np.int64(p), "pos")]) for p in (0, 1)]
    declines(g.model([g.bn(parts[0], 4), parts[1]]), "SplitToSequence works along axis 2, not the channel axis 1",
             "split_affine")

    g = G(opset=17)
    x = g.input("x", [1, 3, 5, 5])
    c = g.conv(x, 3, 2, pads=[1] * 4)
    seq = g.node("SplitToSequence", [c], axis=1, keepdims=0)
    parts = [g.node("SequenceAt", [seq, g.init(np.int64(p), "pos")]) for p in (0, 1)]
    declines(g.model([g.arith("Mul", parts[0], [1, 1]), parts[1]]), "without split and with keepdims=0",
             "split_affine")

    g = G(opset=17)
    x = g.input("x", [1, 3, 5, 5])
    c = g.conv(x, 3, 4, pads=[1] * 4)
    seq = g.node("SplitToSequence", [c, g.init(np.int64(2), "split")], axis=1)
    parts = [g.node("SequenceAt", [seq, g.init(np.int64(p), "pos")]) for p in (0, -2)]
    declines(g.model([g.bn(parts[0], 2), parts[1]]), "SplitToSequence parts 0 and 1 share channels", "split_affine")


def test_chunk_with_another_reader_is_no_candidate():
    """A Relu beside the Slices, or a ConcatFromSequence beside the SequenceAt nodes: the values the fold
    would change are read elsewhere, so the cut is not followed (the BatchNormalization is left)."""
    g = G(opset=17)
    x = g.input("x", [1, 3, 5, 5])
    c = g.conv(x, 3, 6, pads=[1] * 4)
    nothing(g.model([g.bn(_slice(g, c, 0, 3), 3), _slice(g, c, 3, 6), g.node("Relu", [c])]))
    g = G(opset=17)
    x = g.input("x", [1, 3, 5, 5])
    c = g.conv(x, 3, 6, pads=[1] * 4)
    seq = g.node("SplitToSequence", [c, g.init(np.int64(3), "split")], axis=1)
    part = g.node("SequenceAt", [seq, g.init(np.int64(0), "pos")])
    nothing(g.model([g.bn(part, 3), g.node("ConcatFromSequence", [seq], axis=1)]))


def _chunk_net():
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        """torch.chunk of a Conv's output, BatchNorm on each chunk (GhostNet / CSP-style)."""

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.b1, self.b2 = torch.nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4)

        def forward(self, x):
            a, b = torch.chunk(self.conv(x), 2, dim=1)
            return torch.relu(self.b1(a)) * self.b2(b)

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        for bn in (net.b1, net.b2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return torch, net


def test_slice_end_from_the_channel_count_of_a_dynamic_shape():
    """Gather(Shape(c), 1) is the channel count, known while the batch and height are not (the legacy
    exporter's chunk with dynamic axes); Gather(Shape(c), 0) is the batch: not a constant, declined."""
    g = G(opset=17)
    x = g.input("x", ["N", 3, "H", 5])
    c = g.conv(x, 3, 6, pads=[1] * 4)
    channels = g.node("Gather", [g.node("Shape", [c]), g.init(np.int64(-3), "i")], axis=0)
    half = g.node("Div", [channels, g.init(np.int64(2), "two")])
    a = g.node("Slice", [c, g.ints([0]), g.node("Unsqueeze", [half, g.ints([0])]), g.ints([1])])
    b = g.node("Slice", [c, g.ints([3]), g.ints([6]), g.ints([1])])
    folds(g.model([g.bn(a, 3), g.bn(b, 3)]), ["split_affine"])

    g = G(opset=17)
    x = g.input("x", ["N", 3, 5, 5])
    c = g.conv(x, 3, 6, pads=[1] * 4)
    batch = g.node("Gather", [g.node("Shape", [c]), g.ints([0])], axis=0)
    a = g.node("Slice", [c, g.ints([0]), batch, g.ints([1])])
    declines(g.model([g.arith("Mul", a, []), g.node("Slice", [c, g.ints([1]), g.ints([6]), g.ints([1])])]),
             "is computed by a Gather node, not a constant", "split_affine")


@pytest.mark.parametrize("dynamo,dynamic", [(False, False), (False, True), (True, False)],
                         ids=["legacy", "legacy-dynamic-axes", "dynamo"])
def test_torch_chunk(dynamo, dynamic, tmp_path):
    torch, net = _chunk_net()
    x = torch.randn(1, 3, 8, 8)
    path = tmp_path / "chunk.onnx"
    if dynamic:
        torch.onnx.export(net, (x,), str(path), dynamo=False, do_constant_folding=False, input_names=["x"],
                          dynamic_axes={"x": {0: "N", 2: "H", 3: "W"}})
    elif dynamo:
        program = torch.onnx.export(net, (x,), dynamo=True, optimize=False, verbose=False)
        program.save(str(path))
        expected = net(x).detach().numpy()
        _, in_place = fold_model(program)  # the ONNXProgram folded in place (onnx_ir), then run by torch
        assert [f.rule for f in in_place.folded] == ["split_affine"]
        np.testing.assert_allclose(program(x)[0].numpy(), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    else:
        torch.onnx.export(net, (x,), str(path), dynamo=False, do_constant_folding=False)
    model = onnx.load(str(path))
    assert ("SplitToSequence" if dynamo else "Slice") in op_types(model)
    assert dynamic == (model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N")
    folded, report = fold_model(model)
    assert [f.rule for f in report.folded] == ["split_affine"], report.summary(verbose=True)
    assert report.bn_before == 2 and report.bn_after == 0
    equivalent(model, folded)
    assert verify(model, folded, folds=report.folded)


# -- nested Concat ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("consumer", ["bn", "Mul", "Add"])
def test_nested_concat(dtype, consumer):
    """Concat(Concat(conv, Concat(conv, conv)), conv) -> affine: four producers in channel order."""
    g = G(dtype=dtype)
    x = g.input("x", [1, 4, 6, 6])
    convs = [g.conv(x, 4, c, k=2 * i + 1, pads=[i] * 4) for i, c in enumerate((2, 3, 1, 2))]
    inner = g.node("Concat", [convs[0], g.node("Concat", convs[1:3], axis=1)], axis=-3)
    cc = g.node("Concat", [inner, convs[3]], axis=1)
    y = g.bn(cc, 8) if consumer == "bn" else g.arith(consumer, cc, [8, 1, 1])
    folded, _ = folds(g.model(y), [f"concat_{consumer.lower()}"])
    assert op_types(folded).count("Concat") == 3 and len(op_types(folded)) == 7


@pytest.mark.parametrize("entry", ["graphproto", "graphsurgeon", "cli"])
def test_nested_concat_entry_points(entry, tmp_path):
    g = G()
    x = g.input("x", [1, 4, 6, 6])
    inner = g.node("Concat", [g.conv(x, 4, 2, pads=[1] * 4), g.conv(x, 4, 3, pads=[1] * 4)], axis=1)
    via_entry(g.model(g.bn(g.node("Concat", [g.conv(x, 4, 1, pads=[1] * 4), inner], axis=1), 6)), entry, 1,
              tmp_path)


def test_nested_concat_declines():
    """An inner Concat along another axis; an inner Concat read twice; a leaf that is no producer (left,
    with the reason)."""
    g = G()
    x = g.input("x", [1, 4, 6, 6])
    inner = g.node("Concat", [g.conv(x, 4, 2, pads=[1] * 4), g.conv(x, 4, 2, pads=[1] * 4)], axis=2)
    cc = g.node("Concat", [inner, g.conv(g.input("z", [1, 4, 12, 6]), 4, 2, pads=[1] * 4)], axis=1)
    declines(g.model(g.bn(cc, 4)), "Concat works along axis 2, not the channel axis 1", "concat_bn")

    g = G()
    x = g.input("x", [1, 4, 6, 6])
    inner = g.node("Concat", [g.conv(x, 4, 2, pads=[1] * 4), g.conv(x, 4, 3, pads=[1] * 4)], axis=1)
    cc = g.node("Concat", [inner, g.conv(x, 4, 1, pads=[1] * 4)], axis=1)
    declines(g.model([g.bn(cc, 6), g.node("Relu", [inner])]), "Concat output", "concat_bn")

    g = G()
    x = g.input("x", [1, 4, 6, 6])
    inner = g.node("Concat", [g.conv(x, 4, 2, pads=[1] * 4), g.node("Relu", [x])], axis=1)
    report = nothing(g.model(g.bn(g.node("Concat", [inner, g.conv(x, 4, 1, pads=[1] * 4)], axis=1), 7)))
    assert any("input 1 is made by a Relu node" in left.reason for left in report.left), report.summary()
