"""Fused temperature-softmax divergences: kd_div (Hinton KD, reverse KL, generalised JSD) and kd_loss
(KD + cross-entropy from one pass over the student logits), with their nn.Module wrappers."""
from __future__ import annotations

import math

import torch
from torch import nn

from . import _validate as check
from . import reference
from ._ops import has_kernel
from ._reduce import reduce_rows

DIVERGENCES = ("kl", "reverse_kl", "jsd")
REDUCTIONS = ("batchmean", "sum", "mean", "none")


def _check_options(temperature, divergence, beta) -> float:
    temperature = check.positive_finite(temperature, "temperature")
    check.choice(divergence, "divergence", DIVERGENCES)
    beta = check.real(beta, "beta")
    if divergence == "jsd":
        check.in_open_unit(beta, "beta")
    return temperature


def _check_logits(student, teacher, dim) -> int:
    check.floating(student, "student_logits")
    check.floating(teacher, "teacher_logits")
    check.same_shape(student, teacher, "student_logits", "teacher_logits")
    check.same_device({"student_logits": student, "teacher_logits": teacher})
    dim = check.dim(dim, student.dim())
    if student.shape[dim] == 0:
        raise ValueError(f"student_logits has no classes along dim={dim} (shape {tuple(student.shape)})")
    return dim


def _row_shape(x: torch.Tensor, dim: int):
    return x.shape[:dim] + x.shape[dim + 1:]


def _kernel_rows(student, teacher, target, temperature, divergence, beta, dim, ignore_index):
    """Runs kd_fwd on (outer, classes, inner) views of the logits, without a transposing copy when the classes
    are either innermost in memory or the dim of a contiguous tensor (dim=1 of NCHW). Returns row-shaped
    (divergence, cross-entropy or None)."""
    classes = student.shape[dim]
    rows = _row_shape(student, dim)
    if dim == student.dim() - 1 or student.movedim(dim, -1).is_contiguous():
        s3 = student.movedim(dim, -1).reshape(-1, classes, 1)
        t3 = teacher.movedim(dim, -1).reshape(-1, classes, 1)
    else:
        outer, inner = math.prod(student.shape[:dim]), math.prod(student.shape[dim + 1:])
        s3 = student.reshape(outer, classes, inner)
        t3 = teacher.reshape(outer, classes, inner)
    y = target.reshape(s3.shape[0], s3.shape[2]) if target is not None else None
    div, ce, _ = torch.ops.kdfast.kd_fwd(s3, t3, y, temperature, divergence, beta, ignore_index)
    return div.reshape(rows), (ce.reshape(rows) if target is not None else None)


def kd_div(student_logits, teacher_logits, temperature=1.0, *, divergence="kl", beta=0.5, dim=-1, mask=None,
           reduction="batchmean", scale_t2=True) -> torch.Tensor:
    """Divergence between the temperature-softened class distributions of student and teacher.

    p_s = softmax(student_logits / T, dim), p_t = softmax(teacher_logits / T, dim); a row is a slice along dim.
    divergence: "kl" = KL(p_t || p_s) (Hinton), "reverse_kl" = KL(p_s || p_t), "jsd" = beta KL(p_t || m) +
    (1 - beta) KL(p_s || m) with m = beta p_t + (1 - beta) p_s. scale_t2 multiplies by T^2.
    mask: bool tensor of the row shape; rows where it is False contribute nothing and are not counted.
    reduction: "batchmean" (sum / included rows; 0 when none), "sum", "mean" (sum / (included rows x classes)),
    "none" (the row-shaped values, 0 on excluded rows). Half-precision inputs give a float32 loss.
    """
    dim = _check_logits(student_logits, teacher_logits, dim)
    temperature = _check_options(temperature, divergence, beta)
    check.choice(reduction, "reduction", REDUCTIONS)
    if not isinstance(scale_t2, bool):
        raise TypeError(f"scale_t2 must be a bool, got {type(scale_t2).__name__}")
    if mask is not None:
        check.tensor(mask, "mask")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        if mask.shape != _row_shape(student_logits, dim):
            raise ValueError(f"mask must have the row shape {tuple(_row_shape(student_logits, dim))} (the logits' "
                             f"shape without dim={dim}), got {tuple(mask.shape)}")
        check.same_device({"student_logits": student_logits, "mask": mask})
    if not has_kernel(student_logits.device):
        return reference.kd_div(student_logits, teacher_logits, temperature, divergence=divergence, beta=beta,
                                dim=dim, mask=mask, reduction=reduction, scale_t2=scale_t2)
    rows, _ = _kernel_rows(student_logits, teacher_logits, None, temperature, divergence, beta, dim, -100)
    # Scaled after the reduction: the rows' gradient then stays one broadcast value, which the kernel reads in place.
    out = reduce_rows(rows, mask, reduction, student_logits.shape[dim])
    return out * (temperature * temperature) if scale_t2 else out


