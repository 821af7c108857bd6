"""The Distiller: a student, an optional teacher, feature taps, and a weighted sum of loss terms."""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
from torch import nn

from .schedules import as_schedule


class Features(NamedTuple):
    """The tapped features of one batch: student[name] and teacher[name]; epoch = the training progress in epochs
    since the stage began (for losses with their own schedule) and inputs = the batch (for input-gradient losses)."""
    student: dict
    teacher: dict
    epoch: float = 0.0
    inputs: torch.Tensor | None = None


class StepOutput(NamedTuple):
    loss: torch.Tensor        # the weighted sum
    parts: dict               # term name -> unweighted value (detached)
    student_logits: torch.Tensor


class Tap:
    """Features of one network by name. A name in model.feature_names (the zoo's models) is returned by
    model(x, features=True); any other name is a module path (as in model.named_modules()) tapped by a forward
    hook that keeps the module's output (the last element when it returns a tuple). Hooks are registered here,
    before any compilation of the model."""

    def __init__(self, model: nn.Module, names, role: str):
        returned = set(getattr(model, "feature_names", ()))
        modules = dict(model.named_modules())
        self.returned = [n for n in names if n in returned]
        self.store = {}
        self.handles = []
        for name in names:
            if name in returned:
                continue
            if name not in modules or name == "":
                known = ", ".join(sorted(returned)) or "none"
                raise ValueError(f"the {role} has no feature or module named {name!r} (its returned features: "
                                 f"{known}; or give a module path from named_modules())")
            self.handles.append(modules[name].register_forward_hook(partial(self._keep, name)))

    def _keep(self, name, module, inputs, output):
        self.store[name] = output[-1] if isinstance(output, tuple) else output

    def __call__(self, model, x):
        self.store = {}
        if self.returned:
            logits, feats = model(x, features=True)
            out = {n: feats[n] for n in self.returned}
        else:
            logits, out = model(x), {}
        out.update(self.store)
        self.store = {}
        return logits, out


class Distiller(nn.Module):
    """Holds student, teacher and named loss terms; forward(x, targets, weights) -> StepOutput.

    terms: {name: term} or {name: (term, weight)}; a weight is a number or a schedule of the epoch (default 1).
    A term is any callable (student logits, teacher logits, Features, targets) -> scalar; nn.Module terms are
    registered (their parameters are trained and checkpointed). Features are tapped from the terms'
    student_taps / teacher_taps plus the extra names given here.
    train_teacher=False (default): the teacher is frozen (no gradients, eval mode, run under no_grad).
    train_teacher=True: the teacher trains with the student (online methods such as mutual learning).
    To compile, build the Distiller first (its feature hooks must exist before compilation), then call
    student.compile() / teacher.compile(): the taps and model(x, features=True) go through the compiled module.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, terms=None, *,
                 train_teacher: bool = False, student_taps=(), teacher_taps=()):
        super().__init__()
        self.student, self.teacher, self.train_teacher = student, teacher, train_teacher
        terms = dict(terms or {"ce": _default_ce()})
        if not terms:
            raise ValueError("a Distiller needs at least one loss term")
        self.terms = nn.ModuleDict()
        self.plain_terms, self.weights = {}, {}
        s_taps, t_taps = list(student_taps), list(teacher_taps)
        for name, entry in terms.items():
            term, weight = entry if isinstance(entry, tuple) else (entry, 1.0)
            if not callable(term):
                raise TypeError(f"term {name!r} must be callable, got {type(term).__name__}")
            if isinstance(term, nn.Module):
                self.terms[name] = term
            else:
                self.plain_terms[name] = term
            self.weights[name] = as_schedule(weight)
            s_taps += list(getattr(term, "student_taps", ()))
            t_taps += list(getattr(term, "teacher_taps", ()))
        if t_taps and teacher is None:
            raise ValueError(f"terms tap teacher features {sorted(set(t_taps))} but there is no teacher")
        self.student_tap = Tap(student, list(dict.fromkeys(s_taps)), "student")
        self.teacher_tap = Tap(teacher, list(dict.fromkeys(t_taps)), "teacher") if teacher is not None else None
        if teacher is not None and not train_teacher:
            teacher.requires_grad_(False)
            teacher.eval()

    @property
    def term_names(self):
        return list(self.weights)

    def term(self, name):
        return self.terms[name] if name in self.terms else self.plain_terms[name]

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None and not self.train_teacher:
            self.teacher.eval()
        return self

    def weights_at(self, epoch: float, overrides=None) -> dict:
        """{term name: weight} at `epoch`: the overrides' schedules (a stage's terms) or else the defaults."""
        schedules = self.weights if overrides is None else {n: as_schedule(w) for n, w in overrides.items()}
        unknown = [n for n in schedules if n not in self.weights]
        if unknown:
            raise ValueError(f"unknown term(s) {unknown}; the distiller has {self.term_names}")
        return {n: float(s(epoch)) for n, s in schedules.items()}

    def adversaries(self, active=None) -> dict:
        """{term name: term} of the (active) terms that train an adversary, e.g. a discriminator: such a term has
        an nn.Module `adversary`, `adversary_loss()` on its last forward's detached outputs, and
        `adversary_optimizer` (keyword arguments of torch.optim.Adam). The trainer updates the adversary with its
        own optimiser after each step of the networks, alternating as GAN training does."""
        return {n: t for n, t in self.terms.items()
                if hasattr(t, "adversary_loss") and (active is None or n in active)}

    def forward(self, x, targets, weights=None, epoch: float = 0.0) -> StepOutput:
        weights = self.weights_at(0.0) if weights is None else weights
        s_logits, s_feats = self.student_tap(self.student, x)
        t_logits, t_feats = None, {}
        if self.teacher is not None:
            if self.train_teacher:
                t_logits, t_feats = self.teacher_tap(self.teacher, x)
            else:
                with torch.no_grad():
                    t_logits, t_feats = self.teacher_tap(self.teacher, x)
        features = Features(s_feats, t_feats, epoch, x)
        loss, parts = 0.0, {}
        for name, weight in weights.items():
            value = self.term(name)(s_logits, t_logits, features, targets)
            parts[name] = value.detach()
            loss = loss + weight * value.float()
        return StepOutput(loss, parts, s_logits)


def _default_ce():
    from .terms import CrossEntropy
    return CrossEntropy()
