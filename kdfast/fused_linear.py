"""Fused linear + knowledge distillation for language models: the student's logits (hidden @ lm_head.weight.T)
never exist in full.

The rows are taken a chunk at a time: the chunk's logits in float32 (ATen matmul; then the soft-cap and logit
scale), the teacher's chunk (a slice of dense logits, a TeacherHead's logits under no_grad, or top-k rows), the
per-row divergence and cross-entropy and their logits gradient from kdfast's fused kd_fwd / kd_bwd kernels, then
the chunk's share of the gradients of the hidden states, the weight and the bias. Without a gradient to make (under
torch.no_grad or inference_mode, or nothing requiring grad) only the loss is computed. The loss is a scalar, so
all its gradients are made in the forward (as Liger-Kernel's fused linear losses do) and the backward only scales
them by the upstream gradient. Memory: one chunk of logits (a few buffers of chunk x V) plus the float32 gradients
of the weight and the hidden states.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch

from . import _validate as check
from . import reference
from ._autograd import once_differentiable
from ._dtensor import any_dtensor
from ._ops import has_kernel
from ._validate import acc_dtype
from .logits import DIVERGENCES, _check_classes
from .topk import Sampled, TopK, _sample_weights
from .topk import _check_values as _check_topk_values

TAILS = ("renormalize", "bucket")
# chunk_size=None: the most rows whose logits take at most this many bytes in the accumulation dtype (at least one
# row). A chunk holds about three such buffers (student logits, teacher logits, their gradient) at a time. Smaller
# chunks cost speed: on 2 CPU cores (N 2048, V 32000) 131-row chunks took 1.2x as long as 262-row ones, which are
# within 10% of unchunked matmuls. 32 MiB is also glibc's largest dynamic mmap threshold: a chunk's buffers are
# recycled by malloc instead of being mapped (and page-faulted) afresh every chunk. A GPU needs ~500+ rows to fill
# its SMs.
CHUNK_BYTES = {"cpu": 32 << 20, "cuda": 256 << 20}


class TeacherHead(NamedTuple):
    """The teacher's last hidden states (..., Ht) and lm_head weight (V, Ht) (and bias (V,)): fused_linear_kd
    computes its logits chunk by chunk, without gradient, as softcap * tanh(logit_scale * (hidden @ weight.T + bias)
    / softcap) (logit_scale * (hidden @ weight.T + bias) when softcap is None), as Gemma 2/3 and Cohere do. Give
    softcap and logit_scale by keyword."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None
    softcap: Optional[float] = None
    logit_scale: float = 1.0


