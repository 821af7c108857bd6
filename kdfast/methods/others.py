"""Further methods: QuEST, distillation from internal representations, FEED, teacher-assistant chains (TAKD)
and ensemble distribution distillation (EnD^2). Teacher tensors are detached."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import kdfast

from ._util import upcast_half

# --- QuEST -------------------------------------------------------------------------------------------------------

def kmeans_codebook(features: torch.Tensor, k: int, *, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """The QuEST codebook: k-means (Lloyd) centroids (k, D) of L2-normalised feature vectors (N, D),
    initialised from k distinct random vectors (deterministic by seed); an empty cluster keeps its centroid."""
    x = F.normalize(features.detach().float(), dim=1)
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"k must be in [1, {x.shape[0]}] (the number of feature vectors), got {k}")
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(x.shape[0], generator=g)[:k].to(x.device)].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centroids).argmin(1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)[:, None]
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
    return centroids


def feature_vectors(features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) feature maps -> (B*H*W, C) vectors, one per spatial position (what the codebook is fit on)."""
    return features.movedim(1, -1).reshape(-1, features.shape[1])


class QuEST(nn.Module):
    """Jain et al. 2020 (QuEST): the teacher's features at each position are softly assigned to a k-means
    codebook, softmax(-tau ||f - w_k||^2) (tau=5, on L2-normalised features and words); the student's features,
    through a 1x1 projection, feed a cosine classifier over the words (logits 2 tau cos, the same form); loss =
    KL per position (averaged over positions, kdfast.kd_div dim=1) + CE when logits and target are given."""

    def __init__(self, student_channels: int, codebook: torch.Tensor, tau: float = 5.0):
        super().__init__()
        self.register_buffer("codebook", F.normalize(codebook.detach().float(), dim=1))
        self.project = nn.Conv2d(student_channels, codebook.shape[1], 1)
        self.tau = tau

    def teacher_logits(self, teacher_features):
        f = F.normalize(teacher_features.detach().float(), dim=1)
        # ||f - w||^2 = ||f||^2 + ||w||^2 - 2 f.w, without the (B, K, D, H, W) difference tensor.
        sq_dist = (f.square().sum(1, keepdim=True) + self.codebook.square().sum(1)[None, :, None, None]
                   - 2 * torch.einsum("bchw,kc->bkhw", f, self.codebook))
        return -self.tau * sq_dist

    def student_logits(self, student_features):
        s = F.normalize(self.project(student_features), dim=1)
        return 2 * self.tau * torch.einsum("bchw,kc->bkhw", s, self.codebook)

    def forward(self, student_features, teacher_features, student_logits=None, target=None):
        loss = kdfast.kd_div(self.student_logits(student_features), self.teacher_logits(teacher_features), dim=1)
        if target is not None:
            loss = loss + F.cross_entropy(student_logits, target)
        return loss


# --- Internal representations ---------------------------------------------------------------------------------

