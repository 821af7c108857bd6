"""Vocabulary-parallel distillation losses over torch.distributed (gloo on CPU, nccl on GPU), and the DTensor inputs
of kd_div, topk_kd_div, sampled_kd_div and fused_linear_kd.

With tensor parallelism each rank of `group` holds a contiguous slice of the vocabulary, in rank order; slices
may be uneven (a rank's size is its shard's last dimension). The softmax over the whole vocabulary is assembled
from per-row statistics, as vocabulary-parallel cross-entropy does; no logits cross ranks. The loss is the same on
every rank and equals the single-process loss on the concatenated logits; each rank's gradient is its slice of the
single-process gradient.

Dense teacher (vocab_parallel_kd_div), on the kd kernels: kd_fwd on the shard gives its row logsumexps of student
and teacher (and, for kl / reverse_kl, the divergence of the shard's own distributions, from which the shard's
share of the whole vocabulary's follows); one all-reduce MAX and one SUM make the global ones. jsd's partial sums
need the global logsumexps: kd_partial_fwd makes a second pass with them, and one more SUM adds them up. kd_bwd,
given the global statistics, writes the gradient slice. Sparse teacher (vocab_parallel_topk_kd_div; every
divergence, both tails), on the top-k kernels: one MAX of the slice sizes; topk_kd_fwd on the shard (the other
shards' entries as padding) gives its largest logit M, its log-sum L and its log-sum off the top-k classes Loff
(summed over those classes: the bucket's student tail in log space); one MAX of M and of M + T Loff and one SUM
of the shards' L and Loff, relative to those, and of the top-k entries' logits (each held by one rank) make the whole
vocabulary's; the divergence over the (rows, k) categories follows in PyTorch, and topk_kd_bwd, given the whole
vocabulary's statistics in its layout (csrc/common/topk_kd.h, TopKStat), writes the gradient slice. A sampled
teacher (vocab_parallel_sampled_kd_div) is the same exchange with its weights c_j / n in place of the teacher's
softmax, as the kernels' sampled form.

DTensor inputs sharded on the vocabulary (Shard on the class dim of logits, Shard(0) of an lm_head weight) on one
mesh dimension, replicated on the others, run these functions on that mesh dimension's process group; the loss
comes back as a replicated DTensor.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch.autograd.function import once_differentiable

from . import _validate as check
from . import reference
from ._ops import _C, has_kernel
from ._reduce import check_row_reduction
from ._validate import acc_dtype
from .logits import _check_options
from .topk import (
    TAILS,
    Sampled,
    TopKIndexError,
    _categories,
    _check_items,
    _check_pair,
    _eager,
    _finish,
    _kernel_teacher_grad,
    _plogq,
    _sample_weights,
    _teacher_grad,
    teacher_shift,
)

_MAX_SHARD = 1 << 24  # slice sizes travel in the float32 MAX all-reduce, exact up to 2^24


def _check_common(student, temperature, mask, reduction, scale_t2, group):
    check.floating(student, "student_shard")
    if student.dim() == 0 or student.shape[-1] == 0:
        raise ValueError(f"student_shard must be (..., V_rank) with V_rank >= 1, got {tuple(student.shape)}")
    temperature = check.check_temperature(temperature)
    check_row_reduction(reduction, "kdfast.distributed")
    if not isinstance(scale_t2, bool):
        raise TypeError(f"scale_t2 must be a bool, got {type(scale_t2).__name__}")
    check.row_mask(mask, student.shape[:-1], student, "student_shard")
    return temperature


def _require_group() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("kdfast.distributed needs an initialised torch.distributed process group")


def _reference_point(m):
    """The row maxima as exp's reference, 0 where a row is all -inf (so that exp gives 0, not NaN)."""
    return torch.where(m == float("-inf"), torch.zeros_like(m), m)


def _require_kernels(x) -> None:
    if not has_kernel(x.device):
        raise RuntimeError(f"kdfast.distributed runs each shard on kdfast's kernels, and this installation has none "
                           f"for {x.device.type} tensors (kdfast.backends() says what is built; KDFAST_BACKEND="
                           f"reference turns them off)")