def default_chunk_size(rows: int, vocab: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> int:
    """Rows per chunk when chunk_size is None: floor(CHUNK_BYTES[device] / (V x element size)), between 1 and
    rows (32 MiB on CPU, 256 MiB on CUDA)."""
    per_row = max(1, vocab) * torch.empty((), dtype=dtype).element_size()
    return max(1, min(rows, CHUNK_BYTES.get(device, CHUNK_BYTES["cpu"]) // per_row))


# ---------------------------------------------------------------------------------------------------------------
# Per-chunk work: the logits, then _dense_chunk or _topk_ce_chunk, which return (kd rows (c,), cross-entropy rows
# (c,) or None, gradient of the weighted loss with respect to the chunk's logits (c, V), or None when with_grad is
# False), the weighted loss being sum(kd_weight * kd rows) + ce_weight * sum(ce rows).


def chunk_logits(h, w, b, half=None):
    """A chunk's logits h @ w.T + b (c, V) from hidden states (c, H), weight (V, H) and bias (V,) or None: in the
    accumulation dtype, or from half-precision operands on the tensor cores into float32 (half, see _mm)."""
    return _mm(h, w.T, half, add=b)


def softcap_(logits, softcap, logit_scale):
    """In place: softcap * tanh(logit_scale * logits / softcap), or logit_scale * logits without a cap."""
    if softcap is None:
        return logits if logit_scale == 1 else logits.mul_(logit_scale)
    return logits.mul_(logit_scale / softcap).tanh_().mul_(softcap)


def softcap_backward_(grad, capped, softcap, logit_scale):
    """In place: grad (with respect to the capped logits) times the cap's derivative, logit_scale * (1 -
    (capped / softcap)^2), which only needs the capped logits (overwritten)."""
    if softcap is None:
        return grad if logit_scale == 1 else grad.mul_(logit_scale)
    return grad.mul_(capped.div_(softcap).square_().neg_().add_(1).mul_(logit_scale))


def _dense_chunk(logits, teacher, target, kd_weight, ce_weight, temperature, divergence, beta, ignore_index,
                 with_grad):
    """kd_fwd + kd_bwd on the chunk's (c, V) logits: one pass each, the cross-entropy at T = 1 in the same pass."""
    s3, t3 = logits.unsqueeze(-1), teacher.unsqueeze(-1)
    y = None if target is None else target.unsqueeze(-1)
    div, ce, stats = torch.ops.kdfast.kd_fwd(s3, t3, y, temperature, divergence, beta, ignore_index)
    ce = None if y is None else ce.squeeze(-1)
    if not with_grad:
        return div.squeeze(-1), ce, None
    rows = div.shape
    grad_ce = None if y is None else ce_weight.expand(rows)
    grad, _ = torch.ops.kdfast.kd_bwd(kd_weight.reshape(-1, 1).expand(rows), grad_ce, s3, t3, y, stats,
                                      temperature, divergence, beta, ignore_index, True, False)
    return div.squeeze(-1), ce, grad.squeeze(-1)


def topk_chunk(logits, indices, logprobs, temperature, tail, kd_weight, with_grad=True, divergence="kl", beta=0.5,
               weights=None):
    """The top-k (or sampled) divergence of each row of a chunk and kd_weight * its gradient with respect to the
    logits, from the top-k kernels (kdfast/topk.py): rows (c,) unscaled by T^2 and grad (c, V) in the logits' dtype
    (None when with_grad is False).

    logits (c, V) float32/float64; indices (c, k) int64; logprobs (c, k), the teacher's log-probabilities at T = 1
    (-inf pads take no part); kd_weight (c,) or a scalar. The tails and divergences are topk_kd_div's. weights (c,
    k), the sampled teacher's c_j / n (logprobs then at T; 0 = padding), make it sampled_kd_div's rows."""
    rows, stats = torch.ops.kdfast.topk_kd_fwd(logits, indices, logprobs, temperature, tail, divergence, beta, weights)
    if not with_grad:
        return rows.to(logits.dtype), None
    weight = torch.as_tensor(kd_weight, dtype=rows.dtype, device=logits.device).expand(rows.shape)
    grad = torch.ops.kdfast.topk_kd_bwd(weight, logits, indices, logprobs, stats, temperature, tail, divergence, beta,
                                        weights)
    return rows.to(logits.dtype), grad


def _cross_entropy_chunk(logits, target, ce_weight, ignore_index, grad):
    """Cross-entropy rows at T = 1 (0 on ignored rows); adds ce_weight * their gradient to grad in place (unless
    grad is None)."""
    keep = target != ignore_index
    y = torch.where(keep, target, torch.zeros_like(target)).unsqueeze(-1)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    rows = torch.where(keep, (lse - logits.gather(-1, y)).squeeze(-1), torch.zeros_like(lse.squeeze(-1)))
    if grad is not None:
        w = (ce_weight * keep).unsqueeze(-1).to(logits.dtype)
        grad.add_((logits - lse).exp_().mul_(w)).scatter_add_(-1, y, -w)
    return rows


def _topk_ce_chunk(logits, indices, logprobs, weights, target, kd_weight, ce_weight, temperature, tail, divergence,
                   beta, ignore_index, with_grad):
    """topk_chunk, plus the cross-entropy (its gradient added to the same buffer) when a target is given."""
    rows, grad = topk_chunk(logits, indices, logprobs, temperature, tail, kd_weight, with_grad, divergence, beta,
                            weights)
    ce = None if target is None else _cross_entropy_chunk(logits, target, ce_weight, ignore_index, grad)
    return rows, ce, grad


# ---------------------------------------------------------------------------------------------------------------
# The chunk products in the accumulation dtype from possibly half-precision inputs. On CUDA a float16/bfloat16
# hidden and weight stay as they are and the tensor cores multiply them with float32 accumulation and output
# (torch.mm's out_dtype), instead of multiplying float32 copies (a V x H weight copied to float32 is 2 GB at
# V = 128k, H = 4096, and float32 products run far below the tensor cores). Elsewhere (CPU, float32 or float64
# inputs, mixed half dtypes) the operands are copied to the accumulation dtype.


def _tensor_core_dtype(acc, *operands):
    """The half dtype the products of these operands run in, or None for `acc`: on CUDA, float32 accumulation
    and every operand float16, or every operand bfloat16."""
    dtypes = {x.dtype for x in operands}
    half = next(iter(dtypes)) if len(dtypes) == 1 else None
    cuda = all(x.is_cuda for x in operands)
    return half if cuda and acc == torch.float32 and half in (torch.float16, torch.bfloat16) else None


def _operand(x, acc, half):
    """x as a product operand: itself on the half-precision path, else a copy in the accumulation dtype."""
    return x if half is not None else x.to(acc)


def _mm(a, b, half, add=None, out=None):
    """add + a @ b (a @ b without add), into out when given. On the half-precision path both operands are taken
    in `half` (a float32 logits gradient is rounded to it, as unfused autograd would hold it) and the products
    accumulate in float32; add and out are float32."""
    if half is None:
        return torch.mm(a, b, out=out) if add is None else torch.addmm(add, a, b, out=out)
    a, b = a.to(half), b.to(half)
    if add is None:
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    return torch.addmm(add, a, b, out_dtype=torch.float32, out=out)


# ---------------------------------------------------------------------------------------------------------------
# The op: loss and every gradient in one forward; its autograd scales the stored gradients.


@torch.library.custom_op("kdfast::fused_linear_kd_fwd", mutates_args=())
def fused_linear_kd_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        teacher_form: str, teacher: List[torch.Tensor], target: Optional[torch.Tensor],
                        temperature: float, alpha: float, divergence: str, beta: float, tail: str,
                        ignore_index: int, scale_t2: bool, chunk_size: int, softcap: Optional[float],
                        logit_scale: float, teacher_softcap: Optional[float], teacher_logit_scale: float,
                        per_row: bool, needs: List[bool]
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, d loss/d hidden, d loss/d weight, d loss/d bias), the gradients in the accumulation dtype (empty
    where needs is False; none is made when every needs is False). hidden (N, H); target (N,) int64 or None;
    teacher_form "logits" ([teacher (N, V)]), "head" ([hidden (N, Ht), weight (V, Ht)] + [bias (V,)]), "topk"
    ([indices (N, k) int64, logprobs (N, k)]) or "sampled" ([indices, logprobs, weights c_j / n (N, k) in the
    accumulation dtype]). per_row: the sums divided by the counted rows ("batchmean"), else
    left as sums. The accumulation dtype is the student's (float64 only for a float64 student): a float64 teacher
    is rounded to it chunk by chunk."""
    n, v = hidden.shape[0], weight.shape[0]
    acc = acc_dtype(hidden, weight)
    with_grad = any(needs)
    # Autocast would run the matmuls below in half precision: the loss and gradients are float32 by contract.
    with torch.autocast(hidden.device.type, enabled=False), torch.no_grad():
        half = _tensor_core_dtype(acc, hidden, weight)
        w = _operand(weight, acc, half)
        b = None if bias is None else bias.to(acc)
        t_half = _tensor_core_dtype(acc, teacher[0], teacher[1]) if teacher_form == "head" else None
        t_w = _operand(teacher[1], acc, t_half) if teacher_form == "head" else None
        t_b = teacher[2].to(acc) if teacher_form == "head" and len(teacher) > 2 else None
        keep = None if target is None else target != ignore_index
        count = torch.tensor(n) if keep is None else keep.sum()
        denom = count.to(device=hidden.device, dtype=acc).clamp_min(1) if per_row else \
            torch.ones((), device=hidden.device, dtype=acc)
        kd_scale = alpha * (temperature * temperature if scale_t2 else 1.0) / denom
        use_ce = target is not None and alpha < 1
        ce_weight = (1 - alpha) / denom
        loss = hidden.new_zeros((), dtype=acc)
        grad_h = hidden.new_empty((n, hidden.shape[1]) if needs[0] else (0,), dtype=acc)
        grad_w = hidden.new_zeros(tuple(weight.shape) if needs[1] else (0,), dtype=acc)
        grad_b = hidden.new_zeros((v,) if needs[2] else (0,), dtype=acc)
        for lo in range(0, n, chunk_size):
            hi = min(n, lo + chunk_size)
            h = _operand(hidden[lo:hi], acc, half)
            logits = softcap_(chunk_logits(h, w, b, half), softcap, logit_scale)
            y = None if target is None else target[lo:hi]
            kd_weight = kd_scale if keep is None else kd_scale * keep[lo:hi]
            if teacher_form in ("topk", "sampled"):
                weights = teacher[2][lo:hi] if teacher_form == "sampled" else None
                rows, ce, g = _topk_ce_chunk(logits, teacher[0][lo:hi], teacher[1][lo:hi], weights,
                                             y if use_ce else None, kd_weight, ce_weight, temperature, tail,
                                             divergence, beta, ignore_index, with_grad)
            else:
                if teacher_form == "head":
                    t_logits = softcap_(chunk_logits(_operand(teacher[0][lo:hi], acc, t_half), t_w, t_b, t_half),
                                        teacher_softcap, teacher_logit_scale)
                else:
                    t_logits = _rounded(teacher[0][lo:hi], acc)
                rows, ce, g = _dense_chunk(logits, t_logits, y if use_ce else None, kd_weight, ce_weight,
                                           temperature, divergence, beta, ignore_index, with_grad)
                del t_logits
            if keep is not None:
                rows = torch.where(keep[lo:hi], rows, torch.zeros_like(rows))
            loss += (rows.sum() * kd_scale) + (ce.sum() * ce_weight if ce is not None else 0)
            if g is not None:
                g = softcap_backward_(g, logits, softcap, logit_scale)
            del logits
            if needs[0]:
                _mm(g, w, half, out=grad_h[lo:hi])
            if needs[1]:
                _mm(g.T, h, half, add=grad_w, out=grad_w)
            if needs[2]:
                grad_b += g.sum(0)
            del g
    return loss, grad_h, grad_w, grad_b


def _rounded(teacher, acc):
    """A chunk of float64 teacher logits in the accumulation dtype (a float32 student's loss stays float32); other
    dtypes go to the kernels as they are. (Sparse teachers' log-probabilities go as given: the top-k ops keep the
    student's accumulator, form the bucket's tail from them and shift them before rounding.)"""
    return teacher.to(acc) if teacher.dtype == torch.float64 else teacher


@fused_linear_kd_fwd.register_fake
def _fused_linear_kd_fwd_fake(hidden, weight, bias, teacher_form, teacher, target, temperature, alpha, divergence,
                              beta, tail, ignore_index, scale_t2, chunk_size, softcap, logit_scale, teacher_softcap,
                              teacher_logit_scale, per_row, needs):
    acc = acc_dtype(hidden, weight)
    return (hidden.new_empty((), dtype=acc),
            hidden.new_empty(tuple(hidden.shape) if needs[0] else (0,), dtype=acc),
            hidden.new_empty(tuple(weight.shape) if needs[1] else (0,), dtype=acc),
            hidden.new_empty((weight.shape[0],) if needs[2] else (0,), dtype=acc))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias = inputs[:3]
    _, grad_h, grad_w, grad_b = output
    ctx.mark_non_differentiable(grad_h, grad_w, grad_b)
    ctx.set_materialize_grads(False)
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    ctx.needs = inputs[-1]
    ctx.n_inputs, ctx.n_teacher = len(inputs), len(inputs[4])
    # The inputs are saved for once_differentiable (it links a second derivative to them to raise); the backward
    # reads only the gradients.
    ctx.save_for_backward(hidden, weight, bias, grad_h, grad_w, grad_b)


@once_differentiable("fused_linear_kd")
def _backward(ctx, grad_loss, *_unused):
    _, _, _, grad_h, grad_w, grad_b = ctx.saved_tensors
    out = [None] * ctx.n_inputs
    out[4] = [None] * ctx.n_teacher  # the teacher is constant
    if grad_loss is not None:
        for i, (g, dtype) in enumerate(zip((grad_h, grad_w, grad_b), ctx.dtypes)):
            if ctx.needs[i] and ctx.needs_input_grad[i]:
                out[i] = (g * grad_loss).to(dtype)
    return tuple(out)


fused_linear_kd_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# The public function: checks, then the op.


def _check_rows(x, name, rows, what):
    if tuple(x.shape[:-1]) != tuple(rows):
        raise ValueError(f"{name} must have the row shape {tuple(rows)} of student_hidden followed by {what}, got "
                         f"{tuple(x.shape)}")


def _check_teacher(teacher, rows, vocab, acc):
    """(form, tensors flattened to rows) of the teacher argument, or a clear error."""
    if isinstance(teacher, torch.Tensor):
        check.floating(teacher, "teacher")
        _check_rows(teacher, "teacher", rows, f"the vocabulary size {vocab}")
        if teacher.shape[-1] != vocab:
            raise ValueError(f"teacher logits have {teacher.shape[-1]} classes but student_weight has {vocab} rows "
                             f"(the vocabulary size)")
        return "logits", [teacher.detach().reshape(-1, vocab)]
    if isinstance(teacher, TeacherHead):
        check.floating(teacher.hidden, "teacher.hidden")
        check.floating(teacher.weight, "teacher.weight")
        _check_rows(teacher.hidden, "teacher.hidden", rows, "the teacher's hidden size")
        if teacher.weight.dim() != 2 or teacher.weight.shape != (vocab, teacher.hidden.shape[-1]):
            raise ValueError(f"teacher.weight must be (V, Ht) = ({vocab}, {teacher.hidden.shape[-1]}), got "
                             f"{tuple(teacher.weight.shape)}")
        tensors = [teacher.hidden.detach().reshape(-1, teacher.hidden.shape[-1]), teacher.weight.detach()]
        if teacher.bias is not None:
            check.floating(teacher.bias, "teacher.bias")
            if teacher.bias.shape != (vocab,):
                raise ValueError(f"teacher.bias must be ({vocab},), got {tuple(teacher.bias.shape)}")
            tensors.append(teacher.bias.detach())
        _check_cap(teacher.softcap, teacher.logit_scale, "teacher.")
        return "head", tensors
    if isinstance(teacher, TopK):  # its constructor checked the pair's types and shapes
        _check_rows(teacher.indices, "teacher.indices", rows, "k")
        idx = teacher.indices.reshape(torch.Size(rows).numel(), teacher.indices.shape[-1]).long()  # also k = 0
        _check_topk_values(idx, teacher.logprobs.reshape(idx.shape), vocab)
        return "topk", [idx, teacher.logprobs.detach().reshape(idx.shape)]
    if isinstance(teacher, Sampled):  # its constructor checked the triple's types and shapes
        _check_rows(teacher.indices, "teacher.indices", rows, "n")
        idx = teacher.indices.reshape(torch.Size(rows).numel(), teacher.indices.shape[-1]).long()
        weights = _sample_weights(teacher.counts.reshape(idx.shape), acc)
        lp = teacher.logprobs.detach().reshape(idx.shape)
        _check_topk_values(idx, torch.where(weights > 0, lp, float("-inf")), vocab)  # the entries drawn
        return "sampled", [idx, lp, weights]
    raise TypeError("teacher must be a logits tensor, a kdfast.TeacherHead, a kdfast.TopK or a kdfast.Sampled, got "
                    f"{type(teacher).__name__}")


def _check_target(target, rows, vocab, ignore_index):
    check.tensor(target, "target")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must hold int64 or int32 class indices, got {target.dtype}")
    if tuple(target.shape) != tuple(rows):
        raise ValueError(f"target must have the row shape {tuple(rows)} of student_hidden, got {tuple(target.shape)}")
    y = target.reshape(-1).long()
    _check_classes(y, vocab, ignore_index)
    return y


def _check_cap(softcap, logit_scale, prefix=""):
    """softcap None or finite > 0 (a float), logit_scale finite > 0 (a float)."""
    softcap = None if softcap is None else check.positive_finite(softcap, prefix + "softcap")
    return softcap, check.positive_finite(logit_scale, prefix + "logit_scale")


def fused_linear_kd(student_hidden, student_weight, teacher, *, student_bias=None, target=None, temperature=1.0,
                    alpha=1.0, divergence="kl", beta=0.5, tail="renormalize", ignore_index=-100, scale_t2=True,
                    chunk_size=None, softcap=None, logit_scale=1.0, num_items_in_batch=None) -> torch.Tensor:
    """alpha * KD + (1 - alpha) * cross-entropy of the student's logits = student_hidden @ student_weight.T +
    student_bias, computed chunk by chunk without building the logits.

    student_hidden (N, H) or (B, T, H); student_weight (V, H), as lm_head.weight; student_bias (V,) or None.
    softcap, logit_scale: the student's logits are softcap * tanh(logit_scale * (hidden @ weight.T + bias) /
    softcap) (Gemma 2/3's final soft-capping, Cohere's logit scale; no cap when softcap is None); gradients flow
    through both. teacher: logits (..., V); TeacherHead(hidden (..., Ht), weight (V, Ht), bias=None, softcap=None,
    logit_scale=1.0); kdfast.TopK(indices, logprobs) (..., k); or kdfast.Sampled(indices, counts, logprobs) (..., n)
    drawn at this temperature. KD is kd_div (dense teachers), topk_kd_div (TopK; tail) with divergence and beta, or
    sampled_kd_div (Sampled: the forward KL), "batchmean" over the rows whose target is not ignore_index (all rows
    without a target), times T^2 when scale_t2; the cross-entropy is at T = 1, mean over the same rows.
    num_items_in_batch (Hugging Face's name for gradient accumulation: a number > 0 or a one-element tensor): both
    terms are then summed over those rows and divided by it instead. alpha != 1 needs a target. Gradients reach
    student_hidden, student_weight and student_bias (the teacher is constant); they are accumulated in float32
    (float64 for a float64 student) and returned in each input's dtype; under torch.no_grad / inference_mode only
    the loss is computed. chunk_size: rows per chunk; None takes floor(B / (V x 4 bytes)) rows (8 bytes for
    float64), at least 1, with B = 32 MiB on CPU and 256 MiB on CUDA. Returns a float32 scalar (float64 when
    student_hidden or student_weight is float64; a float64 teacher alone does not change it). A DTensor
    student_weight sharded on its rows (the vocabulary) runs the vocabulary-parallel path (kdfast.distributed); the
    loss is then a replicated DTensor."""
    temperature = check.check_temperature(temperature)
    alpha = check.in_closed_unit(alpha, "alpha")
    softcap, logit_scale = _check_cap(softcap, logit_scale)
    check.num_items(num_items_in_batch)
    check.choice(divergence, "divergence", DIVERGENCES)
    beta = check.real(beta, "beta")
    if divergence == "jsd":
        check.in_open_unit(beta, "beta")
    check.choice(tail, "tail", TAILS)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not isinstance(scale_t2, bool):
        raise TypeError(f"scale_t2 must be a bool, got {type(scale_t2).__name__}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if isinstance(teacher, Sampled) and (divergence, tail) != ("kl", "renormalize"):
        raise ValueError(f"a kdfast.Sampled teacher estimates the forward KL: it takes divergence='kl' and "
                         f"tail='renormalize' (the defaults), got divergence={divergence!r}, tail={tail!r}")
    teacher_tensors = teacher if isinstance(teacher, tuple) else (teacher,)
    if any_dtensor(student_hidden, student_weight, student_bias, target, *teacher_tensors):
        from . import distributed
        return distributed.dtensor_fused_linear_kd(student_hidden, student_weight, teacher, student_bias, target,
                                                   temperature, alpha, divergence, beta, tail, ignore_index, scale_t2,
                                                   chunk_size, softcap, logit_scale, num_items_in_batch)

    check.floating(student_hidden, "student_hidden")
    check.floating(student_weight, "student_weight")
    if student_hidden.dim() not in (2, 3):
        raise ValueError(f"student_hidden must be (N, H) or (B, T, H), got shape {tuple(student_hidden.shape)}")
    if student_weight.dim() != 2 or student_weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(f"student_weight must be (V, H) with H = {student_hidden.shape[-1]} (student_hidden's hidden "
                         f"size), got {tuple(student_weight.shape)}")
    vocab, hidden_size = student_weight.shape
    if vocab == 0:
        raise ValueError("student_weight has no rows (an empty vocabulary)")
    rows = tuple(student_hidden.shape[:-1])
    if student_bias is not None:
        check.floating(student_bias, "student_bias")
        if tuple(student_bias.shape) != (vocab,):
            raise ValueError(f"student_bias must be ({vocab},), got {tuple(student_bias.shape)}")
    acc = acc_dtype(student_hidden, student_weight)
    form, tensors = _check_teacher(teacher, rows, vocab, acc)
    y = None
    if target is not None:
        y = _check_target(target, rows, vocab, ignore_index)
    elif alpha != 1:
        raise ValueError(f"alpha={alpha} mixes in cross-entropy, which needs a target: pass target= or alpha=1")
    check.same_device({"student_hidden": student_hidden, "student_weight": student_weight,
                       "student_bias": student_bias, "teacher": tensors[0], "target": y})
    if not has_kernel(student_hidden.device):
        return reference.fused_linear_kd(student_hidden, student_weight, teacher, student_bias=student_bias,
                                         target=target, temperature=temperature, alpha=alpha, divergence=divergence,
                                         beta=beta, tail=tail, ignore_index=ignore_index, scale_t2=scale_t2,
                                         softcap=softcap, logit_scale=logit_scale,
                                         num_items_in_batch=num_items_in_batch)
    hidden = student_hidden.reshape(-1, hidden_size)
    chunk = chunk_size or default_chunk_size(hidden.shape[0], vocab, acc, hidden.device.type)
    # No gradient is made where autograd will not ask for one (evaluation under no_grad / inference_mode).
    grad_mode = torch.is_grad_enabled()
    needs = [grad_mode and student_hidden.requires_grad, grad_mode and student_weight.requires_grad,
             grad_mode and student_bias is not None and student_bias.requires_grad]
    t_cap, t_scale = (teacher.softcap, teacher.logit_scale) if form == "head" else (None, 1.0)
    loss, *_ = fused_linear_kd_fwd(hidden, student_weight, student_bias, form, tensors, y, temperature, alpha,
                                   divergence, beta, tail, ignore_index, scale_t2, chunk, softcap, logit_scale,
                                   None if t_cap is None else float(t_cap), float(t_scale),
                                   num_items_in_batch is None, needs)
    return loss if num_items_in_batch is None else check.divide_by_items(loss, num_items_in_batch)
