"""Tiny data and networks shared by the tests of kdfast.methods (kept small: the whole set runs in seconds)."""
import math

import torch
import torch.nn.functional as F
from torch import nn

CLASSES = 4


def digits(n=32, classes=CLASSES, seed=0):
    """Digits-like data: (n, 1, 8, 8) images, each a noisy copy of one of `classes` fixed random 8x8 prototypes."""
    g = torch.Generator().manual_seed(seed)
    prototypes = (torch.rand(classes, 1, 8, 8, generator=g) > 0.5).float()
    y = torch.arange(n) % classes
    x = prototypes[y] + 0.3 * torch.randn(n, 1, 8, 8, generator=g)
    return x, y


class TinyNet(nn.Module):
    """conv(3x3, w) -> ReLU -> conv(3x3 stride 2, 2w) -> ReLU -> mean pool -> linear. forward(x) -> logits;
    features(x) -> (logits, [stage1 (B, w, 8, 8), stage2 (B, 2w, 4, 4)], [pre-ReLU of both stages])."""

    def __init__(self, width=4, classes=CLASSES, seed=0, in_channels=1):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.fc = nn.Linear(2 * width, classes)

    def features(self, x):
        p1 = self.conv1(x)
        f1 = F.relu(p1)
        p2 = self.conv2(f1)
        f2 = F.relu(p2)
        return self.fc(f2.mean((2, 3))), [f1, f2], [p1, p2]

    def forward(self, x):
        return self.features(x)[0]


def teacher_net(seed=1):
    """A wider TinyNet whose parameters require grad, so that a test can see that a method sends it none."""
    return TinyNet(width=8, seed=seed)


def run_steps(loss_fn, params, steps=20, lr=1e-2):
    """Adam steps on loss_fn(); returns the loss values (before each step). Runs on one thread: these models are
    too small to gain from more, and on a shared machine a second OpenMP thread mostly waits."""
    opt = torch.optim.Adam(params, lr=lr)
    values = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            opt.step()
            values.append(float(loss.detach()))
    finally:
        torch.set_num_threads(threads)
    return values


def assert_falls(values, factor=0.95):
    assert all(math.isfinite(v) for v in values), values
    assert values[-1] < factor * values[0], f"loss did not fall: {values[0]:.5g} -> {values[-1]:.5g}"


def has_grad(module):
    """True when some parameter of module got a non-zero gradient."""
    return any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in module.parameters())


def no_grad(module):
    """True when no parameter of module got any gradient."""
    return all(p.grad is None or bool(p.grad.abs().sum() == 0) for p in module.parameters())


def zero_grads(*modules):
    for m in modules:
        for p in m.parameters():
            p.grad = None
