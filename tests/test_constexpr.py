"""onnxfold.const_eval: every op of CONSTANT_EXPRESSION_OPS, at every version onnx.defs lists, against
onnxruntime (CPU, optimizations off, a one-node model at that opset, inputs as initializers).

Where onnxruntime has no kernel for an old version (it only guarantees opset >= 7) the case carries
a hand-computed expectation from the operator's documentation at that version; a case with neither
fails. Comparisons are exact (same dtype, shape and bits, NaN equal to NaN): these ops either move
data, or are single IEEE operations that are correctly rounded, so there is no tolerance to state.
Cases the specification calls errors (repeated or out-of-range axes, negative axes before they were
allowed) must be declined with a sentence, never evaluated.
"""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from checks import session
from onnxfold.affine import NotFoldable
from onnxfold.const_eval import OPS, evaluate
from onnxfold.const_resolve import CONSTANT_EXPRESSION_OPS

F32, F16, F64, I64, I32, I8, U8, BOOL = (np.float32, np.float16, np.float64, np.int64, np.int32, np.int8,
                                           np.uint8, np.bool_)
BF16 = ml_dtypes.bfloat16


@functools.cache
def versions(op: str) -> tuple[int, ...]:
    return tuple(sorted({s.since_version for s in onnx.defs.get_all_schemas_with_history()
                         if s.name == op and s.domain == ""}))


def a(values, dtype=F32):
    return np.array(values, dtype=dtype)


def rng_array(shape, dtype, seed=0):
    r = np.random.default_rng(seed)
    if np.dtype(dtype) == np.bool_:
        return r.random(shape) > 0.5
    if np.issubdtype(dtype, np.integer):
        return r.integers(-50 if np.issubdtype(dtype, np.signedinteger) else 0, 50, shape).astype(dtype)
    return r.normal(0, 3, shape).astype(dtype)


class Case:
    """``expect``: a hand-computed result; ``ort_as``: (version, attributes) of an equivalent node that
    onnxruntime can run, for an old version whose documentation differs only in how it is written."""

    def __init__(self, name, inputs, attrs=None, expect=None, ort_as=None):
        self.name, self.inputs, self.attrs, self.expect = name, list(inputs), dict(attrs or {}), expect
        self.ort_as = ort_as


def axes_case(v, name, data, axes, since_input=13, expect=None, attr="axes"):
    """axes as an attribute before ``since_input``, as an int64 input from it on."""
    if v >= since_input:
        return Case(name, [data, a(axes, I64)], {}, expect)
    return Case(name, [data], {attr: list(axes)}, expect)


