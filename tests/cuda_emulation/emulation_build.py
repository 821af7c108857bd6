"""Builds the CUDA emulation (docs/cuda-emulation.md): the kernels of csrc/cuda compiled as host C++ against the
execution layer in this folder.

  python tests/cuda_emulation/emulation_build.py drivers
      the standalone driver, plain, ASan + UBSan and TSan; runs each
  extension() (from Python)
      the test-only torch ops (library kdfast_emu), built once
"""
import os
import pathlib
import shutil
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BUILD = ROOT / "build" / "cuda-emulation"
KERNELS = ["kd_div", "topk_kd", "attention", "affinity", "svd"]
WARNINGS = ["-Wall", "-Wno-unknown-pragmas", "-Wno-unused-but-set-variable", "-Wno-psabi", "-Wno-maybe-uninitialized"]
SANITIZERS = {
    "plain": [],
    "asan": ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"],
    "tsan": ["-fsanitize=thread"],
}


def cuda_include() -> str:
    """NVIDIA's headers (cuda_fp16.h, cuda_bf16.h and the runtime's types): from CUDA_HOME, or beside nvcc."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(pathlib.Path(nvcc).resolve().parents[1]))
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if c and (pathlib.Path(c) / "include" / "cuda_fp16.h").is_file():
            return str(pathlib.Path(c) / "include")
    raise RuntimeError("the CUDA emulation needs NVIDIA's host headers (cuda_fp16.h, cuda_bf16.h): install the CUDA "
                       "toolkit or set CUDA_HOME")


def flags() -> list:
    return ["-DKDFAST_CUDA_EMULATION", f"-I{HERE / 'include'}", f"-I{cuda_include()}", *WARNINGS]


def build_driver(variant: str) -> pathlib.Path:
    """Compiles each kernel file and the driver with the variant's sanitizers (make-like: only what changed)."""
    out = BUILD / variant
    out.mkdir(parents=True, exist_ok=True)
    cxx = os.environ.get("CXX", "g++")
    opt = ["-std=c++17", "-O1", "-g"] + SANITIZERS[variant]
    deps = [*HERE.glob("*.h"), *HERE.glob("include/*.h"), *(ROOT / "csrc" / "cuda").glob("*"),
            *(ROOT / "csrc" / "common").glob("*")]
    headers = max(p.stat().st_mtime for p in deps)
    objects, jobs = [], []
    for src in [*(HERE / "kernels" / f"{k}.cpp" for k in KERNELS), HERE / "driver.cpp"]:
        obj = out / (src.stem + ".o")
        if not obj.exists() or obj.stat().st_mtime < max(headers, src.stat().st_mtime):
            jobs.append([cxx, *flags(), *opt, "-c", str(src), "-o", str(obj)])
        objects.append(str(obj))
    parallel = int(os.environ.get("JOBS", "2"))
    for i in range(0, len(jobs), parallel):
        procs = [subprocess.Popen(cmd) for cmd in jobs[i:i + parallel]]
        if any(p.wait() != 0 for p in procs):
            raise SystemExit(f"cuda emulation: compiling the {variant} driver failed")
    exe = out / "driver"
    subprocess.run([cxx, *opt, *objects, "-o", str(exe), "-pthread"], check=True)
    return exe


def run_drivers() -> None:
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1",
               TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1")
    for variant in SANITIZERS:
        exe = build_driver(variant)
        args = ["--quick"] if variant == "tsan" else []
        print(f"== cuda emulation driver ({variant})", flush=True)
        subprocess.run([str(exe), *args], check=True, env=env)


def extension():
    """The test-only torch ops: the device-independent op code (csrc/<op>.cpp) with the emulated CUDA launchers,
    registered as the library kdfast_emu (every name of the kdfast sources is renamed, so the two builds of the op
    code and their schemas coexist in one process)."""
    from torch.utils import cpp_extension

    BUILD.mkdir(parents=True, exist_ok=True)
    sources = [HERE / "ops.cpp", *(HERE / "kernels" / f"{k}.cpp" for k in KERNELS),
               *(HERE / "op_code" / f"{k}_op.cpp" for k in KERNELS)]
    return cpp_extension.load(
        name="kdfast_emu", sources=[str(s) for s in sources], build_directory=str(BUILD),
        extra_cflags=[*flags(), "-O1", "-Dkdfast=kdfast_emu", "-fvisibility=hidden", f"-I{ROOT / 'csrc'}"],
        is_python_module=False, verbose=False)


if __name__ == "__main__":
    if sys.argv[1:] == ["drivers"]:
        run_drivers()
    else:
        sys.exit(__doc__)
