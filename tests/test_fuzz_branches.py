"""The differential fuzzer for branch_sum and concat_branch (issue 19): random re-parameterizable blocks
must fold exactly or be declined, never wrong.

A spec draws one tensor X ([N, C, size...], 1-D or 2-D) and 2-5 branches of it, summed by a chain of
Adds or one Sum: a Conv (odd kernel with centred pads, or any kernel 1-5 with random pads that keep
the output size, or pads one off; the block's group, strides and dilations, sometimes others; a bias or
not; a BatchNormalization after it or not; rarely auto_pad or a weight that is a graph input), the
identity X, BatchNormalization(X), Mul+Add of X by per-channel constants, an AveragePool (1-3,
centred or no pads, count_include_pad 0 or 1, maybe after a 1x1 Conv, maybe with a BatchNormalization
after it), and 1x1 -> k x k Convs (the 1x1 with or without bias, the k x k padded or not), summed by
Adds, a Sum, or Adds and Subs either way round, or concatenated along the channels (a Concat:
concat_branch, enabled for those). Rarely a
branch output is also a graph output. A spec whose model is not valid ONNX (branches of shapes that
do not add) is rejected. Each valid model goes through fold_model (and, in some examples, the command
line) and the checks of test_fuzz.py's oracle: valid, same inputs and outputs, outputs equal in
onnxruntime (ORT_DISABLE_ALL) within checks.py's bound, a second fold that finds nothing.
"""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import assume, given, note
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from builders import bn_stats
from checks import assert_close, check_valid, feeds_for, magnitudes, run
from onnxfold import fold_model
from test_fuzz import _check_cli, _io_signature, _seeded, _settings


@st.composite
def branch(draw, c: int, stride: int, identity_ok: bool):
    kinds = ["conv", "conv", "conv", "seq", "pool"] + (["identity", "bn", "affine"] if identity_ok else [])
    kind = draw(st.sampled_from(kinds))
    return {
        "kind": kind,
        "k": draw(st.sampled_from([1, 2, 3, 3, 5])),
        "pads": draw(st.sampled_from(["centred", "centred", "random", "zero", "off"])),
        "group": draw(st.sampled_from(["block", "block", "block", "other"])),
        "stride": draw(st.sampled_from(["block"] * 6 + ["other"])),
        "dilation": draw(st.sampled_from(["block"] * 6 + ["other"])),
        "bias": draw(st.booleans()),
        "bn": draw(st.booleans()),
        "pre_conv": draw(st.booleans()),
        "count_include_pad": draw(st.sampled_from([0, 1, 1])),
        "auto_pad": draw(st.sampled_from([None] * 15 + ["SAME_UPPER"])),
        "weight_input": draw(st.sampled_from([False] * 15 + [True])),
        "output": draw(st.sampled_from([False] * 12 + [True])),
        "seed": draw(st.integers(0, 2**16)),
    }


@st.composite
def branch_specs(draw, combine: str | None = None):
    c = draw(st.sampled_from([2, 4, 6]))
    stride = draw(st.sampled_from([1, 1, 1, 2]))
    cout = draw(st.sampled_from([c, c, c, 2 * c]))
    identity_ok = stride == 1 and cout == c
    return {
        "dims": draw(st.sampled_from([1, 2, 2])),
        "c": c,
        "cout": cout,
        "size": draw(st.integers(4, 9)),
        "group": draw(st.sampled_from([g for g in (1, 1, 2, c) if c % g == 0])),
        "stride": stride,
        "dilation": draw(st.sampled_from([1, 1, 1, 2])),
        "main_k": draw(st.sampled_from([1, 3, 3, 5])),
        "branches": draw(st.lists(branch(c, stride, identity_ok), min_size=1, max_size=4)),
        "sum": combine or draw(st.sampled_from(["adds", "adds", "sum", "subs", "concat"])),
        "dtype": draw(st.sampled_from(["float32", "float32", "float32", "float16"])),
        "entry": draw(st.sampled_from(["api"] * 5 + ["cli"])),
        "seed": draw(st.integers(0, 2**16)),
    }


