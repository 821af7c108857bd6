"""pairwise_affinity_loss, similarity_preserving_loss and affinity_graph against the explicit-graph reference in
float64, across dtypes, CPU instruction sets, pooling, unequal channels and chunked walks; precision where the
Gram identity cancels, gradients, layouts, empty batches, NaN, memory (no n x n / B x B allocation),
autograd/opcheck/compile, determinism, and every documented error."""
import pytest
import torch
from conftest import TOLERANCE, assert_close

import kdfast
from kdfast import _ops, affinity, reference

# (B, Cs, Ct, Hs, Ws, Ht, Wt, pool_size, pool, chunk bytes). The chunked walks are reached with small inputs by
# shrinking the staging buffer (0 = the device's default): 64 KiB holds 8192 / C nodes, so C = 64 walks 400 nodes in
# four chunks (with partial tiles) and C = 32 packs 8 samples of 30 nodes per chunk (11 samples: 8 + 3).
CASES = [
    (2, 3, 5, 4, 6, 4, 6, None, "max", 0),
    (3, 1, 7, 5, 3, 5, 3, 2, "max", 0),             # ceil mode: 3 x 2 nodes
    (2, 16, 16, 7, 9, 7, 9, (2, 3), "avg", 0),
    (1, 130, 200, 9, 37, 9, 37, None, "max", 0),    # n = 333, channels across three Gram blocks
    (2, 4, 6, 6, 4, 4, 6, None, "max", 0),          # different map shapes, same node count
    (1, 30, 34, 20, 20, 20, 20, None, "max", 1 << 16),  # four chunks per sample
    (11, 16, 16, 5, 6, 5, 6, None, "avg", 1 << 16),     # several samples per chunk
    (2, 8, 3, 1, 1, 1, 1, None, "max", 0),          # one node
]
CASE_IDS = ["tiny", "pool2-ceil", "pool-pair-avg", "blocks", "shapes", "chunks", "packed", "one-node"]


@pytest.fixture
def chunk_bytes():
    """Sets the staging size of the chunked walk for one test, restoring the default afterwards."""
    yield _ops._C.set_affinity_chunk_bytes
    _ops._C.set_affinity_chunk_bytes(0)


def make(shape, dtype, seed, requires_grad=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return x.requires_grad_(requires_grad)


def reference_and_grads(fn, s, t, weights=None, **kwargs):
    """The reference on float64 copies of the (already rounded) inputs, with the gradients of sum(weights * out)."""
    s64 = s.detach().double().requires_grad_(True)
    t64 = t.detach().double().requires_grad_(True)
    out = fn(s64, t64, **kwargs)
    w = torch.ones_like(out) if weights is None else weights
    gs, gt = torch.autograd.grad((out * w).sum(), (s64, t64))
    return out.detach(), gs, gt


def check_pairwise(s, t, dtype, **kwargs):
    out = kdfast.pairwise_affinity_loss(s, t, reduction="none", **kwargs)
    w = torch.linspace(0.5, 1.5, out.shape[0], dtype=torch.float64)
    ref, rgs, rgt = reference_and_grads(reference.pairwise_affinity_loss, s, t, w, reduction="none", **kwargs)
    gs, gt = torch.autograd.grad((out * w.to(out.dtype)).sum(), (s, t))
    assert out.dtype == (torch.float64 if torch.float64 in (s.dtype, t.dtype) else torch.float32)
    assert gs.dtype == s.dtype and gt.dtype == t.dtype
    assert_close(out, ref, dtype)
    assert_grad_close(gs, rgs, dtype)
    assert_grad_close(gt, rgt, dtype)


def assert_grad_close(actual, expected, dtype):
    """Gradients at the tolerance of their dtype relative to their largest entry (at 1e-2 where the true gradient
    is 0, e.g. one channel or one node), plus float16's subnormal step (gradients of order 1e-7 are common)."""
    rtol, atol = TOLERANCE[dtype]
    gmax = float(expected.abs().max()) if expected.numel() else 0.0
    info = torch.finfo(dtype)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, equal_nan=True,
                               atol=atol * (gmax if gmax > 1e-12 else 1e-2) + info.eps * info.smallest_normal)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_pairwise_matches_reference(device, dtype, case, chunk_bytes):
    b, cs, ct, hs, ws, ht, wt, pool_size, pool, nbytes = case
    chunk_bytes(nbytes)
    s = make((b, cs, hs, ws), dtype, 0, device=device)
    t = make((b, ct, ht, wt), dtype, 1, device=device)
    check_pairwise(s, t, dtype, pool_size=pool_size, pool=pool)


