"""Attention transfer (Zagoruyko & Komodakis 2017): channel-pooled, L2-normalised spatial attention maps, and the
loss between the student's and the teacher's maps over any number of layer pairs, all pairs in one kernel launch
forward and one backward."""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch
from torch import nn

from . import _ops, reference
from . import _validate as check
from ._autograd import once_differentiable, under_transform
from ._features import match_spatial
from ._ops import has_kernel

POOLS = ("mean", "sum", "max")
REDUCTIONS = ("mean", "sum", "none")
EPS_LOG = math.log(1e-12)  # log of the maps' normalisation eps (torch.nn.functional.normalize's default)

Features = Union[torch.Tensor, Sequence[torch.Tensor]]


def _check_options(p, pool) -> float:
    p = check.positive_finite(p, "p")
    check.choice(pool, "pool", POOLS)
    return p


def _check_features(x, name: str) -> torch.Tensor:
    check.floating(x, name)
    if x.dim() < 3:
        raise ValueError(f"{name} must be (B, C, *spatial) with at least one spatial dim, got shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has no channels (shape {tuple(x.shape)})")
    return x


def _scaled(p) -> bool:
    """Exponents other than 1 and 2 run on features divided by their sample's max |x|: |x|^p of float32 features
    overflows (or underflows to 0) long before the normalised map does (p = 30 of |x| = 20 is 1e39)."""
    return p not in (1.0, 2.0)


def _scaled_maps(features, p, pool):
    """L2-normalised maps of (B, C, positions) features computed on x / M, M the sample's max |x|, through the
    kernel's unnormalised maps. normalize(a) = a / max(|a|, eps) is unchanged by the scale when |a| >= eps; where
    |a| < eps it is a / eps, which here is a' / (eps / M^p) with eps / M^p formed in log space. M is a constant
    of the gradient: the map is scale-invariant where |a| >= eps, and a' M^p = a exactly below."""
    acc = check.acc_dtype(*features)
    scaled, thresholds = [], []
    for x in features:
        m = x.detach().abs().amax((1, 2), keepdim=True).to(acc) if x.numel() else x.new_ones((x.shape[0], 1, 1),
                                                                                          dtype=acc)
        m = torch.where(m > 0, m, torch.ones_like(m))  # an all-zero sample: map 0, as unscaled
        scaled.append(x / m)
        thresholds.append(torch.exp(EPS_LOG - p * torch.log(m.flatten(1))))
    maps, _, _ = torch.ops.kdfast.attention_fwd(scaled, p, pool, False)
    return [a / torch.maximum(torch.linalg.vector_norm(a, dim=1, keepdim=True), eps)
            for a, eps in zip(maps, thresholds)]


def attention_map(features, p=2.0, *, pool="mean", normalize=True) -> torch.Tensor:
    """(B, prod(spatial)) attention map of (B, C, *spatial) features: mean (or sum, or max) over the channels of
    |features|^p, L2-normalised over the flattened positions (eps 1e-12, as F.normalize) when normalize.
    max pooling sends the gradient to the first arg-max channel. The map is float32 (float64 for float64 input).
    With normalize, exponents other than 1 and 2 are computed on features scaled by each sample's max |x|, so
    that large p (tested to 100) stays accurate; p = 1 and 2 run unscaled, so |x|^p must fit the accumulator
    (|x| < 1.8e19 in float32 at p = 2; past it the map is NaN). Unnormalised maps are |x|^p as they are."""
    _check_features(features, "features")
    p = _check_options(p, pool)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    if under_transform(features) or not has_kernel(features.device):
        return reference.attention_map(features, p, pool=pool, normalize=normalize)
    x = features.flatten(2)
    if normalize and _scaled(p):
        return _scaled_maps([x], p, pool)[0]
    maps, _, _ = torch.ops.kdfast.attention_fwd([x], p, pool, normalize)
    return maps[0]


def _transfer_rows(students, teachers, p, pool):
    """The (pairs, B) rows of the kernel: through _Transfer in eager mode, through the op (and its registered
    autograd) under torch.compile, which traces the op rather than a Python autograd.Function."""
    if torch.compiler.is_compiling():
        return torch.ops.kdfast.attention_transfer_fwd(students, teachers, p, pool)[0]
    return _Transfer.apply(p, pool, len(students), *students, *teachers)


