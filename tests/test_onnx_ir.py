"""onnx_ir.Model, onnx_ir.Graph and torch.onnx.ONNXProgram through fold_model and fold_conv_bn: folded in
place and returned; the result runs like the original in onnxruntime (ORT_DISABLE_ALL, tests/checks.py's
tolerance: 1e-4 x the output's scale + 1e-4 relative, float32). Skipped without onnx_ir (or torch, for
the exporter's objects)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from builders import conv_bn_model, count
from checks import assert_close, check_valid, feeds_for, run
from onnxfold import fold_conv_bn, fold_model, rule_names

ROOT = Path(__file__).resolve().parent.parent


def _net():
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx_ir")
    pytest.importorskip("onnxscript")  # torch's dynamo exporter needs it

    class Net(torch.nn.Module):
        """Conv(no bias)+BN, Conv+BN+residual, BN before a 1x1 Conv, Linear+BN1d, and a Linear with nothing to fold."""

        def __init__(self) -> None:
            super().__init__()
            self.c1, self.b1 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8)
            self.c2, self.b2 = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
            self.b0, self.c3 = torch.nn.BatchNorm2d(8), torch.nn.Conv2d(8, 8, 1)
            self.fc, self.b3 = torch.nn.Linear(8, 6), torch.nn.BatchNorm1d(6)
            self.head = torch.nn.Linear(6, 4)

        def forward(self, x):
            y = torch.relu(self.b1(self.c1(x)))
            y = torch.relu(self.b2(self.c2(y)) + y)
            y = self.c3(self.b0(y))
            return self.head(torch.relu(self.b3(self.fc(y.mean((2, 3))))))

    torch.manual_seed(0)
    net = Net()
    for bn in (net.b0, net.b1, net.b2, net.b3):  # non-trivial statistics: a fold with defaults is invisible
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-1, 1)
    return net.eval(), torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def exported():
    """One dynamo export (optimize=False) and its proto; each test builds its own program from the proto."""
    net, x = _net()  # skips without torch, onnx_ir or onnxscript
    import torch

    program = torch.onnx.export(net, (x,), dynamo=True, optimize=False, verbose=False)
    return net, x, program.model_proto, program.exported_program


def _program(exported):
    import onnx_ir as ir
    import torch

    _, _, proto, ep = exported
    return torch.onnx.ONNXProgram(ir.from_proto(proto), ep)


def _ops(graph) -> list[str]:
    return [n.op_type for n in graph]


def test_dynamo_export_with_optimize_false_keeps_batchnorm_and_the_program_folds_in_place(exported, tmp_path):
    import onnx_ir as ir
    import torch

    net, x, proto, _ = exported
    assert _ops(ir.from_proto(proto).graph).count("BatchNormalization") == 4
    program = _program(exported)
    before = program(x)[0]  # makes an inference session of the unfolded model
    graph, first_input = program.model.graph, program.model.graph.inputs[0]
    head = program.model.graph.initializers["head.weight"]
    head_tensor = head.const_value
    names = {n.name for n in graph}

    result, report = fold_model(program)

    assert result is program and program.model.graph is graph and graph.inputs[0] is first_input
    assert "BatchNormalization" not in _ops(graph)
    # the residual relu(b2(c2(y)) + y) is a Conv and the identity of its input: one Conv (branch_sum)
    assert (report.bn_before, report.bn_after, len(report.folded)) == (4, 0, 5)
    assert {f.rule for f in report.folded} == {"conv_bn", "bn_conv", "gemm_bn", "branch_sum"}
    assert {f.consumer for f in report.folded} <= names  # the report names the exporter's nodes
    assert graph.initializers["head.weight"] is head  # untouched weights stay the caller's objects
    assert head.const_value is head_tensor
    with torch.no_grad():
        expected = net(x).numpy()
    for got in (program(x)[0], program.call_reference(x)[0]):  # both run the folded model
        assert_close({"y": before.numpy()}, {"y": got.numpy()}, "ONNXProgram")
        assert_close({"y": expected}, {"y": got.numpy()}, "ONNXProgram against torch")
    program.save(tmp_path / "folded.onnx")
    check_valid(tmp_path / "folded.onnx")
    saved = onnx.load(tmp_path / "folded.onnx")
    assert count(saved, "BatchNormalization") == 0
    feeds = {proto.graph.input[0].name: x.numpy()}
    assert_close(run(proto, feeds), run(saved, feeds), "saved ONNXProgram")


def test_fold_conv_bn_returns_the_program(exported):
    program = _program(exported)
    assert fold_conv_bn(program) is program
    assert "BatchNormalization" not in _ops(program.model.graph)


def test_what_onnxscripts_optimizer_leaves_is_folded():
    net, x = _net()
    import torch

    program = torch.onnx.export(net, (x,), dynamo=True, optimize=True, verbose=False)
    original = program.model_proto
    assert count(original, "BatchNormalization") == 1  # BatchNormalization before a Conv: onnxscript keeps it
    tensors = {name: v.const_value for name, v in program.model.graph.initializers.items()}
    _, report = fold_model(program)
    kept = {name: v.const_value for name, v in program.model.graph.initializers.items() if name in tensors}
    assert kept and all(t is tensors[name] for name, t in kept.items())  # not copied: still torch's tensors
    assert "TorchTensor" in {type(t).__name__ for t in kept.values()}
    # the residual y + Conv(y) merges into the Conv (branch_sum, issue 19)
    assert [f.rule for f in report.folded] == ["branch_sum", "bn_conv"] and report.bn_after == 0
    feeds = {original.graph.input[0].name: x.numpy()}
    assert_close(run(original, feeds), run(program.model_proto, feeds), "optimize=True")


def test_onnx_ir_model_with_external_data(exported, tmp_path):
    import onnx_ir as ir

    _, x, proto, _ = exported
    ir.save(ir.from_proto(proto), tmp_path / "m.onnx", external_data="m.onnx.data", size_threshold_bytes=0)
    model = ir.load(tmp_path / "m.onnx")
    head = model.graph.initializers["head.weight"]
    assert isinstance(head.const_value, ir.ExternalTensor)

    assert fold_model(model)[0] is model
    assert "BatchNormalization" not in _ops(model.graph)
    assert model.graph.initializers["head.weight"] is head and isinstance(head.const_value, ir.ExternalTensor)
    ir.save(model, tmp_path / "folded.onnx", external_data="folded.onnx.data")
    check_valid(tmp_path / "folded.onnx")
    feeds = {proto.graph.input[0].name: x.numpy()}
    assert_close(run(tmp_path / "m.onnx", feeds), run(tmp_path / "folded.onnx", feeds), "onnx_ir.Model")


@pytest.mark.parametrize("bias", [True, False])
def test_onnx_ir_graph_is_folded_in_place(bias):
    ir = pytest.importorskip("onnx_ir")
    model = conv_bn_model(bias=bias, seed=3)
    ir_model = ir.from_proto(model)
    graph = ir_model.graph
    output = graph.outputs[0]

    assert fold_conv_bn(graph) is graph
    assert _ops(graph) == ["Conv"]
    assert graph.outputs[0].name == "y" and graph.outputs[0].producer().op_type == "Conv"
    assert graph.outputs[0].type == output.type and graph.outputs[0].shape == output.shape
    folded = ir.to_proto(ir_model)
    check_valid(folded)
    for seed in range(3):
        feeds = feeds_for(model, seed)
        assert_close(run(model, feeds), run(folded, feeds), f"onnx_ir.Graph seed {seed}")


def test_if_branches_fold_in_their_own_subgraphs():
    ir = pytest.importorskip("onnx_ir")
    from test_subgraphs import _if_model

    model = _if_model()
    ir_model = ir.from_proto(model)
    attributes = ir_model.graph.node(0).attributes
    branches = attributes["then_branch"].value, attributes["else_branch"].value
    _, report = fold_model(ir_model)
    assert len(report.folded) == 2
    assert ir_model.graph.node(0).attributes["then_branch"].value is branches[0]
    assert [_ops(b) for b in branches] == [["Conv"], ["Conv"]]
    folded = ir.to_proto(ir_model)
    check_valid(folded)
    for cond in (True, False):
        feeds = feeds_for(model, 0, bool_value=cond)
        assert_close(run(model, feeds), run(folded, feeds), f"If cond={cond}")


@pytest.mark.parametrize("weights_inside", [True, False])
def test_local_functions(weights_inside):
    ir = pytest.importorskip("onnx_ir")
    from test_functions import function_model

    model = function_model(weights_inside)
    ir_model = ir.from_proto(model)
    _, report = fold_model(ir_model)
    assert report.bn_after == 0 and bool(report.inlined) is not weights_inside
    folded = ir.to_proto(ir_model)
    check_valid(folded)
    assert count(folded, "BatchNormalization") == 0
    feeds = feeds_for(model, 0)
    assert_close(run(model, feeds), run(folded, feeds), "local functions")


def test_nothing_to_fold_changes_nothing():
    ir = pytest.importorskip("onnx_ir")
    model = ir.from_proto(conv_bn_model(seed=1))
    nodes, inits = list(model.graph), dict(model.graph.initializers)
    _, report = fold_model(model, disable=rule_names())  # every rule off: the pair is left
    assert not report.folded and report.bn_after == 1
    assert list(model.graph) == nodes and all(a is b for a, b in zip(model.graph, nodes))
    assert dict(model.graph.initializers) == inits and nodes[0].name == "conv"


def test_onnx_ir_and_torch_are_not_imported_for_protos():
    code = ("import sys, onnxfold, onnx\n"
            "sys.path.insert(0, 'tests')\n"
            "from builders import conv_bn_model\n"
            "onnxfold.fold_model(conv_bn_model())\n"
            "onnxfold.fold_conv_bn(conv_bn_model().graph)\n"
            "try:\n    onnxfold.fold_conv_bn(object())\nexcept TypeError as e:\n    print(e)\n"
            "print(sorted(m for m in ('onnx_ir', 'torch', 'onnxscript') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    message, imported = proc.stdout.strip().splitlines()
    assert imported == "[]"
    assert "onnx_ir.Model" in message and "torch.onnx.ONNXProgram" in message and "not object" in message



def test_the_fold_is_an_onnx_ir_pass_that_composes_in_a_pass_manager():
    """onnxfold.ir_pass.FoldBatchNormPass: in place, PassResult.modified, the report kept; beside
    onnx_ir's own passes in a PassManager; a second run finds nothing and says modified=False."""
    ir = pytest.importorskip("onnx_ir")
    from onnxfold.ir_pass import FoldBatchNormPass

    model = conv_bn_model(seed=5)
    model.graph.node.insert(0, onnx.helper.make_node("Identity", ["x"], ["x_id"]))
    model.graph.node[1].input[0] = "x_id"
    ir_model = ir.from_proto(model)
    fold = FoldBatchNormPass()
    passes = ir.passes.PassManager([fold, ir.passes.common.IdentityEliminationPass(),
                                    ir.passes.common.RemoveUnusedNodesPass()])
    result = passes(ir_model)
    assert result.model is ir_model and result.modified
    assert fold.report is not None and len(fold.report.folded) == 1
    assert _ops(ir_model.graph) == ["Conv"]
    folded = ir.to_proto(ir_model)
    check_valid(folded)
    for seed in range(3):
        feeds = feeds_for(model, seed)
        assert_close(run(model, feeds), run(folded, feeds), f"pass manager seed {seed}")
    again = FoldBatchNormPass()(ir_model)
    assert again.model is ir_model and not again.modified
