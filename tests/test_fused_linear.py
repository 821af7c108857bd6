"""fused_linear_kd against the float64 composition (logits = hidden @ weight.T + bias, then KD + cross-entropy) for
dense, TeacherHead and top-k teachers; gradients, chunking, dtypes, autograd/opcheck/compile/autocast, errors."""
import pathlib
import sys

import pytest
import torch

import kdfast
from kdfast import _ops, fused_linear, reference

pytestmark = pytest.mark.skipif(_ops._C is None, reason="extension not built")


@pytest.fixture
def TopK():
    return kdfast.TopK


def make(rows, H=12, V=97, Ht=9, dtype=torch.float32, seed=0, bias=True, ignore=True):
    """Student hidden/weight/bias (requiring grad), a target with some ignored rows, and teacher inputs."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    h = rnd(*rows, H).requires_grad_(True)
    w = rnd(V, H, scale=H ** -0.5 * 3).requires_grad_(True)
    b = rnd(V).requires_grad_(True) if bias else None
    y = torch.randint(0, V, rows, generator=g)
    if ignore:
        y.view(-1)[::4] = -100
    t_logits = rnd(*rows, V, scale=3.0)
    head = kdfast.TeacherHead(rnd(*rows, Ht), rnd(V, Ht, scale=Ht ** -0.5 * 3), rnd(V))
    return h, w, b, y, t_logits, head


def topk_of(logits, k, TopK, pad=0):
    """A server-style top-k teacher from dense logits: the last `pad` entries of each row are -inf with index 0."""
    lp, idx = torch.log_softmax(logits.double(), -1).topk(k, dim=-1)
    if pad:
        lp[..., -pad:] = float("-inf")
        idx[..., -pad:] = 0
    return TopK(idx, lp.to(logits.dtype))


def run(fn, h, w, b, teacher, **kw):
    """Loss and gradients (hidden, weight, bias) of fn on these inputs."""
    out = fn(h, w, teacher, student_bias=b, **kw)
    inputs = [x for x in (h, w, b) if x is not None]
    return out.detach(), torch.autograd.grad(out, inputs)


def reference64(h, w, b, teacher, **kw):
    """The float64 composition on float64 copies of the (already rounded) inputs."""
    def up(x):
        return None if x is None else x.detach().double().requires_grad_(x.requires_grad)

    if isinstance(teacher, kdfast.TeacherHead):
        teacher = teacher._replace(hidden=up(teacher.hidden), weight=up(teacher.weight), bias=up(teacher.bias))
    elif isinstance(teacher, torch.Tensor):
        teacher = up(teacher)
    # a TopK or Sampled teacher as given: the bucket's tail rule reads its log-probabilities' dtype
    return run(reference.fused_linear_kd, up(h), up(w), up(b), teacher, **kw)


def assert_matches(h, w, b, teacher, rtol=2e-5, atol=5e-5, **kw):
    out, grads = run(kdfast.fused_linear_kd, h, w, b, teacher, **kw)
    ref, ref_grads = reference64(h, w, b, teacher, **kw)
    assert out.dtype == (torch.float64 if h.dtype == torch.float64 else torch.float32) and out.shape == ()
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)
    for g, r, x in zip(grads, ref_grads, [x for x in (h, w, b) if x is not None]):
        assert g.dtype == x.dtype and g.shape == x.shape
        # atol relative to the gradient's scale, floored: a small gradient made of O(1) terms (a bucket tail's
        # reverse KL) carries their float32 rounding, about 1e-7 absolute.
        torch.testing.assert_close(g.double(), r, rtol=rtol, atol=atol * max(float(r.abs().max()), 0.1))


FORMS = ["logits", "head", "topk-renormalize", "topk-bucket", "sampled"]


def teacher_of(form, t_logits, head, TopK):
    if form == "logits":
        return t_logits, {}
    if form == "head":
        return head, {}
    if form == "sampled":  # 12 draws a row at T = 2 (the temperature the tests mostly train at)
        return kdfast.sample_from_logits(t_logits, 12, 2.0, generator=torch.Generator().manual_seed(1)), {}
    return topk_of(t_logits, 7, TopK, pad=2), {"tail": form.split("-")[1]}


# Every divergence on the dense and top-k forms (the top-k form with either tail); the sampled form is the forward KL.
FORM_DIVERGENCES = [(f, d) for f in ("logits", "head", "topk-renormalize", "topk-bucket")
                    for d in ("kl", "reverse_kl", "jsd")] + [("sampled", "kl")]


@pytest.mark.parametrize("form,divergence", FORM_DIVERGENCES)
@pytest.mark.parametrize("rows,chunk", [((13,), 4), ((2, 5), None), ((1,), 1)], ids=["2d-chunk4", "3d-auto", "1row"])
def test_matches_reference(TopK, form, divergence, rows, chunk):
    h, w, b, y, t_logits, head = make(rows)
    teacher, kw = teacher_of(form, t_logits, head, TopK)
    assert_matches(h, w, b, teacher, target=y, temperature=2.0, alpha=0.3, divergence=divergence, beta=0.3,
                   chunk_size=chunk, **kw)
    assert_matches(h, w, None, teacher, temperature=1.0, divergence=divergence, chunk_size=chunk, scale_t2=False,
                   **kw)


@pytest.mark.parametrize("form", FORMS)
def test_float64_exact(TopK, form):
    h, w, b, y, t_logits, head = make((11,), dtype=torch.float64)
    teacher, kw = teacher_of(form, t_logits, head, TopK)
    assert_matches(h, w, b, teacher, rtol=1e-10, atol=1e-12, target=y, temperature=1.5, alpha=0.6, chunk_size=3,
                   **kw)


@pytest.mark.parametrize("form,divergence", FORM_DIVERGENCES)
def test_bfloat16_gradients_within_one_percent(TopK, form, divergence):
    """bf16 inputs: the gradients (computed and accumulated in float32, rounded once) within 1% of float64."""
    h, w, b, y, t_logits, head = make((4, 16), H=32, V=1000, dtype=torch.bfloat16)
    teacher, kw = teacher_of(form, t_logits, head, TopK)
    kw = dict(kw, divergence=divergence, beta=0.3)
    out, grads = run(kdfast.fused_linear_kd, h, w, b, teacher, target=y, temperature=2.0, alpha=0.5, chunk_size=5,
                     **kw)
    ref, ref_grads = reference64(h, w, b, teacher, target=y, temperature=2.0, alpha=0.5, **kw)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.bfloat16
        assert float((g.double() - r).norm() / r.norm()) < 1e-2
        torch.testing.assert_close(g.double(), r, rtol=1e-2, atol=1e-2 * float(r.abs().max()))


@pytest.mark.parametrize("form", ["logits", "head", "topk-bucket"])
def test_large_vocabulary(TopK, form):
    h, w, b, y, t_logits, head = make((3,), H=8, V=131073, Ht=4)
    teacher, kw = teacher_of(form, t_logits, head, TopK)
    assert_matches(h, w, b, teacher, rtol=1e-4, atol=1e-5, target=y, temperature=2.0, alpha=0.5, **kw)


def test_topk_covering_the_vocabulary_equals_the_dense_teacher(TopK):
    """Renormalize with k = V, and bucket with k = V - 1 (the tail is then the one class left out), are the dense
    KL: an independent check of the top-k path and of its reference."""
    h, w, b, y, t_logits, _ = make((9,), V=31, dtype=torch.float64)
    dense = kdfast.fused_linear_kd(h, w, t_logits, student_bias=b, target=y, temperature=2.0, alpha=0.4)
    dense_grads = torch.autograd.grad(dense, (h, w, b))
    for tail, k in (("renormalize", 31), ("bucket", 30)):
        for fn in (kdfast.fused_linear_kd, reference.fused_linear_kd):
            sparse = fn(h, w, topk_of(t_logits, k, TopK), student_bias=b, target=y, temperature=2.0, alpha=0.4,
                        tail=tail, chunk_size=4)
            torch.testing.assert_close(sparse, dense)
            torch.testing.assert_close(torch.autograd.grad(sparse, (h, w, b)), dense_grads)


def test_topk_row_without_entries_gives_zero(TopK):
    h, w, b, _, t_logits, _ = make((4,), V=20, dtype=torch.float64)
    teacher = topk_of(t_logits, 5, TopK)
    teacher.logprobs[1] = float("-inf")
    for tail in ("renormalize", "bucket"):
        assert_matches(h, w, b, teacher, rtol=1e-10, atol=1e-12, tail=tail)
        rows, grad = fused_linear.topk_chunk(h.detach()[1:2] @ w.detach().T, teacher.indices[1:2],
                                             teacher.logprobs[1:2], 1.0, tail, 1.0)
        assert float(rows.abs().max()) < 1e-12 and float(grad.abs().max()) < 1e-12


def test_neg_inf_teacher_logits_and_nan_propagation():
    h, w, b, y, t_logits, _ = make((6,))
    t_logits[:, :10] = float("-inf")  # classes the teacher rules out contribute 0 to KL(teacher || student)
    assert_matches(h, w, b, t_logits, target=y, temperature=2.0, alpha=0.5, chunk_size=4)
    h_nan = h.detach().clone()
    h_nan[2, 0] = float("nan")
    h_nan.requires_grad_(True)
    out, grads = run(kdfast.fused_linear_kd, h_nan, w, b, t_logits, target=y, alpha=0.5, chunk_size=4)
    assert out.isnan() and grads[1].isnan().any()


def test_chunk_sizes_agree_and_are_deterministic():
    h, w, b, y, t_logits, head = make((2, 17))
    results = [run(kdfast.fused_linear_kd, h, w, b, head, target=y, alpha=0.5, chunk_size=c) for c in (1, 5, 34, 99)]
    for out, grads in results[1:]:
        torch.testing.assert_close(out, results[0][0])
        torch.testing.assert_close(grads, results[0][1])
    again = run(kdfast.fused_linear_kd, h, w, b, head, target=y, alpha=0.5, chunk_size=5)
    assert torch.equal(again[0], results[1][0]) and all(torch.equal(a, c) for a, c in zip(again[1], results[1][1]))


def test_default_chunk_rule():
    assert fused_linear.default_chunk_size(2048, 32000) == (32 << 20) // (32000 * 4)
    assert fused_linear.default_chunk_size(2048, 32000, torch.float64) == (32 << 20) // (32000 * 8)
    assert fused_linear.default_chunk_size(8192, 128256, torch.float32, "cuda") == (256 << 20) // (128256 * 4)
    assert fused_linear.default_chunk_size(10, 100) == 10
    assert fused_linear.default_chunk_size(10, 1 << 30) == 1


def test_memory_stays_a_few_chunks_of_logits():
    """The N x V logits never exist: the peak of torch's allocations during forward + backward stays near three
    chunks of logits plus the weight gradient (measured as the benchmark suite measures it)."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        from harness import peak_memory
    finally:
        sys.path.pop(0)
    n, v, chunk = 1024, 20000, 64
    h, w, b, y, t_logits, head = make((n,), H=32, V=v, Ht=16)

    def step():
        kdfast.fused_linear_kd(h, w, head, student_bias=b, target=y, alpha=0.5, chunk_size=chunk).backward()
        h.grad = w.grad = b.grad = None

    step()
    logits_bytes = n * v * 4
    budget = 3 * chunk * v * 4 + 2 * w.numel() * 4 + 2 * h.numel() * 4 + (1 << 20)
    assert peak_memory(step, "cpu") < min(budget, logits_bytes / 2)


