"""The GPU check's headline benchmarks: forward + backward of each op on the shapes that matter on a GPU, kdfast
against eager PyTorch (kdfast.reference, or what a user writes), torch.compile of it, and the peers where they
exist (cuSOLVER for the SVD, Liger-Kernel's chunked JSD loss for the fused linear row when it is importable), in
one process, beside a device-to-device copy that is the bandwidth yardstick.

    python3 benchmarks/gpu_bench.py [--device cuda] [--dry-run] [--deadline SECONDS] [-k SUBSTRING]

Timing: each implementation is warmed up (the first call compiles), its peak memory is read over one more step
(CUDA allocator statistics), then `reps` steps are timed one by one with CUDA events and the median is reported.
Rows are ordered by importance; each (row, implementation) prints `@@ROW {json}` as soon as it is measured, and
rows that no longer fit before --deadline print status "not-run". --dry-run runs every row on tiny shapes with
torch.compile's "eager" backend (no code generation), so that the script is exercised without a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from gpu_report import ROW  # noqa: E402

import kdfast  # noqa: E402
from kdfast import reference  # noqa: E402

T = 4.0
BF16, F32 = torch.bfloat16, torch.float32
COMPILE_BACKEND = "inductor"


class Absent(Exception):
    """An implementation this row needs is not in this installation."""


@dataclass
class Setup:
    """One row, built: impl name -> zero-argument forward returning the loss; the leaves whose gradients a step
    makes (dropped after it); the bytes and FLOPs that bound it; what else to record."""
    impls: dict
    leaves: list
    bytes: float
    flops: float = 0.0
    info: dict = field(default_factory=dict)


@dataclass
class Row:
    op: str
    workload: str
    dtype: torch.dtype
    shape: tuple  # the GPU shape
    tiny: tuple  # the dry run's
    build: Callable  # (shape, dtype, device) -> Setup
    inner: int = 1  # calls per timed repetition: the per-call row times many small calls

    @property
    def id(self) -> str:
        return f"{self.op}/{self.workload}/{str(self.dtype)[6:]}"


def _compiled(fn):
    torch._dynamo.reset()  # a fresh compile per row: rows share the reference's code objects
    return torch.compile(fn, dynamic=False, backend=COMPILE_BACKEND)


def _trio(kdfast_fn, eager_fn, args, eager_name="eager") -> dict:
    """kdfast, eager and torch.compile of eager, each bound to the same inputs."""
    compiled = _compiled(eager_fn)
    return {"kdfast": lambda: kdfast_fn(*args), eager_name: lambda: eager_fn(*args),
            "compiled": lambda: compiled(*args)}


def _gen(device, seed):
    return torch.Generator(device).manual_seed(seed)


def _randn(shape, dtype, device, seed, scale=1.0, grad=False):
    """Random data drawn on the device itself (drawing a GPU row's gigabytes on the CPU takes seconds)."""
    x = torch.randn(shape, generator=_gen(device, seed), device=device) * scale
    return x.to(dtype).requires_grad_(grad)


def _labels(classes, shape, device, seed):
    return torch.randint(0, classes, shape, generator=_gen(device, seed), device=device)


def logits(fn: str):
    def build(shape, dtype, device):
        s = _randn(shape, dtype, device, 0, 3.0, grad=True)
        t = _randn(shape, dtype, device, 1, 3.0)
        y = _labels(shape[-1], shape[:-1], device, 2)
        if fn == "kd_div":
            impls = _trio(lambda s, t, y: kdfast.kd_div(s, t, T), lambda s, t, y: reference.kd_div(s, t, T), (s, t, y))
        else:
            impls = _trio(lambda s, t, y: kdfast.kd_loss(s, t, y, T, 0.9),
                          lambda s, t, y: reference.kd_loss(s, t, y, T, 0.9), (s, t, y))
        # Must move: the forward reads s and t, the backward reads them again and writes grad s.
        return Setup(impls, [s], 5 * s.numel() * s.element_size(), info={"shape": list(shape)})
    return build


def topk(shape, dtype, device):
    rows, vocab, k = shape
    fn, ref = getattr(kdfast, "topk_kd_div", None), getattr(reference, "topk_kd_div", None)
    if fn is None or ref is None:
        raise Absent("kdfast.topk_kd_div or reference.topk_kd_div")
    s = _randn((rows, vocab), dtype, device, 0, 3.0, grad=True)
    lp, idx = torch.log_softmax(_randn((rows, vocab), F32, device, 1, 3.0), -1).topk(k, -1)
    impls = _trio(lambda s, i, lp: fn(s, i, lp, 1.0), lambda s, i, lp: ref(s, i, lp, 1.0), (s, idx, lp.to(dtype)))
    return Setup(impls, [s], (3 * s.numel() + rows * k * 3) * s.element_size(), info={"shape": list(shape)})


def unfused_jsd(h, w, ht, wt, y):
    """What a user writes without a fused op: both vocabularies' logits in full, then the loss."""
    with torch.no_grad():
        teacher = ht @ wt.T
    return reference.kd_loss(h @ w.T, teacher, y, 1.0, 0.5, divergence="jsd")


def fused_linear(shape, dtype, device):
    bt, vocab, hs, ht_ = shape
    fn, head = getattr(kdfast, "fused_linear_kd", None), getattr(kdfast, "TeacherHead", None)
    if fn is None or head is None:
        raise Absent("kdfast.fused_linear_kd")
    h = _randn((bt, hs), dtype, device, 0, grad=True)
    w = _randn((vocab, hs), dtype, device, 1, hs ** -0.5, grad=True)
    ht = _randn((bt, ht_), dtype, device, 2)
    wt = _randn((vocab, ht_), dtype, device, 3, ht_ ** -0.5)
    y = _labels(vocab, (bt,), device, 4)
    impls = _trio(lambda h, w, ht, wt, y: fn(h, w, head(ht, wt), target=y, alpha=0.5, divergence="jsd", beta=0.5),
                  unfused_jsd, (h, w, ht, wt, y))
    info = {"shape": {"BT": bt, "V": vocab, "H_student": hs, "H_teacher": ht_}}
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except Exception as exc:  # absent, or present without what it needs (triton): the row runs without it
        info["liger"] = f"not importable ({type(exc).__name__}: {exc}); carry its wheel in .whl/ (docs/gpu-check.md)"
    else:  # its own torch.compile of the chunk loss only on the GPU: the dry run generates no code
        liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.5,
                                        compiled=COMPILE_BACKEND == "inductor")
        impls["liger"] = lambda: liger(h, w, ht, wt, y)
    elt = h.element_size()
    # Must move: read both sides' hidden states and weights, write the student's hidden and weight gradients.
    nbytes = (2 * h.numel() + 2 * w.numel() + ht.numel() + wt.numel()) * elt
    return Setup(impls, [h, w], nbytes, 2 * bt * vocab * (3 * hs + ht_), info)


