"""Autograd helpers shared by the op families.

Every kernel op's backward is itself a kernel without a derivative. Differentiating its gradients again (double
backward: gradient penalties, MAML-style meta-distillation, Hessian-vector products) would otherwise give zeros
silently; `once_differentiable` makes it a clear error instead.
"""
from __future__ import annotations

import functools

import torch


class _NoSecondDerivative(torch.autograd.Function):
    """Identity on a gradient, whose own backward raises: marks a first-order gradient as not differentiable."""

    @staticmethod
    def forward(ctx, name, grad, *inputs):
        ctx.name = name
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(f"kdfast.{ctx.name} does not support double backward (differentiating its gradient, e.g. "
                           f"torch.autograd.grad(..., create_graph=True) then a second gradient): use the pure-PyTorch "
                           f"reference (kdfast.reference) or KDFAST_BACKEND=reference for higher-order derivatives")


def once_differentiable(name: str):
    """Decorator for a `torch.library.register_autograd` backward `(ctx, *grads) -> gradients`.

    When the backward runs with create_graph=True, each gradient it returns is linked to every saved input and
    upstream gradient that requires grad through a node whose backward raises a RuntimeError naming the op. The
    first-order gradients themselves are unchanged. The backward must save its inputs with ctx.save_for_backward.
    """

    def wrap(backward):
        @functools.wraps(backward)
        def run(ctx, *grads):
            out = backward(ctx, *grads)
            if not torch.is_grad_enabled():
                return out
            sources = [t for t in (*ctx.saved_tensors, *grads) if isinstance(t, torch.Tensor) and t.requires_grad]
            if not sources:
                return out

            def mark(g):
                if isinstance(g, torch.Tensor):
                    return _NoSecondDerivative.apply(name, g, *sources)
                if isinstance(g, (list, tuple)):
                    return type(g)(mark(x) for x in g)
                return g

            return mark(out)

        return run

    return wrap


def under_transform(*tensors) -> bool:
    """True when a tensor is wrapped by a torch.func transform (vmap, grad, jacrev, ...). The kernel ops have no
    batching or functorch rules; the public functions run the pure-PyTorch reference there, which supports every
    transform (and higher derivatives)."""
    if torch.compiler.is_compiling():  # dynamo traces the tensors of the graph, never functorch wrappers
        return False
    return any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)
