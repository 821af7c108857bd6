// The kernels for AVX2 + FMA. The extension is built with one set of flags for every file, so the target is
// raised here for this file alone (and the ISA macros defined by hand, see avx2_macros.h). What is compiled after it
// must live in this instruction set's namespaces (kdfast::cpu::AVX2, kdfast::AVX2, at::vec::AVX2) or be named after
// them; c10's conversions, which cannot, are read first (baseline.h). See docs/architecture.md.
#include "baseline.h"
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#include "avx2_macros.h"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "kernels.h"
