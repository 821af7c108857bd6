"""Pure-PyTorch reference of every kdfast op: the specification the kernels are tested against, the fallback
where no kernel exists for a device, and the baseline of the benchmarks. Short and obviously right by design.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _acc_dtype(*xs: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _plogq(p: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """p * log_ratio with 0 where p == 0 (a class of probability 0 contributes nothing); NaN stays NaN."""
    return torch.where(p == 0, torch.zeros_like(p), p * log_ratio)


def kd_div_rows(student_logits, teacher_logits, temperature=1.0, divergence="kl", beta=0.5, dim=-1):
    """The unscaled divergence of every row (slice along dim), in float32 (float64 for double inputs)."""
    acc = _acc_dtype(student_logits, teacher_logits)
    ls = F.log_softmax(student_logits.to(acc) / temperature, dim=dim)
    lt = F.log_softmax(teacher_logits.to(acc) / temperature, dim=dim)
    ps, pt = ls.exp(), lt.exp()
    if divergence == "kl":
        terms = _plogq(pt, lt - ls)
    elif divergence == "reverse_kl":
        terms = _plogq(ps, ls - lt)
    elif divergence == "jsd":
        lm = torch.log(beta * pt + (1 - beta) * ps)
        terms = beta * _plogq(pt, lt - lm) + (1 - beta) * _plogq(ps, ls - lm)
    else:
        raise ValueError(f"unknown divergence {divergence!r}")
    return terms.sum(dim)


def kd_div(student_logits, teacher_logits, temperature=1.0, *, divergence="kl", beta=0.5, dim=-1, mask=None,
           reduction="batchmean", scale_t2=True):
    """Reference of kdfast.kd_div."""
    rows = kd_div_rows(student_logits, teacher_logits, temperature, divergence, beta, dim)
    if scale_t2:
        rows = rows * temperature**2
    return reduce_rows(rows, mask, reduction, student_logits.shape[dim])


def reduce_rows(rows, mask, reduction, classes):
    """kd_div's masking and reduction of per-row values (shared with the kernel path)."""
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


def cross_entropy_rows(student_logits, target, dim=-1, ignore_index=-100):
    """Cross-entropy at T = 1 of every row, 0 on ignored rows, in float32 (float64 for double inputs)."""
    acc = _acc_dtype(student_logits)
    logits = student_logits.to(acc).movedim(dim, 1) if student_logits.dim() > 1 else student_logits.to(acc)
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")


def kd_loss(student_logits, teacher_logits, target, temperature=4.0, alpha=0.9, *, divergence="kl", beta=0.5,
            dim=-1, ignore_index=-100):
    """Reference of kdfast.kd_loss: alpha * KD (batchmean over kept rows, T^2) + (1 - alpha) * CE (mean over kept
    rows); both 0 when no row is kept."""
    keep = target != ignore_index
    kd = kd_div(student_logits, teacher_logits, temperature, divergence=divergence, beta=beta, dim=dim, mask=keep,
                reduction="batchmean", scale_t2=True)
    ce = cross_entropy_rows(student_logits, target, dim, ignore_index).sum() / keep.sum().clamp_min(1)
    return alpha * kd + (1 - alpha) * ce


def attention_map(features, p=2.0, *, pool="mean", normalize=True):
    """Reference of kdfast.attention_map: (B, prod(spatial)) channel pooling of |features|^p, L2-normalised."""
    a = features.to(_acc_dtype(features)).abs().pow(p)
    if pool == "mean":
        a = a.mean(1)
    elif pool == "sum":
        a = a.sum(1)
    elif pool == "max":
        a = a.max(1).values  # the gradient goes to the first arg-max channel
    else:
        raise ValueError(f"unknown pool {pool!r}")
    a = a.flatten(1)
    return F.normalize(a, dim=1, eps=1e-12) if normalize else a


def match_spatial(student, teacher):
    """Adaptive-average-pools the feature map with more positions to the other's spatial size (RepDistiller)."""
    s_size, t_size = student.shape[2:], teacher.shape[2:]
    if s_size == t_size:
        return student, teacher
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[len(s_size)]
    if s_size.numel() > t_size.numel():
        return pool(student, tuple(t_size)), teacher
    return student, pool(teacher, tuple(s_size))


def attention_transfer_loss(student_features, teacher_features, p=2.0, *, pool="mean", reduction="mean"):
    """Reference of kdfast.attention_transfer_loss over one pair or equal-length sequences of pairs."""
    if isinstance(student_features, torch.Tensor):
        student_features, teacher_features = [student_features], [teacher_features]
    per_sample, sums = [], []
    for s, t in zip(student_features, teacher_features):
        s, t = match_spatial(s, t)
        d = (attention_map(s, p, pool=pool) - attention_map(t, p, pool=pool)).pow(2)
        per_sample.append(d.mean(1))
        sums.append(d.sum())
    rows = torch.stack(per_sample)  # (pairs, B)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return torch.stack(sums).sum()
    if reduction == "mean":
        return rows.mean(1).sum()
    raise ValueError(f"unknown reduction {reduction!r}")
