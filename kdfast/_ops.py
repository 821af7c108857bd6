"""Loads the extension kdfast._C and picks the backend: the extension's kernel where it has one for the tensors'
device, else the pure-PyTorch reference (with one warning per device and process). KDFAST_BACKEND=reference
forces the reference everywhere. Each op's fake (shape) function and autograd stand beside its public function
in its family's module (docs/adding-an-op.md)."""
from __future__ import annotations

import os
import warnings

import torch

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
