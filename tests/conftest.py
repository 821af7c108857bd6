"""Device and dtype grids shared by the tests, and helpers to compare kernels with the reference."""
import hashlib
import os
import pathlib

import pytest
import torch

import kdfast
from kdfast import _ops

# Inductor's on-disk cache does not key on the ops' fake (shape) functions: a graph compiled before one changed
# would be reused with stale output shapes. Cache per version of the op modules (kdfast/*.py, where the fake
# functions live), inside the checkout.
_OPS_VERSION = hashlib.sha256(b"".join(f.read_bytes() for f in sorted(pathlib.Path(_ops.__file__).parent.glob("*.py")))
                              ).hexdigest()[:16]
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      str(pathlib.Path(__file__).resolve().parents[1] / "build" / "inductor-cache" / _OPS_VERSION))

CUDA = torch.cuda.is_available() and kdfast.backends()["cuda"]
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Every CPU instruction set this machine can run, so that each compiled kernel variant is tested.
CPU_CAPABILITIES = (["default", "avx2", "avx512"][: ["default", "avx2", "avx512"].index(_ops._C.best_cpu_capability())
                                                    + 1] if _ops._C is not None else [])

# (rtol, atol) for a kernel against the float64 reference, by input dtype.
TOLERANCE = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 1e-5),  # the CPU kernels use a fast exp (about 1e-6 relative error)
    torch.float16: (2e-3, 1e-4),
    torch.bfloat16: (1e-2, 1e-3),
}


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU and kdfast built with CUDA")
    config.addinivalue_line("markers", "cuda_emulation: the CUDA kernels run on the CPU (docs/cuda-emulation.md)")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU and kdfast built with CUDA")
    for item in items:
        if "cuda" in item.keywords and not CUDA:
            item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def dtype(request):
    return request.param


@pytest.fixture(params=CPU_CAPABILITIES)
def cpu_capability(request):
    """Runs a test once per CPU instruction set, restoring the best one afterwards."""
    _ops._C.set_cpu_capability(request.param)
    yield request.param
    _ops._C.set_cpu_capability(_ops._C.best_cpu_capability())


def assert_close(actual, expected, dtype, scale=1.0):
    """Compare a kernel result with the float64 reference at the tolerance of the input dtype."""
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * scale, equal_nan=True)
