"""Distillation from a sparse teacher: the top-k log-probabilities an inference server returns (or a teacher run
last week left on disk), against the student's full logits.

topk_kd_div is the loss; TopK the teacher container (indices, logprobs); topk_from_logits makes one from dense
logits as a server would. The kernel reads the student row once (online softmax), gathers the k entries and
writes the gradient once; no log-softmax of the student's size is ever formed. The store is kdfast/topk_store.py.
"""
from __future__ import annotations

import torch

from . import _validate as check
from . import reference
from ._autograd import once_differentiable
from ._dtensor import any_dtensor
from ._ops import _C, has_kernel
from ._reduce import check_row_reduction, reduce_rows
from ._validate import acc_dtype

TAILS = ("renormalize", "bucket")
INDEX_DTYPES = (torch.int64, torch.int32)


class TopKIndexError(IndexError, ValueError):
    """A teacher index outside [0, V) (an IndexError, and a ValueError like every other bad value)."""


class TopKDTypeError(TypeError, ValueError):
    """Teacher indices of a non-integer dtype (a TypeError, and a ValueError like every other bad value)."""


def _check_pair(indices, logprobs) -> None:
    check.tensor(indices, "teacher_indices")
    check.floating(logprobs, "teacher_logprobs")
    if indices.dtype not in INDEX_DTYPES:
        raise TopKDTypeError(f"teacher_indices must be int64 or int32, got {indices.dtype}")
    if indices.shape != logprobs.shape or indices.dim() == 0:
        raise ValueError(f"teacher_indices and teacher_logprobs must have one shape (..., k), got "
                         f"{tuple(indices.shape)} and {tuple(logprobs.shape)}")
    check.same_device({"teacher_indices": indices, "teacher_logprobs": logprobs})


