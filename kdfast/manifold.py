"""Batched small-matrix SVD with a safe backward (batched_svd), and neuron manifold distillation built on it:
manifold_projection, manifold_distillation_loss and the nn.Module ManifoldDistillation."""
from __future__ import annotations

import math

import torch
from torch import nn

from . import _ops
from . import _validate as check
from ._autograd import under_transform
from ._features import manifold_points
from ._ops import has_kernel
from ._reduce import reduce_samples

REDUCTIONS = ("mean", "sum", "none")
# The Jacobi kernels take k = min(m, n) <= KERNEL_MAX_K columns (defined by the extension); on CPU the other side
# may be long (point clouds of a feature map: 1024 x 16), on CUDA the tall view must fit in one block's shared
# memory.
KERNEL_MAX_K = _ops._C.svd_max_cols if _ops._C is not None else 0
CPU_MAX_ROWS = 4096
CUDA_MAX_SHARED_BYTES = 96 * 1024


def _kernel_fits(A: torch.Tensor) -> bool:
    m, n = A.shape[-2:]
    k, rows = min(m, n), max(m, n)
    if k > KERNEL_MAX_K:
        return False
    if A.device.type == "cuda":
        return (rows * k + k * k) * A.element_size() <= CUDA_MAX_SHARED_BYTES
    return rows <= CPU_MAX_ROWS


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


class _LinalgSvd(torch.autograd.Function):
    """torch.linalg.svd (shapes past the kernels, devices without them) with kdfast's finite backward."""

    @staticmethod
    def forward(A):
        return torch.linalg.svd(A, full_matrices=False)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*output)

    @staticmethod
    def backward(ctx, gU, gS, gVh):
        return svd_backward(*ctx.saved_tensors, gU, gS, gVh)


def _svd(A: torch.Tensor):
    """batched_svd of a validated floating tensor, in its accumulator dtype."""
    acc = torch.float64 if A.dtype == torch.float64 else torch.float32
    A = A.to(acc)
    if under_transform(A):
        return torch.linalg.svd(A, full_matrices=False)
    if not (_kernel_fits(A) and has_kernel(A.device)):
        return _LinalgSvd.apply(A)
    batch = A.shape[:-2]
    m, n = A.shape[-2:]
    k = min(m, n)
    U, S, Vh = torch.ops.kdfast.batched_svd(A.reshape(math.prod(batch), m, n))
    return U.reshape(*batch, m, k), S.reshape(*batch, k), Vh.reshape(*batch, k, n)


def batched_svd(A):
    """Reduced SVD of every matrix of A (..., m, n): A = U diag(S) Vh with k = min(m, n), S descending.

    Returns U (..., m, k), S (..., k), Vh (..., k, n) in float32 (float64 for float64 input; half-precision
    input is computed in float32). Matrices with min(m, n) <= 64 run on kdfast's one-sided Jacobi kernels (CPU,
    CUDA without host synchronisation); others on torch.linalg.svd. Gradients through U, S and Vh equal
    torch.linalg.svd's where the singular values are distinct and non-zero, and stay finite where they repeat
    or vanish (regularisation: svd_backward), and double backward is correct there (differentiable torch
    ops). Under torch.func transforms (vmap, grad) it is torch.linalg.svd. NaN or inf in a matrix gives NaN
    outputs for it.
    """
    check.floating(A, "A")
    if A.dim() < 2:
        raise ValueError(f"A must have at least 2 dimensions (..., m, n), got shape {tuple(A.shape)}")
    return _svd(A)


def _check_rank(rank, n: int, d: int, name: str) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    if not 1 <= rank <= min(n, d):
        raise ValueError(f"rank must be in [1, min(n, d)] = [1, {min(n, d)}] for {name} of {n} points in {d} "
                         f"dimensions, got {rank}")
    return rank


def _projection(X: torch.Tensor, rank: int, center: bool):
    """(Y, U_rank, S_rank) of points X (..., n, d), Y = U_rank S_rank without the sign convention."""
    X = X.to(torch.float64 if X.dtype == torch.float64 else torch.float32)
    if center:
        X = X - X.mean(-2, keepdim=True)
    U, S, Vh = _svd(X)
    return U[..., :rank], S[..., :rank], Vh[..., :rank, :]


