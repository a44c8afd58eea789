// CPU Matryoshka plane-layout matmul: out[M, N] = x[M, K] @ W_r[N, K]^T (+ bias), where W_r is
// the r-bit slice (r in 8, 6, 4, 3, 2) of an int8 parent stored as three bit planes
// (pyengine/matryoshka/weight.py, PlaneMatmulArgs in common.h). The slice is computed from the
// planes while they are read; no canonical copy of the weight is built.
//
// This file is compiled once per instruction set (generic, avx2, avx512) with PYENGINE_ISA set
// to the namespace name, like qmatmul_kernels.cpp. No intrinsics: the lanes of a chunk are one
// GCC/Clang vector (16 lanes, a zmm register, with AVX-512; 8 lanes, a ymm register, with AVX2,
// two xmm in the generic build), so every build is the same code and vectorization does not
// depend on the loop vectoriser.
//
// Bit layout. The parent code is q = hi << 5 | mid << 3 | lo. Each plane uses the canonical
// LSB-first packing of docs/FORMAT.md: in a 32-code block, code j of a b-bit plane occupies bits
// [b*j, b*j + b) of the little-endian bit string word0 | word1 << 32 | word2 << 64 of the block.
// A block takes 3 words of plane_hi, 2 of plane_mid and 3 of plane_lo; codes 10 and 21 of the
// 3-bit planes straddle two words.
//
// Slice codes. With u = q >> (7 - r), the top r + 1 bits of q (the top r bits and the carry bit
// just below them), c_r = min((u + 1) >> 1, 2^r - 1) for r < 8 and c_8 = q. u comes from the
// planes that hold bits 7 .. 7-r of q only: plane_hi for r = 2, hi + mid for r = 3, 4, all three
// for r = 6, 8. Each plane's share is moved straight to its place with one shift and one mask
// (two of each when a code straddles words).
//
// Lane values. A code becomes a float without an int-to-float conversion: its slice value in
// parent units, v = c_r * 2^(8-r) (8 bits), is placed in the top 8 mantissa bits of 1.0f,
// giving F = 1 + v / 256 (q bit b sits at mantissa bit 15 + b). The rounding of u is done there
// as well: add 1 at u's lowest bit, clamp, keep the r bits of c_r. For r = 2 the rounding is done
// once per chunk instead, on whole words of plane_hi (round_hi_to_int2: bitwise logic on all
// the 3-bit fields at once), so a code costs a shift and a mask like a canonical 2-bit code.
//
// Dequantization. w = (v - z) * s = F * sf + bf with sf = 256 s (exact: a power of two) and
// bf = -(z + 256) s. For one group g of row n:
//   sum_k x[k] * w[k] = sf * sum_k x[k] * F[k] + bf * sum_k x[k].
//
// Lane order. A *lane* is one 32-code block of a row, a *chunk* is L = kChunkLanes consecutive
// blocks (L * 32 codes). Per chunk the plane words are transposed (vector shuffles) so that word
// w of the L blocks is one vector; code J of all L lanes then takes the same (immediate) shifts.
// The blocks after a row's last full chunk (its *tail*, blocks % L of them) are handled apart so
// that no lane is wasted on codes past K: the decode path packs the tails of L / tail rows into
// one chunk, the tiled path stores only the tail's lanes. x is permuted to match once per call
// (see Geometry): xp[m][chunk][J][lane] = x[m][(chunk * L + lane) * 32 + J], zero past K.
//
// Paths. M <= kPlaneDecodeMaxM: decode, one pass over the planes (OpenMP over N), each unpacked
// code multiplied by every row of x, scaled per lane (a lane lies in one group) and the bf term
// added from per-group sums of x. Larger M: a panel of rows is dequantized to fp32 over the whole
// K (kept in L2) and a 4 x 4 register-blocked dot-product micro-kernel runs over it (OpenMP over
// panels).
#include <algorithm>
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

constexpr int kBlockCodes = 32;                        // codes per packing block (one lane)
// Blocks per chunk = lanes of one vector: 16 (a zmm register) with AVX-512; 8 elsewhere, where
// registers are 256 bits or narrower and a chunk's words must still fit the register file.
#if defined(__AVX512F__)
constexpr int kChunkLanes = 16;
#else
constexpr int kChunkLanes = 8;
#endif
constexpr int64_t kChunkCodes = kChunkLanes * kBlockCodes;

