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
    top = float(logprobs.max())
    if top > 0:
        raise ValueError(f"teacher_logprobs must be log-probabilities (<= 0; -inf for padding), got a maximum of "
                         f"{top}")


class TopK(tuple):
    """A sparse teacher: indices (..., k) int64/int32 into the vocabulary and logprobs (..., k), the teacher's
    log-probabilities at T = 1 (-inf marks padding: fewer than k entries; the padded index is never read).
    A tuple (indices, logprobs), so `indices, logprobs = topk` works."""

    __slots__ = ()

    def __new__(cls, indices, logprobs):
        _check_pair(indices, logprobs)
        return tuple.__new__(cls, (indices, logprobs))

    @property
    def indices(self) -> torch.Tensor:
        return self[0]

    @property
    def logprobs(self) -> torch.Tensor:
        return self[1]

    @property
    def k(self) -> int:
        return self[0].shape[-1]

    def rows(self, start: int, stop: int) -> "TopK":
        """The teacher rows [start, stop) of a (rows, k) TopK (a chunk of the tokens), as views."""
        return TopK(self[0][start:stop], self[1][start:stop])

    def to(self, device, non_blocking: bool = False) -> "TopK":
        """Both tensors on another device (dtypes kept)."""
        return TopK(self[0].to(device, non_blocking=non_blocking), self[1].to(device, non_blocking=non_blocking))

    def __repr__(self) -> str:
        return f"TopK(shape={tuple(self[0].shape)}, indices={self[0].dtype}, logprobs={self[1].dtype})"


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


def _check_call(student, indices, logprobs, temperature, tail, mask, reduction, scale_t2) -> float:
    check.floating(student, "student_logits")
    _check_pair(indices, logprobs)
    if student.dim() == 0 or student.shape[-1] == 0:
        raise ValueError(f"student_logits must be (..., V) with V >= 1, got {tuple(student.shape)}")
    if indices.shape[:-1] != student.shape[:-1]:
        raise ValueError(f"teacher_indices {tuple(indices.shape)} must have the leading dims of student_logits "
                         f"{tuple(student.shape)}: (..., k) against (..., V)")
    check.same_device({"student_logits": student, "teacher_indices": indices, "teacher_logprobs": logprobs})
    temperature = check.positive_finite(temperature, "temperature")
    check.choice(tail, "tail", TAILS)
    check_row_reduction(reduction, "topk_kd_div")
    if not isinstance(scale_t2, bool):
        raise TypeError(f"scale_t2 must be a bool, got {type(scale_t2).__name__}")
    check.row_mask(mask, student.shape[:-1], student, "student_logits")
    _check_values(indices, logprobs, student.shape[-1])
    return temperature


def topk_rows(student_logits, teacher, temperature=1.0, tail="renormalize"):
    """Internal entry point (fused_linear_kd calls it per chunk, arguments already checked): the unscaled per-row
    divergence (rows,) of student logits (rows, V) from a TopK of (rows, k), through the kernel ops, differentiable
    with respect to the logits (and the teacher log-probabilities)."""
    rows, _ = torch.ops.kdfast.topk_kd_fwd(student_logits, teacher[0], teacher[1], temperature, tail)
    return rows


def topk_kd_div(student_logits, teacher_indices, teacher_logprobs, temperature=1.0, *, tail="renormalize", mask=None,
                reduction="batchmean", scale_t2=True) -> torch.Tensor:
    """KL divergence of the student from a sparse teacher, per row (position) of student_logits (..., V).

    teacher_indices (..., k) int64/int32 and teacher_logprobs (..., k): the teacher's top-k classes and their
    log-probabilities at T = 1, as a server returns them; -inf marks padding (its index may be anything).
    tail="renormalize": the k entries renormalised, q = softmax(lp / T); per row sum_j q_j (log q_j -
    log_softmax(s / T)[idx_j]) (DistillKit's "zero" missing mass). tail="bucket": k + 1 categories, the last the mass
    the teacher did not return, log(1 - sum exp(lp)), against the student's mass off the k classes; with k = V it
    is kd_div, with T = 1 the forward KL against the teacher's true top-k probabilities plus its tail (DistillKit's
    "symmetric uniform" assumption, collapsed to one category). Valid indices of a row are assumed distinct.
    mask (...) bool: rows to count. reduction: "batchmean" (sum / counted rows, 0 when none), "sum", "none" (0 on
    masked rows). scale_t2 multiplies by T^2. Half-precision logits give a float32 loss.
    """
    temperature = _check_call(student_logits, teacher_indices, teacher_logprobs, temperature, tail, mask, reduction,
                              scale_t2)
    if not has_kernel(student_logits.device):
        return reference.topk_kd_div(student_logits, teacher_indices, teacher_logprobs, temperature, tail=tail,
                                     mask=mask, reduction=reduction, scale_t2=scale_t2)
    classes, k = student_logits.shape[-1], teacher_indices.shape[-1]
    rows = topk_rows(student_logits.reshape(-1, classes),
                     (teacher_indices.reshape(-1, k), teacher_logprobs.reshape(-1, k)), temperature, tail)
    # Scaled after the reduction: the rows' gradient then stays one broadcast value, which the kernel reads in place.
    out = reduce_rows(rows.reshape(student_logits.shape[:-1]), mask, reduction)
    return out * (temperature * temperature) if scale_t2 else out


