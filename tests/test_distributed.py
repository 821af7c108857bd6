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
CASES = [  # (function, tail (topk) or None, divergence, temperature, masked): every divergence on both tails
    ("kd_div", None, "kl", 1.0, False),
    ("kd_div", None, "kl", 2.0, True),
    ("kd_div", None, "reverse_kl", 0.5, True),
    ("kd_div", None, "jsd", 2.0, False),
    ("topk", "renormalize", "kl", 1.0, False),
    ("topk", "renormalize", "kl", 0.5, True),
    ("topk", "bucket", "kl", 1.0, False),
    ("topk", "bucket", "kl", 2.0, True),
    ("topk", "renormalize", "reverse_kl", 2.0, True),
    ("topk", "bucket", "reverse_kl", 0.5, False),
    ("topk", "renormalize", "jsd", 1.0, False),
    ("topk", "bucket", "jsd", 2.0, True),
]
BETA = 0.3  # jsd's
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


def _loss(fn, tail, divergence, T, masked, student, teacher, idx, lp, mask, parallel):
    kw = {"mask": mask if masked else None, "divergence": divergence, "beta": BETA}
    if fn == "kd_div":
        f = kdfast.distributed.vocab_parallel_kd_div if parallel else kdfast.kd_div
        return f(student, teacher, T, **kw)
    f = kdfast.distributed.vocab_parallel_topk_kd_div if parallel else kdfast.topk_kd_div
    return f(student, idx, lp, T, tail=tail, **kw)


def _run_cases(parallel, rank=0):
    """(loss, student gradient, teacher gradient) of every case (the teacher's: its logits', or for top-k its
    log-probabilities' on every rank): the whole vocabulary, or this rank's shard."""
    student, teacher, idx, lp, mask = _inputs()
    lo = sum(SHARDS[:rank])
    hi = lo + SHARDS[rank]
    out = []
    for fn, tail, divergence, T, masked in CASES:
        s = (student[:, lo:hi] if parallel else student).clone().requires_grad_(True)
        t = (teacher[:, lo:hi] if parallel else teacher).clone().requires_grad_(fn == "kd_div")
        lpg = lp.clone().requires_grad_(fn == "topk")
        loss = _loss(fn, tail, divergence, T, masked, s, t, idx, lpg, mask, parallel)
        loss.backward()
        out.append((loss.detach(), s.grad, t.grad if fn == "kd_div" else lpg.grad))
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


def _spawn(worker, path):
    """Runs worker(rank, port, path) in 2 processes, within TIMEOUT_S."""
    ctx = mp.spawn(worker, args=(_free_port(), path), nprocs=2, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the 2-rank run did not finish within {TIMEOUT_S} s")


def test_two_gloo_ranks_match_one_process(tmp_path):
    path = str(tmp_path / "vp")
    _spawn(_worker, path)
    single = _run_cases(False)
    ranks = [torch.load(f"{path}.{r}") for r in range(2)]
    for c, case in enumerate(CASES):
        loss, gs, gt = single[c]
        lo = 0
        for r, width in enumerate(SHARDS):
            rl, rgs, rgt = ranks[r][c]
            assert (rl - loss).abs().item() < 1e-5, (case, r)
            assert (rgs - gs[:, lo:lo + width]).abs().max().item() < 1e-6, (case, r)
            want = gt[:, lo:lo + width] if case[0] == "kd_div" else gt
            assert (rgt - want).abs().max().item() < 1e-6, (case, r)
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
    with pytest.raises(ValueError, match="divergence must be one of"):
        kdfast.distributed.vocab_parallel_topk_kd_div(s, idx, lp, divergence="kl2")


def test_single_rank_group_is_the_single_process_loss(tmp_path):
    """A world of one (gloo, this process): the same loss and gradient as the single-process functions."""
    os.environ.pop("WORLD_SIZE", None)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1,
                            timeout=timedelta(seconds=30))
    try:
        student, teacher, idx, lp, mask = _inputs(seed=1)
        for fn, tail, divergence, T, masked in CASES:
            a = student.clone().requires_grad_(True)
            b = student.clone().requires_grad_(True)
            lpa = lp.clone().requires_grad_(True)  # the teacher's log-probs' gradient too
            lpb = lp.clone().requires_grad_(True)
            la = _loss(fn, tail, divergence, T, masked, a, teacher, idx, lpa, mask, True)
            lb = _loss(fn, tail, divergence, T, masked, b, teacher, idx, lpb, mask, False)
            la.backward()
            lb.backward()
            torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)
            if fn == "topk":
                torch.testing.assert_close(lpa.grad, lpb.grad, rtol=1e-4, atol=1e-7)
    finally:
        dist.destroy_process_group()


