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
import re

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


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+)", f.read()).group(1))


def peak_memory(step, device: str) -> int:
    """Bytes allocated above the level before step(), at its peak. CUDA: the caching allocator's peak; CPU: the
    process's peak resident set (reset through /proc/self/clear_refs), which tracks allocations when large ones
    are mmapped (the bench runner sets MALLOC_MMAP_THRESHOLD_)."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    step()
    return max(0, _status_kib("VmHWM") - before) * 1024


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
