"""Model-local functions whose body refers to the function's attributes (``ref_attr_name``).

A node in the body may take an attribute from the call (BatchNormalization's epsilon, Gemm's transB,
a Constant's value): its value is known only at each call site, and each call may bind another. A
fold there must use each call's value: such a function is inlined (onnx.inliner resolves the
references per call) and its calls fold in the graph. Issue 18 item 9: these crashed with exit 70 in
rules/base.py attr(), through the API, the command line, --check, onnxfold-check and fold_conv_bn.
Compared in onnxruntime with optimizations off (checks.run), with the original model as reference.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import bn_stats, constant, count
from checks import assert_close, cli, run
from onnxfold import fold_conv_bn, fold_model
from onnxfold.errors import NotFoldable
from onnxfold.precommit import main as check_main
from onnxfold.rules.base import attr

F = TensorProto.FLOAT
DOMAIN = "local"
STATS = ["g", "b", "m", "v"]


def _ref(name: str, ref: str, kind: int) -> onnx.AttributeProto:
    return onnx.AttributeProto(name=name, ref_attr_name=ref, type=kind)


def _model(body, fn_attrs, calls, x_shape, y_shape, *, inputs=("x",), defaults=(), extra_fns=()):
    fn = helper.make_function(DOMAIN, "Block", list(inputs), ["y"], body, [helper.make_opsetid("", 17)],
                              attributes=list(fn_attrs))
    fn.attribute_proto.extend(defaults)
    nodes, prev = [], "x"
    for i, kwargs in enumerate(calls):
        nodes.append(helper.make_node("Block", [prev], [f"h{i}"], domain=DOMAIN, **kwargs))
        prev = f"h{i}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, x_shape)],
                              [helper.make_tensor_value_info(prev, F, y_shape)])
    model = helper.make_model(graph, functions=[*extra_fns, fn],
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def conv_bn_epsilon(calls=({"eps": 1e-3}, {"eps": 0.5})):
    """Conv -> BatchNormalization in the body, weights inside; epsilon from each call."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.5, (4, 4, 3, 3)).astype(np.float32)
    g, b, m, v = bn_stats(rng, 4)
    v = (v * 0.05).astype(np.float32)  # small variances: epsilon 1e-3 and 0.5 differ plainly
    bn = helper.make_node("BatchNormalization", ["c", *STATS], ["y"])
    bn.attribute.append(_ref("epsilon", "eps", onnx.AttributeProto.FLOAT))
    body = [constant("w", w), *(constant(n, a) for n, a in zip(STATS, (g, b, m, v))),
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), bn]
    return _model(body, ["eps"], calls, [1, 4, 6, 6], [1, 4, 6, 6],
                  defaults=[helper.make_attribute("eps", 0.25)])


def gemm_transb():
    """Gemm (B inside, transB from each call) -> Mul by a per-channel constant."""
    rng = np.random.default_rng(1)
    gemm = helper.make_node("Gemm", ["x", "B", "C"], ["z"])
    gemm.attribute.append(_ref("transB", "tb", onnx.AttributeProto.INT))
    body = [constant("B", rng.normal(0, 1, (4, 4)).astype(np.float32)),
            constant("C", rng.normal(0, 1, (4,)).astype(np.float32)),
            constant("s", rng.uniform(0.5, 2.0, (4,)).astype(np.float32)),
            gemm, helper.make_node("Mul", ["z", "s"], ["y"])]
    return _model(body, ["tb"], [{"tb": 0}, {"tb": 1}, {"tb": 0}], [2, 4], [2, 4])


