"""What the folded model keeps: names, untouched shared weights, metadata; what it sweeps."""

import glob
import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from builders import conv_bn_model, count
from onnxfold import fold_model, verify


def test_inputs_outputs_names_order_and_types_are_unchanged():
    model = conv_bn_model(batch="N")
    model.graph.output.insert(0, helper.make_tensor_value_info("x2", onnx.TensorProto.FLOAT, None))
    model.graph.node.insert(0, helper.make_node("Neg", ["x"], ["x2"]))
    folded, report = fold_model(model)
    assert len(report.folded) == 1
    assert [v.SerializeToString() for v in folded.graph.input] == [v.SerializeToString() for v in model.graph.input]
    assert [v.SerializeToString() for v in folded.graph.output] == [v.SerializeToString() for v in model.graph.output]


def test_shared_weight_is_never_modified():
    """Two Convs read 'w'; only one is followed by BN. 'w' keeps its bytes; the fold writes a new tensor."""
    model = conv_bn_model()
    w_before = next(t for t in model.graph.initializer if t.name == "w").SerializeToString()
    model.graph.node.append(helper.make_node("Conv", ["x", "w"], ["c2"], kernel_shape=[3, 3]))
    model.graph.output.append(helper.make_tensor_value_info("c2", onnx.TensorProto.FLOAT, None))
    folded, report = fold_model(model)
    assert len(report.folded) == 1
    inits = {t.name: t for t in folded.graph.initializer}
    assert inits["w"].SerializeToString() == w_before
    assert report.folded[0].weight == "w_folded" and "w_folded" in inits
    assert "b" not in inits and "b_folded" in inits  # 'b' had no other reader: swept
    assert verify(model, folded)


def test_unused_initializers_and_stale_value_info_are_removed():
    model = conv_bn_model()
    model.graph.value_info.append(helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [1, 6, 4, 4]))
    model.graph.initializer.append(numpy_helper.from_array(np.ones(3, np.float32), "unrelated"))
    folded, _ = fold_model(model)
    names = {t.name for t in folded.graph.initializer}
    assert names == {"w_folded", "b_folded", "unrelated"}  # only what the fold orphaned goes
    assert not [v for v in folded.graph.value_info if v.name == "c"]


def test_metadata_doc_strings_opsets_and_functions_are_kept():
    model = conv_bn_model()
    model.doc_string = "model doc"
    model.graph.doc_string = "graph doc"
    model.producer_name = "exporter"
    helper.set_model_props(model, {"author": "me", "license": "mit"})
    model.opset_import.append(helper.make_opsetid("custom.domain", 3))
    fn = helper.make_function("custom.domain", "Twice", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"])],
                              [helper.make_opsetid("", 17)])
    model.functions.append(fn)
    folded, _ = fold_model(model)
    assert folded.doc_string == "model doc" and folded.graph.doc_string == "graph doc"
    assert folded.producer_name == "exporter"
    assert {p.key: p.value for p in folded.metadata_props} == {"author": "me", "license": "mit"}
    assert [(o.domain, o.version) for o in folded.opset_import] == [(o.domain, o.version) for o in model.opset_import]
    assert [f.SerializeToString() for f in folded.functions] == [fn.SerializeToString()]
    assert folded.ir_version == model.ir_version


def test_folding_a_folded_model_changes_nothing():
    model = onnx.load(os.path.join(os.path.dirname(__file__), "..", "models", "resnet_block.onnx"))
    once, r1 = fold_model(model)
    twice, r2 = fold_model(once)
    assert len(r1.folded) == 10 and not r2.folded
    assert twice.SerializeToString() == once.SerializeToString()


def test_ir3_initializers_listed_as_inputs_fold_and_pass_the_checker():
    model = conv_bn_model(ir_version=3, opset=8)
    for t in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    onnx.checker.check_model(model)
    folded, report = fold_model(model)
    assert len(report.folded) == 1
    onnx.checker.check_model(folded, full_check=True)
    inputs = [v.name for v in folded.graph.input]
    assert inputs == ["x", "w_folded", "b_folded"]
    assert verify(model, folded)


LIGHT = sorted(glob.glob(os.path.join(os.path.dirname(onnx.__file__), "backend/test/data/light/light_*.onnx")))


@pytest.mark.parametrize("path", [p for p in LIGHT if any(k in p for k in ("resnet50", "inception_v2", "shufflenet",
                                                                          "densenet121"))],
                         ids=os.path.basename)
def test_onnx_light_models_ir3_constantofshape_weights(path):
    """IR 3, every initializer a graph input, weights made by ConstantOfShape."""
    model = onnx.load(path)
    folded, report = fold_model(model)
    assert report.folded and not report.declined, report.summary()
    onnx.checker.check_model(folded)
    # densenet's BNs after Concat/Relu have no producer; every other BN folds.
    assert count(folded, "BatchNormalization") == len(report.left)
    assert verify(model, folded)
