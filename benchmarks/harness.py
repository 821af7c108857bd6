"""The benchmark suite's one way to time an op: forward + backward, its peak memory, and the bytes and FLOPs
that bound it (its roofline), recorded into pytest-benchmark's JSON for benchmarks/report.py.

A bench file parametrises over workloads and IMPLS and calls
    measure(benchmark, step, op=..., workload=..., impl=..., device=..., bytes_moved=..., flops=...)
where step() runs one forward + backward (and drops the gradients it made). `impl` is "kdfast" (the extension),
"reference" (kdfast.reference in eager mode) or "compiled" (torch.compile of the reference); make_impl() builds
the callable for each. A peer implementation (e.g. Liger-Kernel on GPU) is one more impl name.
"""
from __future__ import annotations

import os

import torch

IMPLS = ("kdfast", "reference", "compiled")


def bench_device() -> str:
    return os.environ.get("KDFAST_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_impl(impl: str, kdfast_fn, reference_fn):
    """The callable of one implementation. `compiled` is torch.compile of the reference (compiled on first call)."""
    if impl == "kdfast":
        return kdfast_fn
    if impl == "reference":
        return reference_fn
    if impl == "compiled":
        # A fresh compile per row: rows share the reference's code objects, and recompiles across rows would hit
        # dynamo's recompile limit (then the row would time guard failures, not the compiled code).
        torch._dynamo.reset()
        return torch.compile(reference_fn, dynamic=False)
    raise ValueError(f"unknown impl {impl!r}")


def _allocated_peak(step) -> int:
    """Peak of the bytes held by torch's CPU allocator during step(), above the level before it, from the
    profiler's allocation and free records (CPU torch keeps no allocator statistics of its own)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    records = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                     key=lambda e: e.start_ns())
    held = peak = 0
    for e in records:
        held += e.nbytes()
        peak = max(peak, held)
    return peak


def peak_memory(step, device: str) -> int:
    """Bytes allocated above the level before step(), at its peak: CUDA's caching allocator statistics, or on
    CPU the profiler's record of torch's allocations (so timing runs with the allocator as users have it)."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return _allocated_peak(step)


def measure(benchmark, step, *, op: str, workload: str, impl: str, device: str, bytes_moved: float,
            flops: float = 0.0, rounds: int | None = None, **extra) -> None:
    """Warm up (this compiles the `compiled` impl), take the peak memory of one step, then time `rounds` steps."""
    for _ in range(2):
        step()
    sync(device)
    peak = peak_memory(step, device)

    def timed():
        step()
        sync(device)

    benchmark.extra_info.update(op=op, workload=workload, impl=impl, device=device, bytes=float(bytes_moved),
                                flops=float(flops), peak_bytes=int(peak), **extra)
    benchmark.pedantic(timed, rounds=rounds or (20 if device == "cuda" else 5), iterations=1, warmup_rounds=1)


def copy_bandwidth(device: str, nbytes: int = 1 << 28) -> float:
    """Measured memory bandwidth in bytes/s of a large copy (bytes read + written), the yardstick of the report."""
    import time

    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        y.copy_(x)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best
