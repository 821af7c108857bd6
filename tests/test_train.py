"""The trainer: schedules, loss terms, feature taps, stages, checkpoint/resume, atomic writes, AMP, clipping,
the model zoo and the data path."""
import math
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kdfast
import kdfast.train
from kdfast.train import (
    KD,
    UNLABELLED,
    Constant,
    Cosine,
    CrossEntropy,
    Distiller,
    Features,
    FeatureTerm,
    Hint,
    Linear,
    Loader,
    LogitTerm,
    MutualLearning,
    Split,
    Stage,
    StageWise,
    Trainer,
    build_model,
    load_cifar,
    load_dataset,
    seed_everything,
)
from kdfast.train import checkpoint as ckpt
from kdfast.train.data import labelled_fraction, load_shapes, make_shapes, random_crop_flip
from kdfast.train.models import MODELS, SmallCNN
from kdfast.train.schedules import lr_schedule


def tiny_split(n=48, seed=0, unlabelled=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.5 + y.view(-1, 1, 1, 1) * 0.1  # learnable: brightness ~ class
    y[:unlabelled] = UNLABELLED
    return Split(x, y)


def pair(seed=0, norm=True):
    seed_everything(seed)
    return SmallCNN((4, 8, 8), norm=norm), SmallCNN((8, 8, 16), norm=norm)


def quiet(**kw):
    return dict(progress=False, batch_size=16, **kw)


# --- schedules ---

def test_schedules_values():
    assert Constant(2.5)(0) == Constant(2.5)(99) == 2.5
    lin = Linear(0.0, 1.0, epochs=4, begin=2)
    assert [lin(e) for e in (0, 2, 3, 6, 10)] == [0.0, 0.0, 0.25, 1.0, 1.0]
    cos = Cosine(1.0, 0.0, epochs=10)
    assert cos(0) == 1.0 and abs(cos(5) - 0.5) < 1e-12 and abs(cos(10)) < 1e-12 and cos(20) == 0.0
    assert abs(cos(2.5) - 0.5 * (1 + math.cos(math.pi / 4))) < 1e-12
    step = StageWise([3, 6], [1.0, 0.1, 0.01])
    assert [step(e) for e in (0, 2.99, 3, 5, 6, 100)] == [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    assert lr_schedule("step", 8)(6) == 0.01 and lr_schedule("constant", 8)(7) == 1.0
    warm = lr_schedule("cosine", 10, warmup=2)
    assert warm(0) == 0.0 and warm(1) == 0.5 and warm(2) == 1.0 and abs(warm(10)) < 1e-12


@pytest.mark.parametrize("make", [lambda: Linear(0, 1, epochs=0), lambda: StageWise([1], [1.0]),
                                  lambda: StageWise([3, 2], [1, 2, 3]), lambda: Constant(float("nan")),
                                  lambda: lr_schedule("exp", 3)])
def test_schedule_errors(make):
    with pytest.raises(ValueError):
        make()


# --- loss terms ---

def batch(b=6, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(b, classes, generator=g, requires_grad=True), torch.randn(b, classes, generator=g)
    feats = Features({f"stage{i}": torch.randn(b, 4 * i, 8 // i, 8 // i, generator=g, requires_grad=True)
                      for i in (1, 2, 3)},
                     {f"stage{i}": torch.randn(b, 8 * i, 8 // i, 8 // i, generator=g) for i in (1, 2, 3)})
    y = torch.randint(0, classes, (b,), generator=g)
    return s, t, feats, y


def test_cross_entropy_ignores_unlabelled_and_is_zero_without_labels():
    s, t, f, y = batch()
    y[:2] = UNLABELLED
    torch.testing.assert_close(CrossEntropy()(s, t, f, y), F.cross_entropy(s[2:], y[2:]))
    none = CrossEntropy()(s, t, f, torch.full_like(y, UNLABELLED))
    none.backward()
    assert none.item() == 0.0 and torch.count_nonzero(s.grad) == 0


def test_kd_terms_are_kdfast_modules():
    s, t, f, y = batch()
    torch.testing.assert_close(KD(3.0)(s, t, f, y), kdfast.kd_div(s, t, 3.0))
    assert isinstance(KD().loss, kdfast.KDDiv)
    y[0] = UNLABELLED
    term = LogitTerm(kdfast.KDLoss(2.0, 0.7), targets=True)
    torch.testing.assert_close(term(s, t, f, y), kdfast.kd_loss(s, t, y, 2.0, 0.7))


FEATURE_TERMS = [  # (term, the same value from the op directly)
    (lambda: FeatureTerm(kdfast.AttentionTransfer(2.0, pool="mean"), ("stage1", ("stage2", "stage2"))),
     lambda s, t: kdfast.attention_transfer_loss(s, t, 2.0, pool="mean")),
    (lambda: FeatureTerm(kdfast.ManifoldDistillation(3, weights=[2.0, 1.0]), ("stage1", "stage2")),
     lambda s, t: kdfast.manifold_distillation_loss(s, t, 3, weights=[2.0, 1.0])),
    (lambda: FeatureTerm(kdfast.PairwiseAffinity(pool_size=2), ("stage2", "stage3"), per_pair=True),
     lambda s, t: sum(kdfast.pairwise_affinity_loss(a, b, pool_size=2) for a, b in zip(s, t))),
    (lambda: FeatureTerm(kdfast.SimilarityPreserving(), ("stage3",), per_pair=True),
     lambda s, t: kdfast.similarity_preserving_loss(s[0], t[0])),
]


@pytest.mark.parametrize("make,expected", FEATURE_TERMS, ids=["at", "manifold", "pairwise", "sp"])
def test_feature_terms_are_the_ops_on_named_layers(make, expected):
    s, t, f, y = batch()
    term = make()
    value = term(s, t, f, y)
    names = [p[0] for p in term.pairs]
    torch.testing.assert_close(value, expected([f.student[n] for n in names], [f.teacher[n] for n in names]))
    assert value.ndim == 0 and torch.isfinite(value)
    value.backward()
    assert all(f.student[n].grad is not None for n in names)


def test_deprecated_trainer_copies_build_terms_around_the_op_modules():
    s, t, f, y = batch()
    cases = [("AttentionTransfer", (("stage1", "stage2"),), kdfast.AttentionTransfer),
             ("PairwiseAffinity", (("stage2",),), kdfast.PairwiseAffinity),
             ("ManifoldDistillation", (("stage1",), 3), kdfast.ManifoldDistillation),
             ("KDLoss", (2.0, 0.7), kdfast.KDLoss)]
    for name, args, op_class in cases:
        with pytest.warns(DeprecationWarning, match=f"kdfast.train.{name} is deprecated"):
            term = getattr(kdfast.train, name)(*args)
        assert type(term.loss) is op_class
        assert torch.isfinite(term(s, t, f, y))
    with pytest.raises(AttributeError):
        kdfast.train.NoSuchTerm  # noqa: B018


def test_layer_pair_errors():
    with pytest.raises(ValueError, match="at least one"):
        FeatureTerm(kdfast.AttentionTransfer(), ())
    with pytest.raises(ValueError, match="pairs"):
        FeatureTerm(kdfast.AttentionTransfer(), [("a", "b", "c")])


def test_hint_and_mutual_learning_gradients():
    s, t, f, y = batch()
    hint = Hint("stage2", "stage2", 8, 16)
    hint(s, t, f, y).backward()
    assert hint.regressor[0].weight.grad is not None and f.student["stage2"].grad is not None
    t = t.clone().requires_grad_(True)
    MutualLearning()(s, t, f, y).backward()
    assert s.grad is not None and t.grad is not None


# --- distiller: taps, frozen teacher ---

def test_taps_by_returned_feature_and_by_module_path():
    student, teacher = pair()
    seen = {}

    def probe(s, t, f, y):
        seen.update(student=dict(f.student), teacher=dict(f.teacher))
        return s.sum() * 0

    d = Distiller(student, teacher, {"probe": probe}, student_taps=["stage2", "stages.0.blocks.0.conv"],
                  teacher_taps=["stage3.pre", "fc"])
    x = torch.randn(3, 1, 8, 8)
    d.eval()
    out = d(x, torch.zeros(3, dtype=torch.long))
    logits, feats = student(x, features=True)
    torch.testing.assert_close(seen["student"]["stage2"], feats["stage2"])
    torch.testing.assert_close(seen["student"]["stages.0.blocks.0.conv"], student.stages[0].blocks[0].conv(x))
    t_logits, t_feats = teacher(x, features=True)
    torch.testing.assert_close(seen["teacher"]["stage3.pre"], t_feats["stage3.pre"])
    torch.testing.assert_close(seen["teacher"]["fc"], t_logits)
    torch.testing.assert_close(out.student_logits, logits)
    with pytest.raises(ValueError, match="no feature or module named 'nope'"):
        Distiller(student, teacher, {"probe": probe}, student_taps=["nope"])
    with pytest.raises(ValueError, match="no teacher"):
        Distiller(student, None, {"at": FeatureTerm(kdfast.AttentionTransfer(), ("stage1",))})


def test_teacher_is_frozen_and_stays_in_eval_mode():
    student, teacher = pair()
    d = Distiller(student, teacher, {"ce": CrossEntropy(), "kd": (KD(), 0.5)})
    d.train()
    assert student.training and not teacher.training
    out = d(torch.randn(4, 1, 8, 8), torch.arange(4))
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters()) and student.fc.weight.grad is not None
    expected = out.parts["ce"] + 0.5 * out.parts["kd"]
    torch.testing.assert_close(out.loss.detach(), expected)


def test_online_distillation_trains_both():
    student, teacher = pair()
    d = Distiller(student, teacher, {"dml": MutualLearning()}, train_teacher=True)
    d.train()
    assert teacher.training
    d(torch.randn(4, 1, 8, 8), torch.arange(4)).loss.backward()
    assert teacher.fc.weight.grad is not None and student.fc.weight.grad is not None


def test_weights_follow_schedules_and_stage_overrides():
    student, teacher = pair()
    d = Distiller(student, teacher, {"ce": CrossEntropy(), "kd": (KD(), Linear(0.0, 1.0, epochs=4))})
    assert d.weights_at(2.0) == {"ce": 1.0, "kd": 0.5}
    assert d.weights_at(1.0, {"kd": Cosine(1.0, 0.0, 2)}) == {"kd": 0.5}
    with pytest.raises(ValueError, match="unknown term"):
        d.weights_at(0.0, {"at": 1.0})


# --- models ---

@pytest.mark.parametrize("name", ["resnet8", "resnet8x4", "wrn_16_2", "cnn_tiny"])
def test_zoo_features_before_and_after_the_final_activation(name):
    seed_everything(0)
    digits = name.startswith("cnn")
    model = build_model(name, 7, 1 if digits else 3).eval()
    x = torch.randn(2, 1 if digits else 3, 8 if digits else 16, 8 if digits else 16)
    logits, feats = model(x, features=True)
    assert list(feats) == list(model.feature_names) and logits.shape == (2, 7)
    torch.testing.assert_close(model(x), logits)
    for i in (1, 2):
        torch.testing.assert_close(feats[f"stage{i}"], F.relu(feats[f"stage{i}.pre"]))
    last = feats["stage3"]
    assert (last >= 0).all() and feats["pool"].shape == (2, last.shape[1])


def test_zoo_depths_and_errors():
    assert len(build_model("resnet110").stages[0].blocks) == 18 and len(build_model("wrn_40_2").stages[2].blocks) == 6
    assert build_model("resnet32x4").fc.in_features == 256
    assert {"resnet14", "resnet20", "resnet32", "resnet44", "resnet56"} <= set(MODELS)
    with pytest.raises(ValueError, match="unknown model 'resnet9'"):
        build_model("resnet9")


def test_zoo_segmentation_pair():
    teacher, student = build_model("segnet", 5, 1), build_model("segnet_small", 5, 1)
    x = torch.randn(2, 1, 12, 12)
    logits, feats = teacher(x, features=True)
    assert logits.shape == student(x).shape == (2, 5, 12, 12) and list(feats) == list(teacher.feature_names)
    assert feats["features"].shape == (2, 64, 6, 6) and student(x, features=True)[1]["features"].shape[1] == 16


# --- data ---

def test_crop_flip_augmentation():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    torch.testing.assert_close(random_crop_flip(x, g, padding=0, flip=False), x)
    out = random_crop_flip(x, g, padding=2, flip=True)
    assert out.shape == x.shape
    for img, src in zip(out, x):  # each output is a shifted window of the zero-padded image, maybe mirrored
        padded = F.pad(src, (2,) * 4)
        windows = [padded[:, i:i + 4, j:j + 4] for i in range(5) for j in range(5)]
        assert any(torch.equal(img, w) or torch.equal(img, w.flip(-1)) for w in windows)


def test_loader_is_seeded_and_shards_the_global_batch():
    split = tiny_split(40)
    a = list(Loader(split, 8, shuffle=True, augment="shift", seed=3))
    b = list(Loader(split, 8, shuffle=True, augment="shift", seed=3))
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    shards = [list(Loader(split, 8, shuffle=True, augment="shift", seed=3, rank=r, world_size=2)) for r in (0, 1)]
    for (x, y), (x0, y0), (x1, y1) in zip(a, *shards):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    with pytest.raises(ValueError, match="multiple of the world size"):
        Loader(split, 7, world_size=2)


def test_cifar_from_a_local_pickle_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 9]}, fh)
    data = load_cifar("cifar10", tmp_path)
    assert data.train.images.shape == (20, 3, 32, 32) and data.test.targets.tolist() == [0, 1, 2, 9]
    x, y = next(iter(Loader(data.test, 4)))
    mean, std = torch.tensor(data.test.mean).view(3, 1, 1), torch.tensor(data.test.std).view(3, 1, 1)
    torch.testing.assert_close(x, (data.test.images.float() / 255 - mean) / std)
    assert data.num_classes == 10 and data.augment == "crop_flip"
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        load_cifar("cifar100", tmp_path)


def test_shapes_split_and_labelled_fraction():
    data = load_shapes(10, 4, 12, seed=3)
    x, y = make_shapes(14, 12, seed=3)  # one draw, the first images for training
    assert torch.equal(data.train.images, x[:10]) and torch.equal(data.test.targets, y[10:])
    assert data.dense and data.num_classes == 4 and data.in_channels == 3 and data.augment == "none"
    assert data.train.targets.dtype == torch.int64 and data.train.targets.shape == (10, 12, 12)
    assert load_dataset("shapes").train.images.shape == (512, 3, 24, 24) and not load_dataset("digits").dense
    few = labelled_fraction(data.train, 0.25)  # round(2.5) = 2 images keep their labels
    assert torch.equal(few.targets[:2], data.train.targets[:2]) and (few.targets[2:] == UNLABELLED).all()
    assert few.images is data.train.images
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\], got 0"):
        labelled_fraction(data.train, 0)
    with pytest.raises(ValueError, match="digits has no size options"):
        load_dataset("digits", size=8)


# --- trainer: stages, resume, atomic checkpoints, AMP, clipping ---

class _LabelMaps(torch.nn.Module):
    """Per-pixel logits that predict the class stored in the input image (confidently)."""

    def forward(self, x):
        return 10.0 * F.one_hot(x[:, 0].long(), 3).movedim(-1, 1).float()


def test_dense_evaluation_over_the_labelled_pixels():
    predicted = torch.tensor([[[0, 1], [1, 2]], [[0, 0], [2, 2]]])
    targets = torch.tensor([[[0, 1], [2, 2]], [[0, UNLABELLED], [2, 1]]])
    split = Split(predicted.unsqueeze(1).float(), targets)
    trainer = Trainer(Distiller(_LabelMaps()), split, [Stage(1)], **quiet(holdout=split))
    report = trainer.evaluate(split, calibrate=False)
    # 5 of the 7 labelled pixels right; IoU of class 0: 2/2, class 1: 1/3, class 2: 2/4 (the unlabelled pixel,
    # predicted 0, counts nowhere).
    assert report["pixel_accuracy"] == pytest.approx(5 / 7) and report["miou"] == pytest.approx((1 + 1 / 3 + 0.5) / 3)
    confidence = 1 / (1 + 2 * math.exp(-10))
    assert report["ece"] == pytest.approx(confidence - 5 / 7) and report["coverage"] == 1.0
    # Temperature scaling on the held-out pixels (here the same 7): softer, so better calibrated.
    calibrated = trainer.evaluate(split)
    assert calibrated["temperature"] > 1 and calibrated["ece_calibrated"] < calibrated["ece"] == report["ece"]

def test_hint_stage_then_kd_stage():
    student, teacher = pair()
    hint = Hint("stage1", "stage1", 4, 8)
    d = Distiller(student, teacher, {"ce": CrossEntropy(), "kd": KD(), "hint": hint})
    before = {k: v.clone() for k, v in d.state_dict().items()}
    stages = [Stage(1, "hint", weights={"hint": 1.0}, trainable=("student.stages.0", "terms.hint")),
              Stage(1, "kd", weights={"ce": 1.0, "kd": 1.0})]
    trainer = Trainer(d, tiny_split(), stages, **quiet())
    trainer.fit(stop_after=1)
    after = d.state_dict()
    changed = {k for k, v in after.items() if k.endswith("weight") and not torch.equal(v, before[k])}
    assert changed == {"student.stages.0.blocks.0.conv.weight", "student.stages.0.blocks.0.bn.weight",
                       "terms.hint.regressor.0.weight", "terms.hint.regressor.1.weight"}
    history = trainer.fit()
    assert [h["stage"] for h in history] == ["hint", "kd"] and set(history[1]["train"]) == {"loss", "ce", "kd"}
    assert not torch.equal(after["student.fc.weight"], before["student.fc.weight"])
    assert torch.equal(after["terms.hint.regressor.0.weight"], d.state_dict()["terms.hint.regressor.0.weight"])
    assert all(torch.equal(v, before[k]) for k, v in d.state_dict().items() if k.startswith("teacher."))


def _resume_run(out_dir, stop_after, seed):
    student, teacher = pair(seed)  # a different initialisation each call: the checkpoint must restore it
    d = Distiller(student, teacher, {"ce": CrossEntropy(), "kd": (KD(), Linear(0.0, 1.0, epochs=2))})
    stages = [Stage(2, "a", lr=0.05), Stage(2, "b", lr=0.02, optimizer="adamw", lr_schedule="step")]
    trainer = Trainer(d, tiny_split(40, unlabelled=10), stages, tiny_split(16, seed=1),
                      **quiet(out_dir=str(out_dir), resume=True, augment="shift", seed=5))
    return d, trainer.fit(stop_after=stop_after)


def _strip_times(history):
    return [{k: v for k, v in h.items() if k != "time_s"} for h in history]


@pytest.mark.parametrize("interrupt_at", [1, 2, 3])
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path, interrupt_at):
    straight, h_straight = _resume_run(tmp_path / "straight", None, seed=0)
    _resume_run(tmp_path / "resumed", interrupt_at, seed=0)
    resumed, h_resumed = _resume_run(tmp_path / "resumed", None, seed=1)
    assert len(h_resumed) == 4
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert _strip_times(h_resumed) == _strip_times(h_straight)
    lines = (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()
    assert len(lines) == 4 and '"stage": "b"' in lines[-1]


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    ckpt.save_checkpoint({"step": 1}, path)

    def torn_save(obj, fh):
        fh.write(b"half a checkpoint")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(ckpt.torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert ckpt.load_tensors(path) == {"step": 1} and os.listdir(tmp_path) == ["checkpoint.pt"]
    ckpt.save_checkpoint({"step": 3}, path)
    assert ckpt.load_tensors(path) == {"step": 3}


def test_resume_refuses_another_seed(tmp_path):
    student, teacher = pair()
    Trainer(Distiller(student), tiny_split(), [Stage(1)], **quiet(out_dir=str(tmp_path))).fit()
    with pytest.raises(ValueError, match="seed"):
        Trainer(Distiller(student), tiny_split(), [Stage(1)], **quiet(out_dir=str(tmp_path), resume=True, seed=1))


@pytest.mark.parametrize("amp,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_on_cpu(amp, dtype):
    student, teacher = pair()
    dtypes = []
    d = Distiller(student, teacher, {"ce": CrossEntropy(), "kd": KD(),
                                     "probe": (lambda s, t, f, y: dtypes.append((s.dtype, t.dtype)) or s.sum() * 0,
                                               1.0)})
    before = student.fc.weight.clone()
    trainer = Trainer(d, tiny_split(), [Stage(1)], tiny_split(16, seed=1), **quiet(amp=amp))
    history = trainer.fit()
    assert dtypes and all(dt == (dtype, dtype) for dt in dtypes)
    assert student.fc.weight.dtype == torch.float32 and not torch.equal(student.fc.weight, before)
    assert math.isfinite(history[0]["train"]["loss"]) and 0 <= history[0]["test"]["accuracy"] <= 1
    assert trainer.predict(tiny_split(4)).dtype == torch.float32


def test_gradient_clipping_bounds_the_step():
    seed_everything(0)
    model = SmallCNN((4, 8, 8))
    before = [p.detach().clone() for p in model.parameters()]
    stage = Stage(1, lr=1.0, lr_schedule="constant", momentum=0.0, weight_decay=0.0, nesterov=False)
    Trainer(Distiller(model), tiny_split(16), [stage], **quiet(grad_clip=1e-3)).fit()
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert 0 < step.norm() <= 1e-3 * (1 + 1e-4)


@pytest.mark.parametrize("kwargs,match", [({"amp": "int8"}, "amp"), ({"grad_clip": 0.0}, "grad_clip"),
                                          ({"augment": "rotate"}, "augment")])
def test_trainer_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Trainer(Distiller(pair()[0]), tiny_split(), [Stage(1)], **quiet(**kwargs))


@pytest.mark.parametrize("stage,match", [(Stage(1, weights={"kd": 1.0}), "unknown term"),
                                         (Stage(1, trainable=("student.fc", "student.stage9")), "matches no"),
                                         (Stage(1, trainable=("teacher.fc",)), "no trainable parameters")])
def test_stage_checked_against_the_distiller(stage, match):
    student, teacher = pair()
    with pytest.raises(ValueError, match=match):
        Trainer(Distiller(student, teacher), tiny_split(), [stage], **quiet()).fit()


@pytest.mark.parametrize("kwargs,match", [({"epochs": 0}, "epochs"), ({"epochs": 1, "lr": -1.0}, "lr"),
                                          ({"epochs": 1, "optimizer": "lbfgs"}, "optimizer")])
def test_stage_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Stage(**kwargs)
