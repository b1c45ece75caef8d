"""The benchmark's torch networks (tools/bench_models.py exports them): ResNet-50, MobileNetV2, a UNet and
an MLP, full size or small (``--quick``). The ResNet and MobileNetV2 blocks are tools/torch_blocks.py's,
shared with tools/make_models.py. Imported only when a torch model is built, so ``bench_models --help``
and the wide_ext model need no torch."""

from __future__ import annotations

import torch
from torch import nn

from torch_blocks import Bottleneck, InvertedResidual


class ResNet50(nn.Module):
    def __init__(self, base=64, layers=(3, 4, 6, 3), num_classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, base, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = base
        stages = []
        for i, n in enumerate(layers):
            width = base * 2**i
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                ds = None  # built here, before the block: the order the weights were drawn in since the start
                if j == 0 and (stride != 1 or cin != width * 4):
                    ds = nn.Sequential(
                        nn.Conv2d(cin, width * 4, 1, stride=stride, bias=False),
                        nn.BatchNorm2d(width * 4),
                    )
                blocks.append(Bottleneck(cin, width, width * 4, stride if j == 0 else 1, ds))
                cin = width * 4
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        x = self.stages(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def conv_bn(cin, cout, k, stride=1, groups=1, act=True):
    layers = [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class MobileNetV2(nn.Module):
    def __init__(self, width_mult=1.0, num_classes=1000):
        super().__init__()
        cfg = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
               (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
        c = lambda v: max(8, int(v * width_mult + 4) // 8 * 8)  # noqa: E731
        cin = c(32)
        feats = [conv_bn(3, cin, 3, 2)]
        for t, ch, n, s in cfg:
            cout = c(ch)
            for i in range(n):
                feats.append(InvertedResidual(cin, cout, s if i == 0 else 1, expand=t))
                cin = cout
        last = c(1280) if width_mult > 1.0 else 1280
        feats.append(conv_bn(cin, last, 1))
        self.features = nn.Sequential(*feats)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class UNet(nn.Module):
    def __init__(self, base=32, depth=4, cin=3, cout=2):
        super().__init__()

        def dbl(a, b):
            return nn.Sequential(conv_bn(a, b, 3, act=False), nn.ReLU(),
                                 conv_bn(b, b, 3, act=False), nn.ReLU())

        self.downs = nn.ModuleList()
        ch = cin
        skips = []
        for i in range(depth):
            w = base * 2**i
            self.downs.append(dbl(ch, w))
            skips.append(w)
            ch = w
        self.pool = nn.MaxPool2d(2)
        self.mid = dbl(ch, ch * 2)
        ch = ch * 2
        self.ups = nn.ModuleList()
        self.up_convs = nn.ModuleList()
        for w in reversed(skips):
            # ConvTranspose (with bias) followed by BatchNorm
            self.ups.append(nn.Sequential(nn.ConvTranspose2d(ch, w, 2, stride=2),
                                          nn.BatchNorm2d(w), nn.ReLU()))
            self.up_convs.append(dbl(2 * w, w))
            ch = w
        self.head = nn.Conv2d(ch, cout, 1)

    def forward(self, x):
        skips = []
        for d in self.downs:
            x = d(x)
            skips.append(x)
            x = self.pool(x)
        x = self.mid(x)
        for up, uc, s in zip(self.ups, self.up_convs, reversed(skips)):
            x = uc(torch.cat([up(x), s], 1))
        return self.head(x)


class MatMulLinear(nn.Module):
    """y = x @ W, exported as a plain MatMul with an initializer."""

    def __init__(self, din, dout):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(din, dout) / din**0.5)

    def forward(self, x):
        return torch.matmul(x, self.weight)


class MLP(nn.Module):
    def __init__(self, din=512, width=1024, depth=4, dout=10):
        super().__init__()
        layers = []
        d = din
        for i in range(depth):
            # alternate nn.Linear (exported as Gemm) and x @ W (MatMul)
            lin = nn.Linear(d, width) if i % 2 == 0 else MatMulLinear(d, width)
            layers += [lin, nn.BatchNorm1d(width), nn.ReLU()]
            d = width
        layers.append(nn.Linear(d, dout))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)