def internal_layers(epoch: int, num_layers: int, schedule: str = "progressive", epochs_per_layer: int = 1):
    """Which hidden-layer pairs are distilled at an epoch, bottom up, one more every epochs_per_layer epochs:
    "progressive" = only the newest one, "stacked" = all up to it; after the last, it stays on."""
    top = min(epoch // epochs_per_layer, num_layers - 1)
    if schedule == "progressive":
        return [top]
    if schedule == "stacked":
        return list(range(top + 1))
    raise ValueError(f"schedule must be 'progressive' or 'stacked', got {schedule!r}")


class InternalRepresentationKD(nn.Module):
    """Aguilar et al. 2020 (KD from internal representations): T^2 KL on the outputs (T=1) + sum over the layers of
    internal_layers(epoch) of mean (1 - cos(h_s, h_t)) over tokens (last dim = hidden size); hidden pairs must
    share their size (project beforehand)."""

    def __init__(self, temperature: float = 1.0, schedule: str = "progressive", epochs_per_layer: int = 1):
        super().__init__()
        internal_layers(0, 1, schedule)
        self.temperature, self.schedule, self.epochs_per_layer = temperature, schedule, epochs_per_layer

    def forward(self, student_logits, teacher_logits, student_hidden: Sequence[torch.Tensor],
                teacher_hidden: Sequence[torch.Tensor], epoch: int):
        loss = kdfast.kd_div(student_logits, teacher_logits.detach(), self.temperature)
        for i in internal_layers(epoch, len(student_hidden), self.schedule, self.epochs_per_layer):
            cos = F.cosine_similarity(student_hidden[i], teacher_hidden[i].detach(), dim=-1)
            loss = loss + (1 - cos).mean()
        return loss


# --- FEED -------------------------------------------------------------------------------------------------------

class FEEDTransform(nn.Module):
    """FEED's non-linear transformation of the student's last feature map: three 3x3 convs (BN + ReLU between)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1))

    def forward(self, x):
        return self.body(x)


class FEED(nn.Module):
    """Park & Kwak 2019 (FEED): one FEEDTransform per teacher on the student's last feature map, each matched to
    its teacher's feature map by factor transfer's loss (Kim et al. 2018, which FEED builds on): weight * mean
    |u_s - u_t| of the L2-normalised flattened maps, summed over teachers; weight=200 (factor transfer's weight in
    RepDistiller's scripts). Spatial sizes must match."""

    def __init__(self, student_channels: int, teacher_channels: Sequence[int], weight: float = 200.0):
        super().__init__()
        self.transforms = nn.ModuleList(FEEDTransform(student_channels, c) for c in teacher_channels)
        self.weight = weight

    def forward(self, student_features, teacher_features: Sequence[torch.Tensor]):
        total = 0
        for transform, t in zip(self.transforms, teacher_features):
            u_s = F.normalize(transform(student_features).flatten(1), dim=1)
            u_t = F.normalize(t.detach().flatten(1), dim=1)
            total = total + (u_s - u_t).abs().mean()
        return self.weight * total


# --- TAKD -------------------------------------------------------------------------------------------------------

class TeacherAssistantKD(nn.Module):
    """Mirzadeh et al. 2020 (TAKD): each step of the chain teacher -> assistant(s) -> student distils with
    (1 - lam) CE + lam T^2 KL (kdfast.kd_loss); T=4, lam=0.9 (kdfast's Hinton defaults; TAKD tunes them per pair).
    takd_steps lists the (teacher, student) pairs in training order."""

    def __init__(self, temperature: float = 4.0, lam: float = 0.9):
        super().__init__()
        self.temperature, self.lam = temperature, lam

    def forward(self, student_logits, teacher_logits, target):
        return kdfast.kd_loss(student_logits, teacher_logits.detach(), target, self.temperature, self.lam)


def takd_steps(chain: Sequence):
    """[(chain[0], chain[1]), (chain[1], chain[2]), ...]: teacher, assistants, student, largest first."""
    if len(chain) < 2:
        raise ValueError(f"a TAKD chain needs at least a teacher and a student, got {len(chain)} model(s)")
    return list(zip(chain[:-1], chain[1:]))


# --- Ensemble distribution distillation -------------------------------------------------------------------------

class EnsembleDistributionDistillation(nn.Module):
    """Malinin et al. 2020 (EnD^2): a prior network's logits z give Dirichlet concentrations alpha = exp(z / T);
    loss = mean over ensemble members and batch of -log Dir(pi_m | alpha), pi_m = softmax(member logits / T),
    smoothed towards uniform by `smoothing` (EnD^2 also anneals T from high to 1 early in training: pass the
    current T). smoothing=1e-2 is kdfast's choice: near one-hot members make the NLL unbounded below as the
    concentration grows, and its gradient (about alpha * digamma(alpha)) with it; measured on digits (4 seeds),
    smoothing 1e-4 / 1e-3 / 1e-2 give 78 / 81 / 96% accuracy, the smaller ones with late collapses (NLL -57,
    training accuracy 98% -> 56% within an epoch)."""

    def __init__(self, temperature: float = 1.0, smoothing: float = 1e-2):
        super().__init__()
        self.temperature, self.smoothing = temperature, smoothing

    def forward(self, prior_logits, ensemble_logits, temperature: Optional[float] = None):
        T = self.temperature if temperature is None else temperature
        members = torch.stack(list(ensemble_logits)) if not isinstance(ensemble_logits, torch.Tensor) \
            else ensemble_logits
        c = prior_logits.shape[-1]
        pi = F.softmax(upcast_half(members.detach()) / T, dim=-1) * (1 - self.smoothing) + self.smoothing / c
        alpha = torch.exp(upcast_half(prior_logits) / T)
        log_norm = torch.lgamma(alpha.sum(-1)) - torch.lgamma(alpha).sum(-1)  # (B,)
        log_lik = log_norm + ((alpha - 1) * pi.log()).sum(-1)  # (M, B)
        return -log_lik.mean()
