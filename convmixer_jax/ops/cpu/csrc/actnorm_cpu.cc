// Train-mode activation + BatchNorm (`convmixer_jax/actnorm.py`) as two CPU kernels, each two
// passes over row blocks of a (groups, rows, channels) float32 array:
//
//   forward:  a = act(y + shift); per group and channel mean and (biased) variance of a;
//             out = (a - mean) * rsqrt(var + eps) * scale + bias [+ residual]
//   backward: x_hat = (a - mean) * rstd; sums of g and g * x_hat;
//             d_y = act'(y + shift) * scale * rstd * (g - sum(g) / m - x_hat * sum(g x_hat) / m)
//             and the sum of d_y (the gradient of `shift`)
//
// XLA's CPU backend runs the same arithmetic as about six passes forward and nine backward over the
// activations. Sums are taken in float over a block of rows, then in double over blocks in a fixed
// order, so results do not depend on thread timing.
#include <cmath>
#include <vector>

#include "common.h"

namespace convmixer {
namespace {

constexpr int64_t kBlockRows = 64;

struct Shape {
  int64_t groups, rows, channels;
  int64_t blocks() const { return (rows + kBlockRows - 1) / kBlockRows; }
};

// Channels c0..c0+n-1 (n <= 8) of a row, the missing lanes zero.
template <typename N>
inline v8 LoadPart(const float* p, N n) {
  if (n == kLanes) return LoadU(p);
  v8 v{};
  for (int64_t i = 0; i < n; ++i) v[i] = p[i];
  return v;
}
template <typename N>
inline void StorePart(float* p, v8 v, N n) {
  if (n == kLanes) return StoreU(p, v);
  for (int64_t i = 0; i < n; ++i) p[i] = v[i];
}

// Calls f(c0, n) for the vectors of a row of c channels: n is the constant kLanes for whole
// vectors (so their loads and stores compile to plain vector ones), then the remainder if any.
template <typename F>
inline void ForVectors(int64_t c, const F& f) {
  int64_t c0 = 0;
  for (; c0 + kLanes <= c; c0 += kLanes) f(c0, std::integral_constant<int64_t, kLanes>{});
  if (c0 < c) f(c0, c - c0);
}

// Runs body(task, group, offset of the block's first element, rows) over every row block of
// every group on the pool; task numbers the blocks group by group.
template <typename Body>
void Blocks(ffi::ThreadPool& pool, const Shape& s, const Body& body) {
  int64_t blocks = s.blocks();
  ParallelFor(pool, s.groups * blocks, [&](int64_t t) {
    int64_t group = t / blocks, row0 = (t % blocks) * kBlockRows;
    body(t, group, (group * s.rows + row0) * s.channels, std::min(kBlockRows, s.rows - row0));
  });
}

// Runs body(group, offset, rows, partial) over every row block (as Blocks); the body writes the
// block's `width` sums per channel (double) to `partial`. Adds them per group into `totals`
// (groups x width x channels) in block order.
template <typename Body>
void BlockSums(ffi::ThreadPool& pool, const Shape& s, int64_t width, std::vector<double>& totals,
               const Body& body) {
  int64_t blocks = s.blocks(), per_block = width * s.channels;
  std::vector<double> partial(s.groups * blocks * per_block);
  Blocks(pool, s, [&](int64_t t, int64_t group, int64_t offset, int64_t rows) {
    body(group, offset, rows, partial.data() + t * per_block);
  });
  totals.assign(s.groups * per_block, 0.0);
  for (int64_t t = 0; t < s.groups * blocks; ++t) {
    double* total = totals.data() + (t / blocks) * per_block;
    for (int64_t i = 0; i < per_block; ++i) total[i] += partial[t * per_block + i];
  }
}

// n float sums (a vector's worth of slack after them), zeroed.
inline Tile Sums(int64_t n) { return ZeroTile(n + kLanes); }

ffi::Error CheckShapes(const Shape& s, std::initializer_list<int64_t> per_channel) {
  for (int64_t n : per_channel) {
    if (n != s.channels) {
      return ffi::Error::InvalidArgument("actnorm: shift, scale and bias need one per channel");
    }
  }
  if (s.rows == 0) return ffi::Error::InvalidArgument("actnorm: no rows to normalise over");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::BufferR3<ffi::F32> y, ffi::BufferR1<ffi::F32> shift,
                   ffi::BufferR1<ffi::F32> scale, ffi::BufferR1<ffi::F32> bias,
                   ffi::Buffer<ffi::F32> residual, ffi::ResultBufferR3<ffi::F32> out,
                   ffi::ResultBufferR3<ffi::F32> stats, int64_t act, float eps) {
  auto d = y.dimensions();
  Shape s{d[0], d[1], d[2]};
  if (auto err = CheckAct(act); err.failure()) return err;
  if (auto err = CheckShapes(s, {shift.dimensions()[0], scale.dimensions()[0],
                                 bias.dimensions()[0]});
      err.failure()) {
    return err;
  }
  bool has_residual = residual.element_count() != 0;
  if (has_residual && residual.element_count() != y.element_count()) {
    return ffi::Error::InvalidArgument("actnorm: the residual must have y's shape");
  }
  return WithAct(act, [&](auto kind) {
    int64_t c = s.channels;
    const float *yp = y.typed_data(), *sh = shift.typed_data();
    std::vector<double> totals;
    // Sums of a - p and (a - p)^2 with p the block's first row, so that a large mean does not
    // cancel the variance; sum a and sum a^2 follow in double.
    BlockSums(pool, s, 2, totals, [&](int64_t, int64_t offset, int64_t rows, double* partial) {
      Tile sums = Sums(3 * c);
      float *sum = sums.get(), *square = sum + c, *pivot = sum + 2 * c;
      for (int64_t r = 0; r < rows; ++r) {
        const float* row = yp + offset + r * c;
        ForVectors(c, [&](int64_t c0, auto n) {
          v8 a = Activate(LoadPart(row + c0, n) + LoadPart(sh + c0, n), kind);
          if (r == 0) StoreU(pivot + c0, a);
          v8 d = a - LoadU(pivot + c0);
          StoreU(sum + c0, LoadU(sum + c0) + d);
          StoreU(square + c0, LoadU(square + c0) + d * d);
        });
      }
      for (int64_t j = 0; j < c; ++j) {
        double p = pivot[j];
        partial[j] = sum[j] + rows * p;
        partial[c + j] = square[j] + 2 * p * sum[j] + rows * p * p;
      }
    });
    // Per group and channel: out = a * k + t.
    std::vector<float> k(s.groups * c), t(s.groups * c);
    float* st = stats->typed_data();
    for (int64_t g = 0; g < s.groups; ++g) {
      for (int64_t j = 0; j < c; ++j) {
        double mean = totals[g * 2 * c + j] / s.rows;
        double var = std::max(totals[g * 2 * c + c + j] / s.rows - mean * mean, 0.0);
        double mul = scale.typed_data()[j] / std::sqrt(var + eps);
        st[g * 2 * c + j] = static_cast<float>(mean);
        st[g * 2 * c + c + j] = static_cast<float>(var);
        k[g * c + j] = static_cast<float>(mul);
        t[g * c + j] = static_cast<float>(bias.typed_data()[j] - mean * mul);
      }
    }
    const float* res = has_residual ? residual.typed_data() : nullptr;
    float* op = out->typed_data();
    Blocks(pool, s, [&](int64_t, int64_t g, int64_t offset, int64_t rows) {
      for (int64_t r = 0; r < rows; ++r) {
        int64_t at = offset + r * c;
        ForVectors(c, [&](int64_t c0, auto n) {
          v8 a = Activate(LoadPart(yp + at + c0, n) + LoadPart(sh + c0, n), kind);
          v8 v = a * LoadPart(&k[g * c + c0], n) + LoadPart(&t[g * c + c0], n);
          if (res != nullptr) v += LoadPart(res + at + c0, n);
          StorePart(op + at + c0, v, n);
        });
      }
    });
    return ffi::Error::Success();
  });
}

// stats: (groups, 2, channels) mean and rstd of the forward pass. sums: (groups, 3, channels)
// sum of d_y, sum of g * x_hat, sum of g (the gradients of shift, scale and bias per group).
ffi::Error Backward(ffi::ThreadPool pool, ffi::BufferR3<ffi::F32> y, ffi::BufferR3<ffi::F32> g,
                    ffi::BufferR1<ffi::F32> shift, ffi::BufferR1<ffi::F32> scale,
                    ffi::BufferR3<ffi::F32> stats, ffi::ResultBufferR3<ffi::F32> dy,
                    ffi::ResultBufferR3<ffi::F32> sums, int64_t act) {
  auto d = y.dimensions();
  Shape s{d[0], d[1], d[2]};
  if (auto err = CheckAct(act); err.failure()) return err;
  if (auto err = CheckShapes(s, {shift.dimensions()[0], scale.dimensions()[0]}); err.failure()) {
    return err;
  }
  if (g.element_count() != y.element_count()) {
    return ffi::Error::InvalidArgument("actnorm: the cotangent must have y's shape");
  }
  return WithAct(act, [&](auto kind) {
    int64_t c = s.channels;
    const float *yp = y.typed_data(), *gp = g.typed_data(), *sh = shift.typed_data();
    const float* st = stats.typed_data();
    std::vector<double> gx;  // per group: sum g, sum g * x_hat
    BlockSums(pool, s, 2, gx, [&](int64_t grp, int64_t offset, int64_t rows, double* partial) {
      const float *mean = st + grp * 2 * c, *rstd = mean + c;
      Tile sums = Sums(2 * c);
      float* acc = sums.get();
      for (int64_t r = 0; r < rows; ++r) {
        int64_t at = offset + r * c;
        ForVectors(c, [&](int64_t c0, auto n) {
          v8 a = Activate(LoadPart(yp + at + c0, n) + LoadPart(sh + c0, n), kind);
          v8 x_hat = (a - LoadPart(mean + c0, n)) * LoadPart(rstd + c0, n);
          v8 gv = LoadPart(gp + at + c0, n);
          StoreU(acc + c0, LoadU(acc + c0) + gv);
          StoreU(acc + c + c0, LoadU(acc + c + c0) + gv * x_hat);
        });
      }
      std::copy(acc, acc + 2 * c, partial);
    });
    // d_a = A g + B a + D per group and channel, A = scale rstd, B = -A rstd sum(g x_hat) / m,
    // D = -A sum(g) / m - B mean.
    std::vector<float> ca(s.groups * c), cb(s.groups * c), cd(s.groups * c);
    for (int64_t grp = 0; grp < s.groups; ++grp) {
      for (int64_t j = 0; j < c; ++j) {
        double mean = st[grp * 2 * c + j], rstd = st[grp * 2 * c + c + j];
        double a = static_cast<double>(scale.typed_data()[j]) * rstd;
        double b = -a * rstd * gx[grp * 2 * c + c + j] / s.rows;
        ca[grp * c + j] = static_cast<float>(a);
        cb[grp * c + j] = static_cast<float>(b);
        cd[grp * c + j] = static_cast<float>(-a * gx[grp * 2 * c + j] / s.rows - b * mean);
      }
    }
    float* dp = dy->typed_data();
    std::vector<double> dshift;
    BlockSums(pool, s, 1, dshift, [&](int64_t grp, int64_t offset, int64_t rows, double* partial) {
      const float *a_ = &ca[grp * c], *b_ = &cb[grp * c], *d_ = &cd[grp * c];
      Tile sums = Sums(c);
      float* acc = sums.get();
      for (int64_t r = 0; r < rows; ++r) {
        int64_t at = offset + r * c;
        ForVectors(c, [&](int64_t c0, auto n) {
          v8 grad;
          v8 a = ActivateWithGrad(LoadPart(yp + at + c0, n) + LoadPart(sh + c0, n), kind, &grad);
          v8 da = LoadPart(a_ + c0, n) * LoadPart(gp + at + c0, n) + LoadPart(b_ + c0, n) * a +
                  LoadPart(d_ + c0, n);
          v8 v = grad * da;
          StorePart(dp + at + c0, v, n);
          StoreU(acc + c0, LoadU(acc + c0) + v);
        });
      }
      std::copy(acc, acc + c, partial);
    });
    float* out = sums->typed_data();
    for (int64_t grp = 0; grp < s.groups; ++grp) {
      for (int64_t j = 0; j < c; ++j) {
        out[grp * 3 * c + j] = static_cast<float>(dshift[grp * c + j]);
        out[grp * 3 * c + c + j] = static_cast<float>(gx[grp * 2 * c + c + j]);
        out[grp * 3 * c + 2 * c + j] = static_cast<float>(gx[grp * 2 * c + j]);
      }
    }
    return ffi::Error::Success();
  });
}

}  // namespace
}  // namespace convmixer

XLA_FFI_DEFINE_HANDLER_SYMBOL(ActNormForward, convmixer::Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::BufferR3<ffi::F32>>()
                                  .Arg<ffi::BufferR1<ffi::F32>>()
                                  .Arg<ffi::BufferR1<ffi::F32>>()
                                  .Arg<ffi::BufferR1<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::BufferR3<ffi::F32>>()
                                  .Ret<ffi::BufferR3<ffi::F32>>()
                                  .Attr<int64_t>("act")
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ActNormBackward, convmixer::Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::BufferR3<ffi::F32>>()
                                  .Arg<ffi::BufferR3<ffi::F32>>()
                                  .Arg<ffi::BufferR1<ffi::F32>>()
                                  .Arg<ffi::BufferR1<ffi::F32>>()
                                  .Arg<ffi::BufferR3<ffi::F32>>()
                                  .Ret<ffi::BufferR3<ffi::F32>>()
                                  .Ret<ffi::BufferR3<ffi::F32>>()
                                  .Attr<int64_t>("act"));
