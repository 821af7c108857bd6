"""The model zoo: CIFAR ResNets of He et al. (resnet8 .. resnet110), RepDistiller's resnet8x4 / resnet32x4, wide
ResNets (WRN-16-2, WRN-40-2), small CNNs for the digits demo, and the SegNet segmentation pair of kdfast's shapes
set (segnet, segnet_small: SegNet of width 32 and 8).

Every classifier maps (B, C, H, W) images to logits (B, classes), a segmentation model (SEGMENTATION_MODELS) to
per-pixel logits (B, classes, H, W); `model(x, features=True)` returns (logits, features) where features is a
dict of named tensors, `model.feature_names` in order: "stem", then per stage i "stage{i}.pre" (before the stage's
final activation) and "stage{i}" (after it), then "pool" (the pooled embedding the classifier reads); a SegNet's
only feature is "features" (its encoder's output).
Calling the model the same way through DDP or torch.compile passes `features` on unchanged.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


def _init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BlockStage(nn.Module):
    """A run of blocks. forward(x, preact=True) gives (output before the last block's final activation, output)."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x, preact: bool = False):
        for block in self.blocks[:-1]:
            x = block(x)
        return self.blocks[-1](x, preact=preact)


class FeatureModel(nn.Module):
    """Shared forward of the zoo: stem -> stages -> head (pool, flatten) -> fc, with named features."""

    def _stem(self, x):
        raise NotImplementedError

    def _head(self, x):
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x, features: bool = False):
        x = self._stem(x)
        feats = {"stem": x}
        for i, stage in enumerate(self.stages, 1):
            pre, x = stage(self._enter(i, x), preact=True)
            feats[f"stage{i}.pre"], feats[f"stage{i}"] = pre, x
        x = self._last(x, feats)
        pooled = self._head(x)
        logits = self.fc(pooled)
        if not features:
            return logits
        feats["pool"] = pooled
        return logits, feats

    def _enter(self, i, x):
        """What stage i (1-based) receives: the previous output unless a model resamples between stages."""
        return x

    def _last(self, x, feats):
        return x

    @property
    def feature_names(self):
        names = ["stem"]
        for i in range(1, len(self.stages) + 1):
            names += [f"stage{i}.pre", f"stage{i}"]
        return tuple(names + ["pool"])


# --- CIFAR ResNets (He et al. 2016, the layout of RepDistiller's resnet.py: 1x1 conv + BN projection shortcuts) ---

class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = _conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x, preact: bool = False):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + self.shortcut(x)
        post = self.relu(out)
        return (out, post) if preact else post