def test_all_rows_ignored_gives_zero():
    h, w, b, y, t_logits, _ = make((5,))
    y[:] = -100
    out, grads = run(kdfast.fused_linear_kd, h, w, b, t_logits, target=y, alpha=0.5)
    assert float(out) == 0 and all(float(g.abs().max()) == 0 for g in grads)


def test_empty_batch():
    h, w, b, y, t_logits, _ = make((0,))
    out, grads = run(kdfast.fused_linear_kd, h, w, b, t_logits, target=y, alpha=0.5)
    assert float(out) == 0 and grads[0].shape == (0, 12) and float(grads[1].abs().max()) == 0


def test_upstream_gradient_and_only_required_gradients():
    h, w, b, y, t_logits, head = make((6,))
    out = kdfast.fused_linear_kd(h, w, head, student_bias=b, target=y, alpha=0.5)
    g1 = torch.autograd.grad(out, (h, w, b))
    out = kdfast.fused_linear_kd(h, w, head, student_bias=b, target=y, alpha=0.5)
    g3 = torch.autograd.grad(3 * out, (h, w, b))
    torch.testing.assert_close(g3, tuple(3 * g for g in g1))
    w_frozen = w.detach()
    kdfast.fused_linear_kd(h, w_frozen, head, target=y, alpha=0.5).backward()
    assert h.grad is not None and w_frozen.grad is None


