"""A fold tensor compared where its inputs are the original's.

Each fold rounds its new weights once; through a deep network those roundings compound. MobileNetV2 in
float16 (52 folds): a fold tensor differs from the original's by 2e-4 of its scale at the first fold and
by 2.6e-2 at the last, while the original run in float16 stays within 3e-4 of the same model run in
float32: what reaches the last folds is the error of the folds before them, not their own. So a fold
tensor that fails the direct comparison is compared once more, computed by the folded model's nodes
that make it (the fold's node, the layout ops after it) from the original's values of their inputs:
only its own fold's rounding is left, held to the same tolerance. It passes when that comparison
passes; a fold whose weights are wrong fails both.

The nodes are found by walking up the folded model from the fold tensor to tensors that mean the same
in both models: the graph inputs, the other fold tensors, and the outputs of nodes the fold left as
they were (same op, attributes and inputs, each input the same in both). A walk that meets a node with
a subgraph, or grows past :data:`MOST_NODES`, gives up: the direct comparison stands.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from ..protobuf import PROTOBUF_LIMIT, parse_in_place, subgraphs
from ..tensors import is_utf8
from .inputs import feed_specs
from .memory import SMALL, inferred_shapes, known_dtype, structure_of_file
from .sessions import ort_source, session
from .tolerances import channel_view

MOST_NODES = 64  # a fold's own nodes: its node and the layout ops after it, a few
SUFFIX = "__onnxfold_local"


def _structure(model, weights: bool) -> onnx.ModelProto:
    """The model of a job; from a file, without its large weights unless ``weights``: then with them
    where they lie in the file (:func:`_weights_in_place`), for the model of the fold tensors' nodes."""
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, bytes):
        return onnx.ModelProto.FromString(model)
    return _weights_in_place(model) if weights else structure_of_file(model)


def _weights_in_place(path) -> onnx.ModelProto:
    """The model at ``path`` with each large initializer pointing at its bytes in the file itself (external
    data at the file's name, :func:`~onnxfold.protobuf.parse_in_place`): a local model takes the few it
    needs by reference, and onnxruntime reads only those from the file (:func:`_run_local` points
    it at the file's folder). timm mobileone_s0, legacy export (17.7 MB): 12.6 ms of parse otherwise."""
    real = os.path.realpath(path)
    name = os.path.basename(real)
    if not is_utf8(name):  # an external data location is a UTF-8 string
        return onnx.load(os.fspath(path), load_external_data=False)
    fd = os.open(real, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        return parse_in_place(fd, SMALL, name)[0]
    finally:
        os.close(fd)


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return next(subgraphs(node), None) is not None


def _left_alone(node: onnx.NodeProto, ref: onnx.NodeProto) -> bool:
    return (node.op_type == ref.op_type and node.domain == ref.domain and list(node.input) == list(ref.input)
            and list(node.output) == list(ref.output) and not _has_subgraph(node)
            and [a.SerializeToString() for a in node.attribute] == [a.SerializeToString() for a in ref.attribute])


def same_in_both(reference: onnx.ModelProto, candidate: onnx.ModelProto, folds: set[str]) -> set[str]:
    """The candidate's tensors that hold the same values as the reference's of that name (up to the
    rounding of the folds before them): graph inputs, fold tensors, outputs of nodes left alone. An
    initializer of the same name is the same (a fold's new values take fresh names: ModelView.fresh)."""
    ref_producer = {o: n for n in reference.graph.node for o in n.output if o}
    ref_inits = {t.name for t in reference.graph.initializer}
    inits = {t.name for t in candidate.graph.initializer} & ref_inits
    same = ({i.name for i in reference.graph.input} & {i.name for i in candidate.graph.input}) - ref_inits
    for node in candidate.graph.node:
        ref = ref_producer.get(node.output[0]) if node.output else None
        if ref is not None and _left_alone(node, ref) and all(not x or x in same or x in inits for x in node.input):
            same.update(o for o in node.output if o)
        same.update(o for o in node.output if o in folds)
    return same


class Producers:
    """A model's producer of each tensor (a node's position) and its initializers' names, read once for
    every walk in it (a corpus model's ~1000 nodes: 0.7 ms a walk otherwise)."""

    def __init__(self, model: onnx.ModelProto):
        self.producer = {o: i for i, n in enumerate(model.graph.node) for o in n.output if o}
        self.inits = {t.name for t in model.graph.initializer}


class Parsed:
    """The original as :func:`compare_on_random` reads it (its weights in place, its :class:`Producers`),
    parsed ahead: by the child while it waits for the plan (:func:`.job.run_job`), off the path after the
    write (paddle2onnx's PP-OCRv4 rec, weights in Constant nodes: 27 ms)."""

    def __init__(self, model):
        self.model = _structure(model, weights=True)
        self.index = Producers(self.model)


def fold_nodes(candidate: onnx.ModelProto, target: str, same: set[str],
               index: Producers | None = None) -> tuple[list[int], set[str]] | None:
    """(the positions of the candidate's nodes that make ``target`` from tensors of ``same`` and
    initializers, the tensors of ``same`` they read); None when the walk gives up. ``index``: the
    candidate's :class:`Producers`, when walks are many."""
    index = Producers(candidate) if index is None else index
    producer, inits = index.producer, index.inits
    nodes: set[int] = set()
    reads: set[str] = set()
    todo, seen = [target], set()
    while todo:
        name = todo.pop()
        if not name or name in seen:
            continue
        seen.add(name)
        if name != target and name in same:
            reads.add(name)
            continue
        if name in inits:
            continue
        i = producer.get(name)
        if i is None or len(nodes) >= MOST_NODES:
            return None
        node = candidate.graph.node[i]
        if _has_subgraph(node):
            return None
        nodes.add(i)
        todo.extend(node.input)
    return sorted(nodes), reads


def compare_locally(job, provider: str, names: list[str], ref_out: dict, compare_fold, timings: dict) -> dict:
    """The fold tensors ``names`` (which failed the direct comparison) compared again where their inputs
    are the original's: {name: OutputComparison} for those that could be (see the module)."""
    began = time.perf_counter()
    try:
        reference, candidate = _structure(job.reference, weights=False), _structure(job.candidate, weights=True)
        same = same_in_both(reference, candidate, set(job.fold_tensors))
        walks: dict[str, tuple[list[int], set[str]]] = {}
        index = Producers(candidate)
        for name in names:
            walk = fold_nodes(candidate, name, same, index)
            if walk is not None:
                walks[name] = walk
        if not walks:
            return {}
        needed = sorted(set().union(*(reads for _, reads in walks.values())))
        values = _original_values(job, provider, needed, ref_out)
        local = _run_local(job, candidate, walks, values, provider)  # values: by the names the walks read
    finally:
        timings["local_s"] = timings.get("local_s", 0.0) + time.perf_counter() - began
    return {name: compare_fold(job, name, ref_out[name], local[name + SUFFIX]) for name in walks}


def _original_values(job, provider: str, names: list[str], known: dict) -> dict:
    """The original's values of ``names`` on the job's inputs (those not run already)."""
    missing = [n for n in names if n not in known]
    if not missing:
        return {n: known[n] for n in names}
    sess = session(*ort_source(job.reference, [(n, None) for n in missing]), provider=provider)
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, job.feeds)))
    return {n: (known[n] if n in known else out[n]) for n in names}


