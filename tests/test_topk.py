"""topk_kd_div (kernel ops topk_kd_fwd / topk_kd_bwd) against the float64 reference, and its errors."""
import pytest
import torch
from conftest import assert_close

import kdfast
from kdfast import reference
from kdfast.topk import TopKDTypeError, TopKIndexError, topk_rows

TAILS = ["renormalize", "bucket"]
DIVERGENCES = ["kl", "reverse_kl", "jsd"]


def make(rows, V, k, dtype=torch.float32, pad=0, seed=0, device="cpu", index_dtype=torch.int64, scale=3.0):
    """Student logits (rows, V) and a teacher's top-k of distinct classes, the last `pad` entries of every row
    padding (-inf, index 0 as servers fill them)."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(rows, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = torch.randn(rows, V, generator=g, dtype=torch.float64) * scale
    idx, lp = kdfast.topk_from_logits(t, k)
    idx, lp = idx.clone(), lp.clone()
    if pad:
        lp[:, k - pad:] = float("-inf")
        idx[:, k - pad:] = 0
    return s.to(device), idx.to(device, index_dtype), lp.float().to(device)


def both(s, idx, lp, T=1.0, **kw):
    """(kernel loss, kernel grad, reference loss, reference grad) for a sum of the rows."""
    x = s.detach().clone().requires_grad_(True)
    out = kdfast.topk_kd_div(x, idx, lp, T, **kw)
    out.sum().backward()
    y = s.detach().double().requires_grad_(True)
    ref = reference.topk_kd_div(y, idx, lp, T, **kw)  # lp as given: the bucket's tail rule reads its dtype
    ref.sum().backward()
    return out, x.grad, ref, y.grad


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("T", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("V,k", [(50, 1), (50, 7), (333, 64), (1000, 50), (4099, 64)])
def test_matches_reference(divergence, tail, T, V, k, dtype):
    s, idx, lp = make(9, V, k, dtype, pad=min(3, k - 1), seed=V + k)
    out, g, ref, gref = both(s, idx, lp, T, tail=tail, divergence=divergence, reduction="none")
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert g.dtype == dtype
    assert_close(out, ref, dtype, scale=10)
    assert_close(g, gref, dtype, scale=10)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail", TAILS)
def test_every_cpu_capability(tail, divergence, cpu_capability):
    s, idx, lp = make(5, 1031, 17, pad=2, seed=3)
    out, g, ref, gref = both(s, idx, lp, 2.0, tail=tail, divergence=divergence)
    assert_close(out, ref, torch.float32)
    assert_close(g, gref, torch.float32)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail", TAILS)
def test_large_vocabulary_int32(tail, divergence):
    s, idx, lp = make(2, 131073, 64, pad=5, seed=1, index_dtype=torch.int32)
    out, g, ref, gref = both(s, idx, lp, 1.0, tail=tail, divergence=divergence, reduction="sum")
    assert_close(out, ref, torch.float32, scale=10)
    assert_close(g, gref, torch.float32)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail", TAILS)
def test_bfloat16_gradient_within_one_percent(tail, divergence):
    s, idx, lp = make(64, 32000, 64, torch.bfloat16, seed=2)
    _, g, _, gref = both(s, idx, lp, 1.0, tail=tail, divergence=divergence, reduction="sum")
    err = (g.double() - gref).norm() / gref.norm()
    assert err < 0.01


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_mask_and_reductions(tail, reduction, divergence):
    s, idx, lp = make(12, 300, 10, pad=4, seed=4)
    s = s.reshape(3, 4, 300)
    idx, lp = idx.reshape(3, 4, 10), lp.reshape(3, 4, 10)
    mask = torch.rand(3, 4, generator=torch.Generator().manual_seed(0)) > 0.4
    for scale_t2 in (True, False):
        out, g, ref, gref = both(s, idx, lp, 2.0, tail=tail, divergence=divergence, mask=mask, reduction=reduction,
                                 scale_t2=scale_t2)
        assert out.shape == ref.shape
        assert_close(out, ref, torch.float32)
        assert_close(g, gref, torch.float32)
    assert (g[~mask] == 0).all()


def test_all_padding_row_and_repeated_padding_index():
    s, idx, lp = make(4, 100, 8, seed=5)
    lp[1] = float("-inf")  # the server returned nothing for this row
    lp[2, 3:] = float("-inf")
    idx[2, 3:] = 0  # padding filled with a repeated 0, which may also be a valid class of the row
    idx[2, 0] = 0
    for tail in TAILS:
        for divergence in DIVERGENCES:
            out, g, ref, gref = both(s, idx, lp, 1.0, tail=tail, divergence=divergence, reduction="none")
            assert_close(out, ref, torch.float32)
            assert_close(g, gref, torch.float32)
            assert out[1] == 0 and (g[1] == 0).all()


def test_padding_index_out_of_range_is_never_read():
    s, idx, lp = make(3, 64, 6, pad=2, seed=6)
    idx[:, 4:] = -1
    idx[0, 5] = 10**9
    out, g, ref, gref = both(s, idx, lp, tail="bucket", reduction="none")
    assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail", TAILS)
def test_full_vocabulary_equals_kd_div(tail, divergence):
    """k = V: both tails are kd_div with the same divergence (loss and gradient)."""
    s = torch.randn(6, 40, dtype=torch.float64) * 2
    t = torch.randn(6, 40, dtype=torch.float64) * 2
    idx, lp = kdfast.topk_from_logits(t, 40)
    for T in (0.5, 1.0, 2.0):
        x, y = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
        a = kdfast.topk_kd_div(x, idx, lp, T, tail=tail, divergence=divergence, beta=0.3)
        b = kdfast.kd_div(y, t, T, divergence=divergence, beta=0.3)
        torch.testing.assert_close(a, b)
        a.backward()
        b.backward()
        torch.testing.assert_close(x.grad, y.grad)
        ref = reference.topk_kd_div(s, idx, lp, T, tail=tail, divergence=divergence, beta=0.3)
        torch.testing.assert_close(ref, b)


def test_gradient_formulas():
    """(p - q) on the top-k, p elsewhere for renormalize (the gradient of the rows' sum, T = 1)."""
    s, idx, lp = make(3, 30, 5, torch.float64, seed=7)
    x = s.clone().requires_grad_(True)
    kdfast.topk_kd_div(x, idx, lp.double(), reduction="sum").backward()
    p = s.softmax(-1)
    q = torch.zeros_like(p).scatter_(-1, idx, lp.double().softmax(-1))
    torch.testing.assert_close(x.grad, p - q)


def test_non_contiguous_and_empty():
    s, idx, lp = make(8, 200, 6, seed=8)
    s_nc = s.t().contiguous().t()  # same values, column-major
    out, g, ref, gref = both(s_nc, idx[:, ::1], lp, 1.5, reduction="none")
    assert_close(out, ref, torch.float32)
    assert_close(g, gref, torch.float32)
    wide = torch.randn(8, 400)[:, ::2]
    assert_close(kdfast.topk_kd_div(wide, idx, lp), reference.topk_kd_div(wide.double(), idx, lp.double()),
                 torch.float32)
    empty = torch.randn(0, 50, requires_grad=True)
    ei, el = torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 4)
    assert kdfast.topk_kd_div(empty, ei, el).item() == 0
    assert kdfast.topk_kd_div(empty, ei, el, reduction="none").shape == (0,)
    kdfast.topk_kd_div(empty, ei, el, reduction="sum").backward()
    assert empty.grad.shape == (0, 50)