def test_teacher_gets_no_gradient():
    h, w, b, y, t_logits, _ = make((6,))
    t_logits.requires_grad_(True)
    kdfast.fused_linear_kd(h, w, t_logits, target=y, alpha=0.5).backward()
    assert t_logits.grad is None and h.grad is not None


def test_non_contiguous_inputs():
    h, w, b, y, t_logits, head = make((6,), H=12)
    h2 = torch.cat([h.detach(), h.detach()], 1)[:, ::2].requires_grad_(True)
    w2 = w.detach().T.contiguous().T.requires_grad_(True)
    t2 = torch.cat([t_logits, t_logits], 0)[::2]
    assert not h2.is_contiguous() or not t2.is_contiguous()
    assert_matches(h2, w2, b, t2, target=y, alpha=0.5, chunk_size=4)


def test_gradcheck(TopK):
    h, w, b, y, t_logits, head = make((5,), H=4, V=7, Ht=3, dtype=torch.float64)
    y[0] = -100
    for teacher, kw in ((t_logits, {"divergence": "jsd"}), (head, {}),
                        (topk_of(t_logits, 3, TopK, pad=1), {"tail": "bucket"})):
        def f(a, c, d, teacher=teacher, kw=kw):
            return kdfast.fused_linear_kd(a, c, teacher, student_bias=d, target=y, temperature=2.0, alpha=0.4,
                                          chunk_size=2, **kw)

        assert torch.autograd.gradcheck(f, (h, w, b))