def _categories(logp_top, lp, valid, temperature, tail):
    """(log q, log P, u) over the k categories (+ the tail for "bucket") of a sparse teacher: logp_top = log p[idx]
    of the student at T (-inf on padding), lp the teacher's log-probabilities, u the tail log-mass (or None)."""
    t = lp / temperature
    u = None
    if tail == "bucket":
        # Within rounding of 0 (csrc/common/topk_kd.h, topk_eps): the teacher's tail is 0, the student's rest eps.
        eps = torch.finfo(lp.dtype).eps
        tail_mass = 1 - torch.where(valid, lp.exp(), torch.zeros_like(lp)).sum(-1, keepdim=True)
        u = torch.where(tail_mass > (valid.sum(-1, keepdim=True) + 1) * eps, tail_mass, 0).log()
        t = torch.cat([t, u / temperature], dim=-1)
        rest = (1 - torch.where(valid, logp_top.exp(), torch.zeros_like(logp_top)).sum(-1, keepdim=True))
        logp_top = torch.cat([logp_top, rest.clamp_min(eps).log()], dim=-1)
    return torch.log_softmax(t, dim=-1), logp_top, u


def _plogq(q, log_ratio):
    return torch.where(q == 0, torch.zeros_like(q), q * log_ratio)


def _teacher_grad(grad_rows, logp_top, lp, valid, temperature, tail):
    """d loss / d lp (rows, k) from (rows, k) tensors only: d KL(softmax(b) || P) / d b_c = q_c (log q_c - log P_c
    - KL), through b = lp / T and, for the bucket, the tail u = log(1 - sum exp(lp))."""
    logq, logp, u = _categories(logp_top, lp, valid, temperature, tail)
    q = logq.exp()
    terms = _plogq(q, logq - logp)
    db = terms - q * terms.sum(-1, keepdim=True)
    if tail == "bucket":
        # du / dlp_j = -exp(lp_j - u); where the tail is empty (u = -inf) its q and so its gradient are 0.
        tail_db = db[..., -1:]
        db = db[..., :-1] - torch.where(tail_db == 0, torch.zeros_like(tail_db), tail_db * (lp - u).exp())
    db = torch.where(valid, db, torch.zeros_like(db))
    return db * (grad_rows.expand(lp.shape[:-1]).unsqueeze(-1) / temperature)


def _kernel_teacher_grad(grad_rows, student, indices, logprobs, stats, temperature, tail):
    """_teacher_grad for the kernel op, log p[idx] gathered from the student and the saved logsumexp."""
    acc = stats.dtype
    lp = logprobs.to(acc)
    valid = lp > float("-inf")
    idx = torch.where(valid, indices, torch.zeros_like(indices)).long()
    logp = student.gather(-1, idx).to(acc) / temperature - stats[0].unsqueeze(-1)
    logp = torch.where(valid, logp, torch.full_like(logp, float("-inf")))
    return _teacher_grad(grad_rows.to(acc), logp, lp, valid, temperature, tail).to(logprobs.dtype)


if _C is not None:

    @torch.library.register_fake("kdfast::topk_kd_fwd")
    def _topk_kd_fwd_fake(student, indices, logprobs, temperature, tail):
        acc = acc_dtype(student, logprobs)
        return student.new_empty((student.shape[0],), dtype=acc), student.new_empty((2, student.shape[0]), dtype=acc)

    @torch.library.register_fake("kdfast::topk_kd_bwd")
    def _topk_kd_bwd_fake(grad_loss, student, indices, logprobs, stats, temperature, tail):
        return torch.empty_like(student, memory_format=torch.contiguous_format)

    def _topk_setup_context(ctx, inputs, output):
        student, indices, logprobs, temperature, tail = inputs
        ctx.set_materialize_grads(False)  # no zero-filled gradient for the stats output
        ctx.save_for_backward(student, indices, logprobs, output[1])
        ctx.options = (temperature, tail)

    @once_differentiable("topk_kd_div")
    def _topk_backward(ctx, grad_loss, _grad_stats):
        student, indices, logprobs, stats = ctx.saved_tensors
        if grad_loss is None:
            return None, None, None, None, None
        gs = gl = None
        if ctx.needs_input_grad[0]:
            gs = torch.ops.kdfast.topk_kd_bwd(grad_loss, student, indices, logprobs, stats, *ctx.options)
        if ctx.needs_input_grad[2]:
            gl = _kernel_teacher_grad(grad_loss, student, indices, logprobs, stats, *ctx.options)
        return gs, None, gl, None, None

    torch.library.register_autograd("kdfast::topk_kd_fwd", _topk_backward, setup_context=_topk_setup_context)
