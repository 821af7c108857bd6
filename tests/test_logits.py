"""kd_div / kd_loss against the float64 reference, across divergences, shapes, dims, dtypes and CPU instruction sets;
gradients, masks, -inf and NaN, layouts, autograd/opcheck/compile, determinism, and every documented error."""
import pytest
import torch
from conftest import assert_close

import kdfast
from kdfast import _ops, reference

DIVERGENCES = ["kl", "reverse_kl", "jsd"]

# (shape, dim, temperature): class counts 1, 2, 3, 1000, 32000, 131073; pixel-wise dim=1 with partial lane groups.
CASES = [
    ((4, 1), -1, 1.0),
    ((5, 2), -1, 0.5),
    ((3, 3), -1, 4.0),
    ((7, 1000), -1, 20.0),
    ((2, 32000), -1, 4.0),
    ((1, 131073), -1, 1.0),
    ((1, 1000003), -1, 4.0),
    ((1000,), -1, 4.0),
    ((7, 3), 0, 4.0),
    ((2, 7, 5, 3), 1, 4.0),
    ((2, 19, 9, 37), 1, 1.0),
    ((3, 4, 33), 1, 0.5),
]
CASE_IDS = [f"{'x'.join(map(str, s))}-dim{d}-T{t:g}" for s, d, t in CASES]