def test_opcheck():
    h, w, b, y, t_logits, head = make((6,))
    needs = [True, True, True]
    torch.library.opcheck(torch.ops.kdfast.fused_linear_kd_fwd.default,
                          (h, w, b, "logits", [t_logits], y, 2.0, 0.5, "jsd", 0.5, "renormalize", -100, True, 4,
                           None, 1.0, None, 1.0, True, needs))
    torch.library.opcheck(torch.ops.kdfast.fused_linear_kd_fwd.default,
                          (h, w, None, "head", [head.hidden, head.weight], None, 1.0, 1.0, "kl", 0.5,
                           "renormalize", -100, False, 5, 30.0, 0.5, 20.0, 2.0, False, [True, False, False]))
    torch.library.opcheck(torch.ops.kdfast.fused_linear_kd_fwd.default,
                          (h, w, b, "logits", [t_logits], y, 2.0, 0.5, "kl", 0.5, "renormalize", -100, True, 4,
                           None, 1.0, None, 1.0, True, [False, False, False]))


def test_torch_compile_fullgraph(TopK):
    h, w, b, y, t_logits, head = make((2, 5))
    topk = topk_of(t_logits, 4, TopK)
    for teacher in (t_logits, head, topk):
        def f(a, c, d, teacher=teacher):
            return kdfast.fused_linear_kd(a, c, teacher, student_bias=d, target=y, temperature=2.0, alpha=0.5,
                                          chunk_size=3)

        torch._dynamo.reset()
        out, grads = run(lambda a, c, t, student_bias: torch.compile(f, fullgraph=True)(a, c, student_bias),
                         h, w, b, None)
        eager, eager_grads = run(lambda a, c, t, student_bias: f(a, c, student_bias), h, w, b, None)
        torch.testing.assert_close(out, eager)
        torch.testing.assert_close(grads, eager_grads)


def test_autocast_keeps_float32():
    """Under autocast the op computes in float32 from the tensors as given (bf16 hidden states, float32 weight)."""
    h, w, b, y, t_logits, head = make((7,))
    h16 = h.detach().bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = run(kdfast.fused_linear_kd, h16, w, b, head, target=y, alpha=0.5)
    plain, plain_grads = run(kdfast.fused_linear_kd, h16, w, b, head, target=y, alpha=0.5)
    assert out.dtype == torch.float32 and grads[0].dtype == torch.bfloat16 and grads[1].dtype == torch.float32
    torch.testing.assert_close(out, plain)
    torch.testing.assert_close(grads, plain_grads)


def test_double_backward_raises():
    h, w, b, y, t_logits, _ = make((4,), dtype=torch.float64)
    out = kdfast.fused_linear_kd(h, w, t_logits, student_bias=b, target=y, alpha=0.5)
    gh, = torch.autograd.grad(out, (h,), create_graph=True)
    with pytest.raises(RuntimeError, match="fused_linear_kd does not support double backward"):
        gh.sum().backward()


def test_forced_reference_backend(monkeypatch):
    h, w, b, y, t_logits, _ = make((4,))
    monkeypatch.setattr(_ops, "FORCE_REFERENCE", True)
    calls = []
    monkeypatch.setattr(reference, "fused_linear_kd", lambda *a, **k: calls.append(1) or torch.zeros(()))
    kdfast.fused_linear_kd(h, w, t_logits)
    assert calls == [1]


# --- sampled teachers ---------------------------------------------------------------------------------------


def test_sampled_teacher_equals_sampled_kd_div_on_the_logits():
    """fused_linear_kd with a Sampled teacher is sampled_kd_div (and cross-entropy) of the explicit logits, on the
    kernels and on the reference; a row without draws gives 0."""
    h, w, b, y, t_logits, _ = make((10,), dtype=torch.float64)
    sampled = kdfast.sample_from_logits(t_logits, 12, 1.5, generator=torch.Generator().manual_seed(2))
    sampled.counts[3] = 0
    logits = h @ w.T + b
    keep = y != -100
    want = 0.7 * kdfast.sampled_kd_div(logits, sampled, 1.5, mask=keep) + \
        0.3 * torch.nn.functional.cross_entropy(logits, y)
    want_grads = torch.autograd.grad(want, (h, w, b))
    for fn in (kdfast.fused_linear_kd, reference.fused_linear_kd):
        out = fn(h, w, sampled, student_bias=b, target=y, temperature=1.5, alpha=0.7, chunk_size=3)
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(torch.autograd.grad(out, (h, w, b)), want_grads)


