"""Fused temperature-softmax divergences: kd_div (Hinton KD, reverse KL, generalised JSD) and kd_loss
(KD + cross-entropy from one pass over the student logits), with their nn.Module wrappers."""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from . import _validate as check
from . import reference
from ._autograd import once_differentiable
from ._dtensor import any_dtensor
from ._ops import _C, has_kernel
from ._reduce import check_row_reduction, reduce_rows

DIVERGENCES = ("kl", "reverse_kl", "jsd")
# kd_loss's and KDLoss's temperature when none is given, until it becomes 1 as on every other loss
# (docs/reductions.md: the defaults).
LEGACY_KD_LOSS_T = 4.0


if _C is not None:

    @torch.library.register_fake("kdfast::kd_fwd")
    def _kd_fwd_fake(student, teacher, target, temperature, divergence, beta, ignore_index):
        out = check.acc_dtype(student, teacher)
        rows = (student.shape[0], student.shape[2])
        ce_shape = rows if target is not None else (0,)
        planes = 5 + (divergence == "jsd") + (target is not None)  # kd_stat_planes in csrc/common/kd_div.h
        return (student.new_empty(rows, dtype=out), student.new_empty(ce_shape, dtype=out),
                student.new_empty((planes, *rows), dtype=check.kd_acc_dtype(temperature, student, teacher)))

    @torch.library.register_fake("kdfast::kd_bwd")
    def _kd_bwd_fake(grad_div, grad_ce, student, teacher, target, stats, temperature, divergence, beta,
                     ignore_index, student_grad, teacher_grad):
        gs = torch.empty_like(student) if student_grad else student.new_empty((0,))
        gt = torch.empty_like(teacher) if teacher_grad else teacher.new_empty((0,))
        return gs, gt

    def _kd_setup_context(ctx, inputs, output):
        student, teacher, target, temperature, divergence, beta, ignore_index = inputs
        ctx.set_materialize_grads(False)  # no zero-filled gradients for outputs the loss does not use
        ctx.save_for_backward(student, teacher, target, output[2])
        ctx.options = (temperature, divergence, beta, ignore_index)

    @once_differentiable("kd_div")
    def _kd_backward(ctx, grad_div, grad_ce, _grad_stats):
        student, teacher, target, stats = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_div is None:
            grad_div = torch.zeros_like(stats[0])
        if target is None or (grad_ce is not None and grad_ce.numel() == 0):
            grad_ce = None
        gs, gt = torch.ops.kdfast.kd_bwd(grad_div, grad_ce, student, teacher, target, stats, *ctx.options,
                                         need_s, need_t)
        return gs if need_s else None, gt if need_t else None, None, None, None, None, None

    torch.library.register_autograd("kdfast::kd_fwd", _kd_backward, setup_context=_kd_setup_context)

    # kd_reduce_fwd's autograd is registered in C++ (csrc/kd_div_autograd.cpp): a Python autograd function would
    # cost more per call than the whole loss on classification-size logits.
    @torch.library.register_fake("kdfast::kd_reduce_fwd")
    def _kd_reduce_fwd_fake(student, teacher, target, mask, dim, temperature, divergence, beta, ignore_index,
                            reduction, kd_weight, ce_weight):
        out = check.acc_dtype(student, teacher)
        planes = 5 + (divergence == "jsd") + (target is not None)  # kd_stat_planes in csrc/common/kd_div.h
        rows = student.numel() // student.shape[dim]
        acc = check.kd_acc_dtype(temperature, student, teacher)
        return student.new_empty((), dtype=out), student.new_empty((planes, rows), dtype=acc), \
            student.new_empty((), dtype=out)

    @torch.library.register_fake("kdfast::kd_reduce_bwd")
    def _kd_reduce_bwd_fake(grad_loss, student, teacher, target, mask, stats, count, dim, temperature, divergence,
                            beta, ignore_index, reduction, kd_weight, ce_weight, student_grad, teacher_grad):
        # Laid out as the op returns them: with the classes innermost where the student has them innermost in
        # memory (channels-last dim=1), else contiguous.
        moved = student.dim() - 1 != dim % student.dim() and not student.is_contiguous() and \
            student.movedim(dim, -1).is_contiguous()

        def like(x):
            return torch.empty_like(x.movedim(dim, -1), memory_format=torch.contiguous_format).movedim(-1, dim) \
                if moved else x.new_empty(x.shape)

        gs = like(student) if student_grad else student.new_empty((0,))
        gt = like(teacher) if teacher_grad else teacher.new_empty((0,))
        return gs, gt


def _check_options(temperature, divergence, beta) -> float:
    temperature = check.check_temperature(temperature)
    check.choice(divergence, "divergence", DIVERGENCES)
    beta = check.real(beta, "beta")
    if divergence == "jsd":
        check.in_open_unit(beta, "beta")
    return temperature


