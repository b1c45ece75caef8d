"""Re-parameterizable blocks in training form (torch), for test_rules_branches.py and the measurements:
RepVGG, MobileOne, ACNet and a DBB-like block, each branch a Conv + BatchNorm2d, summed."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import torch
from torch import nn


def conv_bn(cin, cout, k, stride=1, padding=0, groups=1):
    if isinstance(k, int):
        k = (k, k)
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False), nn.BatchNorm2d(cout))


class RepVGGBlock(nn.Module):
    def __init__(self, cin, cout, stride=1, groups=1):
        super().__init__()
        self.dense = conv_bn(cin, cout, 3, stride, 1, groups)
        self.one = conv_bn(cin, cout, 1, stride, 0, groups)
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None

    def forward(self, x):
        y = self.dense(x) + self.one(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return torch.relu(y)


class MobileOneBlock(nn.Module):
    """k x k branches (``branches`` of them), a 1x1 scale branch (k > 1), a BN skip (cin == cout)."""

    def __init__(self, cin, cout, k, groups=1, branches=2):
        super().__init__()
        self.convs = nn.ModuleList(conv_bn(cin, cout, k, 1, k // 2, groups) for _ in range(branches))
        self.scale = conv_bn(cin, cout, 1, 1, 0, groups) if k > 1 else None
        self.skip = nn.BatchNorm2d(cin) if cin == cout else None

    def forward(self, x):
        y = self.skip(x) if self.skip is not None else 0
        if self.scale is not None:
            y = y + self.scale(x)
        for c in self.convs:
            y = y + c(x)
        return torch.relu(y)


class ACNetBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.square = conv_bn(cin, cout, 3, 1, 1)
        self.hor = conv_bn(cin, cout, (1, 3), 1, (0, 1))
        self.ver = conv_bn(cin, cout, (3, 1), 1, (1, 0))

    def forward(self, x):
        return self.square(x) + self.hor(x) + self.ver(x)


class DBBLike(nn.Module):
    """Diverse Branch Block's branches where they merge exactly: k x k, 1x1, AvgPool (counting its padding)
    + BN, and 1x1 (no bias, no BN between) -> k x k + BN."""

    def __init__(self, c, groups=1):
        super().__init__()
        self.origin = conv_bn(c, c, 3, 1, 1, groups)
        self.one = conv_bn(c, c, 1, 1, 0, groups)
        self.avg = nn.Sequential(nn.AvgPool2d(3, 1, 1), nn.BatchNorm2d(c))
        self.seq = nn.Sequential(nn.Conv2d(c, c, 1, groups=groups, bias=False), conv_bn(c, c, 3, 1, 1, groups))

    def forward(self, x):
        return self.origin(x) + self.one(x) + self.avg(x) + self.seq(x)


def randomize_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics (mean != 0, var != 1, gamma != 1, beta != 0), eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.5)
    return module.eval()


def export(module: nn.Module, shape, opset: int = 17, dynamo: bool = False) -> onnx.ModelProto:
    """The training-form module, in eval mode, exported with its BatchNormalization nodes kept."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            program = torch.onnx.export(module.eval(), (torch.randn(*shape),), dynamo=True, opset_version=opset)
            return program.model_proto
        torch.onnx.export(module.eval(), torch.randn(*shape), buf, dynamo=False, opset_version=opset,
                          do_constant_folding=False)
    return onnx.load_from_string(buf.getvalue())


def _fuse(seq: nn.Sequential) -> tuple[np.ndarray, np.ndarray]:
    conv, bn = seq[0], seq[1]
    std = torch.sqrt(bn.running_var + bn.eps)
    w = conv.weight * (bn.weight / std).reshape(-1, 1, 1, 1)
    return w.detach().numpy(), (bn.bias - bn.running_mean * bn.weight / std).detach().numpy()


def repvgg_deploy(block: RepVGGBlock) -> tuple[np.ndarray, np.ndarray]:
    """RepVGG's own re-parameterization (its get_equivalent_kernel_bias), groups 1."""
    w3, b3 = _fuse(block.dense)
    w1, b1 = _fuse(block.one)
    w = w3.copy()
    w[:, :, 1:2, 1:2] += w1
    b = b3 + b1
    if block.identity is not None:
        bn = block.identity
        std = torch.sqrt(bn.running_var + bn.eps)
        s = (bn.weight / std).detach().numpy()
        for c in range(w.shape[0]):
            w[c, c, 1, 1] += s[c]
        b = b + (bn.bias - bn.running_mean * bn.weight / std).detach().numpy()
    return w, b
