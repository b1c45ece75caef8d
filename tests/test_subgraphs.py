"""Conv -> BatchNormalization inside If, Loop and Scan bodies, with weights from the outer scope."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import bn_stats, count
from onnxfold import fold_model, verify

F = TensorProto.FLOAT


def _conv_bn_body(rng, x, out, prefix, channels=4, outer_weight=None):
    """Nodes and initializers of x -> Conv(pads 1) -> BN -> out; the weight may live outside."""
    inits = []
    w = outer_weight or f"{prefix}w"
    if outer_weight is None:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.5, (channels, channels, 3, 3)).astype(np.float32), w))
    stats = [f"{prefix}{n}" for n in ("g", "b", "m", "v")]
    inits += [numpy_helper.from_array(a, n) for a, n in zip(bn_stats(rng, channels), stats)]
    nodes = [
        helper.make_node("Conv", [x, w], [f"{prefix}c"], pads=[1, 1, 1, 1], name=f"{prefix}conv"),
        helper.make_node("BatchNormalization", [f"{prefix}c", *stats], [out], epsilon=1e-3, name=f"{prefix}bn"),
    ]
    return nodes, inits


def _model(graph, ir=8):
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = ir
    return m


def _if_model(ir=8):
    rng = np.random.default_rng(0)
    w_outer = numpy_helper.from_array(rng.normal(0, 0.5, (4, 4, 3, 3)).astype(np.float32), "w_outer")
    tn, ti = _conv_bn_body(rng, "x", "t", "then_", outer_weight="w_outer")
    en, ei = _conv_bn_body(rng, "x", "e", "else_")
    then = helper.make_graph(tn, "then", [], [helper.make_tensor_value_info("t", F, [1, 4, 6, 6])], ti)
    other = helper.make_graph(en, "else", [], [helper.make_tensor_value_info("e", F, [1, 4, 6, 6])], ei)
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)],
        "if_model",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", F, [1, 4, 6, 6])],
        [helper.make_tensor_value_info("y", F, [1, 4, 6, 6])],
        [w_outer],
    )
    return _model(graph, ir)


@pytest.mark.parametrize("cond", [True, False])
def test_if_branches_with_outer_scope_weight(cond):
    model = _if_model()
    onnx.checker.check_model(model)
    folded, report = fold_model(model)
    assert len(report.folded) == 2
    assert {f.graph for f in report.folded} == {"main/If#0.then_branch", "main/If#0.else_branch"}
    assert count(folded, "BatchNormalization") == 0
    onnx.checker.check_model(folded)
    assert not folded.graph.initializer, "the outer weight had one reader: it goes"
    x = np.random.default_rng(1).uniform(-1, 1, (1, 4, 6, 6)).astype(np.float32)
    result = verify(model, folded, inputs={"cond": np.array(cond), "x": x})
    assert result, str(result)


def test_ir3_subgraph_gets_constant_nodes_not_new_inputs():
    """IR 3 wants every initializer listed as a graph input; a subgraph's inputs are its signature."""
    model = _if_model(ir=3)
    model.opset_import[0].version = 9
    for t in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    for g in (model.graph.node[0].attribute[0].g, model.graph.node[0].attribute[1].g):
        for t in g.initializer:  # IR 3 subgraphs: statistics as Constant nodes
            g.node.insert(0, helper.make_node("Constant", [], [t.name], value=t))
        del g.initializer[:]
    folded, report = fold_model(model)
    assert len(report.folded) == 2
    onnx.checker.check_model(folded)
    then = folded.graph.node[0].attribute[0].g
    assert [n.op_type for n in then.node] == ["Constant", "Constant", "Conv"] and not then.input
    x = np.random.default_rng(1).uniform(-1, 1, (1, 4, 6, 6)).astype(np.float32)
    for cond in (True, False):
        assert verify(model, folded, inputs={"cond": np.array(cond), "x": x})


def test_loop_body():
    rng = np.random.default_rng(2)
    nodes, inits = _conv_bn_body(rng, "s_in", "s_out", "body_")
    nodes.append(helper.make_node("Identity", ["cond_in"], ["cond_out"]))
    body = helper.make_graph(
        nodes, "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("s_in", F, [1, 4, 5, 5])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("s_out", F, [1, 4, 5, 5])],
        inits,
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trip", "", "x"], ["y"], body=body)], "loop",
        [helper.make_tensor_value_info("trip", TensorProto.INT64, []),
         helper.make_tensor_value_info("x", F, [1, 4, 5, 5])],
        [helper.make_tensor_value_info("y", F, [1, 4, 5, 5])],
    )
    model = _model(graph)
    onnx.checker.check_model(model)
    folded, report = fold_model(model)
    assert len(report.folded) == 1 and report.folded[0].graph == "main/Loop#0.body"
    onnx.checker.check_model(folded)
    x = np.random.default_rng(3).uniform(-1, 1, (1, 4, 5, 5)).astype(np.float32)
    result = verify(model, folded, inputs={"trip": np.array(3, np.int64), "x": x})
    assert result, str(result)


def test_scan_body_with_outer_scope_weight():
    rng = np.random.default_rng(4)
    w = numpy_helper.from_array(rng.normal(0, 0.5, (4, 4, 3, 3)).astype(np.float32), "w_outer")
    nodes, inits = _conv_bn_body(rng, "xt", "yt", "scan_", outer_weight="w_outer")
    nodes.insert(0, helper.make_node("Identity", ["state_in"], ["state_out"]))
    body = helper.make_graph(
        nodes, "scan_body",
        [helper.make_tensor_value_info("state_in", F, [1]), helper.make_tensor_value_info("xt", F, [1, 4, 5, 5])],
        [helper.make_tensor_value_info("state_out", F, [1]), helper.make_tensor_value_info("yt", F, [1, 4, 5, 5])],
        inits,
    )
    graph = helper.make_graph(
        [helper.make_node("Scan", ["s0", "xs"], ["s_final", "ys"], body=body, num_scan_inputs=1)], "scan",
        [helper.make_tensor_value_info("s0", F, [1]), helper.make_tensor_value_info("xs", F, [3, 1, 4, 5, 5])],
        [helper.make_tensor_value_info("s_final", F, [1]), helper.make_tensor_value_info("ys", F, [3, 1, 4, 5, 5])],
        [w],
    )
    model = _model(graph)
    onnx.checker.check_model(model)
    folded, report = fold_model(model)
    assert len(report.folded) == 1
    onnx.checker.check_model(folded)
    result = verify(model, folded)
    assert result, str(result)
