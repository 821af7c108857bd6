"""Vocabulary-parallel distillation losses over torch.distributed (gloo on CPU, nccl on GPU).

With tensor parallelism each rank of `group` holds a contiguous slice of the vocabulary, in rank order; slices
may be uneven (a rank's size is its shard's last dimension). The softmax over the whole vocabulary is assembled
from per-row statistics, as vocabulary-parallel cross-entropy does: one all-reduce MAX of the row maxima (which
also carries every rank's slice size), one all-reduce SUM of the row sums (and, for a sparse teacher, of the
top-k entries' logits, each held by one rank). No logits cross ranks. The loss is the same on every rank and
equals the single-process loss on the concatenated logits; each rank's gradient is its slice of the
single-process gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import _validate as check
from ._reduce import check_row_reduction, reduce_rows
from ._validate import acc_dtype
from .topk import TAILS, TopKIndexError, _categories, _check_pair, _eager, _plogq, _teacher_grad

_MAX_SHARD = 1 << 24  # slice sizes travel in the float32 MAX all-reduce, exact up to 2^24


def _check_common(student, temperature, mask, reduction, scale_t2, group):
    check.floating(student, "student_shard")
    if student.dim() == 0 or student.shape[-1] == 0:
        raise ValueError(f"student_shard must be (..., V_rank) with V_rank >= 1, got {tuple(student.shape)}")
    if student.shape[-1] > _MAX_SHARD:
        raise ValueError(f"a vocabulary shard may hold at most 2^24 classes, got {student.shape[-1]}")
    temperature = check.positive_finite(temperature, "temperature")
    check_row_reduction(reduction, "kdfast.distributed")
    if not isinstance(scale_t2, bool):
        raise TypeError(f"scale_t2 must be a bool, got {type(scale_t2).__name__}")
    check.row_mask(mask, student.shape[:-1], student, "student_shard")
    return temperature


def _require_group() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("kdfast.distributed needs an initialised torch.distributed process group")


def _finish(rows, mask, reduction, classes, temperature, scale_t2):
    out = reduce_rows(rows, mask, reduction)
    return out * (temperature * temperature) if scale_t2 else out


def _row_max(x, group, extra=None):
    """All-reduce MAX of the rows' maxima (and of `extra`, a float vector riding along); -inf rows are kept."""
    buf = x.amax(-1) if x.shape[-1] else x.new_full(x.shape[:-1], float("-inf"))
    if extra is not None:
        buf = torch.cat([buf.reshape(-1), extra.to(buf.dtype)])
    dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group)
    if extra is None:
        return buf, None
    rows = x.shape[0]
    return buf[:rows], buf[rows:]


def _reference_point(m):
    """The row maxima as exp's reference, 0 where a row is all -inf (so that exp gives 0, not NaN)."""
    return torch.where(m == float("-inf"), torch.zeros_like(m), m)


class _VocabParallelKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, temperature, group):
        acc = acc_dtype(student, teacher)
        a = student.to(acc) / temperature
        b = teacher.to(acc) / temperature
        m, _ = _row_max(torch.stack([a, b]), group)
        ra, rb = _reference_point(m[0]).unsqueeze(-1), _reference_point(m[1]).unsqueeze(-1)
        ea, eb = (a - ra).exp(), (b - rb).exp()
        sums = torch.stack([ea.sum(-1), eb.sum(-1), _plogq(eb, b - a).sum(-1)])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        lse_a, lse_b = ra.squeeze(-1) + sums[0].log(), rb.squeeze(-1) + sums[1].log()
        rows = sums[2] / sums[1] - lse_b + lse_a
        ctx.save_for_backward(student, teacher, lse_a, lse_b, rows)
        ctx.temperature = temperature
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        student, teacher, lse_a, lse_b, rows = ctx.saved_tensors
        T = ctx.temperature
        acc = rows.dtype
        lpa = student.to(acc) / T - lse_a.unsqueeze(-1)
        lpb = teacher.to(acc) / T - lse_b.unsqueeze(-1)
        pa, pb = lpa.exp(), lpb.exp()
        g = (grad_rows.to(acc) / T).unsqueeze(-1)
        gs = (g * (pa - pb)).to(student.dtype) if ctx.needs_input_grad[0] else None
        gt = (g * _plogq(pb, lpb - lpa - rows.unsqueeze(-1))).to(teacher.dtype) if ctx.needs_input_grad[1] else None
        return gs, gt, None, None


def vocab_parallel_kd_div(student_shard, teacher_shard, temperature=1.0, *, group=None, mask=None,
                          reduction="batchmean", scale_t2=True) -> torch.Tensor:
    """kd_div (KL(p_t || p_s), Hinton) over a vocabulary split across the ranks of `group`: student_shard and
    teacher_shard (..., V_rank) are this rank's contiguous slice of the logits (slices in rank order, possibly
    uneven). Returns the loss of the whole vocabulary, the same on every rank; mask, reduction ("batchmean", "sum",
    "none") and scale_t2 as kd_div. Gradients flow to both shards (this rank's slice)."""
    temperature = _check_common(student_shard, temperature, mask, reduction, scale_t2, group)
    check.floating(teacher_shard, "teacher_shard")
    check.same_shape(student_shard, teacher_shard, "student_shard", "teacher_shard")
    check.same_device({"student_shard": student_shard, "teacher_shard": teacher_shard})
    _require_group()
    classes = student_shard.shape[-1]
    rows = _VocabParallelKL.apply(student_shard.reshape(-1, classes), teacher_shard.reshape(-1, classes),
                                  temperature, group)
    return _finish(rows.reshape(student_shard.shape[:-1]), mask, reduction, classes, temperature, scale_t2)


