// The CUDA execution layer of the tests: runs the kernels of csrc/cuda, compiled as host C++, on the CPU. A test
// harness, not part of the product (docs/cuda-emulation.md).
//
// Blocks run one after another; the threads of a block are host threads (a reused pool, one per CUDA thread),
// free-running between synchronisation points, so that ThreadSanitizer sees a missing barrier as a race:
//   - __syncthreads is a barrier of the block's threads (happens-before among them, nothing else);
//   - warp operations (__shfl*_sync, __syncwarp) are an exchange among the lanes of their mask, within 32-lane
//     warps, with mask, width and call site checked;
//   - a divergent barrier or shuffle, a lane missing from one (exited, or waiting elsewhere: every live thread of
//     the block blocked), an unaligned vector load, a launch over its limits, fails the launch with a message that
//     names the kernel. Nothing waits forever.
// Static __shared__ variables are function statics (per block, since blocks run one at a time); dynamic shared
// memory is an exactly sized buffer per block, limited as on a GPU (48 KiB unless cudaFuncSetAttribute raised it).
#pragma once

#include <cuda_runtime_api.h>  // NVIDIA's host types: dim3, uint3, uint4, cudaError_t, cudaStream_t, the enums

#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <type_traits>
#include <unordered_map>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // per block: blocks run one at a time

// The device math the kernels call unqualified, with the float overloads a GPU build has.
using std::fabs;
using std::frexp;
using std::isfinite;
using std::ldexp;
using std::sqrt;

namespace kdemu {

constexpr int kWarpSize = 32;
constexpr size_t kDefaultDynamicShared = 48 * 1024;  // without cudaFuncSetAttribute, as on every GPU since sm_70
constexpr int kMaxOptinShared = 227 * 1024;          // sm_90's per-block opt-in limit

struct Abort {};  // unwinds a kernel thread after the launch failed

inline thread_local uint3 threadIdx_, blockIdx_;
inline thread_local dim3 blockDim_, gridDim_;

class Block;
inline thread_local Block* current_block = nullptr;
inline thread_local int current_thread = 0;  // linear index in the block

// One exchange of a warp operation among the lanes of its mask.
struct Exchange {
  const char* file;
  int line;
  int kind;  // 0: __syncwarp, 1: __shfl_sync, 2: __shfl_xor_sync, 3: __shfl_down_sync, 4: __shfl_up_sync
  unsigned mask;
  int width;
  unsigned arrived = 0;
  bool done = false;
  uint64_t in[kWarpSize] = {}, out[kWarpSize] = {};
  int arg[kWarpSize] = {};
};

inline const char* kind_name(int kind) {
  static const char* names[] = {"__syncwarp", "__shfl_sync", "__shfl_xor_sync", "__shfl_down_sync", "__shfl_up_sync"};
  return names[kind];
}

struct Warp {
  std::mutex m;
  std::condition_variable cv;
  std::vector<std::shared_ptr<Exchange>> pending;
  unsigned exited = 0;
  unsigned lanes = 0;  // the lanes that exist (a last, partial warp has fewer)
};

// What a thread is waiting for, read by the deadlock check (relaxed: it must add no happens-before).
struct WaitSite {
  std::atomic<const char*> file{nullptr};
  std::atomic<int> line{0};
  std::atomic<int> kind{-1};  // -1 running, 0..4 a warp operation, 5 __syncthreads, 6 exited
};

class Block {
 public:
  Block(const char* kernel, dim3 block_idx, int threads)
      : kernel_(kernel), block_idx_(block_idx), threads_(threads), warps_((threads + kWarpSize - 1) / kWarpSize),
        sites_(threads), counts_(uint64_t(threads) << 32) {
    for (int w = 0; w < int(warps_.size()); ++w) {
      const int n = threads - w * kWarpSize < kWarpSize ? threads - w * kWarpSize : kWarpSize;
      warps_[w].lanes = n == kWarpSize ? ~0u : (1u << n) - 1;
    }
  }

