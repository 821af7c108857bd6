"""Calibration: expected calibration error, temperature scaling fitted on a held-out split, and the
confident-prediction rule of neuron manifold distillation (abstain when the calibrated confidence is below a
threshold), reported as coverage and selective accuracy."""
from __future__ import annotations

import math

import torch


def _probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.double() / temperature, dim=-1)


def expected_calibration_error(logits: torch.Tensor, targets: torch.Tensor, n_bins: int = 15,
                               temperature: float = 1.0) -> float:
    """ECE = sum over equal-width confidence bins (b/n, (b+1)/n] of |bin| / N * |accuracy(bin) - mean
    confidence(bin)|, where confidence is the top softmax probability of logits / temperature."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if len(targets) == 0:
        return 0.0
    conf, pred = _probs(logits, temperature).max(-1)
    correct = (pred == targets).double()
    # Bin b holds confidences in (b/n, (b+1)/n]; a confidence of exactly 0 cannot occur (it is >= 1/classes).
    bins = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)
    acc = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, correct)
    cf = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, conf)
    return float((acc - cf).abs().sum() / len(targets))


def nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> float:
    return float(torch.nn.functional.cross_entropy(logits.double() / temperature, targets))


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, lo: float = 0.05, hi: float = 20.0,
                    iters: int = 80) -> float:
    """The temperature T in [lo, hi] minimising the negative log-likelihood of softmax(logits / T) on a held-out
    split (Guo et al. 2017). The NLL is convex in 1/T, hence unimodal in log T: a golden-section search finds it
    deterministically, with no optimiser state."""
    if len(targets) == 0:
        raise ValueError("fit_temperature needs a non-empty held-out split")
    a, b = math.log(lo), math.log(hi)
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(logits, targets, math.exp(c)), nll(logits, targets, math.exp(d))
    for _ in range(iters):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(logits, targets, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(logits, targets, math.exp(d))
    return math.exp((a + b) / 2)


def selective_prediction(logits: torch.Tensor, targets: torch.Tensor, threshold: float,
                         temperature: float = 1.0) -> dict:
    """The confident-prediction rule: predict where the top probability of softmax(logits / temperature) is >=
    threshold, abstain elsewhere. coverage = fraction predicted; selective_accuracy = accuracy on those (1.0 when
    none is predicted: no prediction was wrong)."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    conf, pred = _probs(logits, temperature).max(-1)
    keep = conf >= threshold
    n, kept = len(targets), int(keep.sum())
    correct = int((pred[keep] == targets[keep]).sum())
    return {"threshold": threshold, "coverage": kept / n if n else 0.0,
            "selective_accuracy": correct / kept if kept else 1.0}


class ConfidentPredictor:
    """Temperature-scaled predictions that abstain (class -1) below a confidence threshold. fit() sets the
    temperature on a held-out split."""

    def __init__(self, threshold: float = 0.9, temperature: float = 1.0):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.threshold, self.temperature = threshold, temperature

    def fit(self, logits: torch.Tensor, targets: torch.Tensor) -> "ConfidentPredictor":
        self.temperature = fit_temperature(logits, targets)
        return self

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        conf, pred = _probs(logits, self.temperature).max(-1)
        return torch.where(conf >= self.threshold, pred, torch.full_like(pred, -1))

    def report(self, logits: torch.Tensor, targets: torch.Tensor) -> dict:
        return selective_prediction(logits, targets, self.threshold, self.temperature)


def calibration_report(test_logits, test_targets, holdout_logits=None, holdout_targets=None,
                       threshold: float = 0.9, n_bins: int = 15) -> dict:
    """Accuracy and ECE on the test split; with a held-out split also the fitted temperature, the ECE after
    scaling, and the confident-prediction coverage and selective accuracy at `threshold` (calibrated)."""
    out = {"accuracy": float((test_logits.argmax(-1) == test_targets).double().mean()) if len(test_targets) else 0.0,
           "ece": expected_calibration_error(test_logits, test_targets, n_bins)}
    temperature = 1.0
    if holdout_logits is not None:
        temperature = fit_temperature(holdout_logits, holdout_targets)
        out["temperature"] = temperature
        out["ece_calibrated"] = expected_calibration_error(test_logits, test_targets, n_bins, temperature)
    sel = selective_prediction(test_logits, test_targets, threshold, temperature)
    out["coverage"], out["selective_accuracy"] = sel["coverage"], sel["selective_accuracy"]
    return out