# -- cases: (op, version) -> list of Case ------------------------------------------------------------------
def cases(op: str, v: int) -> list[Case]:
    out: list[Case] = []
    add = out.append
    if op == "Identity":
        for dt in (F32, F16, I64, BOOL):
            add(Case(f"{np.dtype(dt).name}", [rng_array((2, 3), dt)]))
        add(Case("empty", [np.zeros((0, 3), F32)]))
    elif op in ("Cast", "CastLike"):
        floats = a([0.0, -0.0, 1.5, -2.5, 3.7, -3.7, 100.9, -100.9, 1e-8, 2.5], F32)
        wide = a([0.0, 1.0 / 3, 65519.0, 65520.0, 7e4, -7e4, 1e-30, 3.4e38, np.inf, -np.inf, np.nan], F32)
        ints = a([0, 1, -1, 127, 128, -129, 300, 65535, 2**31 + 5, -(2**40) - 3], I64)
        sources = [("f32", floats), ("f32wide", wide), ("f64", floats.astype(F64)), ("f16", floats.astype(F16)),
                   ("i64", ints), ("i32", ints.astype(I32)), ("u8", np.abs(ints).astype(U8)),
                   ("bool", a([True, False, True], BOOL))]
        targets = [F32, F16, F64, I64, I32, I8, U8, BOOL]
        # The whole matrix at the first two and the last version; between them (versions that add
        # types) a quarter of it, a different quarter at each, to keep the suite fast.
        full = v in versions(op)[:2] + versions(op)[-1:]
        for si, (sname, src) in enumerate(sources):
            if op == "Cast" and v < 9 and src.dtype == BOOL:
                continue  # Cast-1/6 take no bool
            for ti, t in enumerate(targets):
                if not full and (si + ti + v) % 4:
                    continue
                if op == "Cast" and v < 9 and np.dtype(t) == BOOL:
                    continue
                if sname == "f32wide" and np.issubdtype(t, np.integer):
                    continue  # undefined in the spec: declined, tested below
                x = src
                if np.issubdtype(t, np.unsignedinteger) and src.dtype.kind == "f":
                    x = np.abs(src)
                if np.dtype(t) == F16 and src.dtype.kind in "iu":  # beyond float32's exact integers:
                    x = src[np.abs(src.astype(F64)) < 2**24]  # declined (double rounding), below
                to = helper.np_dtype_to_tensor_dtype(np.dtype(t))
                name = f"{sname}->{np.dtype(t).name}"
                if op == "Cast" and v < 6:  # Cast-1 names the type as a string; otherwise Cast-6
                    add(Case(name, [x], {"to": TensorProto.DataType.Name(to)}, ort_as=(6, {"to": to})))
                elif op == "Cast":
                    add(Case(name, [x], {"to": to}))
                else:
                    add(Case(name, [x, np.zeros(0, t)]))
        if v >= 13:  # bfloat16 from float32: round to nearest even (compared through a Cast back)
            x = a([1.0 + 2**-8 + 2**-16, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 3.3, 3.4e38, np.nan, -0.0, 1e-40], F32)
            if op == "Cast":
                add(Case("f32->bf16", [x], {"to": TensorProto.BFLOAT16}))
            else:
                add(Case("f32->bf16", [x, np.zeros(0, BF16)]))
    elif op == "Shape":
        for shape in [(2, 3, 4), (0, 5), ()]:
            add(Case(f"{shape}", [np.zeros(shape, F32)]))
        if v >= 15:
            for start, end in [(1, None), (-2, None), (0, -1), (5, 10), (-10, 2), (2, 1), (None, -5)]:
                attrs = {k: x for k, x in (("start", start), ("end", end)) if x is not None}
                add(Case(f"start{start}_end{end}", [np.zeros((2, 3, 4), I64)], attrs))
    elif op == "Size":
        for shape in [(2, 3), (0, 4), ()]:
            add(Case(f"{shape}", [np.zeros(shape, F32)]))
    elif op == "Slice":
        data = rng_array((4, 5, 6), F32)
        specs = [  # starts, ends, axes, steps
            ([1, 0], [3, 5], [0, 1], None),
            ([0, 1], [-1, 1000], None, None),
            ([-3], [2**31 - 1], [2], None),
            ([2, 1], [5, 4], [2, 0], None),  # unsorted axes
            ([3], [3], [1], None),  # empty result
            ([-100], [100], [0], None),
        ]
        if v >= 10:
            specs += [([5, 0], [-7, 6], [2, 1], [-2, 3]), ([-1], [-2**63], [1], [-1]), ([0], [6], [2], [4])]
        if v >= 11:
            specs += [([1, -4], [3, -1], [-1, -3], None), ([4], [0], [-2], [-1])]
        for i, (s, e, ax, st) in enumerate(specs):
            if v < 10:
                attrs = {"starts": s, "ends": e, **({"axes": ax} if ax is not None else {})}
                add(Case(f"attrs{i}", [data], attrs))
            else:
                ins = [data, a(s, I64), a(e, I64)]
                if ax is not None or st is not None:
                    ins.append(a(ax if ax is not None else list(range(len(s))), I64))
                if st is not None:
                    ins.append(a(st, I64))
                add(Case(f"inputs{i}", ins))
        if v >= 10:
            add(Case("int32_indices", [np.arange(10, dtype=I64), a([2], I32), a([8], I32), a([0], I32), a([3], I32)]))
            add(Case("empty_data", [np.zeros((0, 3), F32), a([0], I64), a([2], I64), a([1], I64)]))
    elif op == "Expand":
        for name, x, shape in [("grow", rng_array((3, 1), F32), [2, 1, 6]), ("scalar", a(2.5), [2, 3]),
                               ("bidirectional", rng_array((4, 1), I64), [1]),
                               ("ones_in_shape", rng_array((2, 3), BOOL), [1, 1, 3]),
                               ("empty", np.zeros((0, 1), F16), [0, 3]), ("to_empty", rng_array((1, 3), F32), [0, 1])]:
            add(Case(name, [x, a(shape, I64)]))
    elif op == "Concat":
        dts = (F32, F16) if v < 4 else (F32, I64, BOOL)
        for dt in dts:
            x, y = rng_array((2, 3), dt, 1), rng_array((2, 2), dt, 2)
            if v < 4:
                add(Case(f"default_axis_{np.dtype(dt).name}", [x, y]))
            add(Case(f"axis1_{np.dtype(dt).name}", [x, y], {"axis": 1}))
        add(Case("three_axis0", [rng_array((1, 3), F32), rng_array((2, 3), F32), rng_array((3, 3), F32)], {"axis": 0}))
        add(Case("empty_input", [np.zeros((0, 3), F32), rng_array((2, 3), F32)], {"axis": 0}))
        add(Case("one_input", [rng_array((2, 3), F32)], {"axis": 0}))
        if v < 4:  # onnxruntime has no Concat-1: the documented default axis is 1
            for c in out:
                c.expect = np.concatenate(c.inputs, axis=c.attrs.get("axis", 1))
        if v >= 11:
            add(Case("negative_axis", [rng_array((2, 3, 1), F32), rng_array((2, 3, 2), F32)], {"axis": -1}))
            add(Case("negative_axis0", [rng_array((2, 3), F32), rng_array((1, 3), F32)], {"axis": -2}))
    elif op == "Reshape":
        data = rng_array((2, 3, 4), F32)
        for i, shape in enumerate([[4, -1], [0, 12], [-1], [2, 0, 2, 2], [1, 24, 1], [0, 0, 4], [24]]):
            if v < 5:
                add(Case(f"attr{i}", [data], {"shape": shape}))
            else:
                add(Case(f"input{i}", [data, a(shape, I64)]))
        if v >= 5:
            add(Case("empty", [np.zeros((0, 3), I64), a([3, -1], I64)]))
            add(Case("scalar", [a([7.0]), a([], I64)]))
        if v >= 14:
            add(Case("allowzero", [np.zeros((0, 3), F32), a([3, 0], I64)], {"allowzero": 1}))
            add(Case("allowzero_plain", [data, a([4, 6], I64)], {"allowzero": 1}))
    elif op == "Unsqueeze":
        c5 = rng_array((5,), F32)
        add(axes_case(v, "multi_unsorted", c5, [1, 0, 2], expect=c5.reshape(1, 1, 1, 5)))  # issue 9, defect 3
        add(axes_case(v, "single", c5, [0], expect=c5.reshape(1, 5)))
        add(axes_case(v, "trailing", rng_array((3, 4), I64), [3, 2], expect=rng_array((3, 4), I64).reshape(3, 4, 1, 1)))
        add(axes_case(v, "interleaved", rng_array((3, 4), F32), [4, 0, 2],
                      expect=rng_array((3, 4), F32).reshape(1, 3, 1, 4, 1)))
        add(axes_case(v, "empty", np.zeros((0,), F32), [1], expect=np.zeros((0, 1), F32)))
        if v >= 11:
            c4 = rng_array((4,), F32)
            add(axes_case(v, "negative", c4, [-2, -1], expect=c4.reshape(4, 1, 1)))  # issue 9, defect 3
            add(axes_case(v, "mixed", c4, [-1, 0], expect=c4.reshape(1, 4, 1)))
            add(axes_case(v, "scalar", a(3.0), [-1], expect=a([3.0])))
    elif op == "Squeeze":
        data = rng_array((1, 3, 1, 2, 1), F32)
        if v < 13:
            add(Case("all", [data], {}, data.reshape(3, 2)))
        else:
            add(Case("all", [data], {}, data.reshape(3, 2)))
        add(axes_case(v, "unsorted", data, [4, 0], expect=data.reshape(3, 1, 2)))
        add(axes_case(v, "one", rng_array((1, 3), I64), [0], expect=rng_array((1, 3), I64).reshape(3)))
        add(axes_case(v, "empty", np.zeros((0, 1), F32), [1], expect=np.zeros((0,), F32)))
        if v >= 11:
            add(axes_case(v, "negative", data, [-1, -3], expect=data.reshape(1, 3, 2)))
    elif op == "Flatten":
        dts = (F32,) if v < 9 else (F32, I64, BOOL)
        for dt in dts:
            data = rng_array((2, 3, 4), dt)
            for axis in (0, 1, 2, 3) + ((-1, -3) if v >= 11 else ()):
                add(Case(f"{np.dtype(dt).name}_axis{axis}", [data], {"axis": axis},
                         data.reshape(int(np.prod(data.shape[:axis])), -1) if axis >= 0 else None))
        add(Case("default", [rng_array((2, 3, 4), F32)], {}, rng_array((2, 3, 4), F32).reshape(2, 12)))
        add(Case("empty", [np.zeros((2, 0, 3), F32)], {"axis": 2}, np.zeros((0, 3), F32)))
    elif op == "Transpose":
        data = rng_array((2, 3, 4), F32)
        add(Case("default", [data], {}, data.transpose()))
        add(Case("perm", [data], {"perm": [1, 2, 0]}, data.transpose(1, 2, 0)))
        add(Case("bool", [rng_array((2, 3), BOOL)], {"perm": [1, 0]}, rng_array((2, 3), BOOL).T))
        add(Case("empty", [np.zeros((0, 3), I64)], {}, np.zeros((3, 0), I64)))
    elif op == "Gather":
        data = rng_array((4, 5, 6), F32)
        add(Case("axis0", [data, a([3, 0, 3], I64)]))
        add(Case("axis1_2d", [data, a([[1, 2], [4, 0]], I64)], {"axis": 1}))
        add(Case("axis_neg_scalar", [data, a(2, I32)], {"axis": -1}))
        add(Case("int64_data", [rng_array((5,), I64), a([4, 1], I32)]))
        add(Case("empty_indices", [data, np.zeros((0,), I64)], {"axis": 2}))
        if v >= 11:
            add(Case("negative_indices", [data, a([-1, -6, 2], I64)], {"axis": 2}))
    elif op == "Tile":
        if v >= 6:
            for dt in (F32, I64, BOOL):
                add(Case(f"{np.dtype(dt).name}", [rng_array((2, 3), dt), a([2, 3], I64)]))
            add(Case("zero", [rng_array((2, 3), F32), a([0, 2], I64)]))
            add(Case("rank3", [rng_array((1, 2, 3), F32), a([3, 1, 2], I64)]))
    elif op == "Range":
        for name, start, limit, delta, dt in [("up", 3, 9, 3, I64), ("down", 10, 4, -2, I64), ("empty", 5, 5, 1, I32),
                                  ("none", 5, 1, 1, I64), ("inexact_count", 0, 10, 3, I32), ("f32", 0, 2, 0.5, F32),
                                  ("f64_down", 1.0, -2.0, -0.25, F64), ("f32_exact", -4, 4, 1, F32),
                                  ("int16", 1, 7, 2, np.int16)]:
            add(Case(name, [a(start, dt), a(limit, dt), a(delta, dt)]))
    elif op in ("Add", "Sub", "Mul", "Div"):
        fn = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[op]
        if v < 7:  # legacy broadcasting: hand-computed from its documentation
            A = rng_array((2, 3, 4), F32, 1)
            Bs = {"same": (rng_array((2, 3, 4), F32, 2) + 5, {}, lambda B: B),
                  "suffix": (rng_array((4,), F32, 3) + 5, {"broadcast": 1}, lambda B: B),
                  "suffix2": (rng_array((3, 4), F32, 3) + 5, {"broadcast": 1}, lambda B: B),
                  "axis0": (rng_array((2,), F32, 4) + 5, {"broadcast": 1, "axis": 0}, lambda B: B.reshape(2, 1, 1)),
                  "axis1": (rng_array((3,), F32, 5) + 5, {"broadcast": 1, "axis": 1}, lambda B: B.reshape(3, 1)),
                  "scalar": (a(4.0), {"broadcast": 1}, lambda B: B),
                  "one_element": (a([[4.0]]), {"broadcast": 1}, lambda B: B.reshape(()))}
            for name, (B, attrs, view) in Bs.items():
                add(Case(name, [A, B], attrs, fn(A, view(B)).astype(F32)))
            if v >= 6:
                ia, ib = a([[-7, 7, -7, 6], [0, 1, -1, 9]], I64), a([2, -2, -2, 4], I64)
                exp = {"Add": ia + ib, "Sub": ia - ib, "Mul": ia * ib,
                       "Div": a([[-3, -3, 3, 1], [0, 0, 0, 2]], I64)}[op]
                add(Case("int64_suffix", [ia, ib], {"broadcast": 1}, exp))
        else:
            for dt in (F32, F16, F64, I64, I32) + ((np.uint8,) if v >= 14 else ()):
                A, B = rng_array((2, 3), dt, 1), rng_array((3,), dt, 2)
                if dt == np.uint8:  # no wrap-around: integer overflow is declined (tested below)
                    A, B = (A % 10 + 10).astype(dt), (B % 5 + 1).astype(dt)
                if op == "Div" and np.issubdtype(dt, np.integer):
                    B = np.where(B == 0, 7, B).astype(dt)
                add(Case(f"{np.dtype(dt).name}_broadcast", [A, B]))
            add(Case("outer", [rng_array((2, 1), F32, 1), rng_array((1, 3), F32, 2) + 0.5]))
            add(Case("empty", [np.zeros((0, 3), F32), rng_array((3,), F32, 3) + 9]))
            add(Case("scalar_first", [a(3.0), rng_array((2, 2), F32, 4) + 9]))
            add(Case("rank_extend", [rng_array((4, 1, 2), F64, 1), rng_array((3, 1), F64, 2) + 9]))
            if op == "Div":
                add(Case("int_truncation", [a([-7, 7, -7, 7, -1, 0], I64), a([2, -2, -2, 2, 3, -3], I64)]))
                add(Case("int32_truncation", [a([-9, 9, -9, 9], I32), a([4, -4, -5, 5], I32)]))
                add(Case("float_specials", [a([1.0, -1.0, 0.0, np.inf, 1e-45]), a([0.0, 0.0, 0.0, np.inf, 3.0])]))
    elif op in ("Neg", "Sqrt", "Reciprocal", "Ceil", "Floor"):
        # Version 1 differs from 6 in consumed_inputs and types only; onnxruntime has no kernel for it,
        # so the expectation is the single IEEE operation itself (correctly rounded, exact to compare).
        fn = {"Neg": np.negative, "Sqrt": np.sqrt, "Reciprocal": lambda x: np.ones((), x.dtype) / x,
              "Ceil": np.ceil, "Floor": np.floor}[op]
        inputs = []
        for dt in (F32, F16, F64) + ((I64, I32, np.int8) if op == "Neg" and v >= 6 else ()):
            x = rng_array((2, 3), dt)
            if op in ("Ceil", "Floor"):
                x = (x * 7).astype(dt)  # fractions on both sides of 0 (whole numbers: in the specials)
            elif op != "Neg":
                x = np.abs(x) + dt(0.5) if dt in (F32, F16, F64) else x
            inputs.append((f"{np.dtype(dt).name}", x))
        inputs += [("specials", a([0.0, -0.0, np.inf, -np.inf, np.nan, -2.0, 1e-40, 3.0, 7.0, -0.5, 0.5, 2.5,
                                   -1e-40, 16777215.0, -3.5])),
                   ("empty", np.zeros((0, 2), F32))]
        for name, x in inputs:
            with np.errstate(all="ignore"):
                add(Case(name, [x], {}, fn(x) if v < 6 else None))
    return out


