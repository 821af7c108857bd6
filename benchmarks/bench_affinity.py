"""pairwise_affinity_loss and similarity_preserving_loss, forward + backward (student requires grad, teacher
frozen), per workload."""
import pytest
import torch
from harness import make_impl, measure

import kdfast
from kdfast import reference

# name: (student shape, teacher shape, pool_size, devices); the batch is 8 on the GPU and 2 on the CPU for skd.
PAIRWISE = {
    "skd": ((2, 128, 64, 128), (2, 512, 64, 128), None, ("cpu",)),
    "skd-pooled": ((2, 128, 64, 128), (2, 512, 64, 128), 2, ("cpu",)),
    "skd-b8": ((8, 128, 64, 128), (8, 512, 64, 128), None, ("cuda",)),
    "skd-pooled-b8": ((8, 128, 64, 128), (8, 512, 64, 128), 2, ("cuda",)),
    "fullres": ((2, 64, 256, 256), (2, 64, 256, 256), None, ("cpu", "cuda")),
}
# The explicit graphs of fullres (n = 65536) take 16 GiB each per image: only kdfast can run it.
KDFAST_ONLY = {"fullres"}


def _features(shape, device, seed, requires_grad):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=g).to(device).requires_grad_(requires_grad)


@pytest.mark.parametrize("workload", list(PAIRWISE))
def test_pairwise_affinity(benchmark, device, impl, workload):
    s_shape, t_shape, pool_size, devices = PAIRWISE[workload]
    if device not in devices:
        pytest.skip(f"{workload} is a {'/'.join(devices)} workload")
    if workload in KDFAST_ONLY and impl != "kdfast":
        pytest.skip(f"{workload}: the explicit n x n graphs do not fit in memory")
    s = _features(s_shape, device, 0, True)
    t = _features(t_shape, device, 1, False)
    call = make_impl(impl, lambda s, t: kdfast.pairwise_affinity_loss(s, t, pool_size=pool_size),
                     lambda s, t: reference.pairwise_affinity_loss(s, t, pool_size=pool_size))

    def step():
        call(s, t).backward()
        s.grad = None

    b, cs = s_shape[:2]
    ct = t_shape[1]
    k = pool_size or 1
    n = -(-s_shape[2] // k) * -(-s_shape[3] // k)
    elt = s.element_size()
    # Must move: forward reads s and t, backward reads them again and writes grad s. FLOPs of the Gram route
    # (full C x C Gram forward, student rows backward), the work kdfast does at most.
    measure(benchmark, step, op="pairwise_affinity", workload=workload, impl=impl, device=device,
            bytes_moved=(3 * s.numel() + 2 * t.numel()) * elt, flops=2 * b * n * (cs + ct) * (2 * cs + ct),
            student=list(s_shape), teacher=list(t_shape), pool_size=pool_size, nodes=n)


SP = {"sp": ((128, 64, 8, 8), ("cpu", "cuda"))}


@pytest.mark.parametrize("workload", list(SP))
def test_similarity_preserving(benchmark, device, impl, workload):
    shape, devices = SP[workload]
    s = _features(shape, device, 2, True)
    t = _features(shape, device, 3, False)
    call = make_impl(impl, kdfast.similarity_preserving_loss, reference.similarity_preserving_loss)

    def step():
        call(s, t).backward()
        s.grad = None

    b, d = shape[0], s[0].numel()
    measure(benchmark, step, op="similarity_preserving", workload=workload, impl=impl, device=device,
            bytes_moved=5 * s.numel() * s.element_size(), flops=2 * b * b * d * 3, shape=list(shape))
