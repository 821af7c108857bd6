"""Helpers shared by the method losses."""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call


def frozen_call(module: nn.Module, *args):
    """module(*args) with its parameters detached: the gradient reaches the inputs, never the module (a
    discriminator evaluated inside the student's loss must not be trained by it)."""
    params = {name: p.detach() for name, p in module.named_parameters()}
    return functional_call(module, params, args)


def upcast_half(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32 (kdfast computes losses in float32 at least); float32/float64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
