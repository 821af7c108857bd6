// The kernels for AVX2 + FMA. The extension is built with one set of flags for every file, so the target is
// raised here for this file alone (and the ISA macros defined by hand, see avx2_macros.h). Everything compiled after
// it must live in this instruction set's namespaces (kdfast::cpu::AVX2, kdfast::AVX2, at::vec::AVX2), so the
// headers whose code lives elsewhere are read first (baseline.h).
#include "baseline.h"
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#include "avx2_macros.h"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "kernels.h"