PARAMS = [pytest.param(op, v, c, id=f"{op}-{v}-{c.name}")
          for op in sorted(CONSTANT_EXPRESSION_OPS) for v in versions(op) for c in cases(op, v)]


def test_every_op_and_version_has_cases():
    """A new onnx that adds a version of one of these ops must come with cases (or a stated decline)."""
    assert set(CONSTANT_EXPRESSION_OPS) == set(OPS)
    missing = [(op, v) for op in CONSTANT_EXPRESSION_OPS for v in versions(op)
               if not cases(op, v) and (op, v) != ("Tile", 1)]
    assert not missing


def _model(op, v, case, out_dtype):
    names = [f"in{i}" for i in range(len(case.inputs))]
    node = helper.make_node(op, names, ["y"], **case.attrs)
    nodes, out_name = [node], "y"
    if out_dtype == np.dtype(BF16):  # onnxruntime's Python API cannot return bfloat16: cast back exactly
        nodes.append(helper.make_node("Cast", ["y"], ["y32"], to=TensorProto.FLOAT))
        out_name, out_dtype = "y32", np.dtype(F32)
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info(
        out_name, helper.np_dtype_to_tensor_dtype(out_dtype), None)],
        [numpy_helper.from_array(x, n) for x, n in zip(case.inputs, names)])
    opsets = [helper.make_opsetid("", v)]
    model = helper.make_model(graph, opset_imports=opsets)
    try:
        model.ir_version = helper.find_min_ir_version_for(opsets)
    except ValueError:  # opsets 2-4 are missing from onnx's table; they came with IR version 3
        model.ir_version = 3
    return model


