// c10's Half and BFloat16, read by avx2.cpp and avx512.cpp before they raise the target. Their conversions are
// inline functions outside any instruction set's namespace, and Half's switch to F16C instructions where
// CPU_CAPABILITY_AVX2 or _AVX512 is defined: compiled after the target is raised, a copy the compiler does not
// inline would carry AVX instructions under a name that every other file shares, and the linker may keep that copy
// for all callers. Read here, they are compiled for the baseline instruction set as in every other file (GCC gives a
// function the target in force where it is defined). Only these: a template read here is instantiated for the
// baseline too, and std::sort or std::plus instantiated with a kernel's lambda or vector type would then call it
// instead of inlining it. See docs/architecture.md.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