class _VocabParallelKD(torch.autograd.Function):
    """Per-row divergence of the whole vocabulary from this rank's (rows, V_rank) shards, on the kd kernels."""

    @staticmethod
    def forward(ctx, student, teacher, temperature, divergence, beta, group):
        s3, t3 = student.unsqueeze(-1), teacher.unsqueeze(-1)
        jsd = divergence == "jsd"
        # The shard's statistics (KdStat): each side's maximum and log-sum exp((x - max) / T) over its classes, and
        # (kl, reverse_kl) the divergence of its own renormalised distributions.
        _, _, local = torch.ops.kdfast.kd_fwd(s3, t3, None, temperature, "kl" if jsd else divergence, beta, -100)
        local = local.squeeze(-1)
        peak = local[:2].clone()
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
        ref = _reference_point(peak)
        # The shard's sum of exp((x - peak) / T), relative to the largest maximum over the ranks.
        mass = (local[2:4] + (local[:2] - ref) / temperature).exp()
        x = 1 if divergence == "kl" else 0  # the plane of the expectation's distribution (teacher for kl)
        if jsd:
            sums = mass
        else:
            # The shard's divergence is E[a_x - a_y] - ls_x + ls_y over its classes, a = (logit - max) / T against
            # its own maxima: its mean E[a_x - a_y] under the shard's p_x, moved to the maxima over the ranks, rides
            # in the SUM weighted by the shard's mass and gives the whole vocabulary's. Against maxima, never raw
            # logits: a student at 1e5 and a teacher at 0 would cancel (as csrc/common/kd_div.h, KdRowState).
            shift = (_reference_point(local[:2]) - ref) / temperature
            mean = local[4] + (local[2 + x] - local[3 - x]) + (shift[x] - shift[1 - x])
            share = torch.where(mass[x] == 0, torch.zeros_like(mean), mass[x] * mean)
            sums = torch.cat([mass, share.unsqueeze(0)])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        given = torch.cat([peak, sums[:2].log()])  # the whole vocabulary's maxima and log-sums
        if jsd:  # the partial sums need the whole vocabulary's statistics: a second pass, and a second SUM
            _, partial = torch.ops.kdfast.kd_partial_fwd(s3, t3, given.unsqueeze(-1), temperature, divergence, beta)
            aux = partial.squeeze(-1)[4:].contiguous()
            dist.all_reduce(aux, op=dist.ReduceOp.SUM, group=group)
            rows = beta * aux[0] + (1 - beta) * aux[1]
        else:
            aux = (sums[2] / sums[x] - (given[2 + x] - given[3 - x])).unsqueeze(0)
            rows = aux[0]
        ctx.save_for_backward(student, teacher, torch.cat([given, aux]).unsqueeze(-1))
        ctx.options = (temperature, divergence, beta)
        return rows.clamp_min(0)  # a negative divergence is rounding, shown as 0 (as the kernels do)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows):
        student, teacher, stats = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # kd_bwd with the whole vocabulary's statistics: this rank's slice of the gradients, exactly.
        gs, gt = torch.ops.kdfast.kd_bwd(grad_rows.unsqueeze(-1), None, student.unsqueeze(-1), teacher.unsqueeze(-1),
                                         None, stats, *ctx.options, -100, need_s, need_t)
        return gs.squeeze(-1) if need_s else None, gt.squeeze(-1) if need_t else None, None, None, None, None


def _topk_rows(student, indices, logprobs, temperature, tail, group, divergence="kl", beta=0.5, weights=None):
    """The per-row top-k divergence (...,) of the whole vocabulary from this rank's shard (..., V_rank); with
    weights (..., k), the sampled teacher's c_j / n, sampled_kd_div's rows."""
    _require_kernels(student)
    classes, k = student.shape[-1], indices.shape[-1]
    weights = None if weights is None else weights.reshape(-1, k)
    return _VocabParallelTopK.apply(student.reshape(-1, classes), indices.reshape(-1, k), logprobs.reshape(-1, k),
                                    weights, temperature, tail, divergence, float(beta), group
                                    ).reshape(student.shape[:-1])


def _kd_rows(student, teacher, temperature, divergence, beta, group):
    """The per-row divergence (...,) of the whole vocabulary from this rank's shards (..., V_rank)."""
    _require_kernels(student)
    classes = student.shape[-1]
    rows = _VocabParallelKD.apply(student.reshape(-1, classes), teacher.reshape(-1, classes), temperature, divergence,
                                  beta, group).reshape(student.shape[:-1])
    return rows.to(acc_dtype(student, teacher))  # float64 statistics above T = 16 (the kernels'), not the loss


