// CPU quantized matmul kernels: out[M, N] = x[M, K] @ dequant(W)[N, K]^T (+ bias).
//
// This file is compiled once per instruction set (generic, avx2, avx512) with PYENGINE_ISA set
// to the namespace name. Lanes are handled one register at a time as GCC/Clang vectors (VecU /
// VecF: 16 lanes in a zmm register with AVX-512, 8 in a ymm with AVX2, narrower operations on 8
// in the generic build), so every build is the same code and the decode loop's partial sums stay
// in registers; the one intrinsic is AVX-512's ternary logic for the mantissa trick
// (field_or_one).
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
// The decode paths multiply x by the integer codes, scale per lane (each lane lies in one group;
// a vector of lanes takes its lane scales by one permutation of as many consecutive group scales,
// Plan::vec_group0) and add b * (group sum of x) per group: the single-row path
// scales each chunk's partial sums, the tiled path (AVX-512, a tile of weight rows against a
// block of x rows from registers) scales the codes. The prefill path dequantizes a panel of rows
// and runs a register-blocked dot-product micro-kernel over the permuted order (kernel_util.h).
#include <algorithm>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
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
  int last_chunk_vecs; // 16-lane vectors of the last chunk that hold codes (1 or 2)
  int64_t chunk_codes; // codes per chunk (= 32 * lane codes)
  int64_t G;           // groups covering Kp
  std::vector<int32_t> lane_group;  // [chunks * 32] group of each lane (clamped to G - 1)
  // Lane scales by permutation (decode): the scale of lane l of vector v (= chunk * kVecs + h)
  // is sf[vec_group0[v] + lane_offset[v * kVecLanes + l]], one vector permutation of kVecLanes
  // consecutive group scales. A vector's kVecLanes lanes span at most kVecLanes groups (a lane's
  // codes, at most 32, never exceed a group), so every offset is below kVecLanes.
  std::vector<int32_t> vec_group0;    // [chunks * kVecs] group of the vector's first lane
  std::vector<uint32_t> lane_offset;  // [chunks * 32] lane_group - vec_group0 of its vector
  // Rows n < in_place_rows read their last (partial) chunk in place: it ends within the words
  // of the call's last row (see chunk_words).
  int64_t in_place_rows;
};

