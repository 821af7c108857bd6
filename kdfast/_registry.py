"""Which kdfast ops have a kernel for a dispatch key. `python -m kdfast._registry CUDA` is CI's check of a CUDA build
(`make cuda-build`): the extension reports CUDA and every op of the kdfast library has a CUDA kernel, except the
device-independent ones listed below. The ops are enumerated from the dispatcher, so a new op is checked without
being named here."""
from __future__ import annotations

import sys

import torch

# Ops composed of torch calls (torch.library.custom_op in Python) that run on every device through one
# CompositeExplicitAutograd kernel: a per-device kernel neither exists nor is wanted. Each must still be registered
# with that kernel, so a stale entry fails the check too.
DEVICE_INDEPENDENT = {
    "kdfast::fused_linear_kd_fwd": "chunked matmuls (cuBLAS on CUDA) feeding the kd ops, which have their own "
                                   "kernels (kdfast/fused_linear.py)",
    "kdfast::similarity_preserving": "batch x batch Gram products, which the device's BLAS runs at peak "
                                     "(kdfast/_similarity.py)",
}
_COMPOSITE = ("CompositeExplicitAutograd", "CompositeImplicitAutograd")


def kdfast_ops() -> list:
    """Every op of the kdfast library registered in this process (import kdfast first)."""
    return sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith("kdfast::"))


def missing_kernels(dispatch_key: str) -> list:
    """The problems that keep the kdfast ops from running on `dispatch_key` ("CPU", "CUDA"): an op without a kernel
    for it, or a DEVICE_INDEPENDENT entry that is not registered with a composite kernel. Empty when all is well."""
    ops = kdfast_ops()
    problems = []
    for op in ops:
        if op in DEVICE_INDEPENDENT:
            if not any(torch._C._dispatch_has_kernel_for_dispatch_key(op, k) for k in _COMPOSITE):
                problems.append(f"{op}: listed as device-independent but has no composite kernel")
        elif not torch._C._dispatch_has_kernel_for_dispatch_key(op, dispatch_key):
            problems.append(f"{op}: no {dispatch_key} kernel")
    problems += [f"{op}: listed as device-independent but not registered" for op in DEVICE_INDEPENDENT
                 if op not in ops]
    return problems


def main(argv: list) -> int:
    import kdfast

    key = argv[0] if argv else "CUDA"
    if key == "CUDA" and not kdfast.backends()["cuda"]:
        print(f"kdfast: the extension was built without CUDA: {kdfast.backends()}")
        return 1
    problems = missing_kernels(key)
    for line in problems:
        print(line)
    ops = kdfast_ops()
    print(f"kdfast: {len(ops) - len(DEVICE_INDEPENDENT)} ops with a {key} kernel, {len(DEVICE_INDEPENDENT)} "
          f"device-independent, {len(problems)} problems")
    return 1 if problems or not ops else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
