"""Reductions shared by the kernel path and the reference (neither owns them)."""
from __future__ import annotations

import torch


def reduce_rows(rows, mask, reduction, classes):
    """Masking and reduction of per-row loss values, the same words on every loss (docs/: the reduction table).

    "none": the rows (0 on masked-out rows); "sum": their sum; "batchmean": sum / counted rows (0 when none);
    "mean": sum / (counted rows x classes)."""
    if mask is not None:
        rows = torch.where(mask, rows, torch.zeros_like(rows))
        count = mask.sum()
    else:
        count = torch.tensor(rows.numel(), device=rows.device)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if reduction == "batchmean":
        return rows.sum() / count.clamp_min(1)
    if reduction == "mean":
        return rows.sum() / (count * classes).clamp_min(1)
    raise ValueError(f"unknown reduction {reduction!r}")


def reduce_samples(per_sample, reduction, mean_divisor=None):
    """Reduction of per-sample loss values (the feature losses): "none" the (B,) tensor, "sum" its sum, "mean" the
    sum / mean_divisor (default the number of samples; 0 for an empty batch)."""
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "mean":
        return per_sample.sum() / max(per_sample.shape[0] if mean_divisor is None else mean_divisor, 1)
    raise ValueError(f"unknown reduction {reduction!r}")