// The 32 words (3 bits: 96 words) of chunk `ch` of row n. The last chunk of a row reaches past
// the row's words: rows below Plan::in_place_rows read the words that follow in memory (the
// next rows': their lanes meet zero activations, and every lane value is finite, so they add
// nothing); later rows copy theirs into `tail` so that no word past the call's last row is read.
// The caller zeroes `tail` once: every row writes the same leading words, so the padding after
// them stays zero.
template <int BITS>
inline const uint32_t* chunk_words(const uint32_t* wrow, int64_t n, int64_t ch, const Plan& p,
                                   uint32_t* tail) {
  using L = Layout<BITS>;
  const int64_t first = ch * kChunkLanes;
  if (first + kChunkLanes <= p.lanes || n < p.in_place_rows)
    return wrow + first * L::kLaneWords;
  const int64_t n_words = (p.lanes - first) * L::kLaneWords;
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

// The lanes of a chunk as GCC/Clang vectors of one register each (16 lanes in a zmm with
// AVX-512, 8 in a ymm with AVX2; the generic build uses 8, emulated by narrower operations):
// kVecs of them per chunk. Written on vector types rather than arrays so that the decode loop
// keeps its partial sums in registers instead of storing and reloading them for every code; a
// vector wider than a register (16 lanes on AVX2) would take two per value and spill the
// decode loop's accumulators out of the 16 ymm registers.
#if defined(__AVX512F__)
constexpr int kVecLanes = 16;
#else
constexpr int kVecLanes = 8;
#endif
typedef uint32_t VecU __attribute__((vector_size(kVecLanes * 4)));
typedef float VecF __attribute__((vector_size(kVecLanes * 4)));
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

// (v & field) | 1.0f: one vpternlogd on AVX-512, done in place on v (GCC's own choice of the
// instruction's tied operand costs a register copy per code vector).
inline VecU field_or_one(VecU v, uint32_t field) {
#if defined(__AVX512F__)
  return (VecU)_mm512_ternarylogic_epi32((__m512i)v, _mm512_set1_epi32((int)field),
                                         _mm512_set1_epi32((int)kOneBits), 0xEA);
#else
  return (v & field) | kOneBits;
#endif
}

// Lane values of code J of the lanes [h * kVecLanes, (h + 1) * kVecLanes) of a chunk. `planes` is the chunk's
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
    u = field_or_one(moved, field);
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
inline const uint32_t* chunk_planes(const uint32_t* wrow, int64_t n, int64_t ch, const Plan& p,
                                    uint32_t* tail, uint32_t* planes3) {
  const uint32_t* w = chunk_words<BITS>(wrow, n, ch, p, tail);
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

// ---- decode: one pass over the weight, codes unpacked once per row ---------------------------
// Two paths. The tiled path (AVX-512) takes the weight rows in tiles of kTileRows and the
// activation rows in blocks of at most kTileM: each lane vector of x is loaded once for all rows
// of a tile, and each row's unpacked codes serve the whole block, so the loop runs from registers
// (kTileM * kTileRows accumulators) instead of re-reading x from the L2 cache for every weight
// row; each further block is another pass over the tile's codes (by then in the L1 cache). The
// single-row path (M <= kDecodeMaxM below the tiled path's range, and every M <= kDecodeMaxM of
// the AVX2 and generic builds) takes one weight row at a time and scales per chunk instead of
// per code.
//
// tiled_path(bits, M): where the tiled path is taken, measured on AMD Zen 5 against the other
// paths (benchmarks/ab_cpu_kernels.py, 576..4096-wide layers). With AVX-512: from M = 2 (below,
// the per-code scale multiply costs more than the tiles save) to M = 16 (beyond, the prefill
// panels are as fast or faster); 3-bit codes cost more to unpack (and the unpacking is repeated
// per block), so 3 bits only from M = 4 to 6. The AVX2 build (16 ymm registers, two per 16-float
// vector) was slower tiled at every M, so it and the generic build never take it.
#if defined(__AVX512F__)
constexpr int kTileRows = 4, kTileM = 4;
constexpr bool tiled_path(int bits, int64_t M) {
  return bits == 3 ? M >= 4 && M <= 6 : M >= 2 && M <= kTiledMaxM;
}
#else
constexpr int kTileM = 1;  // RowBlocks only: one row per block
constexpr bool tiled_path(int, int64_t) { return false; }
#endif

// The activation rows of the tiled path in blocks of at most kTileM, as even as possible
// (5 -> 3 + 2, 8 -> 4 + 4, 17 -> 4 + 4 + 3 + 3 + 3). Block b is rows [first(b), first(b) +
// rows(b)); in the permuted activations it starts at row first(b) and is ordered
// [chunk][lane code][rows(b)][32 lanes] (see run).
struct RowBlocks {
  int64_t count, base, extra;  // blocks; each has base rows, the first `extra` one more
  explicit RowBlocks(int64_t M)
      : count((M + kTileM - 1) / kTileM), base(M / count), extra(M % count) {}
  int64_t rows(int64_t b) const { return base + (b < extra ? 1 : 0); }
  int64_t first(int64_t b) const { return b * base + std::min(b, extra); }
};

// One weight row's decode state: its group parameters.
struct DecodeRow {
  std::vector<float> sf, bf;
  void init(const Plan& p) {
    sf.assign(p.G + kVecLanes, 0.f);  // padded: a permutation loads kVecLanes scales
    bf.assign(p.G, 0.f);
  }
  // Row n's parameters for lane values scaled by value_scale (see row_params).
  void load(const QMatmulArgs& a, const Plan& p, int64_t n, float value_scale) {
    row_params(a, n, p.G, value_scale, sf.data(), bf.data());
  }
  // Scales of lanes [h * kVecLanes, (h + 1) * kVecLanes) of chunk ch.
  VecF scales(const Plan& p, int64_t ch, int h) const {
    const int64_t vec = ch * kVecs + h;
    return __builtin_shuffle(load_f(sf.data() + p.vec_group0[vec]),
                             load_u(p.lane_offset.data() + vec * kVecLanes));
  }
};

#if defined(__AVX512F__)  // the tiled path (tiled_path is false in the other builds)
// Rows wrow[0 .. kTileRows) (row indices row_n) against the MB activation rows of one block: out[m][r] is the
// tile's dot products without the per-group bias (added by the caller). xb: the block in the
// tiled order xb[ch][J][m][lane] (see RowBlocks), so that every x load of the loop is one base
// register plus a constant.
template <int BITS, int MB>
void tile_block(const Plan& p, const DecodeRow* rows, const uint32_t* const* wrow,
                const int64_t* row_n,
                const float* xb, uint32_t (*tail)[Layout<BITS>::kChunkWords],
                uint32_t (*planes3)[3 * kChunkLanes], float out[kTileM][kTileRows]) {
  using L = Layout<BITS>;
  constexpr int NR = kTileRows;
  constexpr int64_t kCodeStride = MB * kChunkLanes;  // floats from code J to J + 1 of a chunk
  // Independent FMA chains: one accumulator per (x row, weight row), split by lane vector while
  // that gives fewer than 8 chains (an FMA's latency is ~4 cycles at 2 per cycle).
  constexpr int kSplit = MB * NR >= 8 ? 1 : kVecs;
  VecF acc[MB][NR][kSplit] = {};
  for (int64_t ch = 0; ch < p.chunks; ++ch) {
    const uint32_t* planes[NR];
    for (int r = 0; r < NR; ++r)
      planes[r] = chunk_planes<BITS>(wrow[r], row_n[r], ch, p, tail[r], planes3[r]);
    const float* xc = xb + ch * L::kLaneCodes * kCodeStride;
    const int n_vecs = ch + 1 == p.chunks ? p.last_chunk_vecs : kVecs;
    unroll<kVecs>([&](auto h) PYENGINE_INLINE {
      if (h >= n_vecs) return;  // lanes past the row's codes
      VecF scale[NR];
      for (int r = 0; r < NR; ++r) scale[r] = rows[r].scales(p, ch, h);
      unroll<L::kLaneCodes>([&](auto J) PYENGINE_INLINE {
        // Each row's codes, scaled per lane: w = q' * sf (+ bf, added per group by the caller).
        VecF q[NR];
        for (int r = 0; r < NR; ++r) q[r] = lane_values<BITS, J>(planes[r], h) * scale[r];
        for (int m = 0; m < MB; ++m) {
          const VecF xv = load_f(xc + J * kCodeStride + m * kChunkLanes + h * kVecLanes);
          for (int r = 0; r < NR; ++r) acc[m][r][h % kSplit] += xv * q[r];
        }
      });
    });
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < NR; ++r) {
      VecF total = acc[m][r][0];
      for (int c = 1; c < kSplit; ++c) total += acc[m][r][c];
      out[m][r] = hsum(total);
    }
}

// The tiled path over rows [n_begin, n_end): xt: the permuted activations in blocks (see
// RowBlocks); xsum: [M][G] group sums of x.
template <int BITS>
void tiled_rows(const QMatmulArgs& a, const Plan& p, const float* xt, const float* xsum,
                int64_t n_begin, int64_t n_end, float* out32 /* [M, N] */) {
  using L = Layout<BITS>;
  constexpr int NR = kTileRows;
  const RowBlocks blocks(a.M);
  const int64_t row_codes = p.chunks * p.chunk_codes;
  DecodeRow rows[NR];
  for (DecodeRow& row : rows) row.init(p);
  alignas(64) uint32_t tail[NR][L::kChunkWords] = {};
  alignas(64) uint32_t planes3[NR][3 * kChunkLanes];
  for (int64_t n0 = n_begin; n0 < n_end; n0 += NR) {
    // A tile past n_end repeats its last row; those results are not stored.
    const uint32_t* wrow[NR];
    int64_t row_n[NR];
    for (int r = 0; r < NR; ++r) {
      const int64_t n = row_n[r] = std::min(n0 + r, n_end - 1);
      wrow[r] = a.qweight + n * a.ldq;
      rows[r].load(a, p, n, L::kValueScale);
    }
    for (int64_t b = 0; b < blocks.count; ++b) {
      const int64_t m0 = blocks.first(b), mb = blocks.rows(b);
      const float* xb = xt + m0 * row_codes;
      float dots[kTileM][NR];
      static_assert(kTileM == 4, "one tile_block instantiation per block size 1..4");
      switch (mb) {
        case 1: tile_block<BITS, 1>(p, rows, wrow, row_n, xb, tail, planes3, dots); break;
        case 2: tile_block<BITS, 2>(p, rows, wrow, row_n, xb, tail, planes3, dots); break;
        case 3: tile_block<BITS, 3>(p, rows, wrow, row_n, xb, tail, planes3, dots); break;
        default: tile_block<BITS, kTileM>(p, rows, wrow, row_n, xb, tail, planes3, dots); break;
      }
      for (int r = 0; r < NR && n0 + r < n_end; ++r)
        for (int64_t m = 0; m < mb; ++m)
          out32[(m0 + m) * a.N + n0 + r] =
              dots[m][r] + dot(rows[r].bf.data(), xsum + (m0 + m) * p.G, p.G);
    }
  }
}

#endif  // __AVX512F__

// The single-row path: one weight row at a time, codes times x summed per chunk and lane vector,
// then scaled (M <= kDecodeMaxM where tiled_path is false). xp: permuted activations
// [MT][chunks][chunk_codes]; xsum: [MT][G] group sums of x.
template <int BITS, int MT>
void decode_rows_single(const QMatmulArgs& a, const Plan& p, const float* xp, const float* xsum,
                        int64_t n_begin, int64_t n_end, float* out32 /* [MT, N] */) {
  using L = Layout<BITS>;
  DecodeRow row;
  row.init(p);
  alignas(64) uint32_t tail[L::kChunkWords] = {};
  alignas(64) uint32_t planes3[3 * kChunkLanes];
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint32_t* wrow = a.qweight + n * a.ldq;
    row.load(a, p, n, L::kValueScale);
    // Partial sums stay in vector registers: kChains independent FMA chains per row and lane
    // vector; for M = 1 with two vectors per chunk (AVX-512) two chains, so that at least four
    // FMA chains interleave (the kVecs = 4 of AVX2 are four already, and more would not fit in
    // its 16 registers).
    constexpr int kChains = MT == 1 && kVecs < 4 ? 2 : 1;
    // Scaled chunk sums go to two accumulators per x row (vectors h even / odd): enough to
    // overlap chunks, and few enough that the 16 ymm registers of AVX2 hold the loop.
    constexpr int kAcc = kVecs >= 2 ? 2 : 1;
    VecF acc[MT][kAcc] = {};
    // One chunk whose first NV vectors hold codes (NV = kVecs but in a row's last chunk);
    // NV is a compile-time constant so that every vector index is.
    auto chunk = [&](int64_t ch, auto nv) PYENGINE_INLINE {
      constexpr int NV = decltype(nv)::value;
      const uint32_t* planes = chunk_planes<BITS>(wrow, n, ch, p, tail, planes3);
      VecF part[MT][kChains][kVecs] = {};
      const float* xc = xp + ch * p.chunk_codes;
      unroll<L::kLaneCodes>([&](auto J) PYENGINE_INLINE {
        unroll<NV>([&](auto h) PYENGINE_INLINE {
          const VecF qv = lane_values<BITS, J>(planes, h);
          for (int m = 0; m < MT; ++m) {
            const float* xj = xc + m * p.chunks * p.chunk_codes + J * kChunkLanes + h * kVecLanes;
            part[m][J % kChains][h] += load_f(xj) * qv;
          }
        });
      });
      unroll<NV>([&](auto h) PYENGINE_INLINE {
        const VecF scale = row.scales(p, ch, h);
        for (int m = 0; m < MT; ++m) {
          VecF sum = part[m][0][h];
          for (int c = 1; c < kChains; ++c) sum += part[m][c][h];
          acc[m][h % kAcc] += scale * sum;
        }
      });
    };
    const int64_t full_chunks = p.last_chunk_vecs == kVecs ? p.chunks : p.chunks - 1;
    for (int64_t ch = 0; ch < full_chunks; ++ch) chunk(ch, std::integral_constant<int, kVecs>{});
    if (full_chunks < p.chunks) {  // a last chunk with 1 .. kVecs - 1 vectors of codes
      unroll<kVecs - 1>([&](auto i) PYENGINE_INLINE {
        constexpr int NV = decltype(i)::value + 1;
        if (p.last_chunk_vecs == NV) chunk(full_chunks, std::integral_constant<int, NV>{});
      });
    }
    for (int m = 0; m < MT; ++m) {
      VecF total = acc[m][0];
      for (int c = 1; c < kAcc; ++c) total += acc[m][c];
      out32[m * a.N + n] = hsum(total) + dot(row.bf.data(), xsum + m * p.G, p.G);
    }
  }
}

template <int BITS, int MT>
void decode_single(const QMatmulArgs& a, const Plan& p, const float* xp, const float* xsum,
                   float* out32) {
  parallel_rows(a, p.Kp * BITS / 8, [&](int64_t lo, int64_t hi) {
    decode_rows_single<BITS, MT>(a, p, xp, xsum, lo, hi, out32);
  });
}

// ---- prefill: larger M (kernel_util.h: panels and the dot-product micro-kernel) -------------
// The prefill path's rows are compact: lane order as for decode, but the last chunk's runs of
// one code index J hold only its lanes that carry codes (Plan::lanes_in), so a row is
// lanes * lane codes floats and the products skip the last chunk's empty lanes (at 3 bits and
// K = 576, 1024 positions would be 576). Code J of lane l of chunk ch sits at
// ch * chunk_codes + J * lanes_in(ch) + l; it is code (ch * 32 + l) * lane codes + J of the row.
inline int64_t compact_row_codes(const Plan& p, int lane_codes) { return p.lanes * lane_codes; }
inline int64_t lanes_in(const Plan& p, int64_t ch) {
  return std::min<int64_t>(kChunkLanes, p.lanes - ch * kChunkLanes);
}

// Rows [n0, n0 + nr) of the output: dequantize them (compact lane order, whole K) into wbuf,
// then run the micro-kernel over every 4-row block of x. Rows of wbuf past nr are zero.
template <int BITS>
void prefill_panel(const QMatmulArgs& a, const Plan& p, const float* xp, const float* zero_row,
                   int64_t n0, int64_t nr, int64_t panel_rows, float* wbuf, float* out32) {
  using L = Layout<BITS>;
  const int64_t row_codes = compact_row_codes(p, L::kLaneCodes);
  std::vector<float> sf(p.G), bf(p.G);
  alignas(64) uint32_t tail[L::kChunkWords] = {};
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
      const uint32_t* planes = chunk_planes<BITS>(wrow, n0 + r, ch, p, tail, planes3);
      const int32_t* lg = p.lane_group.data() + ch * kChunkLanes;
      const int64_t lanes = lanes_in(p, ch);
      alignas(64) float sl[kChunkLanes], bl[kChunkLanes];
      for (int l = 0; l < kChunkLanes; ++l) {
        sl[l] = sf[lg[l]];
        bl[l] = bf[lg[l]];
      }
      float* dch = dst + ch * p.chunk_codes;
      if (lanes == kChunkLanes) {
        unroll<L::kLaneCodes>([&](auto J) PYENGINE_INLINE {
          alignas(64) float qv[kChunkLanes];
          lane_codes<BITS, J>(planes, qv);
          for (int l = 0; l < kChunkLanes; ++l) dch[J * kChunkLanes + l] = qv[l] * sl[l] + bl[l];
        });
      } else {
        unroll<L::kLaneCodes>([&](auto J) PYENGINE_INLINE {
          alignas(64) float qv[kChunkLanes];
          lane_codes<BITS, J>(planes, qv);
          for (int64_t l = 0; l < lanes; ++l) dch[J * lanes + l] = qv[l] * sl[l] + bl[l];
        });
      }
    }
  }
  panel_products(a, xp, zero_row, row_codes, wbuf, n0, nr, out32);
}

