"""kdfast: fast fused knowledge-distillation losses for PyTorch."""
from . import distributed
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
from .topk import Sampled, TopK, sample_from_logits, sampled_kd_div, topk_from_logits, topk_kd_div
from .topk_store import TopKStore

__version__ = "0.1.0"

__all__ = ["backends", "kd_div", "kd_loss", "KDDiv", "KDLoss", "attention_map", "attention_transfer_loss",
           "AttentionTransfer", "affinity_graph", "pairwise_affinity_loss", "similarity_preserving_loss",
           "PairwiseAffinity", "SimilarityPreserving", "batched_svd", "manifold_projection",
           "manifold_distillation_loss", "ManifoldDistillation", "fused_linear_kd", "TeacherHead", "TopK",
           "topk_from_logits", "topk_kd_div", "TopKStore", "distributed",
           "Sampled", "sample_from_logits", "sampled_kd_div"]
