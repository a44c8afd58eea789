// CPU quantized matmul kernels: out[M, N] = x[M, K] @ dequant(W)[N, K]^T (+ bias).
//
// This file is compiled once per instruction set (generic, avx2, avx512) with PYENGINE_ISA set
// to the namespace name. No intrinsics: lanes are handled 16 at a time as GCC/Clang vectors
// (VecU / VecF: a zmm register with AVX-512, two ymm with AVX2, narrower operations in the
// generic build), so every build is the same code and the decode loop's partial sums stay in
// registers.
//
// Lane order. A dot product does not care about the order of its terms, so the kernels visit the
// codes of a row in the order that makes unpacking cheap and permute x to match, once per call:
//   * 2, 4 and 8 bits: a *lane* is one 32-bit word holding c = 32 / bits codes; code j of word
//     w is k = w * c + j (docs/FORMAT.md). For a fixed j, 32 consecutive words give 32 codes with
//     one shift and one mask each.
//   * 3 bits: a lane is one 32-code block (three words); code j of block b is k = b * 32 + j.
//     The three words of 32 consecutive blocks are first split into three planes.
// A *chunk* is 32 lanes; xp[m][chunk][j][lane] = x[m][(chunk * 32 + lane) * c + j] (zero past K).
//
// Dequantization: w = (q - z) * s = q * s + b with b = -z * s, so for one group g of row n
//   sum_k x[k] * w[k] = s * sum_k x[k] * q[k] + b * sum_k x[k]
// The decode path multiplies x by the integer codes, scales per lane (each lane lies in one
// group; a chunk spanning at most 16 groups takes its 32 lane scales by permuting 16 consecutive
// group scales, Plan::scale_by_permute) and adds b * (group sum of x) per group; the prefill
// path dequantizes a panel of rows and runs a register-blocked dot-product micro-kernel over the
// permuted order (kernel_util.h).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/kernel_util.h"  // also checks that PYENGINE_ISA names the build's namespace
#include "cpu/qmatmul.h"