def _eager(x: torch.Tensor) -> bool:
    """Data-dependent checks run eagerly on CPU only (on CUDA they would synchronise; under torch.compile they would
    break the graph)."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def _check_values(indices, logprobs, classes) -> None:
    if not _eager(logprobs) or logprobs.numel() == 0:
        return
    # Fast path, two reductions: every index in range (padding included) and no log-probability above 0.
    lo, hi = torch.aminmax(indices)
    if not 0 <= int(lo) <= int(hi) < classes:
        valid = logprobs > float("-inf")
        bad = valid & ((indices < 0) | (indices >= classes))
        if bool(bad.any()):
            raise TopKIndexError(f"teacher_indices holds {int(indices[bad][0])}, outside [0, {classes}) (the "
                                 f"student's vocabulary) on an entry that is not padding")
    top = float(logprobs.detach().max())
    if top > 0:
        raise ValueError(f"teacher_logprobs must be log-probabilities (<= 0; -inf for padding), got a maximum of "
                         f"{top}")


class _Teacher(tuple):
    """A validated tuple of (rows..., k) teacher tensors: indices first, logprobs last."""

    __slots__ = ()

    @property
    def indices(self) -> torch.Tensor:
        return self[0]

    @property
    def logprobs(self) -> torch.Tensor:
        return self[-1]

    @property
    def k(self) -> int:
        return self[0].shape[-1]

    def rows(self, start: int, stop: int):
        """The teacher rows [start, stop) of a (rows, k) teacher (a chunk of the tokens), as views."""
        return type(self)(*(t[start:stop] for t in self))

    def to(self, device, non_blocking: bool = False):
        """Every tensor on another device (dtypes kept)."""
        return type(self)(*(t.to(device, non_blocking=non_blocking) for t in self))

    def __repr__(self) -> str:
        dtypes = ", ".join(str(t.dtype) for t in self)
        return f"{type(self).__name__}(shape={tuple(self[0].shape)}, dtypes=({dtypes}))"


class TopK(_Teacher):
    """A sparse teacher: indices (..., k) int64/int32 into the vocabulary and logprobs (..., k), the teacher's
    log-probabilities at T = 1 (-inf marks padding: fewer than k entries; the padded index is never read).
    A tuple (indices, logprobs), so `indices, logprobs = topk` works."""

    __slots__ = ()

    def __new__(cls, indices, logprobs):
        _check_pair(indices, logprobs)
        return tuple.__new__(cls, (indices, logprobs))


def topk_from_logits(logits, k) -> TopK:
    """The k largest log-probabilities of softmax(logits) over the last dim and their indices, sorted descending,
    as an inference server returns them: TopK(indices int64, logprobs float32 (float64 for double logits))."""
    check.floating(logits, "logits")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if logits.dim() == 0 or not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"k must be in [1, {logits.shape[-1] if logits.dim() else 0}] (the last dim of logits), "
                         f"got {k}")
    logprobs, indices = torch.log_softmax(logits.to(acc_dtype(logits)), dim=-1).topk(k, dim=-1)
    return TopK(indices, logprobs)


DIVERGENCES = ("kl", "reverse_kl", "jsd")
COUNT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


class Sampled(_Teacher):
    """A sampled teacher: indices (..., n) int64/int32 of the ids drawn, counts (..., n) integer, how many of the
    row's draws fell on each id (0 marks padding; its index and log-probability are never read), and logprobs
    (..., n), the teacher's log-probabilities of those ids at the sampling temperature. A tuple (indices, counts,
    logprobs). kdfast.sample_from_logits makes one."""

    __slots__ = ()

    def __new__(cls, indices, counts, logprobs):
        _check_pair(indices, logprobs)
        check.tensor(counts, "teacher_counts")
        if counts.dtype not in COUNT_DTYPES:
            raise TopKDTypeError(f"teacher_counts must be an integer tensor (int64, int32, int16 or uint8), got "
                                 f"{counts.dtype}")
        if counts.shape != indices.shape:
            raise ValueError(f"teacher_counts must have the indices' shape {tuple(indices.shape)}, got "
                             f"{tuple(counts.shape)}")
        check.same_device({"teacher_indices": indices, "teacher_counts": counts})
        if _eager(counts) and counts.numel() and int(counts.min()) < 0:
            raise ValueError(f"teacher_counts must be >= 0, got {int(counts.min())}")
        return tuple.__new__(cls, (indices, counts, logprobs))

    @property
    def counts(self) -> torch.Tensor:
        return self[1]


def sample_from_logits(logits, n, temperature=1.0, *, generator=None) -> Sampled:
    """n ids per row drawn from softmax(logits / T) over the last dim, with replacement, repeats merged:
    Sampled(indices int64 (..., n), counts int32 (..., n), logprobs (..., n) at T, float32 (float64 for double
    logits)); a row's distinct ids come first in increasing order, the rest is padding (count 0, index 0,
    log-probability -inf)."""
    check.floating(logits, "logits")
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"n must be >= 1 (the draws per row), got {n}")
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be (..., V) with V >= 1, got {tuple(logits.shape)}")
    temperature = check.check_temperature(temperature)
    classes = logits.shape[-1]
    logq = torch.log_softmax(logits.to(acc_dtype(logits)).reshape(-1, classes) / temperature, dim=-1)
    draws = torch.multinomial(logq.exp(), n, replacement=True, generator=generator).sort(-1).values
    first = torch.ones_like(draws, dtype=torch.bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = first.cumsum(-1) - 1  # the slot of each draw's id
    counts = torch.zeros_like(draws, dtype=torch.int32).scatter_add_(-1, slot, torch.ones_like(slot, dtype=torch.int32))
    indices = torch.zeros_like(draws).scatter_(-1, torch.where(first, slot, n - 1), torch.where(first, draws, 0))
    indices = torch.where(counts > 0, indices, torch.zeros_like(indices))
    logprobs = torch.where(counts > 0, logq.gather(-1, indices), float("-inf"))
    shape = (*logits.shape[:-1], n)
    return Sampled(indices.reshape(shape), counts.reshape(shape), logprobs.reshape(shape))


def _check_student(student, indices, mask, reduction, scale_t2, num_items_in_batch, op):
    check.floating(student, "student_logits")
    if student.dim() == 0 or student.shape[-1] == 0:
        raise ValueError(f"student_logits must be (..., V) with V >= 1, got {tuple(student.shape)}")
    if indices.shape[:-1] != student.shape[:-1]:
        raise ValueError(f"teacher_indices {tuple(indices.shape)} must have the leading dims of student_logits "
                         f"{tuple(student.shape)}: (..., k) against (..., V)")
    check_row_reduction(reduction, op)
    if not isinstance(scale_t2, bool):
        raise TypeError(f"scale_t2 must be a bool, got {type(scale_t2).__name__}")
    check.row_mask(mask, student.shape[:-1], student, "student_logits")
    _check_items(num_items_in_batch, reduction)


def _check_items(num_items_in_batch, reduction) -> None:
    """num_items_in_batch None, or (with reduction "batchmean", whose count it replaces) checked by check.num_items."""
    if num_items_in_batch is not None:
        if reduction != "batchmean":
            raise ValueError(f"num_items_in_batch replaces batchmean's count: it takes reduction='batchmean', got "
                             f"reduction={reduction!r}")
        check.num_items(num_items_in_batch)


def _sample_weights(counts, acc):
    """A sampled teacher's weights c_j / n (..., n) in the accumulation dtype, n = sum_j c_j (0 for no draws)."""
    c = counts.to(acc)
    return c / c.sum(-1, keepdim=True).clamp_min(1)


