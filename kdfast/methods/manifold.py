"""Neuron manifold distillation (Tao, Xia & Li 2021; cloud version 2022). No public code exists: the formulation
below is kdfast's (NeuronManifoldKD), built on kdfast.manifold_distillation_loss (README: the manifold section)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import kdfast


def confident_calibration(teacher_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The confident-prediction calibration (kdfast's formulation): where the teacher's top class is not the label,
    its logits of the top class and of the label are swapped, so the target distribution is confident in the
    right class and keeps the teacher's other similarities; correct rows are unchanged."""
    t = teacher_logits.detach()
    top = t.argmax(-1, keepdim=True)
    y = target[:, None]
    t_top, t_y = t.gather(-1, top), t.gather(-1, y)
    return t.scatter(-1, top, t_y).scatter(-1, y, t_top)


class NeuronManifoldKD(nn.Module):
    """Tao et al. 2021: alpha CE + beta KD(T=4) from the calibrated teacher + sum_i gamma_i manifold loss of stage
    i (kdfast.manifold_distillation_loss: sign- and rotation-free comparison of the top-`rank` SVD coordinates of
    each sample's spatial points), larger gamma for shallow stages: gammas (shallow to deep) 4, 2, 1 (kdfast's
    defaults; the paper gives only the ordering)."""

    def __init__(self, rank: int = 4, gammas: Sequence[float] = (4.0, 2.0, 1.0), alpha: float = 1.0,
                 beta: float = 1.0, temperature: float = 4.0, calibrate: bool = True):
        super().__init__()
        self.rank, self.gammas, self.alpha, self.beta = rank, list(gammas), alpha, beta
        self.temperature, self.calibrate = temperature, calibrate

    def forward(self, student_logits, teacher_logits, target, student_features: Sequence[torch.Tensor],
                teacher_features: Sequence[torch.Tensor]):
        if len(student_features) != len(self.gammas):
            raise ValueError(f"expected {len(self.gammas)} stages (one per gamma), got {len(student_features)}")
        t = confident_calibration(teacher_logits, target) if self.calibrate else teacher_logits.detach()
        kd = kdfast.kd_div(student_logits, t, self.temperature)
        manifold = kdfast.manifold_distillation_loss(list(student_features), [f.detach() for f in teacher_features],
                                                    self.rank, weights=self.gammas)
        return self.alpha * F.cross_entropy(student_logits, target) + self.beta * kd + manifold