class _B:
    def __init__(self, spec):
        self.spec = spec
        self.rng = np.random.default_rng(spec["seed"])
        self.np_dtype = np.float16 if spec["dtype"] == "float16" else np.float32
        self.elem = TensorProto.FLOAT16 if spec["dtype"] == "float16" else TensorProto.FLOAT
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []
        self.n = 0

    def name(self, prefix):
        self.n += 1
        return f"{prefix}{self.n}"

    def init(self, array, prefix="t"):
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(array).astype(self.np_dtype), name))
        return name

    def node(self, op, inputs, **attrs):
        out = self.name(op.lower() + "_")
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(op), **attrs))
        return out

    def conv(self, x, cin, cout, ks, group, pads, strides, dilations, bias, auto_pad=None, weight_input=False):
        shape = (cout, cin // group, *ks)
        w = self.rng.normal(0, 1 / np.sqrt(np.prod(shape[1:])), shape)
        if weight_input:
            wname = self.name("w_in")
            self.inputs.append(helper.make_tensor_value_info(wname, self.elem, list(shape)))
        else:
            wname = self.init(w, "w")
        inputs = [x, wname] + ([self.init(self.rng.normal(0, 0.5, cout), "b")] if bias else [])
        attrs = dict(kernel_shape=list(ks), group=group, strides=list(strides), dilations=list(dilations))
        if auto_pad:
            attrs["auto_pad"] = auto_pad
        else:
            attrs["pads"] = list(pads)
        return self.node("Conv", inputs, **attrs)

    def bn(self, x, c):
        stats = [self.init(a, s) for a, s in zip(bn_stats(self.rng, c), ("gamma", "beta", "mean", "var"))]
        return self.node("BatchNormalization", [x, *stats], epsilon=1e-3)


def _pads(item, k, d, dims, rng):
    """Begin and end pads for one kernel: centred, random begin (same output size), zero, or one off."""
    reach = d * (k - 1)
    begins, ends = [], []
    for _ in range(dims):
        mode = item["pads"]
        if mode == "centred" and reach % 2 == 0:
            b = e = reach // 2
        elif mode == "zero":
            b = e = 0
        else:
            b = int(rng.integers(0, reach + 1))
            e = reach - b + (int(rng.choice([-1, 1])) if mode == "off" else 0)
            e = max(e, 0)
        begins.append(b)
        ends.append(e)
    return begins + ends


def build_branch_model(spec) -> onnx.ModelProto:
    b = _B(spec)
    dims, c, cout, group = spec["dims"], spec["c"], spec["cout"], spec["group"]
    x = "x"
    b.inputs.append(helper.make_tensor_value_info(x, b.elem, [1, c] + [spec["size"]] * dims))
    s, d, k = spec["stride"], spec["dilation"], spec["main_k"]
    outs = [b.conv(x, c, cout, [k] * dims, group, [d * (k // 2)] * (2 * dims), [s] * dims, [d] * dims, True)]
    for item in spec["branches"]:
        rng = np.random.default_rng(item["seed"])
        groups = [v for v in (1, 2, c) if c % v == 0 and cout % v == 0]
        g = group if item["group"] == "block" else int(rng.choice(groups))
        st_ = s if item["stride"] == "block" else 3 - s
        dl = d if item["dilation"] == "block" else 3 - d
        kind, kk = item["kind"], item["k"]
        if kind == "conv":
            y = b.conv(x, c, cout, [kk] * dims, g, _pads(item, kk, dl, dims, rng), [st_] * dims, [dl] * dims,
                       item["bias"], item["auto_pad"], item["weight_input"])
        elif kind == "seq":
            h = b.conv(x, c, cout, [1] * dims, g, [0] * (2 * dims), [1] * dims, [1] * dims, item["bias"])
            kk = kk if kk % 2 else kk + 1
            pads = [0 if item["pads"] == "zero" else dl * (kk // 2)] * (2 * dims)
            y = b.conv(h, cout, cout, [kk] * dims, g, pads, [st_] * dims, [dl] * dims, True)
        elif kind == "pool":
            h = b.conv(x, c, cout, [1] * dims, g, [0] * (2 * dims), [1] * dims, [1] * dims, item["bias"]) \
                if item["pre_conv"] else x
            kk = min(kk, 3)
            pads = [kk // 2] * (2 * dims) if kk % 2 and item["pads"] != "zero" else [0] * (2 * dims)
            y = b.node("AveragePool", [h], kernel_shape=[kk] * dims, pads=pads, strides=[st_] * dims,
                       count_include_pad=item["count_include_pad"])
        elif kind == "identity":
            y = x
        elif kind == "bn":
            y = b.bn(x, c)
        else:
            shape = [1, c] + [1] * dims
            y = b.node("Add", [b.node("Mul", [x, b.init(rng.uniform(0.5, 1.5, shape), "s")]),
                               b.init(rng.normal(0, 0.5, shape), "t")])
        if item["bn"] and kind in ("conv", "seq", "pool"):
            y = b.bn(y, cout)
        if item["output"] and y != x:
            b.outputs.append(y)
        outs.append(y)
    if spec["sum"] == "sum":
        total = b.node("Sum", outs)
    elif spec["sum"] == "concat":
        total = b.node("Concat", outs, axis=1)
    else:
        total = outs[0]
        for o in outs[1:]:  # "subs": each an Add or a Sub, either way round
            op = "Sub" if spec["sum"] == "subs" and b.rng.random() < 0.5 else "Add"
            total = b.node(op, [o, total] if b.rng.random() < 0.5 else [total, o])
    b.outputs.append(b.node("Relu", [total]))
    vis = [helper.make_tensor_value_info(o, b.elem, None) for o in dict.fromkeys(b.outputs)]
    graph = helper.make_graph(b.nodes, "branches", b.inputs, vis, b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    try:  # the outputs' types as shape inference gives them; None when the branches do not add
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
    except Exception:  # noqa: BLE001
        return model
    known = {v.name: v for v in [*inferred.value_info, *inferred.output]}
    for v in model.graph.output:
        if v.name in known:
            v.CopyFrom(known[v.name])
    return model


def _valid(model) -> bool:
    try:
        onnx.checker.check_model(model, full_check=True)
        run(model, feeds_for(model, seed=0))
    except Exception:  # noqa: BLE001 - branches whose shapes do not add: not a model
        return False
    return True


def check_branch_example(spec) -> None:
    note(f"spec = {spec!r}")
    model = build_branch_model(spec)
    assume(_valid(model))
    feeds = feeds_for(model, seed=spec["seed"] % 1000)
    ref = run(model, feeds)
    exact = magnitudes(model, feeds)
    enable = ["concat_branch"] if spec["sum"] == "concat" else []
    folded, report = fold_model(model, enable=enable)
    where = f"fold_model on spec {spec!r}\n{report.summary(verbose=True)}"
    check_valid(folded)
    assert _io_signature(folded) == _io_signature(model), where
    assert_close(ref, run(folded, feeds), where, exact)
    again, second = fold_model(folded, enable=enable)
    assert not second.folded, f"{where}\nfolding the folded model folds again: {second.summary()}"
    if spec["entry"] == "cli" and not enable:  # the fuzzer's command line runs the default rules
        _check_cli({**spec, "entry": "cli"}, model, feeds, ref, exact, len(report.folded), report.bn_after)


@_settings()
@given(branch_specs())
@_seeded
def test_fuzz_branches_fold_exactly_or_decline(spec):
    check_branch_example(spec)


def test_branch_generator_merges_and_declines():
    """Guards the generator: among its valid models some merge and some are declined."""
    rules, declined = set(), set()

    @_settings(60)
    @given(branch_specs())
    def collect(spec):
        model = build_branch_model(spec)
        assume(_valid(model))
        _, report = fold_model(model, enable=["concat_branch"] if spec["sum"] == "concat" else [])
        rules.update(f.rule for f in report.folded)
        declined.update(d.rule for d in report.declined)

    collect()
    assert "branch_sum" in rules and "branch_sum" in declined, (rules, declined)
    rules.clear()
    declined.clear()

    @_settings(60)
    @given(branch_specs("concat"))
    def collect_concat(spec):
        model = build_branch_model(spec)
        assume(_valid(model))
        _, report = fold_model(model, enable=["concat_branch"])
        rules.update(f.rule for f in report.folded)
        declined.update(d.rule for d in report.declined)

    collect_concat()
    assert "concat_branch" in rules and "concat_branch" in declined, (rules, declined)