def vocab_parallel_kd_div(student_shard, teacher_shard, temperature=1.0, *, divergence="kl", beta=0.5, group=None,
                          mask=None, reduction="batchmean", scale_t2=True) -> torch.Tensor:
    """kd_div over a vocabulary split across the ranks of `group`: student_shard and teacher_shard (..., V_rank)
    are this rank's contiguous slice of the logits (slices in rank order, possibly uneven). divergence ("kl" =
    KL(p_t || p_s), Hinton; "reverse_kl"; "jsd" with beta), mask, reduction ("batchmean", "sum", "none") and
    scale_t2 as kd_div. Returns the loss of the whole vocabulary, the same on every rank. Gradients flow to both
    shards (this rank's slice of the single-process gradients)."""
    temperature = _check_common(student_shard, temperature, mask, reduction, scale_t2, group)
    _check_options(temperature, divergence, beta)
    check.floating(teacher_shard, "teacher_shard")
    check.same_shape(student_shard, teacher_shard, "student_shard", "teacher_shard")
    check.same_device({"student_shard": student_shard, "teacher_shard": teacher_shard})
    _require_group()
    rows = _kd_rows(student_shard, teacher_shard, temperature, divergence, beta, group)
    return _finish(rows, mask, reduction, temperature, scale_t2, None)


def _topk_terms(logq, logp, divergence, beta, q=None):
    """Per category (rows, c): the divergence's term and G = d D / d log P (csrc/common/topk_kd.h, topk_term). q:
    the sampled teacher's weights in place of exp(logq) (its kl term is then w_j (lp_j - log P_j), G = -w_j)."""
    q = logq.exp() if q is None else q
    p = logp.exp()
    if divergence == "kl":
        return _plogq(q, logq - logp), -q
    if divergence == "reverse_kl":
        term = _plogq(p, logp - logq)
        return term, term
    m = beta * q + (1 - beta) * p
    lm = torch.where(logp == logq, logp, torch.log(m))
    gs = (1 - beta) * _plogq(p, logp - lm)
    return beta * _plogq(q, logq - lm) + gs, gs