def make_logits(shape, dtype, device, seed=0, scale=3.0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    return s.requires_grad_(requires_grad), t.requires_grad_(requires_grad)

def row_shape(shape, dim):
    dim %= len(shape)
    return shape[:dim] + shape[dim + 1:]

def reference_and_grads(fn, s, t, *args, **kwargs):
    """The reference on float64 copies of the (already rounded) inputs, with its gradients."""
    s64 = s.detach().double().requires_grad_(True)
    t64 = t.detach().double().requires_grad_(True)
    out = fn(s64, t64, *args, **kwargs)
    gs, gt = torch.autograd.grad(out.sum(), (s64, t64))
    return out.detach(), gs, gt

@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_kd_div_matches_reference(device, dtype, case, divergence):
    shape, dim, T = case
    s, t = make_logits(shape, dtype, device)
    out = kdfast.kd_div(s, t, T, divergence=divergence, dim=dim, reduction="none", beta=0.3)
    gs, gt = torch.autograd.grad(out.sum(), (s, t))
    ref, rgs, rgt = reference_and_grads(reference.kd_div, s, t, T, divergence=divergence, dim=dim,
                                        reduction="none", beta=0.3)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == row_shape(shape, dim)
    assert gs.dtype == dtype and gt.dtype == dtype
    assert_close(out, ref, dtype, scale=T * T)
    assert_close(gs, rgs, dtype)
    assert_close(gt, rgt, dtype)

@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("case", [CASES[i] for i in (2, 3, 7, 9)], ids=[CASE_IDS[i] for i in (2, 3, 7, 9)])
def test_kd_loss_matches_reference(device, dtype, case, divergence):
    shape, dim, T = case
    s, t = make_logits(shape, dtype, device, seed=1)
    rows = row_shape(shape, dim)
    target = torch.randint(0, shape[dim], rows, generator=torch.Generator().manual_seed(2)).to(device)
    target.view(-1)[::3] = -100  # ignored rows
    out = kdfast.kd_loss(s, t, target, T, 0.7, divergence=divergence, dim=dim, beta=0.6)
    gs, gt = torch.autograd.grad(out, (s, t))
    ref, rgs, rgt = reference_and_grads(reference.kd_loss, s, t, target, T, 0.7, divergence=divergence, dim=dim,
                                        beta=0.6)
    assert_close(out, ref, dtype, scale=T * T)
    assert_close(gs, rgs, dtype)
    assert_close(gt, rgt, dtype)

@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("case", [CASES[i] for i in (1, 3, 9, 10)], ids=[CASE_IDS[i] for i in (1, 3, 9, 10)])
def test_every_cpu_instruction_set(cpu_capability, case, divergence):
    """Each compiled CPU variant (default, AVX2, AVX-512) against the reference, in row and pixel layouts."""
    shape, dim, T = case
    for dtype in (torch.float32, torch.bfloat16):
        s, t = make_logits(shape, dtype, "cpu", seed=3)
        target = torch.randint(0, shape[dim], row_shape(shape, dim), generator=torch.Generator().manual_seed(4))
        out = kdfast.kd_loss(s, t, target, T, 0.5, divergence=divergence, dim=dim)
        gs, gt = torch.autograd.grad(out, (s, t))
        ref, rgs, rgt = reference_and_grads(reference.kd_loss, s, t, target, T, 0.5, divergence=divergence, dim=dim)
        assert_close(out, ref, dtype, scale=T * T)
        assert_close(gs, rgs, dtype)
        assert_close(gt, rgt, dtype)

@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dim", [-1, 1])
def test_row_gradients_broadcast_or_per_row(device, divergence, dim):
    """The backward reads a uniform upstream gradient (the gradient of a sum or mean) in place, and per-row ones
    row by row: both must give the reference's gradients."""
    s, t = make_logits((3, 7, 5), torch.float64, device)
    out = kdfast.kd_div(s, t, 2.0, divergence=divergence, dim=dim, reduction="none", beta=0.3)
    ref = reference.kd_div(s, t, 2.0, divergence=divergence, dim=dim, reduction="none", beta=0.3)
    weights = torch.rand(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(device)
    for upstream in (torch.full_like(out, 0.7), weights, torch.tensor(0.7, dtype=torch.float64,
                                                                       device=device).expand(out.shape)):
        got = torch.autograd.grad(out, (s, t), upstream, retain_graph=True)
        want = torch.autograd.grad(ref, (s, t), upstream, retain_graph=True)
        for g, w in zip(got, want):
            assert_close(g, w, torch.float64)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("scale_t2", [True, False])
def test_reductions_and_masks(device, reduction, scale_t2):
    s, t = make_logits((6, 5, 11), torch.float32, device)
    mask = torch.tensor([[True, False, True, True, False]] * 6, device=device)
    for m in (None, mask, torch.zeros_like(mask), torch.ones_like(mask)):
        out = kdfast.kd_div(s, t, 2.0, dim=-1, mask=m, reduction=reduction, scale_t2=scale_t2)
        ref = reference.kd_div(s.double(), t.double(), 2.0, dim=-1, mask=m, reduction=reduction, scale_t2=scale_t2)
        assert_close(out, ref, torch.float32, scale=4)

@pytest.mark.parametrize("classes", [1, 2, 3, 7, 8, 9, 10, 15, 16, 17, 31, 33, 100, 1000, 1024, 1025])
def test_short_rows_reduced_in_the_op(device, dtype, classes):
    """Rows of up to 1024 classes take the two-pass short-row kernels (every tail length of a vector), and the
    reductions run inside the op: kd_div with and without a mask, kd_loss with ignored rows, against the reference."""
    s, t = make_logits((13, classes), dtype, device, seed=classes)
    mask = (torch.arange(13, device=device) % 3) != 1
    target = torch.arange(13, device=device) % classes
    target[4] = -100
    T = 3.0
    for div in DIVERGENCES:
        for reduction, m in (("batchmean", None), ("sum", mask), ("batchmean", mask)):
            kw = dict(divergence=div, beta=0.4, mask=m, reduction=reduction)
            out = kdfast.kd_div(s, t, T, **kw)
            gs, gt = torch.autograd.grad(out, (s, t))
            ref, rgs, rgt = reference_and_grads(reference.kd_div, s, t, T, **kw)
            assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and out.shape == ()
            assert_close(out, ref, dtype, scale=T * T * classes)
            assert_close(gs, rgs, dtype)
            assert_close(gt, rgt, dtype)
        out = kdfast.kd_loss(s, t, target, T, 0.7, divergence=div, beta=0.4)
        gs, gt = torch.autograd.grad(out, (s, t))
        ref, rgs, rgt = reference_and_grads(reference.kd_loss, s, t, target, T, 0.7, divergence=div, beta=0.4)
        assert_close(out, ref, dtype, scale=T * T * classes)
        assert_close(gs, rgs, dtype)
        assert_close(gt, rgt, dtype)


def test_all_false_mask_gives_zero_loss_and_zero_grads(device):
    s, t = make_logits((4, 9), torch.float32, device)
    mask = torch.zeros(4, dtype=torch.bool, device=device)
    out = kdfast.kd_div(s, t, 4.0, mask=mask)
    assert out.item() == 0.0
    gs, gt = torch.autograd.grad(out, (s, t))
    assert torch.count_nonzero(gs) == 0 and torch.count_nonzero(gt) == 0
    target = torch.full((4,), -100, device=device)
    loss = kdfast.kd_loss(s, t, target)
    assert loss.item() == 0.0

def test_neg_inf_logits(device):
    """A class of probability 0 under both contributes 0; KL is +inf where only the student gives it 0."""
    s, t = make_logits((3, 6), torch.float32, device, requires_grad=False)
    s[:, 2] = float("-inf")
    t[:, 2] = float("-inf")
    for div in DIVERGENCES:
        out = kdfast.kd_div(s, t, 2.0, divergence=div, reduction="none")
        expect = reference.kd_div(s[:, [0, 1, 3, 4, 5]].double(), t[:, [0, 1, 3, 4, 5]].double(), 2.0,
                                  divergence=div, reduction="none")
        assert torch.isfinite(out).all()
        assert_close(out, expect, torch.float32, scale=4)
        sg = s.clone().requires_grad_(True)
        gs, = torch.autograd.grad(kdfast.kd_div(sg, t, 2.0, divergence=div), (sg,))
        assert torch.isfinite(gs).all() and (gs[:, 2] == 0).all()
    s2 = s.clone()
    s2[0, 0] = float("-inf")  # the teacher keeps mass on class 0
    out = kdfast.kd_div(s2, t, 2.0, reduction="none")
    assert out[0].item() == float("inf") and torch.isfinite(out[1:]).all()

def test_nan_propagates(device):
    s, t = make_logits((3, 40), torch.float32, device)
    s2 = s.detach().clone()
    s2[1, 7] = float("nan")
    s2.requires_grad_(True)
    out = kdfast.kd_div(s2, t, 2.0, reduction="none")
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()
    gs, = torch.autograd.grad(out.sum(), (s2,))
    assert torch.isnan(gs[1]).all() and torch.isfinite(gs[[0, 2]]).all()

@pytest.mark.parametrize("dtypes", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                    (torch.float16, torch.float32), (torch.float16, torch.float64)],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_mixed_dtypes(device, dtypes):
    s, _ = make_logits((5, 300), dtypes[0], device, seed=5)
    _, t = make_logits((5, 300), dtypes[1], device, seed=6)
    target = torch.randint(0, 300, (5,), device=device)
    out = kdfast.kd_loss(s, t, target, 3.0, 0.5)
    gs, gt = torch.autograd.grad(out, (s, t))
    ref, rgs, rgt = reference_and_grads(reference.kd_loss, s, t, target, 3.0, 0.5)
    assert gs.dtype == dtypes[0] and gt.dtype == dtypes[1]
    low = dtypes[0] if dtypes[0] in (torch.bfloat16, torch.float16) else dtypes[1]
    assert_close(out, ref, low, scale=9)
    assert_close(gs, rgs, dtypes[0])
    assert_close(gt, rgt, dtypes[1])

def test_non_contiguous_and_channels_last(device):
    base_s, base_t = make_logits((6, 40, 10), torch.float32, device, requires_grad=False)
    views = {
        "transposed": (base_s.transpose(1, 2), base_t.transpose(1, 2), 1),
        "strided": (base_s[::2, :, ::3], base_t[::2, :, ::3], 1),
        "last-dim-strided": (base_s[:, ::2], base_t[:, ::2], -1),
    }
    x4s, x4t = make_logits((2, 5, 6, 7), torch.float32, device, requires_grad=False)
    views["channels_last"] = (x4s.to(memory_format=torch.channels_last), x4t.contiguous(), 1)
    for name, (s, t, dim) in views.items():
        s = s.requires_grad_(True)
        for div in DIVERGENCES:
            out = kdfast.kd_div(s, t, 2.0, divergence=div, dim=dim, reduction="none")
            gs, = torch.autograd.grad(out.sum(), (s,))
            ref, rgs, _ = reference_and_grads(reference.kd_div, s, t, 2.0, divergence=div, dim=dim, reduction="none")
            assert_close(out, ref, torch.float32, scale=4), name
            assert_close(gs, rgs, torch.float32), name

def test_pixelwise_dim1_reads_in_place():
    """dim=1 on a contiguous NCHW tensor must reach the op as a view, not a transposed copy."""
    s, t = make_logits((2, 19, 8, 16), torch.float32, "cpu", requires_grad=False)
    seen = []

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.kdfast.kd_reduce_fwd.default:
                seen.append(args[0].data_ptr() == s.data_ptr() and args[1].data_ptr() == t.data_ptr())
            return func(*args, **(kwargs or {}))

    with Spy():
        kdfast.kd_div(s, t, 4.0, dim=1)
    assert seen == [True]

def test_empty_batch(device):
    s, t = make_logits((0, 10), torch.float32, device)
    assert kdfast.kd_div(s, t, 2.0).item() == 0.0
    assert kdfast.kd_div(s, t, 2.0, reduction="none").shape == (0,)
    out = kdfast.kd_loss(s, t, torch.zeros(0, dtype=torch.long, device=device))
    gs, gt = torch.autograd.grad(out, (s, t))
    assert out.item() == 0.0 and gs.shape == s.shape and gt.shape == t.shape

def test_gradient_only_where_required(device):
    s, t = make_logits((3, 7), torch.float32, device)
    t = t.detach()
    out = kdfast.kd_div(s, t, 2.0)
    out.backward()
    assert s.grad is not None and t.grad is None

@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradcheck(divergence):
    s, t = make_logits((3, 5), torch.float64, "cpu", seed=7, scale=1.0)
    assert torch.autograd.gradcheck(lambda a, b: kdfast.kd_div(a, b, 2.0, divergence=divergence, beta=0.4), (s, t))
    p, q = make_logits((2, 4, 3, 2), torch.float64, "cpu", seed=8, scale=1.0)
    y = torch.tensor([[[0, 1], [3, -100], [2, 2]], [[1, 0], [0, 3], [-100, 1]]])
    assert torch.autograd.gradcheck(lambda a, b: kdfast.kd_loss(a, b, y, 3.0, 0.6, divergence=divergence, dim=1),
                                    (p, q))

@pytest.mark.skipif(_ops._C is None, reason="extension not built")
@pytest.mark.parametrize("with_target", [False, True])
def test_opcheck(device, with_target):
    s, t = make_logits((3, 17, 2), torch.float32, device)
    y = torch.tensor([[0, 16], [5, -100], [3, 3]], device=device) if with_target else None
    torch.library.opcheck(torch.ops.kdfast.kd_fwd.default, (s, t, y, 2.0, "jsd", 0.5, -100))
    div, ce, stats = torch.ops.kdfast.kd_fwd(s.detach(), t.detach(), y, 2.0, "kl", 0.5, -100)
    g = torch.ones_like(div)
    gce = torch.ones_like(div) if with_target else None
    torch.library.opcheck(torch.ops.kdfast.kd_bwd.default,
                          (g, gce, s.detach(), t.detach(), y, stats, 2.0, "kl", 0.5, -100, True, True))

@pytest.mark.skipif(_ops._C is None, reason="extension not built")
@pytest.mark.parametrize("select", ["all", "mask", "target"])
@pytest.mark.parametrize("layout", ["rows", "pixels", "channels_last"])
def test_opcheck_reduced(device, select, layout):
    s, t = make_logits((3, 5, 2, 2), torch.float32, device)
    if layout == "channels_last":
        s = s.detach().to(memory_format=torch.channels_last).requires_grad_()
    dim = -1 if layout == "rows" else 1
    rows = row_shape(s.shape, dim)
    index = torch.arange(rows.numel(), device=device).reshape(rows)
    y = index % 2 if select == "target" else None
    if y is not None:
        y[0, 0, 0] = -100
    mask = index % 3 > 0 if select == "mask" else None
    for div, red in (("kl", "batchmean"), ("jsd", "sum"), ("reverse_kl", "batchmean")):
        args = (s, t, y, mask, dim, 2.0, div, 0.5, -100, red, 4.0, 0.1 if y is not None else 0.0)
        torch.library.opcheck(torch.ops.kdfast.kd_reduce_fwd.default, args)
        loss, stats, count = torch.ops.kdfast.kd_reduce_fwd(*(a.detach() if isinstance(a, torch.Tensor) else a
                                                              for a in args))
        torch.library.opcheck(torch.ops.kdfast.kd_reduce_bwd.default,
                              (torch.tensor(1.5, device=device), s.detach(), t.detach(), y, mask, stats, count,
                               *args[4:], True, True))


def test_reduced_op_takes_a_target_or_a_mask():
    s, t = make_logits((3, 4), torch.float32, "cpu", requires_grad=False)
    with pytest.raises(ValueError, match="not both"):
        torch.ops.kdfast.kd_reduce_fwd(s, t, torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.bool), -1,
                                       2.0, "kl", 0.5, -100, "batchmean", 1.0, 1.0)


@pytest.mark.skipif(_ops._C is None, reason="extension not built")
@pytest.mark.parametrize("divergence,with_target,planes", [("kl", False, 5), ("reverse_kl", False, 5),
                                                           ("jsd", False, 6), ("kl", True, 6), ("jsd", True, 7)])
def test_forward_saves_only_the_row_statistics_its_backward_reads(device, divergence, with_target, planes):
    s, t = make_logits((3, 17, 2), torch.float32, device)
    y = torch.tensor([[0, 16], [5, -100], [3, 3]], device=device) if with_target else None
    div, ce, stats = torch.ops.kdfast.kd_fwd(s, t, y, 2.0, divergence, 0.5, -100)
    assert stats.shape == (planes, 3, 2)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = torch.ops.kdfast.kd_fwd(mode.from_tensor(s), mode.from_tensor(t),
                                       None if y is None else mode.from_tensor(y), 2.0, divergence, 0.5, -100)
    assert fake[2].shape == stats.shape


def test_torch_compile_fullgraph(device):
    s, t = make_logits((4, 33), torch.float32, device)
    y = torch.tensor([0, 5, -100, 32], device=device)
    div = torch.compile(lambda a, b: kdfast.kd_div(a, b, 4.0, divergence="jsd"), fullgraph=True)
    loss = torch.compile(lambda a, b, c: kdfast.kd_loss(a, b, c, 4.0, 0.9), fullgraph=True)
    torch.testing.assert_close(div(s, t), kdfast.kd_div(s, t, 4.0, divergence="jsd"))
    out = loss(s, t, y)
    torch.testing.assert_close(out, kdfast.kd_loss(s, t, y, 4.0, 0.9))
    gs, = torch.autograd.grad(out, (s,))
    egs, = torch.autograd.grad(kdfast.kd_loss(s, t, y, 4.0, 0.9), (s,))
    torch.testing.assert_close(gs, egs)

@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
def test_torch_compile_fullgraph_masks_and_layouts(device, reduction):
    s, t = make_logits((2, 5, 3, 4), torch.float32, device)
    mask = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(1)).to(device) > 0.3
    fn = lambda a, b, m: kdfast.kd_div(a, b, 2.0, dim=1, mask=m, reduction=reduction)  # noqa: E731
    out = torch.compile(fn, fullgraph=True)(s, t, mask)
    want = fn(s, t, mask)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(torch.autograd.grad(out, (s, t)), torch.autograd.grad(want, (s, t)))


