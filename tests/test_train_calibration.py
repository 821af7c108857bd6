"""Calibration metrics against hand-computed cases."""
import math

import pytest
import torch

from kdfast.train import (
    ConfidentPredictor,
    calibration_report,
    expected_calibration_error,
    fit_temperature,
    selective_prediction,
)


def logits_of(probs):
    return torch.tensor(probs, dtype=torch.float64).log()


def test_ece_by_hand():
    # Confidences 0.85, 0.85 (one right, one wrong) and 0.65, 0.65 (both right), 10 bins:
    # ECE = 2/4 * |0.5 - 0.85| + 2/4 * |1.0 - 0.65| = 0.35.
    logits = logits_of([[0.85, 0.15], [0.85, 0.15], [0.35, 0.65], [0.65, 0.35]])
    targets = torch.tensor([0, 1, 1, 0])
    assert expected_calibration_error(logits, targets, n_bins=10) == pytest.approx(0.35, abs=1e-12)
    # One bin: |accuracy - mean confidence| = |0.75 - 0.75| = 0.
    assert expected_calibration_error(logits, targets, n_bins=1) == pytest.approx(0.0, abs=1e-12)
    # Perfectly confident and right: 0; confident and wrong: 1.
    assert expected_calibration_error(torch.tensor([[50.0, 0.0]]), torch.tensor([0])) == pytest.approx(0, abs=1e-12)
    assert expected_calibration_error(torch.tensor([[50.0, 0.0]]), torch.tensor([1])) == pytest.approx(1, abs=1e-12)


def test_ece_temperature_argument():
    logits = torch.tensor([[2.0, 0.0]])
    conf_t2 = 1 / (1 + math.exp(-1.0))  # softmax of [1, 0]
    assert expected_calibration_error(logits, torch.tensor([0]), temperature=2.0) == pytest.approx(1 - conf_t2)


def test_fit_temperature_by_hand():
    # Four examples with logits [2, 0]; class 0 is right 3 times in 4. The NLL is minimal where
    # sigmoid(2 / T) = 3/4, i.e. T = 2 / ln 3.
    logits = torch.tensor([[2.0, 0.0]] * 4)
    targets = torch.tensor([0, 0, 0, 1])
    assert fit_temperature(logits, targets) == pytest.approx(2 / math.log(3), rel=1e-6)


def test_selective_prediction_by_hand():
    logits = logits_of([[0.95, 0.05], [0.92, 0.08], [0.6, 0.4], [0.3, 0.7]])
    targets = torch.tensor([0, 1, 0, 1])
    out = selective_prediction(logits, targets, threshold=0.9)
    assert out["coverage"] == 0.5 and out["selective_accuracy"] == 0.5
    out = selective_prediction(logits, targets, threshold=0.65)
    assert out["coverage"] == 0.75 and out["selective_accuracy"] == pytest.approx(2 / 3)
    assert selective_prediction(logits, targets, threshold=0.99) == {"threshold": 0.99, "coverage": 0.0,
                                                                     "selective_accuracy": 1.0}
    predictor = ConfidentPredictor(threshold=0.9)
    assert predictor.predict(logits).tolist() == [0, 0, -1, -1]


def test_calibration_report_uses_the_holdout_temperature():
    logits = torch.tensor([[2.0, 0.0]] * 4)
    targets = torch.tensor([0, 0, 0, 1])
    report = calibration_report(logits, targets, logits, targets, threshold=0.7)
    assert report["temperature"] == pytest.approx(2 / math.log(3), rel=1e-6)
    assert report["accuracy"] == 0.75 and report["ece"] == pytest.approx(1 / (1 + math.exp(-2)) - 0.75)
    assert report["ece_calibrated"] == pytest.approx(0.0, abs=1e-6)  # calibrated confidence is exactly 3/4
    assert report["coverage"] == 1.0 and report["selective_accuracy"] == 0.75


@pytest.mark.parametrize("call", [lambda: expected_calibration_error(torch.zeros(1, 2), torch.zeros(1).long(), 0),
                                  lambda: selective_prediction(torch.zeros(1, 2), torch.zeros(1).long(), 1.5),
                                  lambda: ConfidentPredictor(threshold=-0.1),
                                  lambda: fit_temperature(torch.zeros(0, 2), torch.zeros(0).long())])
def test_calibration_errors(call):
    with pytest.raises(ValueError):
        call()