  bool failed() const { return failed_.load(std::memory_order_acquire); }
  std::string message() {
    std::lock_guard<std::mutex> g(error_m_);
    return message_;
  }

  // Records the first error and wakes every waiting thread (the caller holds no lock of this block).
  void fail(const std::string& what) {
    {
      std::lock_guard<std::mutex> g(error_m_);
      if (message_.empty()) {
        std::ostringstream os;
        os << "kernel " << kernel_ << ", block (" << block_idx_.x << ", " << block_idx_.y << ", " << block_idx_.z
           << "): " << what;
        message_ = os.str();
      }
    }
    failed_.store(true, std::memory_order_release);
    wake_all();
  }

  void syncthreads(const char* file, int line) {
    std::unique_lock<std::mutex> lk(m_);
    check_failed(lk);
    if (exited_ > 0) fail_unlocked(lk, describe_thread() + " reached __syncthreads at " + site(file, line) +
                                                  " after " + std::to_string(exited_) + " thread(s) of the block exited");
    if (waiting_ == 0) {
      bar_file_ = file;
      bar_line_ = line;
    } else if (bar_line_ != line || std::strcmp(bar_file_, file) != 0) {
      fail_unlocked(lk, "divergent __syncthreads: " + describe_thread() + " at " + site(file, line) + ", " +
                                   std::to_string(waiting_) + " thread(s) wait at " + site(bar_file_, bar_line_));
    }
    if (++waiting_ == threads_) {
      waiting_ = 0;
      ++generation_;
      counts_.fetch_sub(uint64_t(threads_ - 1), std::memory_order_relaxed);
      cv_.notify_all();
      return;
    }
    const uint64_t gen = generation_;
    set_site(file, line, 5);
    counts_.fetch_add(1, std::memory_order_relaxed);
    cv_.wait(lk, [&] { return generation_ != gen || failed(); });
    set_site(nullptr, 0, -1);
    check_failed(lk);
  }

  // A warp operation of this lane: returns its result (the value of the lane it reads).
  uint64_t warp_op(int kind, unsigned mask, uint64_t value, int arg, int width, const char* file, int line) {
    const int lane = current_thread % kWarpSize;
    Warp& w = warps_[current_thread / kWarpSize];
    std::unique_lock<std::mutex> lk(w.m);
    check_failed(lk);
    const unsigned bit = 1u << lane;
    const std::string where = std::string(kind_name(kind)) + " at " + site(file, line);
    if (!(mask & bit)) fail_unlocked(lk, describe_thread() + " calls " + where + " with mask " + hex(mask) +
                                                    " that leaves out its own lane");
    if (mask & ~w.lanes) fail_unlocked(lk, describe_thread() + " calls " + where + " with mask " + hex(mask) +
                                                      " naming lanes that do not exist in its warp");
    if (kind != 0 && (width < 1 || width > kWarpSize || (width & (width - 1)) != 0))
      fail_unlocked(lk, describe_thread() + " calls " + where + " with width " + std::to_string(width) +
                                   " (a power of two up to 32)");
    if (mask & w.exited) fail_unlocked(lk, describe_thread() + " calls " + where + " with mask " + hex(mask) +
                                                      " but lane(s) " + hex(mask & w.exited) + " have exited");
    std::shared_ptr<Exchange> x;
    // The oldest pending exchange whose mask holds this lane is the one it must join next.
    for (auto& e : w.pending) {
      if (!(e->mask & bit)) continue;
      if (e->mask != mask || e->kind != kind || e->width != width || e->line != line || std::strcmp(e->file, file) != 0)
        fail_unlocked(lk, "divergent warp operation: " + describe_thread() + " calls " + where + " (mask " +
                                     hex(mask) + ", width " + std::to_string(width) + ") while lane(s) " +
                                     hex(e->arrived) + " wait in " + kind_name(e->kind) + " at " +
                                     site(e->file, e->line) + " (mask " + hex(e->mask) + ", width " +
                                     std::to_string(e->width) + ")");
      x = e;
      break;
    }
    if (!x) {
      x = std::make_shared<Exchange>();
      x->file = file;
      x->line = line;
      x->kind = kind;
      x->mask = mask;
      x->width = width;
      w.pending.push_back(x);
    }
    x->in[lane] = value;
    x->arg[lane] = arg;
    x->arrived |= bit;
    if (x->arrived == mask) {
      std::string err = resolve(*x);
      if (!err.empty()) fail_unlocked(lk, err + " in " + where);
      x->done = true;
      for (auto it = w.pending.begin(); it != w.pending.end(); ++it)
        if (*it == x) {
          w.pending.erase(it);
          break;
        }
      counts_.fetch_sub(uint64_t(__builtin_popcount(mask) - 1), std::memory_order_relaxed);
      w.cv.notify_all();
      return x->out[lane];
    }
    set_site(file, line, kind);
    counts_.fetch_add(1, std::memory_order_relaxed);
    w.cv.wait(lk, [&] { return x->done || failed(); });
    set_site(nullptr, 0, -1);
    check_failed(lk);
    return x->out[lane];
  }

