"""Feature-based distillation losses (intermediate activations). Teacher features are detached: a frozen
teacher never receives gradient; learned adapters (regressors, connectors) are part of the loss module and are
trained with the student. Fused kdfast ops are used where one applies."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import kdfast

from ._util import upcast_half


class ConvRegressor(nn.Module):
    """Maps student features (B, Cs, H, W) to the teacher's channels: conv (1x1 or 3x3, 'same' padding) + BN,
    + ReLU when relu=True (the FitNets regressor of RepDistiller/mdistiller); the output is adaptive-average-pooled
    to the teacher's spatial size when that differs."""

    def __init__(self, student_channels: int, teacher_channels: int, kernel_size: int = 3, relu: bool = True):
        super().__init__()
        layers = [nn.Conv2d(student_channels, teacher_channels, kernel_size, padding=kernel_size // 2, bias=False),
                  nn.BatchNorm2d(teacher_channels)]
        self.body = nn.Sequential(*layers, *([nn.ReLU()] if relu else []))

    def forward(self, x, size=None):
        y = self.body(x)
        if size is not None and tuple(y.shape[2:]) != tuple(size):
            y = F.adaptive_avg_pool2d(y, tuple(size))
        return y


class FitNetHint(nn.Module):
    """Romero et al. 2015 (FitNets) hint loss: MSE (mean over elements, as RepDistiller's HintLoss) between the
    regressed student guided layer and the teacher hint layer. Stage 1 trains the student's lower part and this
    regressor on it; stage 2 is KD (the trainer's schedule)."""

    def __init__(self, student_channels: int, teacher_channels: int, kernel_size: int = 3):
        super().__init__()
        self.regressor = ConvRegressor(student_channels, teacher_channels, kernel_size)

    def forward(self, student_features, teacher_features):
        t = teacher_features.detach()
        return F.mse_loss(self.regressor(student_features, t.shape[2:]), t)


class AttentionTransferKD(kdfast.AttentionTransfer):
    """Zagoruyko & Komodakis 2017, activation-based AT: beta * sum over layer pairs of mean (map_s - map_t)^2,
    map = L2-normalised mean_c |A_c|^p; p=2, beta=1000 (RepDistiller): kdfast.AttentionTransfer (one tensor or
    sequences of layer pairs) with the paper's weight and the teacher's side detached."""

    def __init__(self, p: float = 2.0, beta: float = 1000.0):
        super().__init__(p)
        self.beta = beta

    def forward(self, student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor]):
        if isinstance(student_features, torch.Tensor):
            student_features, teacher_features = [student_features], [teacher_features]
        teachers = [t.detach() for t in teacher_features]
        return self.beta * super().forward(list(student_features), teachers)


class GradientAttentionTransfer(nn.Module):
    """Zagoruyko & Komodakis 2017, gradient-based AT: CE(student) + beta/2 ||J_s - J_t||_2 with J = d CE / d input
    of each network (the student's through a double backward, the teacher's a fixed target). beta=1: the paper
    gives no value for this variant; measured on digits (cnn_small -> cnn_tiny, 20 epochs, 3 seeds) beta
    1 / 10 / 100 / 1000 give 97.8 / 96.3 / 76.7 / 35.7% accuracy (from 1000, activation AT's weight, the
    input-gradient term swamps cross-entropy).
    Called with the networks: forward(student, teacher, inputs, target) -> (loss, student_logits)."""

    def __init__(self, beta: float = 1.0):
        super().__init__()
        self.beta = beta

    def forward(self, student: nn.Module, teacher: nn.Module, inputs: torch.Tensor, target: torch.Tensor):
        x = inputs.detach().requires_grad_(True)
        s_logits = student(x)
        ce = F.cross_entropy(s_logits, target)
        (j_s,) = torch.autograd.grad(ce, x, create_graph=True)
        # Only d CE_t / d x is taken, so no gradient lands on the teacher's parameters.
        (j_t,) = torch.autograd.grad(F.cross_entropy(teacher(x), target), x)
        return ce + self.beta / 2 * (j_s - j_t.detach()).norm(), s_logits


class ActivationBoundaries(nn.Module):
    """Heo et al. 2019 (AB): on the teacher's pre-ReLU response t and the student's connector (1x1 conv + BN)
    output s, margin m=1: (s + m)^2 where s > -m and t <= 0, plus (s - m)^2 where s <= m and t > 0, summed and
    divided by B; layer weights halve from the deepest (1) to shallower (1/2, 1/4), as the authors' and
    RepDistiller's code. Used in an initialisation stage before KD (the trainer's schedule)."""

    def __init__(self, student_channels: Sequence[int], teacher_channels: Sequence[int], margin: float = 1.0):
        super().__init__()
        self.connectors = nn.ModuleList(ConvRegressor(s, t, kernel_size=1, relu=False)
                                        for s, t in zip(student_channels, teacher_channels))
        n = len(self.connectors)
        self.weights = [2.0 ** (i - n + 1) for i in range(n)]
        self.margin = margin

    def forward(self, student_features: Sequence[torch.Tensor], teacher_preacts: Sequence[torch.Tensor]):
        m, total = self.margin, 0
        for connector, w, s, t in zip(self.connectors, self.weights, student_features, teacher_preacts):
            t = t.detach()
            s = connector(s, t.shape[2:])
            loss = ((s + m).square() * ((s > -m) & (t <= 0)) + (s - m).square() * ((s <= m) & (t > 0))).sum()
            total = total + w * loss / s.shape[0]
        return total


class SimilarityPreservingKD(kdfast.SimilarityPreserving):
    """Tung & Mori 2019 (SP): gamma ||G_s - G_t||_F^2 / B^2 with G the row-normalised batch Gram matrix of the last
    stage's features; gamma=3000 (RepDistiller): kdfast.SimilarityPreserving with the paper's weight and the
    teacher's side detached."""

    def __init__(self, gamma: float = 3000.0):
        super().__init__()
        self.gamma = gamma

    def forward(self, student_features, teacher_features):
        return self.gamma * super().forward(student_features, teacher_features.detach())


def _pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    sq = e.square().sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * e @ e.T).clamp_min(eps).sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


class RelationalKD(nn.Module):
    """Park et al. 2019 (RKD): w_dist * smooth-L1 of pairwise distances (each divided by its mean non-zero
    distance) + w_angle * smooth-L1 of the cosines of all triplet angles, on flattened embeddings;
    w_dist=25, w_angle=50 (RepDistiller)."""

    def __init__(self, w_dist: float = 25.0, w_angle: float = 50.0):
        super().__init__()
        self.w_dist, self.w_angle = w_dist, w_angle

    @staticmethod
    def _normalised_distances(e):
        d = _pairwise_distances(e)
        return d / d[d > 0].mean()

    @staticmethod
    def _angles(e):
        v = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)  # v[i, j] = unit(e_j - e_i)
        return torch.bmm(v, v.transpose(1, 2)).flatten()

    def forward(self, student_features, teacher_features):
        s = upcast_half(student_features.flatten(1))
        t = upcast_half(teacher_features.detach().flatten(1))
        dist = F.smooth_l1_loss(self._normalised_distances(s), self._normalised_distances(t))
        angle = F.smooth_l1_loss(self._angles(s), self._angles(t))
        return self.w_dist * dist + self.w_angle * angle
