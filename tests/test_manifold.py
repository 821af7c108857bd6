"""batched_svd (accuracy on hard spectra, gradients, NaN, layouts), manifold_projection and
manifold_distillation_loss against kdfast.reference, opcheck, torch.compile and argument errors."""
import pytest
import torch
from conftest import DEVICES, assert_close

import kdfast
from kdfast import reference

BOUND = {torch.float32: 1e-5, torch.float64: 1e-12}
SVD_DTYPES = [torch.float32, torch.float64]
dt_id = lambda d: str(d).replace("torch.", "")  # noqa: E731


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def with_spectrum(batch, m, n, s, seed=0):
    """float64 matrices U diag(s) V^T with random orthonormal U, V and the given singular values."""
    g = gen(seed)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(batch, m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(batch, n, k, generator=g, dtype=torch.float64))
    return (U * torch.as_tensor(s, dtype=torch.float64)) @ V.mT


def check_svd(A, U, S, Vh, dtype):
    """The documented bounds: reconstruction relative to ||A||_F, orthogonality (spectral norm), singular values
    within the bound relative to the largest against float64 torch.linalg.svdvals."""
    bound = BOUND[dtype]
    A, U, S, Vh = (x.detach().double().cpu() for x in (A, U, S, Vh))
    amax = A.abs().amax((-2, -1), keepdim=True).clamp_min(1e-300)
    A, S = A / amax, S / amax.squeeze(-1)  # so that the norms below cannot overflow for huge entries
    k = S.shape[-1]
    assert U.shape == A.shape[:-1] + (k,) and Vh.shape == A.shape[:-2] + (k, A.shape[-1])
    eye = torch.eye(k, dtype=torch.float64)
    norm = torch.linalg.matrix_norm(A).clamp_min(1e-300)
    assert (torch.linalg.matrix_norm((U * S.unsqueeze(-2)) @ Vh - A) / norm).max() <= bound
    assert torch.linalg.matrix_norm(U.mT @ U - eye, 2).max() <= bound
    assert torch.linalg.matrix_norm(Vh @ Vh.mT - eye, 2).max() <= bound
    ref = torch.linalg.svdvals(A)
    assert ((S - ref).abs() / ref[..., :1].clamp_min(1e-300)).max() <= bound
    assert (S[..., :-1] >= S[..., 1:]).all() and (S >= 0).all()


SHAPES = [(1, 1, 1), (3, 7, 5), (3, 5, 7), (37, 32, 32), (5, 64, 64), (4, 64, 16), (4, 16, 64), (2, 300, 10),
          (3, 1, 9), (3, 9, 1), (2, 3, 33, 17)]


