"""Builds kdfast and its extension kdfast._C.

CPU kernels are always built. CUDA kernels are built when torch has CUDA and nvcc is found; KDFAST_CUDA=0/1
forces them off/on. Build against the installed torch: pip install --no-build-isolation . (the losses alone);
".[train]" adds the trainer's packages, ".[test]" the test tools too.
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils import cpp_extension


def want_cuda() -> bool:
    forced = os.environ.get("KDFAST_CUDA")
    if forced is not None:
        return forced == "1"
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def requirements(name: str) -> list:
    """The packages listed in a requirements file of this folder, following its `-r other.txt` lines."""
    folder = os.path.dirname(os.path.abspath(__file__))
    packages = []
    with open(os.path.join(folder, name)) as fh:
        for line in fh:
            line = line.split("#", 1)[0].strip()
            if line.startswith("-r "):
                packages += requirements(line[3:].strip())
            elif line:
                packages.append(line)
    return packages


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/cpu/isa/*.cpp"))
    cxx = ["-O3", "-fvisibility=hidden", "-Wall", "-Wno-unknown-pragmas", "-Wno-psabi", "-Wno-maybe-uninitialized"]
    if os.environ.get("KDFAST_OPENMP", "1") == "1":
        cxx.append("-fopenmp")
    if not want_cuda():
        return cpp_extension.CppExtension("kdfast._C", sources, extra_compile_args={"cxx": cxx},
                                          extra_link_args=["-fopenmp"])
    sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    archs = os.environ.get("KDFAST_CUDA_ARCHS", "80;90")
    nvcc = ["-O3", "--use_fast_math", "-lineinfo"]
    for a in archs.split(";"):
        nvcc += [f"-gencode=arch=compute_{a},code=sm_{a}"]
    return cpp_extension.CUDAExtension("kdfast._C", sources,
                                       extra_compile_args={"cxx": cxx + ["-DKDFAST_WITH_CUDA"],
                                                           "nvcc": nvcc + ["-DKDFAST_WITH_CUDA"]},
                                       extra_link_args=["-fopenmp"])


setup(
    name="kdfast",
    version="0.1.0",
    description="Fast fused knowledge-distillation losses for PyTorch (CPU and CUDA kernels)",
    packages=find_packages(include=["kdfast", "kdfast.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],  # the losses need nothing else
    extras_require={"train": requirements("requirements-train.txt"),
                    "llm": requirements("requirements-llm.txt"),  # python -m kdfast llm-demo
                    "parquet": requirements("requirements-parquet.txt"),  # topk-import of .parquet datasets
                    "test": requirements("requirements-dev.txt")},
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