  // The thread leaves the kernel (returned, or unwound after a failure).
  void exit_thread() {
    const int lane = current_thread % kWarpSize;
    Warp& w = warps_[current_thread / kWarpSize];
    std::string err;
    {
      std::lock_guard<std::mutex> g(w.m);
      w.exited |= 1u << lane;
      for (auto& e : w.pending)
        if ((e->mask >> lane) & 1u)
          err = describe_thread() + " exited while lane(s) " + hex(e->arrived) + " wait for it in " +
                kind_name(e->kind) + " at " + site(e->file, e->line) + " (mask " + hex(e->mask) + ")";
    }
    if (err.empty()) {
      std::lock_guard<std::mutex> g(m_);
      ++exited_;
      if (waiting_ > 0)
        err = describe_thread() + " exited while " + std::to_string(waiting_) + " thread(s) wait at __syncthreads at " +
              site(bar_file_, bar_line_);
    }
    sites_[current_thread].kind.store(6, std::memory_order_relaxed);
    counts_.fetch_sub(uint64_t(1) << 32, std::memory_order_relaxed);
    if (!err.empty() && !failed()) fail(err);
  }

  // Every live thread waits for an exchange or a barrier that only a live thread could complete: a deadlock.
  bool deadlocked() const {
    const uint64_t c = counts_.load(std::memory_order_relaxed);
    const uint64_t live = c >> 32, blocked = c & 0xffffffffu;
    return live > 0 && blocked == live;
  }

  std::string describe_waits() const {
    std::ostringstream os;
    os << "deadlock: every live thread waits;";
    int shown = 0;
    for (int t = 0; t < threads_ && shown < 8; ++t) {
      const int kind = sites_[t].kind.load(std::memory_order_relaxed);
      if (kind < 0 || kind == 6) continue;
      os << " thread " << t << " (warp " << t / kWarpSize << ", lane " << t % kWarpSize << ") in "
         << (kind == 5 ? "__syncthreads" : kind_name(kind)) << " at "
         << site(sites_[t].file.load(std::memory_order_relaxed), sites_[t].line.load(std::memory_order_relaxed))
         << ";";
      ++shown;
    }
    os << " (a lane missing from a warp operation, or threads at a barrier while others wait at a shuffle)";
    return os.str();
  }

