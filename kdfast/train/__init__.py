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
from .terms import DEPRECATED as _DEPRECATED
from .terms import KD, CrossEntropy, FeatureTerm, Hint, LogitTerm, MutualLearning
from .trainer import Stage, Trainer, init_distributed, seed_everything

__all__ = [
    "ConfidentPredictor", "calibration_report", "expected_calibration_error", "fit_temperature",
    "selective_prediction", "load_checkpoint", "save_checkpoint", "UNLABELLED", "Dataset", "Loader", "Split",
    "few_labels", "labelled_fraction", "load_cifar", "load_dataset", "load_digits", "load_shapes", "Distiller",
    "Features", "StepOutput", "Tap", "MODELS", "build_model", "Constant", "Cosine", "Linear", "Schedule",
    "StageWise", "KD", "CrossEntropy", "FeatureTerm", "Hint", "LogitTerm", "MutualLearning", "Stage", "Trainer",
    "init_distributed", "seed_everything",
]


def __getattr__(name):
    """AttentionTransfer, PairwiseAffinity, ManifoldDistillation and KDLoss were the trainer's own copies of kdfast's
    op modules; for one release they build the FeatureTerm / LogitTerm around kdfast's class, with a warning."""
    if name in _DEPRECATED:
        return _DEPRECATED[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
