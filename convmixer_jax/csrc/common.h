// Shared by the CPU kernels: 8-lane float vectors (GCC/Clang vector extensions), aligned scratch
// tiles, and a parallel loop on XLA's intra-op thread pool.
#ifndef CONVMIXER_JAX_CSRC_COMMON_H_
#define CONVMIXER_JAX_CSRC_COMMON_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <new>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace convmixer {

typedef float v8 __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};
using Tile = std::unique_ptr<float[], FreeDeleter>;

// A zeroed, 32-byte aligned buffer of n floats.
inline Tile ZeroTile(int64_t n) {
  size_t bytes = ((n * sizeof(float) + 31) / 32) * 32;
  float* p = static_cast<float*>(std::aligned_alloc(32, bytes));
  if (p == nullptr) throw std::bad_alloc();
  std::memset(p, 0, bytes);
  return Tile(p);
}

inline v8 Load(const float* p) { return *reinterpret_cast<const v8*>(p); }
inline void Store(float* p, v8 v) { *reinterpret_cast<v8*>(p) = v; }
// The same for addresses that may not be 32-byte aligned.
typedef float v8u __attribute__((vector_size(32), aligned(4)));
inline v8 LoadU(const float* p) { return *reinterpret_cast<const v8u*>(p); }
inline void StoreU(float* p, v8 v) { *reinterpret_cast<v8u*>(p) = v; }

// The per-channel output pass of an inference-mode ConvMixer layer: act(v + bias) * scale + shift,
// act ReLU or the identity (BatchNorm with its running statistics folded into scale and shift).
struct OutputPass {
  const float *bias, *scale, *shift;  // one per channel
  bool relu;
};
inline v8 BiasActAffine(v8 v, v8 bias, v8 scale, v8 shift, bool relu) {
  v += bias;
  if (relu) v = v > v8{} ? v : v8{};
  return v * scale + shift;
}
inline float BiasActAffine(float v, float bias, float scale, float shift, bool relu) {
  v += bias;
  if (relu) v = std::max(v, 0.f);
  return v * scale + shift;
}

// Runs f(0..n-1) on the caller and up to pool.num_threads()-1 pool threads. Indices are claimed
// from a shared counter and the caller waits only for claimed work to finish, so a helper that
// starts late finds nothing left and returns (it never deadlocks a busy pool).
inline void ParallelFor(ffi::ThreadPool& pool, int64_t n, const std::function<void(int64_t)>& f) {
  int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, n - 1);
  if (helpers <= 0) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    int64_t n;
    std::function<void(int64_t)> f;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  state->n = n;
  state->f = f;
  auto run = [state] {
    for (int64_t i; (i = state->next.fetch_add(1)) < state->n;) {
      state->f(i);
      if (state->done.fetch_add(1) + 1 == state->n) {
        { std::lock_guard<std::mutex> lock(state->mu); }
        state->cv.notify_all();
      }
    }
  };
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(run)(run));
  run();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
}

}  // namespace convmixer

#endif  // CONVMIXER_JAX_CSRC_COMMON_H_
