"""Every registry method as a trainer recipe: a few epochs on tiny data, where the loss is finite and falls, the
frozen teachers do not change, and every network or adversary the method trains does. (The losses' own values and
per-parameter gradients are tested in tests/test_methods_*.py.)"""
import math

import pytest
import torch

import kdfast
from kdfast.methods import registry
from kdfast.train import UNLABELLED, Distiller, Split, Stage, Trainer, seed_everything
from kdfast.train.data import make_shapes
from kdfast.train.models import SegNet, SmallCNN
from kdfast.train.recipes import (
    DENSE,
    RECIPES,
    Ensemble,
    MultiExit,
    Peers,
    Setting,
    build_recipe,
    compose_recipe,
)


def digits_split(n=64, seed=0, unlabelled=32):
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.rand(4, 1, 8, 8, generator=g)
    y = torch.arange(n) % 4
    x = prototypes[y] + 0.2 * torch.randn(n, 1, 8, 8, generator=g)
    y[:unlabelled] = UNLABELLED  # a transfer set: half the examples without label
    return Split(x, y)


def shapes_split(n=16):
    x, y = make_shapes(n, 16, seed=0)
    return Split(x, y)


def _fit(distiller, stages, split):
    Trainer(distiller, split, stages, progress=False, batch_size=16).fit()


def setting(name, epochs=3):
    dense = name in DENSE
    seed_everything(0)
    if dense:
        def student():
            return SegNet(width=4)
        teachers = [SegNet(width=8)]
        split = shapes_split()
    else:
        def student():
            return SmallCNN((4, 8, 8), num_classes=4)
        teachers = [SmallCNN((8, 8, 16), num_classes=4) for _ in range(2)]
        split = digits_split()
    labelled = split if dense else split.relabel(torch.arange(len(split)) % 4)
    for t in teachers:  # a few steps make the teachers better than chance (their soft labels mean something)
        _fit(Distiller(t), [Stage(2, lr=0.05)], labelled)
    return Setting(student, split, teachers, epochs=epochs, lr=0.02, fit=_fit, stage_options={"optimizer": "adam"},
                   assistant=lambda: SmallCNN((8, 8, 8), num_classes=4))


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def changed(before, module):
    return {n for n, p in module.named_parameters() if n in before and not torch.equal(before[n], p.detach())}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_trains_what_the_method_says(name):
    torch.set_num_threads(1)
    s = setting(name)
    # internal*: one layer pair throughout, so that the loss of successive epochs is the same function.
    recipe = build_recipe(name, s, **({"epochs_per_layer": 100} if name.startswith("internal") else {}))
    d = recipe.distiller
    teachers = {id(t): snapshot(t) for t in s.teachers}
    student = snapshot(d.student)
    adversaries = {n: snapshot(t.adversary) for n, t in d.adversaries().items()}
    history = Trainer(d, recipe.train, recipe.stages, progress=False, batch_size=16, seed=0).fit()
    losses = [h["train"]["loss"] for h in history]
    assert all(math.isfinite(v) for v in losses), losses
    by_stage = {}
    for h in history:
        by_stage.setdefault(h["stage_index"], []).append(h["train"]["loss"])
    for stage, values in by_stage.items():
        if len(values) > 1:
            assert values[-1] < values[0], f"stage {stage}: {values}"
    for t in s.teachers:
        assert not changed(teachers[id(t)], t), "a frozen teacher changed"
    moved = changed(student, d.student)
    assert moved, "the student did not train"
    if isinstance(d.student, (Peers,)):
        for i, _net in enumerate(d.student.networks):
            assert any(n.startswith(f"networks.{i}.") for n in moved), f"network {i} did not train"
    if isinstance(d.student, MultiExit):
        assert any(n.startswith("heads.") for n in moved) and any(n.startswith("network.") for n in moved)
    for n, t in d.adversaries().items():
        assert changed(adversaries[n], t.adversary), "the adversary did not train"
    assert (name in ("holistic", "afd")) == bool(d.adversaries())


def test_every_registry_method_has_a_recipe_and_unknown_names_fail():
    assert set(RECIPES) == set(registry.METHODS)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        build_recipe("nope", setting("kd"))


def test_teacher_methods_say_when_there_is_no_teacher():
    s = setting("kd")
    s.teachers = ()
    with pytest.raises(ValueError, match="needs a trained teacher"):
        build_recipe("fitnet", s)


def test_fitnet_hint_stage_trains_only_the_layers_below_the_guided_one_and_the_regressor():
    s = setting("fitnet")
    recipe = build_recipe("fitnet", s)
    d = recipe.distiller
    before = snapshot(d)
    Trainer(d, recipe.train, recipe.stages[:1], progress=False, batch_size=16).fit()
    moved = changed(before, d)
    assert any(n.startswith("terms.fitnet.") for n in moved)
    assert not any(n.startswith(("student.fc", "student.stages.2", "terms.kd")) for n in moved)


