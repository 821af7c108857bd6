// CPU kernels of the pairwise-affinity loss (see csrc/common/affinity.h): stage a chunk of normalised nodes in
// float64, and apply the normalisation's chain rule to the gradient of a chunk. Written once with
// at::vec::Vectorized and compiled once per CPU capability (csrc/cpu/isa/).
//
// Features are (B, C, n) with the nodes innermost, so a vector holds W neighbouring nodes of one channel and the
// channel loop reads rows of contiguous memory; no transposing copy. Work is split into tiles of kNodeTile nodes
// of one sample, small enough that a tile's rows of K stay in cache between the two passes over them.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>

#include "../common/affinity.h"
#include "vec_math.h"

namespace kdfast::cpu::CPU_CAPABILITY {

constexpr int64_t kNodeTile = 64;

template <class F>
inline void with_dtype(DType d, const F& f) {
  switch (d) {
    case DType::Float32: return f(float{});
    case DType::Float64: return f(double{});
    case DType::Float16: return f(c10::Half{});
    case DType::BFloat16: return f(c10::BFloat16{});
  }
}

// Runs body(sample in chunk, first node of the tile, tile length) over every tile of the chunk, in parallel.
template <class F>
inline void for_each_tile(const AffinityChunk& p, const F& body) {
  const int64_t tiles = (p.m + kNodeTile - 1) / kNodeTile;
  at::parallel_for(0, p.bb * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t j0 = (w % tiles) * kNodeTile;
      body(w / tiles, j0, std::min(kNodeTile, p.m - j0));
    }
  });
}

// k = x / max(|x|, eps) for the tile's nodes of one side; norms = |x|.
template <class T>
inline void stage_tile(const AffinityChunk& p, const AffinitySide& s, int side, int64_t b, int64_t j0, int64_t len) {
  using V = at::vec::Vectorized<double>;
  constexpr int64_t W = V::size();
  const T* x = static_cast<const T*>(s.x) + (p.b0 + b) * s.channels * p.nodes + p.i0 + j0;
  double* k = p.k + (b * p.k_rows + s.k_offset) * p.m + j0;
  V sq[kNodeTile / W];
  for (auto& v : sq) v = V(0.0);
  for (int64_t c = 0; c < s.channels; ++c) {
    double* row = k + c * p.m;
    at::vec::convert(x + c * p.nodes, row, len);
    for (int64_t j = 0; j < len; j += W) {
      const V v = V::loadu(row + j, std::min(W, len - j));
      sq[j / W] = at::vec::fmadd(v, v, sq[j / W]);
    }
  }
  alignas(64) double inv[kNodeTile];
  double* norms = p.norms + (b * 2 + side) * p.m + j0;
  for (int64_t j = 0; j < len; j += W) {
    alignas(64) double buf[W];
    sq[j / W].sqrt().store(buf);
    for (int64_t l = 0; l < std::min(W, len - j); ++l) {
      norms[j + l] = buf[l];
      inv[j + l] = inv_clamped_norm(buf[l], p.eps);
    }
  }
  for (int64_t c = 0; c < s.channels; ++c) {
    double* row = k + c * p.m;
    for (int64_t j = 0; j < len; j += W) {
      const int64_t n = std::min(W, len - j);
      (V::loadu(row + j, n) * V::loadu(inv + j, n)).store(row + j, n);
    }
  }
}

// grad = (dk - k <k, dk>) / |x| (or dk / eps where the norm was clamped) for the tile's nodes of one side.
template <class T>
inline void grad_tile(const AffinityChunk& p, const AffinitySide& s, int side, int64_t b, int64_t j0, int64_t len) {
  using V = at::vec::Vectorized<double>;
  constexpr int64_t W = V::size();
  const double* k = p.k + (b * p.k_rows + s.k_offset) * p.m + j0;
  const double* dk = p.dk + (b * p.dk_rows + s.dk_offset) * p.m + j0;
  T* g = static_cast<T*>(s.grad) + (p.b0 + b) * s.channels * p.nodes + p.i0 + j0;
  V dot[kNodeTile / W];
  for (auto& v : dot) v = V(0.0);
  for (int64_t c = 0; c < s.channels; ++c)
    for (int64_t j = 0; j < len; j += W) {
      const int64_t n = std::min(W, len - j);
      dot[j / W] = at::vec::fmadd(V::loadu(k + c * p.m + j, n), V::loadu(dk + c * p.m + j, n), dot[j / W]);
    }
  alignas(64) double inv[kNodeTile], proj_dot[kNodeTile];
  const double* norms = p.norms + (b * 2 + side) * p.m + j0;
  for (int64_t j = 0; j < len; j += W) {
    alignas(64) double buf[W];
    dot[j / W].store(buf);
    for (int64_t l = 0; l < std::min(W, len - j); ++l) {
      inv[j + l] = inv_clamped_norm(norms[j + l], p.eps);
      proj_dot[j + l] = projected(norms[j + l], p.eps) * buf[l];
    }
  }
  alignas(64) double out[kNodeTile];
  for (int64_t c = 0; c < s.channels; ++c) {
    for (int64_t j = 0; j < len; j += W) {
      const int64_t n = std::min(W, len - j);
      const V kv = V::loadu(k + c * p.m + j, n), dkv = V::loadu(dk + c * p.m + j, n);
      ((dkv - kv * V::loadu(proj_dot + j, n)) * V::loadu(inv + j, n)).store(out + j, n);
    }
    at::vec::convert(out, g + c * p.nodes, len);
  }
}

void affinity_stage(const AffinityChunk& p) {
  for_each_tile(p, [&](int64_t b, int64_t j0, int64_t len) {
    for (int side = 0; side < 2; ++side)
      with_dtype(p.side[side].dtype, [&](auto t) {
        stage_tile<decltype(t)>(p, p.side[side], side, b, j0, len);
      });
  });
}

void affinity_grad(const AffinityChunk& p) {
  for_each_tile(p, [&](int64_t b, int64_t j0, int64_t len) {
    for (int side = 0; side < 2; ++side)
      if (p.side[side].grad)
        with_dtype(p.side[side].dtype, [&](auto t) {
          grad_tile<decltype(t)>(p, p.side[side], side, b, j0, len);
        });
  });
}

}  // namespace kdfast::cpu::CPU_CAPABILITY