def _check_logits(student, teacher, dim) -> int:
    check.floating(student, "student_logits")
    check.floating(teacher, "teacher_logits")
    check.same_shape(student, teacher, "student_logits", "teacher_logits")
    check.same_device({"student_logits": student, "teacher_logits": teacher})
    dim = check.dim(dim, student.dim())
    if student.shape[dim] == 0:
        raise ValueError(f"student_logits has no classes along dim={dim} (shape {tuple(student.shape)})")
    return dim


def _row_shape(x: torch.Tensor, dim: int):
    return x.shape[:dim] + x.shape[dim + 1:]


def _kernel_rows(student, teacher, target, temperature, divergence, beta, dim, ignore_index):
    """Runs kd_fwd on (outer, classes, inner) views of the logits, without a transposing copy when the classes
    are either innermost in memory or the dim of a contiguous tensor (dim=1 of NCHW). Returns row-shaped
    (divergence, cross-entropy or None)."""
    classes = student.shape[dim]
    rows = _row_shape(student, dim)
    if dim == student.dim() - 1 or student.movedim(dim, -1).is_contiguous():
        s3 = student.movedim(dim, -1).reshape(-1, classes, 1)
        t3 = teacher.movedim(dim, -1).reshape(-1, classes, 1)
    else:
        outer, inner = math.prod(student.shape[:dim]), math.prod(student.shape[dim + 1:])
        s3 = student.reshape(outer, classes, inner)
        t3 = teacher.reshape(outer, classes, inner)
    y = target.reshape(s3.shape[0], s3.shape[2]) if target is not None else None
    div, ce, _ = torch.ops.kdfast.kd_fwd(s3, t3, y, temperature, divergence, beta, ignore_index)
    return div.reshape(rows), (ce.reshape(rows) if target is not None else None)


def kd_div(student_logits, teacher_logits, temperature=1.0, *, divergence="kl", beta=0.5, dim=-1, mask=None,
           reduction="batchmean", scale_t2=True) -> torch.Tensor:
    """Divergence between the temperature-softened class distributions of student and teacher.

    p_s = softmax(student_logits / T, dim), p_t = softmax(teacher_logits / T, dim); a row is a slice along dim.
    divergence: "kl" = KL(p_t || p_s) (Hinton), "reverse_kl" = KL(p_s || p_t), "jsd" = beta KL(p_t || m) +
    (1 - beta) KL(p_s || m) with m = beta p_t + (1 - beta) p_s. scale_t2 multiplies by T^2.
    mask: bool tensor of the row shape; rows where it is False contribute nothing and are not counted.
    reduction: "batchmean" (sum / included rows; 0 when none), "sum", "none" (the row-shaped values, 0 on excluded
    rows); "mean" is refused (F.kl_div's per-element mean: use "batchmean"). Half-precision inputs give a float32
    loss. DTensor logits sharded on dim run the vocabulary-parallel path (kdfast.distributed), without gathering the
    vocabulary; the loss is then a replicated DTensor.
    """
    dim = _check_logits(student_logits, teacher_logits, dim)
    temperature = _check_options(temperature, divergence, beta)
    check_row_reduction(reduction, "kd_div")
    if not isinstance(scale_t2, bool):
        raise TypeError(f"scale_t2 must be a bool, got {type(scale_t2).__name__}")
    check.row_mask(mask, _row_shape(student_logits, dim), student_logits, "student_logits",
                   f"the logits' shape without dim={dim}")
    if any_dtensor(student_logits, teacher_logits, mask):
        from . import distributed
        return distributed.dtensor_kd_div(student_logits, teacher_logits, temperature, divergence, beta, dim, mask,
                                          reduction, scale_t2)
    if _transformed() or not has_kernel(student_logits.device):
        return reference.kd_div(student_logits, teacher_logits, temperature, divergence=divergence, beta=beta,
                                dim=dim, mask=mask, reduction=reduction, scale_t2=scale_t2)
    if reduction == "none":
        rows, _ = _kernel_rows(student_logits, teacher_logits, None, temperature, divergence, beta, dim, -100)
        out = reduce_rows(rows, mask, reduction)
        return out * (temperature * temperature) if scale_t2 else out
    return torch.ops.kdfast.kd_reduce_fwd(student_logits, teacher_logits, None, mask, dim, temperature, divergence,
                                          beta, -100, reduction, temperature * temperature if scale_t2 else 1.0,
                                          0.0)[0]


def _transformed() -> bool:
    """Whether a torch.func transform (vmap, grad, jacrev, ...) is active: the kernels' autograd (C++, and
    once-differentiable) does not compose with them, so the reference computes the loss there (the same values,
    and every order of derivative). torch.compile traces the kernels."""
    return not torch.compiler.is_compiling() and torch._C._functorch.maybe_current_level() is not None


def _check_target(target, student_logits, dim, ignore_index):
    check.tensor(target, "target")
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"target must hold integer class indices, got {target.dtype}")
    if target.shape != _row_shape(student_logits, dim):
        raise ValueError(f"target must have the row shape {tuple(_row_shape(student_logits, dim))} (the logits' "
                         f"shape without dim={dim}), got {tuple(target.shape)}")
    check.same_device({"student_logits": student_logits, "target": target})


