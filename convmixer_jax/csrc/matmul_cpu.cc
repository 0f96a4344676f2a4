// Float32 matrix product for XLA's CPU backend, as an FFI handler: ConvMixer's pointwise convs.
//
// Matmul: c = op(a) @ op(b), op transposing an operand where its attribute says so, with
// op(a) (M, K) and op(b) (K, N); all arrays row-major. The three products of a pointwise conv
// (x @ w, g @ w^T, x^T @ g) are all this call.
// MatmulBiasActAffine: act(a @ b + bias) * scale + shift, per column (act as in common.h): a
// pointwise conv, its activation and its inference-mode BatchNorm in one pass over the output.
//
// The usual blocked scheme, one block of kKc depth at a time: that block of op(b) is packed into
// panels of kNr columns; each task takes kMc rows of op(a) (read in place, or copied row-major
// where op(a) is a transpose) and runs a kMr x kNr register-tiled kernel (12 vector accumulators)
// over the panels, adding into c. Tasks run on XLA's intra-op thread pool. Reading a's rows in
// place rather than packing them into kMr-row panels took the 8192x768 @ 768x768 product from a
// median of 70.2 to 67.5 ms (CPU time per thread, 8 rounds, 2-core AMD EPYC VM).
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

// Panel jr of depth block [p0, p0+kc) of op(b): kc rows of kNr columns, zero past column n.
void PackB(const View& b, int64_t p0, int64_t kc, int64_t jr, int64_t n, float* dst) {
  for (int64_t p = 0; p < kc; ++p) {
    for (int64_t q = 0; q < kNr; ++q) {
      int64_t col = jr * kNr + q;
      dst[p * kNr + q] = col < n ? b.at(p0 + p, col) : 0.f;
    }
  }
}

// Rows [m0, m0+mc) x depth [p0, p0+kc) of op(a), row-major (mc x kc).
void PackA(const View& a, int64_t m0, int64_t mc, int64_t p0, int64_t kc, float* dst) {
  for (int64_t p = 0; p < kc; ++p) {
    for (int64_t r = 0; r < mc; ++r) dst[r * kc + p] = a.at(m0 + r, p0 + p);
  }
}

// c[0:rows, 0:cols] (+)= the kMr x kNr product of kMr rows of a (lda apart) and one packed b
// panel, then the output pass if `ep` is set (per column; col0 is the tile's first column in c).
template <typename Kind>
inline void Kernel(int64_t kc, const float* a, int64_t lda, const float* b, float* c, int64_t ldc,
                   int64_t rows, int64_t cols, bool first, const OutputPass* ep, Kind act,
                   int64_t col0) {
  v8 acc[kMr][2];
  for (int r = 0; r < kMr; ++r) acc[r][0] = acc[r][1] = v8{};
  const float* row[kMr];  // past the last row: the last row again, its results dropped
  for (int r = 0; r < kMr; ++r) row[r] = a + std::min<int64_t>(r, rows - 1) * lda;
  for (int64_t p = 0; p < kc; ++p) {
    v8 b0 = Load(b + p * kNr), b1 = Load(b + p * kNr + kLanes);
#pragma GCC unroll 6
    for (int r = 0; r < kMr; ++r) {
      float s = row[r][p];
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
  View av(a.typed_data(), ad[1], transpose_a), bv(b.typed_data(), bd[1], transpose_b);
  float* out = c->typed_data();
  if (k == 0) {
    for (int64_t e = 0; e < m * n; ++e) {
      int64_t q = e % n;
      out[e] = ep ? BiasActAffine(0.f, ep->bias[q], ep->scale[q], ep->shift[q], ep->act) : 0.f;
    }
    return ffi::Error::Success();
  }
  // Depth block by depth block: op(b)'s block is packed once (by all threads) and then shared by
  // every task from cache.
  int64_t panels = (n + kNr - 1) / kNr, row_blocks = (m + kMc - 1) / kMc;
  Tile packed_b = ZeroTile(kKc * panels * kNr);
  std::vector<Tile> packed_a(row_blocks);
  for (int64_t p0 = 0; p0 < k; p0 += kKc) {
    int64_t kc = std::min(kKc, k - p0);
    ParallelFor(pool, panels, [&](int64_t jr) {
      PackB(bv, p0, kc, jr, n, packed_b.get() + jr * kc * kNr);
    });
    WithAct(ep != nullptr ? ep->act : kIdentity, [&](auto kind) {
      ParallelFor(pool, row_blocks, [&](int64_t t) {
        int64_t m0 = t * kMc, mc = std::min(kMc, m - m0);
        // Rows of op(a) are read in place, or from a row-major copy where op(a) is a transpose.
        const float* ap = a.typed_data() + m0 * k + p0;
        int64_t lda = k;
        if (transpose_a) {
          if (!packed_a[t]) packed_a[t] = ZeroTile(kMc * kKc);
          PackA(av, m0, mc, p0, kc, packed_a[t].get());
          ap = packed_a[t].get();
          lda = kc;
        }
        for (int64_t jr = 0; jr < panels; ++jr) {
          const float* bp = packed_b.get() + jr * kc * kNr;
          for (int64_t ir = 0; ir < mc; ir += kMr) {
            int64_t rows = std::min(kMr, mc - ir);
            // Into L2 ahead of use: in the first panel the next tile's rows of op(a), short
            // streams from memory that the hardware prefetchers pick up late; in every panel
            // the output lines this tile writes in the next one.
            for (int64_t r = ir + kMr; jr == 0 && r < std::min(ir + 2 * kMr, mc); ++r) {
              for (int64_t e = 0; e < kc; e += 16) __builtin_prefetch(ap + r * lda + e, 0, 2);
            }
            for (int64_t r = 0; r < rows && jr + 1 < panels; ++r) {
              __builtin_prefetch(out + (m0 + ir + r) * n + (jr + 1) * kNr, 1, 2);
            }
            Kernel(kc, ap + ir * lda, lda, bp, out + (m0 + ir) * n + jr * kNr, n, rows,
                   std::min(kNr, n - jr * kNr), p0 == 0,
                   p0 + kc == k ? ep : nullptr, kind, jr * kNr);
          }
        }
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