// One bit plane: the lowest bit of q it holds and its bits per code (= words per block).
template <int SHIFT, int BITS>
struct Plane {
  static constexpr int kShift = SHIFT;
  static constexpr int kBits = BITS;
};
using PlaneHi = Plane<5, 3>;
using PlaneMid = Plane<3, 2>;
using PlaneLo = Plane<0, 3>;

// The r-bit slice: which bits of q it reads.
template <int R>
struct Slice {
  static constexpr int kQLow = R == 8 ? 0 : 7 - R;  // lowest bit of q in u

  // Bits of q taken from plane P: q bits [max(shift, kQLow), shift + bits); <= 0 means none.
  template <class P>
  static constexpr int width() {
    return P::kShift + P::kBits - (P::kShift > kQLow ? P::kShift : kQLow);
  }
  static constexpr bool kReadsMid = width<PlaneMid>() > 0;
  static constexpr bool kReadsLo = width<PlaneLo>() > 0;
};
static_assert(!Slice<2>::kReadsMid && Slice<3>::kReadsMid && !Slice<4>::kReadsLo &&
                  Slice<6>::kReadsLo && Slice<8>::kReadsLo,
              "planes read per precision (PLANES_READ in pyengine/matryoshka/weight.py)");

// Bits of each parent code that an r-bit slice reads from the planes (whole planes).
template <int R>
constexpr int kPlaneBitsRead = PlaneHi::kBits + (Slice<R>::kReadsMid ? PlaneMid::kBits : 0) +
                               (Slice<R>::kReadsLo ? PlaneLo::kBits : 0);

constexpr uint32_t kOneBits = 0x3F800000u;  // 1.0f
constexpr int kMantissaQ = 15;              // mantissa bit of q's bit 0: F = 1 + q / 256

// The lanes of a chunk as one vector (see the top of the file).
typedef uint32_t VecU __attribute__((vector_size(kChunkLanes * 4)));
typedef float VecF __attribute__((vector_size(kChunkLanes * 4)));

inline VecF load_lanes(const float* p) {
  VecF v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store_lanes(float* p, VecF v) { std::memcpy(p, &v, sizeof(v)); }

// One chunk, transposed: lane l of hi[w] is word w of block l of the chunk (likewise mid and lo);
// lanes past the blocks it holds are zero. Planes a slice does not read are left untouched.
struct ChunkWords {
  VecU hi[3];
  VecU mid[2];
  VecU lo[3];
};

#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define PYENGINE_HAVE_SHUFFLEVECTOR 1
#endif

// Lane l of dst[w] = src[l * W + w] (W = 2 or 3 words per block) for the blocks of a chunk: the
// W * kChunkLanes words are loaded as W vectors and de-interleaved with two-source shuffles.
template <int W>
inline void transpose_full(const uint32_t* src, VecU* dst) {
#if defined(PYENGINE_HAVE_SHUFFLEVECTOR)
  VecU a, b;
  std::memcpy(&a, src, sizeof(a));
  std::memcpy(&b, src + kChunkLanes, sizeof(b));
  if constexpr (W == 2) {
#if defined(__AVX512F__)
    dst[0] = __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28,
                                     30);
    dst[1] = __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29,
                                     31);
#else
    dst[0] = __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14);
    dst[1] = __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15);