# ---- DTensor inputs: kd_div, topk_kd_div and fused_linear_kd on a 2-process DeviceMesh ----

DT_V, DT_ROWS, DT_H = 999, 12, 16  # the vocabulary splits unevenly (torch.chunk: 500 + 499)
DT_CASES = [  # (name, options)
    ("kd_div", dict(divergence="kl", temperature=1.0)),
    ("kd_div", dict(divergence="reverse_kl", temperature=2.0, masked=True)),
    ("kd_div", dict(divergence="jsd", beta=0.3, temperature=1.5, reduction="sum")),
    ("kd_div", dict(divergence="jsd", temperature=20.0, masked=True)),  # float64 inside (precise temperatures)
    ("kd_div_dim1", dict(divergence="kl", temperature=2.0, reduction="sum")),
    ("kd_div_replicated", dict(divergence="jsd", temperature=2.0)),
    ("topk", dict(tail="renormalize", temperature=2.0, masked=True)),
    ("topk", dict(tail="bucket", temperature=1.0)),
    ("topk", dict(tail="renormalize", divergence="reverse_kl", temperature=1.0)),
    ("topk", dict(tail="bucket", divergence="jsd", beta=0.3, temperature=2.0, masked=True)),
    ("fused_dense", dict(temperature=2.0)),
    ("fused_head", dict(temperature=1.0, divergence="jsd", alpha=0.5)),
    ("fused_topk", dict(temperature=2.0, tail="bucket", alpha=0.25)),
    # num_items_in_batch, Sampled teachers, soft-capping and logit scales (as number and as tensor)
    ("topk", dict(tail="bucket", divergence="reverse_kl", temperature=2.0, masked=True, items=7.0)),
    ("sampled", dict(temperature=2.0, masked=True)),
    ("sampled", dict(temperature=2.0, items=torch.tensor(9.0))),
    ("fused_dense", dict(temperature=2.0, alpha=0.5, softcap=5.0, logit_scale=0.7, items=torch.tensor(9.0),
                         items_replicated=True)),
    ("fused_head", dict(temperature=1.0, logit_scale=1.5, teacher_softcap=4.0, teacher_logit_scale=1.3)),
    ("fused_topk", dict(temperature=2.0, divergence="jsd", beta=0.3, softcap=6.0, items=5.0)),
    ("fused_sampled", dict(temperature=2.0, alpha=0.5, softcap=5.0)),
]


def _dt_inputs():
    g = torch.Generator().manual_seed(3)
    data = dict(student=torch.randn(DT_ROWS, DT_V, generator=g) * 3,
                teacher=torch.randn(DT_ROWS, DT_V, generator=g) * 3,
                mask=torch.rand(DT_ROWS, generator=g) > 0.3, hidden=torch.randn(DT_ROWS, DT_H, generator=g),
                weight=torch.randn(DT_V, DT_H, generator=g) * 0.5, bias=torch.randn(DT_V, generator=g),
                t_hidden=torch.randn(DT_ROWS, 8, generator=g), t_weight=torch.randn(DT_V, 8, generator=g),
                target=torch.randint(0, DT_V, (DT_ROWS,), generator=g))
    data["target"][2] = -100
    data["idx"], data["lp"] = kdfast.topk_from_logits(data["teacher"], 16)
    data["sampled"] = kdfast.sample_from_logits(data["teacher"], 8, 2.0, generator=g)  # with padding (repeats)
    return data


