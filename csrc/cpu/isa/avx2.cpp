// The kernels for AVX2 + FMA. The extension is built with one set of flags for every file, so the target is
// raised here for this file alone; the ISA macros are defined by hand because GCC's pragma does not define
// them and ATen's vector headers (and Sleef's declarations) key on them.
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "kernels.h"