#endif
  } else {
    // Word 3l + w sits in a, b or c: first gather the a and b part (indices into a ++ b), then
    // append the c part (indices from kChunkLanes on index c in ab ++ c). Unused slots repeat 0.
    VecU c;
    std::memcpy(&c, src + 2 * kChunkLanes, sizeof(c));
#if defined(__AVX512F__)
    const VecU ab0 =
        __builtin_shufflevector(a, b, 0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 0, 0, 0, 0, 0);
    const VecU ab1 =
        __builtin_shufflevector(a, b, 1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31, 0, 0, 0, 0, 0);
    const VecU ab2 =
        __builtin_shufflevector(a, b, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 0, 0, 0, 0, 0, 0);
    dst[0] = __builtin_shufflevector(ab0, c, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 17, 20, 23, 26, 29);
    dst[1] = __builtin_shufflevector(ab1, c, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 18, 21, 24, 27, 30);
    dst[2] = __builtin_shufflevector(ab2, c, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 19, 22, 25, 28, 31);
#else
    const VecU ab0 = __builtin_shufflevector(a, b, 0, 3, 6, 9, 12, 15, 0, 0);
    const VecU ab1 = __builtin_shufflevector(a, b, 1, 4, 7, 10, 13, 0, 0, 0);
    const VecU ab2 = __builtin_shufflevector(a, b, 2, 5, 8, 11, 14, 0, 0, 0);
    dst[0] = __builtin_shufflevector(ab0, c, 0, 1, 2, 3, 4, 5, 10, 13);
    dst[1] = __builtin_shufflevector(ab1, c, 0, 1, 2, 3, 4, 8, 11, 14);
    dst[2] = __builtin_shufflevector(ab2, c, 0, 1, 2, 3, 4, 9, 12, 15);
#endif
  }
#else
  alignas(64) uint32_t t[W][kChunkLanes];
  for (int l = 0; l < kChunkLanes; ++l)
    for (int w = 0; w < W; ++w) t[w][l] = src[l * W + w];
  std::memcpy(dst, t, sizeof(t));
#endif
}

// Geometry of one call, shared by all rows. With L = kChunkLanes, a permuted row (of x, or of a
// dequantized weight row) holds the full chunks, chunk ch at [ch * 32L, ch * 32L + 32L) in the
// order [J][L lanes], then the tail (the last blocks % L blocks) at [full_chunks * 32L,
// + tail * 32) in the order [J][tail lanes]: no padding beyond the last block.
struct Geometry {
  int64_t blocks;           // 32-code blocks covering K
  int64_t full_chunks;      // blocks / L
  int tail;                 // blocks % L: blocks after the last full chunk (0: none)
  int tail_rows;            // decode: rows whose tails share one chunk (L / tail)
  int64_t row_codes;        // full_chunks * 32L + tail * 32
  int64_t G;                // groups covering the blocks
  int64_t lanes_per_group;  // group_size / 32
  // Block scales by permutation (decode): a chunk of L blocks spans at most L groups, so the
  // scale of block l of chunk ch is sf[chunk_group0[ch] + block_offset[ch * L + l]], one vector
  // permutation of L consecutive group scales (ch = full_chunks: the tail's blocks).
  std::vector<int32_t> chunk_group0;   // [full_chunks + 1]
  std::vector<uint32_t> block_offset;  // [(full_chunks + 1) * L]
};

// v with bit FROM moved to bit TO in every lane (a left or right shift by a constant).
template <int FROM, int TO>
inline VecU move_bits(VecU v) {
  if constexpr (FROM >= TO) return v >> (FROM - TO);
  else return v << (TO - FROM);
}

// Bits [START, START + WIDTH) of each lane's bit string words[0] | words[1] << 32 | ...,
// placed at bit DST of the result (all other bits zero). WIDTH <= 3.
template <int START, int WIDTH, int DST>
inline VecU field(const VecU* words) {
  constexpr int word = START / 32, bit = START % 32;
  if constexpr (bit + WIDTH <= 32) {
    constexpr uint32_t mask = ((1u << WIDTH) - 1u) << DST;
    return move_bits<bit, DST>(words[word]) & mask;
  } else {
    // The field straddles two words: its low (32 - bit) bits are the top of `word`, the rest
    // the bottom of the next one.
    constexpr int low_width = 32 - bit;
    constexpr uint32_t high_mask = (1u << (WIDTH - low_width)) - 1u;
    const VecU low = words[word] >> bit;
    const VecU high = words[word + 1] & high_mask;
    return (low << DST) | (high << (DST + low_width));
  }
}

// Plane P's share of the slice's bits of q for code J of every lane: the plane's code bits that
// hold q bits [max(shift, QLOW), shift + bits), with q bit b placed at mantissa bit 15 + b.
template <class P, int QLOW, int J>
inline VecU plane_share(const VecU* words) {
  constexpr int from_q = P::kShift > QLOW ? P::kShift : QLOW;  // lowest q bit taken
  constexpr int width = P::kShift + P::kBits - from_q;
  return field<J * P::kBits + (from_q - P::kShift), width, kMantissaQ + from_q>(words);
}

