"""Attention transfer (Zagoruyko & Komodakis 2017): channel-pooled, L2-normalised spatial attention maps, and the
loss between the student's and the teacher's maps over any number of layer pairs, all pairs in one kernel launch
forward and one backward."""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

from . import _validate as check
from . import reference
from ._ops import has_kernel

POOLS = ("mean", "sum", "max")
REDUCTIONS = ("mean", "sum", "none")

Features = Union[torch.Tensor, Sequence[torch.Tensor]]


def _check_options(p, pool) -> float:
    p = check.positive_finite(p, "p")
    check.choice(pool, "pool", POOLS)
    return p


def _check_features(x, name: str) -> torch.Tensor:
    check.floating(x, name)
    if x.dim() < 3:
        raise ValueError(f"{name} must be (B, C, *spatial) with at least one spatial dim, got shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has no channels (shape {tuple(x.shape)})")
    return x


def _run_maps(features, p, pool, normalize):
    """The kernel's maps of (B, C, *spatial) tensors, one launch for all of them."""
    maps, _, _ = torch.ops.kdfast.attention_fwd([f.flatten(2) for f in features], p, pool, normalize)
    return maps


def attention_map(features, p=2.0, *, pool="mean", normalize=True) -> torch.Tensor:
    """(B, prod(spatial)) attention map of (B, C, *spatial) features: mean (or sum, or max) over the channels of
    |features|^p, L2-normalised over the flattened positions (eps 1e-12, as F.normalize) when normalize.
    max pooling sends the gradient to the first arg-max channel. The map is float32 (float64 for float64 input)."""
    _check_features(features, "features")
    p = _check_options(p, pool)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    if not has_kernel(features.device):
        return reference.attention_map(features, p, pool=pool, normalize=normalize)
    return _run_maps([features], p, pool, normalize)[0]


def _check_pairs(student_features, teacher_features):
    """The layer pairs as two equal-length lists, checked, with spatial sizes matched (the larger feature map
    adaptive-average-pooled to the smaller's size, as RepDistiller does)."""
    s_single, t_single = isinstance(student_features, torch.Tensor), isinstance(teacher_features, torch.Tensor)
    if s_single != t_single:
        raise TypeError("student_features and teacher_features must both be tensors or both be sequences of tensors")
    if s_single:
        students, teachers = [student_features], [teacher_features]
    else:
        for name, seq in (("student_features", student_features), ("teacher_features", teacher_features)):
            if not isinstance(seq, (list, tuple)):
                raise TypeError(f"{name} must be a tensor or a list/tuple of tensors, got {type(seq).__name__}")
        students, teachers = list(student_features), list(teacher_features)
        if len(students) != len(teachers):
            raise ValueError(f"student_features and teacher_features must hold as many layers, got {len(students)} "
                             f"and {len(teachers)}")
        if not students:
            raise ValueError("student_features and teacher_features are empty: give at least one layer pair")
    batch = None
    pairs = []
    for i, (s, t) in enumerate(zip(students, teachers)):
        sn, tn = ("student_features", "teacher_features") if s_single else (f"student_features[{i}]",
                                                                            f"teacher_features[{i}]")
        _check_features(s, sn)
        _check_features(t, tn)
        check.same_device({"student_features" if s_single else "student_features[0]": students[0], sn: s, tn: t})
        batch = s.shape[0] if batch is None else batch
        for name, x in ((sn, s), (tn, t)):
            if x.shape[0] != batch:
                raise ValueError(f"{name} has batch size {x.shape[0]}, but the other feature maps have {batch}")
        if s.dim() != t.dim():
            raise ValueError(f"{sn} and {tn} must have as many spatial dims, got shapes {tuple(s.shape)} and "
                             f"{tuple(t.shape)}")
        small, large = sorted((s.shape[2:], t.shape[2:]), key=lambda z: z.numel())
        if any(a > b for a, b in zip(small, large)):
            raise ValueError(f"{sn} and {tn} have spatial sizes {tuple(s.shape[2:])} and {tuple(t.shape[2:])}: one "
                             "must be at least as large as the other in every dim to be pooled to it")
        pairs.append(reference.match_spatial(s, t))
    return pairs


def attention_transfer_loss(student_features: Features, teacher_features: Features, p=2.0, *, pool="mean",
                            reduction="mean") -> torch.Tensor:
    """Attention transfer between student and teacher feature maps: one (B, C, *spatial) tensor each, or
    equal-length sequences of them (layer pairs; channel counts may differ within a pair). Where the spatial sizes
    of a pair differ, the feature map with more positions is first adaptive-average-pooled to the other's size.

    Per pair, the mean over batch and positions of (map_s - map_t)^2 with attention_map(., p, pool=pool).
    reduction: "mean" = the sum over pairs of those means (RepDistiller), "sum" = the sum of all squared
    differences, "none" = a (pairs, B) tensor of per-sample means. Gradients flow to both sides."""
    p = _check_options(p, pool)
    check.choice(reduction, "reduction", REDUCTIONS)
    pairs = _check_pairs(student_features, teacher_features)
    if not has_kernel(pairs[0][0].device):
        return reference.attention_transfer_loss([s for s, _ in pairs], [t for _, t in pairs], p, pool=pool,
                                                 reduction=reduction)
    rows, _, _, _ = torch.ops.kdfast.attention_transfer_fwd([s.flatten(2) for s, _ in pairs],
                                                            [t.flatten(2) for _, t in pairs], p, pool)
    if reduction == "none":
        return rows
    if reduction == "sum":  # a row is a mean over the pair's positions
        positions = torch.tensor([s[0, 0].numel() for s, _ in pairs], dtype=rows.dtype, device=rows.device)
        return (rows.sum(1) * positions).sum()
    return rows.mean(1).sum()


class AttentionTransfer(nn.Module):
    """nn.Module form of attention_transfer_loss: AttentionTransfer(p, pool=..., reduction=...)(student_features,
    teacher_features)."""

    def __init__(self, p=2.0, *, pool="mean", reduction="mean"):
        super().__init__()
        self.p = _check_options(p, pool)
        check.choice(reduction, "reduction", REDUCTIONS)
        self.pool, self.reduction = pool, reduction

    def forward(self, student_features: Features, teacher_features: Features) -> torch.Tensor:
        return attention_transfer_loss(student_features, teacher_features, self.p, pool=self.pool,
                                       reduction=self.reduction)

    def extra_repr(self):
        return f"p={self.p}, pool={self.pool!r}, reduction={self.reduction!r}"
