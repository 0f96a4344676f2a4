// Float32 matrix product for XLA's CPU backend, as an FFI handler: ConvMixer's pointwise convs.
//
// Matmul: c = op(a) @ op(b), op transposing an operand where its attribute says so, with
// op(a) (M, K) and op(b) (K, N); all arrays row-major. The three products of a pointwise conv
// (x @ w, g @ w^T, x^T @ g) are all this call.
// MatmulBiasActAffine: act(a @ b + bias) * scale + shift, per column (act as in common.h): a
// pointwise conv, its activation and its inference-mode BatchNorm in one pass over the output.
//
// The usual blocked scheme, one block of kKc depth at a time: that block of op(b) is packed into
// panels of kNr columns; each task takes kMc rows of op(a) (read in place, or packed into kMr-row
// panels where op(a) is a transpose) and runs a kMr x kNr register-tiled kernel (12 vector
// accumulators) over the panels, adding into c. Tasks run on XLA's intra-op thread pool. A's
// rows are read in place (faster than packing them; docs/performance.md). A product with few
// rows of op(a) over a long depth (the weight gradient x^T @ g of a pointwise conv) is cut along
// the depth instead, so that every thread has work.
#include <vector>

#include "common.h"

namespace convmixer {
namespace {

constexpr int64_t kMr = 6;    // rows of the register tile
constexpr int64_t kNr = 16;   // columns of the register tile (2 vectors)
constexpr int64_t kKc = 768;  // depth of a packed block
constexpr int64_t kMc = 96;   // rows of op(a) per task

// Element (r, s) of a row-major matrix with `cols` columns, or of its transpose.
struct View {
  const float* data;
  int64_t row_stride, col_stride;
  View(const float* d, int64_t cols, bool transpose)
      : data(d), row_stride(transpose ? 1 : cols), col_stride(transpose ? cols : 1) {}
  float at(int64_t r, int64_t s) const { return data[r * row_stride + s * col_stride]; }
};

// Rows [p0 + q0, p0 + q1) of depth block [p0, p0+kc) of op(b) into the block's panels of kNr
// columns (panel jr: kc rows of kNr at dst + jr * kc * kNr), zero past column n. Row by row, so
// that a row-major b (g in a weight gradient: many rows, from memory) is read in order.
void PackB(const View& b, int64_t p0, int64_t kc, int64_t q0, int64_t q1, int64_t n, float* dst) {
  for (int64_t q = q0; q < q1; ++q) {
    const float* src = b.data + (p0 + q) * b.row_stride;
    for (int64_t j = 0; j < n; j += kNr) {
      float* d = dst + j * kc + q * kNr;
      if (b.col_stride == 1 && j + kNr <= n) {
        std::memcpy(d, src + j, kNr * sizeof(float));
      } else {
        for (int64_t e = 0; e < kNr; ++e) d[e] = j + e < n ? b.at(p0 + q, j + e) : 0.f;
      }
    }
  }
}

// Rows [m0, m0+mc) x depth [p0, p0+kc) of op(a) = a^T (a row-major K x M: x in a weight
// gradient x^T @ g) into panels of kMr rows, each kc x kMr row-major (element (r, p) of panel i at
// dst[i * kc * kMr + p * kMr + r]), zero past row mc: a's rows are read in order.
void PackTransposedA(const float* a, int64_t m, int64_t m0, int64_t mc, int64_t p0, int64_t kc,
                     float* dst) {
  for (int64_t p = 0; p < kc; ++p) {
    const float* src = a + (p0 + p) * m + m0;
    for (int64_t ir = 0; ir < mc; ir += kMr) {
      float* d = dst + ir * kc + p * kMr;
      if (ir + kMr <= mc) {
        std::memcpy(d, src + ir, kMr * sizeof(float));
      } else {
        for (int64_t r = 0; r < kMr; ++r) d[r] = ir + r < mc ? src[ir + r] : 0.f;
      }
    }
  }
}

// c[0:rows, 0:cols] (+)= the kMr x kNr product of kMr rows of op(a) and one packed b panel,
// then the output pass if `ep` is set (per column; col0 is the tile's first column in c).
// op(a)'s element (r, p) is at a[r * lda + p], or at a[p * kMr + r] where kTransA (a panel of
// PackTransposedA).
template <bool kTransA, typename Kind>
inline void Kernel(int64_t kc, const float* a, int64_t lda, const float* b, float* c, int64_t ldc,
                   int64_t rows, int64_t cols, bool first, const OutputPass* ep, Kind act,
                   int64_t col0, bool stream) {
  v8 acc[kMr][2];
  for (int r = 0; r < kMr; ++r) acc[r][0] = acc[r][1] = v8{};
  const int64_t row_stride = kTransA ? 1 : lda, step = kTransA ? kMr : 1;
  const float* row[kMr];  // past the last row: the last row again, its results dropped
  for (int r = 0; r < kMr; ++r) row[r] = a + std::min<int64_t>(r, rows - 1) * row_stride;
  for (int64_t p = 0; p < kc; ++p) {
    v8 b0 = Load(b + p * kNr), b1 = Load(b + p * kNr + kLanes);
#pragma GCC unroll 6
    for (int r = 0; r < kMr; ++r) {
      float s = row[r][p * step];
      v8 splat = {s, s, s, s, s, s, s, s};
      acc[r][0] += splat * b0;
      acc[r][1] += splat * b1;
    }
  }
  if (rows == kMr && cols == kNr) {
    for (int r = 0; r < kMr && !first; ++r) {
      acc[r][0] += LoadU(c + r * ldc);
      acc[r][1] += LoadU(c + r * ldc + kLanes);
    }
    for (int h = 0; h < 2 && ep != nullptr; ++h) {
      int64_t col = col0 + h * kLanes;
      v8 bias = LoadU(ep->bias + col), scale = LoadU(ep->scale + col);
      v8 shift = LoadU(ep->shift + col);
      for (int r = 0; r < kMr; ++r) {
        acc[r][h] = BiasActAffine(acc[r][h], bias, scale, shift, act);
      }
    }
    if (stream) {
      for (int r = 0; r < kMr; ++r) {
        StoreStream(c + r * ldc, acc[r][0]);
        StoreStream(c + r * ldc + kLanes, acc[r][1]);
      }
      return;
    }
    for (int r = 0; r < kMr; ++r) {
      StoreU(c + r * ldc, acc[r][0]);
      StoreU(c + r * ldc + kLanes, acc[r][1]);
    }
    return;
  }
  alignas(32) float tile[kMr][kNr];
  for (int r = 0; r < kMr; ++r) {
    Store(&tile[r][0], acc[r][0]);
    Store(&tile[r][kLanes], acc[r][1]);
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* row = c + r * ldc;
    if (first) {
      std::memcpy(row, tile[r], cols * sizeof(float));
    } else {
      for (int64_t q = 0; q < cols; ++q) row[q] += tile[r][q];
    }
    for (int64_t q = 0; q < cols && ep != nullptr; ++q) {
      int64_t col = col0 + q;
      row[q] = BiasActAffine(row[q], ep->bias[col], ep->scale[col], ep->shift[col], act);
    }
  }
}

ffi::Error Product(ffi::ThreadPool& pool, ffi::BufferR2<ffi::F32>& a, ffi::BufferR2<ffi::F32>& b,
                   ffi::ResultBufferR2<ffi::F32>& c, bool transpose_a, bool transpose_b,
                   const OutputPass* ep) {
  auto ad = a.dimensions(), bd = b.dimensions();
  int64_t m = transpose_a ? ad[1] : ad[0], k = transpose_a ? ad[0] : ad[1];
  int64_t kb = transpose_b ? bd[1] : bd[0], n = transpose_b ? bd[0] : bd[1];
  auto cd = c->dimensions();
  if (kb != k || cd[0] != m || cd[1] != n) {
    return ffi::Error::InvalidArgument("matmul: operand and result shapes do not match");
  }
  View bv(b.typed_data(), bd[1], transpose_b);
  float* out = c->typed_data();
  if (k == 0) {
    for (int64_t e = 0; e < m * n; ++e) {
      int64_t q = e % n;
      out[e] = ep ? BiasActAffine(0.f, ep->bias[q], ep->scale[q], ep->shift[q], ep->act) : 0.f;
    }
    return ffi::Error::Success();
  }
  int64_t panels = (n + kNr - 1) / kNr, row_blocks = (m + kMc - 1) / kMc;
  int64_t depth_blocks = (k + kKc - 1) / kKc;
  // A fused layer over a single depth block writes each output once: its whole tiles go to
  // memory past the caches (no read of every output line before it is written).
  bool stream = ep != nullptr && depth_blocks == 1 && n % kLanes == 0 &&
                reinterpret_cast<uintptr_t>(out) % 32 == 0;
  // Rows [m0, m0+mc) of op(a) times depth block [p0, p0+kc) of op(b), packed, into cc (row m0 at
  // cc + m0 * n). op(a)'s rows are read in place, or packed into `scratch` (kMc x kKc floats)
  // where op(a) is a transpose.
  auto rows_of_block = [&](int64_t m0, int64_t mc, int64_t p0, int64_t kc, const float* packed,
                           float* scratch, float* cc, bool first, const OutputPass* pass,
                           auto kind) {
    const float* a0 = a.typed_data();
    if (transpose_a) PackTransposedA(a0, m, m0, mc, p0, kc, scratch);
    for (int64_t jr = 0; jr < panels; ++jr) {
      const float* bp = packed + jr * kc * kNr;
      for (int64_t ir = 0; ir < mc; ir += kMr) {
        int64_t rows = std::min(kMr, mc - ir), r0 = m0 + ir;
        // Into L2 ahead of use: in the first panel the next tile's rows of a, short streams
        // from memory that the hardware prefetchers pick up late; in every panel the output
        // lines this tile writes in the next one.
        int64_t ahead = transpose_a || jr > 0 ? 0 : std::min(kMr, m0 + mc - r0 - kMr);
        for (int64_t r = r0 + kMr; r < r0 + kMr + ahead; ++r) {
          for (int64_t e = 0; e < kc; e += 16) __builtin_prefetch(a0 + r * k + p0 + e, 0, 2);
        }
        for (int64_t r = 0; r < rows && jr + 1 < panels && !stream; ++r) {
          __builtin_prefetch(cc + (r0 + r) * n + (jr + 1) * kNr, 1, 2);
        }
        float* ct = cc + r0 * n + jr * kNr;
        int64_t cols = std::min(kNr, n - jr * kNr);
        if (transpose_a) {
          Kernel<true>(kc, scratch + ir * kc, kMr, bp, ct, n, rows, cols, first, pass, kind,
                       jr * kNr, stream);
        } else {
          Kernel<false>(kc, a0 + r0 * k + p0, k, bp, ct, n, rows, cols, first, pass, kind,
                        jr * kNr, stream);
        }
      }
    }
  };
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (ep == nullptr && row_blocks < 2 * threads && depth_blocks > 1) {
    // Few rows and a long depth (a weight gradient x^T @ g over many pixels): the depth is cut
    // into slices, each a task over all rows into its own partial product, summed at the end.
    int64_t per = (depth_blocks + 2 * threads - 1) / (2 * threads);  // depth blocks per slice
    int64_t slices = (depth_blocks + per - 1) / per;
    std::vector<Tile> partial(slices);  // slice 0 writes straight into c
    ParallelFor(pool, slices, [&](int64_t sl) {
      if (sl > 0) partial[sl] = ZeroTile(m * n);
      float* cc = sl > 0 ? partial[sl].get() : out;
      Tile packed = ZeroTile(kKc * panels * kNr);
      Tile scratch = transpose_a ? ZeroTile(kMc * kKc) : nullptr;
      for (int64_t d = sl * per; d < std::min(depth_blocks, (sl + 1) * per); ++d) {
        int64_t p0 = d * kKc, kc = std::min(kKc, k - p0);
        PackB(bv, p0, kc, 0, kc, n, packed.get());
        for (int64_t m0 = 0; m0 < m; m0 += kMc) {
          rows_of_block(m0, std::min(kMc, m - m0), p0, kc, packed.get(), scratch.get(), cc,
                        d == sl * per, nullptr, std::integral_constant<int64_t, kIdentity>{});
        }
      }
    });
    for (int64_t sl = 1; sl < slices; ++sl) {
      for (int64_t e = 0; e < m * n; ++e) out[e] += partial[sl][e];
    }
    return ffi::Error::Success();
  }
  // Depth block by depth block: op(b)'s block is packed once (by all threads) and then shared by
  // every task (kMc rows) from cache.
  Tile packed_b = ZeroTile(kKc * panels * kNr);
  std::vector<Tile> packed_a(transpose_a ? row_blocks : 0);  // each row block's scratch
  for (int64_t p0 = 0; p0 < k; p0 += kKc) {
    int64_t kc = std::min(kKc, k - p0);
    constexpr int64_t kPackRows = 64;  // rows of op(b) per packing task
    ParallelFor(pool, (kc + kPackRows - 1) / kPackRows, [&](int64_t t) {
      PackB(bv, p0, kc, t * kPackRows, std::min(kc, (t + 1) * kPackRows), n, packed_b.get());
    });
    WithAct(ep != nullptr ? ep->act : kIdentity, [&](auto kind) {
      ParallelFor(pool, row_blocks, [&](int64_t t) {
        if (transpose_a && !packed_a[t]) packed_a[t] = ZeroTile(kMc * kKc);
        rows_of_block(t * kMc, std::min(kMc, m - t * kMc), p0, kc, packed_b.get(),
                      transpose_a ? packed_a[t].get() : nullptr, out, p0 == 0,
                      p0 + kc == k ? ep : nullptr, kind);
        if (stream) StreamFence();
      });
    });
  }
  return ffi::Error::Success();
}

ffi::Error Matmul(ffi::ThreadPool pool, ffi::BufferR2<ffi::F32> a, ffi::BufferR2<ffi::F32> b,
                  ffi::ResultBufferR2<ffi::F32> c, bool transpose_a, bool transpose_b) {
  return Product(pool, a, b, c, transpose_a, transpose_b, nullptr);
}

ffi::Error MatmulBiasActAffine(ffi::ThreadPool pool, ffi::BufferR2<ffi::F32> a,
                               ffi::BufferR2<ffi::F32> b, ffi::BufferR1<ffi::F32> bias,
                               ffi::BufferR1<ffi::F32> scale, ffi::BufferR1<ffi::F32> shift,
                               ffi::ResultBufferR2<ffi::F32> c, int64_t act) {
  if (auto err = CheckAct(act); err.failure()) return err;
  int64_t n = b.dimensions()[1];
  for (auto* v : {&bias, &scale, &shift}) {
    if (v->dimensions()[0] != n) {
      return ffi::Error::InvalidArgument("matmul: bias, scale and shift must have b's columns");
    }
  }
  OutputPass ep{bias.typed_data(), scale.typed_data(), shift.typed_data(), act};
  return Product(pool, a, b, c, false, false, &ep);
}

}  // namespace
}  // namespace convmixer

XLA_FFI_DEFINE_HANDLER_SYMBOL(Matmul, convmixer::Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::BufferR2<ffi::F32>>()
                                  .Arg<ffi::BufferR2<ffi::F32>>()
                                  .Ret<ffi::BufferR2<ffi::F32>>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MatmulBiasActAffine, convmixer::MatmulBiasActAffine,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::BufferR2<ffi::F32>>()
                                  .Arg<ffi::BufferR2<ffi::F32>>()
                                  .Arg<ffi::BufferR1<ffi::F32>>()
                                  .Arg<ffi::BufferR1<ffi::F32>>()
                                  .Arg<ffi::BufferR1<ffi::F32>>()
                                  .Ret<ffi::BufferR2<ffi::F32>>()
                                  .Attr<int64_t>("act"));
