// The tests' stand-in for NVIDIA's cuda_runtime.h: the CUDA execution layer (../emu.h) for the kernels of
// csrc/cuda compiled as host C++. NVIDIA's own headers supply the types and the half / bfloat16 arithmetic.
#pragma once

#include "../emu.h"
