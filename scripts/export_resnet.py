#!/usr/bin/env python3
"""Export a randomly initialised ResNet-18/50/101 to ONNX (static batch 1, opset 17).

    python scripts/export_resnet.py --arch resnet50 -o resnet50.onnx [--seed 0] [--exporter legacy]

No pretrained ResNet weights can be brought onto these machines and torchvision has no CPU
build here, so the architecture (He et al. 2016, torchvision's layout: stride on the 3x3 of a
Bottleneck) is defined below. The weights are random but *not trivial*: BatchNorm running
statistics and affine parameters are drawn per channel, so a converter that ignores or
mis-folds BN changes the output. The graphs serve speed measurements and compile tests, not
accuracy. Needs torch (the ``dev`` extra); the compiler itself never imports it.

``--exporter legacy`` (default) is TorchScript-based and needs nothing beyond torch; it folds
eval-mode BatchNorm into the preceding Conv. ``--exporter dynamo`` needs onnxscript and keeps
BatchNormalization nodes (our ONNX normalisation folds them, see passes/onnx_normalize).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

# arch -> (block, blocks per stage)
ARCHS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet50": ("bottleneck", (3, 4, 6, 3)),
         "resnet101": ("bottleneck", (3, 4, 23, 3))}


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False), _bn(width)
        self.conv2, self.bn2 = nn.Conv2d(width, cout, 3, 1, 1, bias=False), _bn(cout)
        self.relu = nn.ReLU()
        self.down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), _bn(cout))

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + (x if self.down is None else self.down(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), _bn(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), _bn(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), _bn(cout)
        self.relu = nn.ReLU()
        self.down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), _bn(cout))

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    def __init__(self, block: str, layers: tuple[int, ...], num_classes: int = 1000):
        super().__init__()
        cls = BasicBlock if block == "basic" else Bottleneck
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), _bn(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        stages, cin = [], 64
        for i, n in enumerate(layers):
            width = 64 << i
            for j in range(n):
                stages.append(cls(cin, width, 2 if i > 0 and j == 0 else 1))
                cin = width * cls.expansion
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


def build(arch: str, seed: int = 0) -> ResNet:
    """The eval-mode network with seeded random weights and non-trivial BN statistics."""
    torch.manual_seed(seed)
    model = ResNet(*ARCHS[arch])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):  # He init keeps activations O(1) through the depth
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def export(arch: str, path: str | Path, *, seed: int = 0, exporter: str = "legacy") -> Path:
    model = build(arch, seed)
    x = torch.randn(1, 3, 224, 224)
    path = Path(path)
    kwargs = dict(input_names=["input"], output_names=["logits"], opset_version=17)
    if exporter == "legacy":
        with warnings.catch_warnings():  # chosen on purpose: it needs no onnxscript
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model, (x,), str(path), dynamo=False, do_constant_folding=True, **kwargs)
    else:
        torch.onnx.export(model, (x,), str(path), dynamo=True, external_data=False, **kwargs)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=sorted(ARCHS), required=True)
    ap.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.onnx")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--exporter", choices=("legacy", "dynamo"), default="legacy")
    a = ap.parse_args(argv)
    export(a.arch, a.output, seed=a.seed, exporter=a.exporter)
    import onnx

    ops = {}
    for n in onnx.load(str(a.output)).graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    print(f"wrote {a.output} ({a.output.stat().st_size / 1e6:.1f} MB): "
          + ", ".join(f"{k} x{v}" for k, v in sorted(ops.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
