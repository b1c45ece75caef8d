"""Which fold tensors verification compares: each fold in the main graph is compared at the tensor it
rewrote (exposed as an extra output of both models) unless it cannot be, and then the report says why;
which fold tensors each graph output depends on (for the floor of its tolerance)."""

from __future__ import annotations

import mmap
import re
from pathlib import Path

import onnx
from onnx import helper

from ..errors import VerifyError
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



BRANCHES = ("then_branch", "else_branch")


def force_branches(ref_model, candidate, folds, result: VerifyResult) -> tuple[tuple[bytes, bytes], list[str]]:
    """A fold inside an If branch is exercised only when the inputs take that branch. For each branch of
    an If of the main graph that holds folds, both models get a copy of that If whose condition is a
    constant choosing the branch, its outputs added as graph outputs (``<output>__onnxfold_then`` ...):
    the branch runs on the real inputs' values whatever the condition says, and its outputs are compared
    like graph outputs. Returns (the bytes to append to each model, the forced outputs). A fold in an If
    branch that cannot be forced so (a nested If, an If not found again) raises :class:`VerifyError`:
    a fold no input exercised is not verified. Notes each fold in ``result.unchecked``."""
    in_branch = [f for f in folds or () if _RE_BRANCH.search(f.graph)]
    if not in_branch:
        return (b"", b""), []
    cand_model = candidate if isinstance(candidate, onnx.ModelProto) else onnx.load(str(candidate),
                                                                                     load_external_data=False)
    ifs = [(f"main/{n.name or f'If#{i}'}.{b}", n, b) for i, n in enumerate(ref_model.graph.node)
           if n.op_type == "If" and n.domain in ("", "ai.onnx") for b in BRANCHES]
    cand_ifs = {tuple(n.output): n for n in cand_model.graph.node if n.op_type == "If"}
    taken = {o for n in ref_model.graph.node for o in (*n.input, *n.output)} | {
        v.name for v in (*ref_model.graph.input, *ref_model.graph.initializer)}
    forced: dict[str, list[str]] = {}
    appended = (onnx.GraphProto(), onnx.GraphProto())
    cannot = []
    for f in in_branch:
        ref_if = _branch_of(f, ifs)
        cand_if = cand_ifs.get(tuple(ref_if[0].output)) if ref_if else None
        if ref_if is None or cand_if is None:
            cannot.append(f.graph)
            continue
        if f.graph not in forced:
            node, branch = ref_if
            forced[f.graph] = _force(node, cand_if, branch, taken, appended)
        result.unchecked[f.output or f"{f.producer} + {f.consumer}"] = (
            f"inside a subgraph, an If branch ({f.graph}): that branch was run on its own (its If's condition "
            f"forced) and compared at the If's output(s) {', '.join(forced[f.graph])}")
    if cannot:
        raise VerifyError(f"{len(cannot)} fold(s) inside If branches that verification cannot run on their own "
                          f"({', '.join(sorted(set(cannot)))}): the inputs may never take them, and a fold no input "
                          "exercised is not verified; --no-verify writes the model unverified")
    result.notes.append(f"{len(in_branch)} fold(s) inside If branches: each such branch was also run on its own, "
                        "its If's condition forced, and compared at that If's outputs (<output>__onnxfold_then, "
                        "__onnxfold_else)")
    ref_nodes, cand_nodes = (onnx.ModelProto(graph=g).SerializeToString() for g in appended)
    return (ref_nodes, cand_nodes), [name for names in forced.values() for name in names]


_RE_BRANCH = re.compile(r"\.(then|else)_branch(/|$)")


def _branch_of(f, ifs) -> tuple[onnx.NodeProto, str] | None:
    """The main-graph If and branch that hold fold ``f`` (at the path ``f.graph``, directly): the If its
    path names whose branch has the fold's consumer; else the one If whose branch has it (a path's
    ``If#<index>`` counts the nodes of the round it was folded in). None when that is not one If."""
    def holds(node, branch) -> bool:
        g = next(a.g for a in node.attribute if a.name == branch)
        return any((n.name or f"{n.op_type}#{k}") == f.consumer for k, n in enumerate(g.node))

    named = [(n, b) for path, n, b in ifs if path == f.graph and holds(n, b)]
    if len(named) == 1:
        return named[0]
    if "/" in f.graph[len("main/"):].replace(".then_branch", "").replace(".else_branch", "").rstrip("/"):
        return None  # a nested graph (or a name with "/": refused rather than guessed)
    holding = [(n, b) for _, n, b in ifs if holds(n, b) and f.graph.endswith("." + b)]
    return holding[0] if len(holding) == 1 else None


def _force(ref_if, cand_if, branch: str, taken: set[str], appended) -> list[str]:
    """Append to each graph of ``appended`` a copy of its model's If with the condition fixed to
    ``branch``; the copies' outputs (graph outputs) are returned."""
    suffix = "__onnxfold_" + branch.split("_")[0]
    cond = _unique(f"{ref_if.output[0]}{suffix}_cond", taken)
    outs = [_unique(o + suffix, taken) if o else "" for o in ref_if.output]
    body = next(a.g for a in ref_if.attribute if a.name == branch)
    for node, graph in zip((ref_if, cand_if), appended):
        graph.node.append(helper.make_node("Constant", [], [cond], value=helper.make_tensor(
            cond, onnx.TensorProto.BOOL, [], [branch == "then_branch"])))
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = (node.name or "If") + suffix
        copy.input[0] = cond
        del copy.output[:]
        copy.output.extend(outs)
        graph.node.append(copy)
        for name, value in zip(outs, body.output):
            if name:
                info = onnx.ValueInfoProto(name=name, type=value.type)
                if info.type.HasField("tensor_type"):
                    info.type.tensor_type.ClearField("shape")
                graph.output.append(info)
    return [o for o in outs if o]


def _unique(name: str, taken: set[str]) -> str:
    k, candidate = 0, name
    while candidate in taken:
        k += 1
        candidate = f"{name}_{k}"
    taken.add(candidate)
    return candidate