def test_nan_and_minus_inf():
    s, idx, lp = make(3, 50, 4, seed=9)
    s[0, 7] = float("nan")
    s[1, :] = float("-inf")
    s[1, idx[1]] = 0.0  # the student can still place mass on the teacher's classes
    for tail in ("renormalize",):
        out, _, ref, _ = both(s, idx, lp, tail=tail, reduction="none")
        assert torch.isnan(out[0]) and torch.isfinite(out[1:]).all()
        assert_close(out[1:], ref[1:], torch.float32)


def test_deterministic():
    s, idx, lp = make(64, 3001, 32, pad=3, seed=11)
    runs = [both(s, idx, lp, 2.0, tail="bucket")[:2] for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail", TAILS)
def test_gradcheck(tail, divergence):
    s, idx, lp = make(3, 11, 4, torch.float64, pad=1, seed=10)
    s.requires_grad_(True)
    lp = lp.double().requires_grad_(True)
    mask = torch.tensor([True, False, True])
    kw = dict(tail=tail, divergence=divergence, beta=0.3)
    assert torch.autograd.gradcheck(lambda a, b: kdfast.topk_kd_div(a, idx, b, 1.7, mask=mask, **kw), (s, lp))
    assert torch.autograd.gradcheck(lambda a, b: kdfast.topk_kd_div(a, idx, b, 0.5, reduction="none", **kw),
                                    (s, lp))


def test_double_backward_raises():
    s, idx, lp = make(2, 20, 3, torch.float64)
    s.requires_grad_(True)
    (g,) = torch.autograd.grad(kdfast.topk_kd_div(s, idx, lp), s, create_graph=True)
    with pytest.raises(RuntimeError, match="topk_kd_div does not support double backward"):
        g.sum().backward()


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail", TAILS)
def test_opcheck(tail, divergence):
    s, idx, lp = make(4, 37, 5, pad=1)
    s.requires_grad_(True)
    opts = (2.0, tail, divergence, 0.3)
    torch.library.opcheck(torch.ops.kdfast.topk_kd_fwd.default, (s, idx, lp, *opts))
    _, stats = torch.ops.kdfast.topk_kd_fwd(s.detach(), idx, lp, *opts)
    torch.library.opcheck(torch.ops.kdfast.topk_kd_bwd.default, (torch.ones(4), s.detach(), idx, lp, stats, *opts))


@pytest.mark.parametrize("divergence", ["kl", "jsd"])
def test_compile_fullgraph(divergence):
    s, idx, lp = make(6, 120, 8, pad=2)
    x = s.clone().requires_grad_(True)
    f = torch.compile(lambda a, i, b: kdfast.topk_kd_div(a, i, b, 2.0, tail="bucket", divergence=divergence),
                      fullgraph=True)
    out = f(x, idx, lp)
    out.backward()
    _, g, ref, gref = both(s, idx, lp, 2.0, tail="bucket", divergence=divergence)
    assert_close(out, ref, torch.float32)
    assert_close(x.grad, gref, torch.float32)


def test_topk_rows_entry_point():
    """The per-chunk entry point fused_linear_kd calls: rows of a TopK, differentiable in the logits."""
    s, idx, lp = make(5, 90, 7, pad=2)
    x = s.clone().requires_grad_(True)
    rows = topk_rows(x[1:4], kdfast.TopK(idx, lp).rows(1, 4), 1.0, "renormalize")
    assert rows.shape == (3,)
    assert_close(rows, reference.topk_kd_rows(s[1:4].double(), idx[1:4], lp[1:4].double()), torch.float32)
    rows.sum().backward()
    assert (x.grad[[0, 4]] == 0).all() and (x.grad[1:4] != 0).any()


def test_topk_from_logits_and_container():
    logits = torch.randn(2, 3, 50)
    tk = kdfast.topk_from_logits(logits, 5)
    idx, lp = tk
    assert tk.indices is idx and tk.logprobs is lp and tk.k == 5
    assert idx.dtype == torch.int64 and lp.dtype == torch.float32 and idx.shape == (2, 3, 5)
    torch.testing.assert_close(lp, logits.log_softmax(-1).gather(-1, idx))
    assert (lp[..., :-1] >= lp[..., 1:]).all()
    with pytest.raises(ValueError, match="k must be in"):
        kdfast.topk_from_logits(logits, 51)
    with pytest.raises(TypeError, match="k must be an int"):
        kdfast.topk_from_logits(logits, 2.0)
    with pytest.raises(TypeError):
        kdfast.TopK(idx.float(), lp)
    with pytest.raises(ValueError, match="one shape"):
        kdfast.TopK(idx[..., :3], lp)
    rows = kdfast.TopK(idx.reshape(6, 5), lp.reshape(6, 5)).rows(2, 4).to("cpu")
    assert rows.indices.shape == (2, 5) and torch.equal(rows.logprobs, lp.reshape(6, 5)[2:4])


def test_precision_follows_student_and_num_items_in_batch():
    """float64 teacher log-probabilities with a float32 student stay float32; micro-batches each given the batch's
    count sum to the whole batch's loss and gradients."""
    s, idx, lp = make(12, 300, 10, pad=2, seed=12)
    assert kdfast.topk_kd_div(s, idx, lp.double()).dtype == torch.float32
    mask = torch.rand(12, generator=torch.Generator().manual_seed(1)) > 0.3
    for tail in TAILS:
        whole = s.double().clone().requires_grad_(True)
        kdfast.topk_kd_div(whole, idx, lp, 2.0, tail=tail, mask=mask).backward()
        parts = s.double().clone().requires_grad_(True)
        count = mask.sum()
        total = sum(kdfast.topk_kd_div(parts[a:a + 4], idx[a:a + 4], lp[a:a + 4], 2.0, tail=tail, mask=mask[a:a + 4],
                                       num_items_in_batch=count) for a in range(0, 12, 4))
        total.backward()
        torch.testing.assert_close(total, kdfast.topk_kd_div(s.double(), idx, lp, 2.0, tail=tail, mask=mask),
                                   rtol=1e-6, atol=0)
        torch.testing.assert_close(parts.grad, whole.grad, rtol=1e-6, atol=1e-12)
        assert_close(kdfast.topk_kd_div(s, idx, lp, 2.0, tail=tail, mask=mask, num_items_in_batch=int(count)),
                     reference.topk_kd_div(s.double(), idx, lp.double(), 2.0, tail=tail, mask=mask,
                                           num_items_in_batch=int(count)), torch.float32)


# ---- sampled teachers ----

def test_sample_from_logits():
    logits = torch.randn(2, 3, 40, dtype=torch.float64)
    smp = kdfast.sample_from_logits(logits, 16, 2.0, generator=torch.Generator().manual_seed(0))
    idx, counts, lp = smp
    assert smp.indices is idx and smp.counts is counts and smp.logprobs is lp and smp.k == 16
    assert idx.shape == counts.shape == lp.shape == (2, 3, 16) and lp.dtype == torch.float64
    assert (counts.sum(-1) == 16).all() and (counts >= 0).all()
    drawn = counts > 0
    torch.testing.assert_close(lp[drawn], (logits / 2).log_softmax(-1).gather(-1, idx)[drawn])
    assert (lp[~drawn] == float("-inf")).all() and (idx[~drawn] == 0).all()
    for r in idx.reshape(6, 16)[drawn.reshape(6, 16)].split(drawn.reshape(6, 16).sum(-1).tolist()):
        assert (r[1:] > r[:-1]).all()  # distinct, increasing
    again = kdfast.sample_from_logits(logits, 16, 2.0, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(smp, again))
    one = kdfast.sample_from_logits(torch.tensor([[0.0, -float("inf"), 0.0]]), 50)
    assert set(one.indices[0][one.counts[0] > 0].tolist()) <= {0, 2}
    with pytest.raises(ValueError, match="n must be >= 1"):
        kdfast.sample_from_logits(logits, 0)
    with pytest.raises(TypeError, match="n must be an int"):
        kdfast.sample_from_logits(logits, 2.0)
    with pytest.raises(TypeError, match="teacher_counts must be an integer"):
        kdfast.Sampled(idx, counts.float(), lp)
    with pytest.raises(ValueError, match="teacher_counts must be >= 0"):
        kdfast.Sampled(idx, counts - 1, lp)
    with pytest.raises(ValueError, match="teacher_counts must have the indices' shape"):
        kdfast.Sampled(idx, counts[..., :3], lp)
    sub = kdfast.Sampled(*(t.reshape(6, 16) for t in smp)).rows(1, 3).to("cpu")
    assert isinstance(sub, kdfast.Sampled) and sub.counts.shape == (2, 16)


def _sampled(rows, V, n, dtype=torch.float32, T=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(rows, V, generator=g, dtype=torch.float64) * 2).to(dtype)
    t = torch.randn(rows, V, generator=g, dtype=torch.float64) * 2
    return s, t, kdfast.sample_from_logits(t, n, T, generator=g)


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("V,n", [(50, 1), (333, 64), (4099, 17)])
def test_sampled_matches_reference(T, V, n, dtype):
    s, _, smp = _sampled(7, V, n, dtype, T, seed=V + n)
    smp = kdfast.Sampled(smp.indices.int(), smp.counts, smp.logprobs.float())
    x = s.clone().requires_grad_(True)
    out = kdfast.sampled_kd_div(x, smp, T, reduction="none")
    out.sum().backward()
    y = s.double().requires_grad_(True)
    ref = reference.sampled_kd_div(y, smp, T, reduction="none")
    ref.sum().backward()
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and x.grad.dtype == dtype
    assert_close(out, ref, dtype, scale=10)
    assert_close(x.grad, y.grad, dtype, scale=10)


def test_sampled_is_unbiased():
    """Over many draws the mean loss and the mean gradient equal the dense KL's within the sampling error."""
    T, draws, n = 2.0, 4000, 8
    g = torch.Generator().manual_seed(3)
    s = torch.randn(1, 30, generator=g, dtype=torch.float64) * 2
    t = torch.randn(1, 30, generator=g, dtype=torch.float64) * 2
    smp = kdfast.sample_from_logits(t.expand(draws, 30), n, T, generator=g)
    x = s.expand(draws, 30).clone().requires_grad_(True)
    rows = kdfast.sampled_kd_div(x, smp, T, reduction="none")
    rows.sum().backward()
    y = s.clone().requires_grad_(True)
    dense = kdfast.kd_div(y, t, T)
    dense.backward()
    stderr = rows.std() / draws ** 0.5
    assert abs(rows.mean() - dense) < 4 * stderr
    gstd = x.grad.std(0) / draws ** 0.5
    assert ((x.grad.mean(0) - y.grad[0]).abs() <= 4 * gstd + 1e-12).all()
    # not a test that cannot fail: a biased estimate (the counts ignored: each distinct id weighs the same) is off
    drawn = smp.counts > 0
    flat = kdfast.Sampled(smp.indices, drawn.int(), smp.logprobs)
    biased = kdfast.sampled_kd_div(s.expand(draws, 30), flat, T, reduction="none")
    assert abs(biased.mean() - dense) > 8 * stderr


def test_sampled_gradcheck_opcheck_compile():
    s, _, smp = _sampled(3, 11, 5, torch.float64, 1.5, seed=4)
    s.requires_grad_(True)
    lp = smp.logprobs.clone().requires_grad_(True)
    mask = torch.tensor([True, False, True])
    assert torch.autograd.gradcheck(
        lambda a, b: kdfast.sampled_kd_div(a, kdfast.Sampled(smp.indices, smp.counts, b), 1.5, mask=mask), (s, lp))
    w = smp.counts.double() / smp.counts.sum(-1, keepdim=True)
    opts = (1.5, "renormalize", "kl", 0.5, w)
    torch.library.opcheck(torch.ops.kdfast.topk_kd_fwd.default, (s, smp.indices, smp.logprobs, *opts))
    _, stats = torch.ops.kdfast.topk_kd_fwd(s.detach(), smp.indices, smp.logprobs, *opts)
    torch.library.opcheck(torch.ops.kdfast.topk_kd_bwd.default,
                          (torch.ones(3, dtype=torch.float64), s.detach(), smp.indices, smp.logprobs, stats, *opts))
    f = torch.compile(lambda a, i, c, b: kdfast.sampled_kd_div(a, kdfast.Sampled(i, c, b), 1.5), fullgraph=True)
    x = s.detach().clone().requires_grad_(True)
    out = f(x, *smp)
    out.backward()
    y = s.detach().clone().requires_grad_(True)
    ref = reference.sampled_kd_div(y, smp, 1.5)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, y.grad)


