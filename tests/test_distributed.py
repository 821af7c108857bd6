"""kdfast.distributed over 2 gloo processes (loopback, bounded time) with uneven vocabulary shards of 430 and 570
columns: the loss on every rank and each rank's gradient slice against the single-process loss on the whole
vocabulary."""
import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kdfast

SHARDS = (430, 570)
CASES = [  # (function, tail, temperature, masked)
    ("kd_div", None, 1.0, False),
    ("kd_div", None, 2.0, True),
    ("topk", "renormalize", 1.0, False),
    ("topk", "renormalize", 0.5, True),
    ("topk", "bucket", 1.0, False),
    ("topk", "bucket", 2.0, True),
]
TIMEOUT_S = 240


def _inputs(seed=0, rows=24, k=20):
    g = torch.Generator().manual_seed(seed)
    V = sum(SHARDS)
    student = torch.randn(rows, V, generator=g) * 3
    teacher = torch.randn(rows, V, generator=g) * 3
    idx, lp = kdfast.topk_from_logits(teacher, k)
    idx, lp = idx.clone(), lp.clone()
    lp[::3, -4:] = float("-inf")  # padding, index 0 repeated
    idx[::3, -4:] = 0
    lp[5] = float("-inf")  # a row the server returned nothing for
    mask = torch.rand(rows, generator=g) > 0.3
    return student, teacher, idx.int(), lp, mask


def _loss(fn, tail, T, masked, student, teacher, idx, lp, mask, parallel):
    kw = {"mask": mask if masked else None}
    if fn == "kd_div":
        f = kdfast.distributed.vocab_parallel_kd_div if parallel else kdfast.kd_div
        return f(student, teacher, T, **kw)
    f = kdfast.distributed.vocab_parallel_topk_kd_div if parallel else kdfast.topk_kd_div
    return f(student, idx, lp, T, tail=tail, **kw)


def _run_cases(parallel, rank=0):
    """(loss, student gradient, teacher gradient or None) of every case: the whole vocabulary, or this rank's shard."""
    student, teacher, idx, lp, mask = _inputs()
    lo = sum(SHARDS[:rank])
    hi = lo + SHARDS[rank]
    out = []
    for fn, tail, T, masked in CASES:
        s = (student[:, lo:hi] if parallel else student).clone().requires_grad_(True)
        t = (teacher[:, lo:hi] if parallel else teacher).clone().requires_grad_(fn == "kd_div")
        loss = _loss(fn, tail, T, masked, s, t, idx, lp, mask, parallel)
        loss.backward()
        out.append((loss.detach(), s.grad, t.grad))
    return out


def _worker(rank, port, path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        torch.save(_run_cases(True, rank), f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_one_process(tmp_path):
    path = str(tmp_path / "vp")
    ctx = mp.spawn(_worker, args=(_free_port(), path), nprocs=2, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the 2-rank run did not finish within {TIMEOUT_S} s")
    single = _run_cases(False)
    ranks = [torch.load(f"{path}.{r}") for r in range(2)]
    for c, case in enumerate(CASES):
        loss, gs, gt = single[c]
        lo = 0
        for r, width in enumerate(SHARDS):
            rl, rgs, rgt = ranks[r][c]
            assert (rl - loss).abs().item() < 1e-5, (case, r)
            assert (rgs - gs[:, lo:lo + width]).abs().max().item() < 1e-6, (case, r)
            if gt is not None:
                assert (rgt - gt[:, lo:lo + width]).abs().max().item() < 1e-6, (case, r)
            lo += width


def test_needs_a_process_group():
    s = torch.randn(2, 5)
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        kdfast.distributed.vocab_parallel_kd_div(s, s)
    idx, lp = kdfast.topk_from_logits(s, 2)
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        kdfast.distributed.vocab_parallel_topk_kd_div(s, idx, lp)
    with pytest.raises(ValueError, match="tail must be one of"):
        kdfast.distributed.vocab_parallel_topk_kd_div(s, idx, lp, tail="zero")


def test_single_rank_group_is_the_single_process_loss(tmp_path):
    """A world of one (gloo, this process): the same loss and gradient as the single-process functions."""
    os.environ.pop("WORLD_SIZE", None)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1,
                            timeout=timedelta(seconds=30))
    try:
        student, teacher, idx, lp, mask = _inputs(seed=1)
        for fn, tail, T, masked in CASES:
            a = student.clone().requires_grad_(True)
            b = student.clone().requires_grad_(True)
            lpa = lp.clone().requires_grad_(True)  # the teacher's log-probs' gradient too
            lpb = lp.clone().requires_grad_(True)
            la = _loss(fn, tail, T, masked, a, teacher, idx, lpa, mask, True)
            lb = _loss(fn, tail, T, masked, b, teacher, idx, lpb, mask, False)
            la.backward()
            lb.backward()
            torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)
            if fn == "topk":
                torch.testing.assert_close(lpa.grad, lpb.grad, rtol=1e-4, atol=1e-7)
    finally:
        dist.destroy_process_group()
