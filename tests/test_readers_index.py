"""GraphView.readers_of answers from an index built once a view and kept by ModelView.apply's edits (it
scanned every node at each call: 0.34 -> 0.22 s folding PP-OCRv4's recognizer, 0.44 -> 0.24 s timm's
mobileone_s0 dynamo export, outputs byte for byte the same). Checked here against that scan after every
edit of every fold of real models and of fan-out and branch-merge patterns."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from builders import conv_bn_model
from checks import MODELS
from onnxfold import fold_model
from onnxfold.graph import GraphView, ModelView

CORPUS = Path(__file__).resolve().parent / "corpus"
FILES = sorted(MODELS.glob("*.onnx")) + sorted(CORPUS.rglob("*.onnx"))


def _scan(view: GraphView, name: str) -> list[int]:
    return [i for i, node in enumerate(view.graph.node) if i not in view.removed and name in node.input]


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(p.parent.parent)))
def test_the_index_matches_a_scan_after_every_edit(path, monkeypatch):
    real = ModelView.apply
    edits = []

    def apply(self, view, edit):
        for name in {x for node in view.graph.node for x in node.input}:
            view.readers_of(name)  # the index is built before the edit, so the edit has to keep it
        real(self, view, edit)
        edits.append(edit)
        names = {x for node in view.graph.node for x in node.input} | set(edit.inputs.values())
        for name in names:
            assert view.readers_of(name) == _scan(view, name), (name, edit)

    monkeypatch.setattr(ModelView, "apply", apply)
    model = onnx.load(str(path))
    fold_model(model, base_dir=path.parent, enable=["concat_branch"])
    if any(n.op_type == "BatchNormalization" for n in model.graph.node):
        assert edits  # the check above ran



def _fresh(view: GraphView, name: str, shapes: bool) -> bool:
    """constant_like as a walk of its own, with nothing kept from earlier walks (and nothing kept after)."""
    saved, edits = view.constants._like, view.constants._edits
    view.constants._like = {False: {}, True: {}}
    try:
        return view.constants._made_of_constants(name, shapes=shapes)
    finally:
        view.constants._like, view.constants._edits = saved, edits


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(p.parent.parent)))
def test_what_constant_like_keeps_matches_a_fresh_walk_after_every_edit(path, monkeypatch):
    """Constants keeps what constant_like decided until the next edit (PaddleOCR's recognizer: fold
    0.27 -> 0.15 s, outputs byte for byte the same). Every value is asked before each edit, and after it
    the kept answers are compared with fresh walks of the edited graph."""
    real = ModelView.apply
    edits = []

    def apply(self, view, edit):
        names = sorted({x for node in view.graph.node for x in (*node.input, *node.output) if x})
        for name in names:
            for shapes in (False, True):
                view.constants._made_of_constants(name, shapes=shapes)
        real(self, view, edit)
        edits.append(edit)
        for name in names:
            for shapes in (False, True):
                got = view.constants._made_of_constants(name, shapes=shapes)
                assert got == _fresh(view, name, shapes), (name, shapes, edit)

    monkeypatch.setattr(ModelView, "apply", apply)
    model = onnx.load(str(path))
    fold_model(model, base_dir=path.parent, enable=["concat_branch"])
    if any(n.op_type == "BatchNormalization" for n in model.graph.node):
        assert edits


def test_an_edit_forgets_what_constant_like_kept():
    view = ModelView(conv_bn_model()).graphs[0]
    assert view.constant_like("w") and not view.constant_like("c")
    assert view.constants._like[False] == {"w": True, "c": False}
    view.model.edits += 1  # as ModelView.apply counts each edit
    assert not view.constant_like("y")
    assert view.constants._like[False] == {"y": False}
