"""The feature ops at the edges of every argument, as a hostile user would call them: double backward, empty
batches and maps without positions, extreme exponents, torch.func transforms, NaN/inf, non-contiguous inputs and
wrong types, devices or values. Each case gives a correct value (checked against the float64 reference) or a
clear error."""
import pytest
import torch
from conftest import assert_close

import kdfast
from kdfast import affinity, reference


def randn(*shape, seed=0, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def second_derivative(loss_fn, *xs):
    """d/dx of (d loss / dx . v): a gradient penalty / Hessian-vector product through create_graph=True."""
    grads = torch.autograd.grad(loss_fn(*xs), xs, create_graph=True)
    penalty = sum((g * torch.linspace(0.5, 1.5, g.numel(), dtype=g.dtype).reshape(g.shape)).sum() for g in grads)
    return torch.autograd.grad(penalty, xs)


# ---- double backward: a clear error where the backward is a kernel, correct where it is differentiable

KERNEL_BACKWARDS = {
    "attention_map": lambda s, t: (kdfast.attention_map(s) * kdfast.attention_map(t)).sum(),
    "attention_map (p = 3)": lambda s, t: (kdfast.attention_map(s, 3.0) * kdfast.attention_map(t, 3.0)).sum(),
    "attention_transfer_loss": lambda s, t: kdfast.attention_transfer_loss(s, t),
    "pairwise_affinity_loss": lambda s, t: kdfast.pairwise_affinity_loss(s, t),
}


@pytest.mark.parametrize("case", list(KERNEL_BACKWARDS))
def test_double_backward_of_kernel_ops_raises(case):
    s, t = randn(2, 3, 4, 5).requires_grad_(), randn(2, 4, 4, 5, seed=1).requires_grad_()
    name = case.split(" ")[0]
    with pytest.raises(RuntimeError, match=f"kdfast.{name} does not support double backward"):
        second_derivative(KERNEL_BACKWARDS[case], s, t)


@pytest.mark.parametrize("tiled", [False, True], ids=["whole", "tiled"])
def test_similarity_preserving_double_backward_is_correct(tiled, monkeypatch):
    if tiled:
        monkeypatch.setattr(affinity, "SP_TILE_ENTRIES", 2 * 4)  # two rows per tile
    s, t = randn(4, 3, 2).requires_grad_(), randn(4, 5, seed=1).requires_grad_()
    for reduction in ("mean", "none"):
        def loss(a, b, reduction=reduction):
            return kdfast.similarity_preserving_loss(a, b, reduction=reduction)

        assert torch.autograd.gradgradcheck(loss, (s, t))
        got = second_derivative(lambda a, b: loss(a, b).sum(), s, t)
        want = second_derivative(
            lambda a, b, reduction=reduction: reference.similarity_preserving_loss(a, b, reduction=reduction).sum(),
            s, t)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


def test_svd_and_manifold_double_backward_is_correct():
    # distinct, well separated singular values: where the SVD's derivatives are defined
    A = (torch.linalg.qr(randn(3, 5, 4))[0] * torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
         ) @ torch.linalg.qr(randn(3, 4, 4, seed=1))[0].mT
    A.requires_grad_()
    assert torch.autograd.gradgradcheck(lambda a: [x.abs().sum() for x in kdfast.batched_svd(a)][1], (A,))
    assert torch.autograd.gradgradcheck(lambda a: kdfast.batched_svd(a)[1], (A,))
    s, t = randn(2, 3, 3, 2).requires_grad_(), randn(2, 4, 3, 2, seed=2).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda a, b: kdfast.manifold_distillation_loss(a, b, 2), (s, t))


# ---- empty batches and maps without positions


@pytest.mark.parametrize("fn", [kdfast.attention_transfer_loss, reference.attention_transfer_loss],
                         ids=["kdfast", "reference"])
