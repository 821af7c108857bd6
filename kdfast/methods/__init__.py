"""The distillation methods of the literature as plain loss modules (any training loop can call them), each with
its paper's defaults and its source (registry.METHODS), built on kdfast's fused ops."""
from .dense import HolisticKD, PairwiseKD, PixelwiseKD, ScoreMapDiscriminator
from .feature import (
    ActivationBoundaries,
    AttentionTransfer,
    ConvRegressor,
    FitNetHint,
    GradientAttentionTransfer,
    RelationalKD,
    SimilarityPreserving,
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
from .shapes import SHAPE_CLASSES, SegNet, ShapesDataset, make_shapes, mean_iou, shapes_student, shapes_teacher

__all__ = [name for name in dir() if not name.startswith("_")]