@pytest.mark.parametrize("case", [CASES[3], CASES[5]], ids=["blocks", "chunks"])
def test_pairwise_every_cpu_capability(cpu_capability, case, chunk_bytes):
    b, cs, ct, hs, ws, ht, wt, pool_size, pool, nbytes = case
    chunk_bytes(nbytes)
    check_pairwise(make((b, cs, hs, ws), torch.float32, 2), make((b, ct, ht, wt), torch.float32, 3), torch.float32,
                   pool_size=pool_size, pool=pool)


def test_pairwise_precision_when_terms_cancel(device):
    """A student close to its teacher: the loss is ~1e-8 of the Gram terms |P|^2, |Q|^2 (each ~n^2 / C). The
    float64 accumulation keeps the float32 result within float32 rounding of the reference; the same identity in
    float32 Gram products is off by orders of magnitude (checked here so that the test can fail)."""
    t = make((2, 32, 32, 32), torch.float32, 4, requires_grad=False, device=device)
    noise = make(t.shape, torch.float64, 5, requires_grad=False, device=device)
    s = (t.double() + 1e-4 * noise).float().requires_grad_(True)
    ref, rgs, _ = reference_and_grads(reference.pairwise_affinity_loss, s, t, reduction="none")
    out = kdfast.pairwise_affinity_loss(s, t, reduction="none")
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=0)
    gs, = torch.autograd.grad(out.sum(), (s,))
    torch.testing.assert_close(gs.double(), rgs, rtol=1e-4, atol=1e-5 * float(rgs.abs().max()))
    # The float32 identity, for contrast.
    fs = torch.nn.functional.normalize(s.detach().flatten(2), dim=1, eps=1e-8)
    ft = torch.nn.functional.normalize(t.flatten(2), dim=1, eps=1e-8)
    gram = lambda a, b: (a @ b.transpose(1, 2)).square().sum((1, 2))  # noqa: E731
    naive = (gram(fs, fs) - 2 * gram(fs, ft) + gram(ft, ft)).double() / (32 * 32) ** 2
    assert ((naive - ref).abs() / ref).max() > 1e-2


def test_pairwise_mixed_dtypes(device):
    s = make((2, 5, 4, 4), torch.float32, 6, device=device)
    t = make((2, 3, 4, 4), torch.float64, 7, device=device)
    check_pairwise(s, t, torch.float32)
    s = make((2, 5, 4, 4), torch.bfloat16, 6, device=device)
    t = make((2, 3, 4, 4), torch.float16, 7, device=device)
    check_pairwise(s, t, torch.bfloat16)


def test_pairwise_non_contiguous(device):
    s = make((2, 6, 5, 7), torch.float32, 8, device=device).detach().to(memory_format=torch.channels_last)
    s.requires_grad_(True)
    t = make((2, 9, 7, 5), torch.float32, 9, device=device).detach().transpose(2, 3).requires_grad_(True)
    check_pairwise(s, t, torch.float32)
    check_pairwise(s, t, torch.float32, pool_size=2, pool="avg")


def test_pairwise_zero_and_tiny_nodes(device):
    """Nodes with norm 0 and below the 1e-8 clamp (gradient dk / eps, not through the norm) and just above it."""
    s = make((2, 4, 3, 3), torch.float64, 10, device=device).detach()
    s[0, :, 0, 0] = 0
    s[0, :, 1, 1] = 1e-10
    s[1, :, 2, 2] = 1e-8
    t = make((2, 3, 3, 3), torch.float64, 11, device=device).detach()
    t[1, :, 0, 1] = 0
    check_pairwise(s.requires_grad_(True), t.requires_grad_(True), torch.float64)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_pairwise_reductions_and_module(reduction):
    s = make((3, 4, 5, 6), torch.float32, 12)
    t = make((3, 7, 5, 6), torch.float32, 13)
    out = kdfast.pairwise_affinity_loss(s, t, pool_size=(2, 2), reduction=reduction)
    ref = reference.pairwise_affinity_loss(s.double(), t.double(), pool_size=(2, 2), reduction=reduction)
    assert_close(out, ref, torch.float32, scale=max(1.0, float(ref.detach().abs().max())))
    module = kdfast.PairwiseAffinity(pool_size=2, reduction=reduction)
    torch.testing.assert_close(module(s, t), out, rtol=0, atol=0)
    assert "pool_size=(2, 2)" in repr(module)


