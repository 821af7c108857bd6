"""Recognising DTensor inputs at near-zero cost: kd_div, topk_kd_div and fused_linear_kd hand them to
kdfast.distributed (the vocabulary-parallel path)."""
from __future__ import annotations

import sys


def any_dtensor(*tensors) -> bool:
    """Whether any argument is a torch.distributed.tensor.DTensor. No DTensor can exist before its module is
    imported, so without it this is one dictionary lookup."""
    module = sys.modules.get("torch.distributed.tensor")
    if module is None:
        return False
    return any(isinstance(x, module.DTensor) for x in tensors)