@pytest.mark.parametrize("dtype", SVD_DTYPES, ids=dt_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_svd_random(device, dtype, shape):
    A = torch.randn(shape, generator=gen(), dtype=dtype).to(device)
    check_svd(A, *kdfast.batched_svd(A), dtype)


@pytest.mark.parametrize("dtype", SVD_DTYPES, ids=dt_id)
def test_svd_every_cpu_capability(cpu_capability, dtype):
    A = torch.randn(19, 24, 20, generator=gen(1), dtype=dtype)
    check_svd(A, *kdfast.batched_svd(A), dtype)


def hard_spectra(n):
    lin = torch.linspace(1, 0, n, dtype=torch.float64)
    return {
        "ill-conditioned": torch.logspace(0, -8, n, dtype=torch.float64),
        "beyond-precision": torch.logspace(0, -20, n, dtype=torch.float64),
        "rank-deficient": torch.where(torch.arange(n) < n // 3, 1 + lin, torch.zeros(n, dtype=torch.float64)),
        "repeated": torch.tensor([3.0] * (n // 4) + [1.0] * (n - n // 4 - 2) + [0.5, 0.5], dtype=torch.float64),
        "all-equal": torch.ones(n, dtype=torch.float64),
        "rank-one": torch.eye(1, n, dtype=torch.float64)[0],
    }


@pytest.mark.parametrize("dtype", SVD_DTYPES, ids=dt_id)
@pytest.mark.parametrize("mn", [(32, 32), (64, 64), (48, 20), (20, 48)], ids=str)
@pytest.mark.parametrize("kind", list(hard_spectra(8)))
def test_svd_hard_spectra(device, dtype, mn, kind):
    m, n = mn
    A = with_spectrum(6, m, n, hard_spectra(min(m, n))[kind]).to(device=device, dtype=dtype)
    check_svd(A, *kdfast.batched_svd(A), dtype)


@pytest.mark.parametrize("dtype", SVD_DTYPES, ids=dt_id)
def test_svd_zero_scaled_and_structured(device, dtype):
    tiny, huge = (1e-30, 1e30) if dtype == torch.float32 else (1e-200, 1e200)
    A = torch.randn(7, 16, 12, generator=gen(2), dtype=dtype)
    A[0] = 0
    A[1] *= tiny
    A[2] *= huge
    A[3, :, 5] = A[3, :, 2]             # two equal columns
    A[4] = torch.eye(16, 12, dtype=dtype)
    A[5, 3:] = 0                         # rank 3
    A[6, :, 1:] = 0                      # one non-zero column
    A = A.to(device)
    U, S, Vh = kdfast.batched_svd(A)
    check_svd(A, U, S, Vh, dtype)
    assert (S[0] == 0).all()


def test_svd_nan_and_inf_give_nan(device):
    A = torch.randn(4, 6, 5, generator=gen(3)).to(device)
    A[1, 2, 3] = float("nan")
    A[2, 0, 0] = float("inf")
    U, S, Vh = kdfast.batched_svd(A)
    for x in (U, S, Vh):
        assert x[1].isnan().all() and x[2].isnan().all()
        assert not x[0].isnan().any() and not x[3].isnan().any()


def test_svd_layouts_empty_and_half(device):
    A = torch.randn(6, 20, 12, generator=gen(4), dtype=torch.float64).to(device)
    for view in (A.mT, A[:, ::2, 1:], A[::2]):
        check_svd(view, *kdfast.batched_svd(view), torch.float64)
    for shape in ((0, 4, 4), (3, 0, 4), (2, 4, 0)):
        U, S, Vh = kdfast.batched_svd(torch.randn(shape, device=device))
        assert U.shape == shape[:2] + (0 if 0 in shape[1:] else 4,) and S.numel() == 0
    for dtype in (torch.float16, torch.bfloat16):
        H = A.to(dtype)
        U, S, Vh = kdfast.batched_svd(H)
        assert S.dtype == torch.float32
        check_svd(H.float(), U, S, Vh, torch.float32)


def test_svd_deterministic(device):
    A = torch.randn(33, 40, 24, generator=gen(5)).to(device)
    first = kdfast.batched_svd(A)
    again = kdfast.batched_svd(A)
    alone = kdfast.batched_svd(A[7:8])  # a matrix's result does not depend on its batch neighbours
    for x, y, z in zip(first, again, alone):
        assert torch.equal(x, y) and torch.equal(x[7:8], z)


def test_svd_large_falls_back_with_safe_backward(device):
    A = with_spectrum(2, 70, 70, torch.ones(70)).to(device).requires_grad_()
    U, S, Vh = kdfast.batched_svd(A)
    check_svd(A, U, S, Vh, torch.float64)
    (U.sum() + Vh.sum() + S.sum()).backward()
    assert A.grad.isfinite().all()


def invariant_loss(U, S, Vh, w):
    """A loss of U, S and Vh that is invariant to the signs of singular vector pairs (so that two correct SVDs
    give the same gradient) and reaches all three through every column."""
    wu, ws, wv = w
    return ((U * U) * wu).sum() + (S * ws).sum() + ((Vh * Vh) * wv).sum() + ((U * ws.unsqueeze(-2)) @ Vh).sum()


@pytest.mark.parametrize("shape", [(3, 6, 6), (3, 9, 5), (3, 5, 9), (2, 64, 64), (2, 200, 12)], ids=str)
@pytest.mark.parametrize("dtype", SVD_DTYPES, ids=dt_id)
def test_svd_gradient_matches_torch(device, shape, dtype):
    k = min(shape[1:])
    # Distinct, well separated, non-zero singular values.
    A = with_spectrum(shape[0], shape[1], shape[2], torch.linspace(2, 0.5, k), seed=6)
    g = gen(7)
    w = (torch.randn(shape[0], shape[1], k, generator=g, dtype=torch.float64), torch.randn(shape[0], k, generator=g,
         dtype=torch.float64), torch.randn(shape[0], k, shape[2], generator=g, dtype=torch.float64))
    grads = []
    for fn, dt in ((kdfast.batched_svd, dtype), (lambda X: torch.linalg.svd(X, full_matrices=False), dtype),
                   (lambda X: torch.linalg.svd(X, full_matrices=False), torch.float64)):
        X = A.to(device=device, dtype=dt).requires_grad_()
        invariant_loss(*fn(X), [x.to(device=device, dtype=dt) for x in w]).backward()
        grads.append(X.grad.double())
    if dtype == torch.float64:
        assert_close(grads[0], grads[1], dtype)
    else:  # float32: as close to the float64 gradient as torch.linalg.svd's own float32 gradient is (1/gap ~ 60)
        torch_error = (grads[1] - grads[2]).abs().max()
        assert (grads[0] - grads[2]).abs().max() <= 2 * torch_error + 1e-5


def test_svd_gradcheck(device):
    A = torch.randn(2, 5, 4, generator=gen(8), dtype=torch.float64).to(device).requires_grad_()
    w = [x.to(device) for x in (torch.randn(2, 5, 4, generator=gen(9), dtype=torch.float64),
                                torch.randn(2, 4, generator=gen(10), dtype=torch.float64),
                                torch.randn(2, 4, 4, generator=gen(11), dtype=torch.float64))]
    assert torch.autograd.gradcheck(lambda X: invariant_loss(*kdfast.batched_svd(X), w), (A,))
    assert torch.autograd.gradcheck(lambda X: kdfast.batched_svd(X)[1], (A,))
    B = torch.randn(2, 3, 6, generator=gen(12), dtype=torch.float64).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda X: invariant_loss(*kdfast.batched_svd(X), [x[..., :3, :3] for x in w[:1]]
                                                             + [w[1][:, :3], torch.ones(2, 3, 6, device=device,
                                                                                       dtype=torch.float64)]), (B,))


@pytest.mark.parametrize("dtype", SVD_DTYPES, ids=dt_id)
@pytest.mark.parametrize("kind", ["zero", "identity", "repeated", "rank-deficient", "tall-rank-deficient"])
def test_svd_degenerate_gradient_finite(device, dtype, kind):
    A = {"zero": torch.zeros(2, 6, 6), "identity": torch.eye(6).expand(2, 6, 6),
         "repeated": with_spectrum(2, 6, 6, [2, 2, 2, 1, 1, 0.5]),
         "rank-deficient": with_spectrum(2, 6, 6, [2, 1, 0, 0, 0, 0]),
         "tall-rank-deficient": with_spectrum(2, 9, 4, [1, 1, 0, 0])}[kind]
    A = A.to(device=device, dtype=dtype).clone().requires_grad_()
    U, S, Vh = kdfast.batched_svd(A)
    g = gen(13)
    (U * torch.randn(U.shape, generator=g).to(U)).sum().backward(retain_graph=True)
    (Vh * torch.randn(Vh.shape, generator=g).to(Vh)).sum().backward(retain_graph=True)
    invariant_loss(U, S, Vh, (torch.randn(U.shape, generator=g).to(U), torch.randn(S.shape, generator=g).to(S),
                              torch.randn(Vh.shape, generator=g).to(Vh))).backward()
    assert A.grad.isfinite().all()


def test_svd_opcheck(device):
    for shape in ((3, 8, 5), (2, 4, 7)):
        A = torch.randn(shape, generator=gen(14), dtype=torch.float64).to(device).requires_grad_()
        torch.library.opcheck(torch.ops.kdfast.batched_svd.default, (A,))


# ---------------------------------------------------------------- manifold projection and loss


def test_projection_matches_reference(device, dtype):
    X = torch.randn(3, 40, 12, generator=gen(15), dtype=torch.float64)
    Y = kdfast.manifold_projection(X.to(device=device, dtype=dtype), 5)
    ref = reference.manifold_projection(X.to(dtype).double(), 5)
    assert Y.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(Y, ref, dtype, scale=10)


def test_projection_sign_and_centering(device):
    X = torch.randn(4, 30, 9, generator=gen(16), dtype=torch.float64).to(device) + 5.0
    U, S, Vh = torch.linalg.svd(X - X.mean(-2, keepdim=True), full_matrices=False)
    Y = kdfast.manifold_projection(X, 3)
    V3 = Vh[..., :3, :].mT
    signs = torch.sign(V3.gather(-2, V3.abs().argmax(-2, keepdim=True)))
    torch.testing.assert_close(Y, (X - X.mean(-2, keepdim=True)) @ (V3 * signs))
    torch.testing.assert_close(kdfast.manifold_projection(X, 3, center=False).abs(),
                               (U[..., :3] * S[..., None, :3]).abs().new_tensor(0).add(
                                   reference.manifold_projection(X, 3, center=False).abs()))


def explicit_loss(s, t, rank):
    """The formula as written, with the n x n matrices P (only for small n)."""
    def P(x):
        Y = reference.manifold_projection(x.double(), rank)
        G = Y @ Y.mT
        return G / torch.linalg.matrix_norm(G).unsqueeze(-1).unsqueeze(-1)
    return (P(s) - P(t)).square().sum((-2, -1))


@pytest.mark.parametrize("shapes", [((4, 6, 5, 5), (4, 10, 5, 5)), ((24, 7), (24, 12)), ((3, 20, 4), (3, 20, 9))],
                         ids=["4d", "2d", "3d"])
def test_loss_matches_explicit_formula(device, shapes):
    g = gen(17)
    s = torch.randn(shapes[0], generator=g, dtype=torch.float64).to(device)
    t = torch.randn(shapes[1], generator=g, dtype=torch.float64).to(device)
    got = kdfast.manifold_distillation_loss(s, t, 3, reduction="none")
    want = explicit_loss(reference.manifold_points(s), reference.manifold_points(t), 3)
    assert_close(got, want, torch.float64)
    assert_close(kdfast.manifold_distillation_loss(s, t, 3), want.mean(), torch.float64)
    assert_close(kdfast.manifold_distillation_loss(s, s, 3, reduction="none"), torch.zeros_like(want),
                 torch.float64)


def test_loss_and_gradients_match_reference(device, dtype):
    g = gen(18)
    pairs = [((8, 6, 4, 4), (8, 12, 4, 4)), ((8, 16, 2, 2), (8, 16, 2, 2))]
    xs = [torch.randn(a, generator=g, dtype=torch.float64) for a, _ in pairs]
    xt = [torch.randn(b, generator=g, dtype=torch.float64) for _, b in pairs]
    results = []
    for fn, dev, dt in ((kdfast.manifold_distillation_loss, device, dtype),
                        (reference.manifold_distillation_loss, "cpu", torch.float64)):
        s = [x.to(dtype).to(device=dev, dtype=dt).requires_grad_() for x in xs]
        t = [x.to(dtype).to(device=dev, dtype=dt).requires_grad_() for x in xt]
        loss = fn(s, t, 3, weights=[1.0, 0.5])
        loss.backward()
        results.append((loss, [x.grad for x in s + t]))
    (lk, gk), (lr, gr) = results
    assert lk.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    scale = {torch.float32: 30, torch.float64: 10}.get(dtype, 1)
    assert_close(lk, lr, dtype, scale=scale)
    for a, b in zip(gk, gr):
        assert a.dtype == dtype
        assert_close(a, b, dtype, scale=scale)


def test_loss_reductions_weights_and_module(device):
    g = gen(19)
    s = [torch.randn(5, 8, 3, 3, generator=g).to(device), torch.randn(5, 20, generator=g).to(device)]
    t = [torch.randn(5, 4, 3, 3, generator=g).to(device), torch.randn(5, 9, generator=g).to(device)]
    none = kdfast.manifold_distillation_loss(s, t, 2, weights=[2.0, 0.5], reduction="none")
    assert [v.shape for v in none] == [(5,), (1,)]
    mean = kdfast.manifold_distillation_loss(s, t, 2, weights=[2.0, 0.5])
    torch.testing.assert_close(mean, none[0].mean() + none[1].mean())
    torch.testing.assert_close(kdfast.ManifoldDistillation(2, weights=[2.0, 0.5])(s, t), mean)
    total = kdfast.manifold_distillation_loss(s, t, 2, weights=[2.0, 0.5], reduction="sum")
    torch.testing.assert_close(total, none[0].sum() + none[1].sum())
    single = kdfast.manifold_distillation_loss(s[0], t[0], 2, reduction="none")
    assert single.shape == (5,)  # a sample of a (B, C, H, W) map is one image's set of H * W points
    torch.testing.assert_close(kdfast.manifold_distillation_loss(s[0], t[0], 2, reduction="sum"), single.sum())
    assert ((none[0] >= 0) & (none[0] <= 4 + 1e-5)).all()


def test_loss_zero_features_finite(device):
    s = torch.zeros(2, 4, 3, 3, device=device, requires_grad=True)
    t = torch.randn(2, 4, 3, 3, generator=gen(20)).to(device)
    loss = kdfast.manifold_distillation_loss(s, t, 2, reduction="none")
    torch.testing.assert_close(loss, torch.ones(2, device=device))  # P_s = 0, ||P_t||^2 = 1
    loss.sum().backward()
    assert s.grad.isfinite().all()
    nan = t.clone()
    nan[1, 0, 0, 0] = float("nan")
    assert kdfast.manifold_distillation_loss(t, nan, 2, reduction="none").isnan().tolist() == [False, True]


def test_compile_fullgraph():
    A = torch.randn(3, 6, 4, generator=gen(21), requires_grad=True)
    U, S, Vh = torch.compile(kdfast.batched_svd, fullgraph=True)(A)
    torch.testing.assert_close(S, torch.linalg.svdvals(A.detach()))
    s = torch.randn(2, 4, 3, 3, generator=gen(22), requires_grad=True)
    t = torch.randn(2, 6, 3, 3, generator=gen(23))
    loss = torch.compile(kdfast.manifold_distillation_loss, fullgraph=True)(s, t, 2)
    torch.testing.assert_close(loss, reference.manifold_distillation_loss(s, t, 2))
    loss.backward()
    assert s.grad.isfinite().all()
    Y = torch.compile(lambda x: kdfast.manifold_projection(x, 2), fullgraph=True)(s.detach().flatten(2).mT)
    torch.testing.assert_close(Y, reference.manifold_projection(s.detach().flatten(2).mT, 2))


# ---------------------------------------------------------------- errors


def test_errors():
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(TypeError, match="A must be"):
        kdfast.batched_svd(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="A must be a torch.Tensor"):
        kdfast.batched_svd([[1.0]])
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        kdfast.batched_svd(torch.randn(3))
    with pytest.raises(ValueError, match=r"rank must be in \[1, min\(n, d\)\]"):
        kdfast.manifold_projection(torch.randn(5, 3), 4)
    with pytest.raises(ValueError, match="rank must be in"):
        kdfast.manifold_projection(torch.randn(5, 3), 0)
    with pytest.raises(TypeError, match="rank must be an int"):
        kdfast.manifold_projection(torch.randn(5, 3), 2.0)
    with pytest.raises(TypeError, match="center must be a bool"):
        kdfast.manifold_projection(torch.randn(5, 3), 2, center=1)
    with pytest.raises(ValueError, match="features must have shape"):
        kdfast.manifold_projection(torch.randn(5), 1)
    with pytest.raises(ValueError, match="rank must be in"):
        kdfast.manifold_distillation_loss(x, torch.randn(2, 2, 3, 3), 3)  # teacher has d = 2
    with pytest.raises(ValueError, match="same sets of points"):
        kdfast.manifold_distillation_loss(x, torch.randn(2, 4, 3, 2), 2)
    with pytest.raises(ValueError, match=r"must be \(B, D\)"):
        kdfast.manifold_distillation_loss(torch.randn(2, 4, 3, 3, 1), torch.randn(2, 4, 3, 3, 1), 2)
    with pytest.raises(ValueError, match="equal length"):
        kdfast.manifold_distillation_loss([x, x], [x], 2)
    with pytest.raises(ValueError, match="equal length"):
        kdfast.manifold_distillation_loss([], [], 2)
    with pytest.raises(TypeError, match="both be tensors or both be sequences"):
        kdfast.manifold_distillation_loss(x, [x], 2)
    with pytest.raises(ValueError, match="one value per layer pair"):
        kdfast.manifold_distillation_loss([x, x], [x, x], 2, weights=[1.0])
    with pytest.raises(ValueError, match="must be finite"):
        kdfast.manifold_distillation_loss(x, x, 2, weights=[float("inf")])
    with pytest.raises(TypeError, match="weights must be a sequence"):
        kdfast.manifold_distillation_loss(x, x, 2, weights=1.0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        kdfast.manifold_distillation_loss(x, x, 2, reduction="batchmean")
    with pytest.raises(TypeError, match="student_features must be"):
        kdfast.manifold_distillation_loss(x.long(), x, 2)
    with pytest.raises(TypeError, match="rank must be an int"):
        kdfast.ManifoldDistillation("2")
    with pytest.raises(ValueError, match="rank must be >= 1"):
        kdfast.ManifoldDistillation(0)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA GPU and kdfast built with CUDA")
def test_errors_devices():
    with pytest.raises(ValueError, match="is on"):
        kdfast.manifold_distillation_loss(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3, device="cuda"), 2)
