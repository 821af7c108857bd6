"""Differential fuzz: every public op against the float64 reference on random shapes, strides, dtypes,
temperatures, masks and extreme or -inf logits, values and gradients, at the accuracy docs/guarantees.md promises.

Each case draws its arguments from a generator seeded with (seed, op, case index), so a failure names the command
that reruns it alone. CI runs a fixed number of cases per op with seed 0; `make fuzz` runs a time budget
(KDFAST_FUZZ_SECONDS, shared by the ops) with another seed. Environment:
  KDFAST_FUZZ_SEED     seed (default 0)
  KDFAST_FUZZ_CASES    cases per op (default: CASES below), unless
  KDFAST_FUZZ_SECONDS  seconds for all ops together, split evenly
  KDFAST_FUZZ_CASE     run only this case index (to reproduce a failure)
The number of cases each op ran is printed (pytest -s) and, with KDFAST_FUZZ_REPORT=file, appended to that file.
"""
import itertools
import json
import math
import os
import random
import time

import pytest
import torch

import kdfast
from kdfast import reference
from kdfast._features import affinity_nodes

SEED = int(os.environ.get("KDFAST_FUZZ_SEED", "0"))
SECONDS = float(os.environ.get("KDFAST_FUZZ_SECONDS", "0"))
ONLY = os.environ.get("KDFAST_FUZZ_CASE")
CASES = {"kd_div": 300, "kd_loss": 150, "topk_kd_div": 60, "fused_linear_kd": 15, "attention": 30,
         "affinity": 20, "similarity_preserving": 20, "batched_svd": 15, "manifold": 10}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
INF = float("inf")