def test_pairwise_sum_is_the_sum_over_pairs():
    """"sum" is never divided: the sum over samples and node pairs of the squared graph differences."""
    s, t = make((3, 4, 5, 6), torch.float64, 12), make((3, 7, 5, 6), torch.float64, 13)
    explicit = (kdfast.affinity_graph(s) - kdfast.affinity_graph(t)).square().sum()
    torch.testing.assert_close(kdfast.pairwise_affinity_loss(s, t, reduction="sum"), explicit)
    torch.testing.assert_close(kdfast.pairwise_affinity_loss(s, t, reduction="mean"), explicit / (3 * 30 * 30))
    torch.testing.assert_close(kdfast.pairwise_affinity_loss(s, t, reduction="none").sum(), explicit / (30 * 30))


def test_pairwise_empty_batch(device):
    s = torch.randn(0, 4, 5, 6, device=device, requires_grad=True)
    t = torch.randn(0, 3, 5, 6, device=device, requires_grad=True)
    assert kdfast.pairwise_affinity_loss(s, t, reduction="none").shape == (0,)
    out = kdfast.pairwise_affinity_loss(s, t)
    assert out.item() == 0
    out.backward()
    assert s.grad.shape == s.shape and t.grad.shape == t.shape


def test_pairwise_nan_propagates(device):
    s = make((2, 4, 3, 3), torch.float32, 14, device=device).detach()
    s[1, 2, 1, 1] = float("nan")
    s.requires_grad_(True)
    t = make((2, 4, 3, 3), torch.float32, 15, device=device)
    out = kdfast.pairwise_affinity_loss(s, t, reduction="none")
    assert not torch.isnan(out[0]) and torch.isnan(out[1])
    out.sum().backward()
    assert torch.isnan(s.grad[1]).any() and not torch.isnan(s.grad[0]).any()


