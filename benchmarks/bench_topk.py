"""topk_kd_div forward + backward (student requires grad, teacher top-k frozen), and the vocabulary-parallel losses
over 2 gloo ranks.

Besides kdfast, reference (kdfast.reference, eager) and compiled, the topk rows time what a user writes without
kdfast ("user": softmax of the teacher's log-probs, full log_softmax of the student, gather) and its torch.compile
("user-compiled"): the baselines the top-k targets are stated against.
"""
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from harness import IMPLS, make_impl, measure

import kdfast
from kdfast import reference

# name: (rows, V, k, dtype, devices)
WORKLOADS = {
    "llm": (1024, 32000, 64, torch.float32, ("cpu",)),
    "llm-8k": (8192, 32000, 64, torch.bfloat16, ("cuda",)),
    "llm-128k": (4096, 128256, 100, torch.bfloat16, ("cuda",)),
}
T = 2.0
ROUNDS = 5
PEER_IMPLS = ("user", "user-compiled")


def user_topk_kd(s, idx, lp):
    """The plain PyTorch a user writes for top-k KD."""
    q = (lp / T).softmax(-1)
    logp = (s.float() / T).log_softmax(-1).gather(-1, idx)
    return (q * (q.log() - logp)).sum(-1).mean() * (T * T)


def user_sampled_kd(s, idx, counts, lp):
    """The plain PyTorch a user writes for KD on a sampled teacher (the draws' frequencies weigh the log-ratios)."""
    w = counts.float() / counts.sum(-1, keepdim=True).float()
    logp = (s.float() / T).log_softmax(-1).gather(-1, idx)
    terms = torch.where(counts > 0, w * (lp - logp), 0.0)  # padding (count 0, log-probability -inf) adds nothing
    return terms.sum(-1).mean() * (T * T)


SAMPLED_DRAWS = 12  # draws a position (the LLM demo's sampled store keeps 12: 96 bytes a token)
# op: (the plain PyTorch a user writes, kdfast's call, the reference's call), each on (student, *teacher)
OPS = {
    "topk_kd_div": (user_topk_kd, lambda s, i, lp: kdfast.topk_kd_div(s, i, lp, T),
                    lambda s, i, lp: reference.topk_kd_div(s, i, lp, T)),
    "sampled_kd_div": (user_sampled_kd, lambda s, i, c, lp: kdfast.sampled_kd_div(s, kdfast.Sampled(i, c, lp), T),
                       lambda s, i, c, lp: reference.sampled_kd_div(s, kdfast.Sampled(i, c, lp), T)),
}


def _inputs(op, rows, V, k, dtype, device):
    """The student (requires grad) and the teacher's tensors: its top-k, or SAMPLED_DRAWS draws at T."""
    g = torch.Generator(device="cpu").manual_seed(0)
    s = (torch.randn(rows, V, generator=g) * 3).to(device=device, dtype=dtype).requires_grad_(True)
    t = torch.randn(rows, V, generator=g) * 3
    if op == "topk_kd_div":
        teacher = kdfast.topk_from_logits(t, k)
    else:
        teacher = kdfast.sample_from_logits(t, SAMPLED_DRAWS, T, generator=g)
    return s, [x.to(device) for x in teacher]


def _call(op, impl):
    user, fn, ref = OPS[op]
    if impl in PEER_IMPLS:
        if impl == "user":
            return user
        torch._dynamo.reset()
        return torch.compile(user, dynamic=False)
    return make_impl(impl, fn, ref)


@pytest.mark.parametrize("impl", [*IMPLS, *PEER_IMPLS])
@pytest.mark.parametrize("workload", list(WORKLOADS))
@pytest.mark.parametrize("op", list(OPS))
def test_topk(benchmark, device, op, impl, workload):
    rows, V, k, dtype, devices = WORKLOADS[workload]
    if device not in devices:
        pytest.skip(f"{workload} is a {'/'.join(devices)} workload")
    s, teacher = _inputs(op, rows, V, k, dtype, device)
    call = _call(op, impl)

    def step():
        call(s, *teacher).backward()
        s.grad = None

    n, elt = s.numel(), s.element_size()
    # Must move: forward reads s; backward reads s and writes grad s (the k entries are negligible).
    measure(benchmark, step, op=op, workload=workload, impl=impl, device=device, bytes_moved=3 * n * elt,
            flops=0, shape=[rows, V], k=k if op == "topk_kd_div" else SAMPLED_DRAWS,
            dtype=str(dtype).replace("torch.", ""), grad_bytes=n * elt, rounds=ROUNDS)


# ---- vocabulary-parallel, 2 gloo ranks on CPU: this process is rank 0, a spawned helper is rank 1 ----
VP_ROWS, VP_SHARDS, VP_K = 1024, (16000, 16000), 64
# measure() runs the step 2 (warm-up) + 1 (peak memory) + 1 (warm-up round) + ROUNDS times; rank 1 matches it.
VP_STEPS = 4 + ROUNDS
VP_TIMEOUT = timedelta(seconds=300)  # a rank left alone gives up instead of hanging the suite


def _vp_step(fn, rank):
    g = torch.Generator().manual_seed(rank)
    s = (torch.randn(VP_ROWS, VP_SHARDS[rank], generator=g) * 3).requires_grad_(True)
    t = torch.randn(VP_ROWS, VP_SHARDS[rank], generator=g) * 3
    idx = torch.randint(0, sum(VP_SHARDS), (VP_ROWS, VP_K), generator=torch.Generator().manual_seed(9))
    lp = torch.randn(VP_ROWS, VP_K, generator=torch.Generator().manual_seed(8)).log_softmax(-1) - 1.0

    def step():
        if fn == "vocab_parallel_kd_div":
            loss = kdfast.distributed.vocab_parallel_kd_div(s, t, T)
        else:
            loss = kdfast.distributed.vocab_parallel_topk_kd_div(s, idx, lp, T)
        loss.backward()
        s.grad = None

    return s, step


def _vp_helper(rank, port, fn):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=VP_TIMEOUT)
    _, step = _vp_step(fn, rank)
    for _ in range(VP_STEPS):
        step()
    dist.destroy_process_group()


@pytest.mark.parametrize("fn", ["vocab_parallel_kd_div", "vocab_parallel_topk_kd_div"])
def test_vocab_parallel(benchmark, device, fn):
    if device != "cpu":
        pytest.skip("the vocabulary-parallel row runs 2 gloo ranks on CPU")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    threads = torch.get_num_threads()
    ctx = mp.get_context("spawn").Process(target=_vp_helper, args=(1, port, fn))
    ctx.start()
    os.environ.pop("WORLD_SIZE", None)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=2,
                            timeout=VP_TIMEOUT)
    try:
        s, step = _vp_step(fn, 0)
        n = s.numel()
        measure(benchmark, step, op=fn, workload="llm-2rank", impl="kdfast", device="cpu",
                bytes_moved=(5 if fn == "vocab_parallel_kd_div" else 3) * n * 4, flops=0,
                shape=[VP_ROWS, sum(VP_SHARDS)], ranks=2, dtype="float32", grad_bytes=n * 4, rounds=ROUNDS)
    finally:
        dist.destroy_process_group()
        torch.set_num_threads(threads)
        ctx.join(timeout=60)
        if ctx.is_alive():  # it ran a different number of steps (e.g. --benchmark-disable): do not leave it behind
            ctx.kill()