// Rounds every 3-bit code f of plane_hi (lanes' words w[0..2]) to its int2 slice code
// c_2 = min((f + 1) >> 1, 3), written back in place: c_2 in bits 3j, 3j + 1 of code j's field.
// The 96-bit string X = w[0] | w[1] << 32 | w[2] << 64 holds f's bits (b0, b1, b2) at 3j, 3j + 1,
// 3j + 2; with X1 = X >> 1 and X2 = X >> 2 all three sit at bit 3j, where
//   inc = b0 & !(b1 & b2)        round up, except f = 7 (which clamps to 3)
//   c0 = b1 ^ inc, c1 = b2 ^ (b1 & inc)
// is c_2 = (b1 + 2 b2) + inc without a carry out (inc = 1 needs b1 & b2 = 0).
inline void round_hi_to_int2(VecU* w) {
  const VecU a = w[0], b = w[1], c = w[2];
  const VecU a1 = (a >> 1) | (b << 31), b1 = (b >> 1) | (c << 31), c1 = c >> 1;
  const VecU a2 = (a >> 2) | (b << 30), b2 = (b >> 2) | (c << 30), c2 = c >> 2;
  // Bits 3j of X within each word: j = 0..10 in w[0], 11..21 in w[1] (from bit 1), 22..31 in
  // w[2] (from bit 2).
  constexpr uint32_t kFieldA = 0x49249249u, kFieldB = 0x92492492u, kFieldC = 0x24924924u;
  const VecU inc_a = a & ~(a1 & a2), inc_b = b & ~(b1 & b2), inc_c = c & ~(c1 & c2);
  const VecU lo_a = (a1 ^ inc_a) & kFieldA, lo_b = (b1 ^ inc_b) & kFieldB,
             lo_c = (c1 ^ inc_c) & kFieldC;
  const VecU hi_a = (a2 ^ (a1 & inc_a)) & kFieldA, hi_b = (b2 ^ (b1 & inc_b)) & kFieldB,
             hi_c = (c2 ^ (c1 & inc_c)) & kFieldC;
  // c1 goes one bit up (a 96-bit shift: bit 31 of a word moves to bit 0 of the next).
  w[0] = lo_a | (hi_a << 1);
  w[1] = lo_b | (hi_b << 1) | (hi_a >> 31);
  w[2] = lo_c | (hi_c << 1) | (hi_b >> 31);
}

// The lane values F = 1 + c_r * 2^(8-r) / 256 of code J (0..31) of the chunk's lanes, from the
// planes the slice reads (for r = 2, plane_hi after round_hi_to_int2).
template <int R, int J>
inline VecF slice_value(const ChunkWords& cw) {
  using S = Slice<R>;
  VecU bits;
  if constexpr (R == 2) {
    bits = field<3 * J, 2, kMantissaQ + 6>(cw.hi);  // c_2 * 64 in parent units
  } else {
    bits = plane_share<PlaneHi, S::kQLow, J>(cw.hi);
    if constexpr (S::kReadsMid) bits |= plane_share<PlaneMid, S::kQLow, J>(cw.mid);
    if constexpr (S::kReadsLo) bits |= plane_share<PlaneLo, S::kQLow, J>(cw.lo);
    if constexpr (R < 8) {
      // bits = u << low (u in mantissa bits low .. 22). Add 1 at u's lowest bit: t < 2^23,
      // except for u = 2^(r+1) - 1, where t = 2^23 (c_r would be 2^r); t - (t >> 23) clamps
      // that one to 2^23 - 1, whose top r mantissa bits are 2^r - 1. Keep the r bits of c_r.
      // (A min would do, but a vector min wider than the registers is scalarized by GCC.)
      constexpr int low = kMantissaQ + S::kQLow;
      constexpr uint32_t keep = ((1u << R) - 1u) << (low + 1);
      const VecU t = bits + (1u << low);
      bits = (t - (t >> 23)) & keep;
    }
  }
  return (VecF)(bits | kOneBits);  // reinterpret the bits as floats
}