def _ort(model):
    return session(model).run(None, {})[0]


def _same(got, want):
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    assert got.shape == want.shape, (got.shape, want.shape)
    if got.dtype.kind == "f" or got.dtype == np.dtype(BF16):
        g, w = got.astype(np.float64), want.astype(np.float64)
        assert np.array_equal(np.signbit(g), np.signbit(w)) or not g.size
        assert np.array_equal(g, w, equal_nan=True), (got, want)
    else:
        assert np.array_equal(got, want), (got, want)


@pytest.mark.parametrize("op,v,case", PARAMS)
def test_matches_onnxruntime(op, v, case):
    node = helper.make_node(op, [f"in{i}" for i in range(len(case.inputs))], ["y"], **case.attrs)
    [got] = evaluate(node, {f"in{i}": x for i, x in enumerate(case.inputs)}, v)
    model = _model(op, v, case, got.dtype)
    try:
        want = _ort(model)
    except Exception as e:
        # No kernel for the version; or, for float16 at opset 1, onnxruntime inserts a Cast with an
        # integer 'to' into the opset-1 model (where Cast-1 wants a string) and rejects its own graph.
        if "NOT_IMPLEMENTED" not in str(e) and "InsertedPrecisionFreeCast" not in str(e):
            raise
        if case.ort_as is not None:
            version, attrs = case.ort_as
            want = _ort(_model(op, version, Case(case.name, case.inputs, attrs), got.dtype))
        elif case.expect is None:
            pytest.fail(f"onnxruntime has no {op}-{v} kernel and the case has no hand expectation")
        else:
            want = case.expect
    else:
        if case.expect is not None:
            _same(np.asarray(case.expect), want)  # the hand expectation agrees with the runtime too
    if got.dtype == np.dtype(BF16):
        got = got.astype(F32)
    _same(got, np.asarray(want))


