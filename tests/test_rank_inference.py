"""Shape inference, which only the MatMul rules need (the rank of MatMul's input), runs at most once per
fold, only when a rule asks, and on a copy of the model without its weights.

Guards issue 9 defect 9: a full ``onnx.shape_inference`` pass over the model with its weights, once per
round, made models with nothing to fold slow (DETR 3.5-9.9 s against 1.3 s for onnxruntime).
"""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxfold.const_resolve
from builders import bn_stats, conv_bn_model
from onnxfold import fold_model

D = 64


def transformer_like(layers=4, fold_one=False):
    """MatMul + Add(bias) layers on a rank-3 [batch, seq, D] activation (nothing to fold there), a
    Reshape whose shape is an initializer (inference must see its value), and optionally a rank-2
    MatMul + BatchNormalization that does fold (and needs a second round)."""
    rng = np.random.default_rng(0)
    inits, nodes, x = [], [], "x"
    for i in range(layers):
        inits += [numpy_helper.from_array(rng.normal(0, 0.1, (D, D)).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(rng.normal(0, 0.1, D).astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"])]
        x = f"a{i}"
    outputs = [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None)]
    if fold_one:
        inits.append(numpy_helper.from_array(np.array([-1, D], np.int64), "flat"))
        inits.append(numpy_helper.from_array(rng.normal(0, 0.1, (D, 8)).astype(np.float32), "head"))
        stats = ["g", "be", "mu", "var"]
        inits += [numpy_helper.from_array(a, n) for a, n in zip(bn_stats(rng, 8), stats)]
        nodes += [helper.make_node("Reshape", [x, "flat"], ["r"]), helper.make_node("MatMul", ["r", "head"], ["h"]),
                  helper.make_node("BatchNormalization", ["h", *stats], ["y"])]
        outputs = [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["B", "S", D])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture
def inference_calls(monkeypatch):
    calls = []
    real = onnx.shape_inference.infer_shapes

    def spy(model, *args, **kwargs):
        calls.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", spy)
    return calls


def test_inference_runs_once_without_the_weights(inference_calls):
    model = transformer_like(fold_one=True)
    folded, report = fold_model(model)
    assert [f.rule for f in report.folded] == ["matmul_bn"] and report.rounds == 2
    assert len(inference_calls) == 1
    stub = inference_calls[0]
    weights = [t for t in stub.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    assert not weights and stub.ByteSize() < 4096 < model.ByteSize()
    assert [t.name for t in stub.graph.initializer] == ["flat"]  # a shape value inference needs
    declined = [d for d in report.declined if d.rule == "matmul_add"]
    assert len(declined) == 4 and all("rank 3" in d.reason for d in declined)
    assert not any("BatchNormalization" in d.reason for d in declined)  # the reason names no op it is not about


def test_no_inference_when_no_rule_needs_a_rank(inference_calls):
    fold_model(conv_bn_model())
    assert inference_calls == []


def test_weights_are_not_read_for_a_matmul_declined_on_rank(monkeypatch):
    model = transformer_like()
    read = []
    real = onnxfold.const_resolve.Constants.value

    def spy(self, name, what):
        read.append(name)
        return real(self, name, what)

    monkeypatch.setattr(onnxfold.const_resolve.Constants, "value", spy)
    _, report = fold_model(model)
    assert len(report.declined) == 4 and not report.folded
    assert not [n for n in read if n.startswith("w")]


def test_weights_in_constant_nodes_enter_inference_by_their_type_and_shape(inference_calls):
    """paddle2onnx keeps weights in Constant nodes: inference is given each large one as a graph input of
    its type and shape (PP-OCRv4 rec: 10.8 MB, a third of its fold's time), a small one as it is
    (inference reads a Constant node's value: the Reshape's target here). The same folds and declines."""
    model = transformer_like(fold_one=True)
    nodes = [helper.make_node("Constant", [], [t.name], value=t) for t in model.graph.initializer]
    nodes += list(model.graph.node)
    del model.graph.initializer[:]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    folded, report = fold_model(model)
    assert [f.rule for f in report.folded] == ["matmul_bn"] and len(inference_calls) == 1
    stub = inference_calls[0]
    assert stub.ByteSize() < 4096 < model.ByteSize()
    kept = {n.output[0] for n in stub.graph.node if n.op_type == "Constant"}
    assert "flat" in kept and not {"w0", "w3", "head"} & kept
    assert {"w0", "w3", "head"} <= {v.name for v in stub.graph.input}
    declined = [d for d in report.declined if d.rule == "matmul_add"]
    assert len(declined) == 4 and all("rank 3" in d.reason for d in declined)