 private:
  static std::string site(const char* file, int line) {
    if (!file) return "?";
    const char* slash = std::strrchr(file, '/');
    return std::string(slash ? slash + 1 : file) + ":" + std::to_string(line);
  }
  static std::string hex(unsigned v) {
    char buf[16];
    std::snprintf(buf, sizeof buf, "0x%08x", v);
    return buf;
  }
  std::string describe_thread() const {
    return "thread (" + std::to_string(threadIdx_.x) + ", " + std::to_string(threadIdx_.y) + ", " +
           std::to_string(threadIdx_.z) + ") (warp " + std::to_string(current_thread / kWarpSize) + ", lane " +
           std::to_string(current_thread % kWarpSize) + ")";
  }
  void set_site(const char* file, int line, int kind) {
    WaitSite& s = sites_[current_thread];
    s.file.store(file, std::memory_order_relaxed);
    s.line.store(line, std::memory_order_relaxed);
    s.kind.store(kind, std::memory_order_relaxed);
  }
  template <class Lock> void check_failed(Lock& lk) {
    if (failed()) {
      lk.unlock();
      throw Abort{};
    }
  }
  template <class Lock> [[noreturn]] void fail_unlocked(Lock& lk, const std::string& what) {
    lk.unlock();
    fail(what);
    throw Abort{};
  }
  void wake_all() {
    for (auto& w : warps_) {
      std::lock_guard<std::mutex> g(w.m);
      w.cv.notify_all();
    }
    std::lock_guard<std::mutex> g(m_);
    cv_.notify_all();
  }

  // The value each lane of a complete exchange reads; an error when a lane reads one outside the exchange.
  std::string resolve(Exchange& x) {
    for (int lane = 0; lane < kWarpSize; ++lane) {
      if (!((x.mask >> lane) & 1u)) continue;
      const int base = lane & ~(x.width - 1), a = x.arg[lane];
      int src = lane;
      switch (x.kind) {
        case 0: continue;
        case 1: src = base + (a & (x.width - 1)); break;
        case 2: src = lane ^ a; break;
        case 3: src = lane + a; break;
        case 4: src = lane - a; break;
      }
      if (src < base || src >= base + x.width) src = lane;  // outside the lane's segment: its own value
      if (src >= kWarpSize || !((x.mask >> src) & 1u))
        return "lane " + std::to_string(lane) + " reads lane " + std::to_string(src) + ", which is not in mask " +
               hex(x.mask);
      x.out[lane] = x.in[src];
    }
    return "";
  }

  const char* kernel_;
  dim3 block_idx_;
  int threads_;
  std::vector<Warp> warps_;
  std::vector<WaitSite> sites_;
  std::atomic<uint64_t> counts_;  // live threads << 32 | threads blocked in an incomplete barrier or exchange
  std::atomic<bool> failed_{false};
  std::mutex error_m_;
  std::string message_;
  // the barrier
  std::mutex m_;
  std::condition_variable cv_;
  int waiting_ = 0, exited_ = 0;
  uint64_t generation_ = 0;
  const char* bar_file_ = nullptr;
  int bar_line_ = 0;

 public:
  unsigned char* dynamic_shared = nullptr;
};

// Host threads that run the threads of one block at a time.
class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> g(m_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

  // Runs job(t) for t < n on n workers; calls watch() every millisecond until all have returned.
  void run(int n, const std::function<void(int)>& job, const std::function<void()>& watch) {
    std::unique_lock<std::mutex> lk(m_);
    while (int(workers_.size()) < n) {
      const int index = int(workers_.size());
      workers_.emplace_back([this, index] { work(index); });
    }
    job_ = &job;
    active_ = n;
    remaining_ = n;
    ++generation_;
    cv_.notify_all();
    while (remaining_ > 0) {
      if (!done_cv_.wait_for(lk, std::chrono::milliseconds(1), [&] { return remaining_ == 0; })) {
        lk.unlock();
        watch();
        lk.lock();
      }
    }
    job_ = nullptr;
  }

 private:
  void work(int index) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lk(m_);
    for (;;) {
      cv_.wait(lk, [&] { return stop_ || (generation_ != seen && index < active_); });
      if (stop_) return;
      seen = generation_;
      const std::function<void(int)>* job = job_;
      lk.unlock();
      (*job)(index);
      lk.lock();
      if (--remaining_ == 0) done_cv_.notify_one();
    }
  }