def test_sampled_errors_and_edges():
    s, _, smp = _sampled(4, 30, 6)
    with pytest.raises(TypeError, match="teacher must be a kdfast.Sampled"):
        kdfast.sampled_kd_div(s, tuple(smp))
    idx = smp.indices.clone()
    idx[1, 0] = 30
    with pytest.raises(IndexError, match="teacher_indices holds 30"):
        kdfast.sampled_kd_div(s, kdfast.Sampled(idx, smp.counts, smp.logprobs))
    idx = smp.indices.clone()
    idx[smp.counts == 0] = -5  # padding indices are never read
    out = kdfast.sampled_kd_div(s, kdfast.Sampled(idx, smp.counts, smp.logprobs), reduction="none")
    assert_close(out, reference.sampled_kd_div(s.double(), smp, reduction="none"), torch.float32)
    none = kdfast.Sampled(smp.indices, torch.zeros_like(smp.counts), smp.logprobs)
    x = s.clone().requires_grad_(True)
    kdfast.sampled_kd_div(x, none).backward()
    assert (x.grad == 0).all()
    with pytest.raises(ValueError, match="leading dims"):
        kdfast.sampled_kd_div(s[:3], smp)


# ---- errors, one per documented case ----

def _args():
    s, idx, lp = make(4, 30, 5)
    return s, idx, lp