# -- declines: what the specification calls an error, or leaves undefined, is never evaluated ------------
C5 = rng_array((5,), F32)
X13 = rng_array((1, 3), F32)
DECLINES = [
    ("Unsqueeze", 11, [C5], {"axes": [0, 0]}, "same axis twice"),
    ("Unsqueeze", 13, [C5, a([1, -2], I64)], {}, "same axis twice"),
    ("Unsqueeze", 1, [C5], {"axes": [-1]}, "negative"),
    ("Unsqueeze", 11, [C5], {"axes": [2]}, "out of range"),
    ("Unsqueeze", 13, [C5], {}, "missing its input"),
    ("Squeeze", 13, [X13, a([1], I64)], {}, "not 1"),
    ("Squeeze", 11, [rng_array((1, 1, 3), F32)], {"axes": [0, -3]}, "same axis twice"),
    ("Squeeze", 1, [X13], {"axes": [-2]}, "negative"),
    ("Squeeze", 13, [X13, np.zeros(0, I64)], {}, "empty axes"),
    ("Range", 27, [a(0, F16), a(4, F16), a(1, F16)], {}, "float16"),
    ("Slice", 10, [X13, a([0], I64), a([1], I64), a([-1], I64)], {}, "negative"),
    ("Slice", 13, [X13, a([0, 1], I64), a([1, 2], I64), a([1, 1], I64)], {}, "same axis twice"),
    ("Slice", 13, [X13, a([0], I64), a([1], I64), a([1], I64), a([0], I64)], {}, "step 0"),
    ("Slice", 13, [X13, a([0], I64), a([1, 2], I64)], {}, "differ in length"),
    ("Concat", 4, [X13, X13], {"axis": -1}, "negative"),
    ("Concat", 13, [X13, rng_array((2, 2), F32)], {"axis": 0}, "differ off the axis"),
    ("Concat", 13, [X13, rng_array((3,), F32)], {"axis": 0}, "same rank"),
    ("Flatten", 9, [X13], {"axis": -1}, "negative"),
    ("Flatten", 13, [X13], {"axis": 3}, "out of range"),
    ("Gather", 1, [C5, a([-1], I64)], {}, "out of range"),
    ("Gather", 13, [C5, a([5], I64)], {}, "out of range"),
    ("Gather", 13, [C5, a([-6], I64)], {}, "out of range"),
    ("Reshape", 13, [C5, a([-1, -1], I64)], {}, "invalid"),
    ("Reshape", 14, [C5, a([0, -1], I64)], {"allowzero": 1}, "both 0 and -1"),
    ("Reshape", 13, [C5, a([2, 3], I64)], {}, "number of elements"),
    ("Reshape", 13, [C5, a([1, 0, 5], I64)], {}, "copies dimension"),
    ("Reshape", 13, [np.zeros((0, 3), F32), a([0, -1], I64)], {}, "cannot infer"),
    ("Transpose", 13, [rng_array((2, 3, 4), F32)], {"perm": [0, 0, 1]}, "not a permutation"),
    ("Expand", 13, [rng_array((2, 3), F32), a([4, 3], I64)], {}, "does not broadcast"),
    ("Expand", 13, [C5, a([-1, 5], I64)], {}, "negative"),
    ("Tile", 1, [X13, a(2.0), a(0.0)], {}, "repeats elements or copies"),
    ("Tile", 13, [X13, a([2], I64)], {}, "do not fit"),
    ("Range", 11, [a(0, I64), a(5, I64), a(0, I64)], {}, "delta 0"),
    ("Range", 11, [a(0.1), a(3.0), a(0.1)], {}, "precision"),
    ("Range", 11, [a(0.0), a(1.0), a(0.1)], {}, "running sum"),
    ("Range", 11, [a(0.0), a(np.inf), a(1.0)], {}, "finite"),
    ("Div", 13, [a([1, 2], I64), a([1, 0], I64)], {}, "division by zero"),
    ("Div", 13, [a([-(2**63)], I64), a([-1], I64)], {}, "overflows"),
    ("Add", 13, [a([2**62], I64), a([2**62], I64)], {}, "overflows"),
    ("Sub", 14, [a([1], U8), a([2], U8)], {}, "overflows"),
    ("Mul", 14, [a([100], np.int8), a([2], np.int8)], {}, "overflows"),
    ("Neg", 13, [a([-128, 1], np.int8)], {}, "overflows"),
    ("Add", 6, [X13, rng_array((3, 1), F32)], {}, "must match"),
    ("Add", 6, [rng_array((2, 3, 4), F32), rng_array((2, 4), F32)], {"broadcast": 1}, "contiguous"),
    ("Add", 6, [rng_array((2, 3), F32), rng_array((3,), F32)], {"broadcast": 1, "axis": -1}, "contiguous"),
    ("Add", 14, [a([1.0], BF16), a([2.0], BF16)], {}, "bfloat16"),
    ("Sqrt", 13, [a([2.0], BF16)], {}, "bfloat16"),
    ("Ceil", 13, [a([2.5], BF16)], {}, "bfloat16"),
    ("Add", 13, [a([True], BOOL), a([False], BOOL)], {}, "does not take bool"),
    ("Add", 13, [a([1.0]), a([1], I64)], {}, "differ in type"),
    ("Add", 7, [X13, rng_array((2,), F32)], {}, "do not broadcast"),
    ("Cast", 13, [a([np.nan, 1.0])], {"to": TensorProto.INT32}, "NaN or infinity"),
    ("Cast", 13, [a([3e9])], {"to": TensorProto.INT32}, "out of the range"),
    ("Cast", 13, [a([-1.0])], {"to": TensorProto.UINT8}, "out of the range"),
    ("Cast", 13, [a([128.5])], {"to": TensorProto.INT8}, "out of the range"),
    ("Cast", 13, [a([1.0])], {"to": TensorProto.STRING}, "string"),
    ("Cast", 13, [np.array(["1.5"], dtype=object)], {"to": TensorProto.FLOAT}, "string"),
    ("Cast", 1, [a([1.0])], {"to": "NOT_A_TYPE"}, "names no tensor data type"),
    ("Cast", 19, [a([1.0])], {"to": TensorProto.FLOAT8E4M3FN}, "float8e4m3fn"),
    ("Cast", 13, [a([1.0 + 2**-40], F64)], {"to": TensorProto.BFLOAT16}, "bfloat16"),
    ("Cast", 13, [a([1.0 + 2**-11 + 2**-40], F64)], {"to": TensorProto.FLOAT16}, "rounds differently"),
    ("Cast", 13, [a([2**31 + 5], I64)], {"to": TensorProto.FLOAT16}, "rounds differently"),
    ("CastLike", 15, [a([1.0]), np.zeros(0, dtype=object)], {}, "string"),
    ("Shape", 13, [X13], {"start": 1}, "no attribute 'start'"),
    ("Identity", 13, [X13], {"alpha": 1.0}, "no attribute 'alpha'"),
]