@pytest.mark.parametrize("p", [2.0, 3.5])
def test_attention_empty_batch_gives_zero(fn, p):
    s = torch.zeros(0, 3, 4, 4, requires_grad=True)
    t = torch.zeros(0, 5, 4, 4)
    for reduction in ("mean", "sum"):
        loss = fn([s, s], [t, t], p, reduction=reduction)
        assert loss.shape == () and loss.item() == 0
        loss.backward()
    assert fn([s, s], [t, t], p, reduction="none").shape == (2, 0)
    assert s.grad.shape == s.shape


@pytest.mark.parametrize("p", [2.0, 1.0, 3.5])
@pytest.mark.parametrize("empty", [(0, 4), (4, 0), (0, 0)], ids=str)
def test_attention_without_positions_gives_zero(empty, p):
    """A pair without positions contributes 0 (it returned uninitialised memory, a different value each call)."""
    s = torch.randn(3, 2, *empty, requires_grad=True)
    t = torch.randn(3, 6, *empty)
    for _ in range(3):
        assert torch.equal(kdfast.attention_transfer_loss(s, t, p, reduction="none"), torch.zeros(1, 3))
        for reduction in ("mean", "sum"):
            assert kdfast.attention_transfer_loss(s, t, p, reduction=reduction).item() == 0
    assert torch.equal(reference.attention_transfer_loss(s, t, p, reduction="none"), torch.zeros(1, 3))
    kdfast.attention_transfer_loss(s, t, p).backward()
    assert torch.equal(s.grad, torch.zeros_like(s))
    assert kdfast.attention_map(s, p).shape == (3, 0)
    # beside a pair with positions, the empty pair adds nothing
    a, b = randn(3, 2, 5, 5, dtype=torch.float32), randn(3, 4, 5, 5, seed=1, dtype=torch.float32)
    for reduction in ("mean", "sum", "none"):
        both = kdfast.attention_transfer_loss([a, s.detach()], [b, t], p, reduction=reduction)
        alone = kdfast.attention_transfer_loss([a], [b], p, reduction=reduction)
        if reduction == "none":
            assert torch.equal(both[1], torch.zeros(3))
            both = both[:1]
        torch.testing.assert_close(both, alone)


def test_reference_empty_batches_give_zero():
    s, t = torch.zeros(0, 4, requires_grad=True), torch.zeros(0, 7)
    for reduction in ("mean", "sum"):
        assert reference.similarity_preserving_loss(s, t, reduction=reduction).item() == 0
        assert kdfast.similarity_preserving_loss(s, t, reduction=reduction).item() == 0
    assert reference.similarity_preserving_loss(s, t, reduction="none").shape == (0,)
    maps = torch.zeros(0, 3, 4, 4)
    assert reference.attention_transfer_loss(maps, maps).item() == 0
    assert reference.pairwise_affinity_loss(maps, maps).item() == 0


def test_svd_and_manifold_empty():
    U, S, Vh = kdfast.batched_svd(torch.zeros(0, 5, 3))
    assert (U.shape, S.shape, Vh.shape) == ((0, 5, 3), (0, 3), (0, 3, 3))
    U, S, Vh = kdfast.batched_svd(torch.zeros(2, 4, 0))
    assert (U.shape, S.shape, Vh.shape) == ((2, 4, 0), (2, 0), (2, 0, 0))
    x = torch.zeros(0, 4, 3, 3, requires_grad=True)
    for reduction in ("mean", "sum"):
        assert kdfast.manifold_distillation_loss(x, x.detach(), 2, reduction=reduction).item() == 0
    assert kdfast.manifold_distillation_loss(x, x.detach(), 2, reduction="none").shape == (0,)


# ---- extreme exponents: scaled, accurate against the float64 reference


