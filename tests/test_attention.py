"""attention_map / attention_transfer_loss / AttentionTransfer against the pure-PyTorch reference."""
import pytest
import torch
from conftest import assert_close

import kdfast
from kdfast import reference

POOLS = ["mean", "sum", "max"]


def feats(*shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def ref_map(x, p, pool, normalize=True):
    return reference.attention_map(x.double(), p, pool=pool, normalize=normalize)


def grads_of(fn, inputs, seed=0):
    """The gradients of sum(fn(inputs) * w) with respect to every input, for a fixed random w."""
    inputs = [x.detach().requires_grad_() for x in inputs]
    out = fn(*inputs)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out)
    return out.detach(), torch.autograd.grad((out * w).sum(), inputs)


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("p", [2.0, 1.0, 3.0])
@pytest.mark.parametrize("normalize", [True, False])
def test_map_matches_reference(device, dtype, pool, p, normalize):
    x = feats(5, 7, 9, 11, dtype=dtype, device=device)
    out, (g,) = grads_of(lambda x: kdfast.attention_map(x, p, pool=pool, normalize=normalize), [x])
    ref, (gr,) = grads_of(lambda x: ref_map(x, p, pool, normalize), [x])
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == (5, 99)
    assert g.dtype == dtype
    assert_close(out, ref, dtype)
    assert_close(g, gr, dtype, scale=10.0)


def test_map_every_cpu_capability(cpu_capability):
    x = feats(3, 13, 37, 41)  # positions not a multiple of any vector width, more than one chunk
    for pool in POOLS:
        for p in (1.0, 2.0, 2.5):
            out, (g,) = grads_of(lambda x, p=p, pool=pool: kdfast.attention_map(x, p, pool=pool), [x])
            ref, (gr,) = grads_of(lambda x, p=p, pool=pool: ref_map(x, p, pool), [x])
            assert_close(out, ref, torch.float32)
            assert_close(g, gr, torch.float32, scale=10.0)


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 1, 7), (2, 3, 1, 1), (2, 7, 3, 5, 2), (1, 2, 1000003)])
def test_map_odd_shapes(shape):
    x = feats(*shape, dtype=torch.float64)
    for pool in POOLS:
        out, (g,) = grads_of(lambda x, pool=pool: kdfast.attention_map(x, pool=pool), [x])
        ref, (gr,) = grads_of(lambda x, pool=pool: ref_map(x, 2.0, pool), [x])
        assert_close(out, ref, torch.float64)
        assert_close(g, gr, torch.float64)


def test_map_non_contiguous():
    base = feats(4, 6, 10, 12)
    for x in (base.to(memory_format=torch.channels_last), base.transpose(2, 3), base[:, ::2, 1:, ::3]):
        assert not x.is_contiguous()
        out, (g,) = grads_of(lambda x: kdfast.attention_map(x), [x])
        ref, (gr,) = grads_of(lambda x: ref_map(x, 2.0, "mean"), [x])
        assert_close(out, ref, torch.float32)
        assert_close(g, gr, torch.float32)


def test_map_zero_and_nan():
    x = feats(3, 4, 5, 5)
    x[0] = 0  # norm 0 < eps: the map is 0 and the gradient as torch computes it
    x[1, 2, 3, 4] = float("nan")
    for pool in POOLS:
        out, (g,) = grads_of(lambda x, pool=pool: kdfast.attention_map(x, pool=pool), [x])
        ref, (gr,) = grads_of(lambda x, pool=pool: ref_map(x, 2.0, pool), [x])
        assert torch.isnan(out[1]).all() and not torch.isnan(out[[0, 2]]).any()
        assert_close(out, ref, torch.float32)
        assert_close(g, gr, torch.float32)


def test_max_gradient_goes_to_first_argmax():
    x = torch.tensor([[[1.0, -2.0]], [[-1.0, 2.0]], [[0.5, 2.0]]]).permute(1, 0, 2).contiguous()  # (1, 3, 2)
    x.requires_grad_()
    kdfast.attention_map(x, pool="max", normalize=False).sum().backward()
    assert torch.equal(x.grad, torch.tensor([[[2.0, -4.0], [0.0, 0.0], [0.0, 0.0]]]))


def test_empty_batch():
    x = torch.zeros(0, 3, 4, 4, requires_grad=True)
    assert kdfast.attention_map(x).shape == (0, 16)
    loss = kdfast.attention_transfer_loss(x, torch.zeros(0, 5, 4, 4), reduction="none")
    assert loss.shape == (1, 0)
    loss.sum().backward()
    assert x.grad.shape == x.shape


