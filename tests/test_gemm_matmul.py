"""Gemm -> BatchNormalization and MatMul -> BatchNormalization (Linear + BatchNorm1d).

Equivalence in onnxruntime with optimizations off, default tolerances (README: float32 1e-4 of the
output's scale, float16 1e-2). beta is folded into C and set to 1 (a rule that ignores beta is off by
the factor beta: beta = 3 below makes that visible).
"""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builders import bn_stats, count, np_dtype, onnx_dtype
from onnxfold import fold_model, verify

M, K, N = 5, 7, 6


def gemm_bn_model(trans_a=0, trans_b=0, alpha=1.0, beta=1.0, c_shape=(N,), dtype="float32", seed=0):
    rng = np.random.default_rng(seed)
    dt = np_dtype(dtype)
    b = rng.normal(0, 0.5, (N, K) if trans_b else (K, N)).astype(dt)
    inits = [numpy_helper.from_array(b, "B")]
    inputs = ["a", "B"]
    if c_shape is not None:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.5, c_shape).astype(dt), "C"))
        inputs.append("C")
    stats = ["g", "s", "m", "v"]
    inits += [numpy_helper.from_array(x, n) for x, n in zip(bn_stats(rng, N, dt), stats)]
    nodes = [
        helper.make_node("Gemm", inputs, ["h"], transA=trans_a, transB=trans_b, alpha=alpha, beta=beta, name="gemm"),
        helper.make_node("BatchNormalization", ["h", *stats], ["y"], epsilon=1e-3, name="bn"),
    ]
    a_shape = [K, M] if trans_a else [M, K]
    graph = helper.make_graph(nodes, "gemm_bn", [helper.make_tensor_value_info("a", onnx_dtype(dtype), a_shape)],
                              [helper.make_tensor_value_info("y", onnx_dtype(dtype), [M, N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("c_shape", [None, (), (1,), (N,), (1, N)], ids=["noC", "scalar", "1", "N", "1xN"])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 3.0)])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("trans_a", [0, 1])
def test_gemm_bn_folds(trans_a, trans_b, alpha, beta, c_shape, dtype):
    model = gemm_bn_model(trans_a, trans_b, alpha, beta, c_shape, dtype)
    onnx.checker.check_model(model, full_check=True)
    folded, report = fold_model(model)
    assert [f.rule for f in report.folded] == ["gemm_bn"], report.summary()
    assert count(folded, "BatchNormalization") == 0
    onnx.checker.check_model(folded, full_check=True)
    gemm = folded.graph.node[0]
    assert gemm.op_type == "Gemm" and gemm.output[0] == "y"
    assert {a.name: helper.get_attribute_value(a) for a in gemm.attribute}["beta"] == 1.0
    result = verify(model, folded)
    assert result, str(result)


def test_gemm_full_c_is_declined():
    model = gemm_bn_model(c_shape=(M, N))
    folded, report = fold_model(model)
    assert not report.folded and "only a scalar, [N] or [1, N] bias folds" in report.declined[0].reason


def matmul_bn_model(rank=2, declare_shape=True, weight_via_transpose=False):
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.5, (K, N)).astype(np.float32)
    nodes = []
    if weight_via_transpose:  # torch's legacy exporter: Linear without bias -> Transpose(W) -> MatMul
        inits = [numpy_helper.from_array(np.ascontiguousarray(w.T), "Wt")]
        nodes.append(helper.make_node("Transpose", ["Wt"], ["W"], perm=[1, 0]))
    else:
        inits = [numpy_helper.from_array(w, "W")]
    stats = ["g", "s", "m", "v"]
    inits += [numpy_helper.from_array(x, n) for x, n in zip(bn_stats(rng, N), stats)]
    nodes += [
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("MatMul", ["r", "W"], ["h"], name="matmul"),
        helper.make_node("BatchNormalization", ["h", *stats], ["y"], epsilon=1e-3, name="bn"),
    ]
    shape = [M, K] if rank == 2 else [2, M, K]
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, shape if declare_shape else None)
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None] if rank == 2 else [None, None, None])
    model = helper.make_model(helper.make_graph(nodes, "mm", [a], [out], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("via_transpose", [False, True])
def test_matmul_bn_becomes_gemm(via_transpose):
    model = matmul_bn_model(weight_via_transpose=via_transpose)
    folded, report = fold_model(model)
    assert [f.rule for f in report.folded] == ["matmul_bn"], report.summary()
    assert [n.op_type for n in folded.graph.node] == ["Relu", "Gemm"]
    onnx.checker.check_model(folded)
    assert verify(model, folded)


def test_matmul_rank3_output_is_declined():
    """BN on [B, M, N] normalizes axis 1 (M), not the weight's output axis N."""
    model = matmul_bn_model(rank=3)
    _, report = fold_model(model)
    assert not report.folded and "MatMul output has rank 3" in report.declined[0].reason


def test_matmul_unknown_rank_is_declined():
    model = matmul_bn_model(declare_shape=False)
    _, report = fold_model(model)
    assert not report.folded and "rank of MatMul's input is unknown" in report.declined[0].reason


@pytest.mark.parametrize("builder", ["matmul_bn", "matmul_bn_via_transpose", "gemm_bn_beta3"])
def test_graphsurgeon_graph_gets_the_folded_op_and_attributes(builder):
    """Issue 9 defect 6: a gs.Graph kept MatMul with three inputs (the change to Gemm and its
    attributes were not carried back), which onnx.checker rejects and onnxruntime will not load."""
    gs = pytest.importorskip("onnx_graphsurgeon")
    model = {"matmul_bn": lambda: matmul_bn_model(),
             "matmul_bn_via_transpose": lambda: matmul_bn_model(weight_via_transpose=True),
             "gemm_bn_beta3": lambda: gemm_bn_model(trans_a=1, trans_b=1, alpha=0.5, beta=3.0)}[builder]()
    from onnxfold import fold_conv_bn

    graph = gs.import_onnx(model)
    assert fold_conv_bn(graph) is graph
    folded = gs.export_onnx(graph.cleanup().toposort())
    onnx.checker.check_model(folded, full_check=True)
    gemm = [n for n in folded.graph.node if n.op_type in ("Gemm", "MatMul")]
    assert [n.op_type for n in gemm] == ["Gemm"] and len(gemm[0].input) == 3
    attrs = {a.name: helper.get_attribute_value(a) for a in gemm[0].attribute}
    assert attrs.get("beta", 1.0) == 1.0
    if builder == "gemm_bn_beta3":
        assert attrs["transA"] == 1 and attrs["transB"] == 1 and attrs["alpha"] == 0.5
    assert count(folded, "BatchNormalization") == 0
    result = verify(model, folded)
    assert result, str(result)