  std::mutex m_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* job_ = nullptr;
  int active_ = 0, remaining_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

struct Runtime {
  std::mutex launch_m;  // one launch at a time (static __shared__ storage is per kernel, not per block)
  Pool pool;
  std::mutex attr_m;
  std::unordered_map<const void*, int> max_dynamic_shared;
  std::atomic<int64_t> grid_cap{int64_t(1) << 40};
  std::mutex message_m;
  std::string message;  // the last failed launch's message
  std::atomic<int64_t> launches{0}, blocks{0};  // counts, for the drivers' summary
};
inline Runtime& runtime() {
  static Runtime r;
  return r;
}
inline thread_local cudaError_t last_error = cudaSuccess;

inline void set_error(cudaError_t err, const std::string& what) {
  last_error = err;
  std::lock_guard<std::mutex> g(runtime().message_m);
  runtime().message = what;
}

// The message of the last failed launch (what cudaGetErrorString cannot say).
inline std::string last_message() {
  std::lock_guard<std::mutex> g(runtime().message_m);
  return runtime().message;
}

// Lowers the launchers' grid limits (kdfast::cuda::grid_limit) so that tests reach their grid-stride loops.
inline void set_grid_cap(int64_t blocks) { runtime().grid_cap.store(blocks > 0 ? blocks : int64_t(1) << 40); }
inline int64_t grid_limit(int64_t limit) {
  const int64_t cap = runtime().grid_cap.load();
  return limit < cap ? limit : cap;
}

template <class T> T* dynamic_shared() { return reinterpret_cast<T*>(current_block->dynamic_shared); }

// "kdfast::cuda::{anonymous}::kd_fwd_rows<float, float, float, 4, 4>", from the compiler's name of this function.
template <auto Kernel> std::string kernel_name() {
  const std::string s = __PRETTY_FUNCTION__;
  const size_t a = s.find("Kernel = "), b = s.find_first_of(";]", a);
  return a == std::string::npos ? s : s.substr(a + 9, b - a - 9);
}

template <auto Kernel, class... Args>
void launch(dim3 grid, dim3 block, size_t smem, cudaStream_t, const Args&... args) {
  Runtime& rt = runtime();
  const std::string name = kernel_name<Kernel>();
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    std::ostringstream os;
    os << "kernel " << name << ": invalid launch configuration, grid (" << grid.x << ", " << grid.y << ", " << grid.z
       << "), block (" << block.x << ", " << block.y << ", " << block.z << ")";
    return set_error(cudaErrorInvalidConfiguration, os.str());
  }
  size_t limit = kDefaultDynamicShared;
  {
    std::lock_guard<std::mutex> g(rt.attr_m);
    auto it = rt.max_dynamic_shared.find(reinterpret_cast<const void*>(Kernel));
    if (it != rt.max_dynamic_shared.end()) limit = size_t(it->second);
  }
  if (smem > limit)
    return set_error(cudaErrorInvalidValue, "kernel " + name + ": " + std::to_string(smem) +
                                                " bytes of dynamic shared memory over its limit of " +
                                                std::to_string(limit) + " (cudaFuncSetAttribute)");
  std::lock_guard<std::mutex> g(rt.launch_m);
  ++rt.launches;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        const dim3 bidx(bx, by, bz);
        Block blk(name.c_str(), bidx, int(threads));
        std::unique_ptr<unsigned char[]> shared(new unsigned char[smem]);
        std::memset(shared.get(), 0xff, smem);  // uninitialised shared memory reads as NaN
        blk.dynamic_shared = shared.get();
        const std::function<void(int)> job = [&](int t) {
          threadIdx_ = uint3{unsigned(t % block.x), unsigned(t / block.x % block.y), unsigned(t / (block.x * block.y))};
          blockIdx_ = uint3{bx, by, bz};
          blockDim_ = block;
          gridDim_ = grid;
          current_block = &blk;
          current_thread = t;
          try {
            Kernel(args...);
          } catch (const Abort&) {
          } catch (const std::exception& e) {
            blk.fail(std::string("exception: ") + e.what());
          }
          blk.exit_thread();
          current_block = nullptr;
        };
        ++rt.blocks;
        rt.pool.run(int(threads), job, [&] {
          if (blk.deadlocked() && !blk.failed()) blk.fail(blk.describe_waits());
        });
        if (blk.failed()) return set_error(cudaErrorLaunchFailure, blk.message());
      }
}

