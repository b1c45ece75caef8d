"""Conv -> BatchNormalization inside model-local functions.

Weights inside the body (Constant nodes) are the same for every call: the body is folded and the
function kept. Weights passed in from the call site are inlined first (per-call specialization),
then folded in the graph. Equivalence in onnxruntime (optimizations off, float32 default tolerance).
"""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import bn_stats, constant, count
from onnxfold import fold_model, verify

F = TensorProto.FLOAT
DOMAIN = "local"


def function_model(weights_inside: bool, calls: int = 2):
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.5, (4, 4, 3, 3)).astype(np.float32)
    stats = bn_stats(rng, 4)
    names = ["g", "b", "m", "v"]
    body = []
    if weights_inside:
        body += [constant("w", w)] + [constant(n, a) for n, a in zip(names, stats)]
        fn_inputs = ["x"]
    else:
        fn_inputs = ["x", "w", *names]
    body += [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", *names], ["y"], epsilon=1e-3),
             helper.make_node("Relu", ["y"], ["out"])]
    fn = helper.make_function(DOMAIN, "ConvBnRelu", fn_inputs, ["out"], body,
                              [helper.make_opsetid("", 17)])
    inits = []
    nodes = []
    prev = "x"
    for i in range(calls):
        args = [prev]
        if not weights_inside:  # each call site binds its own weights
            wi = rng.normal(0, 0.5, (4, 4, 3, 3)).astype(np.float32)
            si = bn_stats(rng, 4)
            inits += [numpy_helper.from_array(wi, f"w{i}")]
            inits += [numpy_helper.from_array(a, f"{n}{i}") for n, a in zip(names, si)]
            args += [f"w{i}", *(f"{n}{i}" for n in names)]
        nodes.append(helper.make_node("ConvBnRelu", args, [f"h{i}"], domain=DOMAIN))
        prev = f"h{i}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [1, 4, 6, 6])],
                              [helper.make_tensor_value_info(prev, F, [1, 4, 6, 6])], inits)
    model = helper.make_model(graph, functions=[fn],
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_function_with_weights_in_the_body_is_folded_in_place():
    model = function_model(weights_inside=True)
    folded, report = fold_model(model)
    assert len(report.folded) == 1 and report.folded[0].graph == "function local.ConvBnRelu"
    assert not report.inlined
    assert len(folded.functions) == 1
    assert [n.op_type for n in folded.functions[0].node] == ["Constant", "Constant", "Conv", "Relu"]
    assert [n.op_type for n in folded.graph.node] == ["ConvBnRelu", "ConvBnRelu"]
    onnx.checker.check_model(folded, full_check=True)
    result = verify(model, folded)
    assert result, str(result)


def test_function_with_weights_from_the_call_site_is_inlined_then_folded():
    model = function_model(weights_inside=False)
    folded, report = fold_model(model)
    assert report.inlined == ["local.ConvBnRelu"]
    assert len(report.folded) == 2 and {f.graph for f in report.folded} == {"main"}
    assert count(folded, "BatchNormalization") == 0
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu", "Conv", "Relu"]
    onnx.checker.check_model(folded, full_check=True)
    result = verify(model, folded)
    assert result, str(result)
    assert "inlined local functions" in report.summary()


def test_function_without_candidates_is_untouched():
    model = function_model(weights_inside=True)
    fn = model.functions[0]
    keep = [n for n in fn.node if n.op_type != "BatchNormalization"]
    keep[-1].input[0] = "c"
    del fn.node[:]
    fn.node.extend(keep)
    folded, report = fold_model(model)
    assert not report.folded and not report.inlined
    assert folded.SerializeToString() == model.SerializeToString()


def test_graphsurgeon_graph_with_an_inlined_function():
    gs = pytest.importorskip("onnx_graphsurgeon")

    from onnxfold import fold_conv_bn

    model = function_model(weights_inside=False)
    graph = gs.import_onnx(model)
    assert fold_conv_bn(graph) is graph
    folded = gs.export_onnx(graph.cleanup().toposort())
    assert count(folded, "BatchNormalization") == 0
    assert verify(model, folded)


def test_batchnorm_left_in_a_function_is_in_the_report():
    """Issue 9 defect 7: a BatchNormalization left alone in a function body was counted in bn_after
    but missing from report.left (and so from --report's left[])."""
    model = function_model(weights_inside=True)
    fn = model.functions[0]
    # BN reads the function's input directly: nothing to fold into
    bn = next(n for n in fn.node if n.op_type == "BatchNormalization")
    bn.input[0] = "x"
    conv = next(n for n in fn.node if n.op_type == "Conv")
    fn.node.remove(conv)
    onnx.checker.check_model(model)
    folded, report = fold_model(model)
    assert not report.folded
    assert report.bn_after == 1
    assert len(report.left) == report.bn_after
    assert report.left[0].graph == "function local.ConvBnRelu" and "graph input" in report.left[0].reason
    assert report.to_dict()["left"][0]["graph"] == "function local.ConvBnRelu"


def test_declined_in_a_function_survives_later_rounds():
    model = function_model(weights_inside=True)
    fn = model.functions[0]
    conv = next(n for n in fn.node if n.op_type == "Conv")
    fn.output.append("c")  # the Conv output leaves the function too: two readers
    _, report = fold_model(model)
    assert not report.folded
    assert [d.graph for d in report.declined] == ["function local.ConvBnRelu"]
    assert conv.output[0] == "c"
