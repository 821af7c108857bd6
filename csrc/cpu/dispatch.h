// Run-time choice among the CPU kernels compiled once per instruction set (csrc/cpu/isa/*.cpp).
#pragma once

#include <string>

#include "../common/attention.h"
#include "../common/affinity.h"
#include "../common/kd_div.h"
#include "../common/svd.h"
#include "../common/topk_kd.h"

namespace kdfast::cpu {

// Every kernel entry point, as X(name, argument type). A new op adds its line here and its kernel header
// to csrc/cpu/isa/kernels.h.
#define KDFAST_CPU_KERNELS(X) \
  X(kd_forward, const KdProblem&) \
  X(kd_backward, const KdProblem&) \
  X(attention_forward, const AttentionProblem&) \
  X(attention_backward, const AttentionProblem&) \
  X(affinity_stage, const AffinityChunk&) \
  X(affinity_grad, const AffinityChunk&) \
  X(svd_forward, const SvdProblem&) \
  X(topk_kd_forward, const TopKProblem&) \
  X(topk_kd_backward, const TopKProblem&)

#define KDFAST_DECLARE(name, arg) void name(arg);
namespace DEFAULT { KDFAST_CPU_KERNELS(KDFAST_DECLARE) }
namespace AVX2 { KDFAST_CPU_KERNELS(KDFAST_DECLARE) }
namespace AVX512 { KDFAST_CPU_KERNELS(KDFAST_DECLARE) }
#undef KDFAST_DECLARE

enum class Capability : int { Default = 0, AVX2 = 1, AVX512 = 2 };

// The best instruction set this CPU supports, unless lowered by set_capability (tests use it to reach every
// path) or the environment variable KDFAST_CPU_CAPABILITY=default|avx2|avx512.
Capability capability();
Capability best_capability();
void set_capability(Capability c);  // throws if the CPU lacks it
std::string capability_name(Capability c);
Capability capability_from_name(const std::string& name);

#define KDFAST_DISPATCH(name, arg)                      \
  inline void name(arg x) {                             \
    switch (capability()) {                             \
      case Capability::AVX512: return AVX512::name(x);  \
      case Capability::AVX2: return AVX2::name(x);      \
      default: return DEFAULT::name(x);                 \
    }                                                   \
  }
KDFAST_CPU_KERNELS(KDFAST_DISPATCH)
#undef KDFAST_DISPATCH

}  // namespace kdfast::cpu