namespace pyengine {
namespace cpu {
namespace PYENGINE_ISA {
namespace {

constexpr int kBlockCodes = 32;  // codes per packing block; a block takes `bits` words
constexpr int kChunkLanes = 32;  // lanes per chunk (two 16-float vectors on AVX-512)

template <int BITS>
struct Layout {
  static constexpr int kLaneCodes = BITS == 3 ? kBlockCodes : 32 / BITS;  // codes per lane
  static constexpr int kLaneWords = BITS == 3 ? 3 : 1;                   // words per lane
  static constexpr int kChunkCodes = kChunkLanes * kLaneCodes;
  static constexpr int kChunkWords = kChunkLanes * kLaneWords;
  static constexpr uint32_t kMask = (1u << BITS) - 1u;
  // Lane values are 1 + q * 2^-BITS (mantissa trick, see lane_codes) for BITS <= 4.
  static constexpr bool kMantissa = BITS <= 4;
  static constexpr int kMantissaShift = 23 - BITS;  // q sits just below the exponent of 1.0f
  static constexpr float kValueScale = kMantissa ? (float)(1 << BITS) : 1.f;
};

constexpr uint32_t kOneBits = 0x3F800000u;  // 1.0f

// Geometry of one call, shared by all rows.
struct Plan {
  int64_t Kp;          // K rounded up to whole 32-code blocks
  int64_t lanes;       // lanes of a row that hold codes < Kp
  int64_t chunks;      // ceil(lanes / 32)
  int64_t chunk_codes; // codes per chunk (= 32 * lane codes)
  int64_t G;           // groups covering Kp
  std::vector<int32_t> lane_group;  // [chunks * 32] group of each lane (clamped to G - 1)
  // Lane scales by permutation (decode): when every chunk spans at most 16 groups, the scale of
  // lane h * 16 + l of chunk ch is sf[chunk_group0[ch] + lane_offset[ch * kVecs + h][l]], one
  // vector permutation of 16 consecutive group scales instead of a per-row table.
  bool scale_by_permute = false;
  std::vector<int32_t> chunk_group0;  // [chunks] group of the chunk's first lane
  std::vector<uint32_t> lane_offset;  // [chunks * 32] lane_group - chunk_group0 of its chunk
};

// The 32 words (3 bits: 96 words) of chunk `ch` of a row; the last chunk of a row is copied into
// a zero-padded buffer so no word past the row (or the tensor) is read.
template <int BITS>
inline const uint32_t* chunk_words(const uint32_t* wrow, int64_t ch, const Plan& p,
                                   uint32_t* tail) {
  using L = Layout<BITS>;
  const int64_t first = ch * kChunkLanes;
  if (first + kChunkLanes <= p.lanes) return wrow + first * L::kLaneWords;
  const int64_t n_words = (p.lanes - first) * L::kLaneWords;
  std::fill(tail, tail + L::kChunkWords, 0u);
  std::copy(wrow + first * L::kLaneWords, wrow + first * L::kLaneWords + n_words, tail);
  return tail;
}

// Splits the 3-bit chunk's interleaved words (block b = words 3b, 3b+1, 3b+2) into planes.
inline void split_planes3(const uint32_t* w, uint32_t* p0, uint32_t* p1, uint32_t* p2) {
  for (int l = 0; l < kChunkLanes; ++l) {
    p0[l] = w[3 * l];
    p1[l] = w[3 * l + 1];
    p2[l] = w[3 * l + 2];
  }
}

// The lanes of a chunk as GCC/Clang vectors of 16 (a zmm register with AVX-512, two ymm with
// AVX2, emulated by narrower operations in the generic build): kVecs of them per chunk. Written
// on vector types rather than arrays so that the decode loop keeps its partial sums in
// registers instead of storing and reloading them for every code.
typedef uint32_t VecU __attribute__((vector_size(64)));
typedef float VecF __attribute__((vector_size(64)));
constexpr int kVecLanes = 16;
constexpr int kVecs = kChunkLanes / kVecLanes;

inline VecU load_u(const uint32_t* p) {
  VecU v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline VecF load_f(const float* p) {
  VecF v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Lane values of code J of the 16 lanes [16h, 16h + 16) of a chunk. `planes` is the chunk's
// words (2/4/8 bits) or its three planes laid out back to back (3 bits). J is a compile-time
// constant so the branches disappear and every shift is an immediate.
//
// For 8 bits the value is the code q converted to float. For 2, 3 and 4 bits it is
// F = 1 + q * 2^-BITS, built by placing q in the top mantissa bits of 1.0f: one shift and one
// and-or per code, and no int-to-float conversion. The kernels fold the affine change into the
// group parameters (see row_params): q * s + b = F * (s * 2^BITS) + (b - s * 2^BITS).
template <int BITS, int J>
inline VecF lane_values(const uint32_t* planes, int h) {
  using L = Layout<BITS>;
  const int o = h * kVecLanes;
  VecU u;
  if constexpr (BITS == 3) {
    // Code J of a block is bits [3J, 3J+3) of p0 | p1 << 32 | p2 << 64: codes 10 and 21 take
    // bits from two planes.
    const VecU p0 = load_u(planes + o);
    const VecU p1 = load_u(planes + kChunkLanes + o);
    const VecU p2 = load_u(planes + 2 * kChunkLanes + o);
    VecU q;
    if constexpr (J < 10) q = (p0 >> (3 * J)) & 7u;
    else if constexpr (J == 10) q = (p0 >> 30) | ((p1 & 1u) << 2);
    else if constexpr (J < 21) q = (p1 >> (3 * J - 32)) & 7u;
    else if constexpr (J == 21) q = (p1 >> 31) | ((p2 & 3u) << 1);
    else q = (p2 >> (3 * J - 64)) & 7u;
    u = (q << L::kMantissaShift) | kOneBits;
  } else if constexpr (L::kMantissa) {
    // Move the field at bit J*BITS to bit kMantissaShift in one shift, then mask and set 1.0f.
    constexpr int from = J * BITS, to = L::kMantissaShift;
    constexpr uint32_t field = L::kMask << to;
    const VecU w = load_u(planes + o);
    VecU moved;
    if constexpr (from > to) moved = w >> (from - to);
    else moved = w << (to - from);
    u = (moved & field) | kOneBits;
  } else {
    const VecU w = load_u(planes + o);
    return __builtin_convertvector((w >> (J * BITS)) & L::kMask, VecF);
  }
  VecF f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Lane values of code J of every lane of a chunk into qv[kChunkLanes] (the prefill path's
// dequantization).
template <int BITS, int J>
inline void lane_codes(const uint32_t* planes, float* qv) {
  for (int h = 0; h < kVecs; ++h) {
    const VecF v = lane_values<BITS, J>(planes, h);
    std::memcpy(qv + h * kVecLanes, &v, sizeof(v));
  }
}

// Prepares the chunk's planes (3 bits: split; otherwise the words themselves).
template <int BITS>
inline const uint32_t* chunk_planes(const uint32_t* wrow, int64_t ch, const Plan& p,
                                    uint32_t* tail, uint32_t* planes3) {
  const uint32_t* w = chunk_words<BITS>(wrow, ch, p, tail);
  if constexpr (BITS == 3) {
    split_planes3(w, planes3, planes3 + kChunkLanes, planes3 + 2 * kChunkLanes);
    return planes3;
  } else {
    return w;
  }
}

// Row n's group parameters for lane values v (see lane_values): w = v * sf[g] + bf[g]. With
// v = q this is s and b = -z * s; with v = 1 + q * 2^-BITS it is s * 2^BITS and b - s * 2^BITS.
inline void row_params(const QMatmulArgs& a, int64_t n, int64_t G, float value_scale, float* sf,
                       float* bf) {
  group_params(a, n, G, value_scale, (float)(1 << (a.bits - 1)), sf, bf);
}

// ---- decode: M <= kDecodeMaxM, one pass over the weight, codes unpacked once per row ---------
// xp: permuted activations [MT][chunks][chunk_codes]; xsum: [MT][G] group sums of x.
template <int BITS, int MT>
void decode_rows(const QMatmulArgs& a, const Plan& p, const float* xp, const float* xsum,
                 int64_t n_begin, int64_t n_end, float* out32 /* [MT, N] */) {
  using L = Layout<BITS>;
  const int64_t lanes_per_group = a.group_size / L::kLaneCodes;  // >= 1: group % 32 == 0
  const int64_t row_lanes = p.chunks * kChunkLanes;
  // sf is padded by a vector so that the permutation's 16-scale load never leaves it.
  std::vector<float> sf(p.G + kVecLanes, 0.f), bf(p.G);
  std::vector<float> lane_scale(p.scale_by_permute ? 0 : row_lanes);
  alignas(64) uint32_t tail[L::kChunkWords];
  alignas(64) uint32_t planes3[3 * kChunkLanes];
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint32_t* wrow = a.qweight + n * a.ldq;
    row_params(a, n, p.G, L::kValueScale, sf.data(), bf.data());
    if (!p.scale_by_permute) {
      // Each lane lies in one group: spread the group scales over the row's lanes (lanes past
      // the last group meet zero activations and take the last group's scale).
      for (int64_t g = 0; g < p.G; ++g) {
        const int64_t l0 = g * lanes_per_group;
        const int64_t l1 = g + 1 == p.G ? row_lanes : std::min(row_lanes, l0 + lanes_per_group);
        std::fill(lane_scale.begin() + l0, lane_scale.begin() + l1, sf[g]);
      }
    }
    // Partial sums stay in vector registers: kChains independent FMA chains per row and lane
    // vector (two for M = 1, where there is only one row to interleave).
    constexpr int kChains = MT == 1 ? 2 : 1;
    VecF acc[MT][kVecs] = {};
    for (int64_t ch = 0; ch < p.chunks; ++ch) {
      const uint32_t* planes = chunk_planes<BITS>(wrow, ch, p, tail, planes3);
      VecF part[MT][kChains][kVecs] = {};
      const float* xc = xp + ch * p.chunk_codes;
      unroll<L::kLaneCodes>([&](auto J) {
        for (int h = 0; h < kVecs; ++h) {
          const VecF qv = lane_values<BITS, J>(planes, h);
          for (int m = 0; m < MT; ++m) {
            const float* xj = xc + m * p.chunks * p.chunk_codes + J * kChunkLanes + h * kVecLanes;
            part[m][J % kChains][h] += load_f(xj) * qv;
          }
        }
      });
      for (int h = 0; h < kVecs; ++h) {
        const VecF scale =
            p.scale_by_permute
                ? __builtin_shuffle(load_f(sf.data() + p.chunk_group0[ch]),
                                    load_u(p.lane_offset.data() + ch * kChunkLanes + h * kVecLanes))
                : load_f(lane_scale.data() + ch * kChunkLanes + h * kVecLanes);
        for (int m = 0; m < MT; ++m) {
          VecF sum = part[m][0][h];
          for (int c = 1; c < kChains; ++c) sum += part[m][c][h];
          acc[m][h] += scale * sum;
        }
      }
    }
    for (int m = 0; m < MT; ++m) {
      const float b = dot(bf.data(), xsum + m * p.G, p.G);
      VecF total = acc[m][0];
      for (int h = 1; h < kVecs; ++h) total += acc[m][h];
      float t = 0.f;
      for (int l = 0; l < kVecLanes; ++l) t += total[l];
      out32[m * a.N + n] = t + b;
    }
  }
}

template <int BITS, int MT>
void decode(const QMatmulArgs& a, const Plan& p, const float* xp, const float* xsum,
            float* out32) {
  parallel_rows(a, [&](int64_t lo, int64_t hi) {
    decode_rows<BITS, MT>(a, p, xp, xsum, lo, hi, out32);
  });
}

// ---- prefill: larger M (kernel_util.h: panels and the dot-product micro-kernel) -------------
// Rows [n0, n0 + nr) of the output: dequantize them (lane order, whole K) into wbuf, then run
// the micro-kernel over every 4-row block of x. Rows of wbuf past nr are zero.
template <int BITS>
void prefill_panel(const QMatmulArgs& a, const Plan& p, const float* xp, const float* zero_row,
                   int64_t n0, int64_t nr, int64_t panel_rows, float* wbuf, float* out32) {
  using L = Layout<BITS>;
  const int64_t row_codes = p.chunks * p.chunk_codes;
  std::vector<float> sf(p.G), bf(p.G);
  alignas(64) uint32_t tail[L::kChunkWords];
  alignas(64) uint32_t planes3[3 * kChunkLanes];
  for (int64_t r = 0; r < panel_rows; ++r) {
    float* dst = wbuf + r * row_codes;
    if (r >= nr) {
      std::fill(dst, dst + row_codes, 0.f);
      continue;
    }
    row_params(a, n0 + r, p.G, L::kValueScale, sf.data(), bf.data());
    const uint32_t* wrow = a.qweight + (n0 + r) * a.ldq;
    for (int64_t ch = 0; ch < p.chunks; ++ch) {
      const uint32_t* planes = chunk_planes<BITS>(wrow, ch, p, tail, planes3);
      const int32_t* lg = p.lane_group.data() + ch * kChunkLanes;
      alignas(64) float sl[kChunkLanes], bl[kChunkLanes];
      for (int l = 0; l < kChunkLanes; ++l) {
        sl[l] = sf[lg[l]];
        bl[l] = bf[lg[l]];
      }
      float* dch = dst + ch * p.chunk_codes;
      unroll<L::kLaneCodes>([&](auto J) {
        alignas(64) float qv[kChunkLanes];
        lane_codes<BITS, J>(planes, qv);
        for (int l = 0; l < kChunkLanes; ++l) dch[J * kChunkLanes + l] = qv[l] * sl[l] + bl[l];
      });
    }
  }
  panel_products(a, xp, zero_row, row_codes, wbuf, n0, nr, out32);
}

template <int BITS>
void prefill(const QMatmulArgs& a, const Plan& p, const float* xp, float* out32) {
  run_panels(a, p.chunks * p.chunk_codes,
             [&](int64_t n0, int64_t nr, int64_t panel_rows, const float* zero_row, float* wbuf) {
               prefill_panel<BITS>(a, p, xp, zero_row, n0, nr, panel_rows, wbuf, out32);
             });
}

template <int BITS>
void run(const QMatmulArgs& a, float* out32) {
  using L = Layout<BITS>;
  const int64_t M = a.M, K = a.K;
  Plan p;
  p.Kp = (K + kBlockCodes - 1) / kBlockCodes * kBlockCodes;
  p.lanes = p.Kp / L::kLaneCodes;
  p.chunks = (p.lanes + kChunkLanes - 1) / kChunkLanes;
  p.chunk_codes = L::kChunkCodes;
  p.G = (p.Kp + a.group_size - 1) / a.group_size;
  p.lane_group.resize(p.chunks * kChunkLanes);
  for (int64_t lane = 0; lane < (int64_t)p.lane_group.size(); ++lane)
    p.lane_group[lane] = (int32_t)std::min<int64_t>(p.G - 1, lane * L::kLaneCodes / a.group_size);
  p.chunk_group0.resize(p.chunks);
  p.lane_offset.resize(p.lane_group.size());
  p.scale_by_permute = true;
  for (int64_t ch = 0; ch < p.chunks; ++ch) {
    p.chunk_group0[ch] = p.lane_group[ch * kChunkLanes];
    for (int l = 0; l < kChunkLanes; ++l) {
      const int64_t off = p.lane_group[ch * kChunkLanes + l] - p.chunk_group0[ch];
      p.lane_offset[ch * kChunkLanes + l] = (uint32_t)off;
      if (off >= kVecLanes) p.scale_by_permute = false;
    }
  }

  // Permuted fp32 activations (zero past K), and group sums of x for the decode path.
  std::vector<float> xp((size_t)(M * p.chunks * p.chunk_codes), 0.f);
  std::vector<float> xrow(p.chunks * p.chunk_codes);
  for (int64_t m = 0; m < M; ++m) {
    std::fill(xrow.begin(), xrow.end(), 0.f);
    for (int64_t k = 0; k < K; ++k) xrow[k] = load_as_float(a.x, a.x_dtype, m * a.ldx + k);
    float* dst = xp.data() + m * p.chunks * p.chunk_codes;
    for (int64_t ch = 0; ch < p.chunks; ++ch)
      for (int j = 0; j < L::kLaneCodes; ++j)
        for (int l = 0; l < kChunkLanes; ++l)
          dst[(ch * L::kLaneCodes + j) * kChunkLanes + l] =
              xrow[((ch * kChunkLanes) + l) * L::kLaneCodes + j];
  }

  if (M <= kDecodeMaxM) {
    std::vector<float> xsum((size_t)(M * p.G), 0.f);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k)
        xsum[m * p.G + k / a.group_size] += load_as_float(a.x, a.x_dtype, m * a.ldx + k);
    switch (M) {
      case 1: decode<BITS, 1>(a, p, xp.data(), xsum.data(), out32); break;
      case 2: decode<BITS, 2>(a, p, xp.data(), xsum.data(), out32); break;
      case 3: decode<BITS, 3>(a, p, xp.data(), xsum.data(), out32); break;
      case 4: decode<BITS, 4>(a, p, xp.data(), xsum.data(), out32); break;
      case 5: decode<BITS, 5>(a, p, xp.data(), xsum.data(), out32); break;
      case 6: decode<BITS, 6>(a, p, xp.data(), xsum.data(), out32); break;
      case 7: decode<BITS, 7>(a, p, xp.data(), xsum.data(), out32); break;
      default: decode<BITS, 8>(a, p, xp.data(), xsum.data(), out32); break;
    }
  } else {
    prefill<BITS>(a, p, xp.data(), out32);
  }
}

}  // namespace

void qmatmul(const QMatmulArgs& a) {
  if (a.M == 0 || a.N == 0) return;
  const int64_t M = a.M, N = a.N;
  std::vector<float> out32((size_t)(M * N));
  switch (a.bits) {
    case 2: run<2>(a, out32.data()); break;
    case 3: run<3>(a, out32.data()); break;
    case 4: run<4>(a, out32.data()); break;
    default: run<8>(a, out32.data()); break;
  }
  // Epilogue: bias, accumulation and the conversion to the output dtype.
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      float v = out32[m * N + n];
      if (a.bias) v += load_as_float(a.bias, a.bias_dtype, n);
      if (a.accumulate) v += load_as_float(a.out, a.out_dtype, m * a.ldo + n);
      store_from_float(a.out, a.out_dtype, m * a.ldo + n, v);
    }
  }
}

}  // namespace PYENGINE_ISA
}  // namespace cpu
}  // namespace pyengine