@pytest.mark.parametrize("p", [3.0, 30.0, 100.0, 0.25])
@pytest.mark.parametrize("scale", [0.05, 1.0, 50.0])
def test_attention_large_exponents_stay_accurate(p, scale):
    """float32 |x|^p overflows (p = 100 gave NaN, p = 30 a silent 0 where the loss is 0.08) or underflows below
    the normalisation eps; the loss and its gradient follow the float64 reference."""
    s = randn(4, 3, 5, 6, dtype=torch.float32, scale=scale).requires_grad_()
    t = randn(4, 6, 5, 6, seed=1, dtype=torch.float32, scale=scale)
    loss = kdfast.attention_transfer_loss(s, t, p, reduction="none")
    # 150^100 squared overflows float64 too: there the reference runs on features / 50, which leaves the
    # normalised maps unchanged (their norms stay far above eps)
    div = 50.0 if p * scale > 1000 else 1.0
    s64 = (s.detach().double() / div).requires_grad_()
    ref = reference.attention_transfer_loss(s64, t.double() / div, p, reduction="none")
    assert loss.isfinite().all()
    assert_close(loss, ref.detach(), torch.float32, scale=max(1.0, float(ref.detach().abs().max())))
    w = torch.linspace(0.5, 1.5, 4)
    g, = torch.autograd.grad((loss * w).sum(), s)
    gr, = torch.autograd.grad((ref * w.double()).sum(), s64)
    gr = gr / div
    torch.testing.assert_close(g.double(), gr, rtol=1e-3, atol=1e-4 * max(1.0, float(gr.abs().max())))
    for pool in ("mean", "max"):
        assert_close(kdfast.attention_map(s, p, pool=pool), reference.attention_map(s64.detach(), p, pool=pool),
                     torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("shapes", [((3, 4, 7, 5, 7), (3, 8, 15, 6, 22)), ((2, 3, 9, 7), (2, 5, 20, 15))],
                         ids=["3d", "2d"])
def test_attention_half_precision_maps_of_different_sizes(dtype, p, shapes):
    """The larger map is pooled to the smaller's size from its float32 values: pooled in half precision, bf16 at
    p = 1 put the teacher's gradient 33% of its largest entry off and p = 0.5 gave 144 inf/NaN gradient entries."""
    s = randn(*shapes[0], dtype=dtype).requires_grad_()
    t = randn(*shapes[1], seed=1, dtype=dtype).requires_grad_()
    loss = kdfast.attention_transfer_loss(s, t, p)
    gs, gt = torch.autograd.grad(loss, (s, t))
    s64, t64 = s.detach().double().requires_grad_(), t.detach().double().requires_grad_()
    ref = reference.attention_transfer_loss(s64, t64, p)
    rs, rt = torch.autograd.grad(ref, (s64, t64))
    assert loss.dtype == torch.float32 and gs.isfinite().all() and gt.isfinite().all()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-4, atol=1e-7)
    quantum = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps  # the dtype's subnormal spacing
    for g, r in ((gs, rs), (gt, rt)):  # computed in float32 and rounded once: within 1% of the largest entry
        assert (g.double() - r).abs().max() <= 0.01 * r.abs().max() + quantum


def test_attention_scaled_exponent_compiles():
    s, t = randn(3, 4, 5, 5, dtype=torch.float32).requires_grad_(), randn(3, 2, 5, 5, seed=1, dtype=torch.float32)
    loss = torch.compile(lambda a, b: kdfast.attention_transfer_loss(a, b, 30.0), fullgraph=True)(s, t)
    assert_close(loss, reference.attention_transfer_loss(s.detach().double(), t.double(), 30.0), torch.float32)
    g, = torch.autograd.grad(loss, s)
    torch.testing.assert_close(g, torch.autograd.grad(kdfast.attention_transfer_loss(s, t, 30.0), s)[0])


def test_attention_unscaled_overflow_is_nan_not_a_number():
    """p = 1 and 2 run unscaled (the fast path): |x|^p past the accumulator's range gives NaN, never a plausible
    value (documented limit: |x| < 1.8e19 in float32 at p = 2)."""
    x = randn(3, 4, 5, 5, dtype=torch.float32, scale=1e20)
    assert kdfast.attention_transfer_loss(x, randn(3, 4, 5, 5, dtype=torch.float32), reduction="none").isnan().all()


