"""Every CPU kernel, forward and backward, on every instruction set this CPU runs, against the float64 reference.

`make qemu-test` runs this file under qemu-user with CPU models without AVX-512, without AVX2 and without AVX
(docs/architecture.md): a function compiled for a higher instruction set that the linker kept for a lower one's
callers dies there with SIGILL, which no run on this machine's CPU can show. Small shapes, as the emulation is slow;
odd sizes, so that vector bodies and scalar tails both run. The disassembly check of the same guarantee is
tests/test_isa_symbols.py.
"""
import os

import pytest
import torch
from conftest import CPU_CAPABILITIES, assert_close

import kdfast
from kdfast import _ops, reference

LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)


def expected_capability():
    """The best instruction set of this CPU as `make qemu-test` names it for its model, or as torch's own CPU
    detection (cpuinfo) sees it."""
    named = os.environ.get("KDFAST_EXPECT_CPU_CAPABILITY")
    if named:
        return named
    has = torch.cpu.get_capabilities()
    if all(has.get(f"avx512_{x}", False) for x in ("f", "bw", "vl", "dq")):
        return "avx512"
    return "avx2" if has.get("avx2", False) and has.get("fma3", False) else "default"


def test_picks_the_best_instruction_set_of_this_cpu():
    assert _ops._C.best_cpu_capability() == expected_capability()
    if not os.environ.get("KDFAST_CPU_CAPABILITY"):
        assert kdfast.backends()["cpu_capability"] == expected_capability()
    assert CPU_CAPABILITIES[-1] == expected_capability()


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def check(fn, ref, inputs, dtype, scale=1.0, grad_scale=1.0):
    """fn on the inputs and ref on float64 copies of them: values, and the gradients of a weighted sum."""
    xs = [x.detach().clone().requires_grad_(True) for x in inputs]
    x64 = [x.detach().double().requires_grad_(True) for x in inputs]
    out, want = fn(*xs), ref(*x64)
    assert_close(out, want, dtype, scale=scale)
    w = randn(*want.shape, dtype=torch.float64, seed=9)
    got = torch.autograd.grad((out.double() * w).sum(), xs)
    expect = torch.autograd.grad((want * w).sum(), x64)
    for g, e in zip(got, expect):
        assert_close(g, e, dtype, scale=grad_scale)


# Every dtype in the row layout; the pixel layout is the same code for every dtype (float32 and bfloat16 cover it).
KD_CASES = [(d, -1) for d in LOW_PRECISION + (torch.float64,)] + [(torch.float32, 1), (torch.bfloat16, 1)]


@pytest.mark.parametrize("dtype,dim", KD_CASES, ids=[f"{d}-{'rows' if dim == -1 else 'pixels'}" for d, dim in KD_CASES])
def test_kd_div_and_kd_loss(cpu_capability, dtype, dim):
    shape = (3, 37, 5) if dim == -1 else (2, 7, 3, 11)
    s, t = randn(*shape, dtype=dtype, seed=1, scale=3), randn(*shape, dtype=dtype, seed=2, scale=3)
    for divergence in ("kl", "reverse_kl", "jsd"):
        check(lambda s, t, d=divergence: kdfast.kd_div(s, t, 2.0, divergence=d, dim=dim, reduction="none", beta=0.3),
              lambda s, t, d=divergence: reference.kd_div(s, t, 2.0, divergence=d, dim=dim, reduction="none",
                                                          beta=0.3),
              (s, t), dtype, scale=4)
    rows = [n for i, n in enumerate(shape) if i != dim % len(shape)]
    target = torch.randint(0, shape[dim], rows, generator=torch.Generator().manual_seed(3))
    target.view(-1)[::4] = -100
    check(lambda s, t: kdfast.kd_loss(s, t, target, 2.0, 0.7, dim=dim),
          lambda s, t: reference.kd_loss(s, t, target, 2.0, 0.7, dim=dim), (s, t), dtype, scale=4)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_topk_kd_div(cpu_capability, dtype):
    s = randn(4, 131, dtype=dtype, seed=4, scale=3)
    idx, lp = kdfast.topk_from_logits(randn(4, 131, dtype=torch.float64, seed=5, scale=3), 13)
    lp = lp.float()
    for tail in ("renormalize", "bucket"):
        check(lambda s, tail=tail: kdfast.topk_kd_div(s, idx, lp, 2.0, tail=tail, reduction="none"),
              lambda s, tail=tail: reference.topk_kd_div(s, idx, lp.double(), 2.0, tail=tail, reduction="none"),
              (s,), dtype, scale=10, grad_scale=10)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_attention(cpu_capability, dtype):
    s, t = randn(2, 5, 7, 9, dtype=dtype, seed=6), randn(2, 3, 7, 9, dtype=dtype, seed=7)
    for pool in ("mean", "sum", "max"):
        for p in (1.0, 2.0, 2.5):
            check(lambda x, p=p, pool=pool: kdfast.attention_map(x, p, pool=pool),
                  lambda x, p=p, pool=pool: reference.attention_map(x, p, pool=pool), (s,), dtype, grad_scale=10)
        check(lambda s, t, pool=pool: kdfast.attention_transfer_loss(s, t, pool=pool, reduction="none"),
              lambda s, t, pool=pool: reference.attention_transfer_loss(s, t, pool=pool, reduction="none"),
              (s, t), dtype, grad_scale=10)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_pairwise_affinity(cpu_capability, dtype):
    s, t = randn(2, 5, 6, 7, dtype=dtype, seed=8), randn(2, 3, 6, 7, dtype=dtype, seed=9)
    check(lambda s, t: kdfast.pairwise_affinity_loss(s, t, reduction="none"),
          lambda s, t: reference.pairwise_affinity_loss(s, t, reduction="none"), (s, t), dtype, grad_scale=10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_svd_and_manifold_loss(cpu_capability, dtype):
    A = randn(3, 9, 7, dtype=dtype, seed=10)
    U, S, Vh = kdfast.batched_svd(A)
    torch.testing.assert_close((U * S.unsqueeze(-2)) @ Vh, A, rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-12)
    torch.testing.assert_close(S.double(), torch.linalg.svdvals(A.double()), rtol=1e-5, atol=1e-6)
    s, t = randn(2, 6, 4, 5, dtype=dtype, seed=11), randn(2, 4, 4, 5, dtype=dtype, seed=12)
    check(lambda s, t: kdfast.manifold_distillation_loss(s, t, 3, reduction="none"),
          lambda s, t: reference.manifold_distillation_loss(s, t, 3, reduction="none"), (s, t), dtype,
          scale=10, grad_scale=100)