class _VocabParallelTopK(torch.autograd.Function):
    """Per-row top-k divergence of the whole vocabulary from this rank's (rows, V_rank) shard, on the top-k
    kernels; with weights (rows, k), the sampled teacher's (the forward KL, "renormalize"), sampled_kd_div's."""

    @staticmethod
    def forward(ctx, student, indices, logprobs, weights, temperature, tail, divergence, beta, group):
        acc = acc_dtype(student)  # the kernels' accumulator (that of their statistics)
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        sizes = torch.zeros(world, device=student.device)
        sizes[rank] = student.shape[-1]
        dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=group)
        sizes = [int(s) for s in sizes.tolist()]
        offset, total = sum(sizes[:rank]), sum(sizes)
        lp = logprobs.to(acc)
        valid = lp > float("-inf") if weights is None else weights > 0  # a sampled teacher's entries drawn
        if _eager(lp):
            bad = valid & ((indices < 0) | (indices >= total))
            if bool(bad.any()):
                raise TopKIndexError(f"teacher_indices holds {int(indices[bad][0])}, outside [0, {total}) (the "
                                     f"vocabulary of all ranks) on an entry that is not padding")
            if bool((valid & (lp > 0)).any()):
                raise ValueError("teacher_logprobs must be log-probabilities (<= 0; -inf for padding)")
        shifted = indices.long() - offset  # this shard's classes; the other ranks' fall outside [0, V_rank)
        local = valid & (shifted >= 0) & (shifted < student.shape[-1])
        li = torch.where(local, shifted, torch.zeros_like(shifted))
        ninf = torch.full_like(lp, float("-inf"))
        # the other shards' entries as padding; as given, as every top-k op takes them (teacher_shift)
        lp_local = torch.where(local, logprobs, torch.full_like(logprobs, float("-inf")))
        # The shard's statistics (csrc/common/topk_kd.h, TopKStat): its largest logit M, its log-sum L and its
        # log-sum Loff over the classes off the top-k (summed over those classes, never 1 - sum p[idx]), in units
        # of (s - M) / T. One read of the shard, no copy.
        stats = torch.ops.kdfast.topk_kd_fwd(student, li, lp_local, temperature, "renormalize")[1]
        # One MAX of M and of the shards' log-sums off the top-k in logit units, M + T Loff (float64: its difference
        # with M is divided by T), the reference of Loff's SUM: against M it would underflow where the student's
        # mass off the top-k is below exp(-87) (a small T: an infinite kl).
        m64, off64 = stats[0].double(), stats[6].double()
        peaks = torch.stack([m64, m64 + temperature * off64])
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX, group=group)
        ref64, off_ref = _reference_point(peaks[0]), _reference_point(peaks[1])
        shift = ((m64 - ref64) / temperature).to(acc)
        off_shift = ((m64 - off_ref) / temperature + off64).to(acc)
        ref = ref64.to(acc)
        top = (student.gather(-1, li).to(acc) - ref.unsqueeze(-1)) / temperature
        sums = torch.cat([(shift + stats[1]).exp().unsqueeze(-1), off_shift.exp().unsqueeze(-1),
                          torch.where(local, top, torch.zeros_like(top))], dim=-1)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)  # each top-k entry's logit is held by one rank
        # L and Loff of the whole vocabulary, relative to ref
        lse, off = sums[:, 0].log(), ((off_ref - ref64) / temperature).to(acc) + sums[:, 1].log()
        x = torch.where(valid, sums[:, 2:], ninf)  # (s[idx] - ref) / T, -inf on padding
        rest = (off - lse).unsqueeze(-1)
        # the teacher's tail (bucket), by the kernels' rule: from the log-probabilities as given
        u = reference.topk_tail(logprobs, valid, total) if tail == "bucket" else None
        if weights is None:
            # The top-k teacher shifted as topk_kd_bwd will shift lp_local (teacher_shift), so that its categories
            # and the statistics given to it agree, and keep their precision at a small T.
            shift = teacher_shift(lp_local, lp_local.to(acc) > float("-inf"))
            lp = (logprobs.double() - shift).to(acc)
            u = None if u is None else (u - shift).to(acc)
            logq, logp = _categories(x - lse.unsqueeze(-1), lp, valid, temperature, tail, divergence, rest, u=u)
        else:  # sampled: renormalize kl's categories with Q = w (csrc/common/topk_kd.h)
            logq, logp = lp, x - lse.unsqueeze(-1)
        cats = torch.cat([valid, torch.ones_like(valid[:, :1])], -1) if tail == "bucket" else valid
        term, g = _topk_terms(logq, logp, divergence, beta, weights)
        zero = torch.zeros_like(term)
        rows = torch.where(cats, term, zero).sum(-1)
        sum_g = torch.where(cats, g, zero).sum(-1)
        any_valid = valid.any(-1)
        if tail == "bucket":
            # relative to Loff, G_tail - S_G P_tail (csrc/common/topk_kd.h: no 1 / P_tail is formed)
            coef = torch.where(off > float("-inf"), g[:, -1] - sum_g * rest.squeeze(-1).exp(), torch.zeros_like(sum_g))
        else:
            rows = torch.where(any_valid, rows, torch.zeros_like(rows))
            coef = -sum_g if divergence == "kl" else torch.zeros_like(sum_g)
        # The statistics of the whole vocabulary in the kernel's layout: topk_kd_bwd then writes this shard's slice.
        if tail == "renormalize" and divergence != "kl":
            p_ref = torch.where(any_valid, torch.logsumexp(x, -1), torch.full_like(lse, float("-inf")))
        else:
            p_ref = lse
        t = lp / temperature  # the teacher's log-normaliser over its categories
        tlse = torch.logsumexp(torch.cat([t, u / temperature], -1) if tail == "bucket" else t, -1)
        global_stats = torch.stack([ref, lse, p_ref, tlse, sum_g, coef, off])
        w_local = None if weights is None else torch.where(local, weights.to(acc), torch.zeros_like(lp))
        ctx.save_for_backward(student, li, lp_local, global_stats, x - lse.unsqueeze(-1), lp, valid, rest, u, w_local,
                              weights)
        ctx.options = (temperature, tail, divergence, beta)
        ctx.lp_dtype = logprobs.dtype
        return rows

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows):
        student, li, lp_local, stats, logp_top, lp, valid, rest, u, w_local, weights = ctx.saved_tensors
        temperature, tail, divergence, beta = ctx.options
        gs = gl = None
        if ctx.needs_input_grad[0]:
            # The kernel with the whole vocabulary's statistics writes this shard's slice: p coef off the top-k and
            # the entries' terms on its top-k classes (the other shards' entries are padding here).
            gs = torch.ops.kdfast.topk_kd_bwd(grad_rows.to(stats.dtype), student, li, lp_local, stats, temperature,
                                              tail, divergence, beta, w_local)
        if ctx.needs_input_grad[2] and weights is not None:
            gl = _kernel_teacher_grad(grad_rows, student, li, lp, stats, *ctx.options, weights).to(ctx.lp_dtype)
        elif ctx.needs_input_grad[2]:
            gl = _teacher_grad(grad_rows.to(lp.dtype), logp_top, lp, valid, temperature, tail, divergence, beta,
                               rest, u=u).to(ctx.lp_dtype)
        return gs, None, gl, None, None, None, None, None, None