def _check_classes(target, classes, ignore_index):
    """The reference path's check of the class indices (the kernels check them on the CPU themselves). Data-dependent:
    done eagerly on CPU only (on CUDA it would synchronise; there a bad class gives NaN)."""
    if target.device.type == "cpu" and not torch.compiler.is_compiling():
        bad = (target != ignore_index) & ((target < 0) | (target >= classes))
        if bool(bad.any()):
            raise ValueError(f"target holds class {int(target[bad][0])}, outside [0, {classes}) and not "
                             f"ignore_index={ignore_index}")


def _legacy_temperature(temperature, name):
    if temperature is not None:
        return temperature
    warnings.warn(f"{name} was called without a temperature: it uses T = {LEGACY_KD_LOSS_T:g} today and will use "
                  f"T = 1, the default of every other kdfast loss, in kdfast 0.2; pass temperature="
                  f"{LEGACY_KD_LOSS_T:g} to keep this loss", FutureWarning, stacklevel=3)
    return LEGACY_KD_LOSS_T


def kd_loss(student_logits, teacher_logits, target, temperature=None, alpha=0.9, *, divergence="kl", beta=0.5,
            dim=-1, ignore_index=-100, num_items_in_batch=None) -> torch.Tensor:
    """alpha * kd_div(batchmean, T^2, rows with target != ignore_index) + (1 - alpha) * cross-entropy of the
    student at T = 1 (mean over the same rows; 0 when none). num_items_in_batch (Hugging Face's name for gradient
    accumulation: a number > 0 or a one-element tensor): both terms summed over those rows and divided by it
    instead. On the kernel path both terms come from one pass over the student logits. temperature None is T = 4
    with a FutureWarning (it becomes 1 in kdfast 0.2)."""
    temperature = _legacy_temperature(temperature, "kd_loss")
    dim = _check_logits(student_logits, teacher_logits, dim)
    temperature = _check_options(temperature, divergence, beta)
    alpha = check.in_closed_unit(alpha, "alpha")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    _check_target(target, student_logits, dim, ignore_index)
    check.num_items(num_items_in_batch)
    if _transformed() or not has_kernel(student_logits.device):
        if not _transformed():
            _check_classes(target, student_logits.shape[dim], ignore_index)
        return reference.kd_loss(student_logits, teacher_logits, target.long(), temperature, alpha,
                                 divergence=divergence, beta=beta, dim=dim, ignore_index=ignore_index,
                                 num_items_in_batch=num_items_in_batch)
    reduction = "batchmean" if num_items_in_batch is None else "sum"
    out = torch.ops.kdfast.kd_reduce_fwd(student_logits, teacher_logits, target, None, dim, temperature, divergence,
                                         beta, ignore_index, reduction, alpha * temperature * temperature,
                                         1.0 - alpha)[0]
    return out if num_items_in_batch is None else check.divide_by_items(out, num_items_in_batch)


class KDDiv(nn.Module):
    """nn.Module form of kd_div: KDDiv(temperature, divergence=..., ...)(student_logits, teacher_logits, mask)."""

    def __init__(self, temperature=1.0, *, divergence="kl", beta=0.5, dim=-1, reduction="batchmean", scale_t2=True):
        super().__init__()
        _check_options(temperature, divergence, beta)
        check_row_reduction(reduction, "KDDiv")
        self.temperature, self.divergence, self.beta = temperature, divergence, beta
        self.dim, self.reduction, self.scale_t2 = dim, reduction, scale_t2

    def forward(self, student_logits, teacher_logits, mask=None):
        return kd_div(student_logits, teacher_logits, self.temperature, divergence=self.divergence, beta=self.beta,
                      dim=self.dim, mask=mask, reduction=self.reduction, scale_t2=self.scale_t2)

    def extra_repr(self):
        return f"temperature={self.temperature}, divergence={self.divergence!r}, reduction={self.reduction!r}"


class KDLoss(nn.Module):
    """nn.Module form of kd_loss: KDLoss(temperature, alpha, ...)(student_logits, teacher_logits, target,
    num_items_in_batch=None). temperature None is T = 4 with a FutureWarning (it becomes 1 in kdfast 0.2)."""

    def __init__(self, temperature=None, alpha=0.9, *, divergence="kl", beta=0.5, dim=-1, ignore_index=-100):
        super().__init__()
        temperature = _legacy_temperature(temperature, "KDLoss")
        _check_options(temperature, divergence, beta)
        check.in_closed_unit(alpha, "alpha")
        self.temperature, self.alpha, self.divergence, self.beta = temperature, alpha, divergence, beta
        self.dim, self.ignore_index = dim, ignore_index

    def forward(self, student_logits, teacher_logits, target, num_items_in_batch=None):
        return kd_loss(student_logits, teacher_logits, target, self.temperature, self.alpha,
                       divergence=self.divergence, beta=self.beta, dim=self.dim, ignore_index=self.ignore_index,
                       num_items_in_batch=num_items_in_batch)

    def extra_repr(self):
        return f"temperature={self.temperature}, alpha={self.alpha}, divergence={self.divergence!r}"
