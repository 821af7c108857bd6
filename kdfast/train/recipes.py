"""Every method of kdfast.methods (registry.METHODS) as a named trainer recipe: the Distiller (terms, feature taps,
wrapper networks), the Stages and the training split the method needs, around the registry's loss module.

build_recipe(name, setting, **overrides) -> Recipe; overrides go to the method's loss (registry.build). A Setting
holds the networks and data: a factory of fresh students (peers and exits are built from it), the trained teachers
(the first is the teacher; ensembles use them all), the training split, epochs, learning rate, and `fit` to train
a preliminary network (TAKD's assistant). Conventions shared by all recipes:
- cross-entropy on the labelled examples ("ce", terms.CrossEntropy) is added to every method whose loss has no
  label term of its own, as `python -m kdfast train` does (except defensive distillation, whose student learns
  soft labels only);
- a loss that needs a label for every example gets the teacher's prediction where the transfer set has none
  (UNLABELLED): the teacher labels the transfer set, as in model compression;
- methods without a teacher (online, self-distillation) train on the labelled examples only (repeated up to the
  split's size, so that their epochs have as many steps): their losses average cross-entropy over the batch, which
  a batch without labels would not have;
- two-stage methods (FitNets, AB) spend a quarter of the epochs in their first stage, so every recipe trains for
  the same number of epochs.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from ..methods import FEED, QuEST, ScoreMapDiscriminator, feature_vectors, kmeans_codebook, registry
from .data import UNLABELLED, Split
from .distiller import Distiller
from .schedules import Linear
from .terms import CrossEntropy, Term
from .trainer import Stage


@dataclass
class Setting:
    student: Callable[[], nn.Module]         # a fresh student network (zoo model or SegNet: features=True)
    train: Split                             # the training split (a transfer set may hold UNLABELLED targets)
    teachers: Sequence[nn.Module] = ()       # trained; the first is the teacher, all of them the ensemble
    epochs: int = 10
    lr: float = 0.05
    assistant: Callable[[], nn.Module] | None = None   # TAKD: a fresh assistant network
    fit: Callable[[Distiller, list, Split], None] | None = None   # trains a preliminary distiller (TAKD)
    stage_options: dict = field(default_factory=dict)  # more Stage keyword arguments (optimizer, ...)


@dataclass
class Recipe:
    name: str
    distiller: Distiller   # distiller.student is the network to evaluate (the deployed peer, leader or exit)
    stages: list
    train: Split


# --- terms around the registry's losses --------------------------------------------------------------------------

class MethodTerm(Term):
    """A registry loss as a trainer term: call(term, student logits, teacher logits, features, targets) -> scalar,
    where term.loss is the loss module and term.extra holds learned adapters of the recipe (both trained with the
    student)."""

    def __init__(self, loss: nn.Module, call, student_taps=(), teacher_taps=(), extra: nn.Module | None = None):
        super().__init__()
        self.loss, self.call, self.extra = loss, call, extra
        self.student_taps, self.teacher_taps = tuple(student_taps), tuple(teacher_taps)

    def forward(self, student, teacher, features, targets):
        return self.call(self, student, teacher, features, targets)


class AdversarialTerm(MethodTerm):
    """A MethodTerm whose loss trains an adversary (discriminator) by its own loss and optimiser (see
    Distiller.adversaries): adversary_call(term, *the last forward's arguments) is the adversary's loss."""

    def __init__(self, loss, call, adversary: nn.Module, adversary_call, optimizer: dict, **taps):
        super().__init__(loss, call, **taps)
        self.adversary, self.adversary_call, self.adversary_optimizer = adversary, adversary_call, optimizer
        self._last = None

    def forward(self, student, teacher, features, targets):
        self._last = (student, teacher, features, targets)
        return super().forward(student, teacher, features, targets)

    def adversary_loss(self):
        last, self._last = self._last, None  # release the step's tensors once used
        return self.adversary_call(self, *last)


def labelled_examples(split: Split) -> Split:
    """The labelled examples of a split, repeated up to its size: an epoch has as many steps as on the split."""
    index = torch.nonzero((split.targets != UNLABELLED).reshape(len(split), -1).any(1)).flatten()
    if len(index) == 0:
        raise ValueError("the split has no labelled example")
    return split.subset(index.repeat(-(-len(split) // len(index)))[:len(split)])


def labels(targets, teacher_logits):
    """targets with the teacher's predicted class where there is no label (UNLABELLED)."""
    return torch.where(targets == UNLABELLED, teacher_logits.argmax(1), targets)


# --- networks that several methods need --------------------------------------------------------------------------

class Ensemble(nn.Module):
    """Several teachers as one: forward -> the mean of their logits; features=True also gives "members" (K, B, C)
    stacked logits and "member_features" (each member's feature dict)."""

    feature_names = ("members", "member_features")

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x, features: bool = False):
        if not features:
            return torch.stack([m(x) for m in self.members]).mean(0)
        outs = [m(x, features=True) for m in self.members]
        members = torch.stack([o[0] for o in outs])
        return members.mean(0), {"members": members, "member_features": [o[1] for o in outs]}


