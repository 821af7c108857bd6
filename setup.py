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
    # -ffp-contract=off: the AVX2/AVX-512 files raise the target to FMA, and GCC would then fuse a * b + c in their
    # scalar row arithmetic (rounded once instead of twice): the same expression on two identical rows could then
    # differ from the DEFAULT path's, and identical distributions would no longer give an exact 0 (docs/guarantees.md).
    cxx = ["-O3", "-fvisibility=hidden", "-Wall", "-Wno-unknown-pragmas", "-Wno-psabi", "-Wno-maybe-uninitialized",
           "-ffp-contract=off"]
    if os.environ.get("KDFAST_OPENMP", "1") == "1":
        cxx.append("-fopenmp")
    if not want_cuda():
        return cpp_extension.CppExtension("kdfast._C", sources, extra_compile_args={"cxx": cxx},
                                          extra_link_args=["-fopenmp"])
    home = cpp_extension.CUDA_HOME or ""
    if not os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
        # torch takes CUDA_HOME from `which nvcc` when it is not set: a wrapper script in /usr/local/bin gives
        # /usr/local, whose include/ has no CUDA headers.
        raise SystemExit(f"kdfast: CUDA_HOME={home!r} has no include/cuda_runtime.h; set CUDA_HOME to the CUDA "
                         "toolkit's folder (e.g. /usr/local/cuda)")
    sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    # No --use_fast_math: the kernels that want fast exp/log call the intrinsics themselves, and the float32
    # Jacobi SVD must keep denormals (docs/gpu-check.md, "Floating-point flags", gives the reason per kernel).
    nvcc = ["-O3", "-lineinfo"] + gencode_flags(os.environ.get("KDFAST_CUDA_ARCHS") or default_cuda_archs())
    include = pip_cuda_includes()
    return cpp_extension.CUDAExtension("kdfast._C", sources,
                                       extra_compile_args={"cxx": cxx + ["-DKDFAST_WITH_CUDA"] + include,
                                                           "nvcc": nvcc + ["-DKDFAST_WITH_CUDA"] + include},
                                       extra_link_args=["-fopenmp"])


def default_cuda_archs() -> str:
    """The default architecture list: the one line of csrc/cuda/archs.txt that is not a comment."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "cuda", "archs.txt")) as fh:
        return next(line.strip() for line in fh if line.strip() and not line.startswith("#"))


def gencode_flags(archs: str) -> list:
    """nvcc flags for "80;90"-style lists: machine code for each architecture and the PTX of the last one (newer
    GPUs compile it at load; it comes out of the last one's compile, so it costs no extra compile)."""
    archs = [a.strip() for a in archs.split(";") if a.strip()]
    if not archs or not all(a.isdigit() for a in archs):
        raise ValueError(f"KDFAST_CUDA_ARCHS must be compute capabilities like '80;90', got {archs!r}")
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return flags + [f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"]


def pip_cuda_includes() -> list:
    """The CUDA math libraries' headers (cublas_v2.h, cusparse.h, cusolverDn.h: torch's CUDA headers include them)
    from the pip packages that the CUDA wheel of torch installs (site-packages/nvidia/cu*/include), for a toolkit
    installed without them. -isystem puts them after the toolkit's own headers, which keep precedence."""
    if os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "include", "cusparse.h")):
        return []
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec is not None else []
    found = sorted(d for root in roots for d in glob.glob(os.path.join(root, "cu*", "include"))
                   if os.path.exists(os.path.join(d, "cusparse.h")))
    return ["-isystem", found[-1]] if found else []


setup(
    name="kdfast",
    version="0.1.0",
    description="Fast fused knowledge-distillation losses for PyTorch (CPU and CUDA kernels)",
    packages=find_packages(include=["kdfast", "kdfast.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],  # the losses need nothing else
    extras_require={"train": requirements("requirements-train.txt"),
                    "llm": requirements("requirements-llm.txt"),  # python -m kdfast llm-demo
                    "hf": requirements("requirements-hf.txt"),  # python -m kdfast topk-build, llm-train
                    "parquet": requirements("requirements-parquet.txt"),  # topk-import of .parquet datasets
                    "test": requirements("requirements-dev.txt")},
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
