"""The distillation methods of the literature as plain loss modules (any training loop can call them), each with
its paper's defaults and its source (registry.METHODS), built on kdfast's fused ops."""
from .dense import HolisticKD, PairwiseKD, PixelwiseKD, ScoreMapDiscriminator
from .feature import (
    ActivationBoundaries,
    AttentionTransferKD,
    ConvRegressor,
    FitNetHint,
    GradientAttentionTransfer,
    RelationalKD,
    SimilarityPreservingKD,
)
from .manifold import NeuronManifoldKD, confident_calibration
from .online import (
    DeepMutualLearning,
    FeatureMapDiscriminator,
    OKDDip,
    OKDDipAttention,
    OnlineAdversarialFD,
    okddip_rampup,
)
from .others import (
    FEED,
    EnsembleDistributionDistillation,
    FEEDTransform,
    InternalRepresentationKD,
    QuEST,
    TeacherAssistantKD,
    feature_vectors,
    internal_layers,
    kmeans_codebook,
    takd_steps,
)
from .registry import METHODS, Method, build
from .response import (
    ConditionalTeacherStudent,
    DefensiveDistillation,
    EnsembleKD,
    GeneralizedJSD,
    HintonKD,
    LogitMatching,
    NoisyTeacherKD,
    ensemble_teacher_logits,
)
from .selfdistill import BeYourOwnTeacher, MSDSelfDistillation, cosine_anneal

__all__ = [
    "ActivationBoundaries", "AttentionTransferKD", "BeYourOwnTeacher", "build", "ConditionalTeacherStudent",
    "confident_calibration", "ConvRegressor", "cosine_anneal", "DeepMutualLearning", "DefensiveDistillation",
    "ensemble_teacher_logits", "EnsembleDistributionDistillation", "EnsembleKD", "feature_vectors",
    "FeatureMapDiscriminator", "FEED", "FEEDTransform", "FitNetHint", "GeneralizedJSD", "GradientAttentionTransfer",
    "HintonKD", "HolisticKD", "internal_layers", "InternalRepresentationKD", "kmeans_codebook", "LogitMatching",
    "Method", "METHODS", "MSDSelfDistillation", "NeuronManifoldKD", "NoisyTeacherKD", "OKDDip", "okddip_rampup",
    "OKDDipAttention", "OnlineAdversarialFD", "PairwiseKD", "PixelwiseKD", "QuEST", "RelationalKD",
    "ScoreMapDiscriminator", "SimilarityPreservingKD", "takd_steps", "TeacherAssistantKD",
]

# Names that moved, kept for one release: the shapes task (data set, SegNet, mIoU) lives with the trainer's data,
# models and metrics; AT and SP are AttentionTransferKD and SimilarityPreservingKD (kdfast.AttentionTransfer and
# kdfast.SimilarityPreserving are the op modules they extend: one class per name).
_MOVED = {"SHAPE_CLASSES": "kdfast.train.data", "ShapesDataset": "kdfast.train.data",
          "make_shapes": "kdfast.train.data", "SegNet": "kdfast.train.models", "mean_iou": "kdfast.train.metrics",
          "AttentionTransfer": "kdfast.methods.feature:AttentionTransferKD",
          "SimilarityPreserving": "kdfast.methods.feature:SimilarityPreservingKD"}


def __getattr__(name):
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    import warnings
    home, _, new = _MOVED[name].partition(":")
    new = new or name
    warnings.warn(f"kdfast.methods.{name} is now {home}.{new}", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(home), new)