// Full chunk ch (blocks ch*L .. ch*L + L - 1, L = kChunkLanes) of row n, from the planes the
// slice reads.
template <int R>
inline void load_chunk(const PlaneMatmulArgs& a, int64_t n, int64_t ch, ChunkWords* cw) {
  using S = Slice<R>;
  const int64_t b0 = ch * kChunkLanes;
  transpose_full<3>(a.plane_hi + n * a.ld_hi + b0 * 3, cw->hi);
  if constexpr (R == 2) round_hi_to_int2(cw->hi);
  if constexpr (S::kReadsMid) transpose_full<2>(a.plane_mid + n * a.ld_mid + b0 * 2, cw->mid);
  if constexpr (S::kReadsLo) transpose_full<3>(a.plane_lo + n * a.ld_lo + b0 * 3, cw->lo);
}

// The tails of rows n0 .. n0 + nr - 1 (nr * tail <= L) of one plane side by side, transposed:
// lane i * tail + l is block full_chunks * L + l of row n0 + i; the lanes after them are zero.
template <int W>
inline void gather_tails(const uint32_t* plane, int64_t ld, const Geometry& g, int64_t n0,
                         int nr, VecU* dst) {
  alignas(64) uint32_t words[W * kChunkLanes] = {};
  const int64_t first = g.full_chunks * kChunkLanes * W;  // first word of the tail in a row
  for (int i = 0; i < nr; ++i) {
    const uint32_t* src = plane + (n0 + i) * ld + first;
    std::copy(src, src + g.tail * W, words + i * g.tail * W);
  }
  transpose_full<W>(words, dst);
}

template <int R>
inline void load_tails(const PlaneMatmulArgs& a, const Geometry& g, int64_t n0, int nr,
                       ChunkWords* cw) {
  using S = Slice<R>;
  gather_tails<3>(a.plane_hi, a.ld_hi, g, n0, nr, cw->hi);
  if constexpr (R == 2) round_hi_to_int2(cw->hi);
  if constexpr (S::kReadsMid) gather_tails<2>(a.plane_mid, a.ld_mid, g, n0, nr, cw->mid);
  if constexpr (S::kReadsLo) gather_tails<3>(a.plane_lo, a.ld_lo, g, n0, nr, cw->lo);
}

// Row n's group parameters for lane values F = 1 + v / 256: w = (v - z) * s = F * sf[g] + bf[g]
// with sf = 256 s and bf = -z s - 256 s.
inline void row_params(const PlaneMatmulArgs& a, int64_t n, int64_t G, float* sf, float* bf) {
  group_params(a, n, G, 256.f, 128.f, sf, bf);
}

inline float hsum_lanes(VecF v) {
  float t = 0.f;
  for (int l = 0; l < kChunkLanes; ++l) t += v[l];
  return t;
}

