"""kd_div and kd_loss, forward + backward (student requires grad, teacher frozen), per workload.

Classification rows (64 x 10 .. 256 x 1000, and 2 x 2 for the per-call cost) compare kdfast with the code a user
writes (`eager`: F.kl_div of two log_softmax, times T^2, plus F.cross_entropy for kd_loss), its torch.compile, and
F.cross_entropy on the same logits (the floor: one native op, autograd in C++). `python benchmarks/bench_logits.py`
times them interleaved (round-robin, so that the machine's load falls on every implementation alike) and prints a
markdown table.
"""
import statistics
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from harness import make_impl, measure

import kdfast
from kdfast import reference

# name: (shape, dim, dtype, devices)
WORKLOADS = {
    "cifar": ((128, 100), -1, torch.float32, ("cpu", "cuda")),
    "imagenet": ((256, 1000), -1, torch.float32, ("cpu", "cuda")),
    "llm": ((1024, 32000), -1, torch.float32, ("cpu",)),
    "llm-8k": ((8192, 32000), -1, torch.bfloat16, ("cuda",)),
    "llm-128k": ((4096, 128256), -1, torch.bfloat16, ("cuda",)),
    "pixel": ((2, 19, 128, 256), 1, torch.float32, ("cpu",)),
    "pixel-b8": ((8, 19, 128, 256), 1, torch.float32, ("cuda",)),
}
T = 4.0
ALPHA = 0.9
CLASSIFICATION = [(2, 2), (64, 10), (128, 100), (1024, 100), (128, 1000), (256, 1000)]
CLASSIFICATION_IMPLS = ("kdfast", "eager", "compiled", "cross_entropy")


def eager_kd_div(s, t, y):
    return F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
                    reduction="batchmean") * (T * T)


def eager_kd_loss(s, t, y):
    return ALPHA * eager_kd_div(s, t, y) + (1 - ALPHA) * F.cross_entropy(s, y)


def classification_impl(impl, fn):
    """The callable of one implementation of kd_div / kd_loss on (B, C) logits with targets."""
    eager = eager_kd_div if fn == "kd_div" else eager_kd_loss
    if impl == "kdfast":
        if fn == "kd_div":
            return lambda s, t, y: kdfast.kd_div(s, t, T)
        return lambda s, t, y: kdfast.kd_loss(s, t, y, T, ALPHA)
    if impl == "eager":
        return eager
    if impl == "compiled":
        torch._dynamo.reset()
        return torch.compile(eager, dynamic=False)
    if impl == "cross_entropy":
        return lambda s, t, y: F.cross_entropy(s, y)
    raise ValueError(f"unknown impl {impl!r}")


def _inputs(shape, dtype, device, dim):
    g = torch.Generator(device="cpu").manual_seed(0)
    s = (torch.randn(shape, generator=g) * 3).to(device=device, dtype=dtype).requires_grad_(True)
    t = (torch.randn(shape, generator=g) * 3).to(device=device, dtype=dtype)
    rows = shape[:dim % len(shape)] + shape[dim % len(shape) + 1:]
    y = torch.randint(0, shape[dim], rows, generator=g).to(device)
    return s, t, y


@pytest.mark.parametrize("fn", ["kd_div", "kd_loss"])
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_logits(benchmark, device, impl, workload, fn):
    shape, dim, dtype, devices = WORKLOADS[workload]
    if device not in devices:
        pytest.skip(f"{workload} is a {'/'.join(devices)} workload")
    s, t, y = _inputs(shape, dtype, device, dim)
    if fn == "kd_div":
        call = make_impl(impl, lambda s, t, y: kdfast.kd_div(s, t, T, dim=dim),
                         lambda s, t, y: reference.kd_div(s, t, T, dim=dim))
    else:
        call = make_impl(impl, lambda s, t, y: kdfast.kd_loss(s, t, y, T, 0.9, dim=dim),
                         lambda s, t, y: reference.kd_loss(s, t, y, T, 0.9, dim=dim))

    def step():
        call(s, t, y).backward()
        s.grad = None

    n, elt = s.numel(), s.element_size()
    # Must move: forward reads s and t; backward reads s and t and writes grad s.
    measure(benchmark, step, op=fn, workload=workload, impl=impl, device=device, bytes_moved=5 * n * elt,
            flops=0, shape=list(shape), dtype=str(dtype).replace("torch.", ""), grad_bytes=n * elt)


@pytest.mark.parametrize("fn", ["kd_div", "kd_loss"])
@pytest.mark.parametrize("impl", CLASSIFICATION_IMPLS)
@pytest.mark.parametrize("shape", CLASSIFICATION, ids=lambda s: f"cls-{s[0]}x{s[1]}")
def test_classification(benchmark, device, impl, shape, fn):
    if impl == "cross_entropy" and fn == "kd_loss":
        pytest.skip("the floor row is timed once, under kd_div")
    s, t, y = _inputs(shape, torch.float32, device, -1)
    call = classification_impl(impl, fn)

    def step():
        call(s, t, y).backward()
        s.grad = None

    n = s.numel() * 4
    measure(benchmark, step, op=fn, workload=f"cls-{shape[0]}x{shape[1]}", impl=impl, device=device,
            bytes_moved=5 * n, shape=list(shape), dtype="float32", grad_bytes=n)


def interleaved(shapes, rounds=15, budget_s=0.02):
    """Median microseconds per forward + backward of every classification implementation, timed round-robin."""
    rows = []
    for shape in shapes:
        s, t, y = _inputs(shape, torch.float32, "cpu", -1)
        calls = {(fn, impl): classification_impl(impl, fn) for fn in ("kd_div", "kd_loss")
                 for impl in CLASSIFICATION_IMPLS if not (impl == "cross_entropy" and fn == "kd_loss")}
        for call in calls.values():  # warm up (compiles)
            for _ in range(3):
                call(s, t, y).backward()
        t0 = time.perf_counter()
        calls[("kd_div", "eager")](s, t, y).backward()
        reps = max(1, int(budget_s / max(time.perf_counter() - t0, 1e-6)))
        times = {k: [] for k in calls}
        for _ in range(rounds):
            for k, call in calls.items():
                t0 = time.perf_counter()
                for _ in range(reps):
                    call(s, t, y).backward()
                times[k].append((time.perf_counter() - t0) / reps * 1e6)
        rows.append((shape, {k: statistics.median(v) for k, v in times.items()}))
    return rows


def markdown(rows):
    out = ["| rows x classes | fn | kdfast us | eager us | compiled us | cross_entropy us | vs eager | vs compiled "
           "| kdfast / cross_entropy |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for shape, m in rows:
        ce = m[("kd_div", "cross_entropy")]
        for fn in ("kd_div", "kd_loss"):
            k, e, c = m[(fn, "kdfast")], m[(fn, "eager")], m[(fn, "compiled")]
            out.append(f"| {shape[0]} x {shape[1]} | {fn} | {k:.1f} | {e:.1f} | {c:.1f} | {ce:.1f} | {e / k:.2f}x "
                       f"| {c / k:.2f}x | {k / ce:.2f} |")
    return "\n".join(out)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0].startswith("--threads="):
        torch.set_num_threads(int(args.pop(0).split("=")[1]))
    shapes = [tuple(int(v) for v in a.split("x")) for a in args] or CLASSIFICATION
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, T = {T}, forward + backward, "
          f"median of interleaved rounds")
    print(markdown(interleaved(shapes)))
