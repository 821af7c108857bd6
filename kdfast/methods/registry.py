"""The registry of method losses: name -> (loss factory with the paper's defaults, family, source). The trainer
builds recipes by name: build(name, **overrides) returns the loss module (constructor arguments without defaults,
such as channel counts, are passed as overrides)."""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Callable, Mapping

from torch import nn

from . import dense, feature, manifold, online, others, response, selfdistill


@dataclass(frozen=True)
class Method:
    """A method of the literature: its loss module's factory (the paper's defaults), family and source, and its
    options: {keyword argument of the factory: help}, the numbers a user may set (build's overrides,
    `python -m kdfast train --option NAME=VALUE`); their defaults are the factory's."""
    factory: Callable[..., nn.Module]
    family: str
    source: str
    options: Mapping[str, str] = field(default_factory=dict)

    def defaults(self) -> dict:
        """{option: default} (from the factory's signature)."""
        parameters = inspect.signature(self.factory).parameters
        return {name: parameters[name].default for name in self.options}


def _with(cls, **defaults):
    return functools.partial(cls, **defaults)


_T = {"temperature": "softmax temperature T"}
_KD_OPTIONS = {"temperature": "softmax temperature T (the KD term is scaled by T^2)",
               "alpha": "weight of the KD term; 1 - alpha weighs cross-entropy"}
_SELF = {**_T, "kd_weight": "weight of the exits' KD terms", "feature_weight": "weight of the feature hints"}