def _check_call(student, indices, logprobs, temperature, tail, divergence, beta, mask, reduction, scale_t2,
                num_items_in_batch) -> float:
    _check_pair(indices, logprobs)
    _check_student(student, indices, mask, reduction, scale_t2, num_items_in_batch, "topk_kd_div")
    check.same_device({"student_logits": student, "teacher_indices": indices, "teacher_logprobs": logprobs})
    temperature = check.check_temperature(temperature)
    check.choice(tail, "tail", TAILS)
    check.choice(divergence, "divergence", DIVERGENCES)
    if divergence == "jsd":
        check.in_open_unit(beta, "beta")
    else:
        check.real(beta, "beta")
    _check_values(indices, logprobs, student.shape[-1])
    return temperature


def _finish(rows, mask, reduction, temperature, scale_t2, num_items_in_batch):
    """The rows reduced (or, with num_items_in_batch, summed over counted rows and divided by it), times T^2."""
    if num_items_in_batch is None:
        out = reduce_rows(rows, mask, reduction)
    else:
        out = check.divide_by_items(reduce_rows(rows, mask, "sum"), num_items_in_batch)
    # Scaled after the reduction: the rows' gradient then stays one broadcast value, which the kernel reads in place.
    return out * (temperature * temperature) if scale_t2 else out


def _flat(student, *teacher):
    """student (rows, V) and the teacher tensors (rows, k), also for k = 0 or no rows."""
    classes, k = student.shape[-1], teacher[0].shape[-1]
    rows = student.numel() // classes
    return student.reshape(rows, classes), [t.reshape(rows, k) for t in teacher]


def topk_rows(student_logits, teacher, temperature=1.0, tail="renormalize", divergence="kl", beta=0.5):
    """Internal entry point (fused_linear_kd calls it per chunk, arguments already checked): the unscaled per-row
    divergence (rows,) of student logits (rows, V) from a TopK of (rows, k), through the kernel ops, differentiable
    with respect to the logits (and the teacher log-probabilities)."""
    rows, _ = torch.ops.kdfast.topk_kd_fwd(student_logits, teacher[0], teacher[1], temperature, tail, divergence,
                                           beta)
    return rows


