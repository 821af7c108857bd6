"""Online distillation among networks trained together: deep mutual learning, OKDDip and online adversarial
feature-map distillation (AFD). Each network's loss takes its peers' outputs as fixed (detached) targets, so one
backward of the summed losses gives every network exactly its own gradient."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import kdfast

from ._util import frozen_call


def _mutual_kl(logits: Sequence[torch.Tensor], temperature: float) -> list:
    """For each network i: mean over the others j of T^2 KL(p_j || p_i), p_j detached."""
    k = len(logits)
    if k < 2:
        raise ValueError(f"mutual distillation needs at least 2 networks, got {k}")
    return [sum(kdfast.kd_div(logits[i], logits[j].detach(), temperature) for j in range(k) if j != i) / (k - 1)
            for i in range(k)]


class DeepMutualLearning(nn.Module):
    """Zhang et al. 2018 (DML): network i minimises CE_i + 1/(K-1) sum_{j != i} KL(p_j || p_i), T=1, peers
    trained together. forward(peer_logits, target) -> the sum of the peers' losses (each reaches only its own
    network)."""

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, peer_logits: Sequence[torch.Tensor], target):
        kl = _mutual_kl(peer_logits, self.temperature)
        return sum(F.cross_entropy(z, target) + d for z, d in zip(peer_logits, kl))


def okddip_rampup(epoch: float, length: float = 80.0) -> float:
    """OKDDip's consistency ramp-up exp(-5 (1 - t/length)^2), t clipped to [0, length] (Laine & Aila 2017)."""
    phase = 1.0 - min(max(epoch, 0.0), length) / length
    return math.exp(-5.0 * phase * phase)


class OKDDipAttention(nn.Module):
    """OKDDip's peer aggregation: shared query/key projections (no bias, dim / factor, factor=8) of each peer's
    pooled features; peer i's target logits are sum_j softmax_j(q_i . k_j) z_j."""

    def __init__(self, feature_dim: int, factor: int = 8):
        super().__init__()
        self.query = nn.Linear(feature_dim, max(1, feature_dim // factor), bias=False)
        self.key = nn.Linear(feature_dim, max(1, feature_dim // factor), bias=False)

    def forward(self, peer_features: Sequence[torch.Tensor], peer_logits: Sequence[torch.Tensor]):
        f = torch.stack(list(peer_features), 1)  # (B, K, D)
        z = torch.stack(list(peer_logits), 1)  # (B, K, C)
        attention = torch.softmax(self.query(f) @ self.key(f).transpose(1, 2), dim=-1)  # (B, K, K)
        return list((attention @ z).unbind(1))


class OKDDip(nn.Module):
    """Chen et al. 2020 (OKDDip): sum_i CE(peer_i) + CE(leader) + alpha * w(epoch) * (sum_i T^2 KL(target_i ||
    peer_i) + T^2 KL(mean of peer logits || leader)), T=3, alpha=1, w = okddip_rampup (length 80). Targets are
    detached as in the authors' KL loss (so the query/key projections learn nothing from it: the authors' code
    behaves so too). forward(peer_features, peer_logits, leader_logits, target, epoch)."""

    def __init__(self, feature_dim: int, temperature: float = 3.0, alpha: float = 1.0, rampup_length: float = 80.0,
                 factor: int = 8):
        super().__init__()
        self.attention = OKDDipAttention(feature_dim, factor)
        self.temperature, self.alpha, self.rampup_length = temperature, alpha, rampup_length

    def forward(self, peer_features, peer_logits, leader_logits, target, epoch: float):
        targets = self.attention(peer_features, peer_logits)
        T = self.temperature
        ce = sum(F.cross_entropy(z, target) for z in peer_logits) + F.cross_entropy(leader_logits, target)
        group = sum(kdfast.kd_div(z, m.detach(), T) for z, m in zip(peer_logits, targets))
        leader = kdfast.kd_div(leader_logits, torch.stack(list(peer_logits)).mean(0).detach(), T)
        return ce + self.alpha * okddip_rampup(epoch, self.rampup_length) * (group + leader)


class FeatureMapDiscriminator(nn.Module):
    """AFD's per-network discriminator on (B, C, H, W) feature maps: 3x3 conv + LeakyReLU, 1x1 conv to one
    channel, global average: one real/fake score per sample."""

    def __init__(self, channels: int, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, width, 3, 2, 1), nn.LeakyReLU(0.2),
                                  nn.Conv2d(width, width, 3, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(width, 1, 1))

    def forward(self, x):
        return self.body(x).mean((1, 2, 3))


class OnlineAdversarialFD(nn.Module):
    """Chung et al. 2020 (AFD): network i has a discriminator D_i that tells its peer's feature maps (real) from its
    own (fake), least-squares GAN losses; network i learns CE + T^2 KL from its peer (T=3) + the adversarial term
    (D_i(own) - 1)^2, on feature maps of one shape (B, channels, H, W). Peers are cyclic: network i's peer is
    i+1 mod K. The two losses are optimised alternately with their own optimisers (the trainer's schedule); each
    reaches only its own side."""

    def __init__(self, channels: int, num_networks: int = 2, temperature: float = 3.0, adv_weight: float = 1.0):
        super().__init__()
        self.discriminators = nn.ModuleList(FeatureMapDiscriminator(channels) for _ in range(num_networks))
        self.temperature, self.adv_weight = temperature, adv_weight

    def discriminator_loss(self, features: Sequence[torch.Tensor]):
        k = len(features)
        return sum((d(features[(i + 1) % k].detach()) - 1).square().mean() + d(features[i].detach()).square().mean()
                   for i, d in enumerate(self.discriminators))

    def network_loss(self, features: Sequence[torch.Tensor], logits: Sequence[torch.Tensor], target):
        k = len(logits)
        total = 0
        for i, d in enumerate(self.discriminators):
            kl = kdfast.kd_div(logits[i], logits[(i + 1) % k].detach(), self.temperature)
            adversarial = (frozen_call(d, features[i]) - 1).square().mean()
            total = total + F.cross_entropy(logits[i], target) + kl + self.adv_weight * adversarial
        return total