def manifold_projection(features, rank, *, center=True):
    """Coordinates X V_rank = U_rank S_rank (..., n, rank) of the n points of features (..., n, d) on their
    top-`rank` singular directions, after centring by the mean point (center=True). Signs: the entry of
    largest magnitude in each column of V_rank is positive. float32 result (float64 for float64 features)."""
    check.floating(features, "features")
    if features.dim() < 2:
        raise ValueError(f"features must have shape (..., n, d), got {tuple(features.shape)}")
    _check_rank(rank, features.shape[-2], features.shape[-1], "features")
    if not isinstance(center, bool):
        raise TypeError(f"center must be a bool, got {type(center).__name__}")
    U, S, Vh = _projection(features, rank, center)
    top = Vh.gather(-1, Vh.abs().argmax(-1, keepdim=True))
    sign = torch.where(top < 0, -1.0, 1.0).to(S.dtype)
    return U * (S.unsqueeze(-2) * sign.mT)


def _spectrum_weights(S):
    """D = S^2 / ||S^2|| (P = U D U^T), on S scaled by its largest value so that S^4 cannot underflow; 0 where
    S = 0 (P = 0), with a finite gradient there."""
    top = S[..., :1]
    s = S / torch.where(top > 0, top, torch.ones_like(top))
    s2 = s.square()
    n2 = s2.square().sum(-1, keepdim=True)
    return s2 / torch.where(n2 > 0, n2, torch.ones_like(n2)).sqrt()


def _set_loss(student, teacher, rank):
    """Per-set ||P_s - P_t||_F^2 (see reference.manifold_set_loss) from the SVD factors, P = U D U^T with U = U_rank
    and D = _spectrum_weights(S_rank), through rank x rank products and without cancellation. With C = Us^T Ut and
    R = Ut - Us C (the part of Ut outside Us's span), F = R^T R = I - C^T C, and the four orthogonal blocks of
    P_s - P_t on Us's span and its complement give
        ||P_s - P_t||^2 = ||Ds - C Dt C^T||^2 + 2 tr(Dt F Dt) - tr(Dt F Dt F),
    terms that are each as small as the loss. (The expansion ||P_s||^2 + ||P_t||^2 - 2 <P_s, P_t> that the
    reference evaluates in float64 leaves a float32 loss to the rounding of terms of size 1: a loss of 6e-5 came out
    0.7% off from U columns whose norms differ from 1 by 7e-8.) The price: about three times the expansion's passes
    over U (forward and backward)."""
    acc = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    Us, Ss, _ = _projection(student.to(acc), rank, True)
    Ut, St, _ = _projection(teacher.to(acc), rank, True)
    Ds, Dt = _spectrum_weights(Ss), _spectrum_weights(St)
    C = Us.mT @ Ut
    R = Ut - Us @ C
    F = R.mT @ R
    inner = torch.diag_embed(Ds) - (C * Dt.unsqueeze(-2)) @ C.mT
    DFD = Dt.unsqueeze(-1) * F * Dt.unsqueeze(-2)
    return inner.square().sum((-2, -1)) + 2 * DFD.diagonal(dim1=-2, dim2=-1).sum(-1) - (DFD * F.mT).sum((-2, -1))


def _check_pair(s, t, rank, i):
    where = "" if i is None else f"[{i}]"
    check.floating(s, f"student_features{where}")
    check.floating(t, f"teacher_features{where}")
    check.same_device({f"student_features{where}": s, f"teacher_features{where}": t})
    for x, name in ((s, "student_features"), (t, "teacher_features")):
        if x.dim() not in (2, 3, 4):
            raise ValueError(f"{name}{where} must be (B, D), (sets, n, d) or (B, C, H, W), got {tuple(x.shape)}")
    ps, pt = manifold_points(s), manifold_points(t)
    if ps.shape[:-1] != pt.shape[:-1]:
        raise ValueError(f"student_features{where} and teacher_features{where} must give the same sets of points, "
                         f"got {tuple(ps.shape[:-1])} and {tuple(pt.shape[:-1])} (sets, points) from shapes "
                         f"{tuple(s.shape)} and {tuple(t.shape)}")
    _check_rank(rank, ps.shape[-2], ps.shape[-1], f"student_features{where}")
    _check_rank(rank, pt.shape[-2], pt.shape[-1], f"teacher_features{where}")
    return ps, pt


