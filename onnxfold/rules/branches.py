"""Parallel branches that read one tensor and are summed: one Conv (RepVGG, MobileOne, ACNet, DBB).

Matched at an Add, Sum or Sub (a chain of them is one sum: the outermost takes it; a Sub's second
operand counts negated) whose operands are each a branch of one tensor X: a chain of stages from X,
each a Conv with constant weights, an AveragePool, or a per-channel affine (BatchNormalization, or
Mul/Add/Sub/Div by a constant); X itself is a branch (the identity). At least one branch starts with
a Conv reading X: that Conv stays, takes the merged weight and bias (:mod:`onnxfold.branches` has the
algebra) and writes the sum's output name; every other node of the branches, and the Add/Sum/Sub
nodes, go. By the time the sum is matched, the BatchNormalization after each branch's Conv has
usually been folded into it by conv_bn; what remains (the identity branch's BatchNormalization) is a
stage here.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..branches import Kernel, average_pool, identity, merge, stack, then_affine, then_kernel
from ..edit import Edit, NewValue, Update
from ..errors import NotFoldable
from ..protobuf import is_default
from .base import GraphQuery, Match, Rule, attr, check_float
from .consumers import CONSUMERS, Consumer
from .producers import bias_hint

SUMS = ("Add", "Sum", "Sub")
MAX_DEPTH = 4  # stages per branch


class BranchSumRule(Rule):
    """Add/Sum/Sub (or a chain of them; a Sub subtracts its second operand) of branches that all read
    one tensor X, at least one a Conv: one Conv.

    A branch is X itself, or a chain from X of Conv (constant weight), AveragePool and per-channel
    affine stages. Each branch is a kernel (identity: W[m, m mod C/g] = 1; an affine scales its rows
    and shifts its bias; a k x k AveragePool counting its padding: taps 1/k^2; a Conv after a 1x1 stage
    composes, W = W2 W1, b = b2 + sum W2 b1). The sum is one Conv: W = sum of the kernels, each
    zero-padded into the largest at the offset its pads imply, b = sum of the biases. Declined when that
    is not exact: strides, dilations or Conv groups that differ, auto_pad, pads that do not line up,
    an identity-like branch where input and output channels differ, an AveragePool with padding that
    does not count it (count_include_pad=0) or ceil_mode with strides, padding after a 1x1 stage with a
    bias, a branch output with other readers."""

    name = "branch_sum"
    anchors = SUMS
    description = "Add/Sum/Sub of Conv branches of one input (+ identity, affine, AveragePool branches) -> one Conv"

    def match(self, g: GraphQuery, i: int) -> Match | str:
        if not _is_sum(g, i):
            return ""
        # a sum that is part of a larger one the outer Add/Sum takes is left to it
        j = _sum_reader(g, g.node(i).output[0])
        while j is not None:
            if isinstance(self._plan(g, j, flatten=True), Match):
                return ""
            j = _sum_reader(g, g.node(j).output[0])
        found = self._plan(g, i, flatten=True)
        return found if isinstance(found, Match) else self._plan(g, i, flatten=False)

    def _plan(self, g: GraphQuery, i: int, flatten: bool) -> Match | str:
        signed, sums = _operands(g, i, flatten)
        operands = [name for name, _ in signed]
        if len(operands) < 2 or any(g.constant_like(o) for o in operands):
            return ""
        chains = [_chains(g, o) for o in operands]
        common = set(chains[0]).intersection(*chains[1:])
        if not common:
            return ""
        x = min(common, key=lambda name: (sum(len(c[name]) for c in chains), name))
        branches = [c[x] for c in chains]
        survivor = next((b[0] for b in branches if b and g.node(b[0]).op_type == "Conv"), None)
        if survivor is None:
            return ""  # no Conv reads X: nothing to merge into
        nodes = [n for b in branches for n in b]
        between = [g.node(n).output[0] for n in nodes] + [g.node(s).output[0] for s in sums]
        reads = {name for n in nodes for name in g.node(n).input[1:] if name}
        return Match(upstream=survivor, downstream=i, affine=i, between=between,
                     remove=[n for n in nodes if n != survivor] + sums + [i],
                     outputs={(survivor, 0): g.node(i).output[0]}, output=g.node(i).output[0],
                     reads=reads, branches=branches, signs=[sign for _, sign in signed])

    def fold(self, g: GraphQuery, m: Match) -> Edit:
        conv = g.node(m.upstream)
        w = _weight(g, conv)  # read once: its kernel is its branch's first stage, its dtype the fold's
        first = _conv_kernel(g, conv, None, w)
        dims, channels = len(first.spatial), _in_channels(first)  # the Conv that stays reads X
        kernels = [_branch(g, nodes, channels, dims, {m.upstream: first}) for nodes in m.branches]
        merged = merge([k if sign > 0 else then_affine(k, -np.ones(k.channels), np.zeros(k.channels))
                        for k, sign in zip(kernels, m.signs)])
        attributes = {"kernel_shape": list(merged.spatial), "pads": [*merged.begins, *merged.ends],
                      "strides": list(merged.strides), "dilations": list(merged.dilations), "group": merged.group}
        update = Update({1: NewValue(merged.weight, "weight", conv.input[1]),
                         2: NewValue(merged.bias, "bias", bias_hint(conv))}, attributes=attributes)
        return m.edit(w.dtype, {m.upstream: update}, 1)  # a Conv: channels on axis 1


class ConcatBranchRule(Rule):
    """Concat along the channels (axis 1) of Convs that all read one tensor X, each read only by the
    Concat: one Conv (GoogLeNet/Inception-style blocks of parallel 1x1, 3x3, 5x5 Convs).

    Output channel block k of the Concat is Conv k of X; one Conv whose weight stacks the branch
    weights along the output channels, W = [W_1; W_2; ...], each zero-padded into the largest kernel at
    the offset its pads imply (as in branch_sum), and whose bias concatenates theirs (zeros for a Conv
    without one) computes the same. Exact only where the implied offsets agree; declined when strides
    or dilations differ, a Conv is grouped (concatenated, grouped Convs' output channels do not follow
    one grouped Conv's group-by-group layout), auto_pad, pads that do not line up, a Concat along
    another axis, a branch output with other readers. Off by default (--enable concat_branch): a
    smaller kernel padded into a larger one multiplies its zeros, and onnxruntime ran the merged Conv
    slower than the Convs and the Concat where the kernel sizes differ."""

    name = "concat_branch"
    anchors = ("Concat",)
    description = "Concat (axis 1) of Convs of one input -> one Conv (off by default)"
    default_on = False

    def match(self, g: GraphQuery, i: int) -> Match | str:
        node = g.node(i)
        if not is_default(node) or len(node.input) < 2 or not node.output or not node.output[0]:
            return ""
        convs: list[int] = []
        for name in node.input:
            j = g.upstream(name, ())[0] if name else None
            if j is None or j in convs:
                return ""
            conv = g.node(j)
            if not is_default(conv) or conv.op_type != "Conv" or len(conv.input) < 2 or not conv.input[0]:
                return ""
            convs.append(j)
        if len({g.node(j).input[0] for j in convs}) != 1:
            return ""  # the Convs read different tensors
        survivor = convs[0]
        return Match(upstream=survivor, downstream=i, affine=i, between=[g.node(j).output[0] for j in convs],
                     remove=[*convs[1:], i], outputs={(survivor, 0): node.output[0]}, output=node.output[0],
                     reads={n for j in convs for n in g.node(j).input[1:] if n}, upstreams=convs)

    def fold(self, g: GraphQuery, m: Match) -> Edit:
        convs = [g.node(j) for j in m.upstreams]
        w = _weight(g, convs[0])  # read once: the first kernel's, and the fold's dtype
        first = _conv_kernel(g, convs[0], None, w)
        kernels = [first, *(_conv_kernel(g, c, len(first.spatial)) for c in convs[1:])]
        rank = len(first.spatial) + 2
        axis = int(attr(g.node(m.downstream), "axis", 1))
        if axis not in (1, 1 - rank):
            raise NotFoldable(f"the Concat joins axis {axis}, not the Convs' channel axis 1")
        merged = stack(kernels)
        attributes = {"kernel_shape": list(merged.spatial), "pads": [*merged.begins, *merged.ends],
                      "strides": list(merged.strides), "dilations": list(merged.dilations), "group": 1}
        conv = convs[0]
        update = Update({1: NewValue(merged.weight, "weight", conv.input[1]),
                         2: NewValue(merged.bias, "bias", bias_hint(conv))}, attributes=attributes)
        return m.edit(w.dtype, {m.upstream: update}, 1)


def _is_sum(g: GraphQuery, i: int) -> bool:
    node = g.node(i)
    if not is_default(node) or node.op_type not in SUMS or not node.output or not node.output[0]:
        return False
    return len(node.input) >= 2 if node.op_type == "Sum" else len(node.input) == 2


def _sum_reader(g: GraphQuery, name: str) -> int | None:
    """The Add/Sum/Sub that is the only reader of ``name``, if any."""
    if g.readers(name) != 1:  # the count first: finding the reader walks the graph
        return None
    readers = g.readers_of(name)
    if len(readers) == 1 and _is_sum(g, readers[0]) and not any(g.constant_like(n) for n in g.node(readers[0]).input):
        return readers[0]
    return None


def _operands(g: GraphQuery, i: int, flatten: bool, sign: int = 1) -> tuple[list[tuple[str, int]], list[int]]:
    """The leaves of the sum at ``i`` with their signs (a Sub's second operand is subtracted), through
    inner Add/Sum/Sub nodes read only by it when ``flatten``, and those inner nodes."""
    leaves: list[tuple[str, int]] = []
    inner: list[int] = []
    node = g.node(i)
    for slot, name in enumerate(node.input):
        s = -sign if node.op_type == "Sub" and slot == 1 else sign
        j = g.upstream(name, ())[0]
        # an inner sum read by this node alone (x + c is an affine stage, not a sum of branches)
        if flatten and j is not None and _is_sum(g, j) and g.readers(name) == 1 and not any(
                g.constant_like(n) for n in g.node(j).input):
            sub, deeper = _operands(g, j, True, s)
            leaves += sub
            inner += [*deeper, j]
        else:
            leaves.append((name, s))
    return leaves, inner


def _affine_of(g: GraphQuery, node: onnx.NodeProto) -> tuple[Consumer, int] | None:
    """The consumer (and data input) a node is as a per-channel affine of one input, if any."""
    for c in CONSUMERS:
        if node.op_type in c.op_types:
            for d in c.data_inputs(node):
                if d < len(node.input) and node.input[d] and c.is_candidate(g, node, d) and (
                        node.op_type != "BatchNormalization" or d == 0):
                    return c, d
    return None


def _stage_input(g: GraphQuery, node: onnx.NodeProto) -> str | None:
    """The tensor a stage reads (its data input), or None when the node is no stage."""
    if not is_default(node):
        return None
    if node.op_type == "Conv":  # a weight that is not a constant is declined in fold, with its name
        return node.input[0] if len(node.input) > 1 and node.input[0] else None
    if node.op_type == "AveragePool":
        return node.input[0]
    found = _affine_of(g, node)
    return node.input[found[1]] if found else None


def _chains(g: GraphQuery, name: str) -> dict[str, list[int]]:
    """Every tensor ``name`` is a branch of: {X: the stage nodes from X to ``name``}, X = ``name`` included."""
    chains: dict[str, list[int]] = {name: []}
    path: list[int] = []
    current = name
    for _ in range(MAX_DEPTH):
        j = g.upstream(current, ())[0]
        if j is None:
            break
        source = _stage_input(g, g.node(j))
        if source is None:
            break
        path = [j, *path]
        current = source
        chains.setdefault(current, list(path))
    return chains


def _weight(g: GraphQuery, conv: onnx.NodeProto):
    w = g.const(conv.input[1], "Conv weight")
    check_float(w, "Conv weight")
    if w.ndim < 3:
        raise NotFoldable(f"Conv weight has rank {w.ndim}, expected at least 3")
    return w


def _geometry(node: onnx.NodeProto, dims: int, what: str) -> tuple[tuple, tuple, tuple, tuple]:
    auto_pad = attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad != "NOTSET":
        raise NotFoldable(f"the {what} has auto_pad={auto_pad}: its padding depends on the input's size")
    pads = list(attr(node, "pads", None) or [0] * (2 * dims))
    strides = tuple(attr(node, "strides", None) or [1] * dims)
    dilations = tuple(attr(node, "dilations", None) or [1] * dims)
    if len(pads) != 2 * dims or len(strides) != dims or len(dilations) != dims:
        raise NotFoldable(f"the {what}'s pads, strides or dilations do not match its {dims} spatial dimensions")
    return tuple(pads[:dims]), tuple(pads[dims:]), strides, dilations


def _conv_kernel(g: GraphQuery, node: onnx.NodeProto, dims: int | None, w: np.ndarray | None = None) -> Kernel:
    """The kernel of a Conv; ``w``: its weight, read already."""
    if w is None:
        w = _weight(g, node)
    if dims is None:
        dims = w.ndim - 2
    if w.ndim - 2 != dims:
        raise NotFoldable(f"the branches' Convs have {dims} and {w.ndim - 2} spatial dimensions")
    group = int(attr(node, "group", 1))
    if group < 1 or w.shape[0] % group:
        raise NotFoldable(f"Conv weight has {w.shape[0]} output channels, not divisible by group={group}")
    b = None
    if len(node.input) > 2 and node.input[2]:
        b = g.const(node.input[2], "Conv bias")
        check_float(b, "Conv bias")
    begins, ends, strides, dilations = _geometry(node, dims, "Conv")
    bias = np.zeros(w.shape[0]) if b is None else np.asarray(b, np.float64).reshape(-1)
    return Kernel(np.asarray(w, np.float64), bias, group, begins, ends, strides, dilations)


def _pool_kernel(g: GraphQuery, node: onnx.NodeProto, channels: int, dims: int) -> Kernel:
    kernel_shape = attr(node, "kernel_shape", None)
    if not kernel_shape or len(kernel_shape) != dims:
        raise NotFoldable("the AveragePool's kernel_shape does not match the Conv's spatial dimensions")
    begins, ends, strides, _ = _geometry(node, dims, "AveragePool")
    dilations = attr(node, "dilations", None)
    if dilations and any(d != 1 for d in dilations):
        raise NotFoldable(f"the AveragePool has dilations {list(dilations)}")
    padded = any(begins) or any(ends)
    if padded and not int(attr(node, "count_include_pad", 0)):
        raise NotFoldable("the AveragePool pads without counting the padding (count_include_pad=0): its divisor "
                          "changes at the border, which no Conv does")
    if int(attr(node, "ceil_mode", 0)) and any(s != 1 for s in strides):
        raise NotFoldable("the AveragePool has ceil_mode=1 with strides: its last windows may average fewer values")
    return average_pool(channels, kernel_shape, begins, ends, strides)


def _branch(g: GraphQuery, nodes: list[int], channels: int, dims: int, made: dict[int, Kernel]) -> Kernel:
    """The kernel a branch's stages make from X, of ``channels`` channels (the identity when it has none).
    ``made``: the kernels of Convs made already, by node (not read again)."""
    k: Kernel = identity(channels, dims)
    for n in nodes:
        node = g.node(n)
        if node.op_type == "Conv":
            conv = made[n] if n in made else _conv_kernel(g, node, dims)
            k = conv if _is_plain_identity(k) else then_kernel(k, conv)
        elif node.op_type == "AveragePool":
            pool = _pool_kernel(g, node, k.channels, dims)
            k = pool if _is_plain_identity(k) else then_kernel(k, pool, "AveragePool")
        else:
            consumer, d = _affine_of(g, node)  # type: ignore[misc]
            scale, shift = consumer.affine(g, node, d, k.channels, dims + 2, 1)
            k = then_affine(k, scale, shift)
    return k


def _is_plain_identity(k: Kernel) -> bool:
    return k.per_channel and k.spatial == (1,) * len(k.spatial) and bool(np.all(k.weight == 1)) and not np.any(k.bias)


def _in_channels(conv: Kernel) -> int:
    return conv.weight.shape[1] * conv.group