def _dt_case(name, opts, d, make):
    """(loss, gradients) of one case; make(tensor, shard_dim or None) gives the tensor the call takes: the full
    tensor in one process, a DTensor (Shard(shard_dim), or replicated for None) on the mesh."""
    T, items = opts["temperature"], opts.get("items")
    if opts.get("items_replicated"):  # a replicated DTensor num_items_in_batch
        items = make(items, None)
    mask = d["mask"] if opts.get("masked") else None
    if name.startswith("kd_div"):
        replicated = name == "kd_div_replicated"
        s, t = d["student"], d["teacher"]
        dim = 1 if name == "kd_div_dim1" else -1
        if dim == 1:  # (rows, V, 2): the classes along dim 1
            s, t = torch.stack([s, s.flip(0)], -1), torch.stack([t, t.flip(0)], -1)
            mask = None
        s = make(s, None if replicated else dim % s.dim(), grad=True)
        t = make(t, None if replicated else dim % t.dim(), grad=True)
        loss = kdfast.kd_div(s, t, T, divergence=opts["divergence"], beta=opts.get("beta", 0.5), dim=dim, mask=mask,
                             reduction=opts.get("reduction", "batchmean"))
        leaves = [s, t]
    elif name == "topk":
        s = make(d["student"], 1, grad=True)
        lp = d["lp"].clone().requires_grad_(True)
        loss = kdfast.topk_kd_div(s, d["idx"], lp, T, tail=opts["tail"], divergence=opts.get("divergence", "kl"),
                                  beta=opts.get("beta", 0.5), mask=mask, num_items_in_batch=items)
        leaves = [s, lp]
    elif name == "sampled":
        s = make(d["student"], 1, grad=True)
        idx, counts, lp = d["sampled"]
        lp = lp.clone().requires_grad_(True)
        loss = kdfast.sampled_kd_div(s, kdfast.Sampled(idx, counts, lp), T, mask=mask, num_items_in_batch=items)
        leaves = [s, lp]
    else:
        w = make(d["weight"], 0, grad=True)
        b = make(d["bias"], 0, grad=True)
        h = d["hidden"].clone().requires_grad_(True)
        if name == "fused_dense":
            teacher = make(d["teacher"], 1)
        elif name == "fused_head":
            teacher = kdfast.TeacherHead(d["t_hidden"], make(d["t_weight"], 0), softcap=opts.get("teacher_softcap"),
                                         logit_scale=opts.get("teacher_logit_scale", 1.0))
        elif name == "fused_topk":
            teacher = kdfast.TopK(d["idx"], d["lp"])
        else:
            teacher = d["sampled"]
        alpha = opts.get("alpha", 1.0)
        loss = kdfast.fused_linear_kd(h, w, teacher, student_bias=b, target=d["target"] if alpha != 1 else None,
                                      temperature=T, alpha=alpha, divergence=opts.get("divergence", "kl"),
                                      beta=opts.get("beta", 0.5), tail=opts.get("tail", "renormalize"), chunk_size=5,
                                      softcap=opts.get("softcap"), logit_scale=opts.get("logit_scale", 1.0),
                                      num_items_in_batch=items)
        leaves = [w, b, h]
    loss.backward()
    return loss, [x.grad for x in leaves]