def attention(shape, dtype, device):
    batch, s_shapes, t_shapes = shape
    ss = [_randn((batch, *c), dtype, device, i, grad=True) for i, c in enumerate(s_shapes)]
    ts = [_randn((batch, *c), dtype, device, 10 + i) for i, c in enumerate(t_shapes)]
    impls = _trio(kdfast.attention_transfer_loss, reference.attention_transfer_loss, (ss, ts))
    nbytes = (3 * sum(s.numel() for s in ss) + sum(t.numel() for t in ts)) * ss[0].element_size()
    info = {"student": [list(c) for c in s_shapes], "teacher": [list(c) for c in t_shapes], "batch": batch}
    return Setup(impls, ss, nbytes, info=info)


def pairwise(shape, dtype, device):
    s_shape, t_shape = shape
    s = _randn(s_shape, dtype, device, 0, grad=True)
    t = _randn(t_shape, dtype, device, 1)
    impls = _trio(kdfast.pairwise_affinity_loss, reference.pairwise_affinity_loss, (s, t))
    b, cs, ct, n = s_shape[0], s_shape[1], t_shape[1], s_shape[2] * s_shape[3]
    info = {"student": list(s_shape), "teacher": list(t_shape), "nodes": n}
    # Must move: the forward reads s and t, the backward reads them again and writes grad s. FLOPs of the Gram route.
    return Setup(impls, [s], (3 * s.numel() + 2 * t.numel()) * s.element_size(), 2 * b * n * (cs + ct) * (2 * cs + ct),
                 info)