def test_defensive_trains_its_own_teacher_at_the_temperature():
    s = setting("defensive", epochs=4)
    given = snapshot(s.teachers[0])
    x = s.train.images
    recipe = build_recipe("defensive", s, temperature=8.0)
    teacher = recipe.distiller.teacher
    assert teacher is not s.teachers[0] and not changed(given, s.teachers[0])
    assert not any(p.requires_grad for p in teacher.parameters())  # frozen for the student's stage
    assert list(recipe.distiller.term_names) == ["defensive"]       # soft labels only, no cross-entropy
    # Trained at T = 8 on the given teacher's labels: it agrees with them, with logits larger than a T = 1 net's.
    with torch.no_grad():
        z, z_given = teacher(x), s.teachers[0](x)
    assert (z.argmax(1) == z_given.argmax(1)).float().mean() > 0.7  # chance: 0.25
    assert z.std(1).mean() > 2 * z_given.std(1).mean()
    s.fit = None
    with pytest.raises(ValueError, match="needs Setting.fit"):
        build_recipe("defensive", s)


def test_online_and_self_distillation_train_on_the_labelled_examples_only():
    s = setting("dml")
    for name in ("dml", "byot"):
        assert (build_recipe(name, s).train.targets != UNLABELLED).all()
    assert (build_recipe("kd", s).train.targets == UNLABELLED).any()


def test_ensemble_and_peers_deploy_one_network():
    s = setting("kd")
    x = s.train.images[:5]
    ens = Ensemble(s.teachers)
    assert torch.allclose(ens(x), torch.stack([t(x) for t in s.teachers]).mean(0))
    peers = build_recipe("okddip", s).distiller.student
    assert torch.equal(peers(x), peers.networks[3](x))


def test_compare_smoke(capsys):
    from kdfast.train import compare
    assert compare.main(["--methods", "kd,pairwise", "--epochs", "2", "--teacher-epochs", "1", "--shapes-train",
                         "32", "--shapes-test", "16", "--shapes-size", "16"]) == 0
    out = capsys.readouterr().out
    for name in ("| digits | ce ", "| digits | kd ", "| shapes | ce ", "| shapes | pairwise", "wall time"):
        assert name in out, out
    with pytest.raises(SystemExit):
        compare.main(["--methods", "kd,nope"])


def test_adversarial_recipe_resumes_to_the_same_weights(tmp_path):
    """The discriminator's optimiser state is checkpointed with the networks'."""
    def run(out, stop_after=None):
        recipe = build_recipe("holistic", setting("holistic", epochs=2))
        kw = dict(progress=False, batch_size=8, seed=0, out_dir=str(out))
        Trainer(recipe.distiller, recipe.train, recipe.stages, **kw).fit(stop_after)
        if stop_after is not None:
            recipe = build_recipe("holistic", setting("holistic", epochs=2))
            Trainer(recipe.distiller, recipe.train, recipe.stages, resume=True, **kw).fit()
        return recipe.distiller.state_dict()

    whole, resumed = run(tmp_path / "a"), run(tmp_path / "b", stop_after=1)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_composed_recipes_share_one_student_teacher_and_stage():
    s = setting("kd", epochs=2)
    recipe = compose_recipe(["kd", "at", "sp"], s, {"at": {"beta": 5.0}})
    d = recipe.distiller
    assert d.term_names == ["kd", "at", "sp"] and d.teacher is s.teachers[0] and len(recipe.stages) == 1
    assert d.term("at").loss.beta == 5.0 and isinstance(d.term("at").loss, kdfast.AttentionTransfer)
    assert isinstance(d.term("kd").loss, registry.METHODS["kd"].factory)  # the kd recipe's own term, taken once
    history = Trainer(d, recipe.train, recipe.stages, progress=False, batch_size=16).fit()
    assert set(history[-1]["train"]) == {"loss", "kd", "at", "sp"}
    assert compose_recipe(["at"], s).distiller.term_names == build_recipe("at", s).distiller.term_names
    with pytest.raises(ValueError, match="fitnet run alone"):
        compose_recipe(["kd", "fitnet"], s)


def test_registry_options_are_keyword_arguments_with_defaults_and_help():
    assert registry.METHODS["kd"].defaults() == {"temperature": 4.0, "alpha": 0.9}
    assert registry.METHODS["adaptive"].defaults() == {"temperature": 1.0}  # the variant's own flag is no option
    assert registry.METHODS["at"].defaults() == {"p": 2.0, "beta": 1000.0}
    for name, entry in registry.METHODS.items():
        defaults = entry.defaults()  # a KeyError if an option is not a keyword argument of the factory
        assert all(isinstance(v, (int, float)) for v in defaults.values()), name  # --option sets numbers
        assert all(isinstance(h, str) and h for h in entry.options.values()), name