def test_sampled_teacher_gradcheck_and_errors():
    h, w, b, y, t_logits, _ = make((5,), H=4, V=7, dtype=torch.float64)
    sampled = kdfast.sample_from_logits(t_logits, 6, 2.0, generator=torch.Generator().manual_seed(3))
    assert torch.autograd.gradcheck(
        lambda a, c, d: kdfast.fused_linear_kd(a, c, sampled, student_bias=d, target=y, temperature=2.0, alpha=0.4,
                                               chunk_size=2), (h, w, b))
    for kw in ({"divergence": "jsd"}, {"divergence": "reverse_kl"}, {"tail": "bucket"}):
        with pytest.raises(ValueError, match="a kdfast.Sampled teacher estimates the forward KL"):
            kdfast.fused_linear_kd(h, w, sampled, **kw)
    bad = kdfast.Sampled(torch.full((5, 6), 7), sampled.counts, sampled.logprobs)
    with pytest.raises(ValueError, match="teacher_indices holds 7, outside \\[0, 7\\)"):
        kdfast.fused_linear_kd(h, w, bad)
    with pytest.raises(ValueError, match="teacher.indices must have the row shape"):
        kdfast.fused_linear_kd(h, w, sampled.rows(0, 4))


# --- soft-capping and logit scale ---------------------------------------------------------------------------


def capped_head(head, softcap=20.0, logit_scale=0.7):
    return head._replace(softcap=softcap, logit_scale=logit_scale)


@pytest.mark.parametrize("form,divergence", FORM_DIVERGENCES)
@pytest.mark.parametrize("softcap,logit_scale", [(5.0, 1.0), (None, 0.25), (3.0, 2.0)])
def test_softcap_and_logit_scale_match_the_composition(TopK, form, divergence, softcap, logit_scale):
    """fused_linear_kd(softcap, logit_scale) (and a capped TeacherHead) equals kd on the explicitly capped logits,
    softcap * tanh(logit_scale * (h @ W.T + b) / softcap), in value and gradient (float64, tight)."""
    h, w, b, y, t_logits, head = make((9,), dtype=torch.float64)
    teacher, kw = teacher_of(form, t_logits, capped_head(head, 4.0, 1.5) if form == "head" else head, TopK)
    out, grads = run(kdfast.fused_linear_kd, h, w, b, teacher, target=y, temperature=2.0, alpha=0.4,
                     divergence=divergence, chunk_size=4, softcap=softcap, logit_scale=logit_scale, **kw)
    logits = h @ w.T + b
    logits = logit_scale * logits if softcap is None else softcap * torch.tanh(logit_scale * logits / softcap)
    if form == "head":
        t = head.hidden @ head.weight.T + head.bias
        teacher = 4.0 * torch.tanh(1.5 * t / 4.0)
    keep = y != -100
    if form == "sampled":
        kd = reference.sampled_kd_div(logits, teacher, 2.0, mask=keep)
    elif form.startswith("topk"):
        kd = reference.topk_kd_div(logits, *teacher, 2.0, divergence=divergence, beta=0.5, mask=keep, **kw)
    else:
        kd = reference.kd_div(logits, teacher, 2.0, divergence=divergence, mask=keep)
    ce = torch.nn.functional.cross_entropy(logits, y)
    want = 0.4 * kd + 0.6 * ce
    torch.testing.assert_close(out, want.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads, torch.autograd.grad(want, (h, w, b)), rtol=1e-9, atol=1e-12)
    assert_matches(h, w, b, teacher, rtol=1e-10, atol=1e-12, target=y, temperature=2.0, alpha=0.4,
                   divergence=divergence, chunk_size=4, softcap=softcap, logit_scale=logit_scale, **kw)


def test_softcap_bounds_the_logits_and_gradcheck():
    h, w, b, y, t_logits, head = make((5,), H=4, V=7, Ht=3, dtype=torch.float64)
    with torch.no_grad():
        w.mul_(50)  # logits far beyond the cap: tanh saturates, the gradient vanishes smoothly
    for teacher in (t_logits, capped_head(head, 2.0, 3.0)):
        def f(a, c, d, teacher=teacher):
            return kdfast.fused_linear_kd(a, c, teacher, student_bias=d, target=y, temperature=2.0, alpha=0.4,
                                          chunk_size=2, softcap=3.0, logit_scale=0.5)

        assert torch.autograd.gradcheck(f, (h, w, b))


