"""Reductions shared by the kernel path and the reference (neither owns them)."""
from __future__ import annotations

import torch

from . import _validate as check

# The reductions of the losses over rows of logits (kd_div, topk_kd_div, their vocabulary-parallel forms): "mean"
# is not one of them (docs/reductions.md).
ROW_REDUCTIONS = ("batchmean", "sum", "none")


def check_row_reduction(reduction, op: str) -> str:
    """reduction for a loss over rows of logits, or a ValueError; "mean" gets one that says what to use."""
    if reduction == "mean":
        raise ValueError(f'{op} does not take reduction="mean": torch.nn.functional.kl_div\'s "mean" divides by rows x '
                         f'classes, which distillation almost never wants, and kdfast\'s feature losses\' by samples. '
                         f'Use "batchmean" (the sum over the counted rows / their number: the mean per row, as '
                         f'F.kl_div(reduction="batchmean")) or "sum"; F.kl_div\'s "mean" is "batchmean" / classes')
    return check.choice(reduction, "reduction", ROW_REDUCTIONS)


def reduce_rows(rows, mask, reduction):
    """Masking and reduction of per-row loss values, the same words on every loss over rows (docs/reductions.md).

    "none": the rows (0 on masked-out rows); "sum": their sum; "batchmean": sum / counted rows (0 when none)."""
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
    raise ValueError(f"unknown reduction {reduction!r}")


def reduce_samples(per_sample, reduction):
    """Reduction of per-sample loss values (the feature losses): "none" the (B,) tensor, "sum" its sum, "mean" its
    mean over the samples (0 for an empty batch)."""
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "mean":
        return per_sample.sum() / max(per_sample.shape[0], 1)
    raise ValueError(f"unknown reduction {reduction!r}")
