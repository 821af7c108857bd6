"""The registry of method losses: name -> (loss factory with the paper's defaults, family, source). The trainer
builds recipes by name: build(name, **overrides) returns the loss module (constructor arguments without defaults,
such as channel counts, are passed as overrides)."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

from torch import nn

from . import dense, feature, manifold, online, others, response, selfdistill


@dataclass(frozen=True)
class Method:
    factory: Callable[..., nn.Module]
    family: str
    source: str


def _with(cls, **defaults):
    return functools.partial(cls, **defaults)


METHODS = {
    "kd": Method(response.HintonKD, "response", "Hinton, Vinyals & Dean 2015, arXiv:1503.02531"),
    "logit_matching": Method(response.LogitMatching, "response", "Ba & Caruana 2014, NeurIPS, arXiv:1312.6184"),
    "noisy_teacher": Method(response.NoisyTeacherKD, "response", "Sau & Balasubramanian 2016, arXiv:1610.09650"),
    "ensemble_arithmetic": Method(_with(response.EnsembleKD, mode="arithmetic"), "response",
                                  "Hinton et al. 2015 (ensembles); You et al. 2017, KDD"),
    "ensemble_geometric": Method(_with(response.EnsembleKD, mode="geometric"), "response",
                                 "Hinton et al. 2015 (ensembles); You et al. 2017, KDD"),
    "defensive": Method(response.DefensiveDistillation, "response", "Papernot et al. 2016, IEEE S&P, arXiv:1511.04508"),
    "gjsd": Method(response.GeneralizedJSD, "response", "Agarwal et al. 2024 (GKD), ICLR, arXiv:2306.13649"),
    "conditional": Method(response.ConditionalTeacherStudent, "response",
                          "Meng et al. 2019, ICASSP, arXiv:1904.12399"),
    "adaptive": Method(_with(response.ConditionalTeacherStudent, adaptive=True), "response",
                       "Meng et al. 2019, ICASSP, arXiv:1904.12399 (adaptive weighting)"),
    "fitnet": Method(feature.FitNetHint, "feature", "Romero et al. 2015, ICLR, arXiv:1412.6550"),
    "at": Method(feature.AttentionTransferKD, "feature", "Zagoruyko & Komodakis 2017, ICLR, arXiv:1612.03928"),
    "gradient_at": Method(feature.GradientAttentionTransfer, "feature",
                          "Zagoruyko & Komodakis 2017, ICLR, arXiv:1612.03928 (gradient-based)"),
    "ab": Method(feature.ActivationBoundaries, "feature", "Heo et al. 2019, AAAI, arXiv:1811.03233"),
    "sp": Method(feature.SimilarityPreservingKD, "feature", "Tung & Mori 2019, ICCV, arXiv:1907.09682"),
    "rkd": Method(feature.RelationalKD, "feature", "Park et al. 2019, CVPR, arXiv:1904.05068"),
    "pixelwise": Method(dense.PixelwiseKD, "dense", "Liu et al. 2019, CVPR, arXiv:1903.04197 (pixel-wise)"),
    "pairwise": Method(dense.PairwiseKD, "dense", "Liu et al. 2019, CVPR, arXiv:1903.04197 (pair-wise)"),
    "holistic": Method(dense.HolisticKD, "dense", "Liu et al. 2019, CVPR, arXiv:1903.04197 (holistic, WGAN-GP)"),
    "manifold": Method(manifold.NeuronManifoldKD, "manifold",
                       "Tao, Xia & Li 2021 (neuron manifold distillation for edge deep learning); kdfast's "
                       "formulation, no public code"),
    "quest": Method(others.QuEST, "other", "Jain et al. 2020 (QuEST: quantized embedding space), ECCV"),
    "internal": Method(others.InternalRepresentationKD, "other",
                       "Aguilar et al. 2020, AAAI (KD from internal representations)"),
    "internal_stacked": Method(_with(others.InternalRepresentationKD, schedule="stacked"), "other",
                               "Aguilar et al. 2020, AAAI (stacked schedule)"),
    "dml": Method(online.DeepMutualLearning, "online", "Zhang et al. 2018, CVPR, arXiv:1706.00384"),
    "okddip": Method(online.OKDDip, "online", "Chen et al. 2020, AAAI, arXiv:1912.00350"),
    "afd": Method(online.OnlineAdversarialFD, "online",
                  "Chung et al. 2020 (online adversarial feature-map distillation), ICML"),
    "byot": Method(selfdistill.BeYourOwnTeacher, "self", "Zhang et al. 2019, ICCV, arXiv:1905.08094"),
    "msd": Method(selfdistill.MSDSelfDistillation, "self", "Luan et al. 2019 (MSD: multi-self-distillation)"),
    "feed": Method(others.FEED, "other", "Park & Kwak 2019 (FEED: feature-level ensemble)"),
    "takd": Method(others.TeacherAssistantKD, "other", "Mirzadeh et al. 2020, AAAI, arXiv:1902.03393"),
    "end2": Method(others.EnsembleDistributionDistillation, "other", "Malinin et al. 2020, ICLR, arXiv:1905.00076"),
}


def build(name: str, **overrides) -> nn.Module:
    """The loss module of method `name` with its defaults, updated by overrides."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name].factory(**overrides)
