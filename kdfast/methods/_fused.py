"""kdfast's fused feature ops, looked up at call time, with a local pure-PyTorch stand-in for each op that has not
landed on this branch yet. The stand-ins follow the exact API and formula of the op being built in parallel (its
reference in kdfast/reference.py is the spec); each is deleted once `git merge main` brings the op in."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import kdfast


def _acc(*xs):
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _match_spatial(s, t):
    """Adaptive-average-pools the map with more positions to the other's size (RepDistiller)."""
    if s.shape[2:] == t.shape[2:]:
        return s, t
    if s.shape[2:].numel() > t.shape[2:].numel():
        return F.adaptive_avg_pool2d(s, tuple(t.shape[2:])), t
    return s, F.adaptive_avg_pool2d(t, tuple(s.shape[2:]))


def _attention_map(x, p):
    return F.normalize(x.to(_acc(x)).abs().pow(p).mean(1).flatten(1), dim=1)


def _attention_transfer_loss(student_features, teacher_features, p=2.0, *, pool="mean", reduction="mean"):
    # Fallback until kdfast.attention_transfer_loss lands (mean pooling, reduction="mean" only: what methods use).
    assert pool == "mean" and reduction == "mean"
    if isinstance(student_features, torch.Tensor):
        student_features, teacher_features = [student_features], [teacher_features]
    total = 0
    for s, t in zip(student_features, teacher_features):
        s, t = _match_spatial(s, t)
        total = total + (_attention_map(s, p) - _attention_map(t, p)).pow(2).mean()
    return total


def _pairwise_affinity_loss(student_features, teacher_features, *, pool_size=None, pool="max", reduction="mean"):
    # Fallback until kdfast.pairwise_affinity_loss lands (reduction="mean" only: what methods use).
    assert reduction == "mean"

    def graph(x):
        if pool_size is not None:
            k = (pool_size, pool_size) if isinstance(pool_size, int) else tuple(pool_size)
            x = (F.max_pool2d if pool == "max" else F.avg_pool2d)(x, k, k, ceil_mode=True)
        f = F.normalize(x.flatten(2).to(_acc(x)), dim=1, eps=1e-8)
        return f.transpose(1, 2) @ f

    gs, gt = graph(student_features), graph(teacher_features)
    n = gs.shape[-1]
    return (gs - gt).square().sum((1, 2)).mean() / (n * n)


def _similarity_preserving_loss(student_features, teacher_features, *, reduction="mean"):
    # Fallback until kdfast.similarity_preserving_loss lands (reduction="mean" only: what methods use).
    assert reduction == "mean"
    b = student_features.shape[0]
    fs = student_features.reshape(b, -1).to(_acc(student_features))
    ft = teacher_features.reshape(b, -1).to(_acc(teacher_features))
    return (F.normalize(fs @ fs.T, dim=1) - F.normalize(ft @ ft.T, dim=1)).square().sum() / (b * b)


def _manifold_distillation_loss(student_features, teacher_features, rank, *, weights=None, reduction="mean"):
    # Fallback until kdfast.manifold_distillation_loss lands: per set of points, ||P_s - P_t||_F^2 with
    # P = Y Y^T / ||Y Y^T||_F and Y the centred points' top-`rank` SVD coordinates (sign- and rotation-free).
    # torch.linalg.svd's backward is not finite where singular values repeat (dead ReLU channels tie them at 0);
    # the kdfast op's backward is: one more reason to drop this stand-in when it lands.
    assert reduction == "mean"
    if isinstance(student_features, torch.Tensor):
        student_features, teacher_features = [student_features], [teacher_features]
    weights = [1.0] * len(student_features) if weights is None else weights

    def points(x):
        return x.flatten(2).mT if x.dim() == 4 else (x.unsqueeze(0) if x.dim() == 2 else x)

    def gram(x):
        x = points(x).to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        x = x - x.mean(-2, keepdim=True)
        u, s, _ = torch.linalg.svd(x, full_matrices=False)
        y = u[..., :rank] * s[..., None, :rank]
        g = y @ y.mT
        return g / g.flatten(-2).norm(dim=-1).clamp_min(1e-12)[..., None, None]

    return sum(w * (gram(s) - gram(t)).square().sum((-2, -1)).mean()
               for s, t, w in zip(student_features, teacher_features, weights))


_FALLBACKS = {
    "attention_transfer_loss": _attention_transfer_loss,
    "pairwise_affinity_loss": _pairwise_affinity_loss,
    "similarity_preserving_loss": _similarity_preserving_loss,
    "manifold_distillation_loss": _manifold_distillation_loss,
}


def op(name: str):
    """kdfast.<name> when this build exports it, else the stand-in above."""
    fn = getattr(kdfast, name, None)
    return fn if fn is not None else _FALLBACKS[name]