def constant_by_reference():
    """Conv -> Mul by a Constant whose value each call gives (value_floats by reference)."""
    rng = np.random.default_rng(2)
    s = helper.make_node("Constant", [], ["s"])
    s.attribute.append(_ref("value_floats", "scale", onnx.AttributeProto.FLOATS))
    body = [constant("w", rng.normal(0, 0.5, (4, 4, 1, 1)).astype(np.float32)),
            constant("shape", np.array([1, 4, 1, 1], dtype=np.int64)),
            s, helper.make_node("Reshape", ["s", "shape"], ["s4"]),
            helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Mul", ["c", "s4"], ["y"])]
    calls = [{"scale": list(rng.uniform(0.5, 2, 4))}, {"scale": list(rng.uniform(-2, -0.5, 4))}]
    return _model(body, ["scale"], calls, [1, 4, 5, 5], [1, 4, 5, 5])


def nested():
    """The main graph calls Outer, whose body calls Block binding epsilon from Outer's own attribute."""
    inner = conv_bn_epsilon()
    block = inner.functions[0]
    call = helper.make_node("Block", ["x"], ["y"], domain=DOMAIN)
    call.attribute.append(_ref("eps", "outer_eps", onnx.AttributeProto.FLOAT))
    outer = helper.make_function(DOMAIN, "Outer", ["x"], ["y"], [call],
                                 [helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)],
                                 attributes=["outer_eps"])
    nodes = [helper.make_node("Outer", ["x"], ["h0"], domain=DOMAIN, outer_eps=1e-3),
             helper.make_node("Outer", ["h0"], ["h1"], domain=DOMAIN, outer_eps=0.5)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [1, 4, 6, 6])],
                              [helper.make_tensor_value_info("h1", F, [1, 4, 6, 6])])
    model = helper.make_model(graph, functions=[block, outer],
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


MODELS = {
    "bn_epsilon": (conv_bn_epsilon, "BatchNormalization", 2),
    "bn_epsilon_default": (lambda: conv_bn_epsilon(({"eps": 1e-3}, {})), "BatchNormalization", 2),
    "gemm_transB": (gemm_transb, "Mul", 3),
    "constant_value": (constant_by_reference, "Mul", 2),
    "nested": (nested, "BatchNormalization", 2),
}


def _feeds(model):
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return {"x": np.random.default_rng(7).normal(0, 1, shape).astype(np.float32)}


def _same_outputs(model, folded):
    feeds = _feeds(model)
    assert_close(run(model, feeds), run(folded, feeds))


@pytest.mark.parametrize("name", MODELS)
def test_each_call_folds_with_its_own_attribute(name):
    make, op, folds = MODELS[name]
    model = make()
    folded, report = fold_model(model)
    assert len(report.folded) == folds, report.summary()
    assert report.inlined and count(folded, op) == 0
    onnx.checker.check_model(folded, full_check=True)
    _same_outputs(model, folded)


def test_the_calls_really_differ():
    """The models above would pass with one call's value used for all only if the values did not matter."""
    model = conv_bn_epsilon()
    same = conv_bn_epsilon(({"eps": 1e-3}, {"eps": 1e-3}))
    feeds = _feeds(model)
    a, b = run(model, feeds), run(same, feeds)
    assert not np.allclose(a["h1"], b["h1"], rtol=1e-2)


def test_fold_conv_bn_takes_them():
    model = conv_bn_epsilon()
    folded = fold_conv_bn(model)
    assert count(folded, "BatchNormalization") == 0
    _same_outputs(model, folded)


def test_graphsurgeon_and_onnx_ir_take_them():
    gs = pytest.importorskip("onnx_graphsurgeon")
    model = conv_bn_epsilon(({"eps": 1e-3}, {}))  # the second call takes the function's default
    graph = gs.import_onnx(model)
    assert fold_conv_bn(graph) is graph
    folded = gs.export_onnx(graph.cleanup().toposort())
    assert count(folded, "BatchNormalization") == 0
    _same_outputs(model, folded)
    ir = pytest.importorskip("onnx_ir")
    model = conv_bn_epsilon()  # both calls bind epsilon (onnx_ir 1.1 drops a function's defaults)
    ir_model = ir.serde.deserialize_model(model)
    fold_conv_bn(ir_model)
    folded = ir.serde.serialize_model(ir_model)
    assert count(folded, "BatchNormalization") == 0
    _same_outputs(model, folded)


def test_command_line_check_and_hook(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(conv_bn_epsilon(), src)
    out = tmp_path / "out.onnx"
    done = cli(src, out)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    _same_outputs(onnx.load(src), onnx.load(out))
    checked = cli(src, "--check")
    assert checked.returncode == 3, checked.stderr  # folds found
    assert "Traceback" not in checked.stderr
    assert check_main([str(src)]) == 3
    assert "can be folded" in capsys.readouterr().err


def test_a_body_without_a_fold_keeps_its_references():
    """Nothing to fold: the function stays as it is, references and all."""
    model = conv_bn_epsilon()
    body = model.functions[0].node
    bn = next(n for n in body if n.op_type == "BatchNormalization")
    bn.input[0] = "x"
    body.remove(next(n for n in body if n.op_type == "Conv"))
    folded, report = fold_model(model)
    assert not report.folded and not report.inlined
    assert folded.SerializeToString() == model.SerializeToString()


def test_attr_declines_a_reference_with_a_sentence():
    node = helper.make_node("BatchNormalization", ["x", *STATS], ["y"])
    node.attribute.append(_ref("epsilon", "eps", onnx.AttributeProto.FLOAT))
    with pytest.raises(NotFoldable, match="refers to the function attribute 'eps'"):
        attr(node, "epsilon", 1e-5)
    assert attr(node, "momentum", 0.9) == 0.9


def test_weights_bound_at_the_call_and_a_reference_together():
    rng = np.random.default_rng(3)
    bn = helper.make_node("BatchNormalization", ["c", *STATS], ["y"])
    bn.attribute.append(_ref("epsilon", "eps", onnx.AttributeProto.FLOAT))
    body = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), bn]
    fn = helper.make_function(DOMAIN, "Block", ["x", "w", *STATS], ["y"], body, [helper.make_opsetid("", 17)],
                              attributes=["eps"])
    inits, nodes, prev = [], [], "x"
    for i, eps in enumerate((1e-3, 0.3)):
        inits.append(numpy_helper.from_array(rng.normal(0, 0.5, (4, 4, 3, 3)).astype(np.float32), f"w{i}"))
        stats = bn_stats(rng, 4)
        stats[3] = (stats[3] * 0.05).astype(np.float32)
        inits += [numpy_helper.from_array(a, f"{n}{i}") for n, a in zip(STATS, stats)]
        nodes.append(helper.make_node("Block", [prev, f"w{i}", *(f"{n}{i}" for n in STATS)], [f"h{i}"],
                                      domain=DOMAIN, eps=eps))
        prev = f"h{i}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [1, 4, 6, 6])],
                              [helper.make_tensor_value_info(prev, F, [1, 4, 6, 6])], inits)
    model = helper.make_model(graph, functions=[fn],
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = 8
    folded, report = fold_model(model)
    assert len(report.folded) == 2 and count(folded, "BatchNormalization") == 0
    _same_outputs(model, folded)