def _run_local(job, model: onnx.ModelProto, walks: dict, values: dict, provider: str, model_path=None) -> dict:
    """One model of the fold tensors' own nodes in ``model`` (the candidate's, or the original's: their
    outputs renamed, so that a fold tensor another one reads as an input is also made here), fed
    ``values`` (the original's, or random ones). ``model_path``: where ``model``'s external data lies
    (default: the job's candidate's)."""
    model_path = job.candidate if model_path is None else model_path
    positions = sorted(set().union(*(set(nodes) for nodes, _ in walks.values())))
    made = {o for i in positions for o in model.graph.node[i].output if o}
    inputs = sorted(values)
    nodes = []
    for i in positions:
        node = onnx.NodeProto()
        node.CopyFrom(model.graph.node[i])
        node.input[:] = [x + SUFFIX if x in made else x for x in node.input]
        node.output[:] = [x + SUFFIX if x else x for x in node.output]
        nodes.append(node)
    read = {x for n in nodes for x in n.input}
    graph = helper.make_graph(
        nodes, "onnxfold_local",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(values[n].dtype), values[n].shape)
         for n in inputs],
        [helper.make_empty_tensor_value_info(name + SUFFIX) for name in walks],
        [t for t in model.graph.initializer if t.name in read])
    local = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    local.functions.extend(model.functions)
    data = local.SerializeToString()
    if len(data) > PROTOBUF_LIMIT:
        raise ValueError("the fold tensors' own nodes are over 2 GiB")
    folder = str(Path(model_path).resolve().parent) if isinstance(model_path, (str, os.PathLike)) else None
    sess = session(data, folder, provider=provider)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {n: values[n] for n in inputs})))


