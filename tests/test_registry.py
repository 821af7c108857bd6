"""The registration check of CI's CUDA build (kdfast/_registry.py, `make cuda-build`): it enumerates the kdfast ops
from the dispatcher and fails on an op without a kernel, on a stale device-independent entry, and on a build
without CUDA."""
import pytest
import torch

import kdfast
from kdfast import _registry


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
