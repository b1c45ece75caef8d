"""The three ways in: ModelProto (new object), GraphProto (new object), graphsurgeon Graph (in place)."""

import numpy as np
import onnx
import pytest

from builders import conv_bn_model, count, run
from onnxfold import FoldReport, fold_conv_bn, fold_model, verify


def test_modelproto_returns_a_new_model_and_leaves_the_argument_untouched():
    model = conv_bn_model()
    before = model.SerializeToString()
    folded = fold_conv_bn(model)
    assert folded is not model
    assert model.SerializeToString() == before
    assert count(folded, "BatchNormalization") == 0
    assert verify(model, folded)


def test_graphproto_returns_a_new_graph():
    model = conv_bn_model()
    before = model.graph.SerializeToString()
    graph = fold_conv_bn(model.graph)
    assert isinstance(graph, onnx.GraphProto)
    assert model.graph.SerializeToString() == before
    assert [n.op_type for n in graph.node] == ["Conv"]


def test_fold_model_returns_the_report():
    model = conv_bn_model()
    folded, report = fold_model(model)
    assert isinstance(report, FoldReport)
    assert report.bn_before == 1 and report.bn_after == 0 and len(report.folded) == 1
    d = report.to_dict()
    assert d["folded"][0]["rule"] == "conv_bn" and d["folded"][0]["producer"] == "conv"
    assert "folded 1 of 1 BatchNormalization" in report.summary()


def test_graphsurgeon_graph_folds_in_place_and_chains():
    gs = pytest.importorskip("onnx_graphsurgeon")
    model = conv_bn_model(transpose=True, groups=2)
    graph = gs.import_onnx(model)
    conv = next(n for n in graph.nodes if n.op == "ConvTranspose")
    x = graph.inputs[0]
    out = graph.outputs[0]
    result = fold_conv_bn(graph)
    assert result is graph
    assert [n.op for n in graph.nodes] == ["ConvTranspose"]
    assert graph.nodes[0] is conv and conv.name == "conv"  # the same node object, its own name back
    assert conv.inputs[0] is x and conv.outputs[0] is out
    assert conv.inputs[1].name == "w_folded" and isinstance(conv.inputs[1], gs.Constant)
    folded = gs.export_onnx(graph.cleanup().toposort())
    onnx.checker.check_model(folded)
    assert verify(model, folded)


def test_graphsurgeon_graph_with_a_subgraph():
    from test_subgraphs import _if_model

    gs = pytest.importorskip("onnx_graphsurgeon")
    model = _if_model()
    graph = gs.import_onnx(model)
    fold_conv_bn(graph)
    folded = gs.export_onnx(graph.cleanup().toposort())
    assert count(folded, "BatchNormalization") == 0
    x = np.random.default_rng(0).uniform(-1, 1, (1, 4, 6, 6)).astype(np.float32)
    for cond in (True, False):
        feeds = {"cond": np.array(cond), "x": x}
        np.testing.assert_allclose(run(folded, feeds)[0], run(model, feeds)[0], rtol=1e-4, atol=1e-4)


def test_graphsurgeon_report_uses_the_graphs_own_names():
    from onnxfold._graphsurgeon import fold_graph

    gs = pytest.importorskip("onnx_graphsurgeon")
    graph = gs.import_onnx(conv_bn_model())
    _, report = fold_graph(graph)
    assert (report.folded[0].producer, report.folded[0].consumer) == ("conv", "bn")


def test_wrong_type_is_a_clear_error():
    with pytest.raises(TypeError, match="takes an onnx.ModelProto"):
        fold_conv_bn("model.onnx")


def test_graphsurgeon_graph_with_paddle_style_constant_nodes():
    gs = pytest.importorskip("onnx_graphsurgeon")
    model = conv_bn_model(constants_as_nodes=True)
    graph = gs.import_onnx(model)
    fold_conv_bn(graph)
    assert [n.op for n in graph.nodes] == ["Conv"]  # the Constant nodes the fold orphaned are gone
    folded = gs.export_onnx(graph.cleanup().toposort())
    onnx.checker.check_model(folded)
    assert verify(model, folded)
