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
#include <type_traits>

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

// Activations, by the code the Python side passes (native.ACTIVATIONS).
enum Act : int64_t { kIdentity = 0, kRelu = 1, kGelu = 2 };

// e^x for x in [-40, 0]: x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor series to r^7
// (relative error < 1e-8 there), 2^n put into the exponent bits.
inline v8 ExpNonPositive(v8 x) {
  typedef int32_t v8i __attribute__((vector_size(32)));
  const v8 round = v8{} + 12582912.f;  // 1.5 * 2^23: adding and subtracting it rounds to integer
  v8 n = (x * 1.44269504f + round) - round;
  v8 r = (x - n * 0.693145752f) - n * 1.42860677e-6f;  // ln 2 in two parts, the first exact
  v8 p = v8{} + 1.f / 5040;
  for (float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = p * r + c;
  v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;
  return p * (v8)bits;  // a vector cast keeps the bits
}

// The standard normal CDF Phi(y) = erfc(-y / sqrt 2) / 2, with erfc(x) for x >= 0 as
// t (a1 + t (a2 + ... + t a5)) e^(-x^2), t = 1 / (1 + p x) (Abramowitz & Stegun 7.1.26, absolute
// error < 1.5e-7), and erfc(-x) = 2 - erfc(x). `gauss` gets e^(-y^2 / 2) (for |y| < 6 sqrt 2).
inline v8 NormalCdf(v8 y, v8* gauss) {
  v8 x = (y > v8{} ? y : -y) * 0.707106781f;
  x = x < 6.f ? x : v8{} + 6.f;  // erfc(6) ~ 2e-17: beyond float
  v8 t = 1.f / (1.f + 0.3275911f * x);
  v8 q = v8{} + 1.061405429f;
  for (float c : {-1.453152027f, 1.421413741f, -0.284496736f, 0.254829592f}) q = q * t + c;
  v8 e = ExpNonPositive(-x * x);
  q = q * t * e;
  if (gauss != nullptr) *gauss = e;
  return y > v8{} ? 1.f - 0.5f * q : 0.5f * q;
}

// The exact GELU y * Phi(y).
inline v8 Gelu(v8 y) { return y * NormalCdf(y, nullptr); }

inline ffi::Error CheckAct(int64_t act) {
  if (act < kIdentity || act > kGelu) {
    return ffi::Error::InvalidArgument("act must be 0 (identity), 1 (ReLU) or 2 (GELU)");
  }
  return ffi::Error::Success();
}

inline v8 Activate(v8 v, int64_t act) {
  if (act == kRelu) return v > v8{} ? v : v8{};
  if (act == kGelu) return Gelu(v);
  return v;
}
inline float Activate(float v, int64_t act) {
  v8 lanes = v8{} + v;  // the vector form, so every column gets the same function
  return Activate(lanes, act)[0];
}

// Returns f(a) with `a` the constant std::integral_constant of `act`, so that the Activate calls
// in f compile without the branch on the activation (the act + BatchNorm kernels, GELU, jitted
// forward and backward on 1 x 32768 x 256: 26.8 ms, against 31.0 ms with the branch).
template <typename F>
inline auto WithAct(int64_t act, const F& f) {
  if (act == kRelu) return f(std::integral_constant<int64_t, kRelu>{});
  if (act == kGelu) return f(std::integral_constant<int64_t, kGelu>{});
  return f(std::integral_constant<int64_t, kIdentity>{});
}

// act(v) and its derivative act'(v); GELU's is Phi(v) + v e^(-v^2 / 2) / sqrt(2 pi).
inline v8 ActivateWithGrad(v8 v, int64_t act, v8* grad) {
  if (act == kRelu) {
    *grad = v > v8{} ? v8{} + 1.f : v8{};
    return v > v8{} ? v : v8{};
  }
  if (act == kGelu) {
    v8 gauss;
    v8 cdf = NormalCdf(v, &gauss);
    *grad = cdf + v * gauss * 0.398942280f;
    return v * cdf;
  }
  *grad = v8{} + 1.f;
  return v;
}

// The per-channel output pass of an inference-mode ConvMixer layer: act(v + bias) * scale + shift
// (BatchNorm with its running statistics folded into scale and shift).
struct OutputPass {
  const float *bias, *scale, *shift;  // one per channel
  int64_t act;
};
inline v8 BiasActAffine(v8 v, v8 bias, v8 scale, v8 shift, int64_t act) {
  return Activate(v + bias, act) * scale + shift;
}
inline float BiasActAffine(float v, float bias, float scale, float shift, int64_t act) {
  return Activate(v + bias, act) * scale + shift;
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