def _svd_loss(svd):
    def loss(a):
        U, S, Vh = svd(a)
        return U.sum() + S.sum() + Vh.sum()
    return loss


def svd(shape, dtype, device):
    a = _randn(shape, dtype, device, 0, grad=True)
    # The eager reference is torch.linalg.svd: on CUDA, cuSOLVER's batched solver.
    impls = _trio(_svd_loss(kdfast.batched_svd), _svd_loss(reference.batched_svd), (a,), eager_name="cusolver")
    batch, m, n = shape
    k = min(m, n)
    return Setup(impls, [a], 2 * 4 * batch * (m * n + m * k + k + k * n), info={"shape": list(shape)})


IMAGENET_S = ((64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7))  # ResNet-18 stages
IMAGENET_T = ((256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7))  # ResNet-50 stages
TINY_ATTENTION = (2, ((3, 5, 5), (4, 3, 3)), ((6, 5, 5), (8, 3, 3)))

# In order of importance: a call cut short keeps the rows that carry the GPU targets (docs/gpu-check.md).
ROWS = [
    Row("kd_div", "llm-8k", F32, (8192, 32000), (5, 33), logits("kd_div")),
    Row("kd_div", "llm-8k", BF16, (8192, 32000), (5, 33), logits("kd_div")),
    Row("kd_div", "per-call-2x2", F32, (2, 2), (2, 2), logits("kd_div"), inner=100),
    Row("fused_linear_kd", "liger-8k-128k", BF16, (8192, 128256, 2048, 4096), (16, 64, 8, 12), fused_linear),
    Row("kd_div", "cifar", F32, (128, 100), (3, 5), logits("kd_div")),
    Row("kd_div", "imagenet", F32, (256, 1000), (3, 7), logits("kd_div")),
    Row("kd_loss", "llm-8k", BF16, (8192, 32000), (5, 33), logits("kd_loss")),
    Row("kd_loss", "cifar", F32, (128, 100), (3, 5), logits("kd_loss")),
    Row("kd_loss", "imagenet", F32, (256, 1000), (3, 7), logits("kd_loss")),
    Row("batched_svd", "svd32", F32, (4096, 32, 32), (3, 4, 4), svd),
    Row("attention_transfer", "imagenet-b256", BF16, (256, IMAGENET_S, IMAGENET_T), TINY_ATTENTION, attention),
    Row("pairwise_affinity", "n4096", F32, ((8, 128, 64, 64), (8, 512, 64, 64)), ((2, 3, 4, 4), (2, 5, 4, 4)),
        pairwise),
    Row("pairwise_affinity", "n65536", F32, ((1, 64, 256, 256), (1, 64, 256, 256)), ((1, 3, 8, 8), (1, 3, 8, 8)),
        pairwise),
    Row("topk_kd_div", "llm-8k-128k-k64", BF16, (8192, 128256, 64), (5, 33, 4), topk),
    Row("batched_svd", "svd64", F32, (1024, 64, 64), (3, 6, 6), svd),
    Row("kd_div", "cifar", BF16, (128, 100), (3, 5), logits("kd_div")),
    Row("kd_div", "imagenet", BF16, (256, 1000), (3, 7), logits("kd_div")),
    Row("kd_loss", "llm-8k", F32, (8192, 32000), (5, 33), logits("kd_loss")),
    Row("attention_transfer", "imagenet-b64", F32, (64, IMAGENET_S, IMAGENET_T), TINY_ATTENTION, attention),
    Row("kd_div", "llm-4k-128k", BF16, (4096, 128256), (5, 33), logits("kd_div")),
]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(step, device: str, reps: int, inner: int) -> list:
    """Milliseconds per call of `reps` repetitions of `inner` calls: CUDA events around each repetition (host clock
    on the CPU)."""
    out = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                step()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                step()
            out.append((time.perf_counter() - t0) * 1e3 / inner)
    return out


def peak_bytes(step, device: str):
    """Bytes allocated above the level before one step, at its peak (None on the CPU: not measured here)."""
    if device != "cuda":
        return None
    sync(device)
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    sync(device)
    return torch.cuda.max_memory_allocated() - before


