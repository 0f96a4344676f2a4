// Depthwise k x k convolution (stride 1) on NHWC float32 for XLA's CPU backend, as FFI handlers.
//
// DepthwiseForward: y[n,h,w,c] = sum_{i,j} pad(x)[n,h+i,w+j,c] * kernel[i,j,c], where pad(x) has
//   pad_lo zero rows/columns before and k-1-pad_lo after. The input gradient is the same call on
//   the cotangent with the flipped kernel and mirrored padding.
// DepthwiseWeightGrad: dw[i,j,c] = sum_{n,h,w} pad(x)[n,h+i,w+j,c] * g[n,h,w,c].
// DepthwiseResidualActAffine: x + act(y + bias) * scale + shift, per channel, act the identity,
//   ReLU or the exact GELU (attribute `act`, common.h's Act codes): a ConvMixer block's residual
//   depthwise layer with its inference-mode BatchNorm, in the forward kernel's output pass.
//
// Work is split into tasks of one block of kBlock channels for a group of images; for each image
// a task copies its slice into a zero-padded, aligned tile kBlock channels wide (so the inner
// loops have no bounds checks, every load is a whole vector and the tile's strides are
// compile-time constants) and prefetches the next image's slice while it computes. Tasks run on
// XLA's intra-op thread pool. Inner loops use GCC/Clang vector extensions: 8 float lanes,
// several independent accumulators. The constant tile width, the stores straight into y and the
// prefetch each made the kernels faster (docs/performance.md).
#include "common.h"