def test_attention_large_exponent_nan_and_inf():
    x = randn(3, 2, 4, 4, dtype=torch.float32)
    x[1, 0, 2, 2] = float("nan")
    x[2, 1, 0, 0] = float("inf")
    for p in (2.0, 30.0):
        rows = kdfast.attention_transfer_loss(x, randn(3, 2, 4, 4, seed=1, dtype=torch.float32), p, reduction="none")
        assert rows[0, 0].isfinite() and rows[0, 1:].isnan().all()


def test_attention_all_zero_sample():
    s = randn(2, 3, 4, 4, dtype=torch.float32)
    s[0] = 0
    for p in (2.0, 7.0):
        m = kdfast.attention_map(s, p)
        assert torch.equal(m[0], torch.zeros(16))
        assert_close(m, reference.attention_map(s.double(), p), torch.float32)


# ---- torch.func transforms run the reference: correct values instead of errors from the dispatcher

def _attention(s, t):
    return kdfast.attention_transfer_loss(s, t)


def _pairwise(s, t):
    return kdfast.pairwise_affinity_loss(s, t)


def _sp(s, t):
    return kdfast.similarity_preserving_loss(s, t)


def _manifold(s, t):
    return kdfast.manifold_distillation_loss(s, t, 2)


def _map(s, t):
    return kdfast.attention_map(s).square().sum() + kdfast.attention_map(t, 3.0).sum()


@pytest.mark.parametrize("fn", [_attention, _pairwise, _sp, _manifold, _map], ids=lambda f: f.__name__[1:])
def test_func_grad_and_vmap(fn):
    s, t = randn(3, 4, 3, 3), randn(3, 2, 3, 3, seed=1)
    s_ = s.clone().requires_grad_()
    want, = torch.autograd.grad(fn(s_, t), s_)
    torch.testing.assert_close(torch.func.grad(fn)(s, t), want)
    S, T = torch.stack([s, 2 * s]), torch.stack([t, t.flip(0)])
    torch.testing.assert_close(torch.vmap(fn)(S, T), torch.stack([fn(S[0], T[0]), fn(S[1], T[1])]))


def test_svd_under_vmap_and_grad():
    A = randn(2, 3, 6, 4)
    U, S, Vh = torch.vmap(kdfast.batched_svd)(A)
    torch.testing.assert_close(S, torch.linalg.svdvals(A))
    g = torch.func.grad(lambda a: kdfast.batched_svd(a)[1].sum())(A[0])
    a = A[0].clone().requires_grad_()
    torch.testing.assert_close(g, torch.autograd.grad(torch.linalg.svdvals(a).sum(), a)[0])


# ---- other edges of the arguments


def test_non_contiguous_inputs_match_contiguous():
    s = randn(3, 6, 5, 4, dtype=torch.float32).transpose(2, 3)
    t = randn(3, 4, 4, 5, dtype=torch.float32)[:, ::2]
    for fn in (lambda a, b: kdfast.attention_transfer_loss(a, b, reduction="none"),
               lambda a, b: kdfast.attention_transfer_loss(a, b, 30.0, reduction="none"),
               lambda a, b: kdfast.pairwise_affinity_loss(a, b, reduction="none"),
               lambda a, b: kdfast.similarity_preserving_loss(a, b, reduction="none"),
               lambda a, b: kdfast.manifold_distillation_loss(a, b, 2, reduction="none")):
        torch.testing.assert_close(fn(s, t), fn(s.contiguous(), t.contiguous()))


def test_single_sample_single_channel_single_position():
    x, y = randn(1, 1, 1, 1, dtype=torch.float32), randn(1, 1, 1, 1, seed=1, dtype=torch.float32)
    assert kdfast.attention_transfer_loss(x, y).item() == 0  # both maps are [1]
    assert kdfast.pairwise_affinity_loss(x, y).item() == 0  # a single node: a_00 = 1 on both sides
    assert kdfast.similarity_preserving_loss(x, y).item() == 0  # a single sample: G = [1] on both sides