def pair_lists(dtype_s=torch.float32, dtype_t=torch.float32, device="cpu"):
    s_shapes = [(4, 3, 9, 9), (4, 8, 5, 5), (4, 2, 7)]
    t_shapes = [(4, 5, 9, 9), (4, 16, 10, 10), (4, 6, 3)]  # pair 2: teacher pooled down, pair 3: student pooled down
    ss = [feats(*s, dtype=dtype_s, device=device, seed=i) for i, s in enumerate(s_shapes)]
    ts = [feats(*t, dtype=dtype_t, device=device, seed=10 + i) for i, t in enumerate(t_shapes)]
    return ss, ts


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("pool", POOLS)
def test_loss_matches_reference(device, dtype, pool, reduction):
    check_loss(*pair_lists(dtype, dtype, device), pool, reduction, dtype)


def test_loss_mixed_dtypes():
    check_loss(*pair_lists(torch.bfloat16, torch.float32), "mean", "mean", torch.bfloat16)
    check_loss(*pair_lists(torch.float64, torch.float16), "sum", "none", torch.float16)


def check_loss(ss, ts, pool, reduction, dtype):
    """Loss and gradients against the reference run on the same inputs (which pools mismatched spatial sizes in
    the inputs' dtypes, as kdfast does, then computes in float32 or float64)."""
    k = len(ss)

    def run(fn):
        return lambda *xs: fn(list(xs[:k]), list(xs[k:]), 2.0, pool=pool, reduction=reduction)

    out, g = grads_of(run(kdfast.attention_transfer_loss), ss + ts)
    ref, gr = grads_of(run(reference.attention_transfer_loss), ss + ts)
    assert out.shape == ref.shape == ((k, ss[0].shape[0]) if reduction == "none" else ())
    assert out.dtype == ref.dtype
    assert_close(out, ref, dtype)
    for a, b, x in zip(g, gr, ss + ts):
        assert a.dtype == x.dtype
        assert_close(a, b, dtype, scale=10.0)


def test_loss_many_pairs(device):
    # more feature maps than one CUDA launch takes (16), with the largest pair not first
    shapes = [(2, 1 + i, 3 + i, 2) for i in range(9)]
    ss = [feats(*c, device=device, seed=i) for i, c in enumerate(shapes)]
    ts = [feats(c[0], 2 * c[1], *c[2:], device=device, seed=20 + i) for i, c in enumerate(shapes)]
    check_loss(ss, ts, "max", "none", torch.float32)


def test_loss_single_pair_and_module():
    s, t = feats(4, 8, 6, 6), feats(4, 12, 6, 6, seed=1)
    ref = reference.attention_transfer_loss(s, t)
    assert_close(kdfast.attention_transfer_loss(s, t), ref, torch.float32)
    at = kdfast.AttentionTransfer(2.0, pool="mean", reduction="mean")
    assert_close(at([s], [t]), ref, torch.float32)


def test_loss_teacher_only_gradient():
    s, t = feats(2, 3, 4, 4), feats(2, 5, 4, 4, seed=1).requires_grad_()
    kdfast.attention_transfer_loss(s, t).backward()
    ref_t = t.detach().clone().requires_grad_()
    reference.attention_transfer_loss(s, ref_t).backward()
    assert_close(t.grad, ref_t.grad, torch.float32)


def test_deterministic():
    ss, ts = pair_lists()
    ss = [x.requires_grad_() for x in ss]
    runs = []
    for _ in range(2):
        loss = kdfast.attention_transfer_loss(ss, ts, reduction="none")
        g = torch.autograd.grad(loss.sum(), ss)
        runs.append((loss, g))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_gradcheck():
    s = feats(2, 3, 3, 4, dtype=torch.float64).requires_grad_()
    t = feats(2, 2, 6, 8, dtype=torch.float64, seed=1).requires_grad_()
    for pool in POOLS:
        assert torch.autograd.gradcheck(lambda x, pool=pool: kdfast.attention_map(x, 3.0, pool=pool), (s,))
        for reduction in ("mean", "none"):
            def loss(a, b, pool=pool, reduction=reduction):
                return kdfast.attention_transfer_loss([a], [b], 2.0, pool=pool, reduction=reduction)

            assert torch.autograd.gradcheck(loss, (s, t))


def test_opcheck():
    xs = [feats(2, 3, 5).requires_grad_(), feats(2, 4, 7, dtype=torch.bfloat16, seed=1).requires_grad_()]
    for pool in POOLS:
        torch.library.opcheck(torch.ops.kdfast.attention_fwd.default, (xs, 2.0, pool, True))
        with torch.no_grad():
            maps, norms, argmax = torch.ops.kdfast.attention_fwd(xs, 1.5, pool, True)
        grads = [torch.randn_like(m) for m in maps]
        torch.library.opcheck(torch.ops.kdfast.attention_bwd.default,
                              (grads, [x.detach() for x in xs], maps, norms, argmax, 1.5, pool,
                               True, [True, False]))


