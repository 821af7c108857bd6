"""Structured (pair-wise) distillation losses without materialising the pairwise graphs: pairwise_affinity_loss
(Liu et al., structured KD for dense prediction) and similarity_preserving_loss (Tung & Mori), with the explicit
affinity_graph for inspection and their nn.Module wrappers.

pairwise_affinity_loss uses sum_ij (a^s_ij - a^t_ij)^2 = |S^T S|^2 - 2 |S^T T|^2 + |T^T T|^2 over the row-normalised
node matrices S (n x Cs) and T (n x Ct): O(n C^2) work and O(B n C + C^2) memory instead of O(n^2 C) and
O(B n^2), with the Gram products accumulated in float64 so that the nearly cancelling terms stay exact.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import _ops, _similarity, reference
from . import _validate as check
from ._autograd import once_differentiable, under_transform
from ._features import affinity_graph as _graph
from ._features import affinity_nodes
from ._ops import has_kernel
from ._reduce import reduce_samples

POOLS = ("max", "avg")
REDUCTIONS = ("mean", "sum", "none")
# similarity_preserving_loss forms the B x B Gram matrices in row tiles of at most this many entries.
SP_TILE_ENTRIES = 1 << 22


def _check_pool(pool_size, pool):
    check.choice(pool, "pool", POOLS)
    if pool_size is None:
        return None
    sizes = (pool_size, pool_size) if isinstance(pool_size, int) and not isinstance(pool_size, bool) else pool_size
    if not isinstance(sizes, (tuple, list)) or len(sizes) != 2 or \
            not all(isinstance(k, int) and not isinstance(k, bool) for k in sizes):
        raise TypeError(f"pool_size must be None, an int or a pair of ints, got {pool_size!r}")
    if min(sizes) < 1:
        raise ValueError(f"pool_size must be >= 1, got {pool_size!r}")
    return tuple(sizes)


def _check_map(x, name):
    check.floating(x, name)
    if x.dim() != 4:
        raise ValueError(f"{name} must be a (B, C, H, W) feature map, got shape {tuple(x.shape)}")
    if x.shape[1] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"{name} needs at least one channel and one position, got shape {tuple(x.shape)}")
    return x


def _nodes(features, pool_size, pool):
    """(B, C, n) nodes for the kernel. A half-precision map is average-pooled in float32, so that the pooled nodes
    are not rounded to half precision (the kernel reads any dtype and accumulates in float64)."""
    if pool_size is not None and pool == "avg" and features.dtype in (torch.float16, torch.bfloat16):
        features = features.float()
    return affinity_nodes(features, pool_size, pool)


def affinity_graph(features, *, pool_size=None, pool="max") -> torch.Tensor:
    """The explicit (B, n, n) affinity graph a_ij = <f_i, f_j> / (max(|f_i|, 1e-8) max(|f_j|, 1e-8)) of the nodes of
    a (B, C, H, W) map (pooled with kernel = stride = pool_size, ceil mode; every position a node when None).
    O(n^2) memory by definition: the losses below never build it. Half-precision maps give a float32 graph."""
    _check_map(features, "features")
    pool_size = _check_pool(pool_size, pool)
    return _graph(features, pool_size=pool_size, pool=pool)


def pairwise_affinity_loss(student_features, teacher_features, *, pool_size=None, pool="max",
                           reduction="mean") -> torch.Tensor:
    """Pair-wise distillation loss over the n nodes of each map (see affinity_graph), computed without the n x n
    graphs: the squared differences (a^s_ij - a^t_ij)^2 of every sample and node pair i, j. reduction: "none" =
    the (B,) per-sample means over the n^2 pairs, "mean" = the mean over samples of those (0 for an empty batch),
    "sum" = the sum over samples and pairs, never divided. Student and teacher may differ in channels and must
    give the same node count. Gradients flow through the node norms to both maps; double backward raises
    (kdfast._autograd). Half-precision maps give a float32 loss."""
    _check_map(student_features, "student_features")
    _check_map(teacher_features, "teacher_features")
    check.same_device({"student_features": student_features, "teacher_features": teacher_features})
    pool_size = _check_pool(pool_size, pool)
    check.choice(reduction, "reduction", REDUCTIONS)
    if student_features.shape[0] != teacher_features.shape[0]:
        raise ValueError(f"student_features and teacher_features must have the same batch size, got "
                         f"{student_features.shape[0]} and {teacher_features.shape[0]}")
    s = _nodes(student_features, pool_size, pool)
    t = _nodes(teacher_features, pool_size, pool)
    if s.shape[2] != t.shape[2]:
        raise ValueError(f"student_features and teacher_features must give the same number of nodes, got "
                         f"{s.shape[2]} and {t.shape[2]} (maps {tuple(student_features.shape[2:])} and "
                         f"{tuple(teacher_features.shape[2:])}, pool_size={pool_size})")
    if under_transform(student_features, teacher_features) or not has_kernel(student_features.device):
        return reference.pairwise_affinity_loss(student_features, teacher_features, pool_size=pool_size, pool=pool,
                                                reduction=reduction)
    per_sample, _ = torch.ops.kdfast.pairwise_affinity_fwd(s, t)
    if reduction == "sum":  # the kernel's per-sample values are means over the n^2 pairs
        return per_sample.sum() * (s.shape[2] * s.shape[2])
    return reduce_samples(per_sample, reduction)


def _flat_features(x, name):
    check.floating(x, name)
    if x.dim() < 2:
        raise ValueError(f"{name} must have a batch dimension and features, (B, ...), got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def similarity_preserving_loss(student_features, teacher_features, *, reduction="mean") -> torch.Tensor:
    """Similarity-preserving loss (Tung & Mori): per side G = f f^T over the batch (f = each sample's features
    flattened), each row L2-normalised (eps 1e-12), and the squared differences of G_s and G_t. A sample's value
    is the mean of its row, sum_j (G_s - G_t)_ij^2 / B. reduction: "none" = those (B,) values, "mean" = their mean,
    ||G_s - G_t||_F^2 / B^2 (0 for an empty batch), "sum" = ||G_s - G_t||_F^2. Feature sizes may
    differ. Large batches are processed in row tiles, so no B x B matrix is formed beyond SP_TILE_ENTRIES
    entries. Double backward is supported. Half-precision features give a float32 loss."""
    fs = _flat_features(student_features, "student_features")
    ft = _flat_features(teacher_features, "teacher_features")
    check.same_device({"student_features": student_features, "teacher_features": teacher_features})
    check.choice(reduction, "reduction", REDUCTIONS)
    if fs.shape[0] != ft.shape[0]:
        raise ValueError(f"student_features and teacher_features must have the same batch size, got "
                         f"{fs.shape[0]} and {ft.shape[0]}")
    if _ops.FORCE_REFERENCE or under_transform(fs, ft):
        return reference.similarity_preserving_loss(student_features, teacher_features, reduction=reduction)
    b = fs.shape[0]
    rows, _, _ = _similarity.similarity_preserving(fs, ft, max(1, min(b, SP_TILE_ENTRIES // max(b, 1))))
    return rows.sum() if reduction == "sum" else reduce_samples(rows / max(b, 1), reduction)


class PairwiseAffinity(nn.Module):
    """nn.Module form of pairwise_affinity_loss: PairwiseAffinity(pool_size=..., pool=..., reduction=...)(s, t)."""

    def __init__(self, *, pool_size=None, pool="max", reduction="mean"):
        super().__init__()
        self.pool_size = _check_pool(pool_size, pool)
        check.choice(reduction, "reduction", REDUCTIONS)
        self.pool, self.reduction = pool, reduction

    def forward(self, student_features, teacher_features):
        return pairwise_affinity_loss(student_features, teacher_features, pool_size=self.pool_size, pool=self.pool,
                                      reduction=self.reduction)

    def extra_repr(self):
        return f"pool_size={self.pool_size}, pool={self.pool!r}, reduction={self.reduction!r}"


class SimilarityPreserving(nn.Module):
    """nn.Module form of similarity_preserving_loss: SimilarityPreserving(reduction=...)(s, t)."""

    def __init__(self, *, reduction="mean"):
        super().__init__()
        check.choice(reduction, "reduction", REDUCTIONS)
        self.reduction = reduction

    def forward(self, student_features, teacher_features):
        return similarity_preserving_loss(student_features, teacher_features, reduction=self.reduction)

    def extra_repr(self):
        return f"reduction={self.reduction!r}"


if _ops._C is not None:

    @torch.library.register_fake("kdfast::pairwise_affinity_fwd")
    def _pairwise_affinity_fwd_fake(student, teacher):
        c = student.shape[1] + teacher.shape[1]
        return (student.new_empty((student.shape[0],), dtype=check.acc_dtype(student, teacher)),
                student.new_empty((student.shape[0], c, c), dtype=torch.float64))

    @torch.library.register_fake("kdfast::pairwise_affinity_bwd")
    def _pairwise_affinity_bwd_fake(grad_loss, student, teacher, gram, student_grad, teacher_grad):
        gs = torch.empty_like(student, memory_format=torch.contiguous_format) if student_grad \
            else student.new_empty((0,))
        gt = torch.empty_like(teacher, memory_format=torch.contiguous_format) if teacher_grad \
            else teacher.new_empty((0,))
        return gs, gt

    def _pairwise_affinity_setup_context(ctx, inputs, output):
        student, teacher = inputs
        # Only the Gram rows of the sides that need a gradient are kept for the backward.
        cs = student.shape[1]
        need_s, need_t = student.requires_grad, teacher.requires_grad
        gram = output[1] if need_s == need_t else (output[1][:, :cs] if need_s else output[1][:, cs:]).contiguous()
        ctx.save_for_backward(student, teacher, gram)
        ctx.set_materialize_grads(False)  # else autograd allocates a zero gradient of the (B, C, C) gram output

    @once_differentiable("pairwise_affinity_loss")
    def _pairwise_affinity_backward(ctx, grad_loss, _grad_gram):
        student, teacher, gram = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_loss is None:
            return None, None
        gs, gt = torch.ops.kdfast.pairwise_affinity_bwd(grad_loss, student, teacher, gram, need_s, need_t)
        return gs if need_s else None, gt if need_t else None

    torch.library.register_autograd("kdfast::pairwise_affinity_fwd", _pairwise_affinity_backward,
                                    setup_context=_pairwise_affinity_setup_context)
