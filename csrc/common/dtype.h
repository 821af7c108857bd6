// Element types the kernels read and write, and the host-device qualifier; torch-free.
#pragma once

#if defined(__CUDACC__)
#define KDFAST_HD __host__ __device__
#else
#define KDFAST_HD
#endif

namespace kdfast {

enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

}  // namespace kdfast
