"""Response-based (logit) distillation losses. Each takes the student's logits and the teacher's (a fixed target:
the teacher side is detached, so a frozen teacher never receives gradient), and uses kdfast.kd_div / kd_loss."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

import kdfast

from ._util import upcast_half

Logits = Union[torch.Tensor, Sequence[torch.Tensor]]


class HintonKD(nn.Module):
    """Hinton, Vinyals & Dean 2015: alpha T^2 KL(p_t^T || p_s^T) (batchmean) + (1 - alpha) CE; T=4, alpha=0.9
    (attention-transfer code, mdistiller)."""

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9):
        super().__init__()
        self.temperature, self.alpha = temperature, alpha

    def forward(self, student_logits, teacher_logits, target):
        return kdfast.kd_loss(student_logits, teacher_logits.detach(), target, self.temperature, self.alpha)


class LogitMatching(nn.Module):
    """Ba & Caruana 2014: L2 regression on the pre-softmax logits, 1/2 ||z_s - z_t||^2 summed over classes and
    averaged over the batch (the high-temperature limit of KD)."""

    def forward(self, student_logits, teacher_logits):
        diff = upcast_half(student_logits) - upcast_half(teacher_logits.detach())
        return 0.5 * diff.square().sum(-1).mean()


class NoisyTeacherKD(nn.Module):
    """Sau & Balasubramanian 2016: KD (T, alpha as Hinton) from teacher logits perturbed by additive Gaussian noise
    N(0, noise_std^2) drawn afresh each call (kdfast's default noise_std=0.1). Pass a torch.Generator to
    make the noise reproducible."""

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, noise_std: float = 0.1,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        self.temperature, self.alpha, self.noise_std, self.generator = temperature, alpha, noise_std, generator

    def forward(self, student_logits, teacher_logits, target):
        t = teacher_logits.detach()
        noise = torch.randn(t.shape, generator=self.generator, dtype=t.dtype, device=t.device)
        return kdfast.kd_loss(student_logits, t + self.noise_std * noise, target, self.temperature, self.alpha)


def ensemble_teacher_logits(teacher_logits: Logits, temperature: float, mode: str = "arithmetic") -> torch.Tensor:
    """Logits z whose softmax(z / T) is the teachers' ensemble at temperature T: the mean of their probabilities
    ("arithmetic", z = T log mean_k softmax(t_k / T)) or of their log-probabilities ("geometric", z = mean_k t_k,
    whose softmax is the normalised geometric mean). teacher_logits: (K, ..., C) or a sequence of K tensors."""
    stacked = torch.stack(list(teacher_logits)) if not isinstance(teacher_logits, torch.Tensor) else teacher_logits
    stacked = stacked.detach()
    if mode == "geometric":
        return stacked.mean(0)
    if mode == "arithmetic":
        k = stacked.shape[0]
        log_mean = torch.logsumexp(F.log_softmax(upcast_half(stacked) / temperature, dim=-1), dim=0) - math.log(k)
        return (temperature * log_mean).to(stacked.dtype)
    raise ValueError(f"mode must be 'arithmetic' or 'geometric', got {mode!r}")


class EnsembleKD(nn.Module):
    """Multi-teacher KD (Hinton 2015 ensembles; You et al. 2017): Hinton KD (T=4, alpha=0.9) from the teachers'
    arithmetic (mean probabilities) or geometric (softmax of mean logits) ensemble."""

    def __init__(self, mode: str = "arithmetic", temperature: float = 4.0, alpha: float = 0.9):
        super().__init__()
        if mode not in ("arithmetic", "geometric"):
            raise ValueError(f"mode must be 'arithmetic' or 'geometric', got {mode!r}")
        self.mode, self.temperature, self.alpha = mode, temperature, alpha

    def forward(self, student_logits, teacher_logits: Logits, target):
        t = ensemble_teacher_logits(teacher_logits, self.temperature, self.mode)
        return kdfast.kd_loss(student_logits, t, target, self.temperature, self.alpha)


class DefensiveDistillation(nn.Module):
    """Papernot et al. 2016: the student is trained at temperature T on the teacher's soft labels (soft
    cross-entropy at T, here KL: same gradient, no T^2), both networks evaluated at T = 1; T=20 as in the paper's
    main experiments. teacher_loss trains the teacher at the same T."""

    def __init__(self, temperature: float = 20.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, student_logits, teacher_logits):
        return kdfast.kd_div(student_logits, teacher_logits.detach(), self.temperature, scale_t2=False)

    def teacher_loss(self, teacher_logits, target):
        """Cross-entropy of softmax(logits / T): how the defensive teacher itself is trained."""
        return F.cross_entropy(teacher_logits / self.temperature, target)


class GeneralizedJSD(nn.Module):
    """Agarwal et al. 2024 (GKD; TRL and Liger conventions): beta KL(p_t || m) + (1 - beta) KL(p_s || m),
    m = beta p_t + (1 - beta) p_s, batchmean; beta=0.5, T=1; beta 0 and 1 are forward and reverse KL."""

    def __init__(self, beta: float = 0.5, temperature: float = 1.0):
        super().__init__()
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        self.beta, self.temperature = beta, temperature

    def forward(self, student_logits, teacher_logits):
        divergence = {0.0: "kl", 1.0: "reverse_kl"}.get(float(self.beta), "jsd")
        return kdfast.kd_div(student_logits, teacher_logits.detach(), self.temperature, divergence=divergence,
                             beta=self.beta)


class ConditionalTeacherStudent(nn.Module):
    """Meng et al. 2019 (conditional teacher-student): per sample, KL to the teacher's posteriors where the teacher
    predicts the label and cross-entropy with the label where it does not (T=1); averaged over the batch.
    adaptive=True (the adaptive variant): every sample mixes w KL + (1 - w) CE with w = the teacher's probability
    of the true class (its confidence in the right answer)."""

    def __init__(self, temperature: float = 1.0, adaptive: bool = False):
        super().__init__()
        self.temperature, self.adaptive = temperature, adaptive

    def forward(self, student_logits, teacher_logits, target):
        t = teacher_logits.detach()
        kl = kdfast.kd_div(student_logits, t, self.temperature, reduction="none")
        ce = F.cross_entropy(upcast_half(student_logits), target, reduction="none")
        if self.adaptive:
            w = F.softmax(upcast_half(t), dim=-1).gather(-1, target[:, None]).squeeze(-1)
        else:
            w = (t.argmax(-1) == target).float()
        return (w * kl + (1 - w) * ce).mean()