@pytest.mark.parametrize("form", ["logits", "head", "topk-bucket"])
def test_softcap_and_num_items_bfloat16_gradients_within_one_percent(TopK, form):
    h, w, b, y, t_logits, head = make((4, 16), H=32, V=1000, dtype=torch.bfloat16)
    teacher, kw = teacher_of(form, t_logits, capped_head(head, 30.0, 2.0), TopK)
    options = dict(target=y, temperature=2.0, alpha=0.5, softcap=4.0, logit_scale=2.0, num_items_in_batch=50, **kw)
    _, grads = run(kdfast.fused_linear_kd, h, w, b, teacher, chunk_size=5, **options)
    _, ref_grads = reference64(h, w, b, teacher, **options)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.bfloat16 and float((g.double() - r).norm() / r.norm()) < 1e-2


# --- gradient accumulation: num_items_in_batch ----------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("as_tensor", [False, True], ids=["int", "tensor"])
def test_micro_batches_with_num_items_sum_to_the_batch(TopK, form, as_tensor):
    """Each micro-batch given the whole batch's count of counted rows: their losses and gradients sum to the whole
    batch's (1e-6), KD and cross-entropy both."""
    h, w, b, y, t_logits, head = make((3, 8), dtype=torch.float64)
    teacher, kw = teacher_of(form, t_logits, head, TopK)
    options = dict(temperature=2.0, alpha=0.3, chunk_size=5, **kw)
    whole, whole_grads = run(kdfast.fused_linear_kd, h, w, b, teacher, target=y, **options)
    count = int((y != -100).sum())
    n_items = torch.tensor(count) if as_tensor else count
    total, total_grads = 0, [0, 0, 0]
    for part in range(3):
        sub = teacher[part] if isinstance(teacher, torch.Tensor) else type(teacher)(*(
            x[part] if isinstance(x, torch.Tensor) and x.shape[:1] == (3,) else x for x in teacher))
        out, grads = _micro(h, w, b, sub, y, part, n_items, options)
        ref, ref_grads = _micro(h, w, b, sub, y, part, n_items, options, fn=reference.fused_linear_kd)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grads, ref_grads, rtol=1e-10, atol=1e-12)
        total = total + out
        total_grads = [t + g for t, g in zip(total_grads, grads)]
    torch.testing.assert_close(total, whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tuple(total_grads), whole_grads, rtol=1e-6, atol=1e-6)


def _micro(h, w, b, teacher, y, part, n_items, options, fn=kdfast.fused_linear_kd):
    """Loss and gradients (h, w, b) of micro-batch `part` (the rows h[part]) given the batch's count."""
    out = fn(h[part], w, teacher, student_bias=b, target=y[part], num_items_in_batch=n_items, **options)
    return out.detach(), torch.autograd.grad(out, (h, w, b))


def test_num_items_without_target_counts_every_row():
    h, w, b, _, t_logits, _ = make((6,), dtype=torch.float64)
    whole = kdfast.fused_linear_kd(h, w, t_logits, student_bias=b, temperature=2.0)
    parts = sum(kdfast.fused_linear_kd(h[i:i + 2], w, t_logits[i:i + 2], student_bias=b, temperature=2.0,
                                       num_items_in_batch=6) for i in (0, 2, 4))
    torch.testing.assert_close(parts, whole)


def test_error_num_items():
    h, w, b, y, t_logits, _ = make((4,))
    for bad, error, match in ((0, ValueError, "> 0"), ("3", TypeError, "a number or a one-element tensor"),
                              (torch.tensor([1, 2]), ValueError, "one-element"), (torch.tensor(0), ValueError, "> 0"),
                              (float("nan"), ValueError, "> 0"), (True, TypeError, "num_items_in_batch")):
        with pytest.raises(error, match=match):
            kdfast.fused_linear_kd(h, w, t_logits, num_items_in_batch=bad)


# --- dtypes: a float64 teacher does not move the student to float64 --------------------------------------------


