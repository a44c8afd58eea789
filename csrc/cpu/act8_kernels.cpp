// CPU quantized matmul with int8 activations (QMatmulArgs::act_bits = 8): the activations are
// quantized to int8 per block of kActBlock (32) elements of a row along K (symmetric,
// d = max|x| / 127, q = round(x / d), ties to even), and the product is that of the quantized
// activations x^ = d * q:
//
//   out[m, n] = sum_g s[n,g] * sum_{b in g} d[m,b] * sum_{k in b} q[m,k] * c[n,k]
//             - sum_g z[n,g] * s[n,g] * sum_{b in g} d[m,b] * sum_{k in b} q[m,k]
//
// with c the weight's codes. The inner sums are integer dot products: int8 activations times
// the 2- or 4-bit codes as unsigned bytes, by vpmaddubsw (u8 x s8 -> pairs of s16) and
// vpmaddwd (-> s32), 32 (AVX2) or 64 (AVX-512) code bytes per instruction, instead of one
// fp32 FMA per code: this is the decode path that keeps up with memory bandwidth.
//
// Compiled once per instruction set like qmatmul_kernels.cpp. The integer path is built for
// AVX2 and AVX-512 (BW) and taken for 2- and 4-bit weights at M <= kDecodeMaxM; every other
// case (3 or 8 bits, larger M, the generic build) quantizes the activations the same way into
// an fp32 copy and runs the exact kernels on it, so every path computes the same product.
//
// Byte layout. A step is one vector of packed code bytes (kVB bytes: 32 with AVX2, 64 with
// AVX-512) of a row. Byte i of a step holds codes cpb * i + j, j < cpb = 8 / BITS, at bits
// [BITS * j, BITS * (j + 1)) (the canonical LSB-first packing, docs/FORMAT.md). Plane j of a
// step is (bytes >> BITS * j) & mask: byte i of plane j is code cpb * i + j, so the
// activations are permuted once per call to match, xp[m][step][j][i] = q[m][step codes +
// cpb * i + j]. After vpmaddwd, 32-bit lane u of a step sums bytes 4u .. 4u + 3 of every
// plane: codes [4 cpb u, 4 cpb (u + 1)), one packed word, which lies in one activation block
// and one weight group, so it is scaled by one d and one s.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "cpu/kernel_util.h"  // also checks that PYENGINE_ISA names the build's namespace
#include "cpu/qmatmul.h"