def _check_pairs(student_features, teacher_features):
    """The layer pairs as two equal-length lists, checked, with spatial sizes matched (the larger feature map
    adaptive-average-pooled to the smaller's size, as RepDistiller does)."""
    s_single, t_single = isinstance(student_features, torch.Tensor), isinstance(teacher_features, torch.Tensor)
    if s_single != t_single:
        raise TypeError("student_features and teacher_features must both be tensors or both be sequences of tensors")
    if s_single:
        students, teachers = [student_features], [teacher_features]
    else:
        for name, seq in (("student_features", student_features), ("teacher_features", teacher_features)):
            if not isinstance(seq, (list, tuple)):
                raise TypeError(f"{name} must be a tensor or a list/tuple of tensors, got {type(seq).__name__}")
        students, teachers = list(student_features), list(teacher_features)
        if len(students) != len(teachers):
            raise ValueError(f"student_features and teacher_features must hold as many layers, got {len(students)} "
                             f"and {len(teachers)}")
        if not students:
            raise ValueError("student_features and teacher_features are empty: give at least one layer pair")
    batch = device = None
    pairs = []
    for i, (s, t) in enumerate(zip(students, teachers)):
        sn, tn = ("student_features", "teacher_features") if s_single else (f"student_features[{i}]",
                                                                            f"teacher_features[{i}]")
        _check_features(s, sn)
        _check_features(t, tn)
        if batch is None:
            batch, device = s.shape[0], s.device
        if s.device != device or t.device != device:  # the message is built only when it fails
            check.same_device({"student_features" if s_single else "student_features[0]": students[0], sn: s, tn: t})
        if s.shape[0] != batch or t.shape[0] != batch:
            name, x = (sn, s) if s.shape[0] != batch else (tn, t)
            raise ValueError(f"{name} has batch size {x.shape[0]}, but the other feature maps have {batch}")
        if s.dim() != t.dim():
            raise ValueError(f"{sn} and {tn} must have as many spatial dims, got shapes {tuple(s.shape)} and "
                             f"{tuple(t.shape)}")
        if s.shape[2:] != t.shape[2:]:
            small, large = sorted((s.shape[2:], t.shape[2:]), key=lambda z: z.numel())
            if any(a > b for a, b in zip(small, large)):
                raise ValueError(f"{sn} and {tn} have spatial sizes {tuple(s.shape[2:])} and {tuple(t.shape[2:])}: "
                                 "one must be at least as large as the other in every dim to be pooled to it")
            s, t = match_spatial(s, t)
        pairs.append((s, t))
    return pairs


def attention_transfer_loss(student_features: Features, teacher_features: Features, p=2.0, *, pool="mean",
                            reduction="mean") -> torch.Tensor:
    """Attention transfer between student and teacher feature maps: one (B, C, *spatial) tensor each, or
    equal-length sequences of them (layer pairs; channel counts may differ within a pair). Where the spatial sizes
    of a pair differ, the feature map with more positions is first adaptive-average-pooled to the other's size.

    Per pair, the mean over batch and positions of (map_s - map_t)^2 with attention_map(., p, pool=pool).
    reduction: "mean" = the sum over pairs of those means (RepDistiller), "sum" = the sum of all squared
    differences, "none" = a (pairs, B) tensor of per-sample means. An empty batch or a pair without positions
    gives 0 ("none": zeros, or an empty tensor). Exponents other than 1 and 2 are computed on scaled features (see
    attention_map). Gradients flow to both sides; double backward raises (kdfast._autograd)."""
    p = _check_options(p, pool)
    check.choice(reduction, "reduction", REDUCTIONS)
    pairs = _check_pairs(student_features, teacher_features)
    students, teachers = [s for s, _ in pairs], [t for _, t in pairs]
    if under_transform(*students, *teachers) or not has_kernel(students[0].device):
        return reference.attention_transfer_loss(students, teachers, p, pool=pool, reduction=reduction)
    students, teachers = [s.flatten(2) for s in students], [t.flatten(2) for t in teachers]
    if _scaled(p):
        maps = _scaled_maps(students + teachers, p, pool)
        k = len(students)
        rows = torch.stack([(ms - mt).square().sum(1) / max(ms.shape[1], 1) for ms, mt in zip(maps[:k], maps[k:])])
    else:
        rows = _transfer_rows(students, teachers, p, pool)
    if reduction == "none":
        return rows
    if reduction == "sum":  # a row is a mean over the pair's positions
        positions = [s.shape[2] for s in students]
        if len(set(positions)) == 1:
            return rows.sum() * positions[0]
        return (rows.sum(1) * torch.tensor(positions, dtype=rows.dtype, device=rows.device)).sum()
    return rows.sum() / max(rows.shape[1], 1)