@pytest.mark.parametrize("op,v,inputs,attrs,reason", DECLINES,
                         ids=[f"{d[0]}-{d[1]}-{d[4].replace(' ', '_')}" for d in DECLINES])
def test_declines_with_a_sentence(op, v, inputs, attrs, reason):
    node = helper.make_node(op, [f"in{i}" for i in range(len(inputs))], ["y"], name="n", **attrs)
    with pytest.raises(NotFoldable, match=reason) as info:
        evaluate(node, {f"in{i}": x for i, x in enumerate(inputs)}, v)
    assert str(info.value).startswith(f"cannot evaluate the constant {op} node 'n': ")


def test_unknown_op_and_domain_decline():
    with pytest.raises(NotFoldable, match="not an operator evaluated here"):
        evaluate(helper.make_node("Relu", ["x"], ["y"]), {"x": C5}, 14)
    with pytest.raises(NotFoldable, match="not an operator evaluated here"):
        evaluate(helper.make_node("Add", ["x", "x"], ["y"], domain="com.example"), {"x": C5}, 14)
    with pytest.raises(NotFoldable, match="not a constant"):
        evaluate(helper.make_node("Add", ["x", "z"], ["y"]), {"x": C5}, 14)


# -- Constant and ConstantOfShape (evaluated in Scope._node_constant) ----------------------------------------
def _constant_cases(v):
    out = [("tensor_f32", {"value": numpy_helper.from_array(rng_array((2, 3), F32), "t")}),
           ("tensor_i64_scalar", {"value": numpy_helper.from_array(a(7, I64), "t")})]
    if v >= 12:
        out += [("value_float", {"value_float": 2.5}), ("value_floats", {"value_floats": [1.5, -2.0]}),
                ("value_int", {"value_int": -3}), ("value_ints", {"value_ints": [4, 5, 6]})]
    return out


CONSTANT_PARAMS = [pytest.param(v, name, attrs, id=f"Constant-{v}-{name}")
                   for v in versions("Constant") for name, attrs in _constant_cases(v)]