// ---- decode: M <= kPlaneDecodeMaxM, one pass over the planes -----------------------------------
// Rows [n_begin, n_end), in groups of tail_rows rows: each row's full chunks, then the tails of
// the group in one chunk (so a short row, e.g. K = 576 = 16 + 2 blocks with L = 16, does not
// waste most of a second chunk). xp: permuted activations [MT][row_codes]; xtail: [MT][32L],
// the tail of x repeated for each row of a group (xtail[m][J*L + i*tail + l] = code J of tail
// block l); xsum: [MT][G] group sums of x.
template <int R, int MT>
void decode_rows(const PlaneMatmulArgs& a, const Geometry& g, const float* xp, const float* xtail,
                 const float* xsum, int64_t n_begin, int64_t n_end, float* out32 /* [MT, N] */) {
  constexpr int kChains = MT == 1 ? 4 : 2;  // partial sums per x row: enough FMA chains in flight
  // sf is padded by a vector so that the permutation's L-scale load never leaves it.
  std::vector<float> sf(g.G + kChunkLanes, 0.f), bf(g.G);
  ChunkWords cw;
  auto block_scales = [&](int64_t ch) {
    VecU offsets;
    std::memcpy(&offsets, g.block_offset.data() + ch * kChunkLanes, sizeof(offsets));
    return __builtin_shuffle(load_lanes(sf.data() + g.chunk_group0[ch]), offsets);
  };
  const int64_t group_rows = g.tail ? g.tail_rows : 1;
  for (int64_t n0 = n_begin; n0 < n_end; n0 += group_rows) {
    const int nr = (int)std::min(group_rows, n_end - n0);
    alignas(64) float tail_scale[kChunkLanes] = {};
    for (int i = 0; i < nr; ++i) {
      const int64_t n = n0 + i;
      row_params(a, n, g.G, sf.data(), bf.data());
      VecF acc[MT] = {};
      for (int64_t ch = 0; ch < g.full_chunks; ++ch) {
        load_chunk<R>(a, n, ch, &cw);
        VecF part[MT][kChains] = {};
        const float* xc = xp + ch * kChunkCodes;
        unroll<kBlockCodes>([&](auto J) PYENGINE_INLINE {
          const VecF value = slice_value<R, J>(cw);
          for (int m = 0; m < MT; ++m)
            part[m][J % kChains] += load_lanes(xc + m * g.row_codes + J * kChunkLanes) * value;
        });
        const VecF sl = block_scales(ch);
        for (int m = 0; m < MT; ++m) {
          VecF sum = part[m][0];
          for (int c = 1; c < kChains; ++c) sum += part[m][c];
          acc[m] += sl * sum;
        }
      }
      for (int m = 0; m < MT; ++m) {
        // the bf term covers the whole row, tail included
        out32[m * a.N + n] = hsum_lanes(acc[m]) + dot(bf.data(), xsum + m * g.G, g.G);
      }
      if (g.tail) {
        const VecF ts = block_scales(g.full_chunks);
        for (int l = 0; l < g.tail; ++l) tail_scale[i * g.tail + l] = ts[l];
      }
    }
    if (g.tail == 0) continue;
    ChunkWords tw;
    load_tails<R>(a, g, n0, nr, &tw);
    VecF part[MT][kChains] = {};
    unroll<kBlockCodes>([&](auto J) PYENGINE_INLINE {
      const VecF value = slice_value<R, J>(tw);
      for (int m = 0; m < MT; ++m)
        part[m][J % kChains] += load_lanes(xtail + m * kChunkCodes + J * kChunkLanes) * value;
    });
    const VecF ts = load_lanes(tail_scale);
    for (int m = 0; m < MT; ++m) {
      VecF sum = part[m][0];
      for (int c = 1; c < kChains; ++c) sum += part[m][c];
      sum *= ts;
      for (int i = 0; i < nr; ++i) {
        float t = 0.f;
        for (int l = i * g.tail; l < (i + 1) * g.tail; ++l) t += sum[l];
        out32[m * a.N + n0 + i] += t;
      }
    }
  }
}

template <int R, int MT>
void decode(const PlaneMatmulArgs& a, const Geometry& g, const float* xp, const float* xtail,
            const float* xsum, float* out32) {
  parallel_rows(a, g.row_codes * kPlaneBitsRead<R> / 8, [&](int64_t lo, int64_t hi) {
    decode_rows<R, MT>(a, g, xp, xtail, xsum, lo, hi, out32);
  });
}

