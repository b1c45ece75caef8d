"""Small ONNX models for the tests, built with onnx.helper, with random non-trivial BN statistics."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from checks import session

DTYPES = {
    "float32": (np.float32, TensorProto.FLOAT),
    "float16": (np.float16, TensorProto.FLOAT16),
    "bfloat16": (ml_dtypes.bfloat16, TensorProto.BFLOAT16),
    "float64": (np.float64, TensorProto.DOUBLE),
}


def np_dtype(name):
    return DTYPES[name][0]


def onnx_dtype(name):
    return DTYPES[name][1]


def bn_stats(rng, channels: int, dtype=np.float32):
    """gamma, beta, mean, var: random and far from the defaults (a fold with defaults is invisible)."""
    gamma = rng.uniform(0.5, 1.5, channels)
    beta = rng.normal(0.0, 0.5, channels)
    mean = rng.normal(0.0, 0.5, channels)
    var = rng.uniform(0.5, 2.0, channels)
    assert not np.allclose(gamma, 1) and not np.allclose(beta, 0)
    assert not np.allclose(mean, 0) and not np.allclose(var, 1)
    return [a.astype(dtype) for a in (gamma, beta, mean, var)]


def tensor(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def constant(name, array) -> onnx.NodeProto:
    """A Constant node whose output ``name`` holds ``array``."""
    return helper.make_node("Constant", [], [name], value=tensor(name, array))


def conv_bn_model(
    *,
    dims: int = 2,
    transpose: bool = False,
    groups: int = 1,
    cin: int = 4,
    cout: int = 6,
    bias: bool = True,
    dtype: str = "float32",
    stats_dtype: str | None = None,
    opset: int = 17,
    ir_version: int | None = None,
    kernel: int = 3,
    strides: int = 1,
    dilations: int = 1,
    pads: int = 0,
    auto_pad: str | None = None,
    output_padding: int = 0,
    spatial: int = 6,
    batch: int | str = 1,
    seed: int = 0,
    epsilon: float | None = 1e-3,
    bn_attrs: dict | None = None,
    constants_as_nodes: bool = False,
) -> onnx.ModelProto:
    """x -> Conv/ConvTranspose -> BatchNormalization -> y."""
    rng = np.random.default_rng(seed)
    dt = np_dtype(dtype)
    sdt = np_dtype(stats_dtype or dtype)
    k = (kernel,) * dims
    if transpose:
        w = rng.normal(0, 0.5, (cin, cout // groups, *k)).astype(dt)
    else:
        w = rng.normal(0, 0.5, (cout, cin // groups, *k)).astype(dt)
    inits = [tensor("w", w)]
    conv_inputs = ["x", "w"]
    if bias:
        inits.append(tensor("b", rng.normal(0, 0.5, cout).astype(dt)))
        conv_inputs.append("b")
    attrs = {"group": groups, "kernel_shape": list(k)}
    if auto_pad:
        attrs["auto_pad"] = auto_pad
    else:
        attrs["pads"] = [pads] * (2 * dims)
    attrs["strides"] = [strides] * dims
    attrs["dilations"] = [dilations] * dims
    if transpose and output_padding:
        attrs["output_padding"] = [output_padding] * dims
    op = "ConvTranspose" if transpose else "Conv"
    nodes = [helper.make_node(op, conv_inputs, ["c"], name="conv", **attrs)]
    names = ["gamma", "beta", "mean", "var"]
    inits += [tensor(n, a) for n, a in zip(names, bn_stats(rng, cout, sdt))]
    battrs = dict(bn_attrs or {})
    if epsilon is not None:
        battrs["epsilon"] = epsilon
    nodes.append(helper.make_node("BatchNormalization", ["c", *names], ["y"], name="bn", **battrs))
    x = helper.make_tensor_value_info("x", onnx_dtype(dtype), [batch, cin] + [spatial] * dims)
    y = helper.make_tensor_value_info("y", onnx_dtype(dtype), [batch, cout] + [None] * dims)
    graph = helper.make_graph(nodes, "conv_bn", [x], [y], inits)
    if constants_as_nodes:
        graph = initializers_to_constants(graph)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version or min(onnx.IR_VERSION, 10 if opset >= 21 else 8)
    return model


def initializers_to_constants(graph: onnx.GraphProto) -> onnx.GraphProto:
    """The PaddlePaddle way: no initializers, every weight a Constant node."""
    consts = [helper.make_node("Constant", [], [t.name], value=t, name=f"const_{t.name}") for t in graph.initializer]
    out = onnx.GraphProto()
    out.CopyFrom(graph)
    del out.initializer[:]
    del out.node[:]
    out.node.extend(consts + list(graph.node))
    return out


def count(model: onnx.ModelProto, op_type: str) -> int:
    from onnxfold.graph import count_ops

    return count_ops(model, op_type)


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    """Run with onnxruntime (optimizations off) or, where it has no kernel, onnx.reference."""
    try:
        sess = session(model)
    except Exception:
        from onnx.reference import ReferenceEvaluator

        return ReferenceEvaluator(model).run(None, feeds)
    return sess.run(None, feeds)


def torch_run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """An independent float64 oracle for the single-chain models above: Conv, ConvTranspose and
    BatchNormalization evaluated by torch (explicit pads only). Skips the calling test without torch."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional

    consts = {t.name: torch.from_numpy(numpy_helper.to_array(t).astype(np.float64)) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = torch.from_numpy(numpy_helper.to_array(n.attribute[0].t).astype(np.float64))
    values = {model.graph.input[0].name: torch.from_numpy(x.astype(np.float64))}
    for n in model.graph.node:
        a = {at.name: helper.get_attribute_value(at) for at in n.attribute}
        get = lambda i, n=n: values.get(n.input[i], consts.get(n.input[i])) if i < len(n.input) and n.input[i] else None  # noqa: E731
        if n.op_type == "Constant":
            continue
        if n.op_type in ("Conv", "ConvTranspose"):
            xin, w, b = get(0), get(1), get(2)
            d = w.ndim - 2
            assert "auto_pad" not in a, "torch_run takes explicit pads only"
            pads = a.get("pads", [0] * 2 * d)
            assert pads[:d] == pads[d:]
            kw = dict(stride=a.get("strides", [1] * d), padding=pads[:d], dilation=a.get("dilations", [1] * d),
                      groups=a.get("group", 1))
            if n.op_type == "Conv":
                out = getattr(F, f"conv{d}d")(xin, w, b, **kw)
            else:
                out = getattr(F, f"conv_transpose{d}d")(xin, w, b, output_padding=a.get("output_padding", [0] * d),
                                                        **kw)
        elif n.op_type == "BatchNormalization":
            xin, g, bb, m, v = (get(i) for i in range(5))
            out = F.batch_norm(xin, m, v, g, bb, training=False, eps=a.get("epsilon", 1e-5))
        elif n.op_type == "Relu":
            out = torch.relu(get(0))
        else:
            raise NotImplementedError(n.op_type)
        values[n.output[0]] = out
    return values[model.graph.output[0].name].numpy()


def external_model(folder: Path, name: str = "m.onnx", *, channels: int = 16, keep: int = 16, seed: int = 0,
                   keep_seed: int | None = None, data: str | None = None, threshold: int = 256) -> Path:
    """Conv -> BN saved with external data (``data``, default ``<name>.data``; tensors of ``threshold``
    bytes or more), plus an unrelated ``keep`` x ``keep`` constant, reduced to a second output, that a
    fold must copy byte for byte."""
    model = conv_bn_model(cin=channels, cout=channels, seed=seed)
    rng = np.random.default_rng(seed if keep_seed is None else keep_seed)
    model.graph.initializer.append(numpy_helper.from_array(rng.normal(size=(keep, keep)).astype(np.float32), "keep"))
    model.graph.node.append(helper.make_node("ReduceSum", ["keep"], ["keep_sum"], keepdims=0))
    model.graph.output.append(helper.make_tensor_value_info("keep_sum", onnx.TensorProto.FLOAT, []))
    path = Path(folder) / name
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=data or name + ".data",
              size_threshold=threshold)
    return path