def topk_kd_div(student_logits, teacher_indices, teacher_logprobs, temperature=1.0, *, tail="renormalize",
                divergence="kl", beta=0.5, mask=None, reduction="batchmean", scale_t2=True,
                num_items_in_batch=None) -> torch.Tensor:
    """Divergence of the student from a sparse teacher, per row (position) of student_logits (..., V).

    teacher_indices (..., k) int64/int32 and teacher_logprobs (..., k): the teacher's top-k classes and their
    log-probabilities at T = 1, as a server returns them; -inf marks padding (its index may be anything).
    divergence "kl" (KL(teacher || student)), "reverse_kl" or "jsd" (beta KL(q || m) + (1 - beta) KL(p || m)), as
    kd_div, over the categories of the tail:
    tail="renormalize": the k entries, the teacher's q = softmax(lp / T) against, for "kl", the student's
    full-vocabulary log-probabilities log_softmax(s / T)[idx] (DistillKit's "zero" missing mass), for "reverse_kl"
    and "jsd" its probabilities renormalised over the k entries, p[idx] / sum p[idx]. tail="bucket": k + 1
    categories, the last the mass the teacher did not return, log(1 - sum exp(lp)), against the student's mass off
    the k classes (summed over those classes); with k = V either tail is kd_div. Valid indices of a row are
    assumed distinct. mask (...) bool: rows to count. reduction: "batchmean" (sum / counted rows, 0 when none),
    "sum", "none" (0 on masked rows); num_items_in_batch (a number > 0 or a one-element tensor, with
    "batchmean"): the sum over counted rows divided by it instead (gradient accumulation over micro-batches).
    scale_t2 multiplies by T^2. The loss is float32 (float64 for float64 logits). A DTensor student sharded on the
    vocabulary runs the vocabulary-parallel path (kdfast.distributed); the loss is a replicated DTensor.
    """
    if any_dtensor(student_logits, teacher_indices, teacher_logprobs, mask):
        from . import distributed
        return distributed.dtensor_topk_kd_div(student_logits, teacher_indices, teacher_logprobs, temperature, tail,
                                               mask, reduction, scale_t2, divergence=divergence, beta=beta,
                                               num_items_in_batch=num_items_in_batch)
    temperature = _check_call(student_logits, teacher_indices, teacher_logprobs, temperature, tail, divergence, beta,
                              mask, reduction, scale_t2, num_items_in_batch)
    if not has_kernel(student_logits.device):
        return reference.topk_kd_div(student_logits, teacher_indices, teacher_logprobs, temperature, tail=tail,
                                     divergence=divergence, beta=beta, mask=mask, reduction=reduction,
                                     scale_t2=scale_t2, num_items_in_batch=num_items_in_batch)
    s, (idx, lp) = _flat(student_logits, teacher_indices, teacher_logprobs)
    rows = topk_rows(s, (idx, lp), temperature, tail, divergence, float(beta))
    return _finish(rows.reshape(student_logits.shape[:-1]), mask, reduction, temperature, scale_t2,
                   num_items_in_batch)


def sampled_kd_div(student_logits, teacher, temperature=1.0, *, mask=None, reduction="batchmean", scale_t2=True,
                   num_items_in_batch=None) -> torch.Tensor:
    """KL(p_t || p_s) at T estimated from a sampled teacher, per row of student_logits (..., V).

    teacher: a kdfast.Sampled (indices, counts, logprobs) (..., n), from kdfast.sample_from_logits at this
    temperature. Per row sum_j (c_j / n) (lp_j - log_softmax(s / T)[idx_j]), n = sum_j c_j the row's draws (0 for a
    row without draws): an unbiased estimate of KL(p_t || p_s) at T and of its gradient. mask, reduction,
    num_items_in_batch and scale_t2 as topk_kd_div. The loss is float32 (float64 for float64 logits); gradients
    flow to the student logits and to the teacher's log-probabilities (c_j / n). A DTensor student sharded on the
    vocabulary runs the vocabulary-parallel path (kdfast.distributed); the loss is a replicated DTensor.
    """
    if not isinstance(teacher, Sampled):
        raise TypeError(f"teacher must be a kdfast.Sampled (indices, counts, logprobs), got {type(teacher).__name__}")
    if any_dtensor(student_logits, *teacher, mask):
        from . import distributed
        return distributed.dtensor_sampled_kd_div(student_logits, teacher, temperature, mask, reduction, scale_t2,
                                                  num_items_in_batch)
    indices, counts, logprobs = teacher
    _check_student(student_logits, indices, mask, reduction, scale_t2, num_items_in_batch, "sampled_kd_div")
    check.same_device({"student_logits": student_logits, "teacher_indices": indices})
    temperature = check.check_temperature(temperature)
    if _eager(counts):  # the entries drawn (count > 0) checked as topk_kd_div's valid entries
        _check_values(indices, torch.where(counts > 0, logprobs, float("-inf")), student_logits.shape[-1])
    if not has_kernel(student_logits.device):
        return reference.sampled_kd_div(student_logits, teacher, temperature, mask=mask, reduction=reduction,
                                        scale_t2=scale_t2, num_items_in_batch=num_items_in_batch)
    s, (idx, c, lp) = _flat(student_logits, indices, counts, logprobs)
    w = _sample_weights(c, acc_dtype(student_logits))
    rows, _ = torch.ops.kdfast.topk_kd_fwd(s, idx, lp, temperature, "renormalize", "kl", 0.5, w)
    return _finish(rows.reshape(student_logits.shape[:-1]), mask, reduction, temperature, scale_t2,
                   num_items_in_batch)