def test_opcheck_transfer():
    s = [feats(2, 3, 5).requires_grad_(), feats(2, 4, 7, dtype=torch.bfloat16, seed=1).requires_grad_()]
    t = [feats(2, 6, 5, seed=2).requires_grad_(), feats(2, 2, 7, seed=3)]
    for pool in POOLS:
        torch.library.opcheck(torch.ops.kdfast.attention_transfer_fwd.default, (s, t, 2.0, pool))
        with torch.no_grad():
            rows, maps, norms, argmax = torch.ops.kdfast.attention_transfer_fwd(s, t, 3.0, pool)
        torch.library.opcheck(torch.ops.kdfast.attention_transfer_bwd.default,
                              (torch.randn_like(rows), [x.detach() for x in s], [x.detach() for x in t], maps, norms,
                               argmax, 3.0, pool, [True, True, True, False]))


def test_compile_fullgraph():
    s = [feats(2, 3, 4, 4).requires_grad_(), feats(2, 4, 2, 2, seed=1).requires_grad_()]
    t = [feats(2, 5, 4, 4, seed=2), feats(2, 6, 4, 4, seed=3)]
    loss_fn = torch.compile(lambda a, b: kdfast.attention_transfer_loss(a, b, reduction="sum"), fullgraph=True)
    map_fn = torch.compile(lambda x: kdfast.attention_map(x, pool="max"), fullgraph=True)
    loss = loss_fn(s, t)
    assert_close(loss, reference.attention_transfer_loss(s, t, reduction="sum"), torch.float32)
    g = torch.autograd.grad(loss, s)
    gr = torch.autograd.grad(reference.attention_transfer_loss(s, t, reduction="sum"), s)
    for a, b in zip(g, gr):
        assert_close(a, b, torch.float32)
    assert_close(map_fn(t[0]), reference.attention_map(t[0], pool="max"), torch.float32)


@pytest.mark.parametrize("call, error, match", [
    (lambda s, t: kdfast.attention_transfer_loss(s, t[:2]), ValueError, "batch size"),
    (lambda s, t: kdfast.attention_transfer_loss([s], [t, t]), ValueError, "as many layers"),
    (lambda s, t: kdfast.attention_transfer_loss([], []), ValueError, "empty"),
    (lambda s, t: kdfast.attention_transfer_loss(s, [t]), TypeError, "both be tensors"),
    (lambda s, t: kdfast.attention_transfer_loss(s, t, p=0), ValueError, "p must be"),
    (lambda s, t: kdfast.attention_transfer_loss(s, t, p=-1.0), ValueError, "p must be"),
    (lambda s, t: kdfast.attention_transfer_loss(s, t, p=float("inf")), ValueError, "p must be"),
    (lambda s, t: kdfast.attention_transfer_loss(s, t, pool="avg"), ValueError, "pool must be"),
    (lambda s, t: kdfast.attention_transfer_loss(s, t, reduction="batchmean"), ValueError, "reduction must be"),
    (lambda s, t: kdfast.attention_transfer_loss(s[:, :, 0, 0], t), ValueError, "at least one spatial dim"),
    (lambda s, t: kdfast.attention_transfer_loss(s[:, :, 0], t), ValueError, "as many spatial dims"),
    (lambda s, t: kdfast.attention_transfer_loss(s[:, :, :, :2], t[:, :, :2]), ValueError, "at least as large"),
    (lambda s, t: kdfast.attention_transfer_loss(s[:, :0], t), ValueError, "no channels"),
    (lambda s, t: kdfast.attention_transfer_loss(s.long(), t), TypeError, "student_features must be float"),
    (lambda s, t: kdfast.attention_transfer_loss([s], [t.int()]), TypeError, r"teacher_features\[0\] must be"),
    (lambda s, t: kdfast.attention_map(s, pool="min"), ValueError, "pool must be"),
    (lambda s, t: kdfast.attention_map(s, 0.0), ValueError, "p must be"),
    (lambda s, t: kdfast.attention_map(s[:, :, 0, 0]), ValueError, "at least one spatial dim"),
    (lambda s, t: kdfast.attention_map(s, normalize=1), TypeError, "normalize must be a bool"),
    (lambda s, t: kdfast.AttentionTransfer(pool="median"), ValueError, "pool must be"),
])
def test_errors(call, error, match):
    s, t = feats(4, 3, 6, 6), feats(4, 5, 6, 6, seed=1)
    with pytest.raises(error, match=match):
        call(s, t)