def test_error_index_out_of_range():
    s, idx, lp = _args()
    idx[1, 2] = 30
    with pytest.raises(IndexError, match="teacher_indices holds 30, outside"):
        kdfast.topk_kd_div(s, idx, lp)
    idx[1, 2] = -3
    with pytest.raises(ValueError, match="teacher_indices holds -3"):
        kdfast.topk_kd_div(s, idx, lp)
    assert issubclass(TopKIndexError, IndexError)


def test_error_float_indices():
    s, idx, lp = _args()
    with pytest.raises(TopKDTypeError, match="teacher_indices must be int64 or int32"):
        kdfast.topk_kd_div(s, idx.float(), lp)
    with pytest.raises(ValueError):  # also a ValueError, as every bad value is
        kdfast.topk_kd_div(s, idx.float(), lp)


def test_error_shapes():
    s, idx, lp = _args()
    with pytest.raises(ValueError, match="one shape"):
        kdfast.topk_kd_div(s, idx, lp[:, :4])
    with pytest.raises(ValueError, match="leading dims"):
        kdfast.topk_kd_div(s, idx[:3], lp[:3])
    with pytest.raises(ValueError, match="mask must have the row shape"):
        kdfast.topk_kd_div(s, idx, lp, mask=torch.ones(5, dtype=torch.bool))