def test_meta_device_is_a_clear_error():
    x, m = torch.randn(2, 3, 4, 4), torch.empty(2, 3, 4, 4, device="meta")
    for call in (kdfast.attention_transfer_loss, kdfast.pairwise_affinity_loss, kdfast.similarity_preserving_loss,
                 lambda a, b: kdfast.manifold_distillation_loss(a, b, 2)):
        with pytest.raises(ValueError, match="is on meta but .* is on cpu"):
            call(x, m)


BAD_ARGUMENTS = [
    (lambda x: kdfast.attention_map(x, 0.0), ValueError, "p must be finite and > 0"),
    (lambda x: kdfast.attention_map(x, -2.0), ValueError, "p must be finite and > 0"),
    (lambda x: kdfast.attention_map(x, float("inf")), ValueError, "p must be finite and > 0"),
    (lambda x: kdfast.attention_map(x, float("nan")), ValueError, "p must be finite and > 0"),
    (lambda x: kdfast.attention_map(x, True), TypeError, "p must be a number"),
    (lambda x: kdfast.attention_map(x.long()), TypeError, "features must be float32"),
    (lambda x: kdfast.attention_map(x[:, :0]), ValueError, "has no channels"),
    (lambda x: kdfast.attention_transfer_loss(x, x[:3]), ValueError, "batch size 3"),
    (lambda x: kdfast.pairwise_affinity_loss(x, x[..., :0]), ValueError, "at least one channel and one position"),
    (lambda x: kdfast.pairwise_affinity_loss(x, x, pool_size=-1), ValueError, "pool_size must be >= 1"),
    (lambda x: kdfast.similarity_preserving_loss(x, x[:2]), ValueError, "same batch size"),
    (lambda x: kdfast.similarity_preserving_loss(x[0, 0, 0], x[0, 0, 0]), ValueError, "batch dimension"),
    (lambda x: kdfast.batched_svd(x[0, 0, 0]), ValueError, "at least 2 dimensions"),
    (lambda x: kdfast.batched_svd(x.int()), TypeError, "A must be float32"),
    (lambda x: kdfast.manifold_distillation_loss(x, x, 0), ValueError, "rank must be in"),
    (lambda x: kdfast.manifold_distillation_loss(x, x, 10 ** 9), ValueError, "rank must be in"),
    (lambda x: kdfast.manifold_distillation_loss(x, x, 2.0), TypeError, "rank must be an int"),
    (lambda x: kdfast.manifold_projection(x, True), TypeError, "rank must be an int"),
]


@pytest.mark.parametrize("call, error, match", BAD_ARGUMENTS)
def test_bad_arguments_raise_clearly(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(4, 3, 5, 5))


def test_svd_past_the_kernel_limit_uses_linalg():
    A = randn(2, 70, 66, dtype=torch.float32)
    assert kdfast.manifold.KERNEL_MAX_K == 64
    U, S, Vh = kdfast.batched_svd(A)
    torch.testing.assert_close(S, torch.linalg.svdvals(A), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="min\\(m, n\\) <= 64"):
        torch.ops.kdfast.batched_svd(A)


