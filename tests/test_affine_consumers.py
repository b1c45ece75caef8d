"""Per-channel Mul/Add/Sub/Div by constants, chains and Identity: they fold into the producer.

Equivalence in onnxruntime, optimizations off, default tolerances (float32: 1e-4 of the output's scale).
"""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import bn_stats
from onnxfold import fold_model, verify

F = TensorProto.FLOAT


def conv_then(ops, *, transpose=False, groups=1, dims=2, seed=0, out_rank_shape=None):
    """x -> Conv -> ops... -> y. Each op: (op_type, constant shape or 'bn' or 'identity', side)."""
    rng = np.random.default_rng(seed)
    cin, cout = 4, 6
    k = (3,) * dims
    w = rng.normal(0, 0.5, (cin, cout // groups, *k) if transpose else (cout, cin // groups, *k)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(rng.normal(0, 0.5, cout).astype(np.float32), "b")]
    nodes = [helper.make_node("ConvTranspose" if transpose else "Conv", ["x", "w", "b"], ["t0"], group=groups,
                              kernel_shape=list(k), name="conv")]
    for i, (op, shape, side) in enumerate(ops):
        src, dst = f"t{i}", f"t{i + 1}"
        if op == "BatchNormalization":
            stats = [f"{n}{i}" for n in "gbmv"]
            inits += [numpy_helper.from_array(a, n) for a, n in zip(bn_stats(rng, cout), stats)]
            nodes.append(helper.make_node(op, [src, *stats], [dst], epsilon=1e-3, name=f"bn{i}"))
        elif op == "Identity":
            nodes.append(helper.make_node(op, [src], [dst], name=f"id{i}"))
        else:
            value = rng.uniform(0.5, 1.5, shape) * (1 if op in ("Mul", "Div") else rng.choice([-1, 1], shape))
            inits.append(numpy_helper.from_array(np.asarray(value, np.float32), f"c{i}"))
            inputs = [src, f"c{i}"] if side == "left" else [f"c{i}", src]
            nodes.append(helper.make_node(op, inputs, [dst], name=f"{op.lower()}{i}"))
    nodes[-1].output[0] = "y"
    x = helper.make_tensor_value_info("x", F, [1, cin] + [6] * dims)
    y = helper.make_tensor_value_info("y", F, [1, cout] + [None] * dims)
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def folds_to_one_node(model, n_folds):
    folded, report = fold_model(model)
    assert len(report.folded) == n_folds, report.summary()
    assert not report.declined, report.summary()
    assert len(folded.graph.node) == 1 and folded.graph.node[0].output[0] == "y"
    onnx.checker.check_model(folded)
    result = verify(model, folded)
    assert result, str(result)
    return report


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("shape", [(), (1,), (6, 1, 1), (1, 6, 1, 1), (1, 1, 1), (1, 1, 1, 1)], ids=str)
@pytest.mark.parametrize("op", ["Mul", "Add", "Sub", "Div"])
@pytest.mark.parametrize("transpose", [False, True], ids=["Conv", "ConvTranspose"])
def test_per_channel_constant_folds(transpose, op, shape, side):
    model = conv_then([(op, shape, side)], transpose=transpose, groups=2)
    if op == "Div" and side == "right":  # c / x is not affine
        _, report = fold_model(model)
        assert not report.folded and not report.declined
        return
    report = folds_to_one_node(model, 1)
    assert report.folded[0].rule == f"{'convtranspose' if transpose else 'conv'}_{op.lower()}"


@pytest.mark.parametrize("shape", [(6,), (1, 6), (6, 1), (1, 1, 6, 1)], ids=str)
def test_constant_that_does_not_broadcast_per_channel_is_declined(shape):
    """A length-C vector broadcasts over the LAST axis of a 4-D output, not the channels."""
    model = conv_then([("Mul", shape, "left")])
    _, report = fold_model(model)
    assert not report.folded
    assert "does not broadcast per channel" in report.declined[0].reason
    if shape == (6,):
        assert "last axis" in report.declined[0].reason


def test_constant_with_more_dimensions_than_the_output_is_declined():
    model = conv_then([("Add", (1, 1, 6, 1, 1), "left")])
    _, report = fold_model(model)
    assert "more dimensions than the output" in report.declined[0].reason


def test_div_by_zero_is_declined():
    model = conv_then([("Div", (1, 6, 1, 1), "left")])
    c = next(t for t in model.graph.initializer if t.name == "c0")
    a = numpy_helper.to_array(c).copy()
    a.flat[2] = 0
    c.CopyFrom(numpy_helper.from_array(a, "c0"))
    _, report = fold_model(model)
    assert "has zeros" in report.declined[0].reason


def test_residual_add_of_two_convs_is_no_candidate():
    model = conv_then([("BatchNormalization", None, None)])
    g = model.graph
    g.node.append(helper.make_node("Conv", ["x", "w"], ["c2"], kernel_shape=[3, 3]))
    g.node[1].output[0] = "y1"
    g.node.append(helper.make_node("Add", ["y1", "c2"], ["y"]))
    # no candidate for the affine rules; two Convs of one input are branch_sum's (test_rules_branches.py)
    folded, report = fold_model(model, disable=["branch_sum"])
    assert [f.rule for f in report.folded] == ["conv_bn"] and not report.declined and not report.left


@pytest.mark.parametrize(
    "ops",
    [
        [("Add", (6, 1, 1), "left"), ("BatchNormalization", None, None)],
        [("BatchNormalization", None, None), ("Mul", (6, 1, 1), "left"), ("Add", (1, 6, 1, 1), "right")],
        [("Identity", None, None), ("BatchNormalization", None, None)],
        [("Identity", None, None), ("Identity", None, None), ("Sub", (1,), "right"), ("Identity", None, None),
         ("BatchNormalization", None, None)],
    ],
    ids=["conv-add-bn", "conv-bn-mul-add", "conv-identity-bn", "conv-id-id-sub-id-bn"],
)
@pytest.mark.parametrize("transpose", [False, True], ids=["Conv", "ConvTranspose"])
def test_chains_fold_to_one_node(transpose, ops):
    model = conv_then(ops, transpose=transpose)
    n = sum(1 for op, _, _ in ops if op != "Identity")
    folds_to_one_node(model, n)


def test_identity_with_another_reader_blocks_the_fold():
    model = conv_then([("Identity", None, None), ("BatchNormalization", None, None)])
    model.graph.output.append(helper.make_tensor_value_info("t1", F, [1, 6, None, None]))
    _, report = fold_model(model)
    assert not report.folded and "'t1' is a graph output" in report.declined[0].reason


def test_gemm_then_per_feature_add_and_mul():
    """For Gemm's 2-D output a length-N vector is per channel (axis 1 is the last axis)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(3, 4)).astype(np.float32), "B"),
             numpy_helper.from_array(rng.uniform(0.5, 2, 4).astype(np.float32), "s"),
             numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "t")]
    nodes = [helper.make_node("Gemm", ["a", "B"], ["h"], alpha=2.0),
             helper.make_node("Mul", ["h", "s"], ["h2"]),
             helper.make_node("Add", ["t", "h2"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [helper.make_tensor_value_info("a", F, [5, 3])],
                                                [helper.make_tensor_value_info("y", F, [5, 4])], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    report = folds_to_one_node(model, 2)
    assert [f.rule for f in report.folded] == ["gemm_mul", "gemm_add"]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("shape", [(), (4,), (1, 4)], ids=str)
@pytest.mark.parametrize("op,side", [("Mul", "left"), ("Mul", "right"), ("Add", "left"), ("Add", "right"),
                                     ("Sub", "left"), ("Sub", "right"), ("Div", "left")])
@pytest.mark.parametrize("producer", ["Gemm-transB0", "Gemm-transB1-alpha-beta", "MatMul"])
def test_gemm_and_matmul_with_every_arithmetic_consumer(producer, op, side, shape, dtype):
    from builders import np_dtype, onnx_dtype

    rng = np.random.default_rng(7)
    dt = np_dtype(dtype)
    trans_b = producer.startswith("Gemm-transB1")
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3) if trans_b else (3, 4)).astype(dt), "B")]
    if producer == "MatMul":
        first = helper.make_node("MatMul", ["a", "B"], ["h"])
    else:
        inits.append(numpy_helper.from_array(rng.normal(size=(4,)).astype(dt), "C"))
        kw = dict(transB=1, alpha=0.7, beta=2.5) if trans_b else {}
        first = helper.make_node("Gemm", ["a", "B", "C"], ["h"], **kw)
    c = rng.uniform(0.5, 1.5, shape) * (1 if op in ("Mul", "Div") else rng.choice([-1, 1], shape))
    inits.append(numpy_helper.from_array(np.asarray(c, dt), "k"))
    second = helper.make_node(op, ["h", "k"] if side == "left" else ["k", "h"], ["y"])
    model = helper.make_model(
        helper.make_graph([first, second], "g", [helper.make_tensor_value_info("a", onnx_dtype(dtype), [5, 3])],
                          [helper.make_tensor_value_info("y", onnx_dtype(dtype), [5, 4])], inits),
        opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    report = folds_to_one_node(model, 1)
    assert report.folded[0].rule == f"{producer.split('-')[0].lower()}_{op.lower()}"


def test_legacy_broadcasting_arithmetic_is_declined():
    """Mul/Add before opset 7 broadcast by their broadcast/axis attributes: [C] with axis=1 is per channel
    there, while numpy rules would put it on the last axis. Not folded rather than guessed."""
    model = conv_then([("Mul", (6,), "left")])
    model.opset_import[0].version = 6
    model.graph.node[1].attribute.extend([helper.make_attribute("broadcast", 1), helper.make_attribute("axis", 1)])
    _, report = fold_model(model)
    assert not report.folded and "Mul-6 broadcasts by its broadcast/axis attributes" in report.declined[0].reason


def test_gemm6_is_declined():
    from test_gemm_matmul import gemm_bn_model

    model = gemm_bn_model()
    model.opset_import[0].version = 6
    _, report = fold_model(model)
    assert not report.folded and "Gemm-6" in report.declined[0].reason