@pytest.mark.parametrize("v,name,attrs", CONSTANT_PARAMS)
def test_constant_matches_onnxruntime(v, name, attrs):
    from onnxfold.const_eval import constant_value

    node = helper.make_node("Constant", [], ["y"], **attrs)
    got = constant_value(node, v)
    graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info(
        "y", helper.np_dtype_to_tensor_dtype(got.dtype), None)])
    opsets = [helper.make_opsetid("", v)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = helper.find_min_ir_version_for(opsets)
    _same(got, _ort(model))


@pytest.mark.parametrize("attrs,reason", [
    ({"value_strings": ["a"]}, "not a number"),
    ({"value": helper.make_tensor("t", TensorProto.STRING, [1], [b"a"])}, "string"),
    ({"sparse_value": helper.make_sparse_tensor(numpy_helper.from_array(a([1.0]), "v"),
                                                numpy_helper.from_array(a([0], I64), "i"), [3])}, "sparse"),
    ({"value_float": 1.0, "value_int": 1}, "exactly one"),
    ({}, "exactly one"),
], ids=["strings", "string_tensor", "sparse", "two", "none"])
def test_constant_declines(attrs, reason):
    from onnxfold.const_eval import constant_value

    with pytest.raises(NotFoldable, match=reason):
        constant_value(helper.make_node("Constant", [], ["y"], **attrs), 13)


def test_constant_value_float_before_opset_12_is_declined():
    """value_float came with Constant-12; at opset 11 it is not part of the operator."""
    from onnxfold.const_eval import constant_value

    with pytest.raises(NotFoldable, match="no attribute 'value_float'"):
        constant_value(helper.make_node("Constant", [], ["y"], value_float=1.0), 11)


COS_PARAMS = [pytest.param(v, shape, value, id=f"ConstantOfShape-{v}-{shape}-{name}")
              for v in versions("ConstantOfShape")
              for shape in ([2, 3], [], [0, 4])
              for name, value in [("default", None), ("f32", a([1.5])), ("i64", a([-7], I64)),
                                  ("f16", a([0.1], F16)), ("bool", a([True], BOOL)), ("i32", a([3], I32))]]


@pytest.mark.parametrize("v,shape,value", COS_PARAMS)
def test_constant_of_shape_matches_onnxruntime(v, shape, value):
    from onnxfold.const_eval import constant_of_shape

    attrs = {} if value is None else {"value": numpy_helper.from_array(value, "v")}
    node = helper.make_node("ConstantOfShape", ["s"], ["y"], **attrs)
    got = constant_of_shape(node, a(shape, I64), v)
    case = Case("c", [a(shape, I64)], attrs)
    _same(got, _ort(_model("ConstantOfShape", v, case, got.dtype)))


@pytest.mark.parametrize("shape,attrs,reason", [
    ([2, -1], {}, "negative"),
    ([2], {"value": numpy_helper.from_array(a([1.0, 2.0]), "v")}, "one element"),
    ([[2]], {}, "1-D"),
    ([2], {"value": helper.make_tensor("v", TensorProto.STRING, [1], [b"a"])}, "cannot make string"),
])
def test_constant_of_shape_declines(shape, attrs, reason):
    """Before, a negative dimension reached np.full and crashed with a ValueError."""
    from onnxfold.const_eval import constant_of_shape

    with pytest.raises(NotFoldable, match=reason):
        constant_of_shape(helper.make_node("ConstantOfShape", ["s"], ["y"], **attrs), a(shape, I64), 13)


# -- through fold_model: issue 9, defect 3 -----------------------------------------------------------------
def _conv_mul_by_unsqueezed(k, axes, opset, spatial=(6, 5)):
    """x [1,3,H,W] -> Conv (len(k) output channels) -> Mul by Unsqueeze(k, axes) -> y."""
    rng = np.random.default_rng(3)
    cout = 5 if len(k) != 4 else 4
    w = rng.normal(0, 0.5, (cout, 3, 1, 1)).astype(F32)
    b = rng.normal(0, 0.5, cout).astype(F32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"), numpy_helper.from_array(k, "k")]
    if opset >= 13:
        inits.append(numpy_helper.from_array(a(axes, I64), "axes"))
        unsq = helper.make_node("Unsqueeze", ["k", "axes"], ["s"], name="unsqueeze")
    else:
        unsq = helper.make_node("Unsqueeze", ["k"], ["s"], axes=list(axes), name="unsqueeze")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[1, 1], name="conv"), unsq,
             helper.make_node("Mul", ["c", "s"], ["y"], name="mul")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, *spatial])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout, *spatial])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    return model


def _outputs(model, x):
    return session(model).run(None, {"x": x})[0]


def test_unsqueeze_11_unsorted_axes_is_not_taken_for_per_channel():
    """Guards issue 9, defect 3: onnx.reference's Unsqueeze-11 inserts axes [1,0,2] one at a time and
    made [1,5,1,1] of a [5] constant; the spec (and onnxruntime) make [1,1,1,5], which scales the last
    (width) axis of the Conv's [1,5,6,5] output, not its channels. fold_model folded it as per-channel
    and returned a model off by 60% of its output's scale. It must decline, and the model must still
    compute what the original does."""
    from onnxfold import fold_model

    k = a([0.5, 2.0, -1.5, 3.0, 0.25])
    model = _conv_mul_by_unsqueezed(k, [1, 0, 2], 11)
    folded, report = fold_model(model)
    assert not report.folded, report.summary()
    assert [n.op_type for n in folded.graph.node].count("Mul") == 1
    assert any(d.consumer == "mul" and "[1, 1, 1, 5]" in d.reason for d in report.declined), report.summary()
    x = np.random.default_rng(0).normal(0, 1, (1, 3, 6, 5)).astype(F32)
    want, got = _outputs(model, x), _outputs(folded, x)
    np.testing.assert_array_equal(got, want)  # nothing folded: bit-identical


@pytest.mark.parametrize("opset", [11, 13])
def test_unsqueeze_negative_axes_fold_per_channel(opset):
    """Guards issue 9, defect 3: Unsqueeze(k[4], axes=[-2,-1]) is [4,1,1], a per-channel scale of a
    4-channel Conv; onnx.reference's evaluation made it be declined. It folds, and matches the original
    in onnxruntime within float32 rounding: |diff| <= 1e-5 * max|y| (the fold rescales weights once)."""
    from onnxfold import fold_model

    k = a([0.5, 2.0, -1.5, 3.0])
    model = _conv_mul_by_unsqueezed(k, [-2, -1], opset)
    folded, report = fold_model(model)
    assert len(report.folded) == 1, report.summary()
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    onnx.checker.check_model(folded, full_check=True)
    x = np.random.default_rng(1).normal(0, 1, (1, 3, 6, 5)).astype(F32)
    want, got = _outputs(model, x), _outputs(folded, x)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_constant_of_shape_with_a_negative_dimension_is_no_crash():
    """Before, Scope._node_constant passed a negative dimension to np.full, and fold_model crashed
    with 'ValueError: negative dimensions are not allowed'. Now the Mul is simply not a candidate."""
    from onnxfold import fold_model

    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1], name="conv"),
             helper.make_node("ConstantOfShape", ["shp"], ["s"], value=numpy_helper.from_array(a([2.0]), "v")),
             helper.make_node("Mul", ["c", "s"], ["y"], name="mul")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(rng_array((4, 3, 1, 1), F32), "w"),
                               numpy_helper.from_array(a([4, -1, 1], I64), "shp")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    folded, report = fold_model(model)
    assert not report.folded
    assert [n.op_type for n in folded.graph.node] == ["Conv", "ConstantOfShape", "Mul"]