class AttentionTransfer(nn.Module):
    """nn.Module form of attention_transfer_loss: AttentionTransfer(p, pool=..., reduction=...)(student_features,
    teacher_features)."""

    def __init__(self, p=2.0, *, pool="mean", reduction="mean"):
        super().__init__()
        self.p = _check_options(p, pool)
        check.choice(reduction, "reduction", REDUCTIONS)
        self.pool, self.reduction = pool, reduction

    def forward(self, student_features: Features, teacher_features: Features) -> torch.Tensor:
        return attention_transfer_loss(student_features, teacher_features, self.p, pool=self.pool,
                                       reduction=self.reduction)

    def extra_repr(self):
        return f"p={self.p}, pool={self.pool!r}, reduction={self.reduction!r}"


if _ops._C is not None:

    def _list_needs(needs_input_grad, tensors) -> list:
        """Per-tensor needs_input_grad of a Tensor[] argument (autograd gives a list, or one bool for all)."""
        if isinstance(needs_input_grad, (list, tuple)):
            return [bool(x) for x in needs_input_grad]
        return [bool(needs_input_grad)] * len(tensors)

    @torch.library.register_fake("kdfast::attention_fwd")
    def _attention_fwd_fake(features, p, pool, normalize):
        acc = check.acc_dtype(*features)
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

    @once_differentiable("attention_map")
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
        _save_transfer(ctx, student, teacher, maps, norms, argmax, p, pool)

    def _save_transfer(ctx, student, teacher, maps, norms, argmax, p, pool):
        ctx.pairs = len(student)
        ctx.save_for_backward(*student, *teacher, *maps, norms, *argmax)
        ctx.options = (p, pool)

    def _transfer_grads(ctx, grad_rows, needs) -> list:
        """The gradients of student + teacher (None where needs is false) from what _save_transfer kept."""
        k = ctx.pairs
        saved = ctx.saved_tensors
        student, teacher = saved[:k], saved[k:2 * k]
        maps, norms, argmax = saved[2 * k:4 * k], saved[4 * k], saved[4 * k + 1:]
        grads = torch.ops.kdfast.attention_transfer_bwd(grad_rows, list(student), list(teacher), list(maps), norms,
                                                        list(argmax), *ctx.options, needs)
        return [g if need else None for g, need in zip(grads, needs)]

    @once_differentiable("attention_transfer_loss")
    def _attention_transfer_backward(ctx, grad_rows, _grad_maps, _grad_norms, _grad_argmax):
        k = ctx.pairs
        if grad_rows is None:
            return [None] * k, [None] * k, None, None
        saved = ctx.saved_tensors
        needs = _list_needs(ctx.needs_input_grad[0], saved[:k]) + _list_needs(ctx.needs_input_grad[1], saved[k:2 * k])
        grads = _transfer_grads(ctx, grad_rows, needs)
        return grads[:k], grads[k:], None, None

    class _Transfer(torch.autograd.Function):
        """The eager path of attention_transfer_fwd: the same op, saved tensors and backward as its
        register_autograd registration (which torch.compile and direct op calls use), without torch.library's
        per-call pytree handling of the Tensor[] arguments (measured 0.12 ms forward + 0.2 ms backward per call on
        the 2-core machine, a tenth of a CIFAR step)."""

        @staticmethod
        def forward(ctx, p, pool, pairs, *features):
            with torch._C._AutoDispatchBelowAutograd():  # straight to the device kernel: this is the autograd
                rows, maps, norms, argmax = torch.ops.kdfast.attention_transfer_fwd(
                    list(features[:pairs]), list(features[pairs:]), p, pool)
            _save_transfer(ctx, features[:pairs], features[pairs:], maps, norms, argmax, p, pool)
            return rows

        @staticmethod
        @once_differentiable("attention_transfer_loss")
        def backward(ctx, grad_rows):
            return (None, None, None, *_transfer_grads(ctx, grad_rows, list(ctx.needs_input_grad[3:])))

    torch.library.register_autograd("kdfast::attention_transfer_fwd", _attention_transfer_backward,
                                    setup_context=_attention_transfer_setup_context)
