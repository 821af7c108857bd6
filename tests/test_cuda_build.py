"""CI's CUDA build (`make cuda-build`, which runs this file again in its venv with the CUDA build of torch and of
kdfast): the registration check (kdfast/_registry.py) enumerates the kdfast ops from the dispatcher and fails on
an op without a kernel, on a stale device-independent entry and on a build without CUDA; and fused_linear_kd's
CUDA products, traced with fake CUDA tensors (no GPU needed, but a CUDA build of torch)."""
import pytest
import torch

import kdfast
from kdfast import _registry, fused_linear


def test_every_op_has_a_cpu_kernel():
    ops = _registry.kdfast_ops()
    assert "kdfast::kd_fwd" in ops and "kdfast::batched_svd" in ops
    assert set(_registry.DEVICE_INDEPENDENT) <= set(ops)
    assert _registry.missing_kernels("CPU") == []


def test_cuda_check_names_every_op_without_a_cuda_kernel(capsys):
    problems = _registry.missing_kernels("CUDA")
    if kdfast.backends()["cuda"]:
        assert problems == []
        return
    # a CPU-only build: every op but the device-independent ones is missing, and the check fails
    expected = [f"{op}: no CUDA kernel" for op in _registry.kdfast_ops() if op not in _registry.DEVICE_INDEPENDENT]
    assert problems == expected and len(expected) >= 10
    assert _registry.main(["CUDA"]) == 1
    assert "built without CUDA" in capsys.readouterr().out


def test_a_new_op_without_a_kernel_is_caught():
    lib = torch.library.Library("kdfast", "FRAGMENT")
    try:
        lib.define("registry_probe(Tensor x) -> Tensor")
        assert _registry.missing_kernels("CPU") == ["kdfast::registry_probe: no CPU kernel"]
        lib.impl("registry_probe", lambda x: x.clone(), "CPU")
        assert _registry.missing_kernels("CPU") == []
    finally:
        lib._destroy()
    assert "kdfast::registry_probe" not in _registry.kdfast_ops()


@pytest.mark.parametrize("entry", ["kdfast::renamed_op", "kdfast::kd_fwd"])
def test_a_stale_device_independent_entry_is_caught(monkeypatch, entry):
    monkeypatch.setitem(_registry.DEVICE_INDEPENDENT, entry, "test")
    problems = _registry.missing_kernels("CPU")
    if entry == "kdfast::renamed_op":
        assert problems == ["kdfast::renamed_op: listed as device-independent but not registered"]
    else:  # a kernel op listed as device-independent: it has no composite kernel
        assert problems == ["kdfast::kd_fwd: listed as device-independent but has no composite kernel"]


@pytest.mark.skipif(torch.version.cuda is None, reason="fake CUDA tensors need a CUDA build of torch: make cuda-build")
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_fused_linear_cuda_products_take_half_operands(monkeypatch, half):
    """On CUDA every chunk product of half inputs runs on the half operands with float32 output (tensor cores): no
    V x H weight is copied to float32, and loss and gradients are float32."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    n, h, v, ht = 37, 64, 1000, 48
    products, copies = [], []

    def recorder(op):
        def record(*args, **kw):
            products.append(([x.dtype for x in args], kw.get("out_dtype")))
            return op(*args, **kw)
        return record
    for name in ("mm", "addmm"):
        monkeypatch.setattr(torch, name, recorder(getattr(torch, name)))

    def to(x, *args, _to=torch.Tensor.to, **kw):
        y = _to(x, *args, **kw)
        if x.dim() == 2 and x.shape[0] == v and y.dtype == torch.float32 and x.dtype != torch.float32:
            copies.append(tuple(x.shape))
        return y
    monkeypatch.setattr(torch.Tensor, "to", to)
    with FakeTensorMode():
        def rnd(*shape):
            return torch.empty(shape, device="cuda", dtype=half)

        out = fused_linear.fused_linear_kd_fwd._init_fn(  # the op's body (a call of the op would run its fake)
            rnd(n, h), rnd(v, h), rnd(v), "head", [rnd(n, ht), rnd(v, ht)],
            torch.zeros(n, device="cuda", dtype=torch.int64), 2.0, 0.5, "kl", 0.5, "renormalize", -100, True, 16,
            None, 1.0, None, 1.0, True, [True, True, True])  # no soft-cap, logit scale 1 (student, teacher); batchmean
    assert [(x.dtype, tuple(x.shape)) for x in out] == [
        (torch.float32, ()), (torch.float32, (n, h)), (torch.float32, (v, h)), (torch.float32, (v,))]
    assert copies == []
    # per chunk (3 of 16 rows): student logits (addmm with the float32 bias), teacher logits, the two gradients
    # (and the mm calls of the fake addmm's decomposition)
    assert len(products) >= 3 * 4
    assert all(dtypes[-2:] == [half, half] and out_dtype == torch.float32 for dtypes, out_dtype in products)
