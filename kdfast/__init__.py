"""kdfast: fast fused knowledge-distillation losses for PyTorch."""
from ._ops import backends
from .attention import AttentionTransfer, attention_map, attention_transfer_loss
from .logits import KDDiv, KDLoss, kd_div, kd_loss

__version__ = "0.1.0"

__all__ = ["backends", "kd_div", "kd_loss", "KDDiv", "KDLoss", "attention_map", "attention_transfer_loss",
           "AttentionTransfer"]