def vocab_parallel_topk_kd_div(student_shard, teacher_indices, teacher_logprobs, temperature=1.0, *,
                               tail="renormalize", divergence="kl", beta=0.5, group=None, mask=None,
                               reduction="batchmean", scale_t2=True, num_items_in_batch=None) -> torch.Tensor:
    """topk_kd_div over a vocabulary split across the ranks of `group`: student_shard (..., V_rank) is this
    rank's contiguous slice (in rank order, possibly uneven); teacher_indices (..., k) are global vocabulary
    indices and teacher_logprobs (..., k) the teacher's log-probabilities at T = 1 (-inf = padding), the same on
    every rank. tail, divergence ("kl", "reverse_kl", "jsd" with beta), mask, reduction, scale_t2 and
    num_items_in_batch as topk_kd_div. Returns the loss of the whole vocabulary, the same on every rank; the student
    gradient is this rank's slice (the teacher log-probabilities' gradient is the whole one on every rank)."""
    temperature = _check_sparse(student_shard, teacher_indices, teacher_logprobs, temperature, mask, reduction,
                                scale_t2, num_items_in_batch, group)
    check.choice(tail, "tail", TAILS)
    _check_options(temperature, divergence, beta)
    _require_group()
    rows = _topk_rows(student_shard, teacher_indices, teacher_logprobs, temperature, tail, group,
                      divergence, beta)
    return _finish(rows, mask, reduction, temperature, scale_t2, num_items_in_batch)


def vocab_parallel_sampled_kd_div(student_shard, teacher, temperature=1.0, *, group=None, mask=None,
                                  reduction="batchmean", scale_t2=True, num_items_in_batch=None) -> torch.Tensor:
    """sampled_kd_div over a vocabulary split across the ranks of `group`: student_shard (..., V_rank) is this
    rank's contiguous slice (in rank order, possibly uneven); teacher a kdfast.Sampled (indices, counts, logprobs)
    (..., n) of global vocabulary indices, the same on every rank. mask, reduction, scale_t2 and num_items_in_batch
    as sampled_kd_div. Returns the loss of the whole vocabulary, the same on every rank; the student gradient is
    this rank's slice (the teacher log-probabilities' gradient, c_j / n, is the whole one on every rank)."""
    if not isinstance(teacher, Sampled):
        raise TypeError(f"teacher must be a kdfast.Sampled (indices, counts, logprobs), got {type(teacher).__name__}")
    indices, counts, logprobs = teacher
    temperature = _check_sparse(student_shard, indices, logprobs, temperature, mask, reduction, scale_t2,
                                num_items_in_batch, group)
    _require_group()
    rows = _topk_rows(student_shard, indices, logprobs, temperature, "renormalize", group,
                      weights=_sample_weights(counts, acc_dtype(student_shard)))
    return _finish(rows, mask, reduction, temperature, scale_t2, num_items_in_batch)


def _check_sparse(student, indices, logprobs, temperature, mask, reduction, scale_t2, num_items_in_batch, group):
    """The checks of a top-k or sampled teacher's call that need no other rank; returns the temperature."""
    temperature = _check_common(student, temperature, mask, reduction, scale_t2, group)
    _check_items(num_items_in_batch, reduction)
    if student.shape[-1] > _MAX_SHARD:
        raise ValueError(f"a vocabulary shard may hold at most 2^24 classes, got {student.shape[-1]}")
    _check_pair(indices, logprobs)
    if indices.shape[:-1] != student.shape[:-1]:
        raise ValueError(f"teacher_indices {tuple(indices.shape)} must have the leading dims of "
                         f"student_shard {tuple(student.shape)}")
    check.same_device({"student_shard": student, "teacher_indices": indices, "teacher_logprobs": logprobs})
    return temperature


if _C is not None:

    @torch.library.register_fake("kdfast::kd_partial_fwd")
    def _kd_partial_fwd_fake(student, teacher, stats, temperature, divergence, beta):
        rows = (student.shape[0], student.shape[2])
        return student.new_empty(rows, dtype=stats.dtype), student.new_empty((6, *rows), dtype=stats.dtype)


# ---- DTensor inputs (kd_div, topk_kd_div and fused_linear_kd route them here) ----

def _dt():
    import torch.distributed.tensor as dt
    return dt


def _vocab_mesh_dim(x, name, vocab_dim):
    """The mesh dimension that shards DTensor x's vocabulary (its dim vocab_dim), or None when x is replicated.
    Every other mesh dimension must replicate x: any other placement is a ValueError naming it."""
    vocab_dim %= x.dim()
    found = None
    for i, placement in enumerate(x.placements):
        if placement.is_replicate():
            continue
        if placement.is_shard() and placement.dim % x.dim() == vocab_dim and found is None:
            found = i
            continue
        raise ValueError(f"{name} is a DTensor placed {tuple(x.placements)} on a mesh of shape "
                         f"{tuple(x.device_mesh.shape)}: kdfast takes Shard({vocab_dim}) (the vocabulary) on one mesh "
                         f"dimension and Replicate() on the others, got {placement} on mesh dimension {i}; "
                         f"redistribute it first (x.redistribute(mesh, placements))")
    return found


