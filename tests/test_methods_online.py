"""Online and self-distillation methods (DML, OKDDip, AFD, BYOT, MSD) and neuron manifold distillation: each
network, exit or discriminator is updated by its own loss only."""
import math

import pytest
import torch
import torch.nn.functional as F
from methods_helpers import TinyNet, assert_falls, digits, has_grad, no_grad, run_steps, teacher_net, zero_grads
from torch import nn

from kdfast import methods

x, y = digits()


def _params(*modules):
    return [p for m in modules for p in m.parameters()]


def test_dml_gives_each_peer_exactly_its_own_gradient():
    peers = [TinyNet(seed=i) for i in range(3)]
    dml = methods.build("dml")
    assert_falls(run_steps(lambda: dml([p(x) for p in peers], y), _params(*peers)))
    zero_grads(*peers)
    logits = [p(x) for p in peers]
    dml(logits, y).backward()
    together = [p.conv1.weight.grad.clone() for p in peers]
    for i, peer in enumerate(peers):
        zero_grads(*peers)
        z = [p(x) for p in peers]
        own = F.cross_entropy(z[i], y) + sum(F.kl_div(F.log_softmax(z[i], -1), F.softmax(z[j].detach(), -1),
                                                      reduction="batchmean") for j in range(3) if j != i) / 2
        own.backward()
        torch.testing.assert_close(peer.conv1.weight.grad, together[i], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="at least 2 networks"):
        dml([logits[0]], y)


def test_okddip_trains_peers_and_leader():
    peers, leader = [TinyNet(seed=i) for i in range(3)], TinyNet(seed=9)
    okd = methods.build("okddip", feature_dim=8)

    def loss():
        outs = [p.features(x) for p in peers]
        return okd([f[-1].mean((2, 3)) for _, f, _ in outs], [z for z, _, _ in outs], leader(x), y, epoch=40)

    assert_falls(run_steps(loss, _params(*peers, leader)))
    assert all(has_grad(p) for p in peers) and has_grad(leader)
    # The group targets are detached as in the authors' KL loss: the attention learns nothing from this loss.
    assert no_grad(okd.attention)


def test_okddip_targets_are_attention_weighted_peer_logits_and_rampup():
    att = methods.OKDDipAttention(8)
    feats, logits = [torch.randn(5, 8) for _ in range(3)], [torch.randn(5, 4) for _ in range(3)]
    q = [att.query(f) for f in feats]
    k = [att.key(f) for f in feats]
    for i, target in enumerate(att(feats, logits)):
        w = torch.softmax(torch.stack([(q[i] * k[j]).sum(-1) for j in range(3)], -1), -1)
        torch.testing.assert_close(target, sum(w[:, j:j + 1] * logits[j] for j in range(3)))
    assert methods.okddip_rampup(0) == pytest.approx(math.exp(-5)) and methods.okddip_rampup(80) == 1.0
    assert methods.okddip_rampup(200) == 1.0


def test_afd_discriminators_and_networks_update_by_their_own_losses():
    nets = [TinyNet(seed=0), TinyNet(seed=1)]
    afd = methods.build("afd", channels=8)
    d_values = run_steps(lambda: afd.discriminator_loss([n.features(x)[1][1] for n in nets]),
                         afd.parameters(), steps=15)
    assert_falls(d_values)
    assert has_grad(afd) and all(no_grad(n) for n in nets)
    zero_grads(afd, *nets)

    def network_loss():
        outs = [n.features(x) for n in nets]
        return afd.network_loss([f[1] for _, f, _ in outs], [z for z, _, _ in outs], y)

    assert_falls(run_steps(network_loss, _params(*nets)))
    assert all(has_grad(n) for n in nets) and no_grad(afd)


class MultiExit(nn.Module):
    """TinyNet with an exit after each stage; exit features share one size (8) through an adapter."""

    def __init__(self):
        super().__init__()
        self.net = TinyNet(seed=0)
        self.adapt1 = nn.Linear(4, 8)
        self.exit1 = nn.Linear(8, 4)

    def forward(self, x):
        logits, (f1, f2), _ = self.net.features(x)
        h1 = self.adapt1(f1.mean((2, 3)))
        return [self.exit1(h1), logits], [h1, f2.mean((2, 3))]


@pytest.mark.parametrize("name", ["byot", "msd"])
def test_self_distillation_trains_every_exit(name):
    model = MultiExit()
    loss_fn = methods.build(name)
    kwargs = {"epoch": 10, "epochs": 100} if name == "msd" else {}
    assert_falls(run_steps(lambda: loss_fn(*model(x), y, **kwargs), model.parameters()))
    assert has_grad(model.exit1) and has_grad(model.adapt1) and has_grad(model.net)


def test_byot_value_and_deepest_exit_learns_only_from_the_label():
    z1, z2 = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    f1, f2 = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    t = torch.randint(0, 4, (6,))
    loss = methods.BeYourOwnTeacher()([z1, z2], [f1, f2], t)
    kl = 9 * F.kl_div(F.log_softmax(z1 / 3, -1), F.softmax(z2.detach() / 3, -1), reduction="batchmean")
    expected = (F.cross_entropy(z2, t) + 0.9 * F.cross_entropy(z1, t) + 0.1 * kl
                + 1e-6 * (f1 - f2).square().sum(1).mean())
    torch.testing.assert_close(loss, expected)
    (g,) = torch.autograd.grad(loss, z2)
    (g_ce,) = torch.autograd.grad(F.cross_entropy(z2, t), z2)
    torch.testing.assert_close(g, g_ce)


def test_cosine_anneal():
    assert methods.cosine_anneal(0, 10, 2.0) == 2.0
    assert methods.cosine_anneal(5, 10, 2.0) == pytest.approx(1.0)
    assert methods.cosine_anneal(10, 10, 2.0) == pytest.approx(0.0)


def test_manifold_trains_student_only():
    student, teacher = TinyNet(seed=0), teacher_net()
    nmd = methods.build("manifold", rank=2, gammas=(2.0, 1.0))

    def loss():  # on pre-ReLU stage outputs: dead ReLU channels would tie singular values at 0
        zs, _, ps = student.features(x)
        zt, _, pt = teacher.features(x)
        return nmd(zs, zt, y, ps, pt)

    assert_falls(run_steps(loss, student.parameters()))
    assert has_grad(student) and no_grad(teacher)
    with pytest.raises(ValueError, match="stages"):
        methods.NeuronManifoldKD()(torch.randn(2, 4), torch.randn(2, 4), torch.tensor([0, 1]), [x], [x])


def test_confident_calibration_swaps_top_class_and_label_where_teacher_is_wrong():
    t = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]])
    out = methods.confident_calibration(t, torch.tensor([2, 1]))
    torch.testing.assert_close(out, torch.tensor([[2.0, 1.0, 3.0], [0.0, 5.0, 1.0]]))