template <int BITS>
void prefill(const QMatmulArgs& a, const Plan& p, const float* xp, float* out32) {
  run_panels(a, compact_row_codes(p, Layout<BITS>::kLaneCodes), p.Kp * BITS / 8,
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
  p.last_chunk_vecs = (int)((p.lanes - (p.chunks - 1) * kChunkLanes + kVecLanes - 1) / kVecLanes);
  p.chunk_codes = L::kChunkCodes;
  p.G = (p.Kp + a.group_size - 1) / a.group_size;
  p.lane_group.resize(p.chunks * kChunkLanes);
  for (int64_t lane = 0; lane < (int64_t)p.lane_group.size(); ++lane)
    p.lane_group[lane] = (int32_t)std::min<int64_t>(p.G - 1, lane * L::kLaneCodes / a.group_size);
  // The last chunk of row n ends at word n * ldq + chunks * 32 * lane words; it may be read in
  // place while that stays within the last row's words, (N - 1) * ldq + lanes * lane words.
  const int64_t chunk_end = p.chunks * kChunkLanes * L::kLaneWords;
  const int64_t data_end = (a.N - 1) * a.ldq + p.lanes * L::kLaneWords;
  p.in_place_rows = chunk_end <= data_end ? (data_end - chunk_end) / a.ldq + 1 : 0;
  p.vec_group0.resize(p.chunks * kVecs);
  p.lane_offset.resize(p.lane_group.size());
  for (int64_t vec = 0; vec < p.chunks * kVecs; ++vec) {
    p.vec_group0[vec] = p.lane_group[vec * kVecLanes];
    for (int l = 0; l < kVecLanes; ++l)
      p.lane_offset[vec * kVecLanes + l] =
          (uint32_t)(p.lane_group[vec * kVecLanes + l] - p.vec_group0[vec]);  // < kVecLanes
  }

  // Permuted fp32 activations (zero past K). Code J of lane l of chunk ch of row m goes to
  // row_base(m) + (ch * lane codes + J) * code_stride(m) + l: for the tiled path, m's block
  // (RowBlocks) in the order [ch][J][rows of the block][lane]; otherwise the row-major order
  // xp[m][ch][J][lane]. The prefill path takes compact rows instead (see prefill_panel).
  const bool tiled = tiled_path(BITS, M);
  const int64_t row_codes = p.chunks * p.chunk_codes;
  if (!tiled && M > kDecodeMaxM) {
    const int64_t compact = compact_row_codes(p, L::kLaneCodes);
    std::vector<float> xp((size_t)(M * compact));
    // rows over the call's threads when there are many (M x K of them, once per call)
#pragma omp parallel num_threads(thread_count(a)) if (M * K >= (1 << 16))
    {
      std::vector<float> xrow_t(row_codes, 0.f);
#pragma omp for schedule(static)
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t k = 0; k < K; ++k) xrow_t[k] = load_as_float(a.x, a.x_dtype, m * a.ldx + k);
        float* dst = xp.data() + m * compact;
        for (int64_t ch = 0; ch < p.chunks; ++ch) {
          const int64_t lanes = lanes_in(p, ch);
          for (int j = 0; j < L::kLaneCodes; ++j)
            for (int64_t l = 0; l < lanes; ++l)
              dst[ch * p.chunk_codes + j * lanes + l] =
                  xrow_t[((ch * kChunkLanes) + l) * L::kLaneCodes + j];
        }
      }
    }
    prefill<BITS>(a, p, xp.data(), out32);
    return;
  }
  std::vector<float> xp((size_t)(M * row_codes), 0.f);
  std::vector<float> xrow(row_codes);
  const RowBlocks blocks(M);
  for (int64_t b = 0, m = 0; m < M; ++b) {
    const int64_t block_rows = tiled ? blocks.rows(b) : 1;
    for (int64_t i = 0; i < block_rows; ++i, ++m) {
      std::fill(xrow.begin(), xrow.end(), 0.f);
      for (int64_t k = 0; k < K; ++k) xrow[k] = load_as_float(a.x, a.x_dtype, m * a.ldx + k);
      float* dst = xp.data() + (m - i) * row_codes + i * kChunkLanes;
      const int64_t code_stride = block_rows * kChunkLanes;
      for (int64_t ch = 0; ch < p.chunks; ++ch)
        for (int j = 0; j < L::kLaneCodes; ++j)
          for (int l = 0; l < kChunkLanes; ++l)
            dst[(ch * L::kLaneCodes + j) * code_stride + l] =
                xrow[((ch * kChunkLanes) + l) * L::kLaneCodes + j];
    }
  }
  // Group sums of x for the decode paths.
  std::vector<float> xsum((size_t)(M * p.G), 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k)
      xsum[m * p.G + k / a.group_size] += load_as_float(a.x, a.x_dtype, m * a.ldx + k);