class Peers(nn.Module):
    """Networks trained together (online distillation) as one student: forward -> the deployed network's logits
    (`deploy`: an index); features=True also gives "logits" (a list, one per network) and "features" (each one's
    feature dict)."""

    feature_names = ("logits", "features")

    def __init__(self, networks: Sequence[nn.Module], deploy: int = 0):
        super().__init__()
        self.networks, self.deploy = nn.ModuleList(networks), deploy

    def forward(self, x, features: bool = False):
        if not features:
            return self.networks[self.deploy](x)
        outs = [n(x, features=True) for n in self.networks]
        return outs[self.deploy][0], {"logits": [o[0] for o in outs], "features": [o[1] for o in outs]}


class MultiExit(nn.Module):
    """A zoo network with an exit after every stage (self-distillation): exit i = a 1x1 conv adapter to the last
    stage's channels, average-pooled to its size (the bottleneck that gives all exits' features one shape), then
    global pooling and a linear classifier; the deepest exit is the network's own head. forward -> the deepest
    exit's logits; features=True also "exit_logits" and "exit_features" (shallow to deep)."""

    feature_names = ("exit_logits", "exit_features")

    def __init__(self, network: nn.Module, sample: torch.Tensor):
        super().__init__()
        self.network, self.stages = network, stage_names(network)
        shapes = feature_shapes(network, sample)
        c, size = shapes[self.stages[-1]][1], shapes[self.stages[-1]][2:]
        classes = shapes["logits"][1]
        self.size = tuple(size)
        self.adapters = nn.ModuleList(nn.Sequential(nn.Conv2d(shapes[n][1], c, 1, bias=False), nn.BatchNorm2d(c),
                                                    nn.ReLU()) for n in self.stages[:-1])
        self.heads = nn.ModuleList(nn.Linear(c, classes) for _ in self.stages[:-1])

    def forward(self, x, features: bool = False):
        if not features:
            return self.network(x)
        logits, feats = self.network(x, features=True)
        exit_feats = [nn.functional.adaptive_avg_pool2d(a(feats[n]), self.size)
                      for a, n in zip(self.adapters, self.stages[:-1])]
        exit_logits = [h(f.mean((2, 3))) for h, f in zip(self.heads, exit_feats)]
        return logits, {"exit_logits": exit_logits + [logits],
                        "exit_features": exit_feats + [feats[self.stages[-1]]]}


def deployed(model: nn.Module) -> nn.Module:
    """The plain network inside a recipe's student (the deployed peer or leader, the multi-exit network)."""
    if isinstance(model, Peers):
        return model.networks[model.deploy]
    return model.network if isinstance(model, MultiExit) else model


def stage_names(model: nn.Module) -> list:
    """The stage outputs a zoo model returns ("stage1", "stage2", ...; SegNet: "features")."""
    names = [n for n in getattr(model, "feature_names", ()) if re.fullmatch(r"stage\d+", n)]
    return names or list(getattr(model, "feature_names", ()))