def _categories(logp_top, lp, valid, temperature, tail, divergence="kl", rest=None, *, u=None):
    """(log Q, log P) over the k categories (+ the tail for "bucket") of a sparse teacher: logp_top = log p[idx]
    of the student at T (-inf on padding), lp the teacher's log-probabilities, u (bucket) the teacher's tail
    log-mass (rows, 1) in lp's dtype, from reference.topk_tail on the log-probabilities as given;
    rest (bucket): the student's log-mass off the top-k classes, computed from those classes (rows, 1) (None:
    from 1 - sum p[idx], floored at eps, which cancels when that mass is small). For "renormalize" with reverse_kl
    or jsd, P is renormalised over the valid entries."""
    t = lp / temperature
    if tail == "bucket":
        t = torch.cat([t, u / temperature], dim=-1)
        if rest is None:
            rest = (1 - torch.where(valid, logp_top.exp(), torch.zeros_like(logp_top)).sum(-1, keepdim=True))
            rest = rest.clamp_min(torch.finfo(lp.dtype).eps).log()
        logp_top = torch.cat([logp_top, rest], dim=-1)
    elif divergence != "kl":
        norm = torch.logsumexp(torch.where(valid, logp_top, torch.full_like(logp_top, float("-inf"))), -1, True)
        logp_top = torch.where(valid, logp_top - norm, logp_top)
    return torch.log_softmax(t, dim=-1), logp_top


def _plogq(q, log_ratio):
    return torch.where(q == 0, torch.zeros_like(q), q * log_ratio)


def _teacher_grad(grad_rows, logp_top, lp, valid, temperature, tail, divergence="kl", beta=0.5, rest=None, *,
                  u=None):
    """d loss / d lp (rows, k) from (rows, k) tensors only: with F = d D / d log Q, d D / d b_c = F_c - q_c sum F
    (b the teacher's scaled categories), through b = lp / T and, for the bucket, the tail u = log(1 - sum exp(lp))
    (_categories).
    F: kl q (log q - log P), reverse_kl -P, jsd beta q (log q - log m) (constant terms cancel)."""
    logq, logp = _categories(logp_top, lp, valid, temperature, tail, divergence, rest, u=u)
    q, p = logq.exp(), logp.exp()
    if divergence == "kl":
        f = _plogq(q, logq - logp)
    elif divergence == "reverse_kl":
        f = -p
    else:
        m = beta * q + (1 - beta) * p
        f = beta * _plogq(q, logq - torch.log(torch.where(m == 0, torch.ones_like(m), m)))
    db = f - q * f.sum(-1, keepdim=True)
    if tail == "bucket":
        # du / dlp_j = -exp(lp_j - u); where the tail is empty (u = -inf) its q and so its gradient are 0.
        tail_db = db[..., -1:]
        db = db[..., :-1] - torch.where(tail_db == 0, torch.zeros_like(tail_db), tail_db * (lp - u).exp())
    db = torch.where(valid, db, torch.zeros_like(db))
    return db * (grad_rows.expand(lp.shape[:-1]).unsqueeze(-1) / temperature)