@pytest.mark.parametrize("form", FORMS)
def test_float64_teacher_keeps_the_students_dtype(TopK, form, monkeypatch):
    """numpy's float64 log-probabilities (or logits, or a float64 TeacherHead) against a float32 student: the loss
    and every matmul stay float32 (no float64 copy of the V x H weight), within float32 rounding of the
    reference."""
    h, w, b, y, t_logits, head = make((7,))
    t64 = t_logits.double()
    head64 = kdfast.TeacherHead(*(x.double() for x in head[:3]))
    teacher, kw = teacher_of(form, t64, head64, TopK)
    assert all(x.dtype == torch.float64 for x in teacher if isinstance(x, torch.Tensor) and x.is_floating_point())
    seen = []
    real_mm, real_addmm = torch.Tensor.__matmul__, torch.addmm
    monkeypatch.setattr(fused_linear, "chunk_logits",
                        lambda a, c, d, half=None: seen.append((a.dtype, c.dtype)) or
                        (real_mm(a, c.T) if d is None else real_addmm(d, a, c.T)))
    out, grads = run(kdfast.fused_linear_kd, h, w, b, teacher, target=y, temperature=2.0, alpha=0.5, chunk_size=3,
                     **kw)
    assert out.dtype == torch.float32 and seen and all(d == (torch.float32, torch.float32) for d in seen)
    assert_matches(h, w, b, teacher, target=y, temperature=2.0, alpha=0.5, chunk_size=3, **kw)


# --- evaluation: no gradient work under no_grad / inference_mode ----------------------------------------------


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("form", FORMS)
def test_no_grad_computes_the_loss_only(TopK, form, mode, monkeypatch):
    """Trainable weights under no_grad / inference_mode: the same loss as with gradients, and no gradient is made
    (the op is asked for none, and no logits-gradient kernel runs)."""
    h, w, b, y, t_logits, head = make((2, 5))
    teacher, kw = teacher_of(form, t_logits, head, TopK)
    options = dict(student_bias=b, target=y, temperature=2.0, alpha=0.5, chunk_size=4, **kw)
    with_grad = kdfast.fused_linear_kd(h, w, teacher, **options)
    asked = []
    real_fwd = fused_linear.fused_linear_kd_fwd
    monkeypatch.setattr(fused_linear, "fused_linear_kd_fwd", lambda *a: asked.append(a[-1]) or real_fwd(*a))
    for op in ("kd_bwd", "topk_kd_bwd"):
        monkeypatch.setattr(fused_linear.torch.ops.kdfast, op, None, raising=False)
    with mode():
        loss = kdfast.fused_linear_kd(h, w, teacher, **options)
    monkeypatch.undo()
    assert asked == [[False, False, False]] and not loss.requires_grad
    torch.testing.assert_close(loss, with_grad.detach())