class CifarResNet(FeatureModel):
    """ResNet-(6n+2) for 32x32 images: stem conv, three stages of n basic blocks (widths[1:], strides 1, 2, 2)."""

    def __init__(self, depth: int, widths=(16, 16, 32, 64), num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2, got {depth}")
        n = (depth - 2) // 6
        self.conv1, self.bn1, self.relu = _conv3x3(in_channels, widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU()
        stages, cin = [], widths[0]
        for i, width in enumerate(widths[1:]):
            blocks = [BasicBlock(cin if j == 0 else width, width, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            stages.append(BlockStage(blocks))
            cin = width
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(cin, num_classes)
        _init(self)

    def _stem(self, x):
        return self.relu(self.bn1(self.conv1(x)))


# --- Wide ResNets (Zagoruyko & Komodakis 2016): pre-activation blocks, final BN + ReLU ---

class WideBlock(nn.Module):
    """Pre-activation block: its output is the residual sum. With preact=True it returns (sum, relu(sum)): in a
    pre-activation network the activation after a stage belongs to the next block, so kdfast defines a stage's
    post-activation output as relu(sum) (the last stage's as the network's final BN + ReLU, see WideResNet)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), _conv3x3(cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), _conv3x3(cout, cout)
        self.relu = nn.ReLU()
        self.shortcut = None if (cin == cout and stride == 1) else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x, preact: bool = False):
        o = self.relu(self.bn1(x))
        y = self.conv2(self.relu(self.bn2(self.conv1(o))))
        out = y + (x if self.shortcut is None else self.shortcut(o))
        return (out, self.relu(out)) if preact else out


class WideResNet(FeatureModel):
    def __init__(self, depth: int, widen: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = _conv3x3(in_channels, widths[0])
        stages, cin = [], widths[0]
        for i, width in enumerate(widths[1:]):
            stages.append(BlockStage([WideBlock(cin if j == 0 else width, width, 2 if (i > 0 and j == 0) else 1)
                                 for j in range(n)]))
            cin = width
        self.stages = nn.ModuleList(stages)
        self.bn, self.relu = nn.BatchNorm2d(cin), nn.ReLU()
        self.fc = nn.Linear(cin, num_classes)
        _init(self)

    def _stem(self, x):
        return self.conv1(x)

    def _last(self, x, feats):
        # The stages' outputs are residual sums; the network ends with BN + ReLU, which is the last stage's
        # post-activation output.
        last = len(self.stages)
        out = self.relu(self.bn(feats[f"stage{last}.pre"]))
        feats[f"stage{last}"] = out
        return out


# --- Small CNNs for 8x8 digits: per stage conv3x3 + BN (+ ReLU), 2x2 max-pool between stages ---

class ConvUnit(nn.Module):
    def __init__(self, cin: int, cout: int, norm: bool):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=not norm)
        self.bn = nn.BatchNorm2d(cout) if norm else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x, preact: bool = False):
        pre = self.bn(self.conv(x))
        post = self.relu(pre)
        return (pre, post) if preact else post


class SmallCNN(FeatureModel):
    """Stages of one conv unit each at 8x8, 4x4, 2x2 (for 8x8 inputs). norm=False drops BatchNorm (whose batch
    statistics differ between one process and a DDP shard, so the DDP equality test uses it)."""

    def __init__(self, widths=(16, 32, 64), num_classes: int = 10, in_channels: int = 1, norm: bool = True):
        super().__init__()
        stages, cin = [], in_channels
        for width in widths:
            stages.append(BlockStage([ConvUnit(cin, width, norm)]))
            cin = width
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(cin, num_classes)
        _init(self)

    def _stem(self, x):
        return x

    def _enter(self, i, x):
        return F.max_pool2d(x, 2) if i > 1 else x


class SegNet(nn.Module):
    """A small encoder-decoder segmentation network: two conv stages (the second at half resolution), a 1x1
    classifier, bilinear upsampling of the score map to the input size. forward(x) -> logits (B, classes, H, W);
    with return_features=True also the (B, 2*width, H/2, W/2) encoder features; with features=True (the trainer's
    convention, see kdfast.train.models) (logits, {"features": encoder features})."""

    feature_names = ("features",)

    def __init__(self, width: int = 8, num_classes: int = 4, in_channels: int = 3):
        super().__init__()

        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.stage1 = nn.Sequential(block(in_channels, width, 1), block(width, width, 1))
        self.stage2 = nn.Sequential(block(width, 2 * width, 2), block(2 * width, 2 * width, 1))
        self.classifier = nn.Conv2d(2 * width, num_classes, 1)

    def forward(self, x, return_features: bool = False, features: bool = False):
        encoded = self.stage2(self.stage1(x))
        logits = F.interpolate(self.classifier(encoded), size=x.shape[2:], mode="bilinear", align_corners=False)
        if features:
            return logits, {"features": encoded}
        return (logits, encoded) if return_features else logits


def _resnet(depth: int, num_classes: int, in_channels: int) -> CifarResNet:
    return CifarResNet(depth, num_classes=num_classes, in_channels=in_channels)


_RESNET_DEPTHS = {f"resnet{d}": d for d in (8, 14, 20, 32, 44, 56, 110)}

MODELS = {
    **{name: functools.partial(_resnet, d) for name, d in _RESNET_DEPTHS.items()},
    "resnet8x4": lambda nc, ic: CifarResNet(8, (32, 64, 128, 256), nc, ic),
    "resnet32x4": lambda nc, ic: CifarResNet(32, (32, 64, 128, 256), nc, ic),
    "wrn_16_2": lambda nc, ic: WideResNet(16, 2, nc, ic),
    "wrn_40_2": lambda nc, ic: WideResNet(40, 2, nc, ic),
    "cnn_tiny": lambda nc, ic: SmallCNN((8, 16, 32), nc, ic),
    "cnn_small": lambda nc, ic: SmallCNN((16, 32, 64), nc, ic),
    "cnn_large": lambda nc, ic: SmallCNN((32, 64, 128), nc, ic),
    "segnet": lambda nc, ic: SegNet(32, nc, ic),
    "segnet_small": lambda nc, ic: SegNet(8, nc, ic),
}
SEGMENTATION_MODELS = ("segnet", "segnet_small")


def build_model(name: str, num_classes: int = 10, in_channels: int = 3) -> FeatureModel:
    """A zoo model by name (see MODELS), freshly initialised from the global torch RNG."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(MODELS)}")
    return MODELS[name](num_classes, in_channels)
