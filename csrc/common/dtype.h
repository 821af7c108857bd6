// Element types the kernels read and write, and the host-device qualifier; torch-free.
#pragma once

#if defined(__CUDACC__)
#define KDFAST_HD __host__ __device__
#else
#define KDFAST_HD
#endif

// The inline functions and templates of these headers are compiled into every file that includes them, and the CPU
// kernel files (csrc/cpu/isa/) compile them for raised instruction sets. There, where CPU_CAPABILITY names the
// instruction set, they go into its own inline namespace (kdfast::AVX2, ...): otherwise the linker would keep one
// instruction set's copy for the callers of every file, and a CPU without it would crash (docs/architecture.md).
// The problem structs stay in plain kdfast, outside KDFAST_ISA_BEGIN / KDFAST_ISA_END: the kernels' entry points
// (csrc/cpu/dispatch.h) take them.
#if defined(CPU_CAPABILITY)
#define KDFAST_ISA_BEGIN inline namespace CPU_CAPABILITY {
#define KDFAST_ISA_END }
#else
#define KDFAST_ISA_BEGIN
#define KDFAST_ISA_END
#endif

namespace kdfast {

enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

}  // namespace kdfast