// ---- prefill: larger M (kernel_util.h: panels and the dot-product micro-kernel) -------------
// Dequantizes row n into dst[row_codes] in the permuted order of xp (see Geometry).
// sf, bf: [G] scratch; block_s, block_b: [full_chunks * L + L] scratch.
template <int R>
void dequantize_row(const PlaneMatmulArgs& a, const Geometry& g, int64_t n, float* sf, float* bf,
                    float* block_s, float* block_b, float* dst) {
  row_params(a, n, g.G, sf, bf);
  // Per-block values for the blocks of the full chunks and one chunk of tail.
  const int64_t n_blocks = g.full_chunks * kChunkLanes + kChunkLanes;
  spread_over_lanes(sf, g.G, g.lanes_per_group, n_blocks, block_s);
  spread_over_lanes(bf, g.G, g.lanes_per_group, n_blocks, block_b);
  ChunkWords cw;
  for (int64_t ch = 0; ch < g.full_chunks; ++ch) {
    load_chunk<R>(a, n, ch, &cw);
    const VecF sl = load_lanes(block_s + ch * kChunkLanes);
    const VecF bl = load_lanes(block_b + ch * kChunkLanes);
    float* dch = dst + ch * kChunkCodes;
    unroll<kBlockCodes>([&](auto J) PYENGINE_INLINE {
      store_lanes(dch + J * kChunkLanes, slice_value<R, J>(cw) * sl + bl);
    });
  }
  if (g.tail == 0) return;
  load_tails<R>(a, g, n, 1, &cw);
  const VecF sl = load_lanes(block_s + g.full_chunks * kChunkLanes);
  const VecF bl = load_lanes(block_b + g.full_chunks * kChunkLanes);
  alignas(64) float tail[kChunkCodes];
  unroll<kBlockCodes>([&](auto J) PYENGINE_INLINE {
    store_lanes(tail + J * kChunkLanes, slice_value<R, J>(cw) * sl + bl);
  });
  float* dt = dst + g.full_chunks * kChunkCodes;
  for (int j = 0; j < kBlockCodes; ++j)
    std::copy(tail + j * kChunkLanes, tail + j * kChunkLanes + g.tail, dt + j * g.tail);
}

// Rows [n0, n0 + nr) of the output: dequantize them into wbuf (panel_rows x row_codes; rows past
// nr zero), then run the micro-kernel over every 4-row block of x.
template <int R>
void prefill_panel(const PlaneMatmulArgs& a, const Geometry& g, const float* xp,
                   const float* zero_row, int64_t n0, int64_t nr, int64_t panel_rows, float* wbuf,
                   float* out32) {
  std::vector<float> sf(g.G), bf(g.G), block_s(g.full_chunks * kChunkLanes + kChunkLanes),
      block_b(block_s.size());
  for (int64_t r = 0; r < panel_rows; ++r) {
    float* dst = wbuf + r * g.row_codes;
    if (r < nr)
      dequantize_row<R>(a, g, n0 + r, sf.data(), bf.data(), block_s.data(), block_b.data(), dst);
    else
      std::fill(dst, dst + g.row_codes, 0.f);
  }
  panel_products(a, xp, zero_row, g.row_codes, wbuf, n0, nr, out32);
}

template <int R>
void prefill(const PlaneMatmulArgs& a, const Geometry& g, const float* xp, float* out32) {
  run_panels(a, g.row_codes, g.row_codes * kPlaneBitsRead<R> / 8,
             [&](int64_t n0, int64_t nr, int64_t panel_rows, const float* zero_row, float* wbuf) {
               prefill_panel<R>(a, g, xp, zero_row, n0, nr, panel_rows, wbuf, out32);
             });
}

