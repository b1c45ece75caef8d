"""Torch blocks for tools/measure_reparam.py, each with its own re-parameterization (issue 19).

- ``RepNCSPELAN4``: YOLOv9's block as in WongKinYiu/yolov9 ``models/common.py`` (Conv = Conv2d without
  bias + BatchNorm2d + SiLU; RepConvN = 3x3 Conv+BN plus 1x1 Conv+BN, summed, SiLU; the input split
  with ``torch.chunk``). ``reparameterize_yolo`` gives its deploy form: every Conv+BN one Conv with a
  bias, every RepConvN one 3x3 Conv (what YOLOv9's ``fuse()`` does).
- ``EcapaMini``: an ECAPA-TDNN in speechbrain's form (``speechbrain.lobes.models.ECAPA_TDNN``): its
  Conv1d pads "same" with ``F.pad(mode="reflect")`` before the convolution, TDNNBlock = Conv1d -> ReLU ->
  BatchNorm1d, Res2Net chunks, SE, multi-layer aggregation, attentive statistical pooling, then a
  BatchNorm1d read by a kernel-1 Conv1d through a reflect Pad of amount 0. There is no framework
  re-parameterization (its BatchNorms follow a ReLU), so no deploy form.
- ``reparameterize_textnet``: transformers' TextNet has no ``fuse()``; this merges each
  ``TextNetRepConvLayer`` (main kxk, vertical kx1, horizontal 1xk Conv+BN and an identity BN) into one
  Conv, and each ``TextNetConvLayer`` Conv+BN into one Conv, the way FAST's own code does.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


def fused(conv: nn.Conv2d | nn.Conv1d, bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of Conv followed by BN (eval mode)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    w = conv.weight * scale.reshape(-1, *([1] * (conv.weight.dim() - 1)))
    b = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    return w, (b - bn.running_mean) * scale + bn.bias


def embed(w: torch.Tensor, shape: tuple[int, int], offset: tuple[int, int]) -> torch.Tensor:
    out = w.new_zeros(w.shape[0], w.shape[1], *shape)
    out[:, :, offset[0]:offset[0] + w.shape[2], offset[1]:offset[1] + w.shape[3]] = w
    return out


def plain_conv(src: nn.Conv2d, w: torch.Tensor, b: torch.Tensor) -> nn.Conv2d:
    conv = nn.Conv2d(src.in_channels, src.out_channels, tuple(w.shape[2:]), src.stride, src.padding,  # type: ignore[arg-type]
                     src.dilation, src.groups, bias=True)
    with torch.no_grad():
        conv.weight.copy_(w)
        conv.bias.copy_(b)
    return conv


# ---- YOLOv9 RepNCSPELAN4 -------------------------------------------------------------------------

class Conv(nn.Module):
    def __init__(self, c1, c2, k=1, s=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(c2)
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class RepConvN(nn.Module):
    def __init__(self, c1, c2):
        super().__init__()
        self.conv1 = Conv(c1, c2, 3, act=False)
        self.conv2 = Conv(c1, c2, 1, act=False)
        self.act = nn.SiLU()
        self.merged: nn.Module | None = None

    def forward(self, x):
        if self.merged is not None:
            return self.act(self.merged(x))
        return self.act(self.conv1(x) + self.conv2(x))


class RepNBottleneck(nn.Module):
    def __init__(self, c1, c2, shortcut=True):
        super().__init__()
        self.cv1 = RepConvN(c1, c2)
        self.cv2 = Conv(c2, c2, 3)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class RepNCSP(nn.Module):
    def __init__(self, c1, c2, n=1, e=0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1)
        self.cv2 = Conv(c1, c_, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(RepNBottleneck(c_, c_) for _ in range(n)))

    def forward(self, x):
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class RepNCSPELAN4(nn.Module):
    def __init__(self, c1=64, c2=128, c3=128, c4=64, c5=1):
        super().__init__()
        self.c = c3 // 2
        self.cv1 = Conv(c1, c3, 1)
        self.cv2 = nn.Sequential(RepNCSP(c3 // 2, c4, c5), Conv(c4, c4, 3))
        self.cv3 = nn.Sequential(RepNCSP(c4, c4, c5), Conv(c4, c4, 3))
        self.cv4 = Conv(c3 + 2 * c4, c2, 1)

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in [self.cv2, self.cv3])
        return self.cv4(torch.cat(y, 1))


def reparameterize_yolo(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        for m in list(model.modules()):
            if isinstance(m, RepConvN):
                w1, b1 = fused(m.conv1.conv, m.conv1.bn)
                w2, b2 = fused(m.conv2.conv, m.conv2.bn)
                m.merged = plain_conv(m.conv1.conv, w1 + embed(w2, (3, 3), (1, 1)), b1 + b2)
                del m.conv1, m.conv2
        for m in list(model.modules()):
            if isinstance(m, Conv):
                w, b = fused(m.conv, m.bn)
                m.conv = plain_conv(m.conv, w, b)
                m.bn = nn.Identity()
    return model


# ---- ECAPA-TDNN, speechbrain style -----------------------------------------------------------------

class SBConv1d(nn.Module):
    """speechbrain.nnet.CNN.Conv1d(padding="same", padding_mode="reflect"), stride 1."""

    def __init__(self, cin, cout, k, dilation=1):
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, k, dilation=dilation)
        self.pad = dilation * (k - 1) // 2

    def forward(self, x):
        return self.conv(F.pad(x, (self.pad, self.pad), mode="reflect"))


class TDNNBlock(nn.Module):
    def __init__(self, cin, cout, k, dilation=1):
        super().__init__()
        self.conv = SBConv1d(cin, cout, k, dilation)
        self.activation = nn.ReLU()
        self.norm = nn.BatchNorm1d(cout)

    def forward(self, x):
        return self.norm(self.activation(self.conv(x)))


class Res2NetBlock(nn.Module):
    def __init__(self, cin, cout, scale, k, dilation):
        super().__init__()
        self.scale = scale
        self.blocks = nn.ModuleList(TDNNBlock(cin // scale, cout // scale, k, dilation) for _ in range(scale - 1))

    def forward(self, x):
        ys = []
        for i, x_i in enumerate(torch.chunk(x, self.scale, dim=1)):
            if i == 0:
                y_i = x_i
            elif i == 1:
                y_i = self.blocks[i - 1](x_i)
            else:
                y_i = self.blocks[i - 1](x_i + y_i)
            ys.append(y_i)
        return torch.cat(ys, dim=1)


class SEBlock(nn.Module):
    def __init__(self, cin, se, cout):
        super().__init__()
        self.conv1 = SBConv1d(cin, se, 1)
        self.conv2 = SBConv1d(se, cout, 1)

    def forward(self, x):
        s = x.mean(dim=2, keepdim=True)
        return torch.sigmoid(self.conv2(torch.relu(self.conv1(s)))) * x


class SERes2NetBlock(nn.Module):
    def __init__(self, c, scale, k, dilation, se):
        super().__init__()
        self.tdnn1 = TDNNBlock(c, c, 1)
        self.res2net_block = Res2NetBlock(c, c, scale, k, dilation)
        self.tdnn2 = TDNNBlock(c, c, 1)
        self.se_block = SEBlock(c, se, c)

    def forward(self, x):
        return self.se_block(self.tdnn2(self.res2net_block(self.tdnn1(x)))) + x


class AttentiveStatisticsPooling(nn.Module):
    def __init__(self, c, attention):
        super().__init__()
        self.tdnn = TDNNBlock(c * 3, attention, 1)
        self.conv = SBConv1d(attention, c, 1)

    def forward(self, x):
        length = x.shape[-1]
        mean = x.mean(dim=2, keepdim=True)
        std = torch.sqrt(((x - mean) ** 2).mean(dim=2, keepdim=True).clamp(min=1e-12))
        attn = torch.cat([x, mean.repeat(1, 1, length), std.repeat(1, 1, length)], dim=1)
        attn = F.softmax(self.conv(torch.tanh(self.tdnn(attn))), dim=2)
        mean = (attn * x).sum(dim=2)
        std = torch.sqrt((attn * (x - mean.unsqueeze(2)) ** 2).sum(dim=2).clamp(min=1e-12))
        return torch.cat((mean, std), dim=1).unsqueeze(2)


class EcapaMini(nn.Module):
    def __init__(self, n_mels=40, c=128, emb=64):
        super().__init__()
        self.blocks = nn.ModuleList([
            TDNNBlock(n_mels, c, 5),
            SERes2NetBlock(c, scale=4, k=3, dilation=2, se=32),
            SERes2NetBlock(c, scale=4, k=3, dilation=3, se=32),
        ])
        self.mfa = TDNNBlock(2 * c, 2 * c, 1)
        self.asp = AttentiveStatisticsPooling(2 * c, 32)
        self.asp_bn = nn.BatchNorm1d(4 * c)
        self.fc = SBConv1d(4 * c, emb, 1)

    def forward(self, x):
        xl = []
        for layer in self.blocks:
            x = layer(x)
            xl.append(x)
        x = self.mfa(torch.cat(xl[1:], dim=1))
        return self.fc(self.asp_bn(self.asp(x)))


# ---- transformers' TextNet ------------------------------------------------------------------------

class _FusedRep(nn.Module):
    def __init__(self, conv, act):
        super().__init__()
        self.conv, self.act = conv, act

    def forward(self, x):
        return self.act(self.conv(x))


def reparameterize_textnet(model: nn.Module) -> nn.Module:
    from transformers.models.textnet.modeling_textnet import TextNetConvLayer, TextNetRepConvLayer

    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        for parent in list(model.modules()):
            for name, m in list(parent.named_children()):
                if isinstance(m, TextNetRepConvLayer):
                    main = m.main_conv
                    k, pad = main.kernel_size, main.padding
                    w, b = fused(main, m.main_batch_norm)
                    for conv, bn in ((m.vertical_conv, m.vertical_batch_norm),
                                     (m.horizontal_conv, m.horizontal_batch_norm)):
                        if conv is not None:
                            wb, bb = fused(conv, bn)
                            w = w + embed(wb, k, (pad[0] - conv.padding[0], pad[1] - conv.padding[1]))
                            b = b + bb
                    if m.rbr_identity is not None:
                        bn = m.rbr_identity
                        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                        ident = torch.zeros_like(w)
                        for c in range(w.shape[0]):
                            ident[c, c, pad[0], pad[1]] = scale[c]
                        w, b = w + ident, b + bn.bias - bn.running_mean * scale
                    setattr(parent, name, _FusedRep(plain_conv(main, w, b), m.activation_function))
                elif isinstance(m, TextNetConvLayer):
                    w, b = fused(m.conv, m.batch_norm)
                    setattr(parent, name, _FusedRep(plain_conv(m.conv, w, b), m.activation))
    return model
