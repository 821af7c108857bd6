"""Pure-PyTorch reference of every kdfast op: the specification the kernels are tested against, the fallback
where no kernel exists for a device, and the baseline of the benchmarks. Short and obviously right by design.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._reduce import reduce_rows


def _acc_dtype(*xs: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _plogq(p: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """p * log_ratio with 0 where p == 0 (a class of probability 0 contributes nothing, also to the gradient:
    log_ratio is -inf or NaN there for a -inf logit, and 0 * inf in the product's backward would be NaN); NaN
    stays NaN."""
    zero = p == 0
    return torch.where(zero, torch.zeros_like(p), p * torch.where(zero, torch.zeros_like(log_ratio), log_ratio))


def kd_div_rows(student_logits, teacher_logits, temperature=1.0, divergence="kl", beta=0.5, dim=-1):
    """The unscaled divergence of every row (slice along dim), in float32 (float64 for double inputs)."""
    acc = _acc_dtype(student_logits, teacher_logits)
    ls = F.log_softmax(student_logits.to(acc) / temperature, dim=dim)
    lt = F.log_softmax(teacher_logits.to(acc) / temperature, dim=dim)
    ps, pt = ls.exp(), lt.exp()
    if divergence == "kl":
        terms = _plogq(pt, lt - ls)
    elif divergence == "reverse_kl":
        terms = _plogq(ps, ls - lt)
    elif divergence == "jsd":
        m = beta * pt + (1 - beta) * ps
        lm = torch.log(torch.where(m == 0, torch.ones_like(m), m))  # m = 0 only where both are 0: no term there
        terms = beta * _plogq(pt, lt - lm) + (1 - beta) * _plogq(ps, ls - lm)
    else:
        raise ValueError(f"unknown divergence {divergence!r}")
    return terms.sum(dim)


def kd_div(student_logits, teacher_logits, temperature=1.0, *, divergence="kl", beta=0.5, dim=-1, mask=None,
           reduction="batchmean", scale_t2=True):
    """Reference of kdfast.kd_div."""
    rows = kd_div_rows(student_logits, teacher_logits, temperature, divergence, beta, dim)
    if scale_t2:
        rows = rows * temperature**2
    return reduce_rows(rows, mask, reduction, student_logits.shape[dim])


def cross_entropy_rows(student_logits, target, dim=-1, ignore_index=-100):
    """Cross-entropy at T = 1 of every row, 0 on ignored rows, in float32 (float64 for double inputs)."""
    acc = _acc_dtype(student_logits)
    logits = student_logits.to(acc).movedim(dim, 1) if student_logits.dim() > 1 else student_logits.to(acc)
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")


def kd_loss(student_logits, teacher_logits, target, temperature=4.0, alpha=0.9, *, divergence="kl", beta=0.5,
            dim=-1, ignore_index=-100):
    """Reference of kdfast.kd_loss: alpha * KD (batchmean over kept rows, T^2) + (1 - alpha) * CE (mean over kept
    rows); both 0 when no row is kept."""
    keep = target != ignore_index
    kd = kd_div(student_logits, teacher_logits, temperature, divergence=divergence, beta=beta, dim=dim, mask=keep,
                reduction="batchmean", scale_t2=True)
    ce = cross_entropy_rows(student_logits, target, dim, ignore_index).sum() / keep.sum().clamp_min(1)
    return alpha * kd + (1 - alpha) * ce


def attention_map(features, p=2.0, *, pool="mean", normalize=True):
    """Reference of kdfast.attention_map: (B, prod(spatial)) channel pooling of |features|^p, L2-normalised."""
    a = features.to(_acc_dtype(features)).abs().pow(p)
    if pool == "mean":
        a = a.mean(1)
    elif pool == "sum":
        a = a.sum(1)
    elif pool == "max":
        a = a.max(1).values  # the gradient goes to the first arg-max channel
    else:
        raise ValueError(f"unknown pool {pool!r}")
    a = a.flatten(1)
    return F.normalize(a, dim=1, eps=1e-12) if normalize else a


def match_spatial(student, teacher):
    """Adaptive-average-pools the feature map with more positions to the other's spatial size (RepDistiller)."""
    s_size, t_size = student.shape[2:], teacher.shape[2:]
    if s_size == t_size:
        return student, teacher
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[len(s_size)]
    if s_size.numel() > t_size.numel():
        return pool(student, tuple(t_size)), teacher
    return student, pool(teacher, tuple(s_size))


def attention_transfer_loss(student_features, teacher_features, p=2.0, *, pool="mean", reduction="mean"):
    """Reference of kdfast.attention_transfer_loss over one pair or equal-length sequences of pairs."""
    if isinstance(student_features, torch.Tensor):
        student_features, teacher_features = [student_features], [teacher_features]
    per_sample, sums = [], []
    for s, t in zip(student_features, teacher_features):
        s, t = match_spatial(s, t)
        d = (attention_map(s, p, pool=pool) - attention_map(t, p, pool=pool)).pow(2)
        per_sample.append(d.mean(1))
        sums.append(d.sum())
    rows = torch.stack(per_sample)  # (pairs, B)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return torch.stack(sums).sum()
    if reduction == "mean":
        return rows.mean(1).sum()
def affinity_nodes(features, pool_size=None, pool="max"):
    """The (B, C, n) nodes of a (B, C, H, W) map: pooled with kernel = stride = pool_size (ceil mode), flattened."""
    if pool_size is not None:
        k = (pool_size, pool_size) if isinstance(pool_size, int) else tuple(pool_size)
        pool_fn = F.max_pool2d if pool == "max" else F.avg_pool2d
        features = pool_fn(features, k, k, ceil_mode=True)
    return features.flatten(2)


def affinity_graph(features, *, pool_size=None, pool="max", acc=None):
    """Reference of kdfast.affinity_graph: a_ij = cosine similarity of nodes i and j (norms clamped at 1e-8)."""
    nodes = affinity_nodes(features, pool_size, pool)
    f = F.normalize(nodes.to(acc or _acc_dtype(nodes)), dim=1, eps=1e-8)
    return f.transpose(1, 2) @ f


def _reduce_batch(per_sample, reduction):
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "mean":
        return per_sample.sum() / max(per_sample.shape[0], 1)
    raise ValueError(f"unknown reduction {reduction!r}")


def pairwise_affinity_loss(student_features, teacher_features, *, pool_size=None, pool="max", reduction="mean"):
    """Reference of kdfast.pairwise_affinity_loss: sum_ij (a^s_ij - a^t_ij)^2 / n^2 per sample, with the explicit
    n x n graphs."""
    acc = _acc_dtype(student_features, teacher_features)
    gs = affinity_graph(student_features, pool_size=pool_size, pool=pool, acc=acc)
    gt = affinity_graph(teacher_features, pool_size=pool_size, pool=pool, acc=acc)
    n = gs.shape[-1]
    return _reduce_batch((gs - gt).square().sum((1, 2)) / (n * n), reduction)


def similarity_preserving_loss(student_features, teacher_features, *, reduction="mean"):
    """Reference of kdfast.similarity_preserving_loss (Tung & Mori): G = f f^T over the batch, rows L2-normalised
    (eps 1e-12); ||G_s - G_t||_F^2, divided by B^2 for "mean"."""
    acc = _acc_dtype(student_features, teacher_features)
    b = student_features.shape[0]
    fs = student_features.reshape(b, -1).to(acc)
    ft = teacher_features.reshape(b, -1).to(acc)
    total = (F.normalize(fs @ fs.T, dim=1) - F.normalize(ft @ ft.T, dim=1)).square().sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / max(b * b, 1)
    raise ValueError(f"unknown reduction {reduction!r}")


def batched_svd(A):
    """Reduced SVD A = U diag(S) Vh of each matrix (..., m, n), S descending, in float32 (float64 for double)."""
    return torch.linalg.svd(A.to(_acc_dtype(A)), full_matrices=False)


def manifold_projection(features, rank, center=True):
    """Coordinates (..., n, rank) of n points (..., n, d) on their top-`rank` singular directions: with the
    centred X = U S Vh, X V_rank = U_rank S_rank, each column's sign set so that the entry of largest magnitude
    in the matching column of V_rank is positive."""
    X = features.to(_acc_dtype(features))
    if center:
        X = X - X.mean(-2, keepdim=True)
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    Vr = Vh[..., :rank, :]
    top = Vr.gather(-1, Vr.abs().argmax(-1, keepdim=True))  # (..., rank, 1)
    sign = torch.where(top < 0, -1.0, 1.0).to(X.dtype)
    return U[..., :rank] * S[..., None, :rank] * sign.mT


def manifold_set_loss(student, teacher, rank):
    """||P_s - P_t||_F^2 per set, P = Y Y^T / ||Y Y^T||_F with Y = manifold_projection(X, rank) of each side
    (..., n, d_s) and (..., n, d_t); P = 0 where Y = 0. Expanded through rank x rank products, using
    ||Y Y^T||_F = ||Y^T Y||_F and <Ys Ys^T, Yt Yt^T> = ||Ys^T Yt||_F^2 (the n x n P is never formed)."""
    acc = _acc_dtype(student, teacher)
    Ys = manifold_projection(student.to(acc), rank)
    Yt = manifold_projection(teacher.to(acc), rank)
    return manifold_combine((Ys.mT @ Ys).square().sum((-2, -1)), (Yt.mT @ Yt).square().sum((-2, -1)),
                            (Ys.mT @ Yt).square().sum((-2, -1)))


def manifold_combine(ns2, nt2, cross):
    """||P_s - P_t||_F^2 = ||P_s||^2 + ||P_t||^2 - 2 <P_s, P_t> from ns2 = ||Ys^T Ys||_F^2, nt2 = ||Yt^T Yt||_F^2
    and cross = ||Ys^T Yt||_F^2; a side with Y = 0 has P = 0 (and a finite gradient: no sqrt at 0)."""
    ps, pt = ns2 > 0, nt2 > 0
    ns = torch.where(ps, ns2, torch.ones_like(ns2)).sqrt()
    nt = torch.where(pt, nt2, torch.ones_like(nt2)).sqrt()
    return ps.to(ns.dtype) + pt.to(nt.dtype) - 2 * cross / (ns * nt)


def manifold_points(x):
    """Feature tensor -> (sets, n points, d): (B, C, H, W) -> B sets of H*W points in C dims; (B, D) -> one set
    of B points; (S, n, d) as is."""
    if x.dim() == 4:
        return x.flatten(2).mT
    if x.dim() == 2:
        return x.unsqueeze(0)
    return x


def manifold_distillation_loss(student_features, teacher_features, rank, weights=None, reduction="mean"):
    """Sum over layer pairs i of gamma_i * (mean over sets of manifold_set_loss), or the list of per-set
    values (times gamma_i) with reduction="none"; a single pair of tensors gives a tensor."""
    single = isinstance(student_features, torch.Tensor)
    pairs = list(zip([student_features], [teacher_features]) if single else zip(student_features, teacher_features))
    weights = [1.0] * len(pairs) if weights is None else list(weights)
    values = [w * manifold_set_loss(manifold_points(s), manifold_points(t), rank) for (s, t), w in zip(pairs, weights)]
    if reduction == "none":
        return values[0] if single else values
    return sum(v.mean() for v in values)