def compare_on_random(job, provider: str, names: list[str], ref_out: dict, compare_fold, timings: dict,
                      seed: int = 0, shapes: dict | None = None, parsed: Parsed | None = None) -> dict:
    """The fold tensors ``names`` compared where their inputs are random values, not the model's: each
    made by the folded model's own nodes for it (as :func:`compare_locally` finds them) and by the
    original's nodes from the same tensors, both fed the same values (:func:`_random_values`). A fold
    whose channels the model's inputs do not reach (a depthwise Conv after a ReLU that is 0 there) is
    exercised so. ``shapes``: (element type, shape) by name as shape inference told them on the job's
    inputs already (:func:`.memory.inferred_shapes`; inferred again here where they do not cover).
    ``parsed``: the job's reference, parsed ahead (:class:`Parsed`). {name: OutputComparison} for those
    that could be."""
    began = time.perf_counter()
    try:
        parsed = Parsed(job.reference) if parsed is None else parsed
        reference, candidate = parsed.model, _structure(job.candidate, weights=True)
        same = same_in_both(reference, candidate, set(job.fold_tensors))
        walks: dict[str, tuple[tuple[list[int], set[str]], tuple[list[int], set[str]]]] = {}
        ours_index, theirs_index = Producers(candidate), parsed.index
        for name in names:
            ours = fold_nodes(candidate, name, same, ours_index)
            theirs = fold_nodes(reference, name, ours[1], theirs_index) if ours is not None else None
            if ours is not None and theirs is not None and theirs[1] <= ours[1]:
                walks[name] = ours, theirs
        if not walks:
            return {}
        needed = sorted(set().union(*(ours[1] for ours, _ in walks.values())))
        values = _random_values(job, provider, reference, needed, ref_out, np.random.default_rng(seed), shapes)
        cand = _run_local(job, candidate, {n: w[0] for n, w in walks.items()}, values, provider)
        ref = _run_local(job, reference, {n: w[1] for n, w in walks.items()},
                         {n: values[n] for n in set().union(*(w[1][1] for w in walks.values()))}, provider,
                         model_path=job.reference)
    finally:
        timings["random_s"] = timings.get("random_s", 0.0) + time.perf_counter() - began
    return {name: compare_fold(job, name, ref[name + SUFFIX], cand[name + SUFFIX]) for name in walks}


def _random_values(job, provider: str, reference: onnx.ModelProto, names: list[str], ref_out: dict,
                   rng: np.random.Generator, known: dict | None = None) -> dict[str, np.ndarray]:
    """Random values for ``names``: of the shapes the job's inputs have (a graph input) or shape inference
    gives them on those inputs (``known``, else inferred here), uniform in [-1, 1) where all are float; else
    on the original's values (a run of it: their shapes and scales; those not float as they are)."""
    specs = feed_specs(job.feeds)
    rest = [n for n in names if n not in specs]
    told = (known if known is not None and set(rest) <= known.keys()
            else inferred_shapes(reference, specs, rest) if rest else {})
    shapes = {n: specs[n] if n in specs else (known_dtype(told[n][0]), told[n][1])  # (dtype, shape)
              for n in names if n in specs or n in told}
    if all(n in shapes and _is_float(shapes[n][0]) for n in names):
        return {n: _uniform(rng, shapes[n][1], np.dtype(shapes[n][0])) for n in names}
    return {n: _random_like(rng, v) for n, v in _original_values(job, provider, names, ref_out).items()}


def _is_float(dtype: np.dtype | None) -> bool:
    return dtype is not None and (dtype.kind == "f" or dtype.name == "bfloat16")


def _uniform(rng: np.random.Generator, shape, dtype: np.dtype, scale: float = 1.0) -> np.ndarray:
    """Values of ``dtype`` uniform in [-scale, scale): every channel of a fold is exercised by values of
    either sign (normal ones, drawn by numpy at 9 ns each, took 13 ms of a 5.7 MB model's comparison;
    these take 2 ns). Drawn and scaled in float32 where that holds the dtype's values, else in float64:
    no value passes ``scale``, which is finite in ``dtype``."""
    out = rng.random(shape, dtype=np.float32 if dtype.itemsize <= 4 else np.float64)
    out *= 2
    out -= 1
    if scale != 1.0:
        out *= scale
    return out if out.dtype == dtype else out.astype(dtype)


def _random_like(rng: np.random.Generator, value) -> np.ndarray:
    """Uniform values of ``value``'s shape and float dtype, on its scale (1 where it is 0 or not finite);
    a value that is not float, as it is (a shape, an index)."""
    value = np.asarray(value)
    if not _is_float(value.dtype):
        return value
    with np.errstate(over="ignore", invalid="ignore"):
        scale = float(np.max(np.abs(value.astype(np.float64)))) if value.size else 0.0
    scale = scale if math.isfinite(scale) and scale > 0 else 1.0
    return _uniform(rng, value.shape, value.dtype, scale)


def idle_channels(value, axis: int) -> list[int]:
    """The channels of ``axis`` whose every element is one value on these inputs (a fold there is not
    exercised: its weights multiply zeros); none for a tensor of fewer than 2 dimensions."""
    value = np.asarray(value)
    if value.ndim < 2 or not value.size:
        return []
    axis %= value.ndim
    if value.size // value.shape[axis] < 2:
        return []
    view = channel_view(value, axis)
    with np.errstate(invalid="ignore"):
        return [int(c) for c in np.flatnonzero(view.max(axis=(0, 2)) == view.min(axis=(0, 2)))]