namespace convmixer {
namespace {

constexpr int64_t kBlock = 32;  // channels per task (4 vectors)

struct Geometry {
  int64_t n, h, w, c, k, lo;
  int64_t hp() const { return h + k - 1; }
  int64_t wp() const { return w + k - 1; }
  int64_t blocks() const { return (c + kBlock - 1) / kBlock; }
  // Channels [c0, c0 + width) of block b, and that width rounded up to whole vectors.
  int64_t c0(int64_t b) const { return b * kBlock; }
  int64_t width(int64_t b) const { return std::min(kBlock, c - b * kBlock); }
  int64_t padded(int64_t b) const { return (width(b) + kLanes - 1) / kLanes * kLanes; }
};

// Copies channels [c0, c0+width) of image `img` (H x W x C) into `tile` (hp x wp x kBlock: every
// tile is kBlock channels wide, whatever the block's width), offset by `lo` rows and columns; the
// rest of the tile stays zero.
void FillPadded(const Geometry& g, const float* img, int64_t c0, int64_t width, int64_t lo,
                float* tile) {
  for (int64_t r = 0; r < g.h; ++r) {
    for (int64_t s = 0; s < g.w; ++s) {
      std::memcpy(tile + ((r + lo) * g.wp() + s + lo) * kBlock, img + (r * g.w + s) * g.c + c0,
                  width * sizeof(float));
    }
  }
}

// Prefetches row r of image img's channels [c0, c0+width) of NHWC `a` into L2, for reading
// (kWrite 0) or writing (1): a few cache lines every C floats, which the hardware prefetchers
// miss. Called for the next image while this one computes, one row at a time.
template <int kWrite>
inline void PrefetchRow(const Geometry& g, const float* a, int64_t img, int64_t r, int64_t c0,
                        int64_t width) {
  const float* row = a + ((img * g.h + r) * g.w) * g.c + c0;
  for (int64_t s = 0; s < g.w; ++s) {
    for (int64_t e = 0; e < width; e += 64 / sizeof(float)) {
      __builtin_prefetch(row + s * g.c + e, kWrite, 2);
    }
  }
}

// WB output columns [w0, w0+WB) of row r, vector v of the block: WB independent accumulators.
// For a kernel size K > 0 known at compile time each tile column of a kernel row is loaded once
// and the row's K kernel vectors stay in registers (8 + K + 1 vector registers for WB = 8), where
// the general loop loads each column K times (docs/performance.md has the timings).
// With `pass` (the block's bias, scale and shift, cp lanes each) they become
// x + act(y + bias) * scale + shift, the residual x read from the tile.
template <int WB, int K, typename Kind>
inline void ForwardColumns(const Geometry& g, const float* tile, const float* wt, int64_t r,
                           int64_t w0, int64_t v, const float* pass, Kind act, float* out,
                           int64_t out_stride) {
  constexpr int64_t cp = kBlock;  // a compile-time stride: constant address offsets below
  v8 acc[WB];
  for (int b = 0; b < WB; ++b) acc[b] = v8{};
  for (int64_t i = 0; i < g.k; ++i) {
    const float* row = tile + ((r + i) * g.wp() + w0) * cp + v * kLanes;
    const float* kr = wt + i * g.k * cp + v * kLanes;
    if constexpr (K > 0) {
      // Each input column loaded once, the row's K kernel vectors held in registers.
      v8 kv[K];
      for (int j = 0; j < K; ++j) kv[j] = Load(kr + j * cp);
#pragma GCC unroll 16
      for (int t = 0; t < WB + K - 1; ++t) {
        v8 in = Load(row + t * cp);
#pragma GCC unroll 8
        for (int b = 0; b < WB; ++b) {
          if (t - b >= 0 && t - b < K) acc[b] += in * kv[t - b];
        }
      }
    } else {
      for (int64_t j = 0; j < g.k; ++j) {
        v8 kv = Load(kr + j * cp);
#pragma GCC unroll 8
        for (int b = 0; b < WB; ++b) acc[b] += Load(row + (b + j) * cp) * kv;
      }
    }
  }
  if (pass != nullptr) {
    const float* p = pass + v * kLanes;
    v8 bias = Load(p), scale = Load(p + cp), shift = Load(p + 2 * cp);
    const float* x = tile + ((r + g.lo) * g.wp() + w0 + g.lo) * cp + v * kLanes;
    for (int b = 0; b < WB; ++b) {
      acc[b] = Load(x + b * cp) + BiasActAffine(acc[b], bias, scale, shift, act);
    }
  }
  for (int b = 0; b < WB; ++b) StoreU(out + (w0 + b) * out_stride + v * kLanes, acc[b]);
}

// Images [first, last) of channel block `blk`, with the output pass if `pass` is set; the tiles
// are reused from image to image.
void ForwardTask(const Geometry& g, const float* x, const float* kernel, const OutputPass* pass,
                 float* y, int64_t blk, int64_t first, int64_t last) {
  // Tiles are kBlock channels wide whatever the block's width, their stride a constant.
  constexpr int64_t cp = kBlock;
  int64_t c0 = g.c0(blk), width = g.width(blk), vectors = g.padded(blk) / kLanes;
  Tile tile = ZeroTile(g.hp() * g.wp() * cp);
  Tile wt = ZeroTile(g.k * g.k * cp);
  Tile out_row = ZeroTile(g.w * cp);
  for (int64_t t = 0; t < g.k * g.k; ++t) {
    std::memcpy(wt.get() + t * cp, kernel + t * g.c + c0, width * sizeof(float));
  }
  Tile params = ZeroTile(3 * cp);  // the output pass's bias, scale and shift for this block
  if (pass != nullptr) {
    const float* sources[] = {pass->bias, pass->scale, pass->shift};
    for (int i = 0; i < 3; ++i) {
      std::memcpy(params.get() + i * cp, sources[i] + c0, width * sizeof(float));
    }
  }
  const float* block_pass = pass != nullptr ? params.get() : nullptr;
  int64_t act = pass != nullptr ? pass->act : kIdentity;
  // Whole blocks are written straight into y; a narrower last block goes through out_row.
  bool direct = width == kBlock;
  int64_t stride = direct ? g.c : cp;
  WithAct(act, [&](auto kind) {
    for (int64_t img = first; img < last; ++img) {
      FillPadded(g, x + img * g.h * g.w * g.c, c0, width, g.lo, tile.get());
      for (int64_t r = 0; r < g.h; ++r) {
        float* dst = y + ((img * g.h + r) * g.w) * g.c + c0;
        float* out = direct ? dst : out_row.get();
        for (int64_t v = 0; v < vectors; ++v) {
          int64_t w0 = 0;
          for (; w0 + 8 <= g.w; w0 += 8) {
            auto columns = [&](auto k) {
              ForwardColumns<8, decltype(k)::value>(g, tile.get(), wt.get(), r, w0, v,
                                                    block_pass, kind, out, stride);
            };
            switch (g.k) {  // kernel sizes whose kernel row fits in registers
              case 3: columns(std::integral_constant<int, 3>{}); break;
              case 5: columns(std::integral_constant<int, 5>{}); break;
              case 7: columns(std::integral_constant<int, 7>{}); break;
              default: columns(std::integral_constant<int, 0>{}); break;
            }
          }
          for (; w0 < g.w; ++w0) {
            ForwardColumns<1, 0>(g, tile.get(), wt.get(), r, w0, v, block_pass, kind, out,
                                 stride);
          }
        }
        for (int64_t s = 0; s < g.w && !direct; ++s) {
          std::memcpy(dst + s * g.c, out_row.get() + s * cp, width * sizeof(float));
        }
        if (img + 1 < last) {
          PrefetchRow<0>(g, x, img + 1, r, c0, width);
          PrefetchRow<1>(g, y, img + 1, r, c0, width);
        }
      }
    }
  });
}

// acc[(i*k+j)*kBlock + lanes of NV vectors] += sum_s tile[r+i, s+j] * grad[r, s] for one row r,
// with two accumulators per vector (2*NV independent chains).
template <int NV>
void WeightGradRow(const Geometry& g, const float* tile, const float* grad, int64_t r,
                   float* acc) {
  constexpr int64_t cp = kBlock;
  const float* gr = grad + r * g.w * cp;
  for (int64_t i = 0; i < g.k; ++i) {
    const float* xr = tile + (r + i) * g.wp() * cp;
    for (int64_t j = 0; j < g.k; ++j) {
      v8 a0[NV], a1[NV];
      for (int v = 0; v < NV; ++v) a0[v] = a1[v] = v8{};
      int64_t s = 0;
      for (; s + 2 <= g.w; s += 2) {
        for (int v = 0; v < NV; ++v) {
          a0[v] += Load(xr + (s + j) * cp + v * kLanes) * Load(gr + s * cp + v * kLanes);
          a1[v] += Load(xr + (s + 1 + j) * cp + v * kLanes) * Load(gr + (s + 1) * cp + v * kLanes);
        }
      }
      for (; s < g.w; ++s) {
        for (int v = 0; v < NV; ++v) {
          a0[v] += Load(xr + (s + j) * cp + v * kLanes) * Load(gr + s * cp + v * kLanes);
        }
      }
      float* dst = acc + (i * g.k + j) * cp;
      for (int v = 0; v < NV; ++v) Store(dst + v * kLanes, Load(dst + v * kLanes) + a0[v] + a1[v]);
    }
  }
}

void WeightGradTask(const Geometry& g, const float* x, const float* grad, int64_t groups,
                    float* partial, int64_t task) {
  int64_t grp = task / g.blocks(), blk = task % g.blocks();
  constexpr int64_t cp = kBlock;  // as in ForwardTask
  int64_t c0 = g.c0(blk), width = g.width(blk);
  int64_t per = (g.n + groups - 1) / groups;
  int64_t first = grp * per, last = std::min(g.n, first + per);
  Tile tile = ZeroTile(g.hp() * g.wp() * cp);
  Tile gt = ZeroTile(g.h * g.w * cp);
  Tile acc = ZeroTile(g.k * g.k * cp);
  for (int64_t img = first; img < last; ++img) {
    FillPadded(g, x + img * g.h * g.w * g.c, c0, width, g.lo, tile.get());
    Geometry unpadded = g;
    unpadded.k = 1;  // copy g[img] without a border
    FillPadded(unpadded, grad + img * g.h * g.w * g.c, c0, width, 0, gt.get());
    for (int64_t r = 0; r < g.h; ++r) {
      switch (g.padded(blk) / kLanes) {
        case 1: WeightGradRow<1>(g, tile.get(), gt.get(), r, acc.get()); break;
        case 2: WeightGradRow<2>(g, tile.get(), gt.get(), r, acc.get()); break;
        case 3: WeightGradRow<3>(g, tile.get(), gt.get(), r, acc.get()); break;
        default: WeightGradRow<4>(g, tile.get(), gt.get(), r, acc.get()); break;
      }
      if (img + 1 < last) {
        PrefetchRow<0>(g, x, img + 1, r, c0, width);
        PrefetchRow<0>(g, grad, img + 1, r, c0, width);
      }
    }
  }
  for (int64_t t = 0; t < g.k * g.k; ++t) {
    std::memcpy(partial + (grp * g.k * g.k + t) * g.c + c0, acc.get() + t * cp,
                width * sizeof(float));
  }
}

// Image groups such that every thread gets several (channel block, image group) tasks.
int64_t Groups(const Geometry& g, ffi::ThreadPool& pool) {
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  return std::min(g.n, std::max<int64_t>(1, (4 * threads + g.blocks() - 1) / g.blocks()));
}

ffi::Error CheckPad(int64_t k, int64_t pad_lo) {
  if (k < 1 || pad_lo < 0 || pad_lo > k - 1) {
    return ffi::Error::InvalidArgument("depthwise: need k >= 1 and 0 <= pad_lo <= k - 1");
  }
  return ffi::Error::Success();
}

ffi::Error Convolve(ffi::ThreadPool& pool, ffi::BufferR4<ffi::F32>& x,
                    ffi::BufferR3<ffi::F32>& kernel, const OutputPass* pass,
                    ffi::ResultBufferR4<ffi::F32>& y, int64_t pad_lo) {
  auto d = x.dimensions();
  auto kd = kernel.dimensions();
  Geometry g{d[0], d[1], d[2], d[3], kd[0], pad_lo};
  if (kd[1] != g.k || kd[2] != g.c) {
    return ffi::Error::InvalidArgument("depthwise: kernel must be (k, k, C)");
  }
  if (auto err = CheckPad(g.k, pad_lo); err.failure()) return err;
  const float* xp = x.typed_data();
  const float* kp = kernel.typed_data();
  float* yp = y->typed_data();
  int64_t groups = Groups(g, pool);
  int64_t per = (g.n + groups - 1) / groups;
  ParallelFor(pool, groups * g.blocks(), [&](int64_t t) {
    int64_t first = t / g.blocks() * per;
    ForwardTask(g, xp, kp, pass, yp, t % g.blocks(), first, std::min(g.n, first + per));
  });
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::BufferR4<ffi::F32> x, ffi::BufferR3<ffi::F32> kernel,
                   ffi::ResultBufferR4<ffi::F32> y, int64_t pad_lo) {
  return Convolve(pool, x, kernel, nullptr, y, pad_lo);
}

ffi::Error ResidualActAffine(ffi::ThreadPool pool, ffi::BufferR4<ffi::F32> x,
                             ffi::BufferR3<ffi::F32> kernel, ffi::BufferR1<ffi::F32> bias,
                             ffi::BufferR1<ffi::F32> scale, ffi::BufferR1<ffi::F32> shift,
                             ffi::ResultBufferR4<ffi::F32> y, int64_t pad_lo,
                             int64_t act) {
  if (auto err = CheckAct(act); err.failure()) return err;
  for (auto* v : {&bias, &scale, &shift}) {
    if (v->dimensions()[0] != x.dimensions()[3]) {
      return ffi::Error::InvalidArgument("depthwise: bias, scale and shift must have x's channels");
    }
  }
  OutputPass pass{bias.typed_data(), scale.typed_data(), shift.typed_data(), act};
  return Convolve(pool, x, kernel, &pass, y, pad_lo);
}

ffi::Error WeightGrad(ffi::ThreadPool pool, ffi::BufferR4<ffi::F32> x,
                      ffi::BufferR4<ffi::F32> grad, ffi::ResultBufferR3<ffi::F32> dw,
                      int64_t pad_lo) {
  auto d = x.dimensions();
  auto wd = dw->dimensions();
  Geometry g{d[0], d[1], d[2], d[3], wd[0], pad_lo};
  if (wd[1] != g.k || wd[2] != g.c) {
    return ffi::Error::InvalidArgument("depthwise: weight gradient must be (k, k, C)");
  }
  if (auto err = CheckPad(g.k, pad_lo); err.failure()) return err;
  // Each image group writes its own partial sum, added up below.
  int64_t groups = Groups(g, pool);
  Tile partial = ZeroTile(groups * g.k * g.k * g.c);
  const float* xp = x.typed_data();
  const float* gp = grad.typed_data();
  float* pp = partial.get();
  ParallelFor(pool, groups * g.blocks(),
              [&](int64_t t) { WeightGradTask(g, xp, gp, groups, pp, t); });
  float* out = dw->typed_data();
  int64_t size = g.k * g.k * g.c;
  std::memcpy(out, pp, size * sizeof(float));
  for (int64_t grp = 1; grp < groups; ++grp) {
    for (int64_t e = 0; e < size; ++e) out[e] += pp[grp * size + e];
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace convmixer

XLA_FFI_DEFINE_HANDLER_SYMBOL(DepthwiseForward, convmixer::Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::BufferR4<ffi::F32>>()
                                  .Arg<ffi::BufferR3<ffi::F32>>()
                                  .Ret<ffi::BufferR4<ffi::F32>>()
                                  .Attr<int64_t>("pad_lo"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DepthwiseWeightGrad, convmixer::WeightGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::BufferR4<ffi::F32>>()
                                  .Arg<ffi::BufferR4<ffi::F32>>()
                                  .Ret<ffi::BufferR3<ffi::F32>>()
                                  .Attr<int64_t>("pad_lo"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DepthwiseResidualActAffine, convmixer::ResidualActAffine,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::BufferR4<ffi::F32>>()
                                  .Arg<ffi::BufferR3<ffi::F32>>()
                                  .Arg<ffi::BufferR1<ffi::F32>>()
                                  .Arg<ffi::BufferR1<ffi::F32>>()
                                  .Arg<ffi::BufferR1<ffi::F32>>()
                                  .Ret<ffi::BufferR4<ffi::F32>>()
                                  .Attr<int64_t>("pad_lo")
                                  .Attr<int64_t>("act"));
