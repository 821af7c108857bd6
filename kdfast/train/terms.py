"""Loss terms. A term is any callable term(student, teacher, features, targets) -> scalar tensor, where student and
teacher are the networks' logits (teacher None without a teacher), features is a Features (features.student[name],
features.teacher[name]) and targets holds class indices (data.UNLABELLED = -100 for transfer-set examples without
a label). The terms here are nn.Modules naming the features they need (student_taps, teacher_taps), so the
Distiller taps exactly those. They hold kdfast's own loss modules (LogitTerm, FeatureTerm): the trainer defines no
second class of any loss."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

import kdfast

from .data import UNLABELLED

STAGES = ("stage1", "stage2", "stage3")  # the zoo's stage outputs (three stages in the small CNNs and ResNets)


def _layer_pairs(layers, what: str):
    """Layer names as (student name, teacher name) pairs: a name alone means the same name on both sides."""
    if isinstance(layers, str):
        layers = [layers]
    pairs = []
    for layer in layers:
        if isinstance(layer, str):
            pairs.append((layer, layer))
        elif isinstance(layer, (tuple, list)) and len(layer) == 2 and all(isinstance(n, str) for n in layer):
            pairs.append(tuple(layer))
        else:
            raise ValueError(f"{what} layers must be names or (student name, teacher name) pairs, got {layer!r}")
    if not pairs:
        raise ValueError(f"{what} needs at least one layer pair")
    return pairs


class Term(nn.Module):
    student_taps: tuple = ()
    teacher_taps: tuple = ()

    def _features(self, features):
        return ([features.student[s] for s, _ in self.pairs], [features.teacher[t] for _, t in self.pairs])

    def _set_pairs(self, layers, what: str):
        self.pairs = _layer_pairs(layers, what)
        self.student_taps = tuple(dict.fromkeys(s for s, _ in self.pairs))
        self.teacher_taps = tuple(dict.fromkeys(t for _, t in self.pairs))


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled examples (0, with a gradient of 0, when there are none)."""
    labelled = (targets != UNLABELLED).sum()
    total = F.cross_entropy(logits.float(), targets, ignore_index=UNLABELLED, reduction="sum")
    return total / labelled.clamp_min(1)


class CrossEntropy(Term):
    """Cross-entropy of the student on the labelled examples."""

    def forward(self, student, teacher, features, targets):
        return cross_entropy(student, targets)


class LogitTerm(Term):
    """A logit loss as a term: loss(student logits, teacher logits), or with targets=True loss(student logits,
    teacher logits, targets) (kdfast.KDLoss skips the UNLABELLED examples: its ignore_index is -100)."""

    def __init__(self, loss: nn.Module, targets: bool = False):
        super().__init__()
        self.loss, self.targets = loss, targets

    def forward(self, student, teacher, features, targets):
        return self.loss(student, teacher, targets) if self.targets else self.loss(student, teacher)


class KD(LogitTerm):
    """Hinton KD on every example, labelled or not: kdfast.KDDiv(T) (batchmean, times T^2)."""

    def __init__(self, temperature: float = 4.0, divergence: str = "kl"):
        super().__init__(kdfast.KDDiv(temperature, divergence=divergence))


class FeatureTerm(Term):
    """A feature loss of kdfast (kdfast.AttentionTransfer, kdfast.ManifoldDistillation, kdfast.PairwiseAffinity,
    kdfast.SimilarityPreserving, or any module called (student features, teacher features)) on named layers: a name
    alone means the same name on both networks, a pair (student name, teacher name) differs. The loss gets the lists
    of all pairs' features in one call (the multi-pair ops: attention transfer, manifold), or with per_pair=True
    is called once per pair and summed (pairwise affinity, similarity preserving)."""

    def __init__(self, loss: nn.Module, layers, *, per_pair: bool = False):
        super().__init__()
        self.loss, self.per_pair = loss, per_pair
        self._set_pairs(layers, type(loss).__name__)

    def forward(self, student, teacher, features, targets):
        s, t = self._features(features)
        return sum(self.loss(a, b) for a, b in zip(s, t)) if self.per_pair else self.loss(s, t)


class Hint(Term):
    """FitNets hint: MSE between a regressor (1x1 conv + BN) of the student's guided layer and the teacher's hint
    layer. The regressor is trained with the student (its parameters belong to the Distiller)."""

    def __init__(self, student_layer: str, teacher_layer: str, student_channels: int, teacher_channels: int):
        super().__init__()
        self._set_pairs([(student_layer, teacher_layer)], "hint")
        self.regressor = nn.Sequential(nn.Conv2d(student_channels, teacher_channels, 1, bias=False),
                                       nn.BatchNorm2d(teacher_channels))

    def forward(self, student, teacher, features, targets):
        (s,), (t,) = self._features(features)
        r = self.regressor(s)
        if r.shape[-2:] != t.shape[-2:]:
            r = F.adaptive_avg_pool2d(r, t.shape[-2:])
        return F.mse_loss(r.float(), t.float())


class MutualLearning(Term):
    """Deep mutual learning of two peers (use with Distiller(train_teacher=True)): each peer's cross-entropy plus
    KL(p_other || p_self) at temperature T with the other's distribution held fixed."""

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, student, teacher, features, targets):
        return (cross_entropy(student, targets) + cross_entropy(teacher, targets)
                + kdfast.kd_div(student, teacher.detach(), self.temperature)
                + kdfast.kd_div(teacher, student.detach(), self.temperature))


def _deprecated(old: str, new: str, build):
    def make(*args, **kwargs):
        warnings.warn(f"kdfast.train.{old} is deprecated: use {new}", DeprecationWarning, stacklevel=2)
        return build(*args, **kwargs)
    make.__name__ = old
    return make


# The trainer's former copies of the op modules, kept for one release as functions that build the FeatureTerm or
# LogitTerm around kdfast's one class of that name (kdfast.train's module __getattr__ hands them out).
DEPRECATED = {
    "AttentionTransfer": _deprecated(
        "AttentionTransfer", "FeatureTerm(kdfast.AttentionTransfer(p, pool=...), layers)",
        lambda layers=STAGES, p=2.0, pool="mean": FeatureTerm(kdfast.AttentionTransfer(p, pool=pool), layers)),
    "PairwiseAffinity": _deprecated(
        "PairwiseAffinity", "FeatureTerm(kdfast.PairwiseAffinity(pool_size=..., pool=...), layers, per_pair=True)",
        lambda layers=("stage3",), pool_size=None, pool="max": FeatureTerm(
            kdfast.PairwiseAffinity(pool_size=pool_size, pool=pool), layers, per_pair=True)),
    "ManifoldDistillation": _deprecated(
        "ManifoldDistillation", "FeatureTerm(kdfast.ManifoldDistillation(rank, weights=...), layers)",
        lambda layers=STAGES, rank=4, weights=None: FeatureTerm(kdfast.ManifoldDistillation(rank, weights=weights),
                                                                layers)),
    "KDLoss": _deprecated(
        "KDLoss", "LogitTerm(kdfast.KDLoss(temperature, alpha), targets=True)",
        lambda temperature=4.0, alpha=0.9: LogitTerm(kdfast.KDLoss(temperature, alpha), targets=True)),
}
