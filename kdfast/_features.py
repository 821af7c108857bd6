"""Input shaping of the feature losses, shared by the kernel path and the reference (neither owns it): the spatial
matching of attention pairs, the nodes and the explicit graph of pairwise affinity (which has no kernel), the point
sets of manifold distillation."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def match_spatial(student, teacher):
    """Adaptive-average-pools the feature map with more positions to the other's spatial size (RepDistiller), in
    float32 (float64 for float64 maps): a half-precision map is pooled from its float32 values, so that the loss is
    computed in float32 and its gradient rounded once."""
    s_size, t_size = student.shape[2:], teacher.shape[2:]
    if s_size == t_size:
        return student, teacher
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[len(s_size)]

    def pooled(x, size):
        return pool(x.to(torch.float64 if x.dtype == torch.float64 else torch.float32), tuple(size))

    if s_size.numel() > t_size.numel():
        return pooled(student, t_size), teacher
    return student, pooled(teacher, s_size)


def affinity_nodes(features, pool_size=None, pool="max"):
    """The (B, C, n) nodes of a (B, C, H, W) map: pooled with kernel = stride = pool_size (ceil mode), flattened."""
    if pool_size is not None:
        k = (pool_size, pool_size) if isinstance(pool_size, int) else tuple(pool_size)
        pool_fn = F.max_pool2d if pool == "max" else F.avg_pool2d
        features = pool_fn(features, k, k, ceil_mode=True)
    return features.flatten(2)


def affinity_graph(features, *, pool_size=None, pool="max", acc=None):
    """a_ij = cosine similarity of nodes i and j of a (B, C, H, W) map (norms clamped at 1e-8), (B, n, n), in acc
    (default float32, float64 for float64 features)."""
    acc = acc or (torch.float64 if features.dtype == torch.float64 else torch.float32)
    # pooled in acc: a half-precision map's average would be rounded to half precision, forward and backward
    f = F.normalize(affinity_nodes(features.to(acc), pool_size, pool), dim=1, eps=1e-8)
    return f.transpose(1, 2) @ f


def manifold_points(x):
    """Feature tensor -> (sets, n points, d): (B, C, H, W) -> B sets of H*W points in C dims; (B, D) -> one set
    of B points; (S, n, d) as is."""
    if x.dim() == 4:
        return x.flatten(2).mT
    if x.dim() == 2:
        return x.unsqueeze(0)
    return x
