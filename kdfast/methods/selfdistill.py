"""Self-distillation inside one network with several exits (classifiers after intermediate stages):
Be Your Own Teacher and MSD. Exits are ordered shallow to deep; the deepest is the teacher."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import kdfast


def _feature_l2(student_feature, teacher_feature):
    """Squared L2 distance summed over a sample's features, averaged over the batch."""
    return (student_feature - teacher_feature.detach()).square().flatten(1).sum(1).mean()


class BeYourOwnTeacher(nn.Module):
    """Zhang et al. 2019 (BYOT): the deepest exit learns CE; each shallower exit learns (1 - kd_weight) CE +
    kd_weight T^2 KL(deepest || exit) + feature_weight ||f_exit - f_deepest||^2, deepest outputs detached;
    T=3, kd_weight=0.1, feature_weight=1e-6 (public code). Features of all exits must share one shape (the
    network's bottleneck adapters make them so)."""

    def __init__(self, temperature: float = 3.0, kd_weight: float = 0.1, feature_weight: float = 1e-6):
        super().__init__()
        self.temperature, self.kd_weight, self.feature_weight = temperature, kd_weight, feature_weight

    def forward(self, exit_logits: Sequence[torch.Tensor], exit_features: Sequence[torch.Tensor], target):
        *shallow, deepest = exit_logits
        loss = F.cross_entropy(deepest, target)
        for z, f in zip(shallow, exit_features[:-1]):
            kd = kdfast.kd_div(z, deepest.detach(), self.temperature)
            loss = loss + (1 - self.kd_weight) * F.cross_entropy(z, target) + self.kd_weight * kd
            loss = loss + self.feature_weight * _feature_l2(f, exit_features[-1])
        return loss


def cosine_anneal(epoch: float, epochs: float, start: float) -> float:
    """start * (1 + cos(pi * epoch / epochs)) / 2: from start at epoch 0 to 0 at the last epoch."""
    return start * 0.5 * (1.0 + math.cos(math.pi * min(max(epoch / epochs, 0.0), 1.0)))


class MSDSelfDistillation(nn.Module):
    """Luan et al. 2019 (MSD): every exit learns CE + kd_weight * mean over the other exits j of T^2 KL(p_j || p_i)
    (others detached: all exits teach all exits), and the shallower exits an L2 feature loss to the deepest
    features with a cosine-annealed weight cosine_anneal(epoch, epochs, feature_weight); T=3, kd_weight=0.1,
    feature_weight=1e-6 (BYOT's public values, which MSD builds on)."""

    def __init__(self, temperature: float = 3.0, kd_weight: float = 0.1, feature_weight: float = 1e-6):
        super().__init__()
        self.temperature, self.kd_weight, self.feature_weight = temperature, kd_weight, feature_weight

    def forward(self, exit_logits, exit_features, target, epoch: float, epochs: float):
        k = len(exit_logits)
        w_feat = cosine_anneal(epoch, epochs, self.feature_weight)
        loss = 0
        for i, z in enumerate(exit_logits):
            kd = sum(kdfast.kd_div(z, exit_logits[j].detach(), self.temperature) for j in range(k) if j != i)
            loss = loss + F.cross_entropy(z, target) + self.kd_weight * kd / (k - 1)
            if i < k - 1:
                loss = loss + w_feat * _feature_l2(exit_features[i], exit_features[-1])
        return loss
