// Helpers shared by the CPU kernel sources (qmatmul_kernels.cpp, plane_kernels.cpp): compile-time
// unrolling, the OpenMP row split, and the prefill path's panel driver and 4 x 4 dot-product
// micro-kernel over dequantized fp32 rows.
//
// Included by sources compiled once per instruction set: everything lands in that build's
// namespace pyengine::cpu::PYENGINE_ISA (anonymous inside it), so each build gets its own copy
// vectorised for its ISA.
#pragma once

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "common.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef PYENGINE_ISA
#error "PYENGINE_ISA must name the instruction-set namespace"
#endif

namespace pyengine {
namespace cpu {
namespace PYENGINE_ISA {
namespace {

// Forces inlining: for the kernels' loop bodies (the lambdas passed to unroll and the like),
// where a call would move the register-held partial sums to memory. GCC otherwise declines to
// inline the larger bodies (3-bit codes, many rows).
#define PYENGINE_INLINE __attribute__((always_inline))

// Calls f(std::integral_constant<int, J>{}) for J = 0 .. N-1, fully unrolled; f should be
// declared PYENGINE_INLINE.
template <typename F, int... Js>
PYENGINE_INLINE inline void unroll_impl(F&& f, std::integer_sequence<int, Js...>) {
  (f(std::integral_constant<int, Js>{}), ...);
}
template <int N, typename F>
PYENGINE_INLINE inline void unroll(F&& f) {
  unroll_impl(f, std::make_integer_sequence<int, N>{});
}

// Thread tid's share [lo, hi) of `total` rows, in contiguous equal slices.
inline void thread_range(int64_t total, int tid, int nthr, int64_t* lo, int64_t* hi) {
  const int64_t per = (total + nthr - 1) / nthr;
  *lo = std::min<int64_t>(total, (int64_t)tid * per);
  *hi = std::min<int64_t>(total, *lo + per);
}

// OpenMP threads for a call: the caller's num_threads, else the OpenMP default.
inline int thread_count(const MatmulProblem& a) {
#ifdef _OPENMP
  return a.num_threads > 0 ? a.num_threads : omp_get_max_threads();
#else
  (void)a;
  return 1;
#endif
}

// Weight bytes per thread below which a call uses fewer threads (one for a small layer): a
// parallel region's fork and join cost a few microseconds on a quiet machine, and far more on
// a busy one, where a worker may have to be woken or wait for a core.
constexpr int64_t kMinBytesPerThread = 64 * 1024;

// Threads for a call that reads work_bytes of weights: the call's threads, fewer for small work.
inline int threads_for(const MatmulProblem& a, int64_t work_bytes) {
  const int64_t useful = std::max<int64_t>(1, work_bytes / kMinBytesPerThread);
  return (int)std::min<int64_t>(thread_count(a), useful);
}

// Runs rows(lo, hi) over [0, a.N) (weight rows of row_bytes each). Small work runs on the
// calling thread; otherwise blocks of rows (a multiple of 4, several per thread) are handed
// out dynamically, so that on a busy machine a thread that loses its core delays only the
// block it holds while the others take the remaining ones.
template <class Rows>
void parallel_rows(const MatmulProblem& a, int64_t row_bytes, Rows rows) {
  const int nthr = threads_for(a, row_bytes * a.N);
#ifdef _OPENMP
  if (nthr > 1) {
    const int64_t per_block = std::max<int64_t>(16, a.N / (nthr * 8));
    const int64_t block = (per_block + 3) / 4 * 4;
    const int64_t blocks = (a.N + block - 1) / block;
#pragma omp parallel for num_threads(nthr) schedule(dynamic, 1)
    for (int64_t b = 0; b < blocks; ++b) rows(b * block, std::min(a.N, (b + 1) * block));
    return;
  }
#endif
  (void)nthr;
  rows((int64_t)0, a.N);
}

// 16 floats as one GCC/Clang vector: a zmm register with AVX-512, two ymm with AVX2, emulated
// by narrower operations in the generic build.
typedef float v16f __attribute__((vector_size(64)));

// ---- per-row group parameters ----------------------------------------------------------------

// Conversions of one scale / zero element to float (exact).
inline float element_to_float(float v) { return v; }
#if defined(__FLT16_MAX__)
inline float element_to_float(_Float16 v) { return (float)v; }
#endif
struct BF16 {
  uint16_t bits;
};
inline float element_to_float(BF16 v) {
  const uint32_t u = (uint32_t)v.bits << 16;  // bfloat16 is the top half of a float32
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
struct F16Bits {
  uint16_t bits;
};
inline float element_to_float(F16Bits v) { return half_to_float(v.bits); }

template <class T>
inline void group_params_typed(const T* s, const T* z, int64_t G, float value_scale,
                               float symmetric_zero, float* sf, float* bf) {
  // bf = -(z + shift) * s with shift = value_scale when the lane values carry a +1 (see
  // group_params), written as one expression per group so that the loop vectorises.
  const float shift = value_scale != 1.f ? value_scale : 0.f;
  if (z) {
    for (int64_t g = 0; g < G; ++g) {
      const float sg = element_to_float(s[g]);
      sf[g] = sg * value_scale;  // exact: value_scale is a power of two
      bf[g] = -(element_to_float(z[g]) + shift) * sg;
    }
  } else {
    const float zs = symmetric_zero + shift;
    for (int64_t g = 0; g < G; ++g) {
      const float sg = element_to_float(s[g]);
      sf[g] = sg * value_scale;
      bf[g] = -zs * sg;
    }
  }
}

// Row n's group parameters for lane values v with w = (v / value_scale - z) * s, i.e.
// w = v * sf[g] + bf[g]: sf = s * value_scale and bf = -(z + value_scale) * s (value_scale != 1:
// the lane values carry a +1, see the kernels) or -z * s. A symmetric weight (zeros == nullptr) has
// z = symmetric_zero. One fused pass per row, typed by the scale dtype. G may also be the
// groups of several rows when their scales lie back to back (a.lds == groups per row).
inline void group_params(const MatmulProblem& a, int64_t n, int64_t G, float value_scale,
                         float symmetric_zero, float* sf, float* bf) {
  const int64_t o = n * a.lds;
  switch (a.sz_dtype) {
    case kFloat32: {
      const float* z = a.zeros ? static_cast<const float*>(a.zeros) + o : nullptr;
      group_params_typed(static_cast<const float*>(a.scales) + o, z, G, value_scale,
                         symmetric_zero, sf, bf);
      break;
    }
    case kFloat16: {
#if defined(__FLT16_MAX__)
      using H = _Float16;
#else
      using H = F16Bits;
#endif
      const H* z = a.zeros ? static_cast<const H*>(a.zeros) + o : nullptr;
      group_params_typed(static_cast<const H*>(a.scales) + o, z, G, value_scale, symmetric_zero,
                         sf, bf);
      break;
    }
    default: {
      const BF16* z = a.zeros ? static_cast<const BF16*>(a.zeros) + o : nullptr;
      group_params_typed(static_cast<const BF16*>(a.scales) + o, z, G, value_scale,
                         symmetric_zero, sf, bf);
      break;
    }
  }
}

// Spreads per-group values over a row's lanes (a lane's codes lie in one group):
// out[l] = per_group[min(l / lanes_per_group, G - 1)] for l < n_lanes; lanes past the last
// group, which meet zero activations, take the last group's value.
inline void spread_over_lanes(const float* per_group, int64_t G, int64_t lanes_per_group,
                              int64_t n_lanes, float* out) {
  for (int64_t g = 0; g < G; ++g) {
    const int64_t l0 = std::min(n_lanes, g * lanes_per_group);
    const int64_t l1 = g + 1 == G ? n_lanes : std::min(n_lanes, l0 + lanes_per_group);
    std::fill(out + l0, out + l1, per_group[g]);
  }
}

// The sum of the 16 lanes of v, by halving (16 -> 8 -> 4 -> 1): a few vector adds instead of
// 15 dependent scalar ones.
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
// The sum of the 4 lanes of v, pairwise.
inline float hsum(v4f v) { return (v[0] + v[2]) + (v[1] + v[3]); }

inline float hsum(v16f v) {
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
  const v8f s8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4f s4 = __builtin_shufflevector(s8, s8, 0, 1, 2, 3) +
                 __builtin_shufflevector(s8, s8, 4, 5, 6, 7);
#else
  v8f lo, hi;
  std::memcpy(&lo, &v, sizeof(lo));
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
  const v8f s8 = lo + hi;
  v4f a, b;
  std::memcpy(&a, &s8, sizeof(a));
  std::memcpy(&b, reinterpret_cast<const char*>(&s8) + sizeof(a), sizeof(b));
  const v4f s4 = a + b;
#endif
  return hsum(s4);
}

// The sum of the 8 lanes of v (8 -> 4 -> 1).
inline float hsum(v8f v) {
  v4f a, b;
  std::memcpy(&a, &v, sizeof(a));
  std::memcpy(&b, reinterpret_cast<const char*>(&v) + sizeof(a), sizeof(b));
  return hsum(a + b);
}

// sum_i a[i] * b[i] with 16 partial sums (vectorised; the order differs from a plain loop).
inline float dot(const float* a, const float* b, int64_t len) {
  float t = 0.f;
  int64_t i = 0;
  if (len >= 16) {
    v16f acc = {};
    for (; i + 16 <= len; i += 16) {
      v16f va, vb;
      std::memcpy(&va, a + i, sizeof(va));
      std::memcpy(&vb, b + i, sizeof(vb));
      acc += va * vb;
    }
    t = hsum(acc);
  }
  for (; i < len; ++i) t += a[i] * b[i];
  return t;
}

// The epilogue of a QMatmulArgs call: out = out32 (+ bias) (+ out when accumulating), converted
// to the output dtype. out32: [M, N] fp32 products.
inline void store_result(const QMatmulArgs& a, const float* out32) {
  if (a.out_dtype == kFloat32 && (!a.bias || a.bias_dtype == kFloat32)) {
    // the same sums in the same order, vectorised: (product + bias) + out
    const float* __restrict bias = static_cast<const float*>(a.bias);
    for (int64_t m = 0; m < a.M; ++m) {
      const float* __restrict src = out32 + m * a.N;
      float* __restrict out = static_cast<float*>(a.out) + m * a.ldo;
      if (bias && a.accumulate) {
#pragma omp simd
        for (int64_t n = 0; n < a.N; ++n) out[n] = src[n] + bias[n] + out[n];
      } else if (bias) {
#pragma omp simd
        for (int64_t n = 0; n < a.N; ++n) out[n] = src[n] + bias[n];
      } else if (a.accumulate) {
#pragma omp simd
        for (int64_t n = 0; n < a.N; ++n) out[n] = src[n] + out[n];
      } else {
        std::memcpy(out, src, a.N * sizeof(float));
      }
    }
    return;
  }
  for (int64_t m = 0; m < a.M; ++m) {
    for (int64_t n = 0; n < a.N; ++n) {
      float v = out32[m * a.N + n];
      if (a.bias) v += load_as_float(a.bias, a.bias_dtype, n);
      if (a.accumulate) v += load_as_float(a.out, a.out_dtype, m * a.ldo + n);
      store_from_float(a.out, a.out_dtype, m * a.ldo + n, v);
    }
  }
}

// The arguments of a row-interleaved call (QMatmulArgs::interleave) on canonical copies of its
// rows: words, scales and zeros are filled with rows [0, N) in the plain layout; the result
// reads them (and must not outlive them).
inline QMatmulArgs deinterleaved(const QMatmulArgs& a, std::vector<uint32_t>& words,
                                 std::vector<uint8_t>& scales, std::vector<uint8_t>& zeros) {
  const int64_t R = a.interleave;
  QMatmulArgs c = a;
  c.interleave = 0;
  words.resize((size_t)(a.N * a.ldq));
  for (int64_t n = 0; n < a.N; ++n)
    for (int64_t w = 0; w < a.ldq; ++w)
      words[n * a.ldq + w] = a.qweight[(n / R) * R * a.ldq + w * R + n % R];
  if (a.bits == 3) {  // each block's split words (split3_high_bit) back to the 3-bit stream
    for (int64_t n = 0; n < a.N; ++n) {
      for (int64_t b = 0; b + 3 <= a.ldq; b += 3) {
        uint32_t* block = words.data() + n * a.ldq + b;
        uint32_t stream[3] = {0, 0, 0};
        for (int c = 0; c < 32; ++c) {
          const uint32_t code = (block[c / 16] >> (2 * (c % 16)) & 3u) |
                                (block[2] >> split3_high_bit(c) & 1u) << 2;
          for (int j = 0; j < 3; ++j)  // code c at bits [3c, 3c + 3) of the stream
            stream[(3 * c + j) / 32] |= (code >> j & 1u) << ((3 * c + j) % 32);
        }
        std::memcpy(block, stream, sizeof(stream));
      }
    }
  }
  c.qweight = words.data();
  const size_t elem = a.sz_dtype == kFloat32 ? 4 : 2;
  auto plain = [&](const void* src, std::vector<uint8_t>& dst) {
    dst.resize((size_t)(a.N * a.lds) * elem);
    const uint8_t* s = static_cast<const uint8_t*>(src);
    for (int64_t n = 0; n < a.N; ++n)
      for (int64_t g = 0; g < a.lds; ++g)
        std::memcpy(dst.data() + (n * a.lds + g) * elem,
                    s + ((n / R) * R * a.lds + g * R + n % R) * elem, elem);
    return static_cast<const void*>(dst.data());
  };
  c.scales = plain(a.scales, scales);
  if (a.zeros) c.zeros = plain(a.zeros, zeros);
  return c;
}

// ---- prefill: a panel of rows dequantized over the whole K, dot-product micro-kernel ---------
// Each kMicroM x kMicroN block of outputs is one pass over K with one vector accumulator per
// output and one horizontal sum at the end; the panel (rows x K floats) is sized to stay in the
// L2 cache. The accumulators and the operands of one step must fit the build's registers: 4 x 4
// zmm accumulators + 8 operands of 32 with AVX-512; 2 x 4 ymm (xmm in the generic build)
// accumulators + 6 operands of 16 otherwise (4 x 4 there spilled to the stack on every step).
#if defined(__AVX512F__)
typedef v16f MicroVec;
constexpr int kMicroM = 4;                     // activation rows per micro-kernel
#elif defined(__AVX2__)
typedef v8f MicroVec;
constexpr int kMicroM = 2;
#else
typedef v4f MicroVec;
constexpr int kMicroM = 2;
#endif
constexpr int kMicroN = 4;                     // weight rows per micro-kernel
constexpr int kMicroLanes = (int)(sizeof(MicroVec) / sizeof(float));
constexpr int64_t kPanelBytes = 256 * 1024;    // dequantized panel budget

inline MicroVec load_micro(const float* p) {
  MicroVec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// c[mi][ni] = sum_i x_mi[i] * w_ni[i] over len (a multiple of 16) for a kMicroM x kMicroN
// block; the accumulators are local vectors so they live in registers.
inline void micro_dot(const float* const* x, const float* const* w, int64_t len,
                      float c[kMicroM][kMicroN]) {
  MicroVec acc[kMicroM][kMicroN] = {};
  for (int64_t i = 0; i < len; i += kMicroLanes) {
    MicroVec xv[kMicroM], wv[kMicroN];
#pragma GCC unroll 4
    for (int mi = 0; mi < kMicroM; ++mi) xv[mi] = load_micro(x[mi] + i);
#pragma GCC unroll 4
    for (int ni = 0; ni < kMicroN; ++ni) wv[ni] = load_micro(w[ni] + i);
#pragma GCC unroll 4
    for (int mi = 0; mi < kMicroM; ++mi)
#pragma GCC unroll 4
      for (int ni = 0; ni < kMicroN; ++ni) acc[mi][ni] += xv[mi] * wv[ni];
  }
  for (int mi = 0; mi < kMicroM; ++mi)
    for (int ni = 0; ni < kMicroN; ++ni) c[mi][ni] = hsum(acc[mi][ni]);
}

// out32[m, n0 + r] = xp[m] . wbuf[r] for every row m < a.M of the permuted activations xp
// ([M][row_codes]) and every dequantized row r < nr of the panel wbuf ([>= nr rounded up to 4]
// [row_codes], rows past nr zero); zero_row stands in for x rows past M.
inline void panel_products(const MatmulProblem& a, const float* xp, const float* zero_row,
                           int64_t row_codes, const float* wbuf, int64_t n0, int64_t nr,
                           float* out32) {
  for (int64_t m0 = 0; m0 < a.M; m0 += kMicroM) {
    const float* xrows[kMicroM];
    for (int mi = 0; mi < kMicroM; ++mi)
      xrows[mi] = m0 + mi < a.M ? xp + (m0 + mi) * row_codes : zero_row;
    for (int64_t r0 = 0; r0 < nr; r0 += kMicroN) {
      const float* wrows[kMicroN];
      for (int ni = 0; ni < kMicroN; ++ni) wrows[ni] = wbuf + (r0 + ni) * row_codes;
      float c[kMicroM][kMicroN];
      micro_dot(xrows, wrows, row_codes, c);
      for (int mi = 0; mi < kMicroM && m0 + mi < a.M; ++mi)
        for (int ni = 0; ni < kMicroN && r0 + ni < nr; ++ni)
          out32[(m0 + mi) * a.N + n0 + r0 + ni] = c[mi][ni];
    }
  }
}

// The prefill driver: splits [0, a.N) (weight rows of row_bytes each) into panels of rows (a
// multiple of 4 that keeps a panel of row_codes floats per row within kPanelBytes, at most 32
// rows) and calls
// panel(n0, nr, panel_rows, zero_row, wbuf) for each, OpenMP-parallel over panels with one
// panel buffer (panel_rows x row_codes floats) per thread.
template <class Panel>
void run_panels(const MatmulProblem& a, int64_t row_codes, int64_t row_bytes, Panel panel) {
  const int64_t fit = kPanelBytes / (row_codes * (int64_t)sizeof(float)) / kMicroN * kMicroN;
  const int64_t panel_rows = std::max<int64_t>(kMicroN, std::min<int64_t>(32, fit));
  const int64_t panels = (a.N + panel_rows - 1) / panel_rows;
  const std::vector<float> zero_row(row_codes, 0.f);
  auto run_panel = [&](int64_t index, float* wbuf) {
    const int64_t n0 = index * panel_rows;
    panel(n0, std::min(panel_rows, a.N - n0), panel_rows, zero_row.data(), wbuf);
  };
#ifdef _OPENMP
  // the products read the panel once per row of x: the work grows with M, not only with the
  // weight's bytes (a 2-bit 576 x 576 weight is small, its product with 512 rows is not)
#pragma omp parallel num_threads(threads_for(a, row_bytes * a.N * a.M))
  {
    std::vector<float> wbuf(panel_rows * row_codes);
#pragma omp for schedule(dynamic, 1)
    for (int64_t index = 0; index < panels; ++index) run_panel(index, wbuf.data());
  }
#else
  std::vector<float> wbuf(panel_rows * row_codes);
  for (int64_t index = 0; index < panels; ++index) run_panel(index, wbuf.data());
#endif
}

}  // namespace
}  // namespace PYENGINE_ISA
}  // namespace cpu
}  // namespace pyengine
