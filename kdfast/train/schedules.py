"""Schedules for loss-term weights and learning-rate multipliers: callables from training progress (in epochs
since the stage began, fractional within an epoch) to a float. Stateless, so a resumed run computes the same
values as an uninterrupted one."""
from __future__ import annotations

import bisect
import math


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


class Schedule:
    def __call__(self, epoch: float) -> float:
        raise NotImplementedError


class Constant(Schedule):
    def __init__(self, value: float):
        self.value = _number(value, "value")

    def __call__(self, epoch):
        return self.value

    def __repr__(self):
        return f"Constant({self.value})"


class _Ramp(Schedule):
    def __init__(self, start: float, end: float, epochs: float, begin: float = 0.0):
        self.start, self.end = _number(start, "start"), _number(end, "end")
        self.epochs, self.begin = _number(epochs, "epochs"), _number(begin, "begin")
        if self.epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {epochs}")

    def _fraction(self, epoch: float) -> float:
        return min(max((epoch - self.begin) / self.epochs, 0.0), 1.0)

    def __repr__(self):
        return f"{type(self).__name__}({self.start}, {self.end}, epochs={self.epochs}, begin={self.begin})"


class Linear(_Ramp):
    """start until `begin`, then a straight line to `end` over `epochs`, then end."""

    def __call__(self, epoch):
        return self.start + (self.end - self.start) * self._fraction(epoch)


class Cosine(_Ramp):
    """start until `begin`, then half a cosine to `end` over `epochs` (flat at both ends), then end."""

    def __call__(self, epoch):
        return self.end + (self.start - self.end) * 0.5 * (1 + math.cos(math.pi * self._fraction(epoch)))


class StageWise(Schedule):
    """Piecewise constant: values[0] before milestones[0], values[i] from milestones[i - 1] on (e.g. learning-rate
    steps at epochs 150, 180, 210: StageWise([150, 180, 210], [1, 0.1, 0.01, 0.001]))."""

    def __init__(self, milestones, values):
        self.milestones = [_number(m, "milestones") for m in milestones]
        self.values = [_number(v, "values") for v in values]
        if len(self.values) != len(self.milestones) + 1:
            raise ValueError(f"values needs one more entry than milestones, got {len(self.values)} values for "
                             f"{len(self.milestones)} milestones")
        if any(b <= a for a, b in zip(self.milestones, self.milestones[1:])):
            raise ValueError(f"milestones must increase, got {self.milestones}")

    def __call__(self, epoch):
        return self.values[bisect.bisect_right(self.milestones, epoch)]

    def __repr__(self):
        return f"StageWise({self.milestones}, {self.values})"


def as_schedule(value) -> Schedule:
    """A number becomes Constant(number); a Schedule or any callable of the epoch is used as it is."""
    if isinstance(value, Schedule) or (callable(value) and not isinstance(value, (int, float))):
        return value
    return Constant(value)


def lr_schedule(name: str, epochs: int, warmup: float = 0.0) -> Schedule:
    """Named learning-rate multipliers: "constant", "cosine" (to 0 over the stage), "step" (x0.1 at 50% and 75%
    of the stage), each after an optional linear warm-up of `warmup` epochs."""
    if name == "constant":
        main = Constant(1.0)
    elif name == "cosine":
        main = Cosine(1.0, 0.0, epochs - warmup if epochs > warmup else 1, begin=warmup)
    elif name == "step":
        main = StageWise([0.5 * epochs, 0.75 * epochs], [1.0, 0.1, 0.01])
    else:
        raise ValueError(f"lr schedule must be one of 'constant', 'cosine', 'step', got {name!r}")
    if warmup <= 0:
        return main
    ramp = Linear(0.0, 1.0, warmup)
    return lambda epoch: ramp(epoch) * main(epoch) if epoch < warmup else main(epoch)
