"""attention_transfer_loss, forward + backward (student features require grad, teacher frozen), per workload; on
the CIFAR workload also the plain version a user writes, eager and compiled (the peer to beat)."""
import pytest
import torch
import torch.nn.functional as F
from harness import make_impl, measure

import kdfast
from kdfast import reference

CIFAR = [(16, 32, 32), (32, 16, 16), (64, 8, 8)]  # ResNet110 -> ResNet20 stage outputs, on both sides
# name: (batch, student (C, H, W) per stage, teacher (C, H, W) per stage, dtype, devices)
WORKLOADS = {
    "cifar": (128, CIFAR, CIFAR, torch.float32, ("cpu", "cuda")),
    "imagenet": (16, [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)],
                 [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)], torch.float32, ("cpu",)),
    "imagenet-b256": (256, [(64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)],
                      [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)], torch.bfloat16, ("cuda",)),
}



def plain_attention_transfer(student, teacher):
    """Attention transfer as users write it (RepDistiller, p = 2): per stage F.normalize(f.pow(2).mean(1).flatten(1))
    on both sides, squared difference, mean; summed over stages. Same value as kdfast's "mean" on equal sizes."""
    return sum((F.normalize(s.pow(2).mean(1).flatten(1)) - F.normalize(t.pow(2).mean(1).flatten(1))).pow(2).mean()
               for s, t in zip(student, teacher))


PLAIN_IMPLS = {"plain": lambda: plain_attention_transfer,
               "plain-compiled": lambda: torch.compile(plain_attention_transfer, dynamic=False)}


@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_attention_transfer(benchmark, device, impl, workload):
    run(benchmark, device, impl, workload, make_impl(impl, kdfast.attention_transfer_loss,
                                                     reference.attention_transfer_loss))


@pytest.mark.parametrize("workload", ["cifar"])  # equal spatial sizes per pair: what the plain version handles
@pytest.mark.parametrize("impl", list(PLAIN_IMPLS))
def test_attention_transfer_plain(benchmark, device, impl, workload):
    torch._dynamo.reset()
    run(benchmark, device, impl, workload, PLAIN_IMPLS[impl]())


def run(benchmark, device, impl, workload, call):
    batch, s_shapes, t_shapes, dtype, devices = WORKLOADS[workload]
    if device not in devices:
        pytest.skip(f"{workload} is a {'/'.join(devices)} workload")
    g = torch.Generator(device="cpu").manual_seed(0)
    ss = [torch.randn((batch, *c), generator=g).to(device=device, dtype=dtype).requires_grad_(True) for c in s_shapes]
    ts = [torch.randn((batch, *c), generator=g).to(device=device, dtype=dtype) for c in t_shapes]

    def step():
        call(ss, ts).backward()
        for s in ss:
            s.grad = None

    s_bytes = sum(s.numel() for s in ss) * ss[0].element_size()
    t_bytes = sum(t.numel() for t in ts) * ts[0].element_size()
    # Must move: forward reads both sides; backward reads the student features and writes their gradients.
    measure(benchmark, step, op="attention_transfer", workload=workload, impl=impl, device=device,
            bytes_moved=3 * s_bytes + t_bytes, flops=0, batch=batch, dtype=str(dtype).replace("torch.", ""),
            student=[list(c) for c in s_shapes], teacher=[list(c) for c in t_shapes])
