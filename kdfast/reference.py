"""Pure-PyTorch reference of every kdfast op: the specification the kernels are tested against, the fallback
where no kernel exists for a device, and the baseline of the benchmarks. Short and obviously right by design.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._features import affinity_graph, affinity_nodes, manifold_points, match_spatial  # noqa: F401
from ._reduce import reduce_rows, reduce_samples
from ._validate import acc_dtype, kd_acc_dtype


def _plogq(p: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """p * log_ratio with 0 where p == 0 (a class of probability 0 contributes nothing, also to the gradient:
    log_ratio is -inf or NaN there for a -inf logit, and 0 * inf in the product's backward would be NaN); NaN
    stays NaN."""
    zero = p == 0
    return torch.where(zero, torch.zeros_like(p), p * torch.where(zero, torch.zeros_like(log_ratio), log_ratio))


def kd_div_rows(student_logits, teacher_logits, temperature=1.0, divergence="kl", beta=0.5, dim=-1):
    """The unscaled divergence of every row (slice along dim), in float32 (float64 for double inputs), computed in
    float64 above T = 16 (kd_acc_dtype)."""
    work = kd_acc_dtype(temperature, student_logits, teacher_logits)
    ls = F.log_softmax(student_logits.to(work) / temperature, dim=dim)
    lt = F.log_softmax(teacher_logits.to(work) / temperature, dim=dim)
    ps, pt = ls.exp(), lt.exp()
    if divergence == "kl":
        terms = _plogq(pt, lt - ls)
    elif divergence == "reverse_kl":
        terms = _plogq(ps, ls - lt)
    elif divergence == "jsd":
        # log m = log(beta p_t + (1 - beta) p_s) in log space (a linear m of subnormal probabilities rounds to 0);
        # where both are 0 there is no term (its inputs kept finite for the gradient).
        none = (ps == 0) & (pt == 0)
        x = torch.where(none, torch.zeros_like(lt), lt + math.log(beta))
        y = torch.where(none, torch.zeros_like(ls), ls + math.log1p(-beta))
        lm = torch.logaddexp(x, y)
        terms = beta * _plogq(pt, lt - lm) + (1 - beta) * _plogq(ps, ls - lm)
    else:
        raise ValueError(f"unknown divergence {divergence!r}")
    return terms.sum(dim).to(acc_dtype(student_logits, teacher_logits))


def kd_div(student_logits, teacher_logits, temperature=1.0, *, divergence="kl", beta=0.5, dim=-1, mask=None,
           reduction="batchmean", scale_t2=True):
    """Reference of kdfast.kd_div."""
    rows = kd_div_rows(student_logits, teacher_logits, temperature, divergence, beta, dim)
    if scale_t2:
        rows = rows * temperature**2
    return reduce_rows(rows, mask, reduction)


def cross_entropy_rows(student_logits, target, dim=-1, ignore_index=-100):
    """Cross-entropy at T = 1 of every row, 0 on ignored rows, in float32 (float64 for double inputs)."""
    acc = acc_dtype(student_logits)
    logits = student_logits.to(acc).movedim(dim, 1) if student_logits.dim() > 1 else student_logits.to(acc)
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")


def kd_loss(student_logits, teacher_logits, target, temperature=4.0, alpha=0.9, *, divergence="kl", beta=0.5,
            dim=-1, ignore_index=-100, num_items_in_batch=None):
    """Reference of kdfast.kd_loss: alpha * KD (batchmean over kept rows, T^2) + (1 - alpha) * CE (mean over kept
    rows); both 0 when no row is kept. With num_items_in_batch: both summed over the kept rows, divided by it."""
    keep = target != ignore_index
    kd = kd_div(student_logits, teacher_logits, temperature, divergence=divergence, beta=beta, dim=dim, mask=keep,
                reduction="batchmean" if num_items_in_batch is None else "sum", scale_t2=True)
    ce = cross_entropy_rows(student_logits, target, dim, ignore_index).sum()
    if num_items_in_batch is None:
        return alpha * kd + (1 - alpha) * ce / keep.sum().clamp_min(1)
    return (alpha * kd + (1 - alpha) * ce) / num_items_in_batch


def attention_map(features, p=2.0, *, pool="mean", normalize=True):
    """Reference of kdfast.attention_map: (B, prod(spatial)) channel pooling of |features|^p, L2-normalised."""
    x = features.to(acc_dtype(features)).abs()
    # |x|^p with gradient 0 at x = 0, as the kernels: autograd's p |x|^(p - 1) is inf there for p < 1, and its
    # 0 * inf NaN even where no gradient flows (a channel that max-pooling did not pick)
    zero = x == 0
    a = torch.where(zero, 0.0, torch.where(zero, 1.0, x).pow(p))
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


def attention_transfer_loss(student_features, teacher_features, p=2.0, *, pool="mean", reduction="mean"):
    """Reference of kdfast.attention_transfer_loss over one pair or equal-length sequences of pairs."""
    if isinstance(student_features, torch.Tensor):
        student_features, teacher_features = [student_features], [teacher_features]
    per_sample, sums = [], []
    for s, t in zip(student_features, teacher_features):
        s, t = match_spatial(s, t)
        d = (attention_map(s, p, pool=pool) - attention_map(t, p, pool=pool)).pow(2)
        per_sample.append(d.sum(1) / max(d.shape[1], 1))
        sums.append(d.sum())
    rows = torch.stack(per_sample)  # (pairs, B); a pair without positions gives 0
    if reduction == "none":
        return rows
    if reduction == "sum":
        return torch.stack(sums).sum()
    if reduction == "mean":
        return rows.sum(1).div(max(rows.shape[1], 1)).sum()
    raise ValueError(f"unknown reduction {reduction!r}")


def pairwise_affinity_loss(student_features, teacher_features, *, pool_size=None, pool="max", reduction="mean"):
    """Reference of kdfast.pairwise_affinity_loss, with the explicit n x n graphs: per sample the mean over pairs of
    (a^s_ij - a^t_ij)^2 ("none", averaged by "mean"); "sum" the sum over samples and pairs."""
    acc = acc_dtype(student_features, teacher_features)
    gs = affinity_graph(student_features, pool_size=pool_size, pool=pool, acc=acc)
    gt = affinity_graph(teacher_features, pool_size=pool_size, pool=pool, acc=acc)
    squares = (gs - gt).square()
    if reduction == "sum":
        return squares.sum()
    return reduce_samples(squares.mean((1, 2)), reduction)


def similarity_preserving_loss(student_features, teacher_features, *, reduction="mean"):
    """Reference of kdfast.similarity_preserving_loss (Tung & Mori): G = f f^T over the batch, rows L2-normalised
    (eps 1e-12); per sample the mean of its row's squared differences ("none"), their mean ("mean", the sum / B^2)
    or the sum of all squared differences ("sum")."""
    acc = acc_dtype(student_features, teacher_features)
    b = student_features.shape[0]
    fs = student_features.reshape(b, -1 if b else 0).to(acc)
    ft = teacher_features.reshape(b, -1 if b else 0).to(acc)
    rows = (F.normalize(fs @ fs.T, dim=1) - F.normalize(ft @ ft.T, dim=1)).square().sum(1)
    return rows.sum() if reduction == "sum" else reduce_samples(rows / max(b, 1), reduction)


def batched_svd(A):
    """Reduced SVD A = U diag(S) Vh of each matrix (..., m, n), S descending, in float32 (float64 for double)."""
    return torch.linalg.svd(A.to(acc_dtype(A)), full_matrices=False)


def manifold_projection(features, rank, center=True):
    """Coordinates (..., n, rank) of n points (..., n, d) on their top-`rank` singular directions: with the
    centred X = U S Vh, X V_rank = U_rank S_rank, each column's sign set so that the entry of largest magnitude
    in the matching column of V_rank is positive."""
    X = features.to(acc_dtype(features))
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
    acc = acc_dtype(student, teacher)
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


def manifold_distillation_loss(student_features, teacher_features, rank, weights=None, reduction="mean"):
    """Sum over layer pairs i of gamma_i * (mean ("mean") or sum ("sum") over sets of manifold_set_loss), or the
    per-set values times gamma_i ("none"; a list for sequences); a single pair of tensors gives a tensor."""
    single = isinstance(student_features, torch.Tensor)
    pairs = list(zip([student_features], [teacher_features]) if single else zip(student_features, teacher_features))
    weights = [1.0] * len(pairs) if weights is None else list(weights)
    values = [w * manifold_set_loss(manifold_points(s), manifold_points(t), rank) for (s, t), w in zip(pairs, weights)]
    if reduction == "none":
        return values[0] if single else values
    return sum(reduce_samples(v, reduction) for v in values)


def _divergence_terms(logq, logp, divergence, beta):
    """The terms of D(q || p) over the last dim from log-probabilities (kd_div's conventions): kl sum q (log q -
    log p), reverse_kl sum p (log p - log q), jsd beta KL(q || m) + (1 - beta) KL(p || m), m = beta q + (1 - beta) p."""
    q, p = logq.exp(), logp.exp()
    if divergence == "kl":
        return _plogq(q, logq - logp)
    if divergence == "reverse_kl":
        return _plogq(p, logp - logq)
    if divergence == "jsd":
        m = beta * q + (1 - beta) * p
        lm = torch.log(torch.where(m == 0, torch.ones_like(m), m))
        return beta * _plogq(q, logq - lm) + (1 - beta) * _plogq(p, logp - lm)
    raise ValueError(f"unknown divergence {divergence!r}")


def _logsumexp_or_ninf(x):
    """logsumexp over the last dim (keepdim), -inf for a row of -inf only, with a zero gradient there (torch's
    logsumexp would give NaN)."""
    any_finite = (x > float("-inf")).any(-1, keepdim=True)
    lse = torch.logsumexp(torch.where(any_finite, x, torch.zeros_like(x)), dim=-1, keepdim=True)
    return torch.where(any_finite, lse, torch.full_like(lse, float("-inf")))


def topk_tail(teacher_logprobs, valid, classes):
    """The log-mass u = log(1 - sum_j exp(lp_j)) (..., 1) that a sparse teacher did not return, over its valid
    entries, formed in float64 from the log-probabilities as given (in float32 that sum cancels where the entries
    hold almost all of the mass, and the tempered tail exp(u / T) magnifies the error). -inf (no tail) at or below
    (valid + 1) eps, eps that of the log-probabilities' precision (float64's for float64, float32's otherwise: below
    it the sum is their rounding), and where the valid entries are all `classes` classes. The kernels' rule
    (csrc/topk_kd.cpp, teacher_tail_log)."""
    eps = torch.finfo(torch.float64 if teacher_logprobs.dtype == torch.float64 else torch.float32).eps
    lp = teacher_logprobs.double()
    tail_mass = 1 - torch.where(valid, lp.exp(), torch.zeros_like(lp)).sum(-1, keepdim=True)
    entries = valid.sum(-1, keepdim=True)
    return torch.where((tail_mass > (entries + 1) * eps) & (entries < classes), tail_mass, 0).log()


def topk_kd_rows(student_logits, teacher_indices, teacher_logprobs, temperature=1.0, tail="renormalize",
                 divergence="kl", beta=0.5):
    """The unscaled divergence of every row (..., V) from a sparse teacher (..., k): log-probabilities at T = 1,
    -inf = padding (its index is not read), in float32 (float64 for float64 logits: the student's accumulation
    dtype). Teacher Q = softmax(lp / T) over the entries (and, for "bucket", the mass it did not return: topk_tail).
    Student P: "renormalize" p[idx] (kl) or p[idx] / sum p[idx] (reverse_kl, jsd); "bucket" p[idx] and the mass of
    the classes off the top-k, summed over those classes. D(Q || P) with kd_div's divergence and beta. A row without
    a valid entry gives 0 with "renormalize"."""
    acc = acc_dtype(student_logits)
    logp = F.log_softmax(student_logits.to(acc) / temperature, dim=-1)
    lp = teacher_logprobs.to(acc)
    valid = lp > float("-inf")
    classes = logp.shape[-1]
    logp_top = logp.gather(-1, torch.where(valid, teacher_indices, torch.zeros_like(teacher_indices)).long())
    logp_top = torch.where(valid, logp_top, torch.full_like(logp_top, float("-inf")))
    t = lp / temperature
    if tail == "bucket":
        t = torch.cat([t, topk_tail(teacher_logprobs, valid, classes).to(acc) / temperature], dim=-1)
        # The student's mass off the top-k classes, summed over those classes (1 - sum p[idx] would cancel).
        slot = torch.where(valid, teacher_indices.long(), classes)
        top = torch.zeros(*logp.shape[:-1], classes + 1, dtype=torch.bool, device=logp.device)
        top = top.scatter(-1, slot, True)[..., :classes]
        rest = _logsumexp_or_ninf(torch.where(top, torch.full_like(logp, float("-inf")), logp))
        logp_top = torch.cat([logp_top, rest], dim=-1)
    elif tail != "renormalize":
        raise ValueError(f"unknown tail {tail!r}")
    else:
        if divergence != "kl":
            logp_top = torch.where(valid, logp_top - _logsumexp_or_ninf(logp_top), logp_top)
        # A row without a valid entry: 0, through finite stand-ins (no NaN in its gradient either).
        some = valid.any(-1, keepdim=True)
        t, logp_top = torch.where(some, t, torch.zeros_like(t)), torch.where(some, logp_top, torch.zeros_like(t))
    logq = F.log_softmax(t, dim=-1)
    rows = _divergence_terms(logq, logp_top, divergence, beta).sum(-1)
    if tail == "renormalize":
        rows = torch.where(valid.any(-1), rows, torch.zeros_like(rows))
    return rows


def _num_items(rows, mask, reduction, num_items_in_batch):
    """reduce_rows, or the sum over counted rows / num_items_in_batch when that is given."""
    if num_items_in_batch is None:
        return reduce_rows(rows, mask, reduction)
    return reduce_rows(rows, mask, "sum") / num_items_in_batch


def topk_kd_div(student_logits, teacher_indices, teacher_logprobs, temperature=1.0, *, tail="renormalize",
                divergence="kl", beta=0.5, mask=None, reduction="batchmean", scale_t2=True, num_items_in_batch=None):
    """topk_kd_rows reduced over the rows of the mask ("batchmean", "sum" or "none"; with num_items_in_batch the
    sum over counted rows divided by it), times T^2 with scale_t2."""
    rows = topk_kd_rows(student_logits, teacher_indices, teacher_logprobs, temperature, tail, divergence, beta)
    out = _num_items(rows, mask, reduction, num_items_in_batch)
    return out * (temperature * temperature) if scale_t2 else out


def sampled_kd_rows(student_logits, teacher_indices, teacher_counts, teacher_logprobs, temperature=1.0):
    """The unscaled sampled-teacher estimate of KL(p_t || p_s) at T of every row (..., V): sum_j (c_j / n)
    (lp_j - log_softmax(s / T)[idx_j]), n = sum_j c_j the row's draws, lp the teacher's log-probabilities at T;
    entries of count 0 are padding (0 for a row without draws)."""
    acc = acc_dtype(student_logits)
    logp = F.log_softmax(student_logits.to(acc) / temperature, dim=-1)
    counts = teacher_counts.to(acc)
    valid = counts > 0
    w = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    logp_top = logp.gather(-1, torch.where(valid, teacher_indices, torch.zeros_like(teacher_indices)).long())
    lp = teacher_logprobs.to(acc)
    return torch.where(valid, w * (torch.where(valid, lp, torch.zeros_like(lp)) - logp_top),
                       torch.zeros_like(lp)).sum(-1)


def sampled_kd_div(student_logits, teacher, temperature=1.0, *, mask=None, reduction="batchmean", scale_t2=True,
                   num_items_in_batch=None):
    """sampled_kd_rows of a Sampled teacher (indices, counts, logprobs) reduced as topk_kd_div."""
    indices, counts, logprobs = teacher
    rows = sampled_kd_rows(student_logits, indices, counts, logprobs, temperature)
    out = _num_items(rows, mask, reduction, num_items_in_batch)
    return out * (temperature * temperature) if scale_t2 else out


def capped_logits(hidden, weight, bias=None, softcap=None, logit_scale=1.0, acc=None):
    """softcap * tanh(logit_scale * (hidden @ weight.T + bias) / softcap) (logit_scale * (...) without a cap), in
    acc (default float32, float64 for double inputs)."""
    acc = acc or acc_dtype(hidden, weight)
    logits = logit_scale * F.linear(hidden.to(acc), weight.to(acc), None if bias is None else bias.to(acc))
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def fused_linear_kd(student_hidden, student_weight, teacher, *, student_bias=None, target=None, temperature=1.0,
                    alpha=1.0, divergence="kl", beta=0.5, tail="renormalize", ignore_index=-100, scale_t2=True,
                    chunk_size=None, softcap=None, logit_scale=1.0, num_items_in_batch=None):
    """Reference of kdfast.fused_linear_kd: the logits built in full (capped_logits), then alpha * KD + (1 - alpha)
    * CE over the rows whose target is not ignore_index (all rows without a target), each "batchmean", or summed
    and divided by num_items_in_batch. teacher: logits, a TeacherHead (hidden, weight, bias, softcap,
    logit_scale), a TopK (indices, logprobs) or a Sampled (indices, counts, logprobs); the teacher gets no gradient
    and is taken in the student's accumulation dtype (a sparse teacher's tail as topk_kd_rows forms it). chunk_size
    is ignored."""
    acc = acc_dtype(student_hidden, student_weight)
    logits = capped_logits(student_hidden, student_weight, student_bias, softcap, logit_scale, acc)
    keep = None if target is None else target != ignore_index
    reduction = "batchmean" if num_items_in_batch is None else "sum"
    if not isinstance(teacher, torch.Tensor) and hasattr(teacher, "logprobs"):  # TopK or Sampled
        lp = teacher.logprobs.detach()  # as given: the bucket's tail rule reads its dtype (topk_tail)
        if hasattr(teacher, "counts"):  # Sampled
            rows = sampled_kd_rows(logits, teacher.indices, teacher.counts, lp, temperature)
        else:
            rows = topk_kd_rows(logits, teacher.indices, lp, temperature, tail, divergence, beta)
        kd = reduce_rows(rows * (temperature**2 if scale_t2 else 1.0), keep, reduction)
    else:
        if not isinstance(teacher, torch.Tensor):  # TeacherHead
            teacher = capped_logits(teacher.hidden, teacher.weight, teacher.bias, teacher.softcap,
                                    teacher.logit_scale, acc)
        kd = kd_div(logits, teacher.detach().to(acc), temperature, divergence=divergence, beta=beta, mask=keep,
                    reduction=reduction, scale_t2=scale_t2)
    loss = alpha * kd
    if target is not None:
        ce = cross_entropy_rows(logits, target.long(), ignore_index=ignore_index).sum()
        loss = loss + (1 - alpha) * (ce if num_items_in_batch is not None else ce / keep.sum().clamp_min(1))
    return loss if num_items_in_batch is None else loss / num_items_in_batch
