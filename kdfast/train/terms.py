"""Loss terms. A term is any callable term(student, teacher, features, targets) -> scalar tensor, where student and
teacher are the networks' logits (teacher None without a teacher), features is a Features (features.student[name],
features.teacher[name]) and targets holds class indices (data.UNLABELLED = -100 for transfer-set examples without
a label). The terms here are nn.Modules naming the features they need (student_taps, teacher_taps), so the
Distiller taps exactly those; feature-based ones call kdfast's fused ops, looked up on kdfast when called."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data import UNLABELLED


class MissingOpError(RuntimeError):
    """A term's kdfast op is not in this kdfast (its issue has not landed, or an old build)."""


def kdfast_op(name: str, method: str):
    import kdfast
    op = getattr(kdfast, name, None)
    if op is None:
        raise MissingOpError(f"the {method} term needs kdfast.{name}, which this kdfast does not provide "
                             f"(kdfast {getattr(kdfast, '__version__', '?')}); update kdfast or drop the term")
    return op


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


class KD(Term):
    """Hinton KD on every example, labelled or not: kdfast.kd_div(student, teacher, T) (batchmean, times T^2)."""

    def __init__(self, temperature: float = 4.0, divergence: str = "kl"):
        super().__init__()
        self.temperature, self.divergence = temperature, divergence

    def forward(self, student, teacher, features, targets):
        return kdfast_op("kd_div", "KD")(student, teacher, self.temperature, divergence=self.divergence)


class KDLoss(Term):
    """kdfast.kd_loss: alpha * KD + (1 - alpha) * CE in one pass, over the labelled examples only."""

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9):
        super().__init__()
        self.temperature, self.alpha = temperature, alpha

    def forward(self, student, teacher, features, targets):
        return kdfast_op("kd_loss", "KD")(student, teacher, targets, self.temperature, self.alpha,
                                          ignore_index=UNLABELLED)


class AttentionTransfer(Term):
    """Attention transfer (Zagoruyko & Komodakis) over layer pairs: kdfast.attention_transfer_loss. The paper's
    weight is 1000 (set it on the term)."""

    def __init__(self, layers=("stage1", "stage2", "stage3"), p: float = 2.0, pool: str = "mean"):
        super().__init__()
        self._set_pairs(layers, "attention transfer")
        self.p, self.pool = p, pool

    def forward(self, student, teacher, features, targets):
        s, t = self._features(features)
        return kdfast_op("attention_transfer_loss", "attention transfer")(s, t, self.p, pool=self.pool)


class PairwiseAffinity(Term):
    """Pair-wise (structured) distillation summed over layer pairs: kdfast.pairwise_affinity_loss."""

    def __init__(self, layers=("stage3",), pool_size=None, pool: str = "max"):
        super().__init__()
        self._set_pairs(layers, "pairwise affinity")
        self.pool_size, self.pool = pool_size, pool

    def forward(self, student, teacher, features, targets):
        op = kdfast_op("pairwise_affinity_loss", "pairwise affinity")
        return sum(op(s, t, pool_size=self.pool_size, pool=self.pool) for s, t in zip(*self._features(features)))


class ManifoldDistillation(Term):
    """Neuron manifold distillation over layer pairs: kdfast.manifold_distillation_loss with per-pair weights
    (the method weighs shallow stages more)."""

    def __init__(self, layers=("stage1", "stage2", "stage3"), rank: int = 4, weights=None):
        super().__init__()
        self._set_pairs(layers, "manifold distillation")
        self.rank, self.weights = rank, weights

    def forward(self, student, teacher, features, targets):
        s, t = self._features(features)
        return kdfast_op("manifold_distillation_loss", "manifold distillation")(s, t, self.rank,
                                                                                weights=self.weights)


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
        kd_div = kdfast_op("kd_div", "mutual learning")
        return (cross_entropy(student, targets) + cross_entropy(teacher, targets)
                + kd_div(student, teacher.detach(), self.temperature)
                + kd_div(teacher, student.detach(), self.temperature))


# The names `python -m kdfast train --method` accepts, with their default weights (METHODS.md).
METHODS = {
    "ce": (lambda a: CrossEntropy(), 1.0),
    "kd": (lambda a: KD(a.get("temperature", 4.0)), 1.0),
    "at": (lambda a: AttentionTransfer(a.get("layers", ("stage1", "stage2", "stage3"))), 1000.0),
    "pa": (lambda a: PairwiseAffinity(a.get("pa_layers", ("stage3",))), 1.0),
    "md": (lambda a: ManifoldDistillation(a.get("layers", ("stage1", "stage2", "stage3")), a.get("rank", 4)), 1.0),
    "dml": (lambda a: MutualLearning(a.get("temperature", 1.0)), 1.0),
}