template <int R>
void run(const PlaneMatmulArgs& a, float* out32) {
  const int64_t M = a.M, K = a.K;
  Geometry g;
  g.blocks = (K + kBlockCodes - 1) / kBlockCodes;
  g.full_chunks = g.blocks / kChunkLanes;
  g.tail = (int)(g.blocks % kChunkLanes);
  g.tail_rows = g.tail ? kChunkLanes / g.tail : 0;
  g.row_codes = g.full_chunks * kChunkCodes + g.tail * kBlockCodes;
  g.G = (g.blocks * kBlockCodes + a.group_size - 1) / a.group_size;
  g.lanes_per_group = a.group_size / kBlockCodes;
  g.chunk_group0.resize(g.full_chunks + 1);
  g.block_offset.resize((g.full_chunks + 1) * kChunkLanes);
  for (int64_t ch = 0; ch <= g.full_chunks; ++ch) {
    auto group_of = [&](int64_t b) { return std::min<int64_t>(g.G - 1, b / g.lanes_per_group); };
    g.chunk_group0[ch] = (int32_t)group_of(ch * kChunkLanes);
    for (int l = 0; l < kChunkLanes; ++l)  // < L: the L blocks span at most L groups
      g.block_offset[ch * kChunkLanes + l] =
          (uint32_t)(group_of(ch * kChunkLanes + l) - g.chunk_group0[ch]);
  }

  // Permuted fp32 activations (Geometry's order, L = kChunkLanes): xp[m][ch*32L + J*L + l] =
  // x[m][(ch*L + l)*32 + J] for the full chunks, xp[m][full*32L + J*tail + l] =
  // x[m][(full*L + l)*32 + J] for the tail; zero past K.
  std::vector<float> xp((size_t)(M * g.row_codes));
  std::vector<float> xrow(g.blocks * kBlockCodes);
  const int64_t tail_start = g.full_chunks * kChunkLanes;  // first block of the tail
  for (int64_t m = 0; m < M; ++m) {
    std::fill(xrow.begin(), xrow.end(), 0.f);
    for (int64_t k = 0; k < K; ++k) xrow[k] = load_as_float(a.x, a.x_dtype, m * a.ldx + k);
    float* dst = xp.data() + m * g.row_codes;
    for (int64_t ch = 0; ch < g.full_chunks; ++ch)
      for (int j = 0; j < kBlockCodes; ++j)
        for (int l = 0; l < kChunkLanes; ++l)
          dst[ch * kChunkCodes + j * kChunkLanes + l] =
              xrow[(ch * kChunkLanes + l) * kBlockCodes + j];
    for (int j = 0; j < kBlockCodes; ++j)
      for (int l = 0; l < g.tail; ++l)
        dst[g.full_chunks * kChunkCodes + j * g.tail + l] =
            xrow[(tail_start + l) * kBlockCodes + j];
  }

  if (M <= kPlaneDecodeMaxM) {
    // The tail of x once per row of a decode tail group: xtail[m][J*L + i*tail + l].
    std::vector<float> xtail((size_t)(M * kChunkCodes), 0.f);
    for (int64_t m = 0; m < M; ++m)
      for (int j = 0; j < kBlockCodes; ++j)
        for (int l = 0; l < g.tail_rows * g.tail; ++l)
          xtail[m * kChunkCodes + j * kChunkLanes + l] =
              xp[m * g.row_codes + g.full_chunks * kChunkCodes + j * g.tail + l % g.tail];
    std::vector<float> xsum((size_t)(M * g.G), 0.f);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k)
        xsum[m * g.G + k / a.group_size] += load_as_float(a.x, a.x_dtype, m * a.ldx + k);
    const float* xs[3] = {xp.data(), xtail.data(), xsum.data()};
    static_assert(kPlaneDecodeMaxM == 8, "one decode instantiation per M");
    switch (M) {
      case 1: decode<R, 1>(a, g, xs[0], xs[1], xs[2], out32); break;
      case 2: decode<R, 2>(a, g, xs[0], xs[1], xs[2], out32); break;
      case 3: decode<R, 3>(a, g, xs[0], xs[1], xs[2], out32); break;
      case 4: decode<R, 4>(a, g, xs[0], xs[1], xs[2], out32); break;
      case 5: decode<R, 5>(a, g, xs[0], xs[1], xs[2], out32); break;
      case 6: decode<R, 6>(a, g, xs[0], xs[1], xs[2], out32); break;
      case 7: decode<R, 7>(a, g, xs[0], xs[1], xs[2], out32); break;
      default: decode<R, 8>(a, g, xs[0], xs[1], xs[2], out32); break;
    }
  } else {
    prefill<R>(a, g, xp.data(), out32);
  }
}

}  // namespace

void plane_matmul(const PlaneMatmulArgs& a) {
  if (a.M == 0 || a.N == 0) return;
  const int64_t M = a.M, N = a.N;
  std::vector<float> out32((size_t)(M * N), 0.f);
  if (a.K > 0) {
    switch (a.precision) {
      case 8: run<8>(a, out32.data()); break;
      case 6: run<6>(a, out32.data()); break;
      case 4: run<4>(a, out32.data()); break;
      case 3: run<3>(a, out32.data()); break;
      default: run<2>(a, out32.data()); break;
    }
  }
  // Epilogue: bias and the conversion to the output dtype.
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      float v = out32[m * N + n];
      if (a.bias) v += load_as_float(a.bias, a.bias_dtype, n);
      store_from_float(a.out, a.out_dtype, m * a.ldo + n, v);
    }
  }
}

}  // namespace PYENGINE_ISA
}  // namespace cpu
}  // namespace pyengine
