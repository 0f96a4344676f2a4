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

#ifdef __AVX__
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace convmixer {

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));  // the same lanes' bits, as integers
constexpr int64_t kLanes = 8;

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};
using Tile = std::unique_ptr<float[], FreeDeleter>;

// A zeroed, 64-byte (cache line) aligned buffer of n floats.
inline Tile ZeroTile(int64_t n) {
  size_t bytes = ((n * sizeof(float) + 63) / 64) * 64;
  float* p = static_cast<float*>(std::aligned_alloc(64, bytes));
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

// Stores v at p (32-byte aligned) past the caches, without first reading the line in; a plain
// store where the target has no such instruction. StreamFence() orders these stores before
// later ones (before other threads use the results).
inline void StoreStream(float* p, v8 v) {
#ifdef __AVX__
  _mm256_stream_ps(p, (__m256)v);
#else
  Store(p, v);
#endif
}
inline void StreamFence() {
#ifdef __AVX__
  _mm_sfence();
#endif
}

// Activations, by the code the Python side passes (native.ACTIVATIONS).
enum Act : int64_t { kIdentity = 0, kRelu = 1, kGelu = 2 };

// Lane-wise min and max that return b where a lane of either is NaN (one instruction on x86).
inline v8 Min(v8 a, v8 b) {
#ifdef __AVX__
  return __builtin_ia32_minps256(a, b);
#else
  return a < b ? a : b;
#endif
}
inline v8 Max(v8 a, v8 b) {
#ifdef __AVX__
  return __builtin_ia32_maxps256(a, b);
#else
  return a > b ? a : b;
#endif
}

// a * b + c in one rounding where the target has FMA (written out: GCC's tuning for AMD cores
// splits a chain of contracted multiply-adds back into multiplies and adds).
inline v8 Fma(v8 a, v8 b, v8 c) {
#ifdef __FMA__
  return (v8)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}

// Lane i of the result is table[index[i] mod 8] (one instruction with AVX2).
inline v8 Lookup(v8 table, v8i index) {
#ifdef __AVX2__
  return (v8)_mm256_permutevar8x32_ps((__m256)table, (__m256i)index);
#else
  v8 r;
  for (int i = 0; i < kLanes; ++i) r[i] = table[index[i] & 7];
  return r;
#endif
}

// e^(-a^2 / 2) for 0 <= a <= 13, as 2^u with u = -a^2 log2(e) / 2 >= -122: u = n + f with n an
// integer and |f| <= 1/2, 2^f by a degree-6 polynomial (a Chebyshev fit, relative error 2.6e-9),
// and 2^n put into the exponent bits.
inline v8 Gauss(v8 a) {
  v8 u = a * a * -0.721347520f;
  // Adding 1.5 * 2^23 rounds to an integer, which then sits in the low mantissa bits; the 127
  // there is the exponent bias, so shifting those bits into the exponent field gives 2^n.
  const v8 magic = v8{} + (12582912.f + 127.f);
  v8 k = u + magic;
  v8 f = u - (k - magic);
  v8 p = v8{} + 1.54697322e-4f;
  for (float c : {1.34004327e-3f, 9.61802527e-3f, 5.55032715e-2f, 0.240226507f, 0.693147182f, 1.f}) {
    p = p * f + c;
  }
  return p * (v8)((v8i)k << 23);  // a vector cast keeps the bits
}

// Phi(-a) = erfc(a / sqrt 2) / 2 for 0 <= a <= 13, given gauss = e^(-a^2 / 2):
// erfc(x) = t (a1 + t (a2 + ... + t a5)) e^(-x^2), t = 1 / (1 + p x) (Abramowitz & Stegun 7.1.26,
// absolute error < 1.5e-7), with p / sqrt 2 and the a_i / 2 below.
inline v8 NormalTail(v8 a, v8 gauss) {
  v8 t = 1.f / (1.f + 0.231641889f * a);
  v8 q = v8{} + 0.530702715f;
  for (float c : {-0.726576014f, 0.710706871f, -0.142248368f, 0.127414796f}) q = q * t + c;
  return q * t * gauss;
}

// |y| clamped to 13 (Phi(-13) ~ 6e-39: beyond float); NaN stays NaN.
inline v8 AbsClamped(v8 y) {
  return Min(v8{} + 13.f, (v8)((v8i)y & 0x7fffffff));
}

// The exact GELU y Phi(y) = max(y, 0) - h(|y|), h(a) = a Phi(-a): for a < 6 one degree-6
// polynomial per eighth of [0, 6), in the offset t in [0, 1) of 8a/6 from the interval's start
// (least squares on 200 Chebyshev nodes per interval, the first without a constant term so that
// GELU(0) = 0; row j of kH holds the eight intervals' t^j coefficients, which lanes pick with a
// table lookup), and 0 beyond (6 Phi(-6) < 6e-9). Error < 1.1e-7 max(1, |y|) against float64;
// NaN stays NaN, GELU(inf) = inf, GELU(-inf) = 0. The exp-based form below (Gauss, NormalTail)
// stays for the derivative; as the forward GELU it took ~25% more time per value.
inline v8 Gelu(v8 y) {
  alignas(32) static const float kH[7][8] = {
      {0.f, 0.169970527f, 0.100210778f, 0.0275050681f,
       0.00404969696f, 0.000331564428f, 1.5289359e-05f, 3.9924538e-07f},
      {0.37499702f, 0.000579762447f, -0.0955995694f, -0.0443926975f,
       -0.00895953272f, -0.000925325381f, -5.13799314e-05f, -1.56703106e-06f},
      {-0.224348828f, -0.121732108f, 0.00906915218f, 0.027344197f,
       0.0087300865f, 0.00119562889f, 8.17638502e-05f, 2.94289248e-06f},
      {-0.000350430899f, 0.0544735342f, 0.0241333954f, -0.00536813959f,
       -0.00470464304f, -0.000932152441f, -8.04587908e-05f, -3.43071588e-06f},
      {0.0220247861f, 0.00189302524f, -0.0120821903f, -0.00234854687f,
       0.00137714262f, 0.00047129154f, 5.22081791e-05f, 2.60899901e-06f},
      {-0.00134104886f, -0.00613319688f, 0.00164146558f, 0.00161566504f,
       -0.000146241684f, -0.000148304971f, -2.09813843e-05f, -1.19673859e-06f},
      {-0.00101102563f, 0.00115925726f, 0.000132054731f, -0.000305855152f,
       -1.49471434e-05f, 2.25877939e-05f, 3.95812276e-06f, 2.49280731e-07f},
  };
  v8 a = Min(v8{} + 6.f, (v8)((v8i)y & 0x7fffffff));  // NaN stays NaN
  v8 u = a * (8.f / 6.f);
  v8i interval = __builtin_convertvector(u, v8i);  // truncation: u >= 0
  v8 t = u - __builtin_convertvector(interval, v8);
  v8 h = Lookup(Load(kH[6]), interval);
  for (int j = 5; j >= 0; --j) h = Fma(h, t, Lookup(Load(kH[j]), interval));
  return Max(v8{}, y) - (a < 6.f ? h : v8{});
}

inline ffi::Error CheckAct(int64_t act) {
  if (act < kIdentity || act > kGelu) {
    return ffi::Error::InvalidArgument("act must be 0 (identity), 1 (ReLU) or 2 (GELU)");
  }
  return ffi::Error::Success();
}

inline v8 Activate(v8 v, int64_t act) {
  if (act == kRelu) return Max(v8{}, v);
  if (act == kGelu) return Gelu(v);
  return v;
}
inline float Activate(float v, int64_t act) {
  v8 lanes = v8{} + v;  // the vector form, so every column gets the same function
  return Activate(lanes, act)[0];
}

// Returns f(a) with `a` the constant std::integral_constant of `act`, so that the Activate calls
// in f compile without the branch on the activation (measurably faster: docs/performance.md).
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
    return Max(v8{}, v);
  }
  if (act == kGelu) {
    v8 a = AbsClamped(v);
    v8 gauss = Gauss(a);
    v8 tail = NormalTail(a, gauss);
    v8 cdf = v > v8{} ? 1.f - tail : tail;
    // v e^(-v^2 / 2) is 0 past the clamp, for infinite v too.
    *grad = cdf + (a < 13.f ? v * gauss : v8{}) * 0.398942280f;
    return Max(v8{}, v) - a * tail;
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