def test_deterministic(device):
    s, t = make_logits((64, 5000), torch.float32, device, seed=9)
    runs = []
    for _ in range(3):
        out = kdfast.kd_div(s, t, 4.0, reduction="none")
        gs, gt = torch.autograd.grad(out.sum(), (s, t))
        runs.append((out, gs, gt))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)

def test_modules(device):
    s, t = make_logits((4, 10), torch.float32, device)
    y = torch.tensor([1, 2, 3, 4], device=device)
    torch.testing.assert_close(kdfast.KDDiv(3.0, divergence="reverse_kl")(s, t),
                               kdfast.kd_div(s, t, 3.0, divergence="reverse_kl"))
    torch.testing.assert_close(kdfast.KDLoss(3.0, 0.5)(s, t, y), kdfast.kd_loss(s, t, y, 3.0, 0.5))
    with pytest.raises(ValueError, match="temperature"):
        kdfast.KDDiv(0.0)

def test_forced_reference_backend(monkeypatch):
    s, t = make_logits((4, 10), torch.float32, "cpu")
    monkeypatch.setattr(_ops, "FORCE_REFERENCE", True)
    calls = []
    monkeypatch.setattr(reference, "kd_div", lambda *a, **k: calls.append(1) or torch.zeros(()))
    kdfast.kd_div(s, t, 2.0)
    assert calls == [1]
    assert kdfast.backends()["forced_reference"]

