// The standard library, c10 and ATen headers that the kernels and ATen's vector classes use, read by avx2.cpp and
// avx512.cpp before they raise the target. Their inline functions and templates live outside any instruction set's
// namespace: compiled after the target is raised, a copy the compiler does not inline would carry AVX instructions
// under a name shared with every other file, and the linker may keep that copy for all callers. Read here, they
// are compiled for the baseline instruction set (GCC gives a function the target in force where it is defined,
// instantiations of a template included), and before CPU_CAPABILITY_AVX2 is defined, so that c10::Half converts as
// in every other file. ATen's vector headers come after the target (their code lives in at::vec::CPU_CAPABILITY).
// See docs/architecture.md.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <ostream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/NumericUtils.h>
#include <ATen/Parallel.h>
#include <ATen/native/Math.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/TypeCast.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>