# -- seeded random axes: whenever constexpr evaluates, onnxruntime agrees ------------------------------------
def _random_axes_case(r, op, v):
    rank = int(r.integers(0, 4)) if op != "Slice" else int(r.integers(1, 4))
    shape = tuple(int(d) for d in r.choice([1, 2, 3, 0], rank, p=[0.4, 0.25, 0.25, 0.1]))
    data = rng_array(shape, F32, int(r.integers(1 << 30)))
    if op == "Unsqueeze":
        n = int(r.integers(1, 4))
        out_rank = rank + n
        axes = [int(x) for x in r.integers(-out_rank - 1, out_rank + 1, n)]
        return axes_case(v, "random", data, axes)
    if op == "Squeeze":
        if rank == 0:
            return None
        ones = [i for i, d in enumerate(shape) if d == 1] if r.random() < 0.8 else list(range(rank))
        if not ones:
            return None
        axes = [int(i - rank * r.integers(0, 2)) for i in r.choice(ones, int(r.integers(1, len(ones) + 1)))]
        return axes_case(v, "random", data, axes)
    n = int(r.integers(1, rank + 1))
    axes = [int(x) for x in r.integers(-rank, rank, n)]
    starts = [int(x) for x in r.integers(-5, 5, n)]
    ends = [int(x) for x in r.choice([-5, -1, 0, 1, 2, 5, 2**62, -2**62], n)]
    steps = [int(x) for x in r.choice([-3, -1, 1, 2], n)]
    return Case("random", [data, a(starts, I64), a(ends, I64), a(axes, I64), a(steps, I64)])


@pytest.mark.parametrize("op,v", [("Unsqueeze", 11), ("Unsqueeze", 13), ("Squeeze", 11), ("Squeeze", 13),
                                  ("Slice", 11), ("Slice", 13)])
def test_random_axes_agree_with_onnxruntime(op, v):
    """Seeded: negative, unsorted and repeated axes, size-0 and size-1 dimensions. Every evaluated case
    matches onnxruntime exactly; every declined case has a reason (and the evaluated ones are many)."""
    r = np.random.default_rng(2024 + v)
    evaluated = 0
    for _ in range(120):
        case = _random_axes_case(r, op, v)
        if case is None:
            continue
        node = helper.make_node(op, [f"in{i}" for i in range(len(case.inputs))], ["y"], **case.attrs)
        try:
            [got] = evaluate(node, {f"in{i}": x for i, x in enumerate(case.inputs)}, v)
        except NotFoldable as e:
            assert str(e)
            continue
        evaluated += 1
        _same(got, _ort(_model(op, v, case, got.dtype)))
    assert evaluated >= 30


def _conv_bias_from_shape_of(weight: str, *, overridable=None):
    """x -> Conv(w, bias = Expand(Constant 0.25, Shape(``weight``, end=1))) -> BN -> y: the dynamo exporter's
    Conv bias, sized from Shape of a weight (timm mobileone_s0 and repvgg_a0, optimize=False)."""
    from builders import bn_stats

    rng = np.random.default_rng(7)
    w = rng.normal(0, 0.5, (6, 3, 3, 3)).astype(F32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w.copy(), "w2")]
    inits += [numpy_helper.from_array(v, n) for n, v in zip(("g", "b", "m", "v"), bn_stats(rng, 6))]
    nodes = [helper.make_node("Constant", [], ["quarter"], value=numpy_helper.from_array(np.array(0.25, F32))),
             helper.make_node("Shape", [weight], ["wshape"], end=1),
             helper.make_node("Expand", ["quarter", "wshape"], ["bias"]),
             helper.make_node("Conv", ["x", "w", "bias"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 5])]
    if overridable is not None:  # the weight is also a graph input, declared of this shape
        inputs.append(helper.make_tensor_value_info(weight, TensorProto.FLOAT, overridable))
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


def test_shape_of_a_weight_reads_its_dims_not_its_bytes(monkeypatch):
    """Shape of an initializer is its dims: the fold reads the Conv's weight once (for its new values), and
    the weight the bias is sized from, which nothing else reads, not at all."""
    import onnxfold.const_resolve as const_resolve
    from onnxfold import fold_model

    reads: list[str] = []
    real = const_resolve.read_tensor

    def counting(t, *args, **kwargs):
        reads.append(t.name)
        return real(t, *args, **kwargs)

    monkeypatch.setattr(const_resolve, "read_tensor", counting)
    x = np.random.default_rng(8).normal(size=(1, 3, 5, 5)).astype(F32)
    for weight in ("w", "w2"):
        model = _conv_bias_from_shape_of(weight)
        reads.clear()
        folded, report = fold_model(model)
        assert [f.rule for f in report.folded] == ["conv_bn"]
        assert reads.count("w") == 1 and "w2" not in reads
        assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
        np.testing.assert_allclose(_outputs(folded, x), _outputs(model, x), rtol=1e-5, atol=1e-5)


def test_shape_of_a_weight_that_is_also_a_graph_input_is_its_declared_shape():
    """An initializer that is also a graph input (IR >= 4) can be fed at run time: Shape of it is what its
    declaration fixes (onnxruntime refuses a feed of another shape), and not a constant where the
    declaration leaves a dimension open: the bias sized from it is not, and the fold is declined."""
    from onnxfold import fold_model

    _, fixed = fold_model(_conv_bias_from_shape_of("w2", overridable=[6, 3, 3, 3]))
    assert [f.rule for f in fixed.folded] == ["conv_bn"]
    _, report = fold_model(_conv_bias_from_shape_of("w2", overridable=["m", 3, 3, 3]))
    assert not report.folded
    assert any("is computed by an Expand node, not a constant" in d.reason for d in report.declined)