class _VocabParallelTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, indices, logprobs, temperature, tail, group):
        acc = acc_dtype(student, logprobs)
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        a = student.to(acc) / temperature
        sizes = a.new_zeros(world)
        sizes[rank] = a.shape[-1]
        m, sizes = _row_max(a, group, extra=sizes)
        sizes = [int(s) for s in sizes.tolist()]
        offset, total = sum(sizes[:rank]), sum(sizes)
        lp = logprobs.to(acc)
        valid = lp > float("-inf")
        if _eager(lp):
            bad = valid & ((indices < 0) | (indices >= total))
            if bool(bad.any()):
                raise TopKIndexError(f"teacher_indices holds {int(indices[bad][0])}, outside [0, {total}) (the "
                                     f"vocabulary of all ranks) on an entry that is not padding")
            if bool((lp > 0).any()):
                raise ValueError("teacher_logprobs must be log-probabilities (<= 0; -inf for padding)")
        local = valid & (indices >= offset) & (indices < offset + a.shape[-1])
        li = torch.where(local, indices - offset, torch.zeros_like(indices)).long()
        r = _reference_point(m).unsqueeze(-1)
        a_top = torch.where(local, a.gather(-1, li), torch.zeros_like(lp))
        sums = torch.cat([(a - r).exp().sum(-1, keepdim=True), a_top], dim=-1)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        lse = r + sums[:, :1].log()
        logp_top = torch.where(valid, sums[:, 1:] - lse, torch.full_like(lp, float("-inf")))
        logq, logp, _ = _categories(logp_top, lp, valid, temperature, tail)
        q = logq.exp()
        rows = _plogq(q, logq - logp).sum(-1)
        any_valid = valid.any(-1)
        if tail == "renormalize":
            rows = torch.where(any_valid, rows, torch.zeros_like(rows))
            coef = any_valid.to(acc)  # a row without a valid entry has no gradient
        else:  # p (1 - q_tail / (1 - S)) off the top-k classes
            q_tail, rest = q[:, -1], logp[:, -1].exp()
            coef = torch.where(q_tail == 0, torch.ones_like(q_tail), 1 - q_tail / rest)
        ctx.save_for_backward(student, li, local, lse, coef, q[:, :lp.shape[-1]], logp_top, lp, valid)
        ctx.options = (temperature, tail)
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        student, li, local, lse, coef, q, logp_top, lp, valid = ctx.saved_tensors
        temperature, tail = ctx.options
        acc = lse.dtype
        g = grad_rows.to(acc) / temperature
        gs = gl = None
        if ctx.needs_input_grad[0]:
            p = (student.to(acc) / temperature - lse).exp()
            grad = p * coef.unsqueeze(-1)
            # On the top-k classes held here: p - q (the repeats of a class sum their q).
            fix = torch.where(local, (1 - coef.unsqueeze(-1)) * p.gather(-1, li) - q, torch.zeros_like(q))
            grad = grad.scatter_add(-1, li, fix)
            gs = (grad * g.unsqueeze(-1)).to(student.dtype)
        if ctx.needs_input_grad[2]:
            gl = _teacher_grad(grad_rows.to(acc), logp_top, lp, valid, temperature, tail).to(lp.dtype)
        return gs, None, gl, None, None, None


def vocab_parallel_topk_kd_div(student_shard, teacher_indices, teacher_logprobs, temperature=1.0, *,
                               tail="renormalize", group=None, mask=None, reduction="batchmean",
                               scale_t2=True) -> torch.Tensor:
    """topk_kd_div over a vocabulary split across the ranks of `group`: student_shard (..., V_rank) is this
    rank's contiguous slice (in rank order, possibly uneven); teacher_indices (..., k) are global vocabulary
    indices and teacher_logprobs (..., k) the teacher's log-probabilities at T = 1 (-inf = padding), the same on
    every rank. tail, mask, reduction and scale_t2 as topk_kd_div. Returns the loss of the whole vocabulary, the
    same on every rank; the student gradient is this rank's slice."""
    temperature = _check_common(student_shard, temperature, mask, reduction, scale_t2, group)
    _check_pair(teacher_indices, teacher_logprobs)
    check.choice(tail, "tail", TAILS)
    if teacher_indices.shape[:-1] != student_shard.shape[:-1]:
        raise ValueError(f"teacher_indices {tuple(teacher_indices.shape)} must have the leading dims of "
                         f"student_shard {tuple(student_shard.shape)}")
    check.same_device({"student_shard": student_shard, "teacher_indices": teacher_indices,
                       "teacher_logprobs": teacher_logprobs})
    _require_group()
    classes, k = student_shard.shape[-1], teacher_indices.shape[-1]
    rows = _VocabParallelTopK.apply(student_shard.reshape(-1, classes), teacher_indices.reshape(-1, k),
                                    teacher_logprobs.reshape(-1, k), temperature, tail, group)
    return _finish(rows.reshape(student_shard.shape[:-1]), mask, reduction, classes, temperature, scale_t2)