# The promises of docs/guarantees.md ("Accuracy"). acc: the error of the accumulation, relative to the size of the
# terms summed (for the logit losses: the probabilities times (1 + |log-ratio|)); out: the rounding of a result
# into its dtype, relative to the result.
ACC_ERROR = {torch.float32: 3e-5, torch.float64: 1e-11}
OUT_ERROR = {torch.float32: 2e-6, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# Feature ops: the error of value and gradient relative to the largest entry of the reference, per input dtype
# (half precision is computed in float32 and rounded once).
FEATURE_ERROR = {torch.float32: 5e-4, torch.float64: 1e-9, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def run_cases(op, case):
    """Runs case(rng, gen) for the op's cases: a count, or its share of the time budget."""
    share = SECONDS / len(CASES) if SECONDS else None
    start, done = time.monotonic(), 0
    for i in ([int(ONLY)] if ONLY is not None else itertools.count()):
        if share is None and ONLY is None and done >= int(os.environ.get("KDFAST_FUZZ_CASES", CASES[op])):
            break
        if share is not None and time.monotonic() - start > share:
            break
        rng = random.Random(f"{SEED}:{op}:{i}")
        gen = torch.Generator().manual_seed(rng.getrandbits(62))
        try:
            case(rng, gen)
        except Exception as e:  # an assertion, or an error where the reference has a value
            raise AssertionError(f"{op} case {i} failed (rerun: KDFAST_FUZZ_SEED={SEED} KDFAST_FUZZ_CASE={i} "
                                 f"python3 -m pytest tests/test_fuzz.py -k {op}): {type(e).__name__}: {e}") from e
        done += 1
    print(f"\nfuzz {op}: {done} cases, seed {SEED}")
    if os.environ.get("KDFAST_FUZZ_REPORT"):
        with open(os.environ["KDFAST_FUZZ_REPORT"], "a") as f:
            f.write(json.dumps({"op": op, "cases": done, "seed": SEED}) + "\n")


def pick_dtype(rng):
    return rng.choices(DTYPES, weights=[5, 2, 1, 2])[0]


def temperature(rng):
    """Mostly the usual range, sometimes anywhere in [1e-6, 1e6] (log-uniform), sometimes its ends."""
    u = rng.random()
    if u < 0.6:
        return rng.choice([1.0, 2.0, 4.0]) if rng.random() < 0.3 else math.exp(rng.uniform(math.log(0.5), math.log(20)))
    if u < 0.95:
        return 10 ** rng.uniform(-6, 6)
    return rng.choice([1e-6, 1e6, 16.0, 16.000001])


def randn(gen, shape):
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def leaf(x, dtype, rng):
    """x in dtype as a leaf that requires grad, sometimes a non-contiguous view of a larger tensor."""
    x = x.to(dtype)
    if x.dim() >= 2 and rng.random() < 0.25:
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
    elif x.dim() >= 1 and rng.random() < 0.15:
        x = torch.stack([x, x], -1)[..., 0]
    return x.detach().requires_grad_()


def weighted_sum(out, gen):
    """A random linear functional of an output (so every output entry gets its own gradient)."""
    if isinstance(out, (list, tuple)):
        return sum(weighted_sum(o, gen) for o in out)
    w = torch.rand(out.shape, generator=gen, dtype=torch.float64) + 0.5
    return (out.double() * w).sum()


def grads(fn, args, gen_seed):
    """fn(*args), and the gradients of a random functional of it with respect to the args that require grad."""
    out = fn(*args)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    if not leaves:
        return out, []
    loss = weighted_sum(out, torch.Generator().manual_seed(gen_seed))
    if not loss.requires_grad:
        return out, [torch.zeros_like(a) for a in leaves]
    return out, list(torch.autograd.grad(loss, leaves, allow_unused=True))


def as64(args):
    return [a.detach().double().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) and
            a.is_floating_point() else a for a in args]


def check_normwise(name, got, want, dtype, scale=None, rounded=None):
    """|got - want| <= FEATURE_ERROR[dtype] * max(max |want|, scale), plus OUT_ERROR[rounded] |want| entrywise when
    the result is rounded into the dtype `rounded` (a half-precision input's gradient)."""
    got, want = got.double(), want.double()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    finite = want.isfinite()
    assert torch.equal(got.isfinite(), finite) or not finite.all(), f"{name}: non-finite where the reference is not"
    assert torch.equal(got.isnan(), want.isnan()), f"{name}: NaN where the reference has none (or the reverse)"
    assert torch.equal(got[want.isinf()], want[want.isinf()]), f"{name}: finite where the reference is infinite"
    if not finite.any():
        return
    g, w = got[finite], want[finite]
    if not w.numel():
        return
    # scale: a number, or a tensor of want's shape (a floor per entry)
    scale = torch.as_tensor(0.0 if scale is None else scale, dtype=torch.float64).expand(want.shape)[finite]
    size = scale.clamp_min(float(w.abs().max()))
    excess = (g - w).abs() - OUT_ERROR.get(rounded, 0.0) * w.abs() - FEATURE_ERROR[dtype] * size - 1e-30
    k = int(excess.argmax())
    err = float(excess[k] + FEATURE_ERROR[dtype] * size[k])
    assert excess[k] <= 0, f"{name}: error (beyond the rounding) {err:.3g} vs size {float(size[k]):.3g} ({dtype})"


# ---------------------------------------------------------------------------------------------------------------
# kd_div and kd_loss: elementwise tolerances from the probabilities


def draw_logits(rng, gen, shape, T, classes_dim):
    """Student and teacher logits (float64) whose values over T spread between 0.01 and 50, around an offset of up
    to 1e4 T (float32 logits far from 0), sometimes nearly or exactly equal rows, -inf masks and extreme
    negative values. Returns s, t and which side (if any) holds one-sided -inf entries."""
    spread = T * 10 ** rng.uniform(-2, math.log10(50))
    offset = 0.0 if rng.random() < 0.5 else rng.choice([-1, 1]) * T * 10 ** rng.uniform(0, 4)
    offset = max(-1e30, min(1e30, offset))
    s = offset + spread * randn(gen, shape)
    u = rng.random()
    if u < 0.15:
        t = s.clone()
    elif u < 0.35:
        t = s + spread * 10 ** rng.uniform(-6, -1) * randn(gen, shape)
    else:
        t = offset + rng.uniform(-3, 3) * T + spread * rng.uniform(0.3, 3) * randn(gen, shape)
    classes = shape[classes_dim]
    first = [slice(None)] * len(shape)  # class 0 stays finite on both sides: no row is all -inf
    first[classes_dim] = slice(0, 1)
    if classes > 1 and rng.random() < 0.25:  # a vocabulary mask on both sides
        cols = 1 + torch.randperm(classes - 1, generator=gen)[: rng.randint(1, classes - 1)]
        idx = [slice(None)] * len(shape)
        idx[classes_dim] = cols
        s[tuple(idx)] = -INF
        t[tuple(idx)] = -INF
    side = None
    if classes > 1 and rng.random() < 0.2:  # some -inf on one side only
        side = rng.choice(["s", "t"])
        x = s if side == "s" else t
        hole = torch.rand(shape, generator=gen) < rng.uniform(0.05, 0.6)
        hole[tuple(first)] = False
        x[hole & x.isfinite()] = -INF
    if rng.random() < 0.1:  # extreme finite values
        x = s if rng.random() < 0.5 else t
        pos = torch.rand(shape, generator=gen) < 0.1
        pos[tuple(first)] = False
        x[pos & x.isfinite()] = offset - T * 10 ** rng.uniform(2, 6)
    return s, t, side


def fit(x, dtype):
    """Finite values clamped into dtype's range (a half-precision logit must not overflow to an infinity)."""
    big = torch.finfo(dtype).max
    return torch.where(x.isfinite(), x.clamp(-big, big), x)


def subnormal(dtype):
    """The smallest positive value of dtype: the rounding of a result below it."""
    return torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps


def kd_scales(s64, t64, T, dim):
    """Per element E = (p_s + p_t)(1 + |log p_s - log p_t|) (a -inf log-probability taken as -1e3, 0 where both
    probabilities are 0; finite ones as they are: a teacher log-probability of -4000 where the student has mass
    makes a divergence of thousands), per row A = sum of E, p_s + p_t and 1 + |log p_s - log p_t| (1 where
    infinite), from the float64 inputs."""
    ls, lt = torch.log_softmax(s64 / T, dim), torch.log_softmax(t64 / T, dim)
    p = ls.exp() + lt.exp()
    ls_f, lt_f = (torch.where(x == -INF, torch.full_like(x, -1e3), x) for x in (ls, lt))
    e = torch.where(p > 0, p * (1 + (ls_f - lt_f).abs()), torch.zeros_like(p))
    r = 1 + (ls - lt).abs()
    return e, e.sum(dim, keepdim=True), p, torch.where(r.isfinite(), r, torch.ones_like(r))


def in_range(want, dtype):
    """A reference value beyond dtype's range is an infinity of its sign in dtype."""
    big = torch.finfo(dtype).max
    return torch.where(want.abs() > big, want.sign() * INF, want)


def check_kd(name, got, want, bound, dtype=torch.float64):
    """|got - want| <= bound elementwise, with NaN and inf where the reference has them. A reference beyond dtype's
    range is an infinity of its sign in dtype."""
    got, want = got.double(), in_range(want.double(), dtype)
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.equal(got.isnan(), want.isnan()), \
        f"{name}: NaN pattern differs (got {int(got.isnan().sum())}, reference {int(want.isnan().sum())})"
    inf = want.isinf()
    assert torch.equal(got[inf], want[inf]), f"{name}: the reference is infinite where this is not"
    ok = ~want.isnan() & ~inf
    err = (got[ok] - want[ok]).abs()
    excess = err / bound.expand(want.shape)[ok]
    bad = excess > 1
    if bad.any():
        k = int(excess.argmax())
        raise AssertionError(f"{name}: {int(bad.sum())} entries off, worst {float(got[ok][k]):.9g} for "
                             f"{float(want[ok][k]):.9g} (bound {float(bound.expand(want.shape)[ok][k]):.3g})")


def kd_case(rng, gen, with_target):
    T = temperature(rng)
    ndim = rng.choice([1, 2, 2, 2, 3])
    classes = rng.choice([1, 2, 3, 7, 16, 33, 100, 257, 1000, 1023, 1024, 1025, 1500, 2049, 4099])
    rows = rng.randint(0, max(1, min(6, 12000 // classes)))
    if ndim == 1:
        shape, dim = (classes,), 0
    elif ndim == 2:
        shape, dim = (rows, classes), rng.choice([-1, 1])
    else:
        inner = rng.randint(1, 5)
        shape, dim = ((rows, classes, inner), 1) if rng.random() < 0.6 else ((rows, inner, classes), -1)
    d = dim % len(shape)
    s64, t64, side = draw_logits(rng, gen, shape, T, d)
    divergence = rng.choice(["kl", "reverse_kl", "jsd"])
    # One-sided -inf entries go where the divergence stays finite (kl: the teacher's, reverse_kl: the student's), but
    # sometimes to the other side: the value is then infinite in float64, and finite where the other side's
    # probability underflows in float32 (it adds nothing there), never NaN.
    infinite = side is not None and divergence != "jsd" and rng.random() < 0.3
    if side is not None and divergence != "jsd" and (side == ("s" if divergence == "kl" else "t")) != infinite:
        s64, t64 = t64, s64
    beta = rng.uniform(0.01, 0.99) if rng.random() < 0.6 else 0.5
    ds, dt = pick_dtype(rng), pick_dtype(rng)
    s, t = leaf(fit(s64, ds), ds, rng), leaf(fit(t64, dt), dt, rng)
    teacher_grad = rng.random() < 0.5
    t.requires_grad_(teacher_grad)
    row_shape = shape[:d] + shape[d + 1:]
    nan = rng.random() < 0.05 and s.numel() > 0
    if nan:
        with torch.no_grad():
            s[torch.unravel_index(torch.tensor(rng.randrange(s.numel())), s.shape)] = float("nan")
    if with_target:
        alpha = rng.choice([0.0, 1.0, rng.random()])
        y = torch.randint(0, classes, row_shape, generator=gen)
        y[torch.rand(row_shape, generator=gen) < 0.2] = -100
        kw = dict(divergence=divergence, beta=beta, dim=dim)

        def fn(a, b):
            return kdfast.kd_loss(a, b, y, T, alpha, **kw)

        def ref(a, b):
            return reference.kd_loss(a, b, y, T, alpha, **kw)
        reduction, kept = "batchmean", y != -100
    else:
        reduction = rng.choice(["batchmean", "sum", "none"])  # "mean" is refused on logits
        mask = torch.rand(row_shape, generator=gen) < 0.8 if rng.random() < 0.3 else None
        kw = dict(divergence=divergence, beta=beta, dim=dim, mask=mask, reduction=reduction,
                  scale_t2=rng.random() < 0.85)

        def fn(a, b):
            return kdfast.kd_div(a, b, T, **kw)

        def ref(a, b):
            return reference.kd_div(a, b, T, **kw)
        kept = mask if mask is not None else torch.ones(row_shape, dtype=torch.bool)
    seed = rng.getrandbits(62)
    out, g = grads(fn, (s, t), seed)
    want, wg = grads(ref, as64((s, t)), seed)
    out_dtype = torch.float64 if torch.float64 in (ds, dt) else torch.float32
    assert out.dtype == out_dtype, f"loss dtype {out.dtype}, want {out_dtype} ({ds}, {dt}, T={T})"
    if nan:
        assert torch.equal(out.isnan(), want.isnan()), "NaN in gives NaN out (and only in its row)"
        return
    if infinite:
        # NaN only where the reference has it (alpha * inf is NaN when alpha = 0). The reference's gradients of an
        # infinite divergence are NaN, also on rows a mask or ignore_index leaves out (where kdfast gives 0).
        assert not (out.isnan() & ~want.isnan()).any(), f"an infinite divergence gave {out} (reference {want})"
        if not want.isfinite().all():
            return
        wg = [torch.where(w.isnan(), torch.zeros_like(w), w) if w is not None else None for w in wg]
    # the bounds: the accumulator's error times the size of the terms, the output's rounding times the result
    acc = torch.float64 if (out_dtype == torch.float64 or T > 16) else torch.float32
    e, a, p, r = kd_scales(s.detach().double(), t.detach().double(), T, d)
    n_kept = int(kept.sum())
    per_row = 1.0 / max(n_kept, 1) if reduction == "batchmean" else 1.0
    t2 = T * T if (with_target or kw["scale_t2"]) else 1.0
    kd_w = (alpha if with_target else 1.0) * t2 * per_row
    row_w = kept.double().unsqueeze(d) * kd_w
    ce_terms = 0.0
    if with_target:
        p1 = torch.softmax(s.detach().double(), d).nan_to_num(0.0)
        ce_w = (1 - alpha) / max(n_kept, 1)
        ce_terms = ce_w * kept.double().unsqueeze(d) * p1
        lse = torch.logsumexp(s.detach().double(), d)
        ce_val = (ce_w * kept.double() * (1 + lse.abs())).sum()
    # value: sum over counted rows of A, the unreduced row values per row
    if reduction == "none":
        v_bound = ACC_ERROR[acc] * (a.squeeze(d) * row_w.squeeze(d)) + OUT_ERROR[out_dtype] * want.detach().abs()
    else:
        v_bound = ACC_ERROR[acc] * float((a * row_w).sum()) + OUT_ERROR[out_dtype] * want.detach().abs()
        if with_target:
            v_bound = v_bound + ACC_ERROR[acc] * ce_val
    check_kd(f"value ({reduction}, {divergence}, T={T:.3g}, {ds}/{dt}, {tuple(shape)} dim={dim})", out.detach(),
             want.detach(), torch.as_tensor(v_bound, dtype=torch.float64))
    inv = 1.0 / T
    for name, x, gx, gw in (("student gradient", s, g[0], wg[0]), ("teacher gradient", t, g[1] if teacher_grad
                                                                      else None, wg[1] if teacher_grad else None)):
        if gx is None:
            continue
        assert gx.dtype == x.dtype and gx.shape == x.shape, f"{name}: dtype {gx.dtype} / shape {tuple(gx.shape)}"
        # probabilities below the accumulator's smallest normal number are not resolved (a fast exp flushes them)
        tiny = 4 * torch.finfo(acc).smallest_normal * (r + a)
        bound = ACC_ERROR[acc] * row_w * inv * (e + p * a) + row_w * inv * tiny + OUT_ERROR[x.dtype] * gw.abs() + \
            subnormal(x.dtype)
        if with_target and name == "student gradient":
            bound = bound + 4 * ACC_ERROR[acc] * ce_terms + ce_w * 4 * torch.finfo(acc).smallest_normal
        check_kd(f"{name} ({reduction}, {divergence}, T={T:.3g}, {ds}/{dt}, {tuple(shape)} dim={dim})", gx, gw, bound,
                 x.dtype)


def test_fuzz_kd_div():
    run_cases("kd_div", lambda rng, gen: kd_case(rng, gen, False))


def test_fuzz_kd_loss():
    run_cases("kd_loss", lambda rng, gen: kd_case(rng, gen, True))


# ---------------------------------------------------------------------------------------------------------------
# topk_kd_div and fused_linear_kd


def topk_teacher(rng, gen, rows_shape, classes, k, dtype=torch.float32):
    """Distinct indices per row and the teacher's log-probabilities at T = 1 (a softmax of random logits, its
    top-k or random k), some entries padded with -inf."""
    logits = randn(gen, (*rows_shape, classes)) * rng.uniform(0.1, 8)
    lp = torch.log_softmax(logits, -1)
    if rng.random() < 0.5:
        lpk, idx = lp.topk(k, -1)
    else:
        idx = torch.argsort(torch.rand((*rows_shape, classes), generator=gen), -1)[..., :k]
        lpk = lp.gather(-1, idx)
    if k and rng.random() < 0.3:
        pad = torch.rand(lpk.shape, generator=gen) < 0.3
        lpk = lpk.masked_fill(pad, -INF)
        idx = idx.masked_fill(pad, 0)
    return idx, lpk.to(dtype)


def test_fuzz_topk_kd_div():
    def case(rng, gen):
        T = temperature(rng)
        classes = rng.choice([1, 2, 5, 64, 257, 1000, 3001])
        rows_shape = rng.choice([(0,), (1,), (3,), (2, 3)])
        k = rng.randint(0, min(classes, 40))
        tail = rng.choice(["renormalize", "bucket"])
        dtype = rng.choice([torch.float32, torch.float64, torch.bfloat16])
        s64, _, _ = draw_logits(rng, gen, (*rows_shape, classes), T, len(rows_shape))
        s64 = torch.where(s64.isfinite(), s64, torch.zeros_like(s64))  # the student is not masked here
        s = leaf(s64, dtype, rng)
        idx, lp = topk_teacher(rng, gen, rows_shape, classes, k, rng.choice([torch.float32, torch.float64]))
        reduction = rng.choice(["batchmean", "sum", "none"])
        mask = torch.rand(rows_shape, generator=gen) < 0.8 if rng.random() < 0.3 else None
        kw = dict(tail=tail, mask=mask, reduction=reduction, scale_t2=rng.random() < 0.8)
        seed = rng.getrandbits(62)
        out, g = grads(lambda a: kdfast.topk_kd_div(a, idx, lp, T, **kw), (s,), seed)
        # lp as given: the teacher's tail is taken as 0 within its dtype's rounding (docs/guarantees.md)
        want, wg = grads(lambda a: reference.topk_kd_div(a, idx, lp, T, **kw), as64((s,)), seed)
        t2 = T * T if kw["scale_t2"] else 1.0
        size = t2 * (1 + math.log(classes))  # the divergence of a row is at most about log(classes) + |log eps|
        check_normwise(f"topk value ({tail}, T={T:.3g}, k={k})", out.detach(), want.detach(),
                       torch.float32 if dtype != torch.float64 else dtype, size * 1e-2)
        gsize = (T if kw["scale_t2"] else 1 / T)
        check_normwise(f"topk gradient ({tail}, T={T:.3g}, k={k})", g[0], wg[0],
                       torch.float32 if dtype != torch.float64 else dtype, gsize * 1e-2, rounded=dtype)

    run_cases("topk_kd_div", case)


def test_fuzz_fused_linear_kd():
    def case(rng, gen):
        T = temperature(rng) if rng.random() < 0.5 else rng.uniform(0.5, 4)
        n, h, v = rng.randint(0, 9), rng.randint(1, 24), rng.choice([1, 3, 50, 300, 1100])
        dtype = rng.choice([torch.float32, torch.float64])
        hid = leaf(randn(gen, (n, h)), dtype, rng)
        w = leaf(randn(gen, (v, h)) * rng.uniform(0.1, 2), dtype, rng)
        b = leaf(randn(gen, (v,)), dtype, rng) if rng.random() < 0.5 else None
        form = rng.choice(["dense", "head", "topk"])
        if form == "dense":
            teacher = (randn(gen, (n, v)) * rng.uniform(0.1, 5)).to(dtype)
        elif form == "head":
            teacher = kdfast.TeacherHead(randn(gen, (n, 7)).to(dtype), randn(gen, (v, 7)).to(dtype),
                                         randn(gen, (v,)).to(dtype) if rng.random() < 0.5 else None)
        else:
            teacher = kdfast.TopK(*topk_teacher(rng, gen, (n,), v, rng.randint(1, min(v, 20)), dtype))
        target = None
        alpha = 1.0
        if rng.random() < 0.6:
            target = torch.randint(0, v, (n,), generator=gen)
            target[torch.rand(n, generator=gen) < 0.2] = -100
            alpha = rng.choice([0.0, 0.5, 1.0, rng.random()])
        kw = dict(student_bias=b, target=target, temperature=T, alpha=alpha,
                  divergence=rng.choice(["kl", "reverse_kl", "jsd"]) if form != "topk" else "kl",
                  tail=rng.choice(["renormalize", "bucket"]), chunk_size=rng.choice([None, 1, 3, 64]))
        args = (hid, w) + ((b,) if b is not None else ())

        def fn(x, y, *bias):
            return kdfast.fused_linear_kd(x, y, teacher, **{**kw, "student_bias": bias[0] if bias else None})

        def ref(x, y, *bias):
            tt = teacher
            if form == "dense":
                tt = teacher.double()
            elif form == "head":
                tt = kdfast.TeacherHead(*(z.double() if isinstance(z, torch.Tensor) else z for z in teacher))
            return reference.fused_linear_kd(x, y, tt, **{**kw, "student_bias": bias[0] if bias else None})
        seed = rng.getrandbits(62)
        out, g = grads(fn, args, seed)
        want, wg = grads(ref, as64(args), seed)
        t2 = T * T
        # natural size: T^2 (1 + log V) of the divergence, plus 1 + log V of the cross-entropy at T = 1 with a target
        check_normwise(f"fused value ({form}, T={T:.3g})", out.detach(), want.detach(), dtype,
                       1e-2 * (t2 + (target is not None)) * (1 + math.log(v)))
        size = max([float(x.detach().abs().max()) for x in (hid, w) if x.numel()] + [1.0])
        for name, gx, gw in zip(("hidden", "weight", "bias"), g, wg):
            check_normwise(f"fused {name} gradient ({form}, T={T:.3g})", gx, gw, dtype, 1e-2 * max(T, 1 / T) * size)

    run_cases("fused_linear_kd", case)


# ---------------------------------------------------------------------------------------------------------------
# Feature ops


def feature_case(rng, gen, op):
    dtype = pick_dtype(rng)
    b = rng.randint(0, 4)
    if op == "attention":
        nd = rng.choice([1, 2, 2, 3])
        small = tuple(rng.randint(1, 6) for _ in range(nd))
        large = tuple(x * rng.randint(1, 3) + rng.randint(0, 2) for x in small) if rng.random() < 0.4 else small
        if rng.random() < 0.5:
            small, large = large, small
        s = leaf(randn(gen, (b, rng.randint(1, 6), *small)) * rng.uniform(0.1, 5), dtype, rng)
        t = leaf(randn(gen, (b, rng.randint(1, 6), *large)) * rng.uniform(0.1, 5), pick_dtype(rng), rng)
        p = rng.choice([1.0, 2.0, 2.0, 0.5, 3.0, 4.5])
        pool = rng.choice(["mean", "sum", "max"])
        if rng.random() < 0.3:
            fn = lambda x: kdfast.attention_map(x, p, pool=pool)  # noqa: E731
            rf = lambda x: reference.attention_map(x, p, pool=pool)  # noqa: E731
            args = (s,)
        else:
            red = rng.choice(["mean", "sum", "none"])
            fn = lambda x, y: kdfast.attention_transfer_loss(x, y, p, pool=pool, reduction=red)  # noqa: E731
            rf = lambda x, y: reference.attention_transfer_loss(x, y, p, pool=pool, reduction=red)  # noqa: E731
            args = (s, t)
    elif op == "affinity":
        hw = (rng.randint(1, 9), rng.randint(1, 9))
        s = leaf(randn(gen, (b, rng.randint(1, 6), *hw)), dtype, rng)
        t = leaf(randn(gen, (b, rng.randint(1, 6), *hw)), pick_dtype(rng), rng)
        ps = rng.choice([None, 2, (2, 3)])
        pool = rng.choice(["max", "avg"])
        red = rng.choice(["mean", "sum", "none"])
        if rng.random() < 0.25:
            fn = lambda x: kdfast.affinity_graph(x, pool_size=ps, pool=pool)  # noqa: E731
            rf = lambda x: reference.affinity_graph(x, pool_size=ps, pool=pool, acc=torch.float64)  # noqa: E731
            args = (s,)
        else:
            fn = lambda x, y: kdfast.pairwise_affinity_loss(x, y, pool_size=ps, pool=pool, reduction=red)  # noqa
            rf = lambda x, y: reference.pairwise_affinity_loss(x, y, pool_size=ps, pool=pool, reduction=red)  # noqa
            args = (s, t)
    elif op == "similarity_preserving":
        s = leaf(randn(gen, (b, *[rng.randint(1, 5) for _ in range(rng.randint(1, 3))])), dtype, rng)
        t = leaf(randn(gen, (b, rng.randint(1, 30))), pick_dtype(rng), rng)
        red = rng.choice(["mean", "sum", "none"])
        fn = lambda x, y: kdfast.similarity_preserving_loss(x, y, reduction=red)  # noqa: E731
        rf = lambda x, y: reference.similarity_preserving_loss(x, y, reduction=red)  # noqa: E731
        args = (s, t)
    elif op == "batched_svd":
        m, n = rng.randint(1, 12), rng.randint(1, 12)
        k = min(m, n)
        # well-separated singular values (the gradients of U and V go as 1 / gap)
        sv = torch.tensor(sorted(rng.sample(range(1, 4 * k + 1), k), reverse=True), dtype=torch.float64)
        q1 = torch.linalg.qr(randn(gen, (b, m, k)))[0]
        q2 = torch.linalg.qr(randn(gen, (b, n, k)))[0]
        A = leaf(q1 @ torch.diag_embed(sv.expand(b, k)) @ q2.mT, rng.choice([torch.float32, torch.float64]), rng)
        dtype = A.dtype
        fn = lambda x: _svd_invariants(kdfast.batched_svd(x))  # noqa: E731
        rf = lambda x: _svd_invariants(reference.batched_svd(x))  # noqa: E731
        args = (A,)
    else:  # manifold
        sets, pts, rank = rng.randint(1, 3), rng.randint(3, 10), rng.randint(1, 3)
        ds_, dt_ = rng.randint(rank + 1, 8), rng.randint(rank + 1, 8)

        def low_rank(d):  # a clear gap after `rank` singular values
            base = randn(gen, (sets, pts, rank)) @ randn(gen, (sets, rank, d)) * 3
            return base + 0.05 * randn(gen, (sets, pts, d))
        s, t = leaf(low_rank(ds_), rng.choice([torch.float32, torch.float64]), rng), leaf(low_rank(dt_), dtype, rng)
        dtype = torch.float64 if torch.float64 in (s.dtype, t.dtype) else torch.float32
        red = rng.choice(["mean", "sum"])
        if rng.random() < 0.3:
            fn = lambda x: kdfast.manifold_projection(x, rank).abs()  # noqa: E731
            rf = lambda x: reference.manifold_projection(x, rank).abs()  # noqa: E731
            args = (s,)
        else:
            fn = lambda x, y: kdfast.manifold_distillation_loss(x, y, rank, reduction=red)  # noqa: E731
            rf = lambda x, y: reference.manifold_distillation_loss(x, y, rank, reduction=red)  # noqa: E731
            args = (s, t)
    seed = rng.getrandbits(62)
    out, g = grads(fn, args, seed)
    want, wg = grads(rf, as64(args), seed)
    if op == "attention" and pool == "max" and max_pool_ties(args, p):
        g = wg = []  # two channels tie within rounding: the gradient may go to either (docs/guarantees.md)
    worst = max((a.dtype for a in args), key=lambda d: FEATURE_ERROR[d])
    # Floors where the reference is 0 by cancellation (one position, identical maps): these ops are homogeneous of
    # degree 0 in their features (normalised maps and graphs: gradients of order 1 / |x|) or 1 (SVD, projection).
    rms = max([float(a.detach().double().square().mean().sqrt()) for a in args if a.numel()] + [1e-30])
    degree0 = op in ("attention", "affinity", "similarity_preserving") or (op == "manifold" and len(args) == 2)
    value_floor, grad_floor = (1e-4, 1e-2 / rms) if degree0 else (1e-4 * rms, 1e-3)
    # The affinity graph normalises each node on its own: a node's gradient goes as |g| / |node| (g the gradient
    # reaching the normalised node), which a node of small norm among larger ones, or many nodes, makes much larger
    # than 1 / rms.
    if op == "affinity":
        grad_floors = affinity_grad_floors(args, ps, pool, None if len(args) == 1 else red, seed, grad_floor)
    elif op == "similarity_preserving":  # each sample's row of the Gram matrix is normalised on its own
        grad_floors = [torch.clamp_min(1e-2 / sample_norms(a), grad_floor) for a in args if a.requires_grad]
    elif op == "manifold":  # the projection onto the top `rank` directions goes as 1 / the gap after them
        grad_floors = [grad_floor * max([1.0] + [spectral_sensitivity(a, rank) for a in args]) for a in args
                       if a.requires_grad]
    else:
        grad_floors = [grad_floor for a in args if a.requires_grad]
    outs = out if isinstance(out, (list, tuple)) else [out]
    wants = want if isinstance(want, (list, tuple)) else [want]
    for o, w in zip(outs, wants):
        check_normwise(f"{op} value", o.detach(), w.detach(), worst, value_floor)
    for a, gx, gw, floor in zip([a for a in args if a.requires_grad], g, wg, grad_floors):
        assert gx is None or gx.dtype == a.dtype, f"{op}: gradient dtype {gx.dtype} for a {a.dtype} input"
        if gx is not None:  # a node clamped at norm 1e-8 has gradients of order 1e8, past float16's range
            check_normwise(f"{op} gradient", gx, in_range(gw, gx.dtype), worst, floor)


def max_pool_ties(args, p):
    """Whether a position of the maps attention's max pooling sees (after matching spatial sizes) has its two largest
    channels of |x|^p within 1e-5 of each other (relative): the arg-max there is the rounding's choice."""
    maps = [a.detach().double() for a in args]
    if len(maps) == 2:
        maps = list(kdfast.reference.match_spatial(*maps))
    for x in maps:
        if x.shape[1] < 2 or x.numel() == 0:
            continue
        top = x.abs().pow(p).topk(2, dim=1).values
        if ((top[:, 0] - top[:, 1]) <= 1e-5 * top[:, 0]).any():
            return True
    return False


def affinity_grad_floors(args, pool_size, pool, reduction, seed, least):
    """The affinity ops' gradient floor at each entry of each map that requires grad: 1% of |g| / |node| (at least
    `least`), g the gradient of the fuzz's random functional with respect to the normalised node the entry belongs
    to (at least 1) and |node| as node_norms. Projecting g onto the node's tangent space rounds at eps |g| / |node|,
    and |g| grows with the number of nodes (a one-channel graph of 63 nodes: |g| of 100)."""
    nodes = [torch.nn.functional.normalize(affinity_nodes(a.detach().double(), pool_size, pool), dim=1, eps=1e-8)
             .requires_grad_() for a in args]
    graphs = [u.transpose(1, 2) @ u for u in nodes]
    if reduction is None:  # affinity_graph
        out = graphs[0]
    else:  # pairwise_affinity_loss, as the reference forms it from the graphs
        squares = (graphs[0] - graphs[1]).square()
        out = squares.sum() if reduction == "sum" else reference.reduce_samples(squares.mean((1, 2)), reduction)
    if not out.requires_grad:  # an empty batch
        return [least for a in args if a.requires_grad]
    up = torch.autograd.grad(weighted_sum(out, torch.Generator().manual_seed(seed)), nodes)
    return [torch.clamp_min(1e-2 * per_entry(g.norm(dim=1).clamp_min(1), a, pool_size) / node_norms(a, pool_size, pool),
                            least) for a, g in zip(args, up) if a.requires_grad]


def sample_norms(x):
    """The norm of each sample of x (B, ...), at each of its entries (clamped at the op's 1e-12)."""
    x = x.detach().double()
    return x.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1)).expand(x.shape)


def spectral_sensitivity(x, rank):
    """sigma_1 / (20 (sigma_rank - sigma_rank+1)) of the centred points of each set, the largest over the sets:
    how much the top-`rank` projection magnifies a rounding beyond a gap of 1/20 of sigma_1 (the fuzz draws
    low-rank points whose gap centring can close)."""
    pts = kdfast.reference.manifold_points(x.detach().double())
    sv = torch.linalg.svdvals(pts - pts.mean(-2, keepdim=True))
    if sv.numel() == 0 or sv.shape[-1] <= rank:
        return 1.0
    gap = (sv[..., rank - 1] - sv[..., rank]).clamp_min(1e-300)
    return float((sv[..., 0] / (20 * gap)).max())


def per_entry(values, x, pool_size):
    """(B, n) values of the affinity nodes of a (B, C, H, W) map, at each entry of the map: (B, 1, H, W)."""
    k = (1, 1) if pool_size is None else (pool_size, pool_size) if isinstance(pool_size, int) else pool_size
    h, w = x.shape[2:]
    values = values.view(x.shape[0], 1, -(-h // k[0]), -(-w // k[1]))
    return values.repeat_interleave(k[0], 2).repeat_interleave(k[1], 3)[:, :, :h, :w]


def node_norms(x, pool_size, pool):
    """At each entry of a (B, C, H, W) map, the norm of the affinity node it belongs to (clamped at the op's 1e-8),
    times the pooling window's size for "avg" (an entry's share of the node's gradient)."""
    k = (1, 1) if pool_size is None else (pool_size, pool_size) if isinstance(pool_size, int) else pool_size
    norms = per_entry(affinity_nodes(x.detach().double(), pool_size, pool).norm(dim=1).clamp_min(1e-8), x, pool_size)
    return norms * (k[0] * k[1] if pool == "avg" else 1)


def _svd_invariants(usv):
    """Sign-free functions of an SVD: S, U^2 and Vh^2 (elementwise), and U S Vh."""
    U, S, Vh = usv
    return [S, U.square(), Vh.square(), U @ torch.diag_embed(S) @ Vh]


@pytest.mark.parametrize("op", ["attention", "affinity", "similarity_preserving", "batched_svd", "manifold"])
def test_fuzz_feature_ops(op):
    run_cases(op, lambda rng, gen: feature_case(rng, gen, op))