template <class T> uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "a warp shuffle moves up to 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <class T> T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

inline Block& block_of_thread() {
  if (!current_block) {
    std::fprintf(stderr, "kdemu: a CUDA device function was called outside a kernel\n");
    std::abort();
  }
  return *current_block;
}

}  // namespace kdemu

// ---- the CUDA device API the kernels use ----

#define threadIdx (::kdemu::threadIdx_)
#define blockIdx (::kdemu::blockIdx_)
#define blockDim (::kdemu::blockDim_)
#define gridDim (::kdemu::gridDim_)

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  kdemu::block_of_thread().syncthreads(file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  kdemu::block_of_thread().warp_op(0, mask, 0, 0, kdemu::kWarpSize, file, line);
}
template <class T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32, const char* file = __builtin_FILE(),
              int line = __builtin_LINE()) {
  return kdemu::from_bits<T>(kdemu::block_of_thread().warp_op(1, mask, kdemu::to_bits(v), src, width, file, line));
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32, const char* file = __builtin_FILE(),
                  int line = __builtin_LINE()) {
  return kdemu::from_bits<T>(kdemu::block_of_thread().warp_op(2, mask, kdemu::to_bits(v), lane_mask, width, file, line));
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                   int line = __builtin_LINE()) {
  return kdemu::from_bits<T>(kdemu::block_of_thread().warp_op(3, mask, kdemu::to_bits(v), int(delta), width, file, line));
}
template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                 int line = __builtin_LINE()) {
  return kdemu::from_bits<T>(kdemu::block_of_thread().warp_op(4, mask, kdemu::to_bits(v), int(delta), width, file, line));
}

// A read-only load; a vector type must be aligned to its size, as the GPU's vector loads require.
template <class T> T __ldg(const T* p, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) {
    kdemu::block_of_thread().fail("misaligned " + std::to_string(sizeof(T)) + "-byte load by __ldg at " +
                                  std::string(file) + ":" + std::to_string(line));
    throw kdemu::Abort{};
  }
  return *p;
}

// Atomics (shared or global memory); seq_cst, as strong as any GPU scope.
#define KDEMU_ATOMIC(NAME, BUILTIN)                                                                   \
  template <class T> T NAME(T* p, T v) { return BUILTIN(p, v, __ATOMIC_SEQ_CST); }
KDEMU_ATOMIC(atomicOr, __atomic_fetch_or)
KDEMU_ATOMIC(atomicAnd, __atomic_fetch_and)
KDEMU_ATOMIC(atomicXor, __atomic_fetch_xor)
KDEMU_ATOMIC(atomicExch, __atomic_exchange_n)
#undef KDEMU_ATOMIC
template <class T> T atomicAdd(T* p, T v) {
  if constexpr (std::is_integral<T>::value) {
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
  } else {
    using Bits = std::conditional_t<sizeof(T) == 8, uint64_t, uint32_t>;
    Bits* b = reinterpret_cast<Bits*>(p);
    Bits old = __atomic_load_n(b, __ATOMIC_SEQ_CST), sum;
    do {
      sum = kdemu::from_bits<Bits>(kdemu::to_bits(kdemu::from_bits<T>(old) + v));
    } while (!__atomic_compare_exchange_n(b, &old, sum, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
    return kdemu::from_bits<T>(old);
  }
}
template <class T> T atomicMax(T* p, T v) {
  T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  while (old < v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}
template <class T> T atomicMin(T* p, T v) {
  T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  while (old > v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}
template <class T> T atomicCAS(T* p, T expected, T desired) {
  __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return expected;
}

// The runtime calls the launchers make (declared by cuda_runtime_api.h).
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = kdemu::last_error;
  kdemu::last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return kdemu::last_error; }
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    default: return "unknown error";
  }
}
template <class T> cudaError_t cudaFuncSetAttribute(T* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  if (value < 0 || value > kdemu::kMaxOptinShared) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> g(kdemu::runtime().attr_m);
  kdemu::runtime().max_dynamic_shared[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}