def test_error_tail_temperature_reduction():
    s, idx, lp = _args()
    with pytest.raises(ValueError, match="tail must be one of"):
        kdfast.topk_kd_div(s, idx, lp, tail="zero")
    for T in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=r"temperature must be in \[1e-06, 1e\+06\]"):
            kdfast.topk_kd_div(s, idx, lp, T)
    with pytest.raises(ValueError, match=r"temperature must be in \[1e-06, 1e\+06\]"):
        kdfast.topk_kd_div(s, idx, lp, 1e7)
    with pytest.raises(ValueError, match="divergence must be one of"):
        kdfast.topk_kd_div(s, idx, lp, divergence="kld")
    with pytest.raises(ValueError, match="beta must be strictly inside"):
        kdfast.topk_kd_div(s, idx, lp, divergence="jsd", beta=1.0)
    with pytest.raises(ValueError, match="num_items_in_batch replaces batchmean"):
        kdfast.topk_kd_div(s, idx, lp, reduction="sum", num_items_in_batch=4)
    with pytest.raises(ValueError, match="num_items_in_batch must be > 0"):
        kdfast.topk_kd_div(s, idx, lp, num_items_in_batch=0)
    with pytest.raises(ValueError, match='topk_kd_div does not take reduction="mean": .* Use "batchmean"'):
        kdfast.topk_kd_div(s, idx, lp, reduction="mean")
    with pytest.raises(ValueError, match="reduction must be one of 'batchmean', 'sum', 'none'"):
        kdfast.topk_kd_div(s, idx, lp, reduction="avg")


