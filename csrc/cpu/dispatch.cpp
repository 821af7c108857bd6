#include "dispatch.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>

namespace kdfast::cpu {

Capability best_capability() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Capability::AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Capability::AVX2;
#endif
  return Capability::Default;
}

std::string capability_name(Capability c) {
  switch (c) {
    case Capability::AVX512: return "avx512";
    case Capability::AVX2: return "avx2";
    default: return "default";
  }
}

Capability capability_from_name(const std::string& name) {
  for (Capability c : {Capability::Default, Capability::AVX2, Capability::AVX512})
    if (capability_name(c) == name) return c;
  TORCH_CHECK_VALUE(false, "kdfast: unknown CPU capability '", name, "'; expected default, avx2 or avx512");
}

static Capability initial_capability() {
  const Capability best = best_capability();
  const char* env = std::getenv("KDFAST_CPU_CAPABILITY");
  if (!env || !*env) return best;
  const Capability asked = capability_from_name(env);
  return static_cast<int>(asked) < static_cast<int>(best) ? asked : best;
}

static std::atomic<int>& current() {
  static std::atomic<int> c{static_cast<int>(initial_capability())};
  return c;
}

Capability capability() { return static_cast<Capability>(current().load(std::memory_order_relaxed)); }

void set_capability(Capability c) {
  TORCH_CHECK_VALUE(static_cast<int>(c) <= static_cast<int>(best_capability()), "kdfast: this CPU does not support ",
                    capability_name(c), " (best: ", capability_name(best_capability()), ")");
  current().store(static_cast<int>(c));
}

}  // namespace kdfast::cpu