def _local(x, name, mesh, placements=None):
    """x's local tensor. With `placements` x must be a DTensor on `mesh` placed so (the partner of sharded logits);
    without, a plain tensor (the same on every rank, returned as is) or a DTensor replicated over `mesh`."""
    dt = _dt()
    if not isinstance(x, dt.DTensor):
        if placements is not None:
            raise TypeError(f"{name} must be a DTensor placed {tuple(placements)} like the logits it pairs with, got a "
                            f"plain {type(x).__name__}")
        return x
    want = tuple(placements) if placements is not None else (dt.Replicate(),) * mesh.ndim
    if x.device_mesh != mesh or tuple(x.placements) != want:
        raise ValueError(f"{name} is a DTensor placed {tuple(x.placements)} on a mesh of shape "
                         f"{tuple(x.device_mesh.shape)}; on this call it must be a plain tensor or placed {want} on "
                         f"the logits' mesh")
    return x.to_local()


def _layout(x, name, vocab_dim):
    """(mesh, the process group of the vocabulary's mesh dimension or None when replicated) of DTensor x."""
    dt = _dt()
    if not isinstance(x, dt.DTensor):
        raise TypeError(f"{name} must be a DTensor like the other logits of this call, got a plain "
                        f"{type(x).__name__}")
    shard = _vocab_mesh_dim(x, name, vocab_dim)
    return x.device_mesh, None if shard is None else x.device_mesh.get_group(shard)


def _replicated(loss, mesh):
    """The loss, the same on every rank, as a DTensor replicated over the mesh."""
    dt = _dt()
    return dt.DTensor.from_local(loss, mesh, [dt.Replicate()] * mesh.ndim, run_check=False)


def dtensor_kd_div(student, teacher, temperature, divergence, beta, dim, mask, reduction, scale_t2):
    """kd_div of DTensor logits (arguments checked by kd_div): sharded on the classes (dim), the vocabulary-parallel
    path; replicated, kd_div on every rank. Returns a replicated DTensor."""
    from .logits import kd_div
    mesh, group = _layout(student, "student_logits", dim)
    s = student.to_local()
    t = _local(teacher, "teacher_logits", mesh, student.placements)
    mask = _local(mask, "mask", mesh)
    if group is None:
        return _replicated(kd_div(s, t, temperature, divergence=divergence, beta=beta, dim=dim, mask=mask,
                                  reduction=reduction, scale_t2=scale_t2), mesh)
    dim %= student.dim()
    rows = _kd_rows(s.movedim(dim, -1), t.movedim(dim, -1), temperature, divergence, beta, group)
    return _replicated(_finish(rows, mask, reduction, temperature, scale_t2, None), mesh)


def _sparse_locals(student, mask, num_items_in_batch, **teacher):
    """(mesh, group, local student, [the teacher tensors' local values], kwargs mask and num_items_in_batch) of a
    top-k or sampled call with DTensor student logits (..., V): the teacher, the mask and a num_items_in_batch
    tensor plain or replicated."""
    mesh, group = _layout(student, "student_logits", -1)
    tensors = [_local(x, name, mesh) for name, x in teacher.items()]
    items = _local(num_items_in_batch, "num_items_in_batch", mesh)  # a number passes as it is
    return mesh, group, student.to_local(), tensors, dict(mask=_local(mask, "mask", mesh), num_items_in_batch=items)


def dtensor_topk_kd_div(student, indices, logprobs, temperature, tail, mask, reduction, scale_t2, *, divergence="kl",
                        beta=0.5, num_items_in_batch=None):
    """topk_kd_div of DTensor student logits (..., V) (the teacher's top-k, the mask and a num_items_in_batch
    tensor plain or replicated)."""
    from .topk import topk_kd_div
    mesh, group, s, (indices, logprobs), kw = _sparse_locals(student, mask, num_items_in_batch,
                                                             teacher_indices=indices, teacher_logprobs=logprobs)
    kw.update(tail=tail, divergence=divergence, beta=beta, reduction=reduction, scale_t2=scale_t2)
    if group is None:
        return _replicated(topk_kd_div(s, indices, logprobs, temperature, **kw), mesh)
    return _replicated(vocab_parallel_topk_kd_div(s, indices, logprobs, temperature, group=group, **kw), mesh)


