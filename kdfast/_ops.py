"""Loads the extension kdfast._C, registers each op's fake (shape) function and autograd, and picks the
backend: the extension's kernel where it has one for the tensors' device, else the pure-PyTorch reference
(with one warning per device and process). KDFAST_BACKEND=reference forces the reference everywhere.
"""
from __future__ import annotations

import os
import warnings

import torch

from ._validate import acc_dtype

try:
    from . import _C  # noqa: F401  (importing it registers the kdfast:: ops)
except ImportError as exc:  # not built: everything runs on the reference
    _C = None
    _IMPORT_ERROR = str(exc)
else:
    _IMPORT_ERROR = None

FORCE_REFERENCE = os.environ.get("KDFAST_BACKEND", "") == "reference"
_warned: set = set()


def backends() -> dict:
    """What this installation can run: the extension, its CPU instruction set, CUDA kernels, forced reference."""
    return {
        "extension": _C is not None,
        "extension_error": _IMPORT_ERROR,
        "cpu": _C is not None,
        "cpu_capability": _C.cpu_capability() if _C is not None else None,
        "cuda": bool(_C is not None and _C.cuda),
        "forced_reference": FORCE_REFERENCE,
    }


def has_kernel(device: torch.device) -> bool:
    """True when the extension has kernels for this device (and the reference is not forced)."""
    if FORCE_REFERENCE:
        return False
    if _C is not None and (device.type == "cpu" or (device.type == "cuda" and _C.cuda)):
        return True
    if device.type not in _warned:
        _warned.add(device.type)
        why = f"the extension did not load ({_IMPORT_ERROR})" if _C is None else "it was built without them"
        warnings.warn(f"kdfast: no {device.type} kernels ({why}); using the pure-PyTorch reference", stacklevel=3)
    return False


def svd_backward(U, S, Vh, gU, gS, gVh):
    """Gradient of A = U diag(S) Vh (reduced SVD, S descending, real) from the gradients of U, S and Vh (any
    may be None): the standard SVD adjoint, as torch.linalg.svd's backward computes it, made finite everywhere.

    Regularisation: the adjoint divides by s_j^2 - s_i^2 and by s_i. Both are taken on the spectrum scaled by
    s_max (x = (s_j^2 - s_i^2) / s_max^2, x = s_i / s_max), where 1/x is replaced by x / (x^2 + eps^2), eps the
    dtype's machine epsilon. That equals 1/x to a relative eps^2/x^2 (invisible where the singular values are
    distinct and non-zero), is 0 at exactly repeated or zero singular values, and is bounded by 1 / (2 eps)
    (times 1/s_max) near them, so the gradient is never NaN or inf for finite inputs.
    """
    m, n, k = U.shape[-2], Vh.shape[-1], S.shape[-1]
    if gU is None and gVh is None:
        if gS is None:
            return U.new_zeros(U.shape[:-1] + (n,))
        return U @ (gS.unsqueeze(-1) * Vh)
    eps = torch.finfo(S.dtype).eps
    smax = S[..., :1]
    scale = torch.where(smax > 0, smax, torch.ones_like(smax))
    s = S / scale
    gap = s.unsqueeze(-2) ** 2 - s.unsqueeze(-1) ** 2  # [i, j] = s_j^2 - s_i^2
    inv_gap = gap / (gap * gap + eps * eps)
    inner = 0
    if gU is not None:
        UtgU = U.mT @ gU
        inner = (UtgU - UtgU.mT) * s.unsqueeze(-2)
    if gVh is not None:
        VtgV = Vh @ gVh.mT
        inner = inner + s.unsqueeze(-1) * (VtgV - VtgV.mT)
    inner = inner * inv_gap / scale.unsqueeze(-1)
    if gS is not None:
        inner = inner + torch.diag_embed(gS)
    inv_s = s / (s * s + eps * eps) / scale
    if m > k and gU is not None:  # + (I - U U^T) gU S^-1, the part of gU outside U's span
        gUs = gU * inv_s.unsqueeze(-2)
        return (U @ (inner - U.mT @ gUs) + gUs) @ Vh
    if n > k and gVh is not None:  # + S^-1 gVh (I - V V^T)
        gVs = gVh * inv_s.unsqueeze(-1)
        return U @ ((inner - gVs @ Vh.mT) @ Vh + gVs)
    return U @ inner @ Vh