# ---- accuracy edges found by the differential fuzz (tests/test_fuzz.py)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_affinity_gradient_of_a_small_node_is_relative_to_its_norm(dtype):
    # Fuzz seed 1796535862, affinity case 54: one channel, so a_ij = sign(x_i) sign(x_j) and the exact gradient is
    # 0; a node of norm 7e-4 among nodes of norm ~1 gets float32 rounding of its own natural size 1 / |x_i| (2.4e-4
    # here), which the fuzz measured against 1 / rms of the whole map. Each node is normalised on its own: the
    # promise (docs/guarantees.md, "Accuracy") is relative to the node's norm.
    x = randn(1, 1, 1, 18, seed=3).to(dtype)
    x[0, 0, 0, 4] = -7.17e-4
    node = x.double().abs().flatten()
    for fn, rf, args in (
            (kdfast.affinity_graph, lambda a: reference.affinity_graph(a, acc=torch.float64), (x,)),
            (kdfast.pairwise_affinity_loss, reference.pairwise_affinity_loss, (x, randn(1, 3, 1, 18, seed=4)))):
        leaves = [a.detach().requires_grad_() for a in args]
        out = fn(*leaves)
        w = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).reshape(out.shape)
        got = torch.autograd.grad((out.double() * w).sum(), leaves[0])[0].double().flatten()
        ref = [a.detach().double().requires_grad_() for a in args]
        want = torch.autograd.grad((rf(*ref) * w).sum(), ref[0])[0].flatten()
        assert ((got - want).abs() <= 5e-4 * 1e-2 / node).all()


def test_fuzz_affinity_floor_follows_the_nodes():
    # The fuzz's per-entry floor: each entry of a map gets the norm of the node it is pooled into (times the window
    # for "avg", an entry's share of the node's gradient).
    from test_fuzz import node_norms
    x = randn(2, 3, 5, 7)
    for pool_size, pool in ((None, "max"), ((2, 3), "max"), ((2, 3), "avg"), (2, "avg")):
        norms = affinity.affinity_nodes(x, pool_size, pool).norm(dim=1)
        k = (1, 1) if pool_size is None else (pool_size, pool_size) if isinstance(pool_size, int) else pool_size
        got = node_norms(x, pool_size, pool)
        assert got.shape == (2, 1, 5, 7)
        for h, w in ((0, 0), (4, 6), (3, 2), (1, 5)):
            node = (h // k[0]) * -(-7 // k[1]) + w // k[1]
            want = norms[:, node] * (k[0] * k[1] if pool == "avg" else 1)
            torch.testing.assert_close(got[:, 0, h, w], want)


@pytest.mark.parametrize("rank", [1, 2])
def test_manifold_small_loss_keeps_its_relative_accuracy(rank):
    # Fuzz seed 1796535862, manifold case 89818: a float32 loss of 6.3e-5 came out 4.6e-7 off, evaluated as
    # ||P_s||^2 + ||P_t||^2 - 2 <P_s, P_t> from U columns whose norms differ from 1 by 7e-8 (the rounding of terms
    # of size 1). kdfast.manifold._set_loss sums terms that are each as small as the loss (relative error 0.14 ->
    # 5e-5 here).
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 6, rank, generator=g, dtype=torch.float64) @ torch.randn(2, rank, 8, generator=g,
                                                                                   dtype=torch.float64) * 3
    s = base + 0.05 * torch.randn(2, 6, 8, generator=g, dtype=torch.float64)
    q = torch.linalg.qr(torch.randn(8, 6, generator=g, dtype=torch.float64))[0]
    t = s @ q + 1e-4 * torch.randn(2, 6, 6, generator=g, dtype=torch.float64)
    s, t = s.float().requires_grad_(), t.float().requires_grad_()
    got = kdfast.manifold_distillation_loss(s, t, rank, reduction="none")
    s64, t64 = s.detach().double().requires_grad_(), t.detach().double().requires_grad_()
    want = reference.manifold_distillation_loss(s64, t64, rank, reduction="none")
    assert want.max() < 0.1
    assert ((got.double() - want).abs() <= 5e-4 * want).all(), (got, want)
    for a, b in zip(torch.autograd.grad(got.sum(), (s, t)), torch.autograd.grad(want.sum(), (s64, t64))):
        assert (a.double() - b).abs().max() <= 5e-4 * b.abs().max()


