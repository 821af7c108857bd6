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


if _C is not None:

    @torch.library.register_fake("kdfast::kd_fwd")
    def _kd_fwd_fake(student, teacher, target, temperature, divergence, beta, ignore_index):
        acc = acc_dtype(student, teacher)
        rows = (student.shape[0], student.shape[2])
        ce_shape = rows if target is not None else (0,)
        planes = 3 + (divergence == "jsd") + (target is not None)  # kd_stat_planes in csrc/common/kd_div.h
        return (student.new_empty(rows, dtype=acc), student.new_empty(ce_shape, dtype=acc),
                student.new_empty((planes, *rows), dtype=acc))

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
