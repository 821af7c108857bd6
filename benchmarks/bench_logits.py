"""kd_div and kd_loss, forward + backward (student requires grad, teacher frozen), per workload of issue 2."""
import pytest
import torch
from harness import make_impl, measure

import kdfast
from kdfast import reference

# name: (shape, dim, dtype, devices)
WORKLOADS = {
    "cifar": ((128, 100), -1, torch.float32, ("cpu", "cuda")),
    "imagenet": ((256, 1000), -1, torch.float32, ("cpu", "cuda")),
    "llm": ((1024, 32000), -1, torch.float32, ("cpu",)),
    "llm-8k": ((8192, 32000), -1, torch.bfloat16, ("cuda",)),
    "llm-128k": ((4096, 128256), -1, torch.bfloat16, ("cuda",)),
    "pixel": ((2, 19, 128, 256), 1, torch.float32, ("cpu",)),
    "pixel-b8": ((8, 19, 128, 256), 1, torch.float32, ("cuda",)),
}
T = 4.0


def _inputs(shape, dtype, device, dim):
    g = torch.Generator(device="cpu").manual_seed(0)
    s = (torch.randn(shape, generator=g) * 3).to(device=device, dtype=dtype).requires_grad_(True)
    t = (torch.randn(shape, generator=g) * 3).to(device=device, dtype=dtype)
    rows = shape[:dim % len(shape)] + shape[dim % len(shape) + 1:]
    y = torch.randint(0, shape[dim], rows, generator=g).to(device)
    return s, t, y


@pytest.mark.parametrize("fn", ["kd_div", "kd_loss"])
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_logits(benchmark, device, impl, workload, fn):
    shape, dim, dtype, devices = WORKLOADS[workload]
    if device not in devices:
        pytest.skip(f"{workload} is a {'/'.join(devices)} workload")
    s, t, y = _inputs(shape, dtype, device, dim)
    if fn == "kd_div":
        call = make_impl(impl, lambda s, t, y: kdfast.kd_div(s, t, T, dim=dim),
                         lambda s, t, y: reference.kd_div(s, t, T, dim=dim))
    else:
        call = make_impl(impl, lambda s, t, y: kdfast.kd_loss(s, t, y, T, 0.9, dim=dim),
                         lambda s, t, y: reference.kd_loss(s, t, y, T, 0.9, dim=dim))

    def step():
        call(s, t, y).backward()
        s.grad = None

    n, elt = s.numel(), s.element_size()
    # Must move: forward reads s and t; backward reads s and t and writes grad s.
    measure(benchmark, step, op=fn, workload=workload, impl=impl, device=device, bytes_moved=5 * n * elt,
            flops=0, shape=list(shape), dtype=str(dtype).replace("torch.", ""), grad_bytes=n * elt)
