"""Which fold tensors verification compares: each fold in the main graph is compared at the tensor it
rewrote (exposed as an extra output of both models) unless it cannot be, and then the report says why;
which fold tensors each graph output depends on (for the floor of its tolerance)."""

from __future__ import annotations

import mmap
from pathlib import Path

import onnx

from ..protobuf import GRAPH_NODE, MODEL_GRAPH, NODE_OUTPUT, PROTOBUF_LIMIT, all_graphs, fields, subgraphs
from .results import VerifyResult
from .sessions import extra_outputs

ELEM_TYPES = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16,
               "float64": onnx.TensorProto.DOUBLE, "bfloat16": onnx.TensorProto.BFLOAT16}


def main_outputs(model) -> set[str]:
    """Names of the tensors the main graph's nodes write, from a ModelProto or a model file (read as
    protobuf's wire format, without parsing the weights)."""
    if isinstance(model, onnx.ModelProto):
        return {o for n in model.graph.node for o in n.output if o}
    with open(model, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        names: set[str] = set()
        for graph in fields(buf, 0, len(buf), MODEL_GRAPH):
            for node in fields(buf, graph[0], graph[1], GRAPH_NODE):
                names.update(bytes(buf[a:b]).decode("utf-8", "replace") for a, b in fields(buf, *node, NODE_OUTPUT))
        names.discard("")
        return names


def feeders(model: onnx.ModelProto, wanted: set[str]) -> dict[str, list[str]]:
    """For each graph output, the tensors of ``wanted`` it depends on (through the main graph's nodes
    and the outer-scope names their subgraphs read)."""
    producer = {o: n for n in model.graph.node for o in n.output if o}

    def reads(node):
        names = list(node.input)
        for _, sub in subgraphs(node):
            for g in all_graphs(sub):
                for n in g.node:
                    names.extend(n.input)
        return [x for x in names if x]

    result = {}
    for out in model.graph.output:
        seen, todo, found = set(), [out.name], []
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in wanted:
                found.append(name)
            node = producer.get(name)
            if node is not None:
                todo.extend(reads(node))
        result[out.name] = found
    return result


def plan_folds(ref_model, reference, candidate, folds, outputs: set[str], result: VerifyResult):
    """Which fold tensors to compare, which to add as outputs, which fold tensors each graph output
    depends on, and whether every fold is checked (itself or at a later link of its chain). Fills
    ``result.unchecked`` and ``result.notes``."""
    checked: list[str] = []
    expose: list[tuple[str, int]] = []
    if not folds:
        return checked, expose, {}, False
    ref_names = main_outputs(ref_model)
    cand_names = main_outputs(candidate)
    uncovered = 0
    for f in folds:
        name = getattr(f, "output", "")
        if name in result.unchecked or name in checked:
            continue
        if name and f.graph == "main" and name in ref_names and name not in cand_names:
            # a later fold of the same chain rewrote it again
            result.unchecked[name] = "rewritten again by a later fold of its chain: checked at that fold's tensor"
            continue
        why = _why_not_at_its_tensor(f, name, ref_names)
        if why:
            result.unchecked[name or f"{f.producer} + {f.consumer}"] = why
            uncovered += 1
            continue
        checked.append(name)
        if name not in outputs:
            expose.append((name, ELEM_TYPES[f.dtype]))
    if expose and max(model_size(reference), model_size(candidate)) + len(extra_outputs(expose)) > PROTOBUF_LIMIT:
        for name, _ in expose:
            checked.remove(name)
            result.unchecked[name] = "not exposed (the model is near 2 GiB): covered by the graph outputs alone"
        uncovered += len(expose)
        expose = []
        result.notes.append("the model's file is too near protobuf's 2 GiB limit to add outputs: its folds "
                            "are covered by the graph outputs alone")
    if uncovered:
        result.notes.append(f"{uncovered} fold(s) could not be compared at their own tensors: the graph outputs "
                            "alone cover them, each output at its own scale")
    all_checked = uncovered == 0 and bool(checked)
    depends = feeders(ref_model, set(checked)) if all_checked else {}
    return checked, expose, depends, all_checked


def _why_not_at_its_tensor(f, name: str, ref_names: set[str]) -> str:
    """Why a fold cannot be compared at the tensor it rewrote ("" when it can)."""
    if not name:
        return "its tensor is not known: covered by the graph outputs alone"
    if getattr(f, "changed_later", ""):
        return f"changed again in place by a later fold ({f.changed_later}): covered by the graph outputs alone"
    if f.graph != "main":
        where = "a function" if f.graph.startswith("function") else "a subgraph"
        return f"inside {where} ({f.graph}): covered by the graph outputs alone"
    if name not in ref_names:
        return "not a tensor of the original's main graph (an inlined function): covered by the graph outputs alone"
    if f.dtype not in ELEM_TYPES:
        return f"dtype {f.dtype}: covered by the graph outputs alone"
    return ""


def model_size(model) -> int:
    return model.ByteSize() if isinstance(model, onnx.ModelProto) else Path(model).stat().st_size