METHODS = {
    "kd": Method(response.HintonKD, "response", "Hinton, Vinyals & Dean 2015, arXiv:1503.02531", _KD_OPTIONS),
    "logit_matching": Method(response.LogitMatching, "response", "Ba & Caruana 2014, NeurIPS, arXiv:1312.6184"),
    "noisy_teacher": Method(response.NoisyTeacherKD, "response", "Sau & Balasubramanian 2016, arXiv:1610.09650",
                            {**_KD_OPTIONS, "noise_std": "standard deviation of the noise added to teacher logits"}),
    "ensemble_arithmetic": Method(_with(response.EnsembleKD, mode="arithmetic"), "response",
                                  "Hinton et al. 2015 (ensembles); You et al. 2017, KDD", _KD_OPTIONS),
    "ensemble_geometric": Method(_with(response.EnsembleKD, mode="geometric"), "response",
                                 "Hinton et al. 2015 (ensembles); You et al. 2017, KDD", _KD_OPTIONS),
    "defensive": Method(response.DefensiveDistillation, "response", "Papernot et al. 2016, IEEE S&P, arXiv:1511.04508",
                        {"temperature": "temperature T at which the teacher and then the student are trained"}),
    "gjsd": Method(response.GeneralizedJSD, "response", "Agarwal et al. 2024 (GKD), ICLR, arXiv:2306.13649",
                   {"beta": "mixture weight in [0, 1] (0: forward KL, 1: reverse KL)", **_T}),
    "conditional": Method(response.ConditionalTeacherStudent, "response",
                          "Meng et al. 2019, ICASSP, arXiv:1904.12399", _T),
    "adaptive": Method(_with(response.ConditionalTeacherStudent, adaptive=True), "response",
                       "Meng et al. 2019, ICASSP, arXiv:1904.12399 (adaptive weighting)", _T),
    "fitnet": Method(feature.FitNetHint, "feature", "Romero et al. 2015, ICLR, arXiv:1412.6550",
                     {"kernel_size": "the regressor's convolution size (1 or 3)"}),
    "at": Method(feature.AttentionTransferKD, "feature", "Zagoruyko & Komodakis 2017, ICLR, arXiv:1612.03928",
                 {"p": "exponent of |activation| in the attention map", "beta": "weight of the AT term"}),
    "gradient_at": Method(feature.GradientAttentionTransfer, "feature",
                          "Zagoruyko & Komodakis 2017, ICLR, arXiv:1612.03928 (gradient-based)",
                          {"beta": "weight of the input-gradient distance"}),
    "ab": Method(feature.ActivationBoundaries, "feature", "Heo et al. 2019, AAAI, arXiv:1811.03233",
                 {"margin": "margin m of the activation-boundary loss"}),
    "sp": Method(feature.SimilarityPreservingKD, "feature", "Tung & Mori 2019, ICCV, arXiv:1907.09682",
                 {"gamma": "weight of the SP term"}),
    "rkd": Method(feature.RelationalKD, "feature", "Park et al. 2019, CVPR, arXiv:1904.05068",
                  {"w_dist": "weight of the distance term", "w_angle": "weight of the angle term"}),
    "pixelwise": Method(dense.PixelwiseKD, "dense", "Liu et al. 2019, CVPR, arXiv:1903.04197 (pixel-wise)",
                        {"weight": "weight of the pixel-wise KL", **_T}),
    "pairwise": Method(dense.PairwiseKD, "dense", "Liu et al. 2019, CVPR, arXiv:1903.04197 (pair-wise)",
                       {"weight": "weight of the pair-wise term", "pool_scale": "node patch side / feature side"}),
    "holistic": Method(dense.HolisticKD, "dense", "Liu et al. 2019, CVPR, arXiv:1903.04197 (holistic, WGAN-GP)",
                       {"adv_weight": "weight of the adversarial term", "gp_weight": "gradient-penalty weight"}),
    "manifold": Method(manifold.NeuronManifoldKD, "manifold",
                       "Tao, Xia & Li 2021 (neuron manifold distillation for edge deep learning); kdfast's "
                       "formulation, no public code",
                       {"rank": "manifold rank (SVD coordinates compared)", "alpha": "weight of cross-entropy",
                        "beta": "weight of the KD term", "temperature": "softmax temperature T of the KD term"}),
    "quest": Method(others.QuEST, "other", "Jain et al. 2020 (QuEST: quantized embedding space), ECCV",
                    {"tau": "temperature of the soft assignment to codewords"}),
    "internal": Method(others.InternalRepresentationKD, "other",
                       "Aguilar et al. 2020, AAAI (KD from internal representations)", _T),
    "internal_stacked": Method(_with(others.InternalRepresentationKD, schedule="stacked"), "other",
                               "Aguilar et al. 2020, AAAI (stacked schedule)", _T),
    "dml": Method(online.DeepMutualLearning, "online", "Zhang et al. 2018, CVPR, arXiv:1706.00384", _T),
    "okddip": Method(online.OKDDip, "online", "Chen et al. 2020, AAAI, arXiv:1912.00350",
                     {**_T, "alpha": "weight of the peers' distillation terms"}),
    "afd": Method(online.OnlineAdversarialFD, "online",
                  "Chung et al. 2020 (online adversarial feature-map distillation), ICML",
                  {**_T, "adv_weight": "weight of the adversarial feature-map term"}),
    "byot": Method(selfdistill.BeYourOwnTeacher, "self", "Zhang et al. 2019, ICCV, arXiv:1905.08094", _SELF),
    "msd": Method(selfdistill.MSDSelfDistillation, "self", "Luan et al. 2019 (MSD: multi-self-distillation)", _SELF),
    "feed": Method(others.FEED, "other", "Park & Kwak 2019 (FEED: feature-level ensemble)",
                   {"weight": "weight of the feature-ensemble term"}),
    "takd": Method(others.TeacherAssistantKD, "other", "Mirzadeh et al. 2020, AAAI, arXiv:1902.03393",
                   {**_T, "lam": "weight of the KD term against cross-entropy"}),
    "end2": Method(others.EnsembleDistributionDistillation, "other", "Malinin et al. 2020, ICLR, arXiv:1905.00076",
                   {"smoothing": "label smoothing of the ensemble members' probabilities"}),
}


def build(name: str, **overrides) -> nn.Module:
    """The loss module of method `name` with its defaults, updated by overrides."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name].factory(**overrides)
