"""Argument checks shared by the public functions: each raises before any kernel runs and names the argument.

ValueError for shapes, values and options; TypeError for dtypes and non-tensors.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def floating(x, name: str) -> torch.Tensor:
    tensor(x, name)
    if x.dtype not in FLOATING:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {x.dtype}")
    return x


def same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def same_device(tensors: dict) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}: move them to one device")


def dim(d, ndim: int, name: str = "dim") -> int:
    if isinstance(d, bool) or not isinstance(d, int):
        raise TypeError(f"{name} must be an int, got {type(d).__name__}")
    if ndim == 0:
        raise ValueError("logits must have at least one dimension (the classes)")
    if not -ndim <= d < ndim:
        raise ValueError(f"{name}={d} is out of range for a tensor of {ndim} dimension(s)")
    return d % ndim


def choice(value, name: str, allowed: Iterable[str]) -> str:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
    return value


def real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def positive_finite(value, name: str) -> float:
    v = real(value, name)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return v


# The temperatures every temperature-softmax loss accepts (kd_div, kd_loss, topk_kd_div, fused_linear_kd,
# kdfast.distributed), the range docs/guarantees.md states its accuracy over.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-6, 1e6


def check_temperature(temperature) -> float:
    """The temperature as a float; ValueError outside [MIN_TEMPERATURE, MAX_TEMPERATURE] (NaN and inf included),
    TypeError for a non-number. The one temperature check of every op."""
    t = real(temperature, "temperature")
    if not MIN_TEMPERATURE <= t <= MAX_TEMPERATURE:
        raise ValueError(f"temperature must be in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], got {temperature}")
    return t


def in_closed_unit(value, name: str) -> float:
    v = real(value, name)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return v


def in_open_unit(value, name: str) -> float:
    v = real(value, name)
    if not 0.0 < v < 1.0:
        raise ValueError(f"{name} must be strictly inside (0, 1), got {value}")
    return v


def acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The accumulation dtype of a loss over these tensors: float64 when any is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# Above this temperature kd_div and kd_loss accumulate in float64 whatever the input dtypes (kKdPreciseT in
# csrc/common/kd_div.h): the divergence falls as 1/T^2 while float32 rounds the row statistics at about 1e-7
# absolute, which the T^2 scale then magnifies. The inputs are read as they are; the loss keeps acc_dtype.
PRECISE_TEMPERATURE = 16.0


def kd_acc_dtype(temperature: float, *tensors: torch.Tensor) -> torch.dtype:
    """The dtype kd_div and kd_loss accumulate in and keep their row statistics in."""
    return torch.float64 if temperature > PRECISE_TEMPERATURE else acc_dtype(*tensors)


def row_mask(mask, row_shape, like: torch.Tensor, like_name: str, rows_are: str = ""):
    """A bool mask of the loss's row shape on `like`'s device (None passes). rows_are says in the error what the row
    shape is (default: the leading dims of like_name)."""
    if mask is None:
        return None
    tensor(mask, "mask")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    if mask.shape != row_shape:
        raise ValueError(f"mask must have the row shape {tuple(row_shape)} "
                         f"({rows_are or 'the leading dims of ' + like_name}), got {tuple(mask.shape)}")
    same_device({like_name: like, "mask": mask})
    return mask


def num_items(value) -> None:
    """num_items_in_batch (Hugging Face's name, for gradient accumulation): None, a number > 0, or a one-element
    real tensor (its value checked on CPU only: reading it on a GPU would synchronise)."""
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"num_items_in_batch must be a number > 0 or a one-element real tensor, got a tensor of "
                             f"shape {tuple(value.shape)} and dtype {value.dtype}")
        if value.device.type != "cpu" or torch.compiler.is_compiling():
            return
        value = float(value)
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"num_items_in_batch must be a number or a one-element tensor, got {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"num_items_in_batch must be > 0 (the counted rows of the whole batch), got {value}")


def divide_by_items(loss: torch.Tensor, value) -> torch.Tensor:
    """A summed loss divided by num_items_in_batch (checked by num_items), in the loss's dtype and device."""
    if isinstance(value, torch.Tensor):
        return loss / value.reshape(()).to(device=loss.device, dtype=loss.dtype)
    return loss / value