def test_no_grad_peak_memory_holds_no_weight_gradient():
    """Under no_grad the float32 weight gradient (V x H) is never allocated: the peak stays under its size."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        from harness import peak_memory
    finally:
        sys.path.pop(0)
    h, w, b, y, t_logits, _ = make((64,), H=256, V=4000)
    with torch.no_grad():
        peak = peak_memory(lambda: kdfast.fused_linear_kd(h, w, t_logits, target=y, alpha=0.5, chunk_size=8), "cpu")
    assert peak < w.numel() * 4


# --- one test per documented error ---------------------------------------------------------------------------


def test_error_alpha_without_target():
    h, w, b, y, t_logits, _ = make((4,))
    with pytest.raises(ValueError, match="alpha=0.5 .* needs a target"):
        kdfast.fused_linear_kd(h, w, t_logits, alpha=0.5)


def test_error_hidden_size_mismatch():
    h, w, b, y, t_logits, head = make((4,))
    with pytest.raises(ValueError, match="student_weight must be \\(V, H\\) with H = 12"):
        kdfast.fused_linear_kd(h, w[:, :5], t_logits)
    with pytest.raises(ValueError, match="teacher.weight must be \\(V, Ht\\)"):
        kdfast.fused_linear_kd(h, w, kdfast.TeacherHead(head.hidden, head.weight[:, :4]))
    with pytest.raises(ValueError, match="student_hidden must be \\(N, H\\) or \\(B, T, H\\)"):
        kdfast.fused_linear_kd(h[0], w, t_logits[0])


def test_error_vocabulary_mismatch(TopK):
    h, w, b, y, t_logits, head = make((4,))
    with pytest.raises(ValueError, match="teacher logits have 96 classes but student_weight has 97"):
        kdfast.fused_linear_kd(h, w, t_logits[:, :96])
    with pytest.raises(ValueError, match="teacher.weight must be \\(V, Ht\\) = \\(97, 9\\)"):
        kdfast.fused_linear_kd(h, w, kdfast.TeacherHead(head.hidden, head.weight[:50]))
    with pytest.raises(ValueError, match="student_bias must be \\(97,\\)"):
        kdfast.fused_linear_kd(h, w, t_logits, student_bias=b[:3])
    with pytest.raises(ValueError, match="teacher.bias must be \\(97,\\)"):
        kdfast.fused_linear_kd(h, w, kdfast.TeacherHead(head.hidden, head.weight, head.bias[:3]))
    with pytest.raises(ValueError, match="teacher_indices holds 97, outside \\[0, 97\\)"):
        kdfast.fused_linear_kd(h, w, TopK(torch.full((4, 2), 97), torch.zeros(4, 2)))


def test_error_row_count_mismatch(TopK):
    h, w, b, y, t_logits, head = make((4,))
    with pytest.raises(ValueError, match="teacher must have the row shape \\(4,\\)"):
        kdfast.fused_linear_kd(h, w, t_logits[:3])
    with pytest.raises(ValueError, match="teacher.hidden must have the row shape"):
        kdfast.fused_linear_kd(h, w, kdfast.TeacherHead(head.hidden[:3], head.weight))
    with pytest.raises(ValueError, match="target must have the row shape"):
        kdfast.fused_linear_kd(h, w, t_logits, target=y[:3], alpha=0.5)
    with pytest.raises(ValueError, match="teacher.indices must have the row shape"):
        kdfast.fused_linear_kd(h, w, TopK(torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2)))
    with pytest.raises(ValueError, match="teacher_indices and teacher_logprobs must have one shape"):
        kdfast.fused_linear_kd(h, w, TopK(torch.zeros(4, 2, dtype=torch.long), torch.zeros(4, 3)))


def test_error_teacher_type(TopK):
    h, w, b, y, t_logits, head = make((4,))
    with pytest.raises(TypeError, match="teacher must be a logits tensor, a kdfast.TeacherHead, a kdfast.TopK or a "
                                        "kdfast.Sampled"):
        kdfast.fused_linear_kd(h, w, (head.hidden, head.weight))
    with pytest.raises(TypeError, match="teacher must be float32"):
        kdfast.fused_linear_kd(h, w, t_logits.long())
    with pytest.raises(TypeError, match="teacher.indices must be int64 or int32"):
        kdfast.fused_linear_kd(h, w, TopK(torch.zeros(4, 2), torch.zeros(4, 2)))


def test_error_dtypes_and_target():
    h, w, b, y, t_logits, _ = make((4,))
    with pytest.raises(TypeError, match="student_hidden must be float32"):
        kdfast.fused_linear_kd(h.long(), w, t_logits)
    with pytest.raises(TypeError, match="target must hold int64 or int32"):
        kdfast.fused_linear_kd(h, w, t_logits, target=y.float())
    with pytest.raises(ValueError, match="target holds class 97"):
        kdfast.fused_linear_kd(h, w, t_logits, target=torch.full((4,), 97))


def test_error_options():
    h, w, b, y, t_logits, _ = make((4,))
    with pytest.raises(ValueError, match="temperature"):
        kdfast.fused_linear_kd(h, w, t_logits, temperature=0.0)
    with pytest.raises(ValueError, match="alpha"):
        kdfast.fused_linear_kd(h, w, t_logits, target=y, alpha=1.5)
    with pytest.raises(ValueError, match="divergence"):
        kdfast.fused_linear_kd(h, w, t_logits, divergence="l2")
    with pytest.raises(ValueError, match="beta"):
        kdfast.fused_linear_kd(h, w, t_logits, divergence="jsd", beta=1.0)
    with pytest.raises(ValueError, match="tail"):
        kdfast.fused_linear_kd(h, w, t_logits, tail="zero")
    with pytest.raises(ValueError, match="chunk_size"):
        kdfast.fused_linear_kd(h, w, t_logits, chunk_size=0)
    with pytest.raises(TypeError, match="ignore_index"):
        kdfast.fused_linear_kd(h, w, t_logits, ignore_index=1.0)


def test_error_devices():
    h, w, b, y, t_logits, _ = make((4,))
    with pytest.raises(ValueError, match="teacher is on meta but student_hidden is on cpu"):
        kdfast.fused_linear_kd(h, w, t_logits.to("meta"))


@pytest.mark.cuda
def test_cuda_matches_cpu():
    h, w, b, y, t_logits, head = make((3, 7), V=1000)
    cpu = run(kdfast.fused_linear_kd, h, w, b, head, target=y, temperature=2.0, alpha=0.5, chunk_size=4)

    def to_cuda(x):
        return x.detach().cuda().requires_grad_(x.requires_grad)

    gpu = run(kdfast.fused_linear_kd, to_cuda(h), to_cuda(w), to_cuda(b),
              kdfast.TeacherHead(*(x.cuda() for x in head)), target=y.cuda(), temperature=2.0, alpha=0.5,
              chunk_size=4)
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close([g.cpu() for g in gpu[1]], list(cpu[1]), rtol=1e-4, atol=1e-6)
