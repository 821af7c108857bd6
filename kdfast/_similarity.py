"""The similarity-preserving op, kdfast::similarity_preserving: an opaque custom op with its own backward, so that
autograd does not keep the batch x batch Gram matrices of large batches. Its cost is entirely matrix products
(B^2 D per product), which the device's BLAS already runs at peak, so it is composed of torch calls rather than a
hand-written kernel; what it saves over the plain formula is memory (row tiles) and products (one symmetrised
product per side in the backward instead of two, and no teacher product when the teacher needs no gradient).
Its backward is written in differentiable torch ops from the inputs, so double backward is correct.
"""
from __future__ import annotations

import torch

from ._validate import acc_dtype as _acc

EPS = 1e-12


def _normalised_rows(f, rows):
    """Rows `rows` of G = f f^T, L2-normalised (norm clamped at EPS), and their norms."""
    g = f[rows] @ f.T
    norm = torch.linalg.vector_norm(g, dim=1)
    return g / norm.clamp_min(EPS).unsqueeze(1), norm


def _tiles(b, tile):
    return [slice(i, min(i + tile, b)) for i in range(0, b, tile)]


@torch.library.custom_op("kdfast::similarity_preserving", mutates_args=())
def similarity_preserving(student: torch.Tensor, teacher: torch.Tensor, tile: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, Ds) and (B, Dt) features -> (per-row sums of (G^_s - G^_t)^2 (B,), saved, norms). When one tile holds
    every row, saved = the (2, B, B) normalised Grams and norms = their (2, B) row norms, for the backward;
    otherwise both are empty and the backward recomputes the tiles."""
    acc = _acc(student, teacher)
    fs, ft = student.to(acc), teacher.to(acc)
    b = fs.shape[0]
    values = []
    for rows in _tiles(b, tile):
        gs, ns = _normalised_rows(fs, rows)
        gt, nt = _normalised_rows(ft, rows)
        values.append((gs - gt).square().sum(1))
    values = torch.cat(values) if values else fs.new_zeros((0,))
    if tile >= b and b > 0:
        return values, torch.stack([gs, gt]), torch.stack([ns, nt])
    return values, fs.new_empty((0,)), fs.new_empty((0,))


@similarity_preserving.register_fake
def _(student, teacher, tile):
    acc = _acc(student, teacher)
    b = student.shape[0]
    values = student.new_empty((b,), dtype=acc)
    if tile >= b and b > 0:
        return values, student.new_empty((2, b, b), dtype=acc), student.new_empty((2, b), dtype=acc)
    return values, student.new_empty((0,), dtype=acc), student.new_empty((0,), dtype=acc)


def _setup_context(ctx, inputs, output):
    student, teacher, tile = inputs
    ctx.save_for_backward(student, teacher, output[1], output[2])
    ctx.tile = tile


def _row_grad(ghat, norm, dghat):
    """Chain rule of the row normalisation: the gradient flows through the norm where it was not clamped."""
    dot = (ghat * dghat).sum(1, keepdim=True) * (norm >= EPS).unsqueeze(1)
    return (dghat - ghat * dot) / norm.clamp_min(EPS).unsqueeze(1)


def _backward(ctx, grad_values, _grad_saved, _grad_norms):
    if grad_values is None:
        return None, None, None
    student, teacher, saved, norms = ctx.saved_tensors
    need = ctx.needs_input_grad[:2]
    acc = _acc(student, teacher)
    fs, ft = student.to(acc), teacher.to(acc)
    feats = (fs, ft)
    b = fs.shape[0]
    grads = [torch.zeros_like(f) if n else None for f, n in zip(feats, need)]
    two_g = 2 * grad_values.to(acc).unsqueeze(1)  # (B, 1): scales each row of the Gram difference
    # With create_graph (double backward) every tile is recomputed from the inputs: the saved Grams are outputs of
    # this op, and this backward ignores their gradients, so a second derivative through them would be wrong.
    reuse = saved.numel() and not torch.is_grad_enabled()
    for rows in _tiles(b, ctx.tile):
        if reuse:
            (gs, gt), (ns, nt) = saved, norms
        else:
            (gs, ns), (gt, nt) = _normalised_rows(fs, rows), _normalised_rows(ft, rows)
        diff = gs - gt
        for side, (ghat, norm, sign) in enumerate(((gs, ns, 1), (gt, nt, -1))):
            if grads[side] is None:
                continue
            dg = _row_grad(ghat, norm, (sign * two_g[rows]) * diff)
            f = feats[side]
            if rows == slice(0, b):  # G = f f^T: df = (dG + dG^T) f in one product
                grads[side] = grads[side] + (dg + dg.T) @ f
            else:
                grads[side][rows] += dg @ f
                grads[side] = grads[side] + dg.T @ f[rows]
    return tuple(g.to(x.dtype) if g is not None else None for g, x in zip(grads, (student, teacher))) + (None,)


similarity_preserving.register_autograd(_backward, setup_context=_setup_context)