def copy_row(device: str, dry: bool, reps: int) -> dict:
    """The yardstick: a device-to-device copy of 1 GiB (1 MiB in the dry run), bytes read + written."""
    nbytes = (1 << 20) if dry else (1 << 30)
    x = torch.rand(nbytes // 4, device=device)
    y = torch.empty_like(x)
    ms = statistics.median(time_ms(lambda: y.copy_(x), device, reps, 1))
    return {"op": "copy", "workload": f"{nbytes >> 20} MiB", "dtype": "float32", "impl": "torch", "status": "ok",
            "median_ms": ms, "bytes": 2 * nbytes, "gbs": 2 * nbytes / ms / 1e6}


def measure(row: Row, name: str, forward, leaves, device: str, reps: int) -> dict:
    def step():
        forward().backward()
        for x in leaves:
            x.grad = None

    for _ in range(2 if reps > 1 else 1):  # warm up; the first call compiles
        step()
    sync(device)
    value = forward().detach().float().sum().item()
    peak = peak_bytes(step, device)
    times = time_ms(step, device, reps, row.inner)
    return {"status": "ok", "median_ms": statistics.median(times), "min_ms": min(times), "reps": reps,
            "peak_bytes": peak, "value": value}


def bench_row(row: Row, device: str, dry: bool, reps: int, emit) -> None:
    base = {"op": row.op, "workload": row.workload, "dtype": str(row.dtype)[6:], "row": row.id}
    try:
        setup = row.build(row.tiny if dry else row.shape, row.dtype, device)
    except Absent as exc:
        emit({**base, "impl": "kdfast", "status": "absent", "detail": f"{exc} is not in this installation"})
        return
    except Exception as exc:  # the row's inputs could not be made (out of memory, say): the next rows still run
        emit({**base, "impl": "kdfast", "status": "error", "detail": f"setting up: {type(exc).__name__}: {exc}"[:500]})
        return
    for name, forward in setup.impls.items():
        out = {**base, "impl": name, "bytes": setup.bytes, "flops": setup.flops, **setup.info}
        try:
            out.update(measure(row, name, forward, setup.leaves, device, reps))
            out["gbs"] = setup.bytes / out["median_ms"] / 1e6
        except torch.cuda.OutOfMemoryError as exc:
            out.update(status="oom", detail=str(exc).split("\n")[0][:300])
        except Exception as exc:  # a failing implementation is recorded; the others still run
            out.update(status="error", detail=f"{type(exc).__name__}: {exc}"[:500])
        for x in setup.leaves:
            x.grad = None
        if device == "cuda":
            torch.cuda.empty_cache()
        emit(out)


def main(argv=None) -> int:
    global COMPILE_BACKEND
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, torch.compile's eager backend")
    parser.add_argument("--deadline", type=float, default=None, help="seconds from now to stop starting rows")
    parser.add_argument("-k", default="", help="only the rows whose id (op/workload/dtype) contains this")
    args = parser.parse_args(argv)
    if args.dry_run:
        COMPILE_BACKEND = "eager"
    if args.device == "cuda" and not kdfast.backends()["cuda"]:
        print("kdfast has no CUDA kernels in this build", file=sys.stderr)
        return 1
    stop = time.monotonic() + args.deadline if args.deadline else None
    reps = 1 if args.dry_run else 20
    failed = 0

    def emit(row: dict) -> None:
        nonlocal failed
        failed += row["impl"] == "kdfast" and row["status"] in ("error", "oom")
        print(ROW + json.dumps(row), flush=True)

    emit(copy_row(args.device, args.dry_run, reps))
    rows = [r for r in ROWS if args.k in r.id]
    if args.dry_run:  # one row per op, dtype and way of timing: the others differ only in their GPU shapes
        kinds = {}
        for r in rows:
            kinds.setdefault((r.op, r.dtype, r.inner), r)
        rows = list(kinds.values())
    for row in rows:
        if stop is not None and time.monotonic() > stop:
            emit({"op": row.op, "workload": row.workload, "dtype": str(row.dtype)[6:], "row": row.id,
                  "impl": "kdfast", "status": "not-run", "detail": "no time left in this call"})
            continue
        bench_row(row, args.device, args.dry_run, reps, emit)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
