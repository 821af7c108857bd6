"""kdfast's thin trainer: a Distiller (student, teacher, feature taps, weighted loss terms), a Trainer (stages,
AMP, clipping, checkpoints, DDP), the model zoo, data, calibration, and the demo."""
from .calibration import (
    ConfidentPredictor,
    calibration_report,
    expected_calibration_error,
    fit_temperature,
    selective_prediction,
)
from .checkpoint import load_checkpoint, save_checkpoint
from .data import (
    UNLABELLED,
    Dataset,
    Loader,
    Split,
    few_labels,
    labelled_fraction,
    load_cifar,
    load_dataset,
    load_digits,
    load_shapes,
)
from .distiller import Distiller, Features, StepOutput, Tap
from .models import MODELS, build_model
from .schedules import Constant, Cosine, Linear, Schedule, StageWise
from .terms import (
    KD,
    AttentionTransfer,
    CrossEntropy,
    Hint,
    KDLoss,
    ManifoldDistillation,
    MissingOpError,
    MutualLearning,
    PairwiseAffinity,
)
from .trainer import Stage, Trainer, init_distributed, seed_everything

__all__ = [
    "ConfidentPredictor", "calibration_report", "expected_calibration_error", "fit_temperature",
    "selective_prediction", "load_checkpoint", "save_checkpoint", "UNLABELLED", "Dataset", "Loader", "Split",
    "few_labels", "labelled_fraction", "load_cifar", "load_dataset", "load_digits", "load_shapes", "Distiller",
    "Features", "StepOutput", "Tap", "MODELS", "build_model", "Constant", "Cosine", "Linear", "Schedule",
    "StageWise", "KD", "AttentionTransfer", "CrossEntropy", "Hint", "KDLoss", "ManifoldDistillation",
    "MissingOpError", "MutualLearning", "PairwiseAffinity", "Stage", "Trainer", "init_distributed", "seed_everything",
]
