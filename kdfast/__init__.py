"""kdfast: fast fused knowledge-distillation losses for PyTorch."""
from ._ops import backends
from .logits import KDDiv, KDLoss, kd_div, kd_loss
from .manifold import ManifoldDistillation, batched_svd, manifold_distillation_loss, manifold_projection

__version__ = "0.1.0"

__all__ = ["backends", "kd_div", "kd_loss", "KDDiv", "KDLoss", "batched_svd", "manifold_projection",
           "manifold_distillation_loss", "ManifoldDistillation"]
