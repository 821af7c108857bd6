"""QuEST, internal representations, FEED, TAKD chains, ensemble distribution distillation, and the registry."""
import pytest
import torch
import torch.nn.functional as F
from methods_helpers import TinyNet, assert_falls, digits, has_grad, no_grad, run_steps, teacher_net

from kdfast import methods

x, y = digits()


def test_kmeans_codebook_finds_clusters_deterministically():
    centres = F.normalize(torch.eye(3, 5), dim=1)
    points = (centres.repeat(20, 1) + 0.01 * torch.randn(60, 5, generator=torch.Generator().manual_seed(0)))
    book = methods.kmeans_codebook(points, 3, seed=1)
    assert torch.equal(book, methods.kmeans_codebook(points, 3, seed=1))
    nearest = torch.cdist(centres, book).min(1).values
    assert float(nearest.max()) < 0.05
    with pytest.raises(ValueError, match="k must be"):
        methods.kmeans_codebook(points, 61)


def test_quest_trains_student_and_projection_only():
    student, teacher = TinyNet(seed=0), teacher_net()
    with torch.no_grad():
        book = methods.kmeans_codebook(methods.feature_vectors(teacher.features(x)[1][1]), 8)
    quest = methods.build("quest", student_channels=8, codebook=book)

    def loss():
        zs, fs, _ = student.features(x)
        return quest(fs[1], teacher.features(x)[1][1], zs, y)

    assert_falls(run_steps(loss, list(student.parameters()) + list(quest.parameters())))
    assert has_grad(student) and has_grad(quest.project) and no_grad(teacher)
    # Teacher assignment: softmax(-tau ||f - w||^2) over the (normalised) words, per position.
    f = torch.randn(2, 16, 3, 3)
    p = F.softmax(quest.teacher_logits(f), 1)
    fn = F.normalize(f, dim=1)[0, :, 1, 2]
    expected = F.softmax(-5 * (fn[None] - quest.codebook).square().sum(1), 0)
    torch.testing.assert_close(p[0, :, 1, 2], expected)


@pytest.mark.parametrize("schedule,expected", [("progressive", [[0], [1], [2], [2]]),
                                               ("stacked", [[0], [0, 1], [0, 1, 2], [0, 1, 2]])])
def test_internal_layer_schedules(schedule, expected):
    assert [methods.internal_layers(e, 3, schedule, epochs_per_layer=2) for e in (0, 2, 4, 9)] == expected
    with pytest.raises(ValueError, match="schedule"):
        methods.internal_layers(0, 3, "random")


@pytest.mark.parametrize("name", ["internal", "internal_stacked"])
def test_internal_representations_train_student_only(name):
    student, teacher = TinyNet(width=8, seed=0), teacher_net()
    loss_fn = methods.build(name)

    def loss():
        zs, fs, _ = student.features(x)
        zt, ft, _ = teacher.features(x)
        return loss_fn(zs, zt, [f.flatten(2).mT for f in fs], [f.flatten(2).mT for f in ft], epoch=1)

    assert_falls(run_steps(loss, student.parameters()))
    assert has_grad(student) and no_grad(teacher)


def test_internal_value_is_kl_plus_cosine_of_active_layers():
    zs, zt = torch.randn(4, 3), torch.randn(4, 3)
    hs, ht = [torch.randn(4, 5, 6) for _ in range(2)], [torch.randn(4, 5, 6) for _ in range(2)]
    kl = F.kl_div(F.log_softmax(zs, -1), F.softmax(zt, -1), reduction="batchmean")
    cos = (1 - F.cosine_similarity(hs[1], ht[1], dim=-1)).mean()
    torch.testing.assert_close(methods.InternalRepresentationKD()(zs, zt, hs, ht, epoch=1), kl + cos)


def test_feed_trains_one_transform_per_teacher():
    student, teachers = TinyNet(seed=0), [teacher_net(seed=1), teacher_net(seed=2)]
    feed = methods.build("feed", student_channels=8, teacher_channels=[16, 16])

    def loss():
        return feed(student.features(x)[1][1], [t.features(x)[1][1] for t in teachers])

    assert_falls(run_steps(loss, list(student.parameters()) + list(feed.parameters())))
    assert has_grad(student) and all(has_grad(t) for t in feed.transforms) and all(no_grad(t) for t in teachers)


def test_takd_steps_chain_largest_first():
    assert methods.takd_steps(["T", "A1", "A2", "S"]) == [("T", "A1"), ("A1", "A2"), ("A2", "S")]
    with pytest.raises(ValueError, match="chain"):
        methods.takd_steps(["T"])


def test_end2_is_dirichlet_nll_of_the_members_and_trains_the_prior_network():
    prior, members = TinyNet(seed=0), [teacher_net(seed=s) for s in (1, 2, 3)]
    end2 = methods.build("end2")
    assert_falls(run_steps(lambda: end2(prior(x), [m(x) for m in members]), prior.parameters()))
    assert has_grad(prior) and all(no_grad(m) for m in members)
    z, zm = torch.randn(5, 4, dtype=torch.float64), torch.randn(3, 5, 4, dtype=torch.float64)
    pi = F.softmax(zm, -1) * (1 - 1e-2) + 1e-2 / 4  # smoothing=1e-2
    expected = -torch.distributions.Dirichlet(z.exp()).log_prob(pi).mean()
    torch.testing.assert_close(methods.EnsembleDistributionDistillation()(z, zm), expected)


REQUIRED = {"fitnet": dict(student_channels=4, teacher_channels=8), "ab": dict(student_channels=[4],
            teacher_channels=[8]), "holistic": dict(discriminator=methods.ScoreMapDiscriminator(4)),
            "quest": dict(student_channels=4, codebook=torch.randn(3, 8)), "okddip": dict(feature_dim=8),
            "afd": dict(channels=8), "feed": dict(student_channels=4, teacher_channels=[8])}


def test_registry_builds_every_method_and_names_its_source():
    families = {"response", "feature", "dense", "manifold", "online", "self", "other"}
    for name, method in methods.METHODS.items():
        assert method.family in families and len(method.source) > 10, name
        assert isinstance(methods.build(name, **REQUIRED.get(name, {})), torch.nn.Module), name
    assert methods.build("kd", temperature=2.0).temperature == 2.0
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        methods.build("nope")
