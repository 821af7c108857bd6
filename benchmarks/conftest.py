import pytest
from harness import IMPLS, bench_device, copy_bandwidth


@pytest.fixture(scope="session")
def device():
    return bench_device()


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


@pytest.fixture(scope="session", autouse=True)
def _record_bandwidth(request, device):
    """Stores the machine's measured copy bandwidth in the JSON (machine_info) for the report's roofline."""
    request.config._kdfast_bandwidth = copy_bandwidth(device)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["kdfast_copy_bandwidth"] = getattr(config, "_kdfast_bandwidth", None)
    machine_info["kdfast_device"] = bench_device()
    import torch

    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        machine_info["gpu"] = torch.cuda.get_device_name()
