"""A procedurally generated segmentation task that kdfast makes itself (no download): images of random
circles, squares and triangles in random colours on a noisy background, with per-pixel class labels
(0 background, 1 circle, 2 square, 3 triangle); deterministic by seed. With a small teacher / student
segmentation network pair and the mIoU metric, for the dense distillation methods."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SHAPE_CLASSES = ("background", "circle", "square", "triangle")


def make_shapes(n: int, size: int = 32, *, seed: int = 0, max_shapes: int = 3):
    """(images (n, 3, size, size) float32 in [0, 1], labels (n, size, size) int64). Colours are drawn
    independently of the class, so a network must recognise the shape, not its colour; later shapes occlude
    earlier ones."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    images = 0.1 * torch.rand(n, 3, size, size, generator=g) + 0.2 * torch.rand(n, 3, 1, 1, generator=g)
    labels = torch.zeros(n, size, size, dtype=torch.int64)
    for i in range(n):
        for _ in range(int(torch.randint(1, max_shapes + 1, (), generator=g))):
            cls = int(torch.randint(1, 4, (), generator=g))
            r = size * (0.1 + 0.15 * float(torch.rand((), generator=g)))
            cy, cx = (r + (size - 2 * r) * torch.rand(2, generator=g)).tolist()
            dy, dx = ys - cy, xs - cx
            if cls == 1:
                mask = dy.square() + dx.square() <= r * r
            elif cls == 2:
                mask = (dy.abs() <= r * 0.8) & (dx.abs() <= r * 0.8)
            else:  # upward triangle with apex at (cy - r, cx) and base on y = cy + r / 2
                mask = (dy <= r / 2) & (dx.abs() <= (dy + r) / 1.5 * 0.866)
            colour = 0.4 + 0.6 * torch.rand(3, 1, generator=g)
            images[i][:, mask] = colour.expand(3, int(mask.sum()))
            labels[i][mask] = cls
    return images.clamp(0, 1), labels


class ShapesDataset(torch.utils.data.TensorDataset):
    """make_shapes as a Dataset of (image, label map) pairs."""

    num_classes = len(SHAPE_CLASSES)

    def __init__(self, n: int, size: int = 32, *, seed: int = 0, max_shapes: int = 3):
        super().__init__(*make_shapes(n, size, seed=seed, max_shapes=max_shapes))


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


def shapes_teacher(num_classes: int = 4) -> SegNet:
    return SegNet(width=32, num_classes=num_classes)


def shapes_student(num_classes: int = 4) -> SegNet:
    return SegNet(width=8, num_classes=num_classes)


def mean_iou(prediction: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = -100) -> float:
    """Mean over classes of |pred ∩ true| / |pred ∪ true|, over the classes that occur in prediction or target.
    prediction: (B, C, H, W) logits or (B, H, W) labels; pixels where target == ignore_index are skipped."""
    if prediction.dim() == target.dim() + 1:
        prediction = prediction.argmax(1)
    keep = target != ignore_index
    p, t = prediction[keep], target[keep]
    ious = []
    for c in range(num_classes):
        union = ((p == c) | (t == c)).sum()
        if union > 0:
            ious.append(float(((p == c) & (t == c)).sum()) / float(union))
    return sum(ious) / len(ious) if ious else float("nan")