#if defined(__AVX512F__)
  if (tiled) {
    parallel_rows(a, p.Kp * BITS / 8, [&](int64_t lo, int64_t hi) {
      tiled_rows<BITS>(a, p, xp.data(), xsum.data(), lo, hi, out32);
    });
    return;
  }
#endif
  static_assert(kDecodeMaxM == 8, "one single-row decode instantiation per M");
  switch (M) {
    case 1: decode_single<BITS, 1>(a, p, xp.data(), xsum.data(), out32); break;
    case 2: decode_single<BITS, 2>(a, p, xp.data(), xsum.data(), out32); break;
    case 3: decode_single<BITS, 3>(a, p, xp.data(), xsum.data(), out32); break;
    case 4: decode_single<BITS, 4>(a, p, xp.data(), xsum.data(), out32); break;
    case 5: decode_single<BITS, 5>(a, p, xp.data(), xsum.data(), out32); break;
    case 6: decode_single<BITS, 6>(a, p, xp.data(), xsum.data(), out32); break;
    case 7: decode_single<BITS, 7>(a, p, xp.data(), xsum.data(), out32); break;
    default: decode_single<BITS, 8>(a, p, xp.data(), xsum.data(), out32); break;
  }
}

}  // namespace

void qmatmul(const QMatmulArgs& a) {
  if (a.M == 0 || a.N == 0) return;
  if (a.interleave) {  // row-interleaved weights: the decode kernel, else the canonical rows
    if (rows8_native(a)) {
      qmatmul_rows8(a);
    } else if (a.canonical.qweight) {
      qmatmul(on_canonical_rows(a));
    } else {  // none given: a canonical copy for this call
      std::vector<uint32_t> words;
      std::vector<uint8_t> scales, zeros;
      qmatmul(deinterleaved(a, words, scales, zeros));
    }
    return;
  }
  if (a.act_bits == 8) {  // int8 activations: act8_kernels.cpp
    qmatmul_act8(a);
    return;
  }
  std::vector<float> out32((size_t)(a.M * a.N), 0.f);  // K = 0: the products are zero
  if (a.K > 0) {
    switch (a.bits) {
      case 2: run<2>(a, out32.data()); break;
      case 3: run<3>(a, out32.data()); break;
      case 4: run<4>(a, out32.data()); break;
      default: run<8>(a, out32.data()); break;
    }
  }
  store_result(a, out32.data());
}

}  // namespace PYENGINE_ISA
}  // namespace cpu
}  // namespace pyengine
