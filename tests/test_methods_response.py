"""Response-based method losses: they fall over a few steps, reach only the student, and compute what their
papers say."""
import pytest
import torch
import torch.nn.functional as F
from methods_helpers import TinyNet, assert_falls, digits, has_grad, no_grad, run_steps, teacher_net

import kdfast
from kdfast import methods

x, y = digits()


def _call(name, loss, s, teachers, y):
    if name in ("ensemble_arithmetic", "ensemble_geometric"):
        return loss(s, [t(x) for t in teachers], y)
    t = teachers[0](x)
    if name in ("logit_matching", "defensive", "gjsd"):
        return loss(s, t)
    return loss(s, t, y)


RESPONSE = ["kd", "logit_matching", "noisy_teacher", "ensemble_arithmetic", "ensemble_geometric", "defensive", "gjsd",
            "conditional", "adaptive", "takd"]


@pytest.mark.parametrize("name", RESPONSE)
def test_response_method_trains_student_only(name):
    student = TinyNet(seed=0)
    teachers = [teacher_net(seed=1), teacher_net(seed=2)]
    loss = methods.build(name)
    values = run_steps(lambda: _call(name, loss, student(x), teachers, y), student.parameters())
    assert_falls(values)
    assert has_grad(student)
    assert all(no_grad(t) for t in teachers)


def test_kd_is_kd_loss_at_paper_defaults():
    s, t = torch.randn(8, 5), torch.randn(8, 5)
    target = torch.randint(0, 5, (8,))
    expected = kdfast.kd_loss(s, t, target, 4.0, 0.9)
    torch.testing.assert_close(methods.build("kd")(s, t, target), expected)
    torch.testing.assert_close(methods.build("takd")(s, t, target), expected)


def test_logit_matching_value():
    s, t = torch.zeros(2, 3), torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 2.0]])
    assert float(methods.LogitMatching()(s, t)) == pytest.approx(0.5 * (5 + 4) / 2)


def test_noisy_teacher_without_noise_is_kd_and_with_noise_is_seeded():
    s, t = torch.randn(8, 5), torch.randn(8, 5)
    target = torch.randint(0, 5, (8,))
    torch.testing.assert_close(methods.NoisyTeacherKD(noise_std=0.0)(s, t, target), kdfast.kd_loss(s, t, target, 4.0))
    a = methods.NoisyTeacherKD(generator=torch.Generator().manual_seed(3))(s, t, target)
    b = methods.NoisyTeacherKD(generator=torch.Generator().manual_seed(3))(s, t, target)
    assert float(a) == float(b) and float(a) != float(kdfast.kd_loss(s, t, target, 4.0))


def test_ensemble_targets_are_mean_probabilities_and_mean_log_probabilities():
    t = torch.randn(3, 6, 5, dtype=torch.float64)
    T = 4.0
    arith = methods.ensemble_teacher_logits(t, T, "arithmetic")
    torch.testing.assert_close(F.softmax(arith / T, -1), F.softmax(t / T, -1).mean(0))
    geo = methods.ensemble_teacher_logits(list(t), T, "geometric")
    expected = F.softmax(F.log_softmax(t / T, -1).mean(0), -1)
    torch.testing.assert_close(F.softmax(geo / T, -1), expected)
    with pytest.raises(ValueError, match="mode"):
        methods.EnsembleKD(mode="median")


def test_defensive_is_soft_cross_entropy_at_T_without_T2():
    s, t = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
    pt = F.softmax(t / 20, -1)
    soft_ce = -(pt * F.log_softmax(s / 20, -1)).sum(-1).mean()
    entropy = -(pt * pt.log()).sum(-1).mean()
    torch.testing.assert_close(methods.DefensiveDistillation()(s, t), soft_ce - entropy)


def test_gjsd_endpoints_are_forward_and_reverse_kl():
    s, t = torch.randn(8, 5), torch.randn(8, 5)
    torch.testing.assert_close(methods.GeneralizedJSD(beta=0.0)(s, t), kdfast.kd_div(s, t))
    torch.testing.assert_close(methods.GeneralizedJSD(beta=1.0)(s, t), kdfast.kd_div(s, t, divergence="reverse_kl"))
    torch.testing.assert_close(methods.GeneralizedJSD()(s, t), kdfast.kd_div(s, t, divergence="jsd", beta=0.5))


def test_conditional_uses_teacher_where_right_and_label_where_wrong():
    s = torch.randn(4, 3, dtype=torch.float64)
    t = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [5.0, 0, 0], [0, 0, 5.0]], dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 2])  # the teacher is wrong on row 2 only
    kl = kdfast.kd_div(s, t, reduction="none")
    ce = F.cross_entropy(s, target, reduction="none")
    expected = (kl[0] + kl[1] + ce[2] + kl[3]) / 4
    torch.testing.assert_close(methods.ConditionalTeacherStudent()(s, t, target), expected)
    w = F.softmax(t, -1)[torch.arange(4), target]
    torch.testing.assert_close(methods.build("adaptive")(s, t, target), (w * kl + (1 - w) * ce).mean())


@pytest.mark.parametrize("name", RESPONSE)
def test_response_method_on_bfloat16_logits_gives_a_float32_loss(name):
    s = torch.randn(6, 5).bfloat16().requires_grad_(True)
    t = [torch.randn(6, 5).bfloat16() for _ in range(2)]
    target = torch.randint(0, 5, (6,))
    loss = methods.build(name)
    if name.startswith("ensemble"):
        value = loss(s, t, target)
    elif name in ("logit_matching", "defensive", "gjsd"):
        value = loss(s, t[0])
    else:
        value = loss(s, t[0], target)
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(value) and s.grad.dtype == torch.bfloat16