namespace pyengine {
namespace cpu {
namespace PYENGINE_ISA {
namespace {

// ---- activation quantization (every build) ----------------------------------------------------

// Quantizes row m of x over Kq elements (Kq a multiple of kActBlock, zero past K): q[Kq] int8,
// d[Kq / kActBlock] scales. The same arithmetic as the reference (fp32 max, division, rounding
// to nearest even), so that both quantize alike.
inline void quantize_row(const QMatmulArgs& a, int64_t m, int64_t Kq, int8_t* q, float* d) {
  std::vector<float> xf(kActBlock);
  for (int64_t b = 0; b * kActBlock < Kq; ++b) {
    float amax = 0.f;
    for (int64_t i = 0; i < kActBlock; ++i) {
      const int64_t k = b * kActBlock + i;
      xf[i] = k < a.K ? load_as_float(a.x, a.x_dtype, m * a.ldx + k) : 0.f;
      amax = std::max(amax, std::fabs(xf[i]));
    }
    const float scale = amax / 127.f;
    d[b] = scale;
    for (int64_t i = 0; i < kActBlock; ++i) {
      const float v = scale > 0.f ? std::nearbyint(xf[i] / scale) : 0.f;
      q[b * kActBlock + i] = (int8_t)std::min(127.f, std::max(-127.f, v));
    }
  }
}

// The fallback: x^ = d * q in fp32, then the exact kernels.
void fake_quantized_matmul(const QMatmulArgs& a) {
  const int64_t Kq = (a.K + kActBlock - 1) / kActBlock * kActBlock;
  std::vector<float> xhat((size_t)(a.M * a.K));
  std::vector<int8_t> q(Kq);
  std::vector<float> d(Kq / kActBlock);
  for (int64_t m = 0; m < a.M; ++m) {
    quantize_row(a, m, Kq, q.data(), d.data());
    for (int64_t k = 0; k < a.K; ++k) xhat[m * a.K + k] = d[k / kActBlock] * (float)q[k];
  }
  QMatmulArgs exact = a;
  exact.x = xhat.data();
  exact.x_dtype = kFloat32;
  exact.ldx = a.K;
  exact.act_bits = 0;
  qmatmul(exact);
}

#if defined(__AVX2__)
// ---- the integer path (AVX2, AVX-512) ---------------------------------------------------------

#if defined(__AVX512BW__)
typedef __m512i VI;
typedef __m512 VF;
constexpr int kVB = 64;  // code bytes per step
inline VI vload(const void* p) { return _mm512_loadu_si512(p); }
inline VI vset8(int v) { return _mm512_set1_epi8((char)v); }
inline VI vset16(int v) { return _mm512_set1_epi16((short)v); }
inline VI vand(VI a, VI b) { return _mm512_and_si512(a, b); }
template <int S>
inline VI vsrl16(VI a) { return _mm512_srli_epi16(a, S); }
inline VI vmaddubs(VI u8, VI s8) { return _mm512_maddubs_epi16(u8, s8); }
inline VI vadd16(VI a, VI b) { return _mm512_add_epi16(a, b); }
inline VI vmadd16(VI a, VI b) { return _mm512_madd_epi16(a, b); }
inline VF vcvt(VI a) { return _mm512_cvtepi32_ps(a); }
inline VF vloadf(const float* p) { return _mm512_loadu_ps(p); }
inline VF vpermute(VF v, VI idx) { return _mm512_permutexvar_ps(idx, v); }
inline VF vfma(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
inline VF vzero() { return _mm512_setzero_ps(); }
inline float vsum(VF v) { return _mm512_reduce_add_ps(v); }
#else
typedef __m256i VI;
typedef __m256 VF;
constexpr int kVB = 32;
inline VI vload(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline VI vset8(int v) { return _mm256_set1_epi8((char)v); }
inline VI vset16(int v) { return _mm256_set1_epi16((short)v); }
inline VI vand(VI a, VI b) { return _mm256_and_si256(a, b); }
template <int S>
inline VI vsrl16(VI a) { return _mm256_srli_epi16(a, S); }
inline VI vmaddubs(VI u8, VI s8) { return _mm256_maddubs_epi16(u8, s8); }
inline VI vadd16(VI a, VI b) { return _mm256_add_epi16(a, b); }
inline VI vmadd16(VI a, VI b) { return _mm256_madd_epi16(a, b); }
inline VF vcvt(VI a) { return _mm256_cvtepi32_ps(a); }
inline VF vloadf(const float* p) { return _mm256_loadu_ps(p); }
inline VF vpermute(VF v, VI idx) { return _mm256_permutevar8x32_ps(v, idx); }
inline VF vfma(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
inline VF vzero() { return _mm256_setzero_ps(); }
inline float vsum(VF v) {
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}
#endif
constexpr int kLanes = kVB / 4;  // 32-bit lanes per step (one packed word each)
constexpr int kMaxRowBlock = 4;  // activation rows per pass over a weight row

template <int BITS>
struct Act8Layout {
  static constexpr int kCodesPerByte = 8 / BITS;            // also the number of planes
  static constexpr int kStepCodes = kVB * kCodesPerByte;
  static constexpr int kStepWords = kVB / 4;
  static constexpr int kLaneCodes = 4 * kCodesPerByte;       // codes per 32-bit lane (a word)
  static constexpr int kMask = (1 << BITS) - 1;
};

// Per call: the quantized activations in step order and what each step's lanes are scaled by.
struct Act8Plan {
  int64_t Kp;            // K rounded up to whole 32-code blocks
  int64_t steps;         // steps per row (the last may reach past Kp: zero activations there)
  int64_t row_words;     // packed words of a row's Kp codes
  int64_t G;             // weight groups covering Kp
  int64_t in_place_rows; // rows n < this read their last step in place (see qmatmul_kernels)
  std::vector<int8_t> xp;       // [M][steps][planes][kVB] permuted int8 activations
  std::vector<float> lane_d;    // [M][steps][kLanes] activation scale of each lane
  std::vector<float> xsum;      // [M][G] sum over the group of x^ = d * q
  std::vector<int32_t> group0;  // [steps] weight group of the step's first lane
  std::vector<int32_t> offset;  // [steps][kLanes] lane's group - group0 (< kLanes)
};

template <int BITS>
Act8Plan plan_act8(const QMatmulArgs& a) {
  using L = Act8Layout<BITS>;
  Act8Plan p;
  p.Kp = (a.K + 31) / 32 * 32;
  p.steps = (p.Kp + L::kStepCodes - 1) / L::kStepCodes;
  p.row_words = p.Kp * BITS / 32;
  p.G = (p.Kp + a.group_size - 1) / a.group_size;
  const int64_t chunk_end = p.steps * L::kStepWords;
  const int64_t data_end = (a.N - 1) * a.ldq + p.row_words;
  p.in_place_rows = chunk_end <= data_end ? (data_end - chunk_end) / a.ldq + 1 : 0;
  const int64_t codes = p.steps * L::kStepCodes;  // a multiple of kActBlock
  const int64_t blocks = codes / kActBlock;
  std::vector<int8_t> q(codes);
  std::vector<float> d(blocks);
  p.xp.assign((size_t)(a.M * codes), 0);
  p.lane_d.assign((size_t)(a.M * p.steps * kLanes), 0.f);
  p.xsum.assign((size_t)(a.M * p.G), 0.f);
  auto group_of = [&](int64_t k) { return std::min<int64_t>(p.G - 1, k / a.group_size); };
  for (int64_t m = 0; m < a.M; ++m) {
    quantize_row(a, m, codes, q.data(), d.data());
    for (int64_t b = 0; b < blocks && b * kActBlock < p.Kp; ++b) {
      int32_t bsum = 0;
      for (int i = 0; i < kActBlock; ++i) bsum += q[b * kActBlock + i];
      p.xsum[m * p.G + group_of(b * kActBlock)] += d[b] * (float)bsum;
    }
    int8_t* xm = p.xp.data() + m * codes;
    for (int64_t s = 0; s < p.steps; ++s) {
      for (int j = 0; j < L::kCodesPerByte; ++j)
        for (int i = 0; i < kVB; ++i)
          xm[(s * L::kCodesPerByte + j) * kVB + i] =
              q[s * L::kStepCodes + L::kCodesPerByte * i + j];
      for (int u = 0; u < kLanes; ++u)
        p.lane_d[(m * p.steps + s) * kLanes + u] =
            d[(s * L::kStepCodes + L::kLaneCodes * u) / kActBlock];
    }
  }
  p.group0.resize(p.steps);
  p.offset.resize(p.steps * kLanes);
  for (int64_t s = 0; s < p.steps; ++s) {
    p.group0[s] = (int32_t)group_of(s * L::kStepCodes);
    for (int u = 0; u < kLanes; ++u)
      p.offset[s * kLanes + u] =
          (int32_t)(group_of(s * L::kStepCodes + L::kLaneCodes * u) - p.group0[s]);
  }
  return p;
}

// Rows [lo, hi) of the output for the activation rows [m0, m0 + MB).
template <int BITS, int MB>
void act8_rows(const QMatmulArgs& a, const Act8Plan& p, int64_t m0, int64_t lo, int64_t hi,
               float* sf, float* bf, float* out32) {
  using L = Act8Layout<BITS>;
  constexpr int P = L::kCodesPerByte;
  const VI mask = vset8(L::kMask);
  const VI ones = vset16(1);
  const int64_t codes = p.steps * L::kStepCodes;
  alignas(64) uint8_t tail[kVB] = {};
  for (int64_t n = lo; n < hi; ++n) {
    group_params(a, n, p.G, 1.f, (float)(1 << (BITS - 1)), sf, bf);
    const uint32_t* wrow = a.qweight + n * a.ldq;
    const bool in_place = n < p.in_place_rows;
    VF acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = vzero();
    for (int64_t s = 0; s < p.steps; ++s) {
      const uint32_t* words = wrow + s * L::kStepWords;
      if (!in_place && (s + 1) * L::kStepWords > p.row_words) {  // the row's last step: copy
        std::memcpy(tail, words, (size_t)(p.row_words - s * L::kStepWords) * 4);
        words = reinterpret_cast<const uint32_t*>(tail);
      }
      const VI bytes = vload(words);
      VI plane[P];
      unroll<P>([&](auto j) PYENGINE_INLINE {
        plane[j] = vand(vsrl16<BITS * decltype(j)::value>(bytes), mask);
      });
      const VF scale = vpermute(vloadf(sf + p.group0[s]), vload(p.offset.data() + s * kLanes));
      for (int m = 0; m < MB; ++m) {
        const int8_t* xs = p.xp.data() + (m0 + m) * codes + s * P * kVB;
        VI pairs = vmaddubs(plane[0], vload(xs));
        unroll<P - 1>([&](auto j) PYENGINE_INLINE {
          constexpr int J = decltype(j)::value + 1;
          pairs = vadd16(pairs, vmaddubs(plane[J], vload(xs + J * kVB)));
        });
        const VF lane_d = vloadf(p.lane_d.data() + ((m0 + m) * p.steps + s) * kLanes);
        acc[m] = vfma(vcvt(vmadd16(pairs, ones)), lane_d * scale, acc[m]);
      }
    }
    for (int m = 0; m < MB; ++m)
      out32[(m0 + m) * a.N + n] = vsum(acc[m]) + dot(bf, p.xsum.data() + (m0 + m) * p.G, p.G);
  }
}
// The s16 pair sums stay in range: P planes of codes <= 2^BITS - 1 times |q| <= 127, two per
// pair: 2 * P * (2^BITS - 1) * 127 <= 7620 for BITS = 4 and 3048 for BITS = 2.
static_assert(2 * 2 * 15 * 127 < 32767 && 2 * 4 * 3 * 127 < 32767, "vpmaddubsw pair sums");

template <int BITS>
void act8_decode(const QMatmulArgs& a, float* out32) {
  const Act8Plan p = plan_act8<BITS>(a);
  parallel_rows(a, p.Kp * BITS / 8, [&](int64_t lo, int64_t hi) {
    std::vector<float> sf(p.G + kLanes, 0.f), bf(p.G);  // sf padded: a permutation's reach
    for (int64_t m0 = 0; m0 < a.M; m0 += kMaxRowBlock) {
      switch (std::min<int64_t>(kMaxRowBlock, a.M - m0)) {
        case 1: act8_rows<BITS, 1>(a, p, m0, lo, hi, sf.data(), bf.data(), out32); break;
        case 2: act8_rows<BITS, 2>(a, p, m0, lo, hi, sf.data(), bf.data(), out32); break;
        case 3: act8_rows<BITS, 3>(a, p, m0, lo, hi, sf.data(), bf.data(), out32); break;
        default: act8_rows<BITS, kMaxRowBlock>(a, p, m0, lo, hi, sf.data(), bf.data(), out32);
      }
    }
  });
}
#endif  // __AVX2__

}  // namespace

bool act8_native(const QMatmulArgs& a) {
#if defined(__AVX2__)
  return (a.bits == 2 || a.bits == 4) && a.M <= kDecodeMaxM;
#else
  (void)a;
  return false;
#endif
}

void qmatmul_act8(const QMatmulArgs& a) {
  if (!act8_native(a)) {
    fake_quantized_matmul(a);
    return;
  }
#if defined(__AVX2__)
  std::vector<float> out32((size_t)(a.M * a.N), 0.f);
  if (a.K > 0) {
    if (a.bits == 4)
      act8_decode<4>(a, out32.data());
    else
      act8_decode<2>(a, out32.data());
  }
  store_result(a, out32.data());
#endif
}

}  // namespace PYENGINE_ISA
}  // namespace cpu
}  // namespace pyengine
