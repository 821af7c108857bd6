"""Dense-prediction methods on the shapes data set: the data itself, the segmentation nets, mIoU, and the
pixel-wise, pair-wise and holistic losses (discriminator and student each updated by their own loss only)."""
import pytest
import torch
import torch.nn.functional as F
from methods_helpers import assert_falls, has_grad, no_grad, run_steps, zero_grads

import kdfast
from kdfast import methods
from kdfast.train.data import ShapesDataset, make_shapes
from kdfast.train.metrics import mean_iou
from kdfast.train.models import SegNet

images, labels = make_shapes(4, 16, seed=0)


def test_shapes_names_moved_with_a_deprecation_alias():
    with pytest.warns(DeprecationWarning, match="kdfast.train.data.make_shapes"):
        assert methods.make_shapes is make_shapes
    with pytest.warns(DeprecationWarning, match="kdfast.train.metrics.mean_iou"):
        from kdfast.methods import mean_iou as old
    assert old is mean_iou
    with pytest.raises(AttributeError):
        methods.no_such_name  # noqa: B018


def test_shapes_are_deterministic_by_seed_and_labelled():
    a, la = make_shapes(6, 16, seed=5)
    b, lb = make_shapes(6, 16, seed=5)
    c, _ = make_shapes(6, 16, seed=6)
    assert torch.equal(a, b) and torch.equal(la, lb) and not torch.equal(a, c)
    assert a.shape == (6, 3, 16, 16) and la.shape == (6, 16, 16) and la.dtype == torch.int64
    assert 0 <= float(a.min()) and float(a.max()) <= 1
    big = make_shapes(40, 24, seed=0)[1]
    assert set(big.unique().tolist()) == {0, 1, 2, 3}
    # A labelled pixel has the colour of its shape: it differs from the dark, noisy background.
    assert float(a.mean(1)[la > 0].mean()) > float(a.mean(1)[la == 0].mean()) + 0.2
    ds = ShapesDataset(3, 16, seed=1)
    assert len(ds) == 3 and ds[0][0].shape == (3, 16, 16) and ds.num_classes == 4


def test_segnets_give_full_resolution_scores_and_half_resolution_features():
    logits, feats = SegNet(width=32)(images, return_features=True)
    assert logits.shape == (4, 4, 16, 16) and feats.shape == (4, 64, 8, 8)
    assert SegNet(width=8)(images).shape == (4, 4, 16, 16)


def test_mean_iou():
    target = torch.tensor([[0, 0, 1, 1]])
    assert mean_iou(target.clone(), target, 4) == 1.0
    pred = torch.tensor([[0, 1, 1, 1]])  # class 0: 1/2, class 1: 2/3
    assert mean_iou(pred, target, 4) == pytest.approx((0.5 + 2 / 3) / 2)
    logits = F.one_hot(pred, 4).permute(0, 2, 1).float()
    assert mean_iou(logits, target, 4) == pytest.approx((0.5 + 2 / 3) / 2)
    assert mean_iou(pred, torch.tensor([[0, -100, 1, 1]]), 4) == 1.0  # the one wrong pixel is ignored


def test_pixelwise_is_weighted_per_pixel_kl():
    s, t = torch.randn(2, 4, 3, 5), torch.randn(2, 4, 3, 5)
    kl = (F.softmax(t, 1) * (F.log_softmax(t, 1) - F.log_softmax(s, 1))).sum(1).mean()
    torch.testing.assert_close(methods.PixelwiseKD()(s, t), 10 * kl, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["pixelwise", "pairwise"])
def test_dense_method_trains_student_only(name):
    student, teacher = SegNet(width=4), SegNet(width=8)
    loss_fn = methods.build(name)

    def loss():
        s_logits, s_feat = student(images, return_features=True)
        t_logits, t_feat = teacher(images, return_features=True)
        return loss_fn(s_logits, t_logits) if name == "pixelwise" else loss_fn(s_feat, t_feat)

    assert_falls(run_steps(loss, student.parameters(), steps=15))
    assert has_grad(student) and no_grad(teacher)


def test_pairwise_pools_half_size_patches():
    s, t = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 8, 8)
    expected = kdfast.pairwise_affinity_loss(s, t, pool_size=(4, 4))
    torch.testing.assert_close(methods.PairwiseKD()(s, t), expected)


def test_holistic_discriminator_and_student_each_update_by_their_own_loss():
    student, teacher = SegNet(width=4), SegNet(width=8)
    critic = methods.ScoreMapDiscriminator(4, width=8)
    holistic = methods.build("holistic", discriminator=critic)
    g = torch.Generator().manual_seed(0)

    d_values = run_steps(lambda: holistic.discriminator_loss(student(images), teacher(images), generator=g),
                         critic.parameters(), steps=8, lr=1e-3)
    assert_falls(d_values, factor=1.0)
    assert has_grad(critic) and no_grad(student) and no_grad(teacher)

    zero_grads(critic, student, teacher)
    s_values = run_steps(lambda: holistic.student_loss(student(images)), student.parameters(), steps=8, lr=1e-3)
    assert all(torch.isfinite(torch.tensor(s_values))) and s_values[-1] < s_values[0]
    assert has_grad(student) and no_grad(critic) and no_grad(teacher)


def test_gradient_penalty_is_zero_for_a_unit_slope_critic():
    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1, 4, 2, 2))
            with torch.no_grad():
                self.w[0, 0, 0, 0] = 1.0  # ||dD/dx|| = 1 everywhere

        def forward(self, x):
            return (x * self.w).flatten(1).sum(1)

    s, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    p_s, p_t = s.softmax(1), t.softmax(1)  # the critic reads class probabilities
    d = methods.HolisticKD(Linear())
    expected = p_s[:, 0, 0, 0].mean() - p_t[:, 0, 0, 0].mean()
    torch.testing.assert_close(d.discriminator_loss(s, t), expected)
    torch.testing.assert_close(d.student_loss(s), -0.1 * p_s[:, 0, 0, 0].mean())


def test_holistic_critic_sees_each_map_with_its_image():
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x):
            seen.append(x.detach())
            return x[:, -1].flatten(1).mean(1)  # reads only the (last) image channel

    s, t, images = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.rand(2, 1, 6, 6)
    d = methods.HolisticKD(Spy(), gp_weight=0.0)
    loss = d.discriminator_loss(s, t, images)
    assert seen[-1].shape == (2, 5, 3, 3)
    torch.testing.assert_close(seen[-1][:, 4:], torch.nn.functional.interpolate(images, size=(3, 3),
                                                                               mode="bilinear"))
    torch.testing.assert_close(loss, torch.tensor(0.0))  # same image under both maps: no difference
    expected = -0.1 * seen[-1][:, 4].flatten(1).mean(1).mean()
    torch.testing.assert_close(d.student_loss(s, images), expected)
    with pytest.raises(ValueError, match="images hold 1 samples"):
        d.student_loss(s, images[:1])