def test_pairwise_deterministic(device, chunk_bytes):
    chunk_bytes(1 << 16)
    s = make((2, 100, 30, 30), torch.float32, 16, device=device)
    t = make((2, 200, 30, 30), torch.float32, 17, device=device)
    runs = []
    for _ in range(2):
        out = kdfast.pairwise_affinity_loss(s, t, reduction="none")
        runs.append((out, *torch.autograd.grad(out.sum(), (s, t))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_pairwise_inference_mode(chunk_bytes):
    """The CPU walks samples in worker threads (one sample per chunk here), which must run in the caller's
    inference mode."""
    chunk_bytes(8 * 8 * 36)
    s, t = make((4, 5, 6, 6), torch.float32, 31, False), make((4, 3, 6, 6), torch.float32, 32, False)
    expected = kdfast.pairwise_affinity_loss(s, t)
    with torch.inference_mode():
        torch.testing.assert_close(kdfast.pairwise_affinity_loss(s, t), expected, rtol=0, atol=0)


def test_pairwise_teacher_only_and_student_only_grads():
    s = make((2, 5, 4, 4), torch.float64, 18)
    t = make((2, 3, 4, 4), torch.float64, 19)
    _, rgs, rgt = reference_and_grads(reference.pairwise_affinity_loss, s, t, reduction="none")
    gs, = torch.autograd.grad(kdfast.pairwise_affinity_loss(s, t.detach()), (s,))
    gt, = torch.autograd.grad(kdfast.pairwise_affinity_loss(s.detach(), t), (t,))
    assert_close(gs, rgs / 2, torch.float64)
    assert_close(gt, rgt / 2, torch.float64)


def max_allocation(fn):
    """Largest single CPU allocation made while fn() runs (profiler memory accounting of every op, C++ ones too)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.self_cpu_memory_usage for e in prof.events())


def test_pairwise_never_allocates_the_graph():
    n = 64 * 64
    s = make((1, 8, 64, 64), torch.float32, 20)
    t = make((1, 8, 64, 64), torch.float32, 21)
    graph_bytes = n * n * 4
    assert max_allocation(lambda: reference.pairwise_affinity_loss(s, t).backward()) >= graph_bytes
    assert max_allocation(lambda: kdfast.pairwise_affinity_loss(s, t).backward()) < graph_bytes // 64


def test_affinity_graph():
    x = make((2, 3, 5, 4), torch.float32, 22, requires_grad=False)
    g = kdfast.affinity_graph(x)
    nodes = x.double().flatten(2).transpose(1, 2)
    norms = nodes.norm(dim=2, keepdim=True).clamp_min(1e-8)
    assert g.shape == (2, 20, 20)
    assert_close(g, (nodes @ nodes.transpose(1, 2)) / (norms * norms.transpose(1, 2)), torch.float32)
    pooled = kdfast.affinity_graph(x, pool_size=(2, 3), pool="avg")
    assert pooled.shape == (2, 6, 6)
    assert kdfast.affinity_graph(x.half()).dtype == torch.float32


def test_gradcheck():
    s = make((2, 3, 3, 4), torch.float64, 23)
    t = make((2, 2, 3, 4), torch.float64, 24)
    assert torch.autograd.gradcheck(lambda a, b: kdfast.pairwise_affinity_loss(a, b, reduction="none"), (s, t))
    assert torch.autograd.gradcheck(lambda a, b: kdfast.pairwise_affinity_loss(a, b, pool_size=2, pool="avg"),
                                    (s, t))
    assert torch.autograd.gradcheck(lambda a, b: kdfast.similarity_preserving_loss(a, b), (s, t))


def test_opcheck():
    s = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.kdfast.pairwise_affinity_fwd, (s, t))
    _, gram = torch.ops.kdfast.pairwise_affinity_fwd(s, t)
    g = torch.rand(2, dtype=torch.float64)
    torch.library.opcheck(torch.ops.kdfast.pairwise_affinity_bwd,
                          (g, s.detach(), t.detach(), gram[:, :3].detach(), True, False))
    f = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    h = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.kdfast.similarity_preserving, (f, h, 4))
    torch.library.opcheck(torch.ops.kdfast.similarity_preserving, (f, h, 3))


def test_compile():
    torch._dynamo.reset()
    s = make((2, 3, 4, 4), torch.float32, 25)
    t = make((2, 5, 4, 4), torch.float32, 26)
    fns = [lambda a, b: kdfast.pairwise_affinity_loss(a, b, pool_size=2),
           lambda a, b: kdfast.similarity_preserving_loss(a, b),
           lambda a, b: kdfast.affinity_graph(a).sum() + kdfast.affinity_graph(b).sum()]
    for fn in fns:
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        eager, got = fn(s, t), compiled(s, t)
        assert_close(got, eager, torch.float32)
        ge = torch.autograd.grad(eager, (s, t))
        gc = torch.autograd.grad(compiled(s, t), (s, t))
        for a, b in zip(gc, ge):
            assert_grad_close(a, b, torch.float32)


# ---- similarity preserving

SP_CASES = [((7, 3, 4, 5), (7, 6, 2, 2)), ((1, 8), (1, 3)), ((33, 64, 2, 2), (33, 16, 3, 3))]


@pytest.mark.parametrize("tiled", [False, True], ids=["whole", "tiled"])
@pytest.mark.parametrize("shapes", SP_CASES, ids=["maps", "one", "b33"])
def test_similarity_preserving_matches_reference(device, dtype, shapes, tiled, monkeypatch):
    if tiled:
        monkeypatch.setattr(affinity, "SP_TILE_ENTRIES", 2 * shapes[0][0])  # two rows per tile
    s, t = make(shapes[0], dtype, 27, device=device), make(shapes[1], dtype, 28, device=device)
    for reduction in ("mean", "sum", "none"):
        out = kdfast.similarity_preserving_loss(s, t, reduction=reduction)
        w = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).reshape(out.shape)
        ref, rgs, rgt = reference_and_grads(reference.similarity_preserving_loss, s, t, w, reduction=reduction)
        gs, gt = torch.autograd.grad(out, (s, t), w.to(out.dtype))
        assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_close(out, ref, dtype, scale=max(1.0, float(ref.abs().max())))
        assert_grad_close(gs, rgs, dtype)
        assert_grad_close(gt, rgt, dtype)
    module = kdfast.SimilarityPreserving(reduction="sum")
    torch.testing.assert_close(module(s, t), kdfast.similarity_preserving_loss(s, t, reduction="sum"))


def test_similarity_preserving_tiles_bound_memory(monkeypatch):
    b = 512
    monkeypatch.setattr(affinity, "SP_TILE_ENTRIES", 64 * b)
    s, t = make((b, 8), torch.float32, 29), make((b, 4), torch.float32, 30)
    assert max_allocation(lambda: reference.similarity_preserving_loss(s, t).backward()) >= b * b * 4
    assert max_allocation(lambda: kdfast.similarity_preserving_loss(s, t).backward()) < b * b * 4 // 4


def test_similarity_preserving_none_is_per_sample():
    """A sample's value is the mean of its row of the squared normalised Gram difference; "mean" is their mean (the
    sum / B^2, Tung & Mori's), "sum" the sum of all squared differences."""
    s, t = make((5, 3, 2), torch.float64, 31), make((5, 4), torch.float64, 32)
    gs = torch.nn.functional.normalize(s.flatten(1) @ s.flatten(1).T, dim=1)
    gt = torch.nn.functional.normalize(t @ t.T, dim=1)
    rows = (gs - gt).square().sum(1)
    torch.testing.assert_close(kdfast.similarity_preserving_loss(s, t, reduction="none"), rows / 5)
    torch.testing.assert_close(kdfast.similarity_preserving_loss(s, t, reduction="sum"), rows.sum())
    torch.testing.assert_close(kdfast.similarity_preserving_loss(s, t), rows.sum() / 25)


def test_similarity_preserving_empty_and_nan():
    s, t = torch.randn(0, 4, requires_grad=True), torch.randn(0, 5)
    out = kdfast.similarity_preserving_loss(s, t)
    assert out.item() == 0
    out.backward()
    assert kdfast.similarity_preserving_loss(s, t, reduction="none").shape == (0,)
    x = torch.randn(3, 4)
    x[1, 2] = float("nan")
    assert torch.isnan(kdfast.similarity_preserving_loss(x, torch.randn(3, 4)))


# ---- errors

def test_errors_features():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(TypeError, match="student_features must be a torch.Tensor"):
        kdfast.pairwise_affinity_loss(x.numpy(), x)
    with pytest.raises(TypeError, match="teacher_features must be float32"):
        kdfast.pairwise_affinity_loss(x, x.long())
    with pytest.raises(ValueError, match=r"student_features must be a \(B, C, H, W\)"):
        kdfast.pairwise_affinity_loss(x[0], x)
    with pytest.raises(ValueError, match="at least one channel and one position"):
        kdfast.pairwise_affinity_loss(x[:, :0], x)
    with pytest.raises(ValueError, match="same batch size"):
        kdfast.pairwise_affinity_loss(x[:1], x)
    with pytest.raises(ValueError, match="same number of nodes"):
        kdfast.pairwise_affinity_loss(x, x[:, :, :3])
    with pytest.raises(ValueError, match="is on meta"):
        kdfast.pairwise_affinity_loss(x, x.to("meta"))
    with pytest.raises(TypeError, match="features must be float32"):
        kdfast.affinity_graph(x.int())


def test_errors_options():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="pool must be one of 'max', 'avg'"):
        kdfast.pairwise_affinity_loss(x, x, pool_size=2, pool="min")
    with pytest.raises(ValueError, match="pool_size must be >= 1"):
        kdfast.pairwise_affinity_loss(x, x, pool_size=0)
    with pytest.raises(TypeError, match="pool_size must be None, an int or a pair"):
        kdfast.pairwise_affinity_loss(x, x, pool_size=1.5)
    with pytest.raises(TypeError, match="pool_size must be None, an int or a pair"):
        kdfast.affinity_graph(x, pool_size=(2, 2, 2))
    with pytest.raises(ValueError, match="reduction must be one of"):
        kdfast.pairwise_affinity_loss(x, x, reduction="batchmean")
    with pytest.raises(ValueError, match="reduction must be one of 'mean', 'sum', 'none'"):
        kdfast.similarity_preserving_loss(x, x, reduction="batchmean")
    with pytest.raises(ValueError, match="reduction must be one of"):
        kdfast.PairwiseAffinity(reduction="x")
    with pytest.raises(ValueError, match="reduction must be one of"):
        kdfast.SimilarityPreserving(reduction="batchmean")


def test_errors_similarity_preserving():
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match="same batch size"):
        kdfast.similarity_preserving_loss(x, x[:3])
    with pytest.raises(ValueError, match=r"\(B, \.\.\.\)"):
        kdfast.similarity_preserving_loss(x[0], x[0])
    with pytest.raises(TypeError, match="teacher_features must be float32"):
        kdfast.similarity_preserving_loss(x, x.long())
    with pytest.raises(ValueError, match="is on meta"):
        kdfast.similarity_preserving_loss(x, x.to("meta"))
