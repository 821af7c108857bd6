"""Segmentation metrics (classification's accuracy and calibration are in calibration.py)."""
from __future__ import annotations

import torch


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