def _check_target(target, student_logits, dim, ignore_index):
    check.tensor(target, "target")
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"target must hold integer class indices, got {target.dtype}")
    if target.shape != _row_shape(student_logits, dim):
        raise ValueError(f"target must have the row shape {tuple(_row_shape(student_logits, dim))} (the logits' "
                         f"shape without dim={dim}), got {tuple(target.shape)}")
    check.same_device({"student_logits": student_logits, "target": target})
    classes = student_logits.shape[dim]
    # A data-dependent check: done eagerly on CPU only (on CUDA it would synchronise; there a bad class gives NaN).
    if target.device.type == "cpu" and not torch.compiler.is_compiling():
        bad = (target != ignore_index) & ((target < 0) | (target >= classes))
        if bool(bad.any()):
            raise ValueError(f"target holds class {int(target[bad][0])}, outside [0, {classes}) and not "
                             f"ignore_index={ignore_index}")
    return target.long()


def kd_loss(student_logits, teacher_logits, target, temperature=4.0, alpha=0.9, *, divergence="kl", beta=0.5,
            dim=-1, ignore_index=-100) -> torch.Tensor:
    """alpha * kd_div(batchmean, T^2, rows with target != ignore_index) + (1 - alpha) * cross-entropy of the
    student at T = 1 (mean over the same rows; 0 when none). On the kernel path both terms come from one pass
    over the student logits."""
    dim = _check_logits(student_logits, teacher_logits, dim)
    temperature = _check_options(temperature, divergence, beta)
    alpha = check.in_closed_unit(alpha, "alpha")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    target = _check_target(target, student_logits, dim, ignore_index)
    if not has_kernel(student_logits.device):
        return reference.kd_loss(student_logits, teacher_logits, target, temperature, alpha, divergence=divergence,
                                 beta=beta, dim=dim, ignore_index=ignore_index)
    div, ce = _kernel_rows(student_logits, teacher_logits, target, temperature, divergence, beta, dim, ignore_index)
    keep = target != ignore_index
    count = keep.sum().clamp_min(1)
    kd = torch.where(keep, div, torch.zeros_like(div)).sum() * (temperature * temperature) / count
    return alpha * kd + (1 - alpha) * (ce.sum() / count)


class KDDiv(nn.Module):
    """nn.Module form of kd_div: KDDiv(temperature, divergence=..., ...)(student_logits, teacher_logits, mask)."""

    def __init__(self, temperature=1.0, *, divergence="kl", beta=0.5, dim=-1, reduction="batchmean", scale_t2=True):
        super().__init__()
        _check_options(temperature, divergence, beta)
        check.choice(reduction, "reduction", REDUCTIONS)
        self.temperature, self.divergence, self.beta = temperature, divergence, beta
        self.dim, self.reduction, self.scale_t2 = dim, reduction, scale_t2

    def forward(self, student_logits, teacher_logits, mask=None):
        return kd_div(student_logits, teacher_logits, self.temperature, divergence=self.divergence, beta=self.beta,
                      dim=self.dim, mask=mask, reduction=self.reduction, scale_t2=self.scale_t2)

    def extra_repr(self):
        return f"temperature={self.temperature}, divergence={self.divergence!r}, reduction={self.reduction!r}"


class KDLoss(nn.Module):
    """nn.Module form of kd_loss: KDLoss(temperature, alpha, ...)(student_logits, teacher_logits, target)."""

    def __init__(self, temperature=4.0, alpha=0.9, *, divergence="kl", beta=0.5, dim=-1, ignore_index=-100):
        super().__init__()
        _check_options(temperature, divergence, beta)
        check.in_closed_unit(alpha, "alpha")
        self.temperature, self.alpha, self.divergence, self.beta = temperature, alpha, divergence, beta
        self.dim, self.ignore_index = dim, ignore_index

    def forward(self, student_logits, teacher_logits, target):
        return kd_loss(student_logits, teacher_logits, target, self.temperature, self.alpha,
                       divergence=self.divergence, beta=self.beta, dim=self.dim, ignore_index=self.ignore_index)

    def extra_repr(self):
        return f"temperature={self.temperature}, alpha={self.alpha}, divergence={self.divergence!r}"