@torch.no_grad()
def feature_shapes(model: nn.Module, sample: torch.Tensor) -> dict:
    """{feature name: shape} and "logits" of model on a sample batch, in eval mode (BatchNorm statistics are left
    as they are)."""
    was_training = model.training
    model.eval()
    logits, feats = model(sample, features=True)
    model.train(was_training)
    return {"logits": tuple(logits.shape), **{n: tuple(f.shape) for n, f in feats.items()
                                              if isinstance(f, torch.Tensor)}}


# --- the recipes -------------------------------------------------------------------------------------------------

class _Builder:
    """What one recipe is being built from: the setting, a student, the method's overrides."""

    def __init__(self, name: str, setting: Setting, overrides: dict):
        self.name, self.setting, self.overrides = name, setting, overrides
        self.student = setting.student()
        self.sample = setting.train.normalize(setting.train.images[:4].float())
        self.stages = stage_names(self.student)

    def loss(self, **defaults):
        return registry.build(self.name, **{**defaults, **self.overrides})

    @property
    def teacher(self):
        if not self.setting.teachers:
            raise ValueError(f"method {self.name!r} needs a trained teacher (Setting.teachers is empty)")
        return self.setting.teachers[0]

    def channels(self, model, name):
        return feature_shapes(model, self.sample)[name][1]

    def stage(self, epochs, name=None, **kw):
        return Stage(epochs, name or self.name, lr=self.setting.lr, **{**self.setting.stage_options, **kw})

    def recipe(self, terms, *, student=None, teacher=None, stages=None, labelled_only=False, train_teacher=False):
        split = self.setting.train
        if labelled_only:
            split = labelled_examples(split)
        distiller = Distiller(student or self.student, teacher, terms, train_teacher=train_teacher)
        return Recipe(self.name, distiller, stages or [self.stage(self.setting.epochs)], split)

    def pretrain(self, network: nn.Module, terms: dict, what: str) -> nn.Module:
        """Trains `network` first (setting.fit), from the teacher by `terms`, for the setting's epochs on its
        split, in a stage named "<method> <what>"; returns it."""
        if self.setting.fit is None:
            raise ValueError(f"method {self.name!r} needs Setting.fit (it trains its {what} first)")
        stage = self.stage(self.setting.epochs, f"{self.name} {what}")
        self.setting.fit(Distiller(network, self.teacher, terms), [stage], self.setting.train)
        return network

    def two_stages(self, first: str, second: str, first_weight: float = 1.0):
        """A first stage (FitNets' hint, AB's initialisation) of a quarter of the epochs, then the second."""
        total = self.setting.epochs
        n1 = max(1, total // 4)
        return [self.stage(n1, first, weights={first: first_weight}),
                self.stage(max(1, total - n1), second, weights={second: 1.0})]


def _uses_target(loss) -> bool:
    return "target" in inspect.signature(loss.forward).parameters


def _response(b: _Builder):
    """Logit methods: loss(student, teacher[, labels]); ensembles read every teacher's logits."""
    loss = b.loss()
    ensemble = b.name.startswith("ensemble")
    teacher = Ensemble(b.setting.teachers) if ensemble else b.teacher
    taps = ("members",) if ensemble else ()

    def call(term, s, t, f, y):
        target = f.teacher["members"] if ensemble else t
        return term.loss(s, target, labels(y, t)) if _uses_target(term.loss) else term.loss(s, target)

    terms = {b.name: MethodTerm(loss, call, teacher_taps=taps)}
    return b.recipe(terms if _uses_target(loss) else {"ce": CrossEntropy(), **terms}, teacher=teacher)


def reinitialised(model: nn.Module) -> nn.Module:
    """A trainable copy of model with fresh parameters (every submodule's reset_parameters, from the global torch
    RNG)."""
    fresh = copy.deepcopy(model).requires_grad_(True).train()
    for m in fresh.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        if hasattr(m, "reset_running_stats"):
            m.reset_running_stats()
    return fresh


def _defensive(b: _Builder):
    """Papernot et al. 2016: a teacher of the given teacher's architecture is first trained from scratch at the
    loss's temperature T (setting.fit; hard labels, the given teacher's predictions where the transfer set has
    none), then the student learns that teacher's soft labels at T, and only them (as the paper; no cross-entropy
    term). Measured on digits (20 epochs, T = 5): a teacher trained at T = 1 gives soft labels too flat to teach
    (student at cross-entropy's 76%); with the T-trained teacher the student reaches 92%, but only 78% when
    cross-entropy on the labelled examples is added (it fits the few labels at T = 1 while the soft-label term's
    gradient is 1/T as large). Trained at T, logits must grow T-fold, which takes about T^2 as many steps: see
    SMALL_DATA for the paper's T = 20 in a short run."""
    loss = b.loss()
    at_t = MethodTerm(loss, lambda term, s, t, f, y: term.loss.teacher_loss(s, labels(y, t)))
    teacher = b.pretrain(reinitialised(b.teacher), {"defensive teacher": at_t}, "teacher")
    return b.recipe({"defensive": MethodTerm(loss, lambda term, s, t, f, y: term.loss(s, t))}, teacher=teacher)


def _kd_term(b: _Builder):
    """Hinton KD (registry "kd", its defaults) on teacher-labelled targets: the second part of feature methods."""
    return MethodTerm(registry.build("kd"), lambda term, s, t, f, y: term.loss(s, t, labels(y, t)))


def _fitnet(b: _Builder):
    guided = b.stages[len(b.stages) // 2]  # the middle stage, as FitNets' guided/hint layers
    loss = b.loss(student_channels=b.channels(b.student, guided), teacher_channels=b.channels(b.teacher, guided))
    hint = MethodTerm(loss, lambda term, s, t, f, y: term.loss(f.student[guided], f.teacher[guided]),
                      student_taps=[guided], teacher_taps=[guided])
    # The hint stage trains the layers below the guided one and the regressor: the layers above get no gradient.
    return b.recipe({"fitnet": hint, "kd": _kd_term(b)}, teacher=b.teacher, stages=b.two_stages("fitnet", "kd"))


def _ab(b: _Builder):
    pre = [n + ".pre" for n in b.stages]
    loss = b.loss(student_channels=[b.channels(b.student, n) for n in b.stages],
                  teacher_channels=[b.channels(b.teacher, n) for n in pre])
    ab = MethodTerm(loss, lambda term, s, t, f, y: term.loss([f.student[n] for n in b.stages],
                                                             [f.teacher[n] for n in pre]),
                    student_taps=b.stages, teacher_taps=pre)
    # AB's loss is a sum over positions and channels (hundreds at the start on digits, against KD's ~10): at weight 1
    # the initialisation stage's SGD steps blow the student's weights up and KD never recovers (65% accuracy on
    # digits, KD alone 97%); weight 1e-3 keeps the stage at the scale of the other losses.
    stages = b.two_stages("ab", "kd", first_weight=1e-3)
    return b.recipe({"ab": ab, "kd": _kd_term(b)}, teacher=b.teacher, stages=stages)


def _feature_plus_kd(b: _Builder):
    """AT (all stages), SP (last stage), RKD (pooled embedding): the method's term added to Hinton KD."""
    names = {"at": b.stages, "sp": b.stages[-1:], "rkd": ["pool"]}[b.name]
    loss = b.loss()

    def call(term, s, t, f, y):
        fs, ft = [f.student[n] for n in names], [f.teacher[n] for n in names]
        return term.loss(fs, ft) if b.name == "at" else term.loss(fs[0], ft[0])

    term = MethodTerm(loss, call, student_taps=names, teacher_taps=names)
    return b.recipe({"kd": _kd_term(b), b.name: term}, teacher=b.teacher)


def _gradient_at(b: _Builder):
    student, teacher = b.student, b.teacher
    # The loss runs both networks on the inputs itself (it needs d CE / d input of each), with the CE included.
    term = MethodTerm(b.loss(), lambda term, s, t, f, y: term.loss(student, teacher, f.inputs, labels(y, t))[0])
    return b.recipe({"gradient_at": term}, teacher=teacher)


def _dense(b: _Builder):
    """Liu et al. 2019 on segmentation score maps (pixel-wise, holistic) or encoder features (pair-wise)."""
    if b.name == "holistic":
        # The critic sees each score map with its image (Liu et al.'s D(Q | I)).
        critic = ScoreMapDiscriminator(b.channels(b.student, "logits") + b.sample.shape[1])
        loss = b.loss(discriminator=critic)
        # WGAN-GP's optimiser for the critic (Gulrajani et al. 2017): Adam, lr 1e-4, betas (0.5, 0.9).
        term = AdversarialTerm(loss, lambda term, s, t, f, y: term.loss.student_loss(s, f.inputs), critic,
                               lambda term, s, t, f, y: term.loss.discriminator_loss(s, t, f.inputs),
                               {"lr": 1e-4, "betas": (0.5, 0.9)})
    elif b.name == "pairwise":
        feat = b.stages[-1]
        term = MethodTerm(b.loss(), lambda term, s, t, f, y: term.loss(f.student[feat], f.teacher[feat]),
                          student_taps=[feat], teacher_taps=[feat])
    else:
        term = MethodTerm(b.loss(), lambda term, s, t, f, y: term.loss(s, t))
    return b.recipe({"ce": CrossEntropy(), b.name: term}, teacher=b.teacher)


def _manifold(b: _Builder):
    def call(term, s, t, f, y):
        return term.loss(s, t, labels(y, t), [f.student[n] for n in b.stages], [f.teacher[n] for n in b.stages])

    loss = b.loss(gammas=[2.0 ** (len(b.stages) - 1 - i) for i in range(len(b.stages))])  # shallow weighs more
    return b.recipe({"manifold": MethodTerm(loss, call, student_taps=b.stages, teacher_taps=b.stages)},
                    teacher=b.teacher)


def _quest(b: _Builder, words: int = 16, images: int = 256):
    """The codebook is fit first, on the teacher's last-stage features of (up to `images`) training images."""
    last, teacher = b.stages[-1], b.teacher
    x = b.setting.train.normalize(b.setting.train.images[:images].float())
    was_training = teacher.training
    teacher.eval()
    with torch.no_grad():
        vectors = feature_vectors(teacher(x, features=True)[1][last])
    teacher.train(was_training)
    codebook = kmeans_codebook(vectors, min(words, len(vectors)))
    loss = QuEST(b.channels(b.student, last), codebook, **b.overrides)
    term = MethodTerm(loss, lambda term, s, t, f, y: term.loss(f.student[last], f.teacher[last], s, labels(y, t)),
                      student_taps=[last], teacher_taps=[last])
    return b.recipe({"quest": term}, teacher=teacher)


def _internal(b: _Builder):
    """Hidden states = each stage's positions as tokens (B, H*W, C), the student's projected to the teacher's C."""
    def tokens(x):
        return x.flatten(2).mT

    project = nn.ModuleList(nn.Linear(b.channels(b.student, n), b.channels(b.teacher, n)) for n in b.stages)
    loss = b.loss(epochs_per_layer=max(1, b.setting.epochs // (len(b.stages) + 1)))

    def call(term, s, t, f, y):
        hs = [p(tokens(f.student[n])) for p, n in zip(term.extra, b.stages)]
        return term.loss(s, t, hs, [tokens(f.teacher[n]) for n in b.stages], int(f.epoch))

    term = MethodTerm(loss, call, student_taps=b.stages, teacher_taps=b.stages, extra=project)
    return b.recipe({"ce": CrossEntropy(), b.name: term}, teacher=b.teacher)


def _online(b: _Builder):
    """DML: two peers; OKDDip: three peers and a leader (deployed); AFD: two peers and a discriminator each."""
    if b.name == "dml":
        peers = Peers([b.student, b.setting.student()])
        term = MethodTerm(b.loss(), lambda term, s, t, f, y: term.loss(f.student["logits"], y),
                          student_taps=Peers.feature_names)
    elif b.name == "okddip":
        peers = Peers([b.student] + [b.setting.student() for _ in range(3)], deploy=3)
        # The paper ramps the peers' distillation up over 80 of 300 epochs: the same share of this run.
        loss = b.loss(feature_dim=b.channels(b.student, "pool"), rampup_length=max(1.0, b.setting.epochs * 80 / 300))

        def call(term, s, t, f, y):
            z = f.student["logits"]
            return term.loss([g["pool"] for g in f.student["features"][:-1]], z[:-1], z[-1], y, f.epoch)

        term = MethodTerm(loss, call, student_taps=Peers.feature_names)
    else:  # afd
        last = b.stages[-1]
        peers = Peers([b.student, b.setting.student()])
        loss = b.loss(channels=b.channels(b.student, last))
        def maps(f):
            return [g[last] for g in f.student["features"]]

        term = AdversarialTerm(loss, lambda term, s, t, f, y: term.loss.network_loss(maps(f), f.student["logits"], y),
                               loss.discriminators, lambda term, s, t, f, y: term.loss.discriminator_loss(maps(f)),
                               {"lr": 2e-4, "betas": (0.5, 0.999)}, student_taps=Peers.feature_names)
    return b.recipe({b.name: term}, student=peers, labelled_only=True)


def _self(b: _Builder):
    """BYOT / MSD on a MultiExit network, deployed at its deepest exit. On digits' cnn_tiny (8-16-32 channels, 50
    labels) they come out 0.02-0.04 below cross-entropy on the labelled examples: measured over 5 seeds, the exits
    alone (BYOT with kd_weight=0, feature_weight=0) cost as much (0.838 vs 0.859), so the cost is the shallow exits'
    cross-entropy pulling a tiny backbone, not the distillation; on cnn_small the gap is -0.004 (BYOT) and -0.017
    (MSD, whose deepest exit also learns from the weaker shallow ones)."""
    net = MultiExit(b.student, b.sample)
    epochs = b.setting.epochs
    if b.name == "byot":
        def call(term, s, t, f, y):
            return term.loss(f.student["exit_logits"], f.student["exit_features"], y)
    else:
        def call(term, s, t, f, y):
            return term.loss(f.student["exit_logits"], f.student["exit_features"], y, f.epoch, epochs)
    term = MethodTerm(b.loss(), call, student_taps=MultiExit.feature_names)
    return b.recipe({b.name: term}, student=net, labelled_only=True)


def _feed(b: _Builder):
    last = b.stages[-1]
    teachers = Ensemble(b.setting.teachers)
    loss = FEED(b.channels(b.student, last), [b.channels(t, last) for t in b.setting.teachers], **b.overrides)
    term = MethodTerm(loss, lambda term, s, t, f, y: term.loss(f.student[last],
                                                               [g[last] for g in f.teacher["member_features"]]),
                      student_taps=[last], teacher_taps=["member_features"])
    return b.recipe({"ce": CrossEntropy(), "feed": term}, teacher=teachers)


def _takd(b: _Builder):
    """The assistant is distilled from the teacher first (setting.fit), then the student from the assistant."""
    if b.setting.assistant is None:
        raise ValueError("method 'takd' needs Setting.assistant (a network factory)")
    def term():
        return MethodTerm(b.loss(), lambda term, s, t, f, y: term.loss(s, t, labels(y, t)))

    assistant = b.pretrain(b.setting.assistant(), {"takd": term()}, "assistant")
    return b.recipe({"takd": term()}, teacher=assistant)


def _end2(b: _Builder, start: float = 10.0):
    """The temperature is annealed from `start` to 1 over the first half of training, as EnD^2 does (a Dirichlet
    fit to near one-hot members at T = 1 from the start does not learn: measured on digits, 32% accuracy)."""
    temperature = Linear(start, 1.0, max(1.0, b.setting.epochs / 2))
    term = MethodTerm(b.loss(), lambda term, s, t, f, y: term.loss(s, f.teacher["members"], temperature(f.epoch)),
                      teacher_taps=["members"])
    return b.recipe({"ce": CrossEntropy(), "end2": term}, teacher=Ensemble(b.setting.teachers))


RECIPES = {
    **{n: _response for n in ("kd", "logit_matching", "noisy_teacher", "ensemble_arithmetic", "ensemble_geometric",
                              "gjsd", "conditional", "adaptive")},
    "defensive": _defensive, "fitnet": _fitnet, "at": _feature_plus_kd, "gradient_at": _gradient_at, "ab": _ab,
    "sp": _feature_plus_kd, "rkd": _feature_plus_kd,
    "pixelwise": _dense, "pairwise": _dense, "holistic": _dense,
    "manifold": _manifold,
    "quest": _quest, "internal": _internal, "internal_stacked": _internal,
    "dml": _online, "okddip": _online, "afd": _online,
    "byot": _self, "msd": _self,
    "feed": _feed, "takd": _takd, "end2": _end2,
}
assert set(RECIPES) == set(registry.METHODS), "every registry method has a recipe"

DENSE = tuple(n for n, m in registry.METHODS.items() if m.family == "dense")
NEEDS_ENSEMBLE = ("ensemble_arithmetic", "ensemble_geometric", "feed", "end2")
TEACHER_FREE = ("dml", "okddip", "afd", "byot", "msd")


# Loss options for kdfast's small data sets (digits, shapes) in short runs, which `python -m kdfast compare` and
# `python -m kdfast train` on digits or shapes pass (not with train's --paper-defaults); the losses themselves keep
# their papers' defaults. Each is where a paper's default does not train in a 20-epoch run (measured, 3 seeds):
# - AT: the paper's weight 1000 was tuned for CIFAR's 32x32 .. 8x8 maps; these mean-over-positions losses are far
#   larger on the digits' 8x8 .. 2x2 maps: beta 1000 / 100 / 10 give 56.0 / 93.8 / 97.9% (KD alone 97.5%), so 10.
# - pixel-wise KD: weight 10 (Liu et al., with lr 0.01) diverges on some seeds at this lr 0.05 (mIoU 0.53 or 0.80;
#   weight 1: 0.77-0.79).
# - defensive distillation: networks trained at temperature T need about T^2 as many steps to grow their logits
#   T-fold; in 20 epochs the paper's T = 20 teacher reaches 73% and its student 16% (T 10: 36%, 5: 92%, 2: 96.5%).
SMALL_DATA = {"at": {"beta": 10.0}, "pixelwise": {"weight": 1.0}, "defensive": {"temperature": 5.0}}


# Methods whose recipe is more than terms on the plain student and the first teacher in one stage (their own
# stages, teachers, students or training split): they run alone, not in a comma list.
ALONE = ("fitnet", "ab", "defensive", "takd", *NEEDS_ENSEMBLE, *TEACHER_FREE)


def compose_recipe(names, setting: Setting, overrides=None) -> Recipe:
    """One recipe of several registry methods: the terms of each method's recipe on one student and teacher, in
    one stage (a term two recipes share, such as the feature methods' KD, is taken once). overrides: {name:
    {option: value}}. Methods of ALONE cannot be composed."""
    names, overrides = list(dict.fromkeys(names)), overrides or {}
    if len(names) == 1:
        return build_recipe(names[0], setting, **overrides.get(names[0], {}))
    alone = [n for n in names if n in ALONE]
    if alone:
        raise ValueError(f"method(s) {', '.join(alone)} run alone (their own stages, teachers or students); "
                         f"composable: {', '.join(n for n in RECIPES if n not in ALONE)}")
    student = setting.student()
    shared = dataclasses.replace(setting, student=lambda: student)
    terms = {}
    for name in names:
        part = build_recipe(name, shared, **overrides.get(name, {})).distiller
        for term in part.term_names:
            terms.setdefault(term, (part.term(term), part.weights[term]))
    b = _Builder("+".join(names), shared, {})
    return b.recipe(terms, teacher=setting.teachers[0] if setting.teachers else None)


def build_recipe(name: str, setting: Setting, **overrides) -> Recipe:
    """The recipe of registry method `name` in `setting`; overrides go to the method's loss."""
    if name not in RECIPES:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(RECIPES))}")
    return RECIPES[name](_Builder(name, setting, overrides))