def dtensor_sampled_kd_div(student, teacher, temperature, mask, reduction, scale_t2, num_items_in_batch):
    """sampled_kd_div of DTensor student logits (..., V) (the Sampled teacher, the mask and a num_items_in_batch
    tensor plain or replicated)."""
    from .topk import sampled_kd_div
    mesh, group, s, tensors, kw = _sparse_locals(student, mask, num_items_in_batch, teacher_indices=teacher[0],
                                                 teacher_counts=teacher[1], teacher_logprobs=teacher[2])
    kw.update(reduction=reduction, scale_t2=scale_t2)
    if group is None:
        return _replicated(sampled_kd_div(s, Sampled(*tensors), temperature, **kw), mesh)
    return _replicated(vocab_parallel_sampled_kd_div(s, Sampled(*tensors), temperature, group=group, **kw), mesh)


class _SumGradients(torch.autograd.Function):
    """Identity forward; backward all-reduces (SUM) the gradient over the ranks: the hidden states every rank
    multiplies by its slice of the weight get the gradient of all the slices (Megatron's column-parallel input)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class _SoftCap(torch.autograd.Function):
    """fused_linear_kd's soft-cap and logit scale of a chunk's logits, in place (softcap_, and softcap_backward_ in
    the backward): elementwise, so each rank caps its own slice."""

    @staticmethod
    def forward(ctx, logits, softcap, logit_scale):
        from .fused_linear import softcap_
        ctx.mark_dirty(logits)
        softcap_(logits, softcap, logit_scale)
        ctx.save_for_backward(logits)
        ctx.caps = (softcap, logit_scale)
        return logits

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        from .fused_linear import softcap_backward_
        capped, = ctx.saved_tensors  # saved tensors stay as they are: the derivative is formed in copies
        return softcap_backward_(grad.clone(), capped.clone(), *ctx.caps), None, None


def _linear_chunk(hidden, weight, bias, teacher, target, kd_weight, ce_weight, form, options, group):
    """kd_weight * (sum of the chunk's KD rows) + ce_weight * (sum of its cross-entropy rows) from this rank's
    slice of the chunk's logits, soft-capped and scaled as fused_linear_kd's. teacher: the chunk's (logits,),
    (hidden, weight, bias), (indices, logprobs) or (indices, logprobs, weights c_j / n)."""
    from .fused_linear import chunk_logits, softcap_
    temperature, divergence, beta, tail, ignore_index, acc, caps, teacher_caps = options
    logits = chunk_logits(hidden.to(acc), weight.to(acc), None if bias is None else bias.to(acc))
    if caps != (None, 1.0):
        logits = _SoftCap.apply(logits, *caps)
    if form in ("topk", "sampled"):
        weights = teacher[2] if form == "sampled" else None
        kd = _topk_rows(logits, teacher[0], teacher[1], temperature, tail, group, divergence, beta, weights)
    else:
        if form == "head":
            with torch.no_grad():
                th, tw, tb = teacher
                teacher = (softcap_(chunk_logits(th.to(acc), tw.to(acc), None if tb is None else tb.to(acc)),
                                    *teacher_caps),)
        kd = _kd_rows(logits, teacher[0], temperature, divergence, beta, group)
    keep = None if target is None else target != ignore_index
    total = (kd if keep is None else torch.where(keep, kd, torch.zeros_like(kd))).sum() * kd_weight
    if ce_weight is not None:
        # Cross-entropy at T = 1 is the renormalised top-1 divergence from the target (0 where it is ignored).
        lp = torch.where(keep, 0.0, float("-inf")).to(acc).unsqueeze(-1)
        total = total + _topk_rows(logits, target.unsqueeze(-1), lp, 1.0, "renormalize", group).sum() * ce_weight
    return total


def dtensor_fused_linear_kd(hidden, weight, teacher, bias, target, temperature, alpha, divergence, beta, tail,
                            ignore_index, scale_t2, chunk_size, softcap, logit_scale, num_items_in_batch):
    """fused_linear_kd with a DTensor lm_head weight (V, H) (its scalar options checked by fused_linear_kd):
    Shard(0) (the vocabulary) runs the vocabulary-parallel path, replicated runs fused_linear_kd on every rank.
    student_hidden, target, a TopK or Sampled teacher and a num_items_in_batch tensor are plain (the same on every
    rank) or replicated; dense teacher logits are Shard(-1) and a TeacherHead's weight (and biases) Shard(0) like
    the student's weight. Each chunk's slice of the logits is recomputed in the backward
    (torch.utils.checkpoint). Returns a replicated DTensor."""
    from .fused_linear import TeacherHead, _check_cap, default_chunk_size, fused_linear_kd
    from .topk import TopK
    mesh, group = _layout(weight, "student_weight", 0)
    w = weight.to_local()
    h = _local(hidden, "student_hidden", mesh)
    b = None if bias is None else _local(bias, "student_bias", mesh, weight.placements)
    y = _local(target, "target", mesh)
    items = _local(num_items_in_batch, "num_items_in_batch", mesh)  # a number passes as it is
    if isinstance(teacher, TeacherHead):
        tb = None if teacher.bias is None else _local(teacher.bias, "teacher.bias", mesh, weight.placements)
        teacher = teacher._replace(hidden=_local(teacher.hidden, "teacher.hidden", mesh),
                                   weight=_local(teacher.weight, "teacher.weight", mesh, weight.placements), bias=tb)
    elif isinstance(teacher, Sampled):
        teacher = Sampled(*(_local(x, f"teacher.{name}", mesh)
                            for name, x in zip(("indices", "counts", "logprobs"), teacher)))
    elif isinstance(teacher, tuple):
        teacher = TopK(_local(teacher[0], "teacher.indices", mesh), _local(teacher[1], "teacher.logprobs", mesh))
    else:
        dt = _dt()
        placements = [dt.Shard(teacher.dim() - 1) if p.is_shard() else p for p in weight.placements]
        teacher = _local(teacher, "teacher", mesh, placements)
    kw = dict(student_bias=b, target=y, temperature=temperature, alpha=alpha, divergence=divergence, beta=beta,
              tail=tail, ignore_index=ignore_index, scale_t2=scale_t2, chunk_size=chunk_size, softcap=softcap,
              logit_scale=logit_scale, num_items_in_batch=items)
    if group is None:
        return _replicated(fused_linear_kd(h, w, teacher, **kw), mesh)
    if alpha != 1 and y is None:
        raise ValueError(f"alpha={alpha} mixes in cross-entropy, which needs a target: pass target= or alpha=1")
    if h.dim() not in (2, 3) or w.dim() != 2 or w.shape[1] != h.shape[-1]:
        raise ValueError(f"student_hidden (N, H) or (B, T, H) and student_weight (V, H) do not match: "
                         f"{tuple(h.shape)} and {tuple(weight.shape)}")
    hf = _SumGradients.apply(h.reshape(-1, h.shape[-1]), group)
    n = hf.shape[0]
    acc = acc_dtype(hf, w)
    teacher_caps = (None, 1.0)
    if isinstance(teacher, TeacherHead):
        form, tensors = "head", [teacher.hidden.reshape(n, -1), teacher.weight, teacher.bias]
        teacher_caps = _check_cap(teacher.softcap, teacher.logit_scale, "teacher.")
    elif isinstance(teacher, Sampled):
        form = "sampled"
        tensors = [teacher[0].reshape(n, -1), teacher[2].detach().reshape(n, -1),
                   _sample_weights(teacher[1].reshape(n, -1), acc)]
    elif isinstance(teacher, TopK):
        form, tensors = "topk", [teacher[0].reshape(n, -1), teacher[1].detach().reshape(n, -1)]
    else:
        form, tensors = "dense", [teacher.detach().reshape(n, -1)]  # the teacher is constant, as in one process
    yf = None if y is None else y.reshape(n)
    # "batchmean" over the counted rows, or (num_items_in_batch) the sums, divided by it at the end
    if items is not None:
        count = 1
    else:
        count = max(n, 1) if yf is None else (yf != ignore_index).sum().clamp_min(1)
    kd_weight = alpha * (temperature * temperature if scale_t2 else 1.0) / count
    ce_weight = None if alpha == 1 else (1 - alpha) / count
    options = (temperature, divergence, beta, tail, ignore_index, acc, (softcap, logit_scale), teacher_caps)
    chunk = chunk_size or default_chunk_size(n, w.shape[0], acc, hf.device.type)
    loss = hf.new_zeros((), dtype=acc)
    for lo in range(0, n, chunk):
        rows = slice(lo, lo + chunk)
        part = [tensors[0][rows], *tensors[1:]] if form == "head" else [x[rows] for x in tensors]
        loss = loss + torch.utils.checkpoint.checkpoint(
            _linear_chunk, hf[rows], w, b, part, None if yf is None else yf[rows], kd_weight, ce_weight, form,
            options, group, use_reentrant=False)
    return _replicated(loss if items is None else check.divide_by_items(loss, items), mesh)
