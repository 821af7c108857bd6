"""Feature-based method losses: they fall, train the student and the method's own adapters, never the teacher,
and compute their papers' formulas."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from methods_helpers import TinyNet, assert_falls, digits, has_grad, no_grad, run_steps, teacher_net

from kdfast import methods

x, y = digits()


def _nets():
    return TinyNet(seed=0), teacher_net()


def test_fitnet_hint_trains_student_and_regressor():
    student, teacher = _nets()
    hint = methods.build("fitnet", student_channels=8, teacher_channels=16)

    def loss():
        return hint(student.features(x)[1][1], teacher.features(x)[1][1])

    assert_falls(run_steps(loss, list(student.parameters()) + list(hint.parameters())))
    assert has_grad(student) and has_grad(hint.regressor) and no_grad(teacher)


def test_regressor_pools_to_the_teacher_size():
    reg = methods.ConvRegressor(4, 6, kernel_size=1)
    assert reg(torch.randn(2, 4, 8, 8), (4, 4)).shape == (2, 6, 4, 4)


@pytest.mark.parametrize("name", ["at", "sp", "rkd"])
def test_relation_and_attention_methods_train_student_only(name):
    student, teacher = _nets()
    loss_fn = methods.build(name)

    def loss():
        _, fs, _ = student.features(x)
        _, ft, _ = teacher.features(x)
        return loss_fn(fs, ft) if name == "at" else loss_fn(fs[-1], ft[-1])

    assert_falls(run_steps(loss, student.parameters()))
    assert has_grad(student) and no_grad(teacher)


def test_at_value_is_beta_times_mean_squared_map_difference():
    s, t = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 5, 8, 8, dtype=torch.float64)
    tp = F.adaptive_avg_pool2d(t, (4, 4))  # the larger map is pooled to the smaller
    ms = F.normalize(s.pow(2).mean(1).flatten(1), dim=1)
    mt = F.normalize(tp.pow(2).mean(1).flatten(1), dim=1)
    torch.testing.assert_close(methods.AttentionTransferKD()([s], [t]), 1000 * (ms - mt).pow(2).mean())


def test_sp_value():
    s, t = torch.randn(5, 3, 2, 2, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    gs = F.normalize(s.flatten(1) @ s.flatten(1).T, dim=1)
    gt = F.normalize(t @ t.T, dim=1)
    torch.testing.assert_close(methods.SimilarityPreservingKD()(s, t), 3000 * (gs - gt).square().sum() / 25)


def test_rkd_value_against_loops():
    s, t = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)

    def dist(e):
        d = torch.cdist(e, e)
        return d / d[d > 0].mean()

    def angles(e):
        out = []
        for i, j, k in itertools.product(range(4), repeat=3):
            a, b = F.normalize(e[i] - e[j], dim=0), F.normalize(e[k] - e[j], dim=0)
            out.append(a @ b)
        return torch.stack(out)

    expected = 25 * F.smooth_l1_loss(dist(s), dist(t)) + 50 * F.smooth_l1_loss(angles(s), angles(t))
    torch.testing.assert_close(methods.RelationalKD()(s, t), expected)


def test_gradient_at_double_backward_trains_student_only():
    student, teacher = _nets()
    gat = methods.build("gradient_at")
    assert_falls(run_steps(lambda: gat(student, teacher, x, y)[0], student.parameters()))
    assert has_grad(student) and no_grad(teacher)


def test_gradient_at_penalises_the_input_gradient_difference():
    student, teacher = _nets()
    xs = x[:8].clone().requires_grad_(True)
    loss, logits = methods.GradientAttentionTransfer(beta=2.0)(student, teacher, x[:8], y[:8])
    (js,) = torch.autograd.grad(F.cross_entropy(student(xs), y[:8]), xs)
    (jt,) = torch.autograd.grad(F.cross_entropy(teacher(xs), y[:8]), xs)
    torch.testing.assert_close(loss, F.cross_entropy(logits, y[:8]) + (js - jt).norm())


def test_activation_boundaries_trains_student_and_connectors():
    student, teacher = _nets()
    ab = methods.build("ab", student_channels=[4, 8], teacher_channels=[8, 16])
    assert ab.weights == [0.5, 1.0]

    def loss():
        _, fs, _ = student.features(x)
        _, _, pt = teacher.features(x)
        return ab(fs, pt)

    assert_falls(run_steps(loss, list(student.parameters()) + list(ab.parameters())))
    assert has_grad(student) and has_grad(ab.connectors) and no_grad(teacher)


class Passthrough(torch.nn.Module):
    def forward(self, x, size=None):
        return x


def test_activation_boundaries_value():
    ab = methods.ActivationBoundaries([1], [1])
    ab.connectors[0] = Passthrough()
    s = torch.tensor([-2.0, -0.5, 0.5, 2.0, 0.5, -0.5]).view(1, 1, 2, 3)
    t = torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0]).view(1, 1, 2, 3)
    # t <= 0: (s+1)^2 where s > -1 -> 0.25, 2.25; t > 0: (s-1)^2 where s <= 1 -> 0.25, 2.25
    assert float(ab([s], [t])) == pytest.approx(5.0)