def test_error_positive_logprobs():
    s, idx, lp = _args()
    lp[2, 0] = 0.5
    with pytest.raises(ValueError, match="teacher_logprobs must be log-probabilities"):
        kdfast.topk_kd_div(s, idx, lp)


def test_error_mixed_devices():
    s, idx, lp = _args()
    with pytest.raises(ValueError, match="teacher_logprobs is on meta but teacher_indices is on cpu"):
        kdfast.topk_kd_div(s, idx, lp.to("meta"))
    with pytest.raises(ValueError, match="is on meta"):
        kdfast.topk_kd_div(s, idx, lp, mask=torch.ones(4, dtype=torch.bool, device="meta"))


def test_error_dtypes():
    s, idx, lp = _args()
    with pytest.raises(TypeError, match="student_logits must be float"):
        kdfast.topk_kd_div(s.long(), idx, lp)
    with pytest.raises(TypeError, match="teacher_logprobs must be float"):
        kdfast.topk_kd_div(s, idx, lp.long())
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        kdfast.topk_kd_div(s, idx, lp, mask=torch.ones(4))


@pytest.mark.cuda
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail", TAILS)
def test_cuda_matches_reference(tail, divergence, dtype):
    s, idx, lp = make(7, 5003, 64, dtype, pad=3, device="cuda")
    out, g, ref, gref = both(s, idx, lp, 2.0, tail=tail, divergence=divergence, reduction="none")
    assert_close(out, ref, dtype, scale=10)
    assert_close(g, gref, dtype, scale=10)

