// Included before a csrc/<op>.cpp in the CUDA emulation's extension: keeps the op code and its schemas
// (TORCH_LIBRARY_FRAGMENT, in the renamed library kdfast_emu) and drops its CPU registration, which names the CPU
// kernels that this build does not have (the unused function it becomes is never emitted).
#pragma once

#include <torch/library.h>

#define KDEMU_CAT2(a, b) a##b
#define KDEMU_CAT(a, b) KDEMU_CAT2(a, b)
#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, k, m) \
  [[maybe_unused]] static void KDEMU_CAT(kdemu_dropped_registration_, __LINE__)(torch::Library & m)
