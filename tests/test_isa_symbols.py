"""The built extension runs on every x86-64 CPU: no function outside an instruction set's namespace holds an
instruction beyond the x86-64 baseline (docs/architecture.md, "One build for every x86-64 CPU").

csrc/cpu/isa/avx2.cpp and avx512.cpp raise the compiler's target. An inline function or template instantiation they
compile under a name that other files share (one of kdfast's headers, the standard library, c10) would be a copy
with AVX instructions, and the linker keeps one copy for every caller: the dispatch by CPU (csrc/cpu/dispatch.cpp)
would not protect it, and a CPU without AVX2 would die with SIGILL. Whether each ISA path is forced on this CPU
cannot show that; the disassembly of the built library does (and `make qemu-test` runs the kernels on CPU models
without AVX-512, AVX2 and AVX).

Allowed to hold such instructions: a function whose (mangled) name contains the namespace AVX2 or AVX512, that is
kdfast::cpu::AVX2 and ::AVX512 (the kernels), kdfast::AVX2 and ::AVX512 (csrc/common's math, as those files compile
it) and at::vec::AVX2 and ::AVX512 (ATen's vector classes), and everything named after them (template
instantiations over their types, lambdas of their functions, OpenMP-outlined bodies, .cold parts): only the file of
that instruction set defines such a name, so the linker cannot give it to anyone else's callers. tzcnt anywhere:
its encoding is rep bsf, which a CPU without BMI runs as bsf (the same result for the non-zero inputs GCC emits it
for). A function of local binding (a static function, or a compiler's clone such as .isra.0 or .constprop.0 of a
std:: instantiation): only its own object file can call it, and only the ISA files' objects hold such instructions,
so it runs only where the dispatch chose that instruction set. Nothing else: not kdfast::cpu::DEFAULT, not plain
kdfast, std, c10 or at, not a static initialiser.
"""
import platform
import re
import shutil
import subprocess

import pytest

from kdfast import _ops

ISA_NAMESPACE = re.compile(r"(?<![0-9])(4AVX2|6AVX512)")  # a nested-name component AVX2 / AVX512, mangled
# Instructions beyond x86-64's baseline that the ISA files' targets enable: every VEX or EVEX encoding (AVX, AVX2,
# FMA, F16C, AVX-512: their mnemonics start with v, as VMX's few privileged ones also do), AVX-512 mask registers,
# (k registers, k* instructions), BMI1/BMI2, LZCNT, POPCNT and MOVBE.
VMX = {"verr", "verw", "vmcall", "vmclear", "vmfunc", "vmlaunch", "vmload", "vmmcall", "vmptrld", "vmptrst",
       "vmread", "vmresume", "vmrun", "vmsave", "vmwrite", "vmxoff", "vmxon"}
SCALAR_EXTENSIONS = {"andn", "bextr", "blsi", "blsmsk", "blsr", "bzhi", "mulx", "pdep", "pext", "rorx", "sarx",
                     "shlx", "shrx", "lzcnt", "popcnt", "movbe"}
REGISTERS = re.compile(r"%[yz]mm\d|%k[0-7]\b")
FUNCTION = re.compile(r"^[0-9a-f]+ <(.+)>:$")
INSTRUCTION = re.compile(r"^\s+[0-9a-f]+:\t(\S+)\s*(.*)$")


def beyond_baseline(mnemonic, operands):
    return ((mnemonic.startswith("v") and mnemonic not in VMX) or mnemonic.startswith("k")
            or mnemonic in SCALAR_EXTENSIONS or bool(REGISTERS.search(operands)))


def functions_beyond_baseline(library):
    """{mangled function name: sorted instructions beyond the baseline} for every function of the library."""
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", library], capture_output=True, text=True,
                             check=True).stdout
    found, name = {}, None
    for line in listing.splitlines():
        m = FUNCTION.match(line)
        if m:
            name = m.group(1)
            continue
        m = INSTRUCTION.match(line)
        if m and name and beyond_baseline(m.group(1), m.group(2)):
            found.setdefault(name, set()).add(m.group(1))
    return {n: sorted(i) for n, i in found.items()}


def local_functions(library):
    """The names of the library's functions of local binding (nm's lowercase t)."""
    listing = subprocess.run(["nm", "--defined-only", library], capture_output=True, text=True, check=True).stdout
    return {f[2] for f in (line.split() for line in listing.splitlines()) if len(f) == 3 and f[1] == "t"}


def demangle(names):
    if not shutil.which("c++filt"):
        return list(names)
    return subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                          check=True).stdout.splitlines()


@pytest.fixture(scope="module")
def extension_functions():
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"the instruction sets checked are x86-64's; this machine is {platform.machine()}")
    if not shutil.which("objdump"):
        pytest.skip("objdump (binutils) is not installed: the extension's disassembly cannot be checked")
    if not shutil.which("nm"):
        pytest.skip("nm (binutils) is not installed: the extension's symbols cannot be checked")
    return functions_beyond_baseline(_ops._C.__file__), local_functions(_ops._C.__file__)


def test_extensions_only_in_isa_namespaces(extension_functions):
    extension_functions, local = extension_functions
    leaked = sorted(n for n in extension_functions if not ISA_NAMESPACE.search(n) and n not in local)
    lines = [f"{d}: {' '.join(extension_functions[n][:8])}" for n, d in zip(leaked, demangle(leaked))]
    assert not leaked, ("functions outside the AVX2/AVX512 namespaces hold instructions beyond x86-64's baseline; "
                        "the linker may run them on any CPU (docs/architecture.md):\n" + "\n".join(lines))


def test_the_check_sees_the_isa_kernels(extension_functions):
    """The listing has the AVX2 and AVX-512 kernels with their instructions: the check above can fail."""
    extension_functions, _ = extension_functions
    names = demangle(extension_functions)
    for isa in ("AVX2", "AVX512"):
        kernels = [n for n, d in zip(extension_functions, names) if f"kdfast::cpu::{isa}::" in d]
        assert kernels, f"no kdfast::cpu::{isa} function with AVX instructions in the disassembly"
        assert any(i.startswith("vfmadd") for n in kernels for i in extension_functions[n])
    assert beyond_baseline("vfmadd132ss", "%xmm1,%xmm2,%xmm0")
    assert beyond_baseline("vzeroupper", "")
    assert beyond_baseline("shlx", "%rax,%rdx,%rcx")
    assert beyond_baseline("kmovw", "%k1,%eax")
    assert not beyond_baseline("mulss", "%xmm1,%xmm0")
    assert not beyond_baseline("tzcnt", "%eax,%eax")
    assert not beyond_baseline("verw", "(%rax)")
