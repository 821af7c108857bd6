"""kdfast: fast fused knowledge-distillation losses for PyTorch."""
from ._ops import backends
from .affinity import (
    PairwiseAffinity,
    SimilarityPreserving,
    affinity_graph,
    pairwise_affinity_loss,
    similarity_preserving_loss,
)
from .attention import AttentionTransfer, attention_map, attention_transfer_loss
from .fused_linear import TeacherHead, fused_linear_kd
from .logits import KDDiv, KDLoss, kd_div, kd_loss
from .manifold import ManifoldDistillation, batched_svd, manifold_distillation_loss, manifold_projection

__version__ = "0.1.0"

__all__ = ["backends", "kd_div", "kd_loss", "KDDiv", "KDLoss", "attention_map", "attention_transfer_loss",
           "AttentionTransfer", "affinity_graph", "pairwise_affinity_loss", "similarity_preserving_loss",
           "PairwiseAffinity", "SimilarityPreserving", "batched_svd", "manifold_projection",
           "manifold_distillation_loss", "ManifoldDistillation", "fused_linear_kd", "TeacherHead"]
from . import distributed  # noqa: E402  (kdfast.distributed.vocab_parallel_kd_div, ..._topk_kd_div)
from .topk import TopK, topk_from_logits, topk_kd_div  # noqa: E402
from .topk_store import TopKStore  # noqa: E402

__all__ += ["TopK", "topk_from_logits", "topk_kd_div", "TopKStore", "distributed"]