def teacher_shift(logprobs, valid):
    """The per-row constant (rows, 1) float64 that the top-k kernels subtract from a top-k teacher's
    log-probabilities before rounding them to their accumulator (csrc/topk_kd.cpp, teacher_shift): the largest valid
    one, 0 where that is above 0 or -inf. The categories softmax(lp / T) do not change with it, their rounding at a
    small T does."""
    lp = logprobs.double()
    if lp.shape[-1] == 0:
        return lp.new_zeros(*lp.shape[:-1], 1)
    m = torch.where(valid, lp, torch.full_like(lp, float("-inf"))).amax(-1, keepdim=True)
    return torch.where(m.isfinite() & (m <= 0), m, torch.zeros_like(m))


def _kernel_teacher_grad(grad_rows, student, indices, logprobs, stats, temperature, tail, divergence, beta, weights):
    """d loss / d logprobs for the kernel op: c_j / n for a sampled teacher; else _teacher_grad, log p[idx] gathered
    from the student and the saved row statistics (csrc/common/topk_kd.h, TopKStat)."""
    acc = stats.dtype
    g = grad_rows.to(acc).expand(stats.shape[1:]).unsqueeze(-1)
    if weights is not None:
        return (weights.to(acc) * g).to(logprobs.dtype)
    valid = logprobs.to(acc) > float("-inf")
    shift = teacher_shift(logprobs, valid)  # as the kernels: the tempered categories keep their precision
    lp = (logprobs.double() - shift).to(acc)
    idx = torch.where(valid, indices, torch.zeros_like(indices)).long()
    big, lse, off = stats[0].unsqueeze(-1), stats[1].unsqueeze(-1), stats[6].unsqueeze(-1)
    logp = (student.gather(-1, idx).to(acc) - big) / temperature - lse
    logp = torch.where(valid, logp, torch.full_like(logp, float("-inf")))
    rest = u = None
    if tail == "bucket":
        rest, u = off - lse, (reference.topk_tail(logprobs, valid, student.shape[-1]) - shift).to(acc)
    return _teacher_grad(g.squeeze(-1), logp, lp, valid, temperature, tail, divergence, beta, rest,
                         u=u).to(logprobs.dtype)


if _C is not None:

    @torch.library.register_fake("kdfast::topk_kd_fwd")
    def _topk_kd_fwd_fake(student, indices, logprobs, temperature, tail, divergence="kl", beta=0.5, weights=None):
        acc = acc_dtype(student)
        rows = student.shape[0]
        return student.new_empty((rows,), dtype=acc), student.new_empty((7, rows), dtype=acc)

    @torch.library.register_fake("kdfast::topk_kd_bwd")
    def _topk_kd_bwd_fake(grad_loss, student, indices, logprobs, stats, temperature, tail, divergence="kl", beta=0.5,
                          weights=None):
        return torch.empty_like(student, memory_format=torch.contiguous_format)

    def _topk_setup_context(ctx, inputs, output):
        student, indices, logprobs, temperature, tail, divergence, beta, weights = inputs
        ctx.set_materialize_grads(False)  # no zero-filled gradient for the stats output
        ctx.save_for_backward(student, indices, logprobs, output[1], weights)
        ctx.options = (temperature, tail, divergence, beta)

    @once_differentiable("topk_kd_div")
    def _topk_backward(ctx, grad_loss, _grad_stats):
        student, indices, logprobs, stats, weights = ctx.saved_tensors
        none = (None,) * 5
        if grad_loss is None:
            return None, None, None, *none
        gs = gl = None
        if ctx.needs_input_grad[0]:
            gs = torch.ops.kdfast.topk_kd_bwd(grad_loss, student, indices, logprobs, stats, *ctx.options, weights)
        if ctx.needs_input_grad[2]:
            gl = _kernel_teacher_grad(grad_loss, student, indices, logprobs, stats, *ctx.options, weights)
        return gs, None, gl, *none

    torch.library.register_autograd("kdfast::topk_kd_fwd", _topk_backward, setup_context=_topk_setup_context)