def _check_weights(weights, pairs: int):
    if weights is None:
        return [1.0] * pairs
    if isinstance(weights, torch.Tensor) or not hasattr(weights, "__len__"):
        raise TypeError(f"weights must be a sequence of numbers, got {type(weights).__name__}")
    if len(weights) != pairs:
        raise ValueError(f"weights must have one value per layer pair ({pairs}), got {len(weights)}")
    out = [check.real(w, f"weights[{i}]") for i, w in enumerate(weights)]
    for i, w in enumerate(out):
        if not math.isfinite(w):
            raise ValueError(f"weights[{i}] must be finite, got {w}")
    return out


def manifold_distillation_loss(student_features, teacher_features, rank, *, weights=None, reduction="mean"):
    """Neuron manifold distillation: how differently student and teacher features lie on their top-`rank`
    linear manifolds.

    student_features, teacher_features: one tensor each, or equal-length sequences (layer pairs). A (B, C, H, W)
    map is B sets of H*W points in C dimensions; (B, D) is one set of B points in D dimensions; (S, n, d) is S
    sets. Both sides need the same sets and points; d may differ. Per set, Y = U_rank S_rank of the centred
    points, P = Y Y^T / ||Y Y^T||_F (P = 0 if Y = 0), loss = ||P_s - P_t||_F^2 in [0, 2], computed through
    rank x rank products. A sample of this loss is a set: one image of a (B, C, H, W) map, the whole batch of a
    (B, D) one. weights: gamma_i per pair (default 1). reduction: "mean" = sum_i gamma_i * mean over sets (0
    without sets), "sum" = sum_i gamma_i * sum over sets, "none" = the per-set values (sets,) times gamma_i, a
    list of them for sequences. float32 result (float64 if either side is float64); gradients reach both sides,
    and double backward is correct (the SVD backward is differentiable).
    """
    check.choice(reduction, "reduction", REDUCTIONS)
    single = isinstance(student_features, torch.Tensor)
    if single != isinstance(teacher_features, torch.Tensor):
        raise TypeError("student_features and teacher_features must both be tensors or both be sequences")
    if single:
        pairs = [_check_pair(student_features, teacher_features, rank, None)]
    else:
        student_features, teacher_features = list(student_features), list(teacher_features)
        if len(student_features) != len(teacher_features) or not student_features:
            raise ValueError(f"student_features and teacher_features must be non-empty sequences of equal length, "
                             f"got {len(student_features)} and {len(teacher_features)}")
        pairs = [_check_pair(s, t, rank, i) for i, (s, t) in enumerate(zip(student_features, teacher_features))]
    weights = _check_weights(weights, len(pairs))
    values = [w * _set_loss(s, t, rank) for (s, t), w in zip(pairs, weights)]
    if reduction == "none":
        return values[0] if single else values
    return sum(reduce_samples(v, reduction) for v in values)


class ManifoldDistillation(nn.Module):
    """nn.Module form of manifold_distillation_loss with fixed rank, weights and reduction."""

    def __init__(self, rank, *, weights=None, reduction="mean"):
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise TypeError(f"rank must be an int, got {type(rank).__name__}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        check.choice(reduction, "reduction", REDUCTIONS)
        self.rank, self.weights, self.reduction = rank, weights, reduction

    def forward(self, student_features, teacher_features):
        return manifold_distillation_loss(student_features, teacher_features, self.rank, weights=self.weights,
                                          reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, weights={self.weights}, reduction={self.reduction!r}"


if _ops._C is not None:

    @torch.library.register_fake("kdfast::batched_svd")
    def _batched_svd_fake(a):
        batch, m, n = a.shape
        k = min(m, n)
        return a.new_empty((batch, m, k)), a.new_empty((batch, k)), a.new_empty((batch, k, n))

    def _svd_setup_context(ctx, inputs, output):
        ctx.save_for_backward(*output)

    def _svd_backward(ctx, gU, gS, gVh):
        # Not once_differentiable: svd_backward is torch ops on the saved outputs U, S, Vh, whose own gradients
        # lead back through this op, so a second derivative is correct (tests: gradgradcheck).
        return svd_backward(*ctx.saved_tensors, gU, gS, gVh)

    torch.library.register_autograd("kdfast::batched_svd", _svd_backward, setup_context=_svd_setup_context)
