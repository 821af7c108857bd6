"""batched_svd and manifold_distillation_loss, forward + backward, per workload."""
import pytest
import torch
from harness import make_impl, measure

import kdfast
from kdfast import reference

SVD_WORKLOADS = {"svd32": (4096, 32, 32), "svd64": (1024, 64, 64), "svd-tall": (512, 64, 16)}
# ResNet110 -> ResNet20 stage outputs at batch 128 (CIFAR), student and teacher of equal shapes.
NMD_STAGES = [(128, 16, 32, 32), (128, 32, 16, 16), (128, 64, 8, 8)]
NMD_RANK = 8


def _svd_loss(svd):
    def run(A):
        U, S, Vh = svd(A)
        return U.sum() + S.sum() + Vh.sum()
    return run


@pytest.mark.parametrize("workload", list(SVD_WORKLOADS))
def test_svd(benchmark, device, impl, workload):
    shape = SVD_WORKLOADS[workload]
    g = torch.Generator().manual_seed(0)
    A = torch.randn(shape, generator=g).to(device).requires_grad_(True)
    call = make_impl(impl, _svd_loss(kdfast.batched_svd), _svd_loss(reference.batched_svd))

    def step():
        call(A).backward()
        A.grad = None

    batch, m, n = shape
    k = min(m, n)
    # Must move: read A, write U, S, Vh; backward reads them and writes grad A.
    nbytes = 4 * (2 * (batch * m * n + batch * m * k + batch * k + batch * k * n))
    measure(benchmark, step, op="batched_svd", workload=workload, impl=impl, device=device, bytes_moved=nbytes,
            flops=0, shape=list(shape), dtype="float32")


def test_nmd_cifar(benchmark, device, impl):
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(x, generator=g).to(device).requires_grad_(True) for x in NMD_STAGES]
    t = [torch.randn(x, generator=g).to(device) for x in NMD_STAGES]
    call = make_impl(impl, lambda s, t: kdfast.manifold_distillation_loss(s, t, NMD_RANK),
                     lambda s, t: reference.manifold_distillation_loss(s, t, NMD_RANK))

    def step():
        call(s, t).backward()
        for x in s:
            x.grad = None

    nbytes = 4 * sum(x.numel() for x in s) * 3  # read s and t, write grad s
    measure(benchmark, step, op="manifold_distillation_loss", workload="nmd-cifar", impl=impl, device=device,
            bytes_moved=nbytes, flops=0, shapes=[list(x) for x in NMD_STAGES], rank=NMD_RANK, dtype="float32")