def _dt_worker(rank, port, path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        mesh = init_device_mesh("cpu", (2,))
        d = _dt_inputs()

        def make(x, shard_dim, grad=False):
            out = distribute_tensor(x.clone(), mesh, [Replicate() if shard_dim is None else Shard(shard_dim)])
            return out.requires_grad_(grad)

        out = []
        for name, opts in DT_CASES:
            loss, grads = _dt_case(name, opts, d, make)
            assert isinstance(loss, DTensor) and loss.placements == (Replicate(),), (name, loss)
            out.append((loss.to_local().detach(),
                        [g.to_local() if isinstance(g, DTensor) else g for g in grads]))
        # A placement other than the vocabulary's is refused by name.
        rows_sharded = distribute_tensor(d["student"], mesh, [Shard(0)])
        try:
            kdfast.kd_div(rows_sharded, rows_sharded)
        except ValueError as exc:
            out.append(str(exc))
        torch.save(out, f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


def test_dtensor_inputs_match_one_process(tmp_path):
    path = str(tmp_path / "dt")
    _spawn(_dt_worker, path)
    d = _dt_inputs()
    ranks = [torch.load(f"{path}.{r}") for r in range(2)]
    for c, (name, opts) in enumerate(DT_CASES):
        loss, grads = _dt_case(name, opts, d, lambda x, shard_dim, grad=False: x.clone().requires_grad_(grad))
        where = f"{name} {opts}"
        for r in range(2):
            rl, rgrads = ranks[r][c]
            torch.testing.assert_close(rl, loss.detach(), rtol=1e-5, atol=1e-6,
                                       msg=lambda m, where=where: f"{where}: {m}")
            for g, rg in zip(grads, rgrads):
                if rg.shape != g.shape:  # a shard: this rank's chunk along the sharded dim
                    dim = [i for i in range(g.dim()) if rg.shape[i] != g.shape[i]][0]
                    g = g.chunk(2, dim)[r]
                torch.testing.assert_close(rg, g, rtol=1e-4, atol=1e-6, msg=lambda m, where=where: f"{where}: {m}")
    for r in range(2):
        message = ranks[r][-1]
        assert "Shard(dim=0)" in message or "S(0)" in message, message
        assert "Shard(1)" in message, message


@pytest.mark.parametrize("shape", [(5, 37, 1), (3, 2500, 1), (2, 19, 11)])  # short rows, long rows, pixel mode
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_kd_partial_fwd_with_the_rows_own_statistics_is_kd_fwd(shape, dtype):
    """kd_partial_fwd (the shard pass of vocabulary-parallel jsd) given the maxima and log-sums of the classes it sees
    gives kd_fwd's jsd statistics (unclamped div), on each kernel layout; opcheck on the op."""
    if not kdfast.backends()["cpu"]:
        pytest.skip("needs the extension")
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(shape, generator=g) * 3).to(dtype)
    t = (torch.randn(shape, generator=g) * 3).to(dtype)
    div, _, stats = torch.ops.kdfast.kd_fwd(s, t, None, 2.0, "jsd", 0.3, -100)
    pdiv, pstats = torch.ops.kdfast.kd_partial_fwd(s, t, stats[:4].clone(), 2.0, "jsd", 0.3)
    torch.testing.assert_close(pstats, stats, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(pdiv.clamp_min(0), div, rtol=1e-6, atol=1e-7)
    torch.library.opcheck(torch.ops.kdfast.kd_partial_fwd, (s, t, stats[:4].clone(), 2.0, "jsd", 0.3))
    with pytest.raises(ValueError, match="kd_partial_fwd computes jsd's partial sums, got 'kl'"):
        torch.ops.kdfast.kd_partial_fwd(s, t, stats[:4].clone(), 2.0, "kl", 0.3)


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_kd_bwd_writes_a_one_class_shard(divergence):
    """kd_bwd given the whole vocabulary's statistics writes a shard's slice of the gradients, also for a shard of
    one class (V_rank = 1: uneven shards), which the op zeroed as if that class were the whole row."""
    if not kdfast.backends()["cpu"]:
        pytest.skip("needs the extension")
    g = torch.Generator().manual_seed(0)
    s, t = (torch.randn(2, 3, 5, 1, generator=g, dtype=torch.float64) * 2).unbind(0)
    _, _, stats = torch.ops.kdfast.kd_fwd(s, t, None, 2.0, divergence, 0.3, -100)
    ones = torch.ones(3, 1, dtype=torch.float64)
    full = torch.ops.kdfast.kd_bwd(ones, None, s, t, None, stats, 2.0, divergence, 0.3, -100, True, True)
    assert all(x.abs().min() > 0 for x in full)
    for c in range(5):
        part = torch.ops.kdfast.kd_bwd(ones, None, s[:, c:c + 1], t[:, c:c + 1], None, stats, 2.0, divergence, 0.3,
                                       -100, True, True)
        for p, f in zip(part, full):
            torch.testing.assert_close(p, f[:, c:c + 1])


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_bucket_tail_is_formed_in_log_space(tmp_path, divergence):
    """A float32 student whose top-k hold all but ~3e-10 of its mass: the bucket's student tail comes from the
    classes off the top-k (1 - sum p[idx] would round to 0 and be floored at eps, off by 0.3 here): the loss and
    gradients match the float64 reference, for every divergence."""
    os.environ.pop("WORLD_SIZE", None)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1,
                            timeout=timedelta(seconds=30))
    try:
        student = torch.full((3, 100), -25.0)
        student[:, :5] = 0.0
        student[1, 50] = -24.0
        idx = torch.arange(5).repeat(3, 1)
        lp = torch.log(torch.full((3, 5), 0.19))  # the teacher's tail: 0.05
        s32 = student.clone().requires_grad_(True)
        s64 = student.double().requires_grad_(True)
        lp32 = lp.clone().requires_grad_(True)
        lp64 = lp.double().requires_grad_(True)
        got = kdfast.distributed.vocab_parallel_topk_kd_div(s32, idx, lp32, tail="bucket", divergence=divergence,
                                                            beta=0.3)
        want = kdfast.reference.topk_kd_div(s64, idx, lp64, tail="bucket", divergence=divergence, beta=0.3)
        got.backward()
        want.backward()
        assert want.item() > 0.01
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(lp32.grad.double(), lp64.grad, rtol=1e-4, atol=1e-6)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("T", [1.0, 14.6])
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl"])
def test_student_and_teacher_at_different_offsets(tmp_path, divergence, T):
    """Student logits around 1.2e5 against a teacher around 0: the shard's mean log-ratio is taken against the
    maxima, never the raw logits (which cancelled in float32: a relative error of 1.6e-2 at T = 14.6)."""
    os.environ.pop("WORLD_SIZE", None)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1,
                            timeout=timedelta(seconds=30))
    try:
        g = torch.Generator().manual_seed(3)
        student = (1.2e5 + torch.randn(6, 64, generator=g, dtype=torch.float64) * 4).float().requires_grad_()
        teacher = (torch.randn(6, 64, generator=g, dtype=torch.float64) * 4).float().requires_grad_()
        got = kdfast.distributed.vocab_parallel_kd_div(student, teacher, T, divergence=divergence)
        s64, t64 = (x.detach().double().requires_grad_() for x in (student, teacher))
        want = kdfast.reference.kd_div(s64, t64, T, divergence=divergence)
        got.backward()
        want.backward()
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
        for a, b in ((student.grad, s64.grad), (teacher.grad, t64.grad)):
            assert (a.double() - b).abs().max() <= 1e-4 * b.abs().max()
    finally:
        dist.destroy_process_group()