def test_affinity_gradient_of_a_zero_node_past_float16_range():
    # Fuzz seed 1796535862, affinity case 11091: "avg" pooling makes a node of exactly 0 (-1.0312 and 1.0312); its
    # norm is clamped at 1e-8, so its gradient is dk / 1e-8 = -1.9e8 (the float64 reference too), beyond float16's
    # range: -inf in a float16 gradient, the same finite value in float32.
    s = torch.tensor([-1.0312, 1.0312, 0.1296, 0.7056, -0.5806, -1.4023, 0.5903, -0.4639]).view(1, 1, 8, 1)
    t = randn(1, 5, 8, 1, seed=5)
    kw = dict(pool_size=(2, 3), pool="avg", reduction="sum")
    ref = s.to(torch.float16).double().requires_grad_()
    reference.pairwise_affinity_loss(ref, t, **kw).backward()
    assert ref.grad.abs().max() > 1e7 and ref.grad.isfinite().all()
    for dtype in (torch.float16, torch.float32):
        x = s.to(torch.float16).to(dtype).requires_grad_()
        kdfast.pairwise_affinity_loss(x, t.to(dtype), **kw).backward()
        big = ref.grad.abs() > torch.finfo(dtype).max
        assert torch.equal(x.grad[big].double(), ref.grad[big].sign() * float("inf"))
        assert ((x.grad[~big].double() - ref.grad[~big]).abs() <= 5e-4 * ref.grad.abs().max()).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_affinity_graph_pools_half_precision_in_float32(dtype):
    # Fuzz seed 1796535862, affinity case 19110: affinity_graph averaged a bfloat16 map in bfloat16, so its gradient
    # was 2 bfloat16 steps off (-2.953 for -2.984). Pooled in float32, the gradient is the float32 one rounded once.
    x = randn(1, 2, 9, 9, seed=6).to(dtype).requires_grad_()
    x32 = x.detach().float().requires_grad_()
    w = randn(1, 25, 25, seed=7)
    for a in (x, x32):
        (kdfast.affinity_graph(a, pool_size=2, pool="avg").double() * w).sum().backward()
    assert torch.equal(x.grad, x32.grad.to(dtype))


@pytest.mark.parametrize("pool", ["mean", "sum", "max"])
@pytest.mark.parametrize("p", [0.5, 3.0])
def test_attention_gradient_at_an_exact_zero(pool, p):
    """|x|^p has gradient 0 at x = 0, for p < 1 too (no finite value there): the kernels gave NaN where gradient
    flowed and the reference NaN where none did (0 * inf in a channel max-pooling left out; fuzz seed 611206,
    attention case 2660: a map pooled to the other's size had an exact 0)."""
    x = torch.tensor([[[0.0, 1.0, 2.0], [0.5, 0.0, -1.0]], [[3.0, 0.0, -1.0], [0.0, 0.0, 0.25]]], requires_grad=True)
    w = torch.arange(1.0, 4.0)
    got = torch.autograd.grad((kdfast.attention_map(x, p, pool=pool) * w).sum(), x)[0]
    x64 = x.detach().double().requires_grad_()
    want = torch.autograd.grad((reference.attention_map(x64, p, pool=pool) * w).sum(), x64)[0]
    assert got.isfinite().all() and want.isfinite().all()
    assert (got[x == 0] == 0).all() and (want[x == 0] == 0).all()
    assert_close(got, want, torch.float32)
    # the pooled pair of the reproducer: bf16 student pooled to the teacher's size, an exact 0 after averaging
    s = torch.tensor([[[0.5, -0.5, 1.0, 2.0]]], dtype=torch.bfloat16, requires_grad=True)
    t = torch.tensor([[[1.0, 2.0]]], requires_grad=True)
    gs = torch.autograd.grad(kdfast.attention_transfer_loss(s, t, p, pool=pool), s)[0]
    s64 = s.detach().double().requires_grad_()
    rs = torch.autograd.grad(reference.attention_transfer_loss(s64, t.detach().double(), p, pool=pool), s64)[0]
    assert gs.isfinite().all() and rs.isfinite().all()