# ---- errors: one per documented rule ----

def test_error_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        kdfast.kd_div(torch.randn(3, 4), torch.randn(3, 5))

def test_error_non_floating():
    with pytest.raises(TypeError, match="student_logits"):
        kdfast.kd_div(torch.ones(3, 4, dtype=torch.long), torch.randn(3, 4))
    with pytest.raises(TypeError, match="teacher_logits"):
        kdfast.kd_div(torch.randn(3, 4), torch.ones(3, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="torch.Tensor"):
        kdfast.kd_div([1.0, 2.0], torch.randn(2))

@pytest.mark.parametrize("T", [0.0, -1.0, float("inf"), float("nan")])
def test_error_temperature(T):
    with pytest.raises(ValueError, match="temperature"):
        kdfast.kd_div(torch.randn(3, 4), torch.randn(3, 4), T)

@pytest.mark.parametrize("beta", [0.0, 1.0, -0.5, 2.0])
def test_error_jsd_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        kdfast.kd_div(torch.randn(3, 4), torch.randn(3, 4), divergence="jsd", beta=beta)

def test_error_unknown_divergence_and_reduction():
    with pytest.raises(ValueError, match="divergence"):
        kdfast.kd_div(torch.randn(3, 4), torch.randn(3, 4), divergence="hellinger")
    with pytest.raises(ValueError, match="reduction"):
        kdfast.kd_div(torch.randn(3, 4), torch.randn(3, 4), reduction="avg")

def test_mean_is_refused_with_what_to_use():
    """F.kl_div's "mean" (per element) is almost never what KD wants; the feature losses' "mean" is per sample:
    on the logit losses the word is refused, and the message names the word to use."""
    s, t = torch.randn(3, 4), torch.randn(3, 4)
    for call in (lambda: kdfast.kd_div(s, t, reduction="mean"), lambda: kdfast.KDDiv(2.0, reduction="mean"),
                 lambda: kdfast.topk_kd_div(s, *kdfast.topk_from_logits(t, 2), reduction="mean")):
        with pytest.raises(ValueError, match=r'does not take reduction="mean": torch.nn.functional.kl_div.* '
                                             r'Use "batchmean" .* or "sum"'):
            call()
    per_row = kdfast.kd_div(s, t, reduction="batchmean")
    torch.testing.assert_close(per_row, torch.nn.functional.kl_div(
        torch.log_softmax(s, -1), torch.log_softmax(t, -1), log_target=True, reduction="batchmean"))


def test_kd_loss_default_temperature_warns_and_keeps_four():
    """One rule for defaults: every loss defaults to T = 1; kd_loss and KDLoss, which defaulted to 4, keep 4 with a
    FutureWarning until kdfast 0.2. Given a temperature, nothing is warned."""
    s, t = make_logits((5, 7), torch.float64, "cpu")
    y = torch.tensor([0, 1, -100, 3, 4])
    with pytest.warns(FutureWarning, match="kd_loss was called without a temperature: it uses T = 4 .* T = 1"):
        out = kdfast.kd_loss(s, t, y)
    torch.testing.assert_close(out, kdfast.kd_loss(s, t, y, 4.0))
    with pytest.warns(FutureWarning, match="KDLoss was called without a temperature"):
        module = kdfast.KDLoss()
    assert module.temperature == 4.0
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kdfast.kd_loss(s, t, y, 1.0)
        kdfast.KDLoss(4.0)
    import inspect
    for fn in (kdfast.kd_div, kdfast.topk_kd_div, kdfast.fused_linear_kd, kdfast.KDDiv):
        assert inspect.signature(fn).parameters["temperature"].default == 1.0


@pytest.mark.parametrize("dim", [-1, 1])
@pytest.mark.parametrize("backend", ["kernel", "reference"])
def test_kd_loss_num_items_micro_batches_sum_to_the_batch(dim, backend):
    """Micro-batches each given the whole batch's number of counted rows (num_items_in_batch, as Hugging Face's
    Trainer passes it) sum to the whole batch's loss and gradients (1e-6)."""
    fn = kdfast.kd_loss if backend == "kernel" else reference.kd_loss
    shape = (6, 9) if dim == -1 else (6, 9, 4)
    s, t = make_logits(shape, torch.float64, "cpu", seed=3)
    y = torch.randint(0, 9, row_shape(shape, dim), generator=torch.Generator().manual_seed(4))
    y.view(-1)[::3] = -100
    whole = fn(s, t, y, 3.0, 0.6, dim=dim)
    whole_grads = torch.autograd.grad(whole, (s, t))
    count = int((y != -100).sum())
    total, grads = 0, (0, 0)
    for part in (slice(0, 1), slice(1, 4), slice(4, 6)):
        for n_items in (count, torch.tensor(float(count))):
            out = fn(s[part], t[part], y[part], 3.0, 0.6, dim=dim, num_items_in_batch=n_items)
            g = torch.autograd.grad(out, (s, t))
        total, grads = total + out, tuple(a + b for a, b in zip(grads, g))
    torch.testing.assert_close(total, whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads, whole_grads, rtol=1e-6, atol=1e-6)
    module = kdfast.KDLoss(3.0, 0.6, dim=dim)
    torch.testing.assert_close(module(s, t, y, num_items_in_batch=count), whole)


def test_kd_loss_num_items_bfloat16_gradients_within_one_percent():
    s, t = make_logits((32, 1000), torch.bfloat16, "cpu", seed=5)
    y = torch.randint(0, 1000, (32,), generator=torch.Generator().manual_seed(6))
    out = kdfast.kd_loss(s, t, y, 2.0, 0.5, num_items_in_batch=50)
    gs, = torch.autograd.grad(out, (s,))
    s64 = s.detach().double().requires_grad_(True)
    ref = reference.kd_loss(s64, t.detach().double(), y, 2.0, 0.5, num_items_in_batch=50)
    rgs, = torch.autograd.grad(ref, (s64,))
    assert gs.dtype == torch.bfloat16 and float((gs.double() - rgs).norm() / rgs.norm()) < 1e-2
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_error_mask():
    s, t = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match="mask"):
        kdfast.kd_div(s, t, mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        kdfast.kd_div(s, t, mask=torch.ones(3))

def test_error_dim_and_empty_classes():
    with pytest.raises(ValueError, match="dim"):
        kdfast.kd_div(torch.randn(3, 4), torch.randn(3, 4), dim=2)
    with pytest.raises(ValueError, match="no classes"):
        kdfast.kd_div(torch.randn(3, 0), torch.randn(3, 0))

def test_error_target():
    s, t = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match="target"):
        kdfast.kd_loss(s, t, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="target"):
        kdfast.kd_loss(s, t, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="class 4"):
        kdfast.kd_loss(s, t, torch.tensor([0, 4, 1]))
    with pytest.raises(ValueError, match="alpha"):
        kdfast.kd_loss(s, t, torch.tensor([0, 1, 2]), alpha=1.5)

@pytest.mark.skipif("meta" not in [torch.device("meta").type], reason="no meta device")
def test_error_devices():
    with pytest.raises(ValueError, match="device"):
        kdfast.kd_div(torch.randn(3, 4), torch.randn(3, 4, device="meta"))

@pytest.mark.cuda
def test_cuda_matches_cpu():
    """The CUDA kernels against the CPU kernels on the same inputs, every divergence, both layouts."""
    for shape, dim, T in CASES:
        for dtype in (torch.float32, torch.bfloat16):
            s, t = make_logits(shape, dtype, "cpu", seed=11)
            target = torch.randint(0, shape[dim], row_shape(shape, dim))
            for div in DIVERGENCES:
                outs = []
                for dev in ("cpu", "cuda"):
                    a = s.detach().to(dev).requires_grad_(True)
                    b = t.detach().to(dev).requires_grad_(True)
                    out = kdfast.kd_loss(a, b, target.to(dev), T, 0.5, divergence=div, dim=dim)
                    outs.append((out, *torch.autograd.grad(out, (a, b))))
                for x, y in zip(*outs):
                    assert_close(x.cpu(), y, dtype, scale=T * T)