if _C is not None:

    def _list_needs(needs_input_grad, tensors) -> list:
        """Per-tensor needs_input_grad of a Tensor[] argument (autograd gives a list, or one bool for all)."""
        if isinstance(needs_input_grad, (list, tuple)):
            return [bool(x) for x in needs_input_grad]
        return [bool(needs_input_grad)] * len(tensors)

    @torch.library.register_fake("kdfast::attention_fwd")
    def _attention_fwd_fake(features, p, pool, normalize):
        acc = torch.float64 if any(f.dtype == torch.float64 for f in features) else torch.float32
        batch = features[0].shape[0]
        maps = [f.new_empty((batch, f.shape[2]), dtype=acc) for f in features]
        argmax = [f.new_empty((batch, f.shape[2]) if pool == "max" else (0,), dtype=torch.int32) for f in features]
        return maps, features[0].new_empty((len(features), batch), dtype=acc), argmax

    @torch.library.register_fake("kdfast::attention_bwd")
    def _attention_bwd_fake(grad_maps, features, maps, norms, argmax, p, pool, normalize, needs_grad):
        return [torch.empty_like(f) if need else f.new_empty((0,)) for f, need in zip(features, needs_grad)]

    def _attention_setup_context(ctx, inputs, output):
        features, p, pool, normalize = inputs
        maps, norms, argmax = output
        ctx.set_materialize_grads(False)  # no zero-filled gradients for norms and argmax
        ctx.count = len(features)
        ctx.save_for_backward(*features, *maps, norms, *argmax)
        ctx.options = (p, pool, normalize)

    def _attention_backward(ctx, grad_maps, _grad_norms, _grad_argmax):
        n = ctx.count
        saved = ctx.saved_tensors
        features, maps, norms, argmax = saved[:n], saved[n:2 * n], saved[2 * n], saved[2 * n + 1:]
        needs = _list_needs(ctx.needs_input_grad[0], features)
        grad_maps = [torch.zeros_like(m) if g is None else g for g, m in zip(grad_maps, maps)]
        grads = torch.ops.kdfast.attention_bwd(list(grad_maps), list(features), list(maps), norms, list(argmax),
                                               *ctx.options, needs)
        return [g if need else None for g, need in zip(grads, needs)], None, None, None

    torch.library.register_autograd("kdfast::attention_fwd", _attention_backward,
                                    setup_context=_attention_setup_context)

    @torch.library.register_fake("kdfast::attention_transfer_fwd")
    def _attention_transfer_fwd_fake(student, teacher, p, pool):
        maps, norms, argmax = _attention_fwd_fake(list(student) + list(teacher), p, pool, True)
        return student[0].new_empty((len(student), student[0].shape[0]), dtype=norms.dtype), maps, norms, argmax

    @torch.library.register_fake("kdfast::attention_transfer_bwd")
    def _attention_transfer_bwd_fake(grad_rows, student, teacher, maps, norms, argmax, p, pool, needs_grad):
        return [torch.empty_like(f) if need else f.new_empty((0,))
                for f, need in zip(list(student) + list(teacher), needs_grad)]

    def _attention_transfer_setup_context(ctx, inputs, output):
        student, teacher, p, pool = inputs
        _rows, maps, norms, argmax = output
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the maps, norms and argmax
        ctx.pairs = len(student)
        ctx.save_for_backward(*student, *teacher, *maps, norms, *argmax)
        ctx.options = (p, pool)

    def _attention_transfer_backward(ctx, grad_rows, _grad_maps, _grad_norms, _grad_argmax):
        k = ctx.pairs
        if grad_rows is None:
            return [None] * k, [None] * k, None, None
        saved = ctx.saved_tensors
        student, teacher = saved[:k], saved[k:2 * k]
        maps, norms, argmax = saved[2 * k:4 * k], saved[4 * k], saved[4 * k + 1:]
        needs = _list_needs(ctx.needs_input_grad[0], student) + _list_needs(ctx.needs_input_grad[1], teacher)
        grads = torch.ops.kdfast.attention_transfer_bwd(grad_rows, list(student), list(teacher), list(maps), norms,
                                                        list(argmax), *ctx.options, needs)
        grads = [g if need else None for g, need in zip(grads, needs)]
        return grads[:k], grads[k:], None, None

    torch.library.register_autograd("kdfast::attention_transfer_fwd", _attention_transfer_backward,
                                    setup_context=_attention_transfer_setup_context)
    @torch.library.register_fake("kdfast::pairwise_affinity_fwd")
    def _pairwise_affinity_fwd_fake(student, teacher):
        c = student.shape[1] + teacher.shape[1]
        return (student.new_empty((student.shape[0],), dtype=acc_dtype(student, teacher)),
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

    def _pairwise_affinity_backward(ctx, grad_loss, _grad_gram):
        student, teacher, gram = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_loss is None:
            return None, None
        gs, gt = torch.ops.kdfast.pairwise_affinity_bwd(grad_loss, student, teacher, gram, need_s, need_t)
        return gs if need_s else None, gt if need_t else None

    torch.library.register_autograd("kdfast::pairwise_affinity_fwd", _pairwise_affinity_backward,
                                    setup_context=_pairwise_affinity_setup_context)
    @torch.library.register_fake("kdfast::batched_svd")
    def _batched_svd_fake(a):
        batch, m, n = a.shape
        k = min(m, n)
        return a.new_empty((batch, m, k)), a.new_empty((batch, k)), a.new_empty((batch, k, n))

    def _svd_setup_context(ctx, inputs, output):
        ctx.save_for_backward(*output)

    def _svd_backward(ctx, gU, gS, gVh):
        return svd_backward(*ctx.saved_tensors, gU, gS, gVh)

    torch.library.register_autograd("kdfast::batched_svd", _svd_backward, setup_context=_svd_setup_context)
