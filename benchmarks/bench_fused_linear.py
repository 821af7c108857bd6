"""fused_linear_kd, forward + backward (gradients of the student hidden states and weight; no bias, as LLM heads
have none), against the unfused path (the reference: full logits, then KD + cross-entropy) eager and compiled, and
Liger-Kernel's chunked LigerFusedLinearJSDLoss (a peer on CPU: plain PyTorch + torch.compile) where installed."""
import pytest
import torch
from harness import IMPLS, make_impl, measure

import kdfast
from kdfast import reference

# name: (N, H, V, teacher H, divergence, scale_t2, devices). Teacher given as a TeacherHead, target given, T = 2,
# alpha = 0.5. The jsd workload drops the T^2 factor so that its loss is Liger's (which has none).
WORKLOADS = {
    "llm-kl": (2048, 512, 32000, 512, "kl", True, ("cpu",)),
    "llm-jsd": (2048, 512, 32000, 512, "jsd", False, ("cpu",)),
    "llm-8k": (8192, 2048, 128256, 4096, "jsd", False, ("cuda",)),
}
T, ALPHA, BETA = 2.0, 0.5, 0.5


def _inputs(n, h, v, ht, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(n, h, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    w = (torch.randn(v, h, generator=g) * h ** -0.5).to(device=device, dtype=dtype).requires_grad_(True)
    th = torch.randn(n, ht, generator=g).to(device=device, dtype=dtype)
    tw = (torch.randn(v, ht, generator=g) * ht ** -0.5).to(device=device, dtype=dtype)
    y = torch.randint(0, v, (n,), generator=g).to(device)
    return x, w, th, tw, y


def _liger(divergence, scale_t2):
    """Liger's fused linear JSD at the same loss, or a skip that says why not."""
    if divergence != "jsd" or scale_t2:
        pytest.skip("Liger-Kernel's fused linear distillation peer is JSD without T^2")
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError as exc:
        pytest.skip(f"Liger-Kernel is not installed ({exc}); `pip install --no-deps liger-kernel` adds this row")
    loss = LigerFusedLinearJSDLoss(weight_hard_loss=1 - ALPHA, weight_soft_loss=ALPHA, beta=BETA, temperature=T)
    return lambda x, w, th, tw, y: loss(x, w, th, tw, y)


@pytest.mark.parametrize("impl", IMPLS + ("liger",))
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_fused_linear(benchmark, device, impl, workload):
    n, h, v, ht, divergence, scale_t2, devices = WORKLOADS[workload]
    if device not in devices:
        pytest.skip(f"{workload} is a {'/'.join(devices)} workload")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x, w, th, tw, y = _inputs(n, h, v, ht, device, dtype)
    options = dict(target=y, temperature=T, alpha=ALPHA, divergence=divergence, beta=BETA, scale_t2=scale_t2)
    if impl == "liger":
        call = _liger(divergence, scale_t2)
    else:
        call = make_impl(impl,
                         lambda x, w, th, tw, y: kdfast.fused_linear_kd(x, w, kdfast.TeacherHead(th, tw), **options),
                         lambda x, w, th, tw, y: reference.fused_linear_kd(x, w, kdfast.TeacherHead(th, tw),
                                                                           **options))

    def step():
        call(x, w, th, tw, y).backward()
        x.grad = w.grad = None

    elt = x.element_size()
    # Must move: read hidden states and both heads, write the gradients of hidden states and weight.
    bytes_moved = elt * (2 * n * h + n * ht + 2 * v * h + v * ht)
    # Student logits, teacher logits, and the two gradient products: 2 N V (3 H + Ht) multiply-adds x 2.
    flops = 2.0 * n * v * (3 * h + ht)
    measure(benchmark, step, op="fused_linear_kd", workload=workload, impl=impl, device=device,
            bytes_moved=bytes_moved, flops=flops, rounds=3 if device == "cpu" else None, shape=[n, h, v, ht],
            dtype=str(dtype).replace("torch.", ""), divergence=divergence)


def interleaved(workload: str, impls, rounds: int = 3) -> dict:
    """Median seconds per fwd+bwd step of each impl, the impls' steps alternating round by round so that a shared
    machine's load falls on all of them alike (the suite's rows run one after another)."""
    import statistics
    import time

    n, h, v, ht, divergence, scale_t2, _ = WORKLOADS[workload]
    x, w, th, tw, y = _inputs(n, h, v, ht, "cpu", torch.float32)
    options = dict(target=y, temperature=T, alpha=ALPHA, divergence=divergence, beta=BETA, scale_t2=scale_t2)
    calls = {}
    for impl in impls:
        calls[impl] = _liger(divergence, scale_t2) if impl == "liger" else make_impl(
            impl, lambda x, w, th, tw, y: kdfast.fused_linear_kd(x, w, kdfast.TeacherHead(th, tw), **options),
            lambda x, w, th, tw, y: reference.fused_linear_kd(x, w, kdfast.TeacherHead(th, tw), **options))
    times = {impl: [] for impl in impls}
    for r in range(rounds + 1):  # round 0 warms up (and compiles)
        for impl in impls:
            t0 = time.perf_counter()
            calls[impl](x, w, th, tw, y).backward()
            x.grad = w.grad = None
            if r:
                times[impl].append(time.perf_counter() - t0)
    return {impl: statistics.median(ts) for impl, ts in times.items()}


if __name__ == "__main__":  # python benchmarks/bench_fused_linear.py WORKLOAD IMPL... (side-by-side timing)
    import sys

    result = interleaved(sys.argv[1], sys.argv[2:])
    base = result[sys.argv[2]]
    for impl, seconds in result.items():
        print(f"{sys.argv[1]} {impl}: {seconds:.2f} s ({seconds / base:.2f}x {sys.argv[2]})")
