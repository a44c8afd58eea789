// CPU quantized matmul with int8 activations (QMatmulArgs::act_bits = 8): the activations are
// quantized to int8 per block of kActBlock (32) elements of a row along K (symmetric,
// d = max|x| / 127, q = round(x / d), ties to even), and the product is that of the quantized
// activations x^ = d * q:
//
//   out[m, n] = sum_g s[n,g] * sum_{b in g} d[m,b] * sum_{k in b} q[m,k] * c[n,k]
//             - sum_g z[n,g] * s[n,g] * sum_{b in g} d[m,b] * sum_{k in b} q[m,k]
//
// with c the weight's codes. The inner sums are integer dot products: int8 activations times
// the 2-, 3-, 4- or 8-bit codes as unsigned bytes, by vpmaddubsw (u8 x s8 -> pairs of s16) and
// vpmaddwd (-> s32), 32 (AVX2) or 64 (AVX-512) code bytes per instruction, instead of one
// fp32 FMA per code: this is the decode path that keeps up with memory bandwidth.
//
// Compiled once per instruction set like qmatmul_kernels.cpp. The integer paths are built for
// AVX2 and AVX-512 (BW) and taken for 2-, 3-, 4- and 8-bit weights at M <= kDecodeMaxM: on the
// canonical rows (act8_row, one row at a time; 3-bit codes decoded to bytes first, decode3) or
// on rows interleaved by eights (QMatmulArgs::interleave, rows8_octets: eight rows' dot products
// in the lanes of one vector; 3-bit codes in split blocks merged into nibbles, rows8_nibbles3).
// The generic build has a portable integer path for 2-, 4- and 8-bit weights at M <=
// kDecodeMaxM (portable_rows: GCC / Clang vectors, int16 products) and, on x86-64, an SSE2
// kernel for those and 3-bit codes on the interleaved rows (sse2_rows8_octets: pmaddwd on
// planes masked in 16-bit lanes). Every other case (larger M, 3-bit codes on the generic
// build's canonical rows) quantizes the activations the same way into an fp32 copy and runs
// the exact kernels on it, so every path computes the same product.
//
// Byte layout (2, 4 and 8 bits; 3-bit steps are decoded to bytes first, see "3-bit codes to
// bytes" below). A step is one vector of packed code bytes (kVB bytes: 32 with AVX2, 64 with
// AVX-512) of a row. Byte i of a step holds codes cpb * i + j, j < cpb = 8 / BITS, at bits
// [BITS * j, BITS * (j + 1)) (the canonical LSB-first packing, docs/FORMAT.md). Plane j of a
// step is (bytes >> BITS * j) & mask: byte i of plane j is code cpb * i + j, so the
// activations are permuted once per call to match, xp[m][step][j][i] = q[m][step codes +
// cpb * i + j]. After vpmaddwd, 32-bit lane u of a step sums bytes 4u .. 4u + 3 of every
// plane: codes [4 cpb u, 4 cpb (u + 1)), one packed word, which lies in one activation block
// and one weight group, so it is scaled by one d and one s.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#elif defined(__SSE2__)
#include <emmintrin.h>  // the generic build on x86-64 (sse2_block_sums)
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
  for (int64_t b = 0; b * kActBlock < Kq; ++b) {
    const int64_t k0 = b * kActBlock;
    float xf[kActBlock] = {};  // the block in fp32, zero past K (Kq may end blocks past K)
    const int64_t n = std::max<int64_t>(0, std::min<int64_t>(kActBlock, a.K - k0));
    if (a.x_dtype == kFloat32)
      std::memcpy(xf, static_cast<const float*>(a.x) + m * a.ldx + k0, n * sizeof(float));
    else
      for (int64_t i = 0; i < n; ++i) xf[i] = load_as_float(a.x, a.x_dtype, m * a.ldx + k0 + i);
    float amax = 0.f;
#pragma omp simd reduction(max : amax)
    for (int64_t i = 0; i < kActBlock; ++i) amax = std::max(amax, std::fabs(xf[i]));
    const float scale = amax / 127.f;
    d[b] = scale;
    if (!(scale > 0.f)) {
      std::memset(q + k0, 0, kActBlock);
      continue;
    }
    int32_t codes[kActBlock];
#pragma omp simd
    for (int64_t i = 0; i < kActBlock; ++i) {  // clamped to [-127, 127] (NaN: -127), as branchless
      float v = std::nearbyint(xf[i] / scale);  // selects that vectorise
      v = v >= -127.f ? v : -127.f;
      v = v <= 127.f ? v : 127.f;
      codes[i] = (int32_t)v;
    }
    for (int64_t i = 0; i < kActBlock; ++i) q[k0 + i] = (int8_t)codes[i];
  }
}

// xsum[g] += sum of x^ = d * q over group g (< G) for the first Kp codes of a quantized row (a
// block's codes lie in one group; the decode paths add b * xsum per group, see the top).
inline void add_group_sums(const int8_t* q, const float* d, int64_t Kp, int64_t group_size,
                           int64_t G, float* xsum) {
  for (int64_t b = 0; b * kActBlock < Kp; ++b) {
    int32_t bsum = 0;
    for (int i = 0; i < kActBlock; ++i) bsum += q[b * kActBlock + i];
    xsum[std::min<int64_t>(G - 1, b * kActBlock / group_size)] += d[b] * (float)bsum;
  }
}

// Per call, what the block-wise integer paths (rows8_octets, portable_rows) scale their sums by.
struct BlockPlan {
  int64_t blocks;           // activation blocks of 32 codes covering K
  int64_t G;                // weight groups
  int64_t group_blocks;     // activation blocks per weight group (all of them when G == 1)
  std::vector<float> d;     // [M][blocks] activation scales
  std::vector<float> xsum;  // [M][G] sum over the group of x^ = d * q
};

// Quantizes the call's activation rows into p (blocks, groups, scales and group sums) and hands
// each row's codes to store(m, q) (q: int8 [p.blocks * kActBlock], zero past K), which lays
// them out as its kernel reads them. p's vectors keep their storage from call to call
// (thread_plan).
template <class Store>
void plan_blocks(const QMatmulArgs& a, BlockPlan& p, Store store) {
  p.blocks = (a.K + kActBlock - 1) / kActBlock;
  const int64_t Kp = p.blocks * kActBlock;
  p.G = (Kp + a.group_size - 1) / a.group_size;
  p.group_blocks = p.G == 1 ? p.blocks : a.group_size / kActBlock;
  thread_local std::vector<int8_t> q;
  q.resize(Kp);
  p.d.resize((size_t)(a.M * p.blocks));  // every scale is written by quantize_row
  p.xsum.assign((size_t)(a.M * p.G), 0.f);
  for (int64_t m = 0; m < a.M; ++m) {
    float* d = p.d.data() + m * p.blocks;
    quantize_row(a, m, Kp, q.data(), d);
    add_group_sums(q.data(), d, Kp, a.group_size, p.G, p.xsum.data() + m * p.G);
    store(m, q.data());
  }
}

// The calling thread's buffer for a call's fp32 products [M, N] (thread-local, so not allocated
// per call; valid until its next call), zero where K = 0: the decode paths write every product
// otherwise.
inline float* products_buffer(const QMatmulArgs& a) {
  thread_local std::vector<float> products;
  products.resize((size_t)(a.M * a.N));
  if (a.K == 0) std::fill(products.begin(), products.end(), 0.f);
  return products.data();
}

// The calling thread's plan of type Plan, made by make(a, plan): in thread-local storage, so
// that its vectors keep their memory from call to call instead of being allocated per call. It
// stays valid until this thread's next call that plans a Plan (the threads of the kernel's own
// parallel region only read it).
template <class Plan, class Make>
const Plan& thread_plan(const QMatmulArgs& a, Make make) {
  thread_local Plan plan;
  make(a, plan);
  return plan;
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

// ---- 3-bit codes on the row-interleaved layout (every x86 build) -----------------------------

// 3-bit blocks (split3_high_bit in common.h: low words t = 0, 1, high word h): nibble word v =
// 2t + q holds in byte i the codes 16t + 4i + q (low nibble) and 16t + 4i + q + 2 (high
// nibble): the low bits (word t >> 2q) at bits 0-1 and 4-5 and the high bits at bits 2 and 6,
// where h's bits v and v + 4 land when h is shifted by 2 - v (within each byte for |2 - v| <= 2
// and these positions). Bits 3 and 7 take whatever h has there: the planes' mask (0x07)
// drops them.
// T: the vectors' operations (Rows8Ymm, Rows8Zmm, Rows8Pair in the AVX2 and AVX-512 builds,
// Sse2Nibbles in the generic build on x86-64).
template <int V, class T>
PYENGINE_INLINE inline typename T::I rows8_nibbles3(typename T::I low0, typename T::I low1,
                                                    typename T::I high) {
  constexpr int kShift = 2 - V;
  const auto low = T::template srli16<2 * (V & 1)>(V >> 1 ? low1 : low0);
  auto hi = high;
  if constexpr (kShift > 0) hi = T::template slli16<kShift>(high);
  if constexpr (kShift < 0) hi = T::template srli16<-kShift>(high);
  return T::select(T::set8(0x33), low, hi);  // bits 0-1 and 4-5: low, the rest: high
}

// The code (within its block) that nibble `nibble` (0: low, 1: high) of byte `byte` of nibble
// word v (rows8_nibbles3) holds: 16t + 4 byte + q + 2 nibble for v = 2t + q.
constexpr int nibbles3_code(int v, int nibble, int byte) {
  return 16 * (v >> 1) + 4 * byte + (v & 1) + 2 * nibble;
}

#if defined(__AVX2__)
// ---- the integer path (AVX2, AVX-512) ---------------------------------------------------------

// vpdpbusd (AVX512_VNNI, also on 256-bit vectors with AVX512VL): acc.s32[i] += sum over j < 4 of
// u8.u8[4i + j] * s8.s8[4i + j], without saturation: no s16 pair sums to keep in range, so 8-bit
// codes are multiplied whole instead of as two nibbles, and narrower planes need not be shifted
// down (rows8_octets). The canonical-row kernels take it for 8-bit codes only: for 2, 3 and 4 bits
// there (one vpdpbusd per plane instead of vpmaddubsw and an s16 add) it measured between 2.5%
// slower and 4% faster on AMD Zen 4 (benchmarks/bench_cpu_vnni.py), for 8 bits 3-20% faster. The
// interleaved kernel takes it for every width, with the activations broadcast by the instruction
// (dpbusd_broadcast) and the planes scaled: about 20 vector instructions per 64 bytes of 2-bit
// codes instead of 32; 1.06-1.20x for 2, 3 and 4 bits with the weights streamed from memory on
// 2 threads (cpu_vnni_ab_all_widths.json), more where they sit in the caches.
// In inline assembly, so that the build needs no VNNI flag: the kernels take it only where
// vnni_enabled() (dispatch.cpp) says the CPU has it; the AVX2 build (AMD Zen 3 has no VNNI)
// never does.
#if defined(__AVX512BW__)
constexpr bool kVnniBuild = true;
template <class V>
PYENGINE_INLINE inline V dpbusd(V acc, V u8, V s8) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
  return acc;
}
// The same with the four activation bytes read from memory and broadcast to every lane by the
// instruction itself ({1to8}): one instruction where a broadcast load and vpdpbusd would be two.
PYENGINE_INLINE inline __m256i dpbusd_broadcast(__m256i acc, __m256i u8, const int32_t* s8x4) {
  asm("vpdpbusd %2%{1to8%}, %1, %0" : "+v"(acc) : "v"(u8), "m"(*s8x4));
  return acc;
}
PYENGINE_INLINE inline __m512i dpbusd_broadcast(__m512i acc, __m512i u8, const int32_t* s8x4) {
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(u8), "m"(*s8x4));
  return acc;
}
#else
constexpr bool kVnniBuild = false;
template <class V>
PYENGINE_INLINE inline V dpbusd(V acc, V, V) {
  return acc;  // never called: no VNNI path in this build
}
PYENGINE_INLINE inline __m256i dpbusd_broadcast(__m256i acc, __m256i, const int32_t*) {
  return acc;
}
#endif

#if defined(__AVX512BW__)
typedef __m512i VI;
typedef __m512 VF;
constexpr int kVB = 64;  // code bytes per step
inline VI vload(const void* p) { return _mm512_loadu_si512(p); }
inline VI vzeroi() { return _mm512_setzero_si512(); }
inline VI vset8(int v) { return _mm512_set1_epi8((char)v); }
inline VI vset16(int v) { return _mm512_set1_epi16((short)v); }
inline VI vand(VI a, VI b) { return _mm512_and_si512(a, b); }
template <int S>
inline VI vsrl16(VI a) { return _mm512_srli_epi16(a, S); }
inline VI vmaddubs(VI u8, VI s8) { return _mm512_maddubs_epi16(u8, s8); }
inline VI vadd16(VI a, VI b) { return _mm512_add_epi16(a, b); }
inline VI vadd32(VI a, VI b) { return _mm512_add_epi32(a, b); }
inline VI vmadd16(VI a, VI b) { return _mm512_madd_epi16(a, b); }
inline VF vcvt(VI a) { return _mm512_cvtepi32_ps(a); }
inline VF vloadf(const float* p) { return _mm512_loadu_ps(p); }
inline VF vbroadcast(const float* p) { return _mm512_set1_ps(*p); }
inline VF vpermute(VF v, VI idx) { return _mm512_permutexvar_ps(idx, v); }
inline VF vmul(VF a, VF b) { return _mm512_mul_ps(a, b); }
inline VF vfma(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
inline VF vzero() { return _mm512_setzero_ps(); }
inline float vsum(VF v) { return _mm512_reduce_add_ps(v); }
#else
typedef __m256i VI;
typedef __m256 VF;
constexpr int kVB = 32;
inline VI vload(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline VI vzeroi() { return _mm256_setzero_si256(); }
inline VI vset8(int v) { return _mm256_set1_epi8((char)v); }
inline VI vset16(int v) { return _mm256_set1_epi16((short)v); }
inline VI vand(VI a, VI b) { return _mm256_and_si256(a, b); }
template <int S>
inline VI vsrl16(VI a) { return _mm256_srli_epi16(a, S); }
inline VI vmaddubs(VI u8, VI s8) { return _mm256_maddubs_epi16(u8, s8); }
inline VI vadd16(VI a, VI b) { return _mm256_add_epi16(a, b); }
inline VI vadd32(VI a, VI b) { return _mm256_add_epi32(a, b); }
inline VI vmadd16(VI a, VI b) { return _mm256_madd_epi16(a, b); }
inline VF vcvt(VI a) { return _mm256_cvtepi32_ps(a); }
inline VF vloadf(const float* p) { return _mm256_loadu_ps(p); }
inline VF vbroadcast(const float* p) { return _mm256_broadcast_ss(p); }
inline VF vpermute(VF v, VI idx) { return _mm256_permutevar8x32_ps(v, idx); }
inline VF vmul(VF a, VF b) { return _mm256_mul_ps(a, b); }
inline VF vfma(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
inline VF vzero() { return _mm256_setzero_ps(); }
inline float vsum(VF v) {
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}
#endif
constexpr int kLanes = kVB / 4;  // 32-bit lanes per step (2, 4, 8 bits: a packed word each)
constexpr int kMaxRowBlock = 4;  // activation rows per pass over a weight row

// The step of BITS-bit codes. 2, 4 and 8 bits: kVB packed code bytes, read as kCodesPerByte
// planes. 3 bits: 2 * kVB codes, decoded (decode3) from the 3 * kVB / 4 packed bytes that hold
// them into two vectors of one code per byte, the step's two planes.
template <int BITS>
struct Act8Layout {
  static constexpr int kCodesPerByte = BITS == 3 ? 1 : 8 / BITS;  // of a plane
  static constexpr int kPlanes = BITS == 3 ? 2 : kCodesPerByte;  // activation planes per step
  static constexpr int kStepCodes = kVB * kPlanes;
  static constexpr int kStepWords = kStepCodes * BITS / 32;  // packed words of a step
  // Words a step's load reads: its own, and for 3 bits a few after them (see decode3)
  static constexpr int kLoadWords = BITS == 3 ? kVB / 4 : kStepWords;
  static constexpr int kLaneCodes = 4 * kPlanes;  // codes per 32-bit lane (over the planes)
  // Field mask of a plane; 8-bit codes are split into two nibbles (see step_dot).
  static constexpr int kMask = BITS == 8 ? 0x0F : (1 << BITS) - 1;
  // The code that byte i of plane j of a step holds, relative to the step's first code: the
  // canonical packing for 2, 4 and 8 bits (see the top); for 3 bits decode3's order, codes
  // 16j .. 16j + 15 of block i / 16 in pairs swapped.
  static constexpr int code_of(int i, int j) {
    return BITS == 3 ? 32 * (i / 16) + 16 * j + ((i % 16) ^ 1) : kCodesPerByte * i + j;
  }
};

// ---- 3-bit codes to bytes ----------------------------------------------------------------------
// A 3-bit step is kVB / 16 blocks of 32 codes (2 with AVX2, 4 with AVX-512), 12 packed bytes
// each: the stream of docs/FORMAT.md (code c of a block at bits [3c, 3c + 3) of its bytes read
// as one little-endian number). decode3 gives 128-bit lane L of both planes block L's codes,
// codes 0 .. 15 to plane 0 and 16 .. 31 to plane 1, so that a 32-bit lane of the two planes
// together (8 codes) lies in one activation block and one weight group, as the wider codes'
// lanes do. Three moves:
//  1. dword permutation: lane L receives the step's dwords 3L .. 3L + 3, block L's 12 bytes
//     and 4 after them (a 32-byte load with AVX2, 64 bytes with AVX-512).
//  2. per plane j, a byte shuffle builds for 16-bit word t of a lane (t < 8) the little-endian
//     value of the two bytes from stream byte (48j + 6t) / 8: the block's codes 16j + 2t (the
//     even one) and 16j + 2t + 1 (the odd one) at bits e = 6t mod 8 and e + 3 of it (e <= 6,
//     so both lie within the two bytes; 48j is a multiple of 8).
//  3. unsigned multiplies move each code into place within the word: the low 16 bits of the
//     value times 2^(8 - e) put the even code at bits 8..10; the high 16 bits of the value
//     times 2^(13 - e) shift it right by e + 3, the odd code to bits 0..2; masks clear the
//     rest (one ternary logic operation with AVX-512).
// So byte 2t of a plane's lane holds the odd code and byte 2t + 1 the even one (the
// activations are permuted to match, Act8Layout::code_of). The shuffles read at most byte
// 6 + 5 + 1 = 12 of a lane.
struct Decode3 {
  VI lane_dwords;     // move 1
  VI word_bytes[2];   // move 2, per plane
  VI even_mul, odd_mul, even_mask, odd_mask;  // move 3
};

inline Decode3 decode3_constants() {
  constexpr int lanes = kVB / 16;
  alignas(64) int32_t dwords[kVB / 4];
  alignas(64) int8_t word_bytes[2][kVB];
  alignas(64) uint16_t even_mul[kVB / 2], odd_mul[kVB / 2];
  for (int lane = 0; lane < lanes; ++lane) {
    for (int d = 0; d < 4; ++d) dwords[4 * lane + d] = 3 * lane + d;
    for (int t = 0; t < 8; ++t) {
      for (int j = 0; j < 2; ++j)
        for (int h = 0; h < 2; ++h)
          word_bytes[j][16 * lane + 2 * t + h] = (int8_t)((48 * j + 6 * t) / 8 + h);
      const int e = 6 * t % 8;
      even_mul[8 * lane + t] = (uint16_t)(1u << (8 - e));
      odd_mul[8 * lane + t] = (uint16_t)(1u << (13 - e));
    }
  }
  return Decode3{vload(dwords), {vload(word_bytes[0]), vload(word_bytes[1])},
                 vload(even_mul), vload(odd_mul), vset16(0x0700), vset16(0x0007)};
}

// The two planes of code bytes of the 3-bit step at `words` (reads kLoadWords words).
PYENGINE_INLINE inline void decode3(const uint32_t* words, const Decode3& c, VI* planes) {
#if defined(__AVX512BW__)
  const VI src = _mm512_permutexvar_epi32(c.lane_dwords, vload(words));
  for (int j = 0; j < 2; ++j) {
    const VI pair = _mm512_shuffle_epi8(src, c.word_bytes[j]);
    const VI odd = _mm512_and_si512(_mm512_mulhi_epu16(pair, c.odd_mul), c.odd_mask);
    planes[j] = _mm512_ternarylogic_epi32(_mm512_mullo_epi16(pair, c.even_mul), c.even_mask,
                                          odd, 0xEA);  // (even & even_mask) | odd
  }
#else
  const VI src = _mm256_permutevar8x32_epi32(vload(words), c.lane_dwords);
  for (int j = 0; j < 2; ++j) {
    const VI pair = _mm256_shuffle_epi8(src, c.word_bytes[j]);
    planes[j] = _mm256_or_si256(
        _mm256_and_si256(_mm256_mullo_epi16(pair, c.even_mul), c.even_mask),
        _mm256_and_si256(_mm256_mulhi_epu16(pair, c.odd_mul), c.odd_mask));
  }
#endif
}

// Per call: the quantized activations in step order and what each step's lanes are scaled by.
struct Act8Plan {
  int64_t Kp;            // K rounded up to whole 32-code blocks
  int64_t steps;         // steps per row (the last may reach past Kp: zero activations there)
  int64_t full_steps;    // steps whose load lies within every row (the rest: the last one)
  int64_t row_words;     // packed words of a row's Kp codes
  int64_t G;             // weight groups covering Kp
  int64_t in_place_rows; // rows n < this read their last step in place (see qmatmul_kernels)
  std::vector<int8_t> xp;       // [M][steps][planes][kVB] permuted int8 activations
  // [M][row_blocks] activation scale of each block of kActBlock codes (row_blocks: the steps'
  // blocks plus kLanes of padding, so that a step's vector load stays within its row); a
  // step's lane scales are one permutation of its first kLanes blocks (lane_block)
  std::vector<float> block_d;
  int64_t row_blocks;
  std::vector<int32_t> lane_block;  // [kLanes] block of lane u relative to the step's first
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
  // steps whose load lies within the row (3 bits: a load reads past the step's own words)
  p.full_steps = p.row_words >= L::kLoadWords
                     ? (p.row_words - L::kLoadWords) / L::kStepWords + 1 : 0;
  p.G = (p.Kp + a.group_size - 1) / a.group_size;
  const int64_t chunk_end = (p.steps - 1) * L::kStepWords + L::kLoadWords;  // the last load's end
  const int64_t data_end = (a.N - 1) * a.ldq + p.row_words;
  p.in_place_rows = chunk_end <= data_end ? (data_end - chunk_end) / a.ldq + 1 : 0;
  const int64_t codes = p.steps * L::kStepCodes;  // a multiple of kActBlock
  const int64_t blocks = codes / kActBlock;
  std::vector<int8_t> q(codes);
  std::vector<float> d(blocks);
  p.xp.assign((size_t)(a.M * codes), 0);
  p.row_blocks = blocks + kLanes;
  p.block_d.assign((size_t)(a.M * p.row_blocks), 0.f);
  p.lane_block.resize(kLanes);
  for (int u = 0; u < kLanes; ++u) p.lane_block[u] = (int32_t)(L::kLaneCodes * u / kActBlock);
  p.xsum.assign((size_t)(a.M * p.G), 0.f);
  auto group_of = [&](int64_t k) { return std::min<int64_t>(p.G - 1, k / a.group_size); };
  for (int64_t m = 0; m < a.M; ++m) {
    quantize_row(a, m, codes, q.data(), d.data());
    add_group_sums(q.data(), d.data(), p.Kp, a.group_size, p.G, p.xsum.data() + m * p.G);
    int8_t* xm = p.xp.data() + m * codes;
    for (int64_t s = 0; s < p.steps; ++s) {
      for (int j = 0; j < L::kPlanes; ++j)
        for (int i = 0; i < kVB; ++i)
          xm[(s * L::kPlanes + j) * kVB + i] = q[s * L::kStepCodes + L::code_of(i, j)];
    }
    std::copy(d.begin(), d.end(), p.block_d.begin() + m * p.row_blocks);
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

// The integer dot products of one step of one weight row: 32-bit lane u = sum of c[k] * q[k]
// over the codes of the step's packed word u. xv: the step's activation planes.
//  * 2 and 4 bits: plane j = (bytes >> BITS * j) & mask; vpmaddubsw (u8 codes x s8
//    activations -> s16 pairs) per plane, summed, then vpmaddwd by ones (-> s32 lanes).
//  * 8 bits: c = 16 * hi + lo with nibbles <= 15, so that the s16 pairs of vpmaddubsw stay in
//    range (2 * 255 * 127 would not); hi's pairs are weighted by 16 in vpmaddwd.
//  * 3 bits: bytes[0], bytes[1] are the step's decoded planes (decode3).
// VNNI (8-bit codes): the same sums by one vpdpbusd (dpbusd), the codes whole.
template <int BITS, bool VNNI>
PYENGINE_INLINE inline VI step_dot(const VI* bytes, const VI* xv, VI mask, VI ones,
                                   VI sixteens) {
  using L = Act8Layout<BITS>;
  if constexpr (VNNI) {
    static_assert(BITS == 8, "vpdpbusd is taken for 8-bit codes only");
    return dpbusd(vzeroi(), bytes[0], xv[0]);
  } else if constexpr (BITS == 3) {
    return vmadd16(vadd16(vmaddubs(bytes[0], xv[0]), vmaddubs(bytes[1], xv[1])), ones);
  } else if constexpr (BITS == 8) {
    const VI lo = vmaddubs(vand(bytes[0], mask), xv[0]);
    const VI hi = vmaddubs(vand(vsrl16<4>(bytes[0]), mask), xv[0]);
    return vadd32(vmadd16(lo, ones), vmadd16(hi, sixteens));
  } else {
    VI pairs = vmaddubs(vand(bytes[0], mask), xv[0]);
    unroll<L::kPlanes - 1>([&](auto j) PYENGINE_INLINE {
      constexpr int J = decltype(j)::value + 1;
      pairs = vadd16(pairs, vmaddubs(vand(vsrl16<BITS * J>(bytes[0]), mask), xv[J]));
    });
    return vmadd16(pairs, ones);
  }
}
// The s16 pair sums stay in range: P planes of codes <= 2^BITS - 1 times |q| <= 127, two per
// pair: 2 * P * (2^BITS - 1) * 127 <= 7620 for BITS = 4, 3048 for BITS = 2, 3556 for BITS = 3
// and 3810 per nibble for BITS = 8.
static_assert(2 * 2 * 15 * 127 < 32767 && 2 * 4 * 3 * 127 < 32767 && 2 * 2 * 7 * 127 < 32767 &&
              2 * 15 * 127 < 32767, "vpmaddubsw pair sums");

// sum_g bf[g] * xsum[g] over g < G added to the lanes of acc (masked vector loads: no
// horizontal sum of its own; the caller's sum of acc's lanes takes it).
inline VF add_dot(VF acc, const float* bf, const float* xsum, int64_t G) {
  int64_t g = 0;
  for (; g + kLanes <= G; g += kLanes) acc = vfma(vloadf(bf + g), vloadf(xsum + g), acc);
  if (g < G) {
#if defined(__AVX512BW__)
    const __mmask16 m = (__mmask16)((1u << (G - g)) - 1u);
    acc = vfma(_mm512_maskz_loadu_ps(m, bf + g), _mm512_maskz_loadu_ps(m, xsum + g), acc);
#else
    const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(G - g)),
                                         _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    acc = vfma(_mm256_maskload_ps(bf + g, m), _mm256_maskload_ps(xsum + g, m), acc);
#endif
  }
  return acc;
}

// Weight row n against activation rows [m0, m0 + MB): out32[m][n]. sf, bf: the row's group
// parameters (sf readable kLanes floats past its G; see group_params: w = c * sf + bf). tail:
// zeroed scratch for a last step that reaches past the call's last row.
//
// GROUP_STEPS: every step lies within one weight group (the group size a multiple of the step's
// codes, or one group per row): the lane sums of a group's steps are scaled by the activation
// scales only, and the group's sum by its weight scale once (a broadcast). Otherwise each step's
// lane scales come from one permutation of consecutive group scales (Act8Plan::offset).
//
// One row at a time, its words read in order: weights come from memory as one sequential
// stream (reading several rows side by side was slower from DRAM on AMD Zen 4, though faster
// from the caches).
template <int BITS, int MB, bool GROUP_STEPS, bool VNNI>
void act8_row(const QMatmulArgs& a, const Act8Plan& p, int64_t m0, int64_t n,
              const float* __restrict sf, const float* __restrict bf, const Decode3& dec3,
              uint8_t* tail, float* out32) {
  using L = Act8Layout<BITS>;
  constexpr int P = L::kPlanes;
  const VI mask = vset8(L::kMask), ones = vset16(1), sixteens = vset16(16);
  const int64_t steps = p.steps, full_steps = p.full_steps;
  const int8_t* __restrict xbase = p.xp.data() + m0 * steps * L::kStepCodes;
  const float* __restrict dbase = p.block_d.data() + m0 * p.row_blocks;
  constexpr int kStepBlocks = L::kStepCodes / (int)kActBlock;  // activation blocks per step
  const VI lane_block = vload(p.lane_block.data());
  const int32_t* __restrict offsets = p.offset.data();
  const int32_t* __restrict group0 = p.group0.data();
  const uint32_t* __restrict wrow = a.qweight + n * a.ldq;
  // The accumulators are indexed by compile-time constants only (unroll), so that they live in
  // registers: a loop over an array of vectors keeps them in memory.
  VF acc[MB], gacc[MB];
  unroll<MB>([&](auto m) PYENGINE_INLINE { acc[m] = vzero(); });
  // One step s: into gacc (GROUP_STEPS: lane sums scaled by the activation scales) or acc (by
  // activation and weight scales). `last`: the row's last step, copied to tail when the row
  // is past Act8Plan::in_place_rows.
  auto step = [&](int64_t s, bool last) PYENGINE_INLINE {
    const uint32_t* words = wrow + s * L::kStepWords;
    if (last && n >= p.in_place_rows) {
      std::memcpy(tail, words, (size_t)(p.row_words - s * L::kStepWords) * 4);
      words = reinterpret_cast<const uint32_t*>(tail);
    }
    VI bytes[BITS == 3 ? 2 : 1];
    if constexpr (BITS == 3) decode3(words, dec3, bytes);
    else bytes[0] = vload(words);
    VF scale;
    if constexpr (!GROUP_STEPS) scale = vpermute(vloadf(sf + group0[s]), vload(offsets + s * kLanes));
    unroll<MB>([&](auto m) PYENGINE_INLINE {
      VI xv[P];
      unroll<P>([&](auto j) PYENGINE_INLINE {
        xv[j] = vload(xbase + ((m * steps + s) * P + j) * kVB);
      });
      const VF d = vpermute(vloadf(dbase + m * p.row_blocks + s * kStepBlocks), lane_block);
      const VF lanes = vcvt(step_dot<BITS, VNNI>(bytes, xv, mask, ones, sixteens));
      if constexpr (GROUP_STEPS) gacc[m] = vfma(lanes, d, gacc[m]);
      else acc[m] = vfma(lanes, vmul(d, scale), acc[m]);
    });
  };
  if constexpr (GROUP_STEPS) {
    const int64_t per_group = p.G == 1 ? steps : a.group_size / L::kStepCodes;
    if (per_group == 1) {  // a step per group: one loop (the nest below costs more per step)
      auto group_step = [&](int64_t s, bool last) PYENGINE_INLINE {
        unroll<MB>([&](auto m) PYENGINE_INLINE { gacc[m] = vzero(); });
        step(s, last);
        const VF scale = vbroadcast(sf + s);
        unroll<MB>([&](auto m) PYENGINE_INLINE { acc[m] = vfma(gacc[m], scale, acc[m]); });
      };
      for (int64_t s = 0; s < full_steps; ++s) group_step(s, false);
      for (int64_t s = full_steps; s < steps; ++s) group_step(s, true);
    } else {
      for (int64_t s0 = 0, g = 0; s0 < steps; s0 += per_group, ++g) {
        const int64_t s1 = std::min(steps, s0 + per_group);
        unroll<MB>([&](auto m) PYENGINE_INLINE { gacc[m] = vzero(); });
        const int64_t s_full = std::min(s1, full_steps);
        for (int64_t s = s0; s < s_full; ++s) step(s, false);
        for (int64_t s = s_full; s < s1; ++s) step(s, true);
        const VF scale = vbroadcast(sf + g);
        unroll<MB>([&](auto m) PYENGINE_INLINE { acc[m] = vfma(gacc[m], scale, acc[m]); });
      }
    }
  } else {
    for (int64_t s = 0; s < full_steps; ++s) step(s, false);
    for (int64_t s = full_steps; s < steps; ++s) step(s, true);
  }
  unroll<MB>([&](auto m) PYENGINE_INLINE {
    out32[(m0 + m) * a.N + n] = vsum(add_dot(acc[m], bf, p.xsum.data() + (m0 + m) * p.G, p.G));
  });
}

// Weight rows [lo, hi) for the activation rows [m0, m0 + MB). The group parameters of up to
// kParamRows rows are converted in one pass when the rows' scales lie back to back.
constexpr int64_t kParamRows = 16;

template <int BITS, int MB, bool GROUP_STEPS, bool VNNI>
void act8_rows(const QMatmulArgs& a, const Act8Plan& p, int64_t m0, int64_t lo, int64_t hi,
               float* sf, float* bf, const Decode3& dec3, uint8_t* tail, float* out32) {
  const int64_t G = p.G;
  const float symmetric_zero = (float)(1 << (BITS - 1));
  for (int64_t n0 = lo; n0 < hi; n0 += kParamRows) {
    const int64_t rows = std::min(kParamRows, hi - n0);
    if (a.lds == G) {
      group_params(a, n0, rows * G, 1.f, symmetric_zero, sf, bf);
    } else {
      for (int64_t r = 0; r < rows; ++r)
        group_params(a, n0 + r, G, 1.f, symmetric_zero, sf + r * G, bf + r * G);
    }
    for (int64_t r = 0; r < rows; ++r)
      act8_row<BITS, MB, GROUP_STEPS, VNNI>(a, p, m0, n0 + r, sf + r * G, bf + r * G, dec3,
                                            tail, out32);
  }
}

template <int BITS, bool GROUP_STEPS, bool VNNI>
void act8_decode_with(const QMatmulArgs& a, const Act8Plan& p, float* out32) {
  const Decode3 dec3 = BITS == 3 ? decode3_constants() : Decode3{};
  parallel_rows(a, p.Kp * BITS / 8, [&](int64_t lo, int64_t hi) {
    // group parameters of kParamRows rows; sf padded: a permutation reads kLanes floats
    std::vector<float> sf(kParamRows * p.G + kLanes, 0.f), bf(kParamRows * p.G);
    alignas(64) uint8_t tail[kVB] = {};
    for (int64_t m0 = 0; m0 < a.M; m0 += kMaxRowBlock) {
      auto rows = [&](auto mb) PYENGINE_INLINE {
        act8_rows<BITS, decltype(mb)::value, GROUP_STEPS, VNNI>(a, p, m0, lo, hi, sf.data(),
                                                                bf.data(), dec3, tail, out32);
      };
      switch (std::min<int64_t>(kMaxRowBlock, a.M - m0)) {
        case 1: rows(std::integral_constant<int, 1>{}); break;
        case 2: rows(std::integral_constant<int, 2>{}); break;
        case 3: rows(std::integral_constant<int, 3>{}); break;
        default: rows(std::integral_constant<int, kMaxRowBlock>{});
      }
    }
  });
}

template <int BITS>
void act8_decode(const QMatmulArgs& a, float* out32) {
  using L = Act8Layout<BITS>;
  const Act8Plan p = plan_act8<BITS>(a);
  const bool group_steps = p.G == 1 || a.group_size % L::kStepCodes == 0;
  constexpr bool kVnni = BITS == 8 && kVnniBuild;  // see dpbusd
  if (kVnni && vnni_enabled()) {
    if (group_steps) act8_decode_with<BITS, true, kVnni>(a, p, out32);
    else act8_decode_with<BITS, false, kVnni>(a, p, out32);
  } else {
    if (group_steps) act8_decode_with<BITS, true, false>(a, p, out32);
    else act8_decode_with<BITS, false, false>(a, p, out32);
  }
}

// ---- the row-interleaved layout (QMatmulArgs::interleave = 8) ---------------------------------
// Eight weight rows side by side: a 256-bit load of 8 consecutive words holds word w of each of
// the eight rows, one per 32-bit lane, so that the eight dot products of an octet of rows
// accumulate in the lanes of one vector (no horizontal sums, one group-parameter vector per
// group for all eight rows) while the weights stream from memory in order. Code j of word w of
// a row is k = w * c + j (c = 32 / BITS), so byte i of plane p = (word >> BITS * p) & mask is
// code c / 4 * i + p: each (word, plane) meets 4 activation bytes, broadcast to every lane.
// 256-bit vectors in the AVX2 build; in the AVX-512 build too where the CPU runs 512-bit
// operations as two 256-bit halves (AMD Zen 4), else 512-bit vectors over two octets (Rows8Zmm).
template <int BITS>
struct Rows8Layout {
  static constexpr int kBlockWords = BITS;  // words of a row per activation block (32 codes)
  // Words of plane bytes per block: the loaded words (2, 4, 8 bits) or, for 3 bits, the four
  // nibble words rows8_nibbles3 builds from a block's three
  static constexpr int kPlaneWords = BITS == 3 ? 4 : BITS;
  static constexpr int kPlanes = BITS == 3 ? 2 : 8 / BITS;  // planes per plane word
  static constexpr int kPlaneShift = BITS == 3 ? 4 : BITS;  // plane p = (word >> shift * p) & mask
  // 8-bit codes are split into nibbles (see rows8_octets); 3-bit nibbles carry a junk bit 3
  static constexpr int kMask = BITS == 8 ? 0x0F : BITS == 3 ? 0x07 : (1 << BITS) - 1;
  // The code (within its block) that byte i of plane p of plane word v meets: the canonical
  // packing for 2, 4 and 8 bits; for 3 bits that of rows8_nibbles3.
  static constexpr int code_of(int v, int p, int i) {
    return BITS == 3 ? nibbles3_code(v, p, i) : v * (32 / BITS) + (8 / BITS) * i + p;
  }
};
constexpr int kInterleave = 8;

struct Rows8Plan : BlockPlan {
  std::vector<int32_t> xq;  // [M][plane words][planes] the 4 activation bytes of each
};

template <int BITS>
void plan_rows8(const QMatmulArgs& a, Rows8Plan& p) {
  using L = Rows8Layout<BITS>;
  const int64_t words = (a.K + kActBlock - 1) / kActBlock * L::kPlaneWords;
  p.xq.resize((size_t)(a.M * words * L::kPlanes));  // every byte is laid out below
  // A block's 32 activation bytes in the order the kernel reads them: byte (v * kPlanes + pl) * 4
  // + i meets code code_of(v, pl, i) (kPlaneWords * kPlanes * 4 = 32 for every width).
  static_assert(L::kPlaneWords * L::kPlanes * 4 == kActBlock, "one block per 32 bytes");
  static constexpr auto kOrder = [] {
    std::array<uint8_t, kActBlock> order{};
    for (int v = 0; v < L::kPlaneWords; ++v)
      for (int pl = 0; pl < L::kPlanes; ++pl)
        for (int i = 0; i < 4; ++i) order[(v * L::kPlanes + pl) * 4 + i] = L::code_of(v, pl, i);
    return order;
  }();
  plan_blocks(a, p, [&](int64_t m, const int8_t* q) {
    int8_t* xm = reinterpret_cast<int8_t*>(p.xq.data() + m * words * L::kPlanes);
    for (int64_t b = 0; b < words / L::kPlaneWords; ++b)
      for (int t = 0; t < (int)kActBlock; ++t)
        xm[b * kActBlock + t] = q[b * kActBlock + kOrder[t]];
  });
}

// Eight lanes of group parameters: row 8o + r's scale and -zero * scale of group g.
inline void rows8_params(const QMatmulArgs& a, const float symmetric_zero, int64_t offset,
                         __m256* s, __m256* b) {
  __m256 z;
  switch (a.sz_dtype) {
    case kFloat32:
      *s = _mm256_loadu_ps(static_cast<const float*>(a.scales) + offset);
      z = a.zeros ? _mm256_loadu_ps(static_cast<const float*>(a.zeros) + offset)
                  : _mm256_set1_ps(symmetric_zero);
      break;
    case kFloat16:
      *s = _mm256_cvtph_ps(_mm_loadu_si128(
          reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(a.scales) + offset)));
      z = a.zeros ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(
                        static_cast<const uint16_t*>(a.zeros) + offset)))
                  : _mm256_set1_ps(symmetric_zero);
      break;
    default: {  // bfloat16: the top half of a float32
      auto widen = [](const void* base, int64_t off) {
        const __m128i h =
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + off));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
      };
      *s = widen(a.scales, offset);
      z = a.zeros ? widen(a.zeros, offset) : _mm256_set1_ps(symmetric_zero);
    }
  }
  *b = _mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), z), *s);
}

// The interleaved kernel's vectors. Rows8Ymm: one octet per 256-bit vector (word w of its
// eight rows, one per lane). Rows8Zmm (AVX-512): two octets per 512-bit vector, word w of octet
// o in lanes 0-7 and of octet o + 1 in lanes 8-15 (a 256-bit load from each octet's stream and
// one insert), so that each instruction serves 16 rows: on CPUs that run 512-bit operations at
// full width (Intel's AVX-512 cores: two 512-bit ports for the dot products, against three
// 256-bit ones) the decode kernel is bound by these instructions for 2, 3 and 4 bits, and
// 512-bit ones do nearly twice the work per cycle; AMD Zen 4 splits them in two 256-bit halves
// (zmm_rows_enabled, dispatch.cpp). Both give the same bits: the lanes compute the same sums.
struct Rows8Ymm {
  static constexpr int kOctets = 1;
  // How far ahead of a block's loads each octet's weight stream is prefetched (at M = 1 with
  // prefetch_enabled); Intel's L2 streamer stops at every 4 KiB boundary of a stream. On an
  // Intel Xeon (6/207) this made the interleaved kernel 1.03-1.23x faster in the AVX2 build and
  // 1.08-1.21x on the AVX-512 build's 256-bit vectors, 2/3/4/8 bits, 2 threads
  // (bench_cpu_vnni.py --switch prefetch); 512 to 2048 bytes ahead measured alike, 1024 taken.
  static constexpr int64_t kPrefetchBytes = 1024;
  using I = __m256i;
  using F = __m256;
  // stored word w of the octets at `base` (octet stride `stride` words), one per lane
  static I load(const uint32_t* base, int64_t, int64_t w) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + w * kInterleave));
  }
  static I zero() { return _mm256_setzero_si256(); }
  static I set8(int v) { return _mm256_set1_epi8((char)v); }
  static I set16(int v) { return _mm256_set1_epi16((short)v); }
  static I broadcast32(const int32_t* p) { return _mm256_set1_epi32(*p); }
  static I and_(I a, I b) { return _mm256_and_si256(a, b); }
  // c ? a : b bitwise
  static I select(I c, I a, I b) {
#if defined(__AVX512VL__)
    return _mm256_ternarylogic_epi32(a, b, c, 0xE4);
#else
    return _mm256_xor_si256(_mm256_and_si256(_mm256_xor_si256(a, b), c), b);
#endif
  }
  template <int S> static I srli16(I a) { return _mm256_srli_epi16(a, S); }
  template <int S> static I slli16(I a) { return _mm256_slli_epi16(a, S); }
  template <int S> static I srai16(I a) { return _mm256_srai_epi16(a, S); }
  template <int S> static I srai32(I a) { return _mm256_srai_epi32(a, S); }
  static I add16(I a, I b) { return _mm256_add_epi16(a, b); }
  static I add32(I a, I b) { return _mm256_add_epi32(a, b); }
  static I maddubs(I u8, I s8) { return _mm256_maddubs_epi16(u8, s8); }
  static I madd16(I a, I b) { return _mm256_madd_epi16(a, b); }
  static I dpbusd_x(I acc, I u8, const int32_t* x) { return dpbusd_broadcast(acc, u8, x); }
  static F zerof() { return _mm256_setzero_ps(); }
  static F cvt(I a) { return _mm256_cvtepi32_ps(a); }
  static F broadcastf(const float* p) { return _mm256_broadcast_ss(p); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  // group parameters at `offset` (the next octet's `stride` elements on)
  static void params(const QMatmulArgs& a, float symmetric_zero, int64_t offset, int64_t,
                     F* s, F* b) {
    rows8_params(a, symmetric_zero, offset, s, b);
  }
};

#if defined(__AVX512BW__)
struct Rows8Zmm {
  static constexpr int kOctets = 2;
  // As Rows8Ymm's. Before the prefetch reached past an octet's stream into the next group's
  // (rows8_octets), 3 of the 4 streams of a pair began unprefetched and the 512-bit kernel
  // gained little or lost (0.95-1.10x); since, on the same Xeon: 1.03-1.07x on 14336 x 4096
  // and 4096 x 14336, 1.04-1.24x on 576 x 1536 and 1536 x 576, 2/3/4/8 bits, 2 threads
  // (bench_cpu_vnni.py --switch prefetch, cpu_prefetch_ab_zmm.json).
  static constexpr int64_t kPrefetchBytes = 1024;
  using I = __m512i;
  using F = __m512;
  static I load(const uint32_t* base, int64_t stride, int64_t w) {
    const __m256i first = Rows8Ymm::load(base, stride, w);
    const __m256i second = Rows8Ymm::load(base + stride, stride, w);
    return _mm512_inserti64x4(_mm512_castsi256_si512(first), second, 1);
  }
  static I zero() { return _mm512_setzero_si512(); }
  static I set8(int v) { return _mm512_set1_epi8((char)v); }
  static I set16(int v) { return _mm512_set1_epi16((short)v); }
  static I broadcast32(const int32_t* p) { return _mm512_set1_epi32(*p); }
  static I and_(I a, I b) { return _mm512_and_si512(a, b); }
  static I select(I c, I a, I b) { return _mm512_ternarylogic_epi32(a, b, c, 0xE4); }
  template <int S> static I srli16(I a) { return _mm512_srli_epi16(a, S); }
  template <int S> static I slli16(I a) { return _mm512_slli_epi16(a, S); }
  template <int S> static I srai16(I a) { return _mm512_srai_epi16(a, S); }
  template <int S> static I srai32(I a) { return _mm512_srai_epi32(a, S); }
  static I add16(I a, I b) { return _mm512_add_epi16(a, b); }
  static I add32(I a, I b) { return _mm512_add_epi32(a, b); }
  static I maddubs(I u8, I s8) { return _mm512_maddubs_epi16(u8, s8); }
  static I madd16(I a, I b) { return _mm512_madd_epi16(a, b); }
  static I dpbusd_x(I acc, I u8, const int32_t* x) { return dpbusd_broadcast(acc, u8, x); }
  static F zerof() { return _mm512_setzero_ps(); }
  static F cvt(I a) { return _mm512_cvtepi32_ps(a); }
  static F broadcastf(const float* p) { return _mm512_set1_ps(*p); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }  // the two octets' outputs
  static void params(const QMatmulArgs& a, float symmetric_zero, int64_t offset, int64_t stride,
                     F* s, F* b) {
    __m256 s0, b0, s1, b1;
    rows8_params(a, symmetric_zero, offset, &s0, &b0);
    rows8_params(a, symmetric_zero, offset + stride, &s1, &b1);
    *s = _mm512_insertf32x8(_mm512_castps256_ps512(s0), s1, 1);
    *b = _mm512_insertf32x8(_mm512_castps256_ps512(b0), b1, 1);
  }
};
#endif

// Rows8Pair<V>: two of V's octet groups side by side in a pair of its vectors (V::kOctets
// octets from o in `first`, the next V::kOctets in `second`), every operation done on both, the
// activation broadcasts and constants shared. The same instructions per byte as V, but two
// independent weight streams and dependency chains in flight instead of one; taken at M = 1
// (more activation rows would spill the pairs' accumulators). Same bits: the lanes compute the
// same sums.
template <class V>
struct Rows8Pair {
  static constexpr int kOctets = 2 * V::kOctets;
  static constexpr int64_t kPrefetchBytes = V::kPrefetchBytes;
  struct I {
    typename V::I first, second;
  };
  struct F {
    typename V::F first, second;
  };
  static I both(typename V::I v) { return {v, v}; }
  static I load(const uint32_t* base, int64_t stride, int64_t w) {
    return {V::load(base, stride, w), V::load(base + V::kOctets * stride, stride, w)};
  }
  static I zero() { return both(V::zero()); }
  static I set8(int v) { return both(V::set8(v)); }
  static I set16(int v) { return both(V::set16(v)); }
  static I broadcast32(const int32_t* p) { return both(V::broadcast32(p)); }
  static I and_(I a, I b) { return {V::and_(a.first, b.first), V::and_(a.second, b.second)}; }
  static I select(I c, I a, I b) {
    return {V::select(c.first, a.first, b.first), V::select(c.second, a.second, b.second)};
  }
  template <int S> static I srli16(I a) {
    return {V::template srli16<S>(a.first), V::template srli16<S>(a.second)};
  }
  template <int S> static I slli16(I a) {
    return {V::template slli16<S>(a.first), V::template slli16<S>(a.second)};
  }
  template <int S> static I srai16(I a) {
    return {V::template srai16<S>(a.first), V::template srai16<S>(a.second)};
  }
  template <int S> static I srai32(I a) {
    return {V::template srai32<S>(a.first), V::template srai32<S>(a.second)};
  }
  static I add16(I a, I b) { return {V::add16(a.first, b.first), V::add16(a.second, b.second)}; }
  static I add32(I a, I b) { return {V::add32(a.first, b.first), V::add32(a.second, b.second)}; }
  static I maddubs(I u8, I s8) {
    return {V::maddubs(u8.first, s8.first), V::maddubs(u8.second, s8.second)};
  }
  static I madd16(I a, I b) { return {V::madd16(a.first, b.first), V::madd16(a.second, b.second)}; }
  static I dpbusd_x(I acc, I u8, const int32_t* x) {
    return {V::dpbusd_x(acc.first, u8.first, x), V::dpbusd_x(acc.second, u8.second, x)};
  }
  static F zerof() { return {V::zerof(), V::zerof()}; }
  static F cvt(I a) { return {V::cvt(a.first), V::cvt(a.second)}; }
  static F broadcastf(const float* p) {
    const typename V::F v = V::broadcastf(p);
    return {v, v};
  }
  static F fmadd(F a, F b, F c) {
    return {V::fmadd(a.first, b.first, c.first), V::fmadd(a.second, b.second, c.second)};
  }
  // the octets' outputs, side by side
  static void store(float* p, F v) {
    V::store(p, v.first);
    V::store(p + V::kOctets * kInterleave, v.second);
  }
  static void params(const QMatmulArgs& a, float symmetric_zero, int64_t offset, int64_t stride,
                     F* s, F* b) {
    V::params(a, symmetric_zero, offset, stride, &s->first, &b->first);
    V::params(a, symmetric_zero, offset + V::kOctets * stride, stride, &s->second, &b->second);
  }
};

// Octets o .. o + T::kOctets - 1 of weight rows against activation rows [m0, m0 + MB):
// out32[m][8o .. 8(o + kOctets)). With `prefetch`, each block first prefetches its octets'
// words T::kPrefetchBytes ahead (a hint: past the end of the weight it reads nothing).
// VNNI: the dot products by vpdpbusd into s32 lanes (8-bit codes whole, narrower ones as scaled
// planes); otherwise by vpmaddubsw s16 pair sums of planes shifted down.
template <int BITS, int MB, bool VNNI, class T>
void rows8_octets(const QMatmulArgs& a, const Rows8Plan& p, int64_t m0, int64_t o,
                  bool prefetch, float* out32) {
  using L = Rows8Layout<BITS>;
  using I = typename T::I;
  using F = typename T::F;
  constexpr int P = L::kPlanes;
  const I mask = T::set8(L::kMask), ones = T::set16(1);
  const I sixteens = T::set16(16);
  // planes masked in place at 2^kScaleShift times their codes (see the 2-bit pair sums and the
  // VNNI path below)
  constexpr int kScaleShift = BITS == 2 ? 2 : 4;
  const I scaled_mask = T::set8(L::kMask << kScaleShift);
  const int64_t words = p.blocks * L::kPlaneWords;  // plane words of a row (xq's)
  const int64_t octet_words = kInterleave * a.ldq;  // from one octet's words to the next's
  const uint32_t* __restrict wbase = a.qweight + o * octet_words;
  const int32_t* __restrict xq = p.xq.data() + m0 * words * P;
  const float* __restrict dm = p.d.data() + m0 * p.blocks;
  const float symmetric_zero = (float)(1 << (BITS - 1));
  // stored word w of the octets' rows, one per lane
  auto load = [&](int64_t w) PYENGINE_INLINE { return T::load(wbase, octet_words, w); };
  F acc[MB];
  unroll<MB>([&](auto m) PYENGINE_INLINE { acc[m] = T::zerof(); });
  for (int64_t g = 0, b0 = 0; g < p.G; ++g, b0 += p.group_blocks) {
    const int64_t b1 = std::min(p.blocks, b0 + p.group_blocks);
    F sacc[MB];
    unroll<MB>([&](auto m) PYENGINE_INLINE { sacc[m] = T::zerof(); });
    for (int64_t b = b0; b < b1; ++b) {
      if constexpr (T::kPrefetchBytes > 0) {
        // a block is BITS words of each of the octet's 8 rows: 32 * BITS bytes of its stream
        constexpr int kLines = (32 * BITS + 63) / 64;
        if (prefetch) {
          // bytes ahead within an octet's stream; past its end, the same stream of the next
          // group of kOctets octets (octet o + kOctets + q: octets lie one after another, and
          // octet o + q + 1, right after this one, is this group's or already read by it).
          // Pairs of 256-bit vectors began every other stream unprefetched before: on an Intel
          // Xeon (6/207, 2 threads, one in-process A/B) this made the AVX2 build's 2-bit
          // decode 1.14x and 3-bit 1.06x faster at 14336 x 4096 (1 KiB rows of 2-bit codes),
          // the AVX-512 build's 256-bit vectors 1.08x for both; 1.00-1.05x at 4096 x 14336.
          int64_t ahead = 4 * b * L::kBlockWords * kInterleave + T::kPrefetchBytes;
          if (ahead >= 4 * octet_words) ahead += (T::kOctets - 1) * 4 * octet_words;
          for (int q = 0; q < T::kOctets; ++q) {
            const char* line = reinterpret_cast<const char*>(wbase + q * octet_words) + ahead;
            unroll<kLines>([&](auto l) PYENGINE_INLINE {
              _mm_prefetch(line + 64 * decltype(l)::value, _MM_HINT_T0);
            });
          }
        }
      }
      I lanes[MB];
      if constexpr (VNNI && BITS == 8) {  // 8-bit codes whole (see dpbusd)
        unroll<MB>([&](auto m) PYENGINE_INLINE { lanes[m] = T::zero(); });
        unroll<L::kBlockWords>([&](auto v) PYENGINE_INLINE {
          const int64_t w = b * L::kBlockWords + v;
          const I word = load(w);
          unroll<MB>([&](auto m) PYENGINE_INLINE {
            lanes[m] = T::dpbusd_x(lanes[m], word, xq + (m * words + w) * P);
          });
        });
      } else if constexpr (VNNI) {
        // Scaled planes: vpdpbusd sums in s32 without saturation, so a plane need not be
        // shifted down to bits 0.. of its bytes: (word & mask << s) holds 2^s times the codes,
        // and each power of two accumulates apart (exactly: every product is a multiple of it)
        // and is shifted down once per block. 2 bits: planes 0 and 2 at x1 (the second after
        // one 16-bit shift by 4), 1 and 3 at x4; 3 bits (nibble words, junk bit 3 masked) and
        // 4 bits: the low nibble at x1, the high one at x16.
        I unscaled[MB], scaled[MB];
        unroll<MB>([&](auto m) PYENGINE_INLINE {
          unscaled[m] = T::zero();
          scaled[m] = T::zero();
        });
        // plane word w's low / high plane pair (pl, pl + 1) in `bytes` against the activations
        auto add_pair = [&](int64_t w, int pl, I bytes) PYENGINE_INLINE {
          const I low = T::and_(bytes, mask);
          const I high = T::and_(bytes, scaled_mask);
          unroll<MB>([&](auto m) PYENGINE_INLINE {
            const int32_t* x = xq + (m * words + w) * P + pl;
            unscaled[m] = T::dpbusd_x(unscaled[m], low, x);
            scaled[m] = T::dpbusd_x(scaled[m], high, x + 1);
          });
        };
        if constexpr (BITS == 3) {
          const int64_t w0 = b * L::kBlockWords;
          const I low0 = load(w0), low1 = load(w0 + 1), high = load(w0 + 2);
          unroll<L::kPlaneWords>([&](auto v) PYENGINE_INLINE {
            add_pair(b * L::kPlaneWords + v, 0,
                     rows8_nibbles3<decltype(v)::value, T>(low0, low1, high));
          });
        } else {
          unroll<L::kBlockWords>([&](auto v) PYENGINE_INLINE {
            const int64_t w = b * L::kBlockWords + v;
            const I word = load(w);
            add_pair(w, 0, word);
            if constexpr (BITS == 2) add_pair(w, 2, T::template srli16<4>(word));
          });
        }
        unroll<MB>([&](auto m) PYENGINE_INLINE {
          lanes[m] = T::add32(unscaled[m], T::template srai32<kScaleShift>(scaled[m]));
        });
      } else {
        // s16 pair sums of the block (8-bit codes: low and high nibbles apart; 2-bit codes:
        // planes at x1 and x4 apart); in range: a block adds planes x plane words (int4: 2 x 4,
        // int3: 2 x 4, int2: 4 x 2, int8: 8 per nibble) pairs of at most 2 * 15 * 127 (int3:
        // 2 * 7 * 127, int2: 2 * 3 * 127 at x1 and 2 * 12 * 127 at x4)
        I lo[MB], hi[MB];
        unroll<MB>([&](auto m) PYENGINE_INLINE {
          lo[m] = T::zero();
          hi[m] = T::zero();
        });
        // the planes of plane word w (its bytes in `word`) against the activations, into lo
        auto add_planes = [&](int64_t w, I word) PYENGINE_INLINE {
          unroll<P>([&](auto pl) PYENGINE_INLINE {
            const I plane =
                T::and_(T::template srli16<L::kPlaneShift * decltype(pl)::value>(word), mask);
            unroll<MB>([&](auto m) PYENGINE_INLINE {
              const I xb = T::broadcast32(xq + (m * words + w) * P + pl);
              lo[m] = T::add16(lo[m], T::maddubs(plane, xb));
            });
          });
        };
        if constexpr (BITS == 3) {
          const int64_t w0 = b * L::kBlockWords;
          const I low0 = load(w0), low1 = load(w0 + 1), high = load(w0 + 2);
          unroll<L::kPlaneWords>([&](auto v) PYENGINE_INLINE {
            add_planes(b * L::kPlaneWords + v,
                       rows8_nibbles3<decltype(v)::value, T>(low0, low1, high));
          });
        } else {
          unroll<L::kBlockWords>([&](auto v) PYENGINE_INLINE {
            const int64_t w = b * L::kBlockWords + v;
            const I word = load(w);
            if constexpr (BITS == 2) {
              // planes 1 and 3 masked in place at x4 (one shift instead of three): their pair
              // sums go to hi, shifted down once per block below (exactly: multiples of 4)
              const I shifted = T::template srli16<4>(word);
              const I planes[4] = {T::and_(word, mask), T::and_(word, scaled_mask),
                                   T::and_(shifted, mask), T::and_(shifted, scaled_mask)};
              unroll<4>([&](auto pl) PYENGINE_INLINE {
                unroll<MB>([&](auto m) PYENGINE_INLINE {
                  const I xb = T::broadcast32(xq + (m * words + w) * P + pl);
                  I& sums = decltype(pl)::value & 1 ? hi[m] : lo[m];
                  sums = T::add16(sums, T::maddubs(planes[pl], xb));
                });
              });
            } else if constexpr (BITS == 8) {
              const I low = T::and_(word, mask);
              const I high = T::and_(T::template srli16<4>(word), mask);
              unroll<MB>([&](auto m) PYENGINE_INLINE {
                const I xb = T::broadcast32(xq + (m * words + w) * P);
                lo[m] = T::add16(lo[m], T::maddubs(low, xb));
                hi[m] = T::add16(hi[m], T::maddubs(high, xb));
              });
            } else {
              add_planes(w, word);
            }
          });
        }
        unroll<MB>([&](auto m) PYENGINE_INLINE {
          if constexpr (BITS == 2)
            lo[m] = T::add16(lo[m], T::template srai16<kScaleShift>(hi[m]));
          lanes[m] = T::madd16(lo[m], ones);
          if constexpr (BITS == 8) lanes[m] = T::add32(lanes[m], T::madd16(hi[m], sixteens));
        });
      }
      unroll<MB>([&](auto m) PYENGINE_INLINE {
        sacc[m] = T::fmadd(T::cvt(lanes[m]), T::broadcastf(dm + m * p.blocks + b), sacc[m]);
      });
    }
    F scale, bias;
    T::params(a, symmetric_zero, o * kInterleave * a.lds + g * kInterleave, kInterleave * a.lds,
              &scale, &bias);
    unroll<MB>([&](auto m) PYENGINE_INLINE {
      acc[m] = T::fmadd(sacc[m], scale, acc[m]);
      acc[m] = T::fmadd(bias, T::broadcastf(p.xsum.data() + (m0 + m) * p.G + g), acc[m]);
    });
  }
  unroll<MB>([&](auto m) PYENGINE_INLINE {
    T::store(out32 + (m0 + m) * a.N + o * kInterleave, acc[m]);
  });
}
static_assert(2 * 4 * 2 * 15 * 127 < 32767 && 2 * 8 * 7 * 127 < 32767 && 2 * 4 * 12 * 127 < 32767 &&
                  2 * 8 * 15 * 127 < 32767,
              "rows8 s16 pair sums of one activation block");

// Octets [lo, hi) of weight rows against the activation rows, by vectors T.
template <int BITS, bool VNNI, class T>
void rows8_octet_range(const QMatmulArgs& a, const Rows8Plan& p, int64_t lo, int64_t hi,
                       bool prefetch, float* out32) {
  for (int64_t m0 = 0; m0 < a.M; m0 += kMaxRowBlock) {
    const int64_t mb = std::min<int64_t>(kMaxRowBlock, a.M - m0);
    for (int64_t o = lo; o < hi; o += T::kOctets) {
      switch (mb) {
        case 1: rows8_octets<BITS, 1, VNNI, T>(a, p, m0, o, prefetch, out32); break;
        case 2: rows8_octets<BITS, 2, VNNI, T>(a, p, m0, o, prefetch, out32); break;
        case 3: rows8_octets<BITS, 3, VNNI, T>(a, p, m0, o, prefetch, out32); break;
        default: rows8_octets<BITS, kMaxRowBlock, VNNI, T>(a, p, m0, o, prefetch, out32);
      }
    }
  }
}

// Octets [lo, hi) of weight rows against one activation row (M = 1), by vectors T.
template <int BITS, bool VNNI, class T>
void rows8_octet_range_m1(const QMatmulArgs& a, const Rows8Plan& p, int64_t lo, int64_t hi,
                          bool prefetch, float* out32) {
  for (int64_t o = lo; o < hi; o += T::kOctets)
    rows8_octets<BITS, 1, VNNI, T>(a, p, 0, o, prefetch, out32);
}

template <int BITS, bool VNNI>
void rows8_decode_with(const QMatmulArgs& a, float* out32) {
  const Rows8Plan& p = thread_plan<Rows8Plan>(a, plan_rows8<BITS>);
  MatmulProblem octets = a;  // threads split octets of rows
  octets.N = a.N / kInterleave;
#if defined(__AVX512BW__)
  const bool zmm = zmm_rows_enabled();
#endif
  // groups of octets in pairs of vectors (M = 1 and vector_pairs_enabled) or in one vector, the
  // octets left over in 256-bit vectors one at a time
  const bool pairs = a.M == 1 && vector_pairs_enabled();
  const bool prefetch = a.M == 1 && prefetch_enabled();  // of the 256-bit vectors' streams
  parallel_rows(octets, kInterleave * p.blocks * kActBlock * BITS / 8, [&](int64_t lo, int64_t hi) {
#if defined(__AVX512BW__)
    if (zmm) {
      const int64_t quads_end = pairs ? lo + (hi - lo) / 4 * 4 : lo;
      const int64_t pairs_end = quads_end + (hi - quads_end) / 2 * 2;
      rows8_octet_range_m1<BITS, VNNI, Rows8Pair<Rows8Zmm>>(a, p, lo, quads_end, prefetch, out32);
      rows8_octet_range<BITS, VNNI, Rows8Zmm>(a, p, quads_end, pairs_end, prefetch, out32);
      rows8_octet_range<BITS, VNNI, Rows8Ymm>(a, p, pairs_end, hi, prefetch, out32);
      return;
    }
#endif
    const int64_t pairs_end = pairs ? lo + (hi - lo) / 2 * 2 : lo;
    rows8_octet_range_m1<BITS, VNNI, Rows8Pair<Rows8Ymm>>(a, p, lo, pairs_end, prefetch, out32);
    rows8_octet_range<BITS, VNNI, Rows8Ymm>(a, p, pairs_end, hi, prefetch, out32);
  });
}

template <int BITS>
void rows8_decode(const QMatmulArgs& a, float* out32) {
  constexpr bool kVnni = kVnniBuild;  // see dpbusd and rows8_octets
  if (kVnni && vnni_enabled()) rows8_decode_with<BITS, kVnni>(a, out32);
  else rows8_decode_with<BITS, false>(a, out32);
}

// An integer path's call: decode(bits, out32) for a.bits in {2, 3, 4, 8} (bits as a
// compile-time constant) into fp32 products [M, N], then the epilogue (bias, accumulation,
// output dtype).
template <class Decode>
void integer_path(const QMatmulArgs& a, Decode decode) {
  float* out32 = products_buffer(a);
  if (a.K > 0) {
    switch (a.bits) {
      case 2: decode(std::integral_constant<int, 2>{}, out32); break;
      case 3: decode(std::integral_constant<int, 3>{}, out32); break;
      case 4: decode(std::integral_constant<int, 4>{}, out32); break;
      default: decode(std::integral_constant<int, 8>{}, out32); break;
    }
  }
  store_result(a, out32);
}
#else  // !__AVX2__
// ---- the portable integer path (the generic build) --------------------------------------------
// GCC / Clang vector code that every target compiles to its integer vector instructions (SSE2
// on x86-64, NEON on AArch64): codes widened to int16 times int16 activations; for 2 and 4 bits
// int16 products summed in int16 lanes over a block, then in pairs in int32 (portable_lanes,
// pair_sums), or on x86-64 summed straight into int32 by SSE2's pmaddwd (sse2_block_sums); for
// 8 bits a loop of the form the compilers' dot-product idiom turns into
// pmaddwd (portable_dot8). A block of 32 codes is 4 * BITS bytes of its row (the canonical
// packing, docs/FORMAT.md): plane j of a block is (byte i >> BITS * j) & mask, code
// cpb * i + j (cpb = 8 / BITS), so each activation block is stored in plane order,
// xp[m][b][j * 4 * BITS + i] = q[m][32 b + cpb * i + j].
template <int BITS>
struct PortableLayout {
  static constexpr int kBlockBytes = 4 * BITS;
  static constexpr int kPlanes = 8 / BITS;
  static constexpr int kMask = (1 << BITS) - 1;
};

constexpr int kPortableRowBlock = 4;  // activation rows per pass over a weight row

struct PortablePlan : BlockPlan {
  std::vector<int16_t> xp;  // [M][blocks][32] activations in plane order
};

template <int BITS>
void plan_portable(const QMatmulArgs& a, PortablePlan& p) {
  using L = PortableLayout<BITS>;
  const int64_t Kp = (a.K + kActBlock - 1) / kActBlock * kActBlock;
  p.xp.resize((size_t)(a.M * Kp));  // every element is laid out below
  plan_blocks(a, p, [&](int64_t m, const int8_t* q) {
    int16_t* xm = p.xp.data() + m * Kp;
    for (int64_t b = 0; b < Kp / kActBlock; ++b)
      for (int j = 0; j < L::kPlanes; ++j)
        for (int i = 0; i < L::kBlockBytes; ++i)
          xm[b * kActBlock + j * L::kBlockBytes + i] = q[b * kActBlock + L::kPlanes * i + j];
  });
}

// GCC / Clang vectors of the portable path (SSE2 registers on x86-64, NEON on AArch64; v4f and
// hsum from kernel_util.h).
typedef uint8_t pv16u8 __attribute__((vector_size(16)));
typedef uint64_t pv2u64 __attribute__((vector_size(16)));
typedef int16_t pv8i16 __attribute__((vector_size(16)));
typedef int32_t pv4i32 __attribute__((vector_size(16)));
typedef uint32_t pv4u32 __attribute__((vector_size(16)));

// 8-bit codes: sum over the block's codes c of c * q (bytes: its 32 code bytes; x: its
// activations), in a loop of the form the compilers' dot-product idiom recognizes.
PYENGINE_INLINE inline int32_t portable_dot8(const uint8_t* __restrict bytes,
                                             const int16_t* __restrict x) {
  int32_t s = 0;
  for (int i = 0; i < (int)kActBlock; ++i) s += (int16_t)bytes[i] * x[i];
  return s;
}

// Bytes [8h, 8h + 8) of v zero-extended to int16 lanes (an interleave with zeros: punpcklbw /
// punpckhbw; little-endian, the byte is the lane's low half).
template <int H>
PYENGINE_INLINE inline pv8i16 widen_half(pv16u8 v) {
  const pv16u8 zero = {};
  constexpr int b = 8 * H;  // byte i of the half goes to byte 2i, zero byte 16 + i to 2i + 1
#if defined(__clang__)
  const pv16u8 r = __builtin_shufflevector(v, zero, b, 16, b + 1, 17, b + 2, 18, b + 3, 19,
                                           b + 4, 20, b + 5, 21, b + 6, 22, b + 7, 23);
#else  // GCC (__builtin_shufflevector only from GCC 12)
  const pv16u8 r = __builtin_shuffle(
      v, zero, pv16u8{b, 16, b + 1, 17, b + 2, 18, b + 3, 19, b + 4, 20, b + 5, 21, b + 6, 22,
                      b + 7, 23});
#endif
  pv8i16 w;
  std::memcpy(&w, &r, sizeof(w));
  return w;
}

// 2- and 4-bit codes: eight int16 lanes whose sum is that of c * q over the block (bytes: its
// 4 * BITS code bytes; x: its activations in plane order). The bytes are widened to int16
// lanes first, where the planes are a shift and a mask (SSE2 has no byte shifts). Each lane
// sums 4 products of at most (2^BITS - 1) * 127 (int4: 4 * 15 * 127 = 7620): int16 holds them.
template <int BITS>
PYENGINE_INLINE inline pv8i16 portable_lanes(const uint8_t* __restrict bytes,
                                             const int16_t* __restrict x) {
  using L = PortableLayout<BITS>;
  pv16u8 b;
  if constexpr (L::kBlockBytes == 16) {
    std::memcpy(&b, bytes, 16);
  } else {  // 8 bytes (int2) into the low half, by value: no partial store to reload
    uint64_t low;
    std::memcpy(&low, bytes, 8);
    const pv2u64 halves = {low, 0};
    std::memcpy(&b, &halves, 16);
  }
  pv8i16 sum = {};
  unroll<L::kBlockBytes / 8>([&](auto h) PYENGINE_INLINE {  // halves of 8 bytes
    const pv8i16 w = widen_half<decltype(h)::value>(b);
    unroll<L::kPlanes>([&](auto j) PYENGINE_INLINE {
      constexpr int J = decltype(j)::value;
      const pv8i16 shifted = w >> (BITS * J);  // the top plane needs no mask
      const pv8i16 plane = J + 1 == L::kPlanes ? shifted : shifted & (int16_t)L::kMask;
      pv8i16 xv;
      std::memcpy(&xv, x + J * L::kBlockBytes + 8 * decltype(h)::value, sizeof(xv));
      sum += plane * xv;
    });
  });
  return sum;
}
static_assert(4 * 15 * 127 < 32767 && 4 * 3 * 127 < 32767, "portable int16 lanes");

// Sums of the int16 lanes 2i and 2i + 1 of v as float lanes i (the lanes read as int32: the
// low half sign-extended by a shift up and an arithmetic shift down, the high half by the
// arithmetic shift alone; what pmaddwd by ones does, in operations every target has).
PYENGINE_INLINE inline v4f pair_sums(pv8i16 v) {
  pv4u32 u;  // shifted up unsigned: a signed left shift of a negative value is undefined
  std::memcpy(&u, &v, sizeof(u));
  const pv4i32 low = (pv4i32)(u << 16) >> 16, high = (pv4i32)u >> 16;
  return __builtin_convertvector(low + high, v4f);
}

#if defined(__SSE2__)
// 2- and 4-bit codes on x86-64 (SSE2, every such CPU): the block's products summed straight into
// int32 lanes by pmaddwd (no int16 sums to widen after), float lanes whose sum is that of c * q
// over the block (bytes, x: as portable_lanes). 2-bit planes 1 and 3 are masked in place at 4x
// their codes (one shift per byte lane instead of three), summed apart and shifted down once
// (exactly: multiples of 4).
template <int BITS>
PYENGINE_INLINE inline v4f sse2_block_sums(const uint8_t* __restrict bytes,
                                           const int16_t* __restrict x) {
  using L = PortableLayout<BITS>;
  static_assert(BITS == 2 || BITS == 4, "2 or 4 bits");
  const __m128i zero = _mm_setzero_si128();
  const __m128i b = L::kBlockBytes == 16
                        ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes))
                        : _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes));
  auto xv = [&](int plane, int half) PYENGINE_INLINE {
    return _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + plane * L::kBlockBytes + 8 * half));
  };
  __m128i sums = zero, sums4 = zero;  // sums4: the 2-bit planes at 4x
  unroll<L::kBlockBytes / 8>([&](auto h) PYENGINE_INLINE {  // halves of 8 bytes, as int16 lanes
    constexpr int H = decltype(h)::value;
    const __m128i w = H == 0 ? _mm_unpacklo_epi8(b, zero) : _mm_unpackhi_epi8(b, zero);
    if constexpr (BITS == 2) {
      const __m128i mask = _mm_set1_epi16(3), mask4 = _mm_set1_epi16(12);
      const __m128i high = _mm_srli_epi16(w, 4);
      sums = _mm_add_epi32(sums, _mm_madd_epi16(_mm_and_si128(w, mask), xv(0, H)));
      sums4 = _mm_add_epi32(sums4, _mm_madd_epi16(_mm_and_si128(w, mask4), xv(1, H)));
      sums = _mm_add_epi32(sums, _mm_madd_epi16(_mm_and_si128(high, mask), xv(2, H)));
      sums4 = _mm_add_epi32(sums4, _mm_madd_epi16(_mm_and_si128(high, mask4), xv(3, H)));
    } else {
      const __m128i low = _mm_and_si128(w, _mm_set1_epi16(15));
      sums = _mm_add_epi32(sums, _mm_madd_epi16(low, xv(0, H)));
      sums = _mm_add_epi32(sums, _mm_madd_epi16(_mm_srli_epi16(w, 4), xv(1, H)));
    }
  });
  if constexpr (BITS == 2) sums = _mm_add_epi32(sums, _mm_srai_epi32(sums4, 2));
  return (v4f)_mm_cvtepi32_ps(sums);
}
#endif

// Weight rows [lo, hi) against activation rows [m0, m0 + MB): out32[m][n].
template <int BITS, int MB>
void portable_rows(const QMatmulArgs& a, const PortablePlan& p, int64_t m0, int64_t lo,
                   int64_t hi, float* sf, float* bf, float* out32) {
  using L = PortableLayout<BITS>;
  const float symmetric_zero = (float)(1 << (BITS - 1));
  for (int64_t n = lo; n < hi; ++n) {
    group_params(a, n, p.G, 1.f, symmetric_zero, sf, bf);  // w = c * sf + bf
    const uint8_t* row = reinterpret_cast<const uint8_t*>(a.qweight + n * a.ldq);
    v4f acc[MB];            // lanes of sum_g sf[g] * sum_b d[b] * (codes . q over block b)
    float offsets[MB] = {};  // sum_g bf[g] * xsum[g]
    for (int m = 0; m < MB; ++m) acc[m] = v4f{};
    for (int64_t g = 0, b0 = 0; g < p.G; ++g, b0 += p.group_blocks) {
      const int64_t b1 = std::min(p.blocks, b0 + p.group_blocks);
      v4f gacc[MB];
      for (int m = 0; m < MB; ++m) gacc[m] = v4f{};
      for (int64_t b = b0; b < b1; ++b) {
        const uint8_t* bytes = row + b * L::kBlockBytes;
        for (int m = 0; m < MB; ++m) {
          const int64_t mb = (m0 + m) * p.blocks + b;
          const int16_t* x = p.xp.data() + mb * kActBlock;
          if constexpr (BITS == 8) {
            gacc[m][0] += p.d[mb] * (float)portable_dot8(bytes, x);
          } else {
#if defined(__SSE2__)
            gacc[m] += p.d[mb] * sse2_block_sums<BITS>(bytes, x);
#else
            gacc[m] += p.d[mb] * pair_sums(portable_lanes<BITS>(bytes, x));
#endif
          }
        }
      }
      for (int m = 0; m < MB; ++m) {
        acc[m] += sf[g] * gacc[m];
        offsets[m] += bf[g] * p.xsum[(m0 + m) * p.G + g];
      }
    }
    for (int m = 0; m < MB; ++m) out32[(m0 + m) * a.N + n] = hsum(acc[m]) + offsets[m];
  }
}

template <int BITS>
void portable_decode(const QMatmulArgs& a, float* out32) {
  const PortablePlan& p = thread_plan<PortablePlan>(a, plan_portable<BITS>);
  parallel_rows(a, p.blocks * kActBlock * BITS / 8, [&](int64_t lo, int64_t hi) {
    std::vector<float> sf(p.G), bf(p.G);
    for (int64_t m0 = 0; m0 < a.M; m0 += kPortableRowBlock) {
      switch (std::min<int64_t>(kPortableRowBlock, a.M - m0)) {
        case 1: portable_rows<BITS, 1>(a, p, m0, lo, hi, sf.data(), bf.data(), out32); break;
        case 2: portable_rows<BITS, 2>(a, p, m0, lo, hi, sf.data(), bf.data(), out32); break;
        case 3: portable_rows<BITS, 3>(a, p, m0, lo, hi, sf.data(), bf.data(), out32); break;
        default:
          portable_rows<BITS, kPortableRowBlock>(a, p, m0, lo, hi, sf.data(), bf.data(), out32);
      }
    }
  });
}

// A generic-build integer path's call: decode(bits, out32) for a.bits in {2, 3, 4, 8} (bits as
// a compile-time constant) into fp32 products [M, N], then the epilogue (as integer_path).
template <class Decode>
void generic_integer_path(const QMatmulArgs& a, Decode decode) {
  float* out32 = products_buffer(a);
  if (a.K > 0) {
    switch (a.bits) {
      case 2: decode(std::integral_constant<int, 2>{}, out32); break;
      case 3: decode(std::integral_constant<int, 3>{}, out32); break;
      case 4: decode(std::integral_constant<int, 4>{}, out32); break;
      default: decode(std::integral_constant<int, 8>{}, out32); break;
    }
  }
  store_result(a, out32);
}

// The call's products by portable_decode, then the epilogue. 3-bit codes never come here
// (act8_native: they take the exact kernels on the canonical rows).
void portable_path(const QMatmulArgs& a) {
  generic_integer_path(a, [&](auto bits, float* out32) PYENGINE_INLINE {
    if constexpr (decltype(bits)::value != 3) portable_decode<decltype(bits)::value>(a, out32);
  });
}

#if defined(__SSE2__)
// ---- the row-interleaved layout in the generic build on x86-64 (SSE2) --------------------------
// The octets of QMatmulArgs::interleave = 8 (see the AVX2 section above) read as two 128-bit
// vectors per word: rows 8o .. 8o + 3 in the first, 8o + 4 .. 8o + 7 in the second, one 32-bit
// lane per row. SSE2 has no byte dot products (pmaddubsw is SSSE3), so the planes are taken
// from the 16-bit lanes, where shifts and masks exist: 16-bit lane h of a row's word w holds its
// codes w * c + h * c / 2 + j (c = 32 / BITS codes per word, j < 16 / BITS) at bits
// [BITS * j, BITS * (j + 1)). Plane j of a vector holds in 16-bit lane 2r + h that code of row
// r, and pmaddwd against the int16 pattern [x(h = 0), x(h = 1)] x 4 of the plane's two
// activations sums both products into 32-bit lane r: every lane is one row's dot product, with
// no shuffles and no horizontal sums.
//
// The planes of a byte are masked in place, without shifts: plane t of the low byte is
// lanes & (mask << BITS * t), 2^(BITS * t) times its codes (the high byte: lanes >> 8 first;
// 8-bit codes: lanes & 0xFF and lanes >> 8). Each plane's activation pattern is scaled by the
// rest of 2^kScaleShift (kScaleShift = 8 - BITS: 6 for 2 bits, 4 for 4, 0 for 8), so every
// product is 2^kScaleShift times its own and one accumulator takes them all, shifted down once
// per block (exactly). In range: the int16 inputs are at most 192 (int2 plane 3) and 127 * 64,
// every product at most 3 * 127 * 64 or 15 * 127 * 16 or 255 * 127, a block's sum (32 of
// them) far inside int32. 3-bit codes: each block's three loaded words (two of low bits, one of
// high bits, split3_high_bit) are merged into four nibble words (rows8_nibbles3, by Sse2Nibbles'
// shifts and a select of three bitwise operations), then read as 4-bit words whose nibbles carry
// 3-bit codes (mask 0x07 in place of 0x0F: bit 3 is junk).
// An empty asm that takes an accumulator as read and written in a register: the compiler then
// adds each product into it in program order, instead of reassociating a block's sums into a
// tree whose partial sums it spills to the stack (GCC did so without it).
PYENGINE_INLINE inline void keep_in_register(__m128i& sums) { asm("" : "+x"(sums)); }

template <int BITS>
struct Sse2Rows8Layout {
  // words of plane bytes per block: the loaded words (BITS of them) or for 3 bits the four
  // nibble words rows8_nibbles3 builds from the three loaded
  static constexpr int kPlaneWords = BITS == 3 ? 4 : BITS;
  static constexpr int kPlaneBits = BITS == 3 ? 4 : BITS;  // bits of a plane's slot in a byte
  static constexpr int kPlanes = 16 / kPlaneBits;          // planes of a 16-bit lane
  static constexpr int kBytePlanes = 8 / kPlaneBits;       // of each of its bytes
  static constexpr int kScaleShift = 8 - kPlaneBits;       // every product at 2^kScaleShift
  static constexpr int kCodeMask = BITS == 3 ? 0x07 : (1 << BITS) - 1;  // of a slot
  // int16 activations per block: plane words x kPlanes planes x 8 lanes (128 for every width)
  static constexpr int kBlockPattern = kPlaneWords * kPlanes * 8;
  // The code (within its block) that plane j of plane word v meets in 16-bit lane h of a row's
  // word: byte y = j / kBytePlanes of the lane, slot t = j % kBytePlanes of that byte. 2, 4 and
  // 8 bits: the canonical packing, code v * c + h * c / 2 + j (c = 32 / BITS codes per word).
  // 3 bits: nibble t of byte 2h + y of nibble word v (nibbles3_code).
  static constexpr int code_of(int v, int j, int h) {
    if constexpr (BITS == 3) {
      return nibbles3_code(v, j % kBytePlanes, 2 * h + j / kBytePlanes);
    } else {
      return v * (32 / BITS) + h * (16 / BITS) + j;
    }
  }
};
static_assert(3 * 127 * 64 * 2 * 32 < (1 << 30) && 127 * 64 < 32767 && 15 * 127 * 16 < 32767,
              "sse2 rows8 ranges");

// How far ahead of a block's loads the octets' weight streams are prefetched at M = 1 (with
// prefetch_enabled, as the AVX2 kernel's): without it one thread streamed the weights at 5-7
// GB/s, below both its compute in cache and the copy bandwidth. On an Intel Xeon (6/207, 2
// threads, 2/4/8 bits, bench_cpu_vnni.py --switch prefetch --isa generic) it made the kernel
// 1.08-1.21x faster.
constexpr int kSse2PrefetchBytes = 1024;

struct Sse2Rows8Plan : BlockPlan {
  std::vector<int16_t> xw;  // [M][blocks][BITS words][planes][8] pmaddwd's activation patterns
};
static_assert(__STDCPP_DEFAULT_NEW_ALIGNMENT__ >= 16, "xw's patterns are read by aligned loads");

template <int BITS>
void plan_sse2_rows8(const QMatmulArgs& a, Sse2Rows8Plan& p) {
  using L = Sse2Rows8Layout<BITS>;
  const int64_t per_row = (a.K + kActBlock - 1) / kActBlock * L::kBlockPattern;
  p.xw.resize((size_t)(a.M * per_row));  // every element is laid out below
  plan_blocks(a, p, [&](int64_t m, const int8_t* q) {
    int16_t* pattern = p.xw.data() + m * per_row;
    for (int64_t b = 0; b < per_row / L::kBlockPattern; ++b)
      for (int v = 0; v < L::kPlaneWords; ++v)
        for (int j = 0; j < L::kPlanes; ++j, pattern += 8) {
          // plane j is masked in place at 2^(kPlaneBits * (j % kBytePlanes)): the rest of the
          // scale
          const int scale = 1 << (L::kScaleShift - L::kPlaneBits * (j % L::kBytePlanes));
          const int8_t* codes = q + b * kActBlock;
          for (int r = 0; r < 4; ++r) {
            pattern[2 * r] = (int16_t)(codes[L::code_of(v, j, 0)] * scale);
            pattern[2 * r + 1] = (int16_t)(codes[L::code_of(v, j, 1)] * scale);
          }
        }
  });
}

// The operations rows8_nibbles3 takes, on SSE2 vectors (the select in three bitwise
// operations: SSE2 has no bitwise ternary).
struct Sse2Nibbles {
  using I = __m128i;
  static I set8(int v) { return _mm_set1_epi8((char)v); }
  template <int S> static I srli16(I a) { return _mm_srli_epi16(a, S); }
  template <int S> static I slli16(I a) { return _mm_slli_epi16(a, S); }
  // c ? a : b bitwise
  static I select(I c, I a, I b) {
    return _mm_xor_si128(_mm_and_si128(_mm_xor_si128(a, b), c), b);
  }
};

// A 3-bit block's three loaded words (split3_high_bit: two of low bits, one of high bits) of
// each of V vectors, and the nibble words rows8_nibbles3 merges from them.
template <int V>
struct Sse2Split3Words {
  __m128i low0[V], low1[V], high[V];
  PYENGINE_INLINE void load(int u, __m128i l0, __m128i l1, __m128i h) {
    low0[u] = l0, low1[u] = l1, high[u] = h;
  }
  template <int kV>
  PYENGINE_INLINE __m128i nibbles(int u) const {
    return rows8_nibbles3<kV, Sse2Nibbles>(low0[u], low1[u], high[u]);
  }
};
struct NoSplit3Words {};  // the other widths load each plane word whole

// Octets o .. o + OCT - 1 of weight rows against activation rows [m0, m0 + MB):
// out32[m][8o .. 8(o + OCT)). sf, bf: octet o's group parameters, [OCT][G][8] (w = c * sf + bf;
// octet o + q's at q * G * 8). Two octets (OCT = 2, at M = 1) keep two weight streams in flight
// and share each activation pattern between four vectors.
template <int BITS, int MB, int OCT>
void sse2_rows8_octets(const QMatmulArgs& a, const Sse2Rows8Plan& p, int64_t m0, int64_t o,
                       bool prefetch, const float* sf, const float* bf, float* out32) {
  using L = Sse2Rows8Layout<BITS>;
  constexpr int V = 2 * OCT;  // vectors per word: rows 0-3 and 4-7 of each octet
  const int64_t per_row = p.blocks * L::kBlockPattern;
  const int64_t octet_words = kInterleaveRows * a.ldq;  // from one octet's words to the next's
  // word w of octet o + q's rows 0-3 at words[q * octet_words / 4 + 2w], rows 4-7 at + 1
  const __m128i* __restrict words =
      reinterpret_cast<const __m128i*>(a.qweight + o * octet_words);
  auto word = [&](int64_t w, int vec) PYENGINE_INLINE {
    return _mm_loadu_si128(words + vec / 2 * (octet_words / 4) + 2 * w + vec % 2);
  };
  const int16_t* __restrict xw = p.xw.data() + m0 * per_row;
  const float* __restrict dm = p.d.data() + m0 * p.blocks;
  // (aligned: 16-byte patterns from a vector's start, which new aligns to 16 bytes on x86-64,
  // so that pmaddwd may take them from memory without a load of their own)
  auto pattern = [&](int m, int64_t w, int j) PYENGINE_INLINE {
    return _mm_load_si128(reinterpret_cast<const __m128i*>(
        xw + m * per_row + (w * L::kPlanes + j) * 8));
  };
  __m128 acc[MB][V];
  unroll<MB>([&](auto m) PYENGINE_INLINE {
    unroll<V>([&](auto u) PYENGINE_INLINE { acc[m][u] = _mm_setzero_ps(); });
  });
  for (int64_t g = 0, b0 = 0; g < p.G; ++g, b0 += p.group_blocks) {
    const int64_t b1 = std::min(p.blocks, b0 + p.group_blocks);
    __m128 sacc[MB][V];
    unroll<MB>([&](auto m) PYENGINE_INLINE {
      unroll<V>([&](auto u) PYENGINE_INLINE { sacc[m][u] = _mm_setzero_ps(); });
    });
    for (int64_t b = b0; b < b1; ++b) {
      // a block is 32 * BITS bytes of each octet's stream: its lines kSse2PrefetchBytes ahead
      // (past the end of an octet's stream, the same stream of the next pair, as the AVX2
      // kernel's)
      if (prefetch) {
        int64_t ahead = 32 * BITS * b + kSse2PrefetchBytes;
        if (ahead >= 4 * octet_words) ahead += (OCT - 1) * 4 * octet_words;
        unroll<OCT>([&](auto q) PYENGINE_INLINE {
          const char* line = reinterpret_cast<const char*>(words + decltype(q)::value *
                                                                     (octet_words / 4)) +
                             ahead;
          for (int l = 0; l < 32 * BITS; l += 64) _mm_prefetch(line + l, _MM_HINT_T0);
        });
      }
      __m128i sums[MB][V];  // the block's products at 2^kScaleShift
      unroll<MB>([&](auto m) PYENGINE_INLINE {
        unroll<V>([&](auto u) PYENGINE_INLINE { sums[m][u] = _mm_setzero_si128(); });
      });
      // 3 bits: the block's loaded words of every vector, once for its four nibble words
      std::conditional_t<BITS == 3, Sse2Split3Words<V>, NoSplit3Words> split3;
      if constexpr (BITS == 3) {
        unroll<V>([&](auto u) PYENGINE_INLINE {
          constexpr int U = decltype(u)::value;
          split3.load(U, word(3 * b, U), word(3 * b + 1, U), word(3 * b + 2, U));
        });
      }
      unroll<L::kPlaneWords>([&](auto v) PYENGINE_INLINE {
        constexpr int kV = decltype(v)::value;
        const int64_t w = b * L::kPlaneWords + kV;  // the plane word's patterns
        __m128i lanes[V];
        unroll<V>([&](auto u) PYENGINE_INLINE {
          if constexpr (BITS == 3)
            lanes[u] = split3.template nibbles<kV>(decltype(u)::value);
          else
            lanes[u] = word(w, decltype(u)::value);
        });
        unroll<2>([&](auto y) PYENGINE_INLINE {  // the low byte of each 16-bit lane, the high
          constexpr int Y = decltype(y)::value;
          unroll<L::kBytePlanes>([&](auto t) PYENGINE_INLINE {
            constexpr int T = decltype(t)::value;
            constexpr int kMask = BITS == 8 ? 0xFF : L::kCodeMask << (L::kPlaneBits * T);
            unroll<MB>([&](auto m) PYENGINE_INLINE {
              const __m128i x = pattern(m, w, Y * L::kBytePlanes + T);
              unroll<V>([&](auto u) PYENGINE_INLINE {
                const __m128i bytes = Y == 0 ? lanes[u] : _mm_srli_epi16(lanes[u], 8);
                // the high byte of 8-bit codes is the shifted lanes whole
                const __m128i plane =
                    BITS == 8 && Y == 1 ? bytes : _mm_and_si128(bytes, _mm_set1_epi16(kMask));
                sums[m][u] = _mm_add_epi32(sums[m][u], _mm_madd_epi16(plane, x));
                keep_in_register(sums[m][u]);
              });
            });
          });
        });
      });
      unroll<MB>([&](auto m) PYENGINE_INLINE {
        const __m128 d = _mm_set1_ps(dm[m * p.blocks + b]);
        unroll<V>([&](auto u) PYENGINE_INLINE {
          const __m128i block = L::kScaleShift ? _mm_srai_epi32(sums[m][u], L::kScaleShift)
                                               : sums[m][u];
          sacc[m][u] = _mm_add_ps(sacc[m][u], _mm_mul_ps(_mm_cvtepi32_ps(block), d));
        });
      });
    }
    unroll<MB>([&](auto m) PYENGINE_INLINE {
      const __m128 xsum = _mm_set1_ps(p.xsum[(m0 + m) * p.G + g]);
      unroll<V>([&](auto u) PYENGINE_INLINE {
        constexpr int U = decltype(u)::value;
        // octet U / 2's rows 4 (U % 2) .. 4 (U % 2) + 3
        const int64_t at = (U / 2 * p.G + g) * kInterleaveRows + 4 * (U % 2);
        const __m128 scale = _mm_loadu_ps(sf + at), bias = _mm_loadu_ps(bf + at);
        acc[m][U] = _mm_add_ps(acc[m][U], _mm_mul_ps(sacc[m][U], scale));
        acc[m][U] = _mm_add_ps(acc[m][U], _mm_mul_ps(bias, xsum));
      });
    });
  }
  unroll<MB>([&](auto m) PYENGINE_INLINE {
    unroll<V>([&](auto u) PYENGINE_INLINE {
      _mm_storeu_ps(out32 + (m0 + m) * a.N + o * kInterleaveRows + 4 * decltype(u)::value,
                    acc[m][u]);
    });
  });
}

template <int BITS>
void sse2_rows8_decode(const QMatmulArgs& a, float* out32) {
  const Sse2Rows8Plan& p = thread_plan<Sse2Rows8Plan>(a, plan_sse2_rows8<BITS>);
  MatmulProblem octets = a;  // threads split octets of rows
  octets.N = a.N / kInterleaveRows;
  const float symmetric_zero = (float)(1 << (BITS - 1));
  const int64_t octet_bytes = kInterleaveRows * p.blocks * kActBlock * BITS / 8;
  // 8-bit codes at M = 1: two octets at a time (as the AVX2 kernel's pairs,
  // PYENGINE_CPU_VECTOR_PAIRS). On an Intel Xeon (6/207, 2 threads, bench_cpu_vnni.py --switch
  // pairs --isa generic) pairs took 8-bit codes 1.18-1.22x faster, and in a run that paired
  // every width 4-bit ones 0.99-1.07x and 2-bit ones 0.87-0.98x (more live vectors than SSE2's
  // 16 registers hold).
  const int step = BITS == 8 && a.M == 1 && vector_pairs_enabled() ? 2 : 1;
  const bool prefetch = a.M == 1 && prefetch_enabled();  // as the AVX2 kernel's
  parallel_rows(octets, octet_bytes, [&](int64_t lo, int64_t hi) {
    const int64_t params = p.G * kInterleaveRows;  // of one octet
    std::vector<float> sf_store((size_t)(2 * params)), bf_store(sf_store.size());
    float* sf = sf_store.data();
    float* bf = bf_store.data();
    for (int64_t o = lo; o < hi;) {
      const int count = o + step <= hi ? step : 1;
      // each octet's scales (and zeros) lie back to back, [G][8], and the octets' one after
      // the other: their rows' group parameters
      for (int q = 0; q < count; ++q)
        group_params(a, (o + q) * kInterleaveRows, params, 1.f, symmetric_zero, sf + q * params,
                     bf + q * params);
      if (count == 2) {
        sse2_rows8_octets<BITS, 1, 2>(a, p, 0, o, prefetch, sf, bf, out32);
      } else {
        for (int64_t m0 = 0; m0 < a.M; m0 += kPortableRowBlock) {
          switch (std::min<int64_t>(kPortableRowBlock, a.M - m0)) {
            case 1: sse2_rows8_octets<BITS, 1, 1>(a, p, m0, o, prefetch, sf, bf, out32); break;
            case 2: sse2_rows8_octets<BITS, 2, 1>(a, p, m0, o, prefetch, sf, bf, out32); break;
            case 3: sse2_rows8_octets<BITS, 3, 1>(a, p, m0, o, prefetch, sf, bf, out32); break;
            default:
              sse2_rows8_octets<BITS, kPortableRowBlock, 1>(a, p, m0, o, prefetch, sf, bf, out32);
          }
        }
      }
      o += count;
    }
  });
}
#endif  // __SSE2__
#endif  // __AVX2__

}  // namespace

bool rows8_native(const QMatmulArgs& a) {
#if defined(__AVX2__)
  return a.interleave == kInterleaveRows && a.act_bits == 8 && a.M <= kDecodeMaxM;
#elif defined(__SSE2__)  // the generic build on x86-64: 2, 3, 4 and 8 bits (sse2_rows8_decode)
  return a.interleave == kInterleaveRows && a.act_bits == 8 && a.M <= kDecodeMaxM &&
         (a.bits == 2 || a.bits == 3 || a.bits == 4 || a.bits == 8);
#else
  (void)a;
  return false;
#endif
}

void qmatmul_rows8(const QMatmulArgs& a) {
#if defined(__AVX2__)
  integer_path(a, [&](auto bits, float* out32) PYENGINE_INLINE {
    rows8_decode<decltype(bits)::value>(a, out32);
  });
#elif defined(__SSE2__)
  generic_integer_path(a, [&](auto bits, float* out32) PYENGINE_INLINE {
    sse2_rows8_decode<decltype(bits)::value>(a, out32);
  });
#else
  (void)a;
#endif
}

bool act8_native(const QMatmulArgs& a) {
#if defined(__AVX2__)
  // 8-bit codes cost twice the integer work per byte of the narrower ones: from M = 5 (a second
  // pass over the weight) the exact kernels on the quantized activations were faster (AMD Zen 4,
  // benchmarks/bench_cpu_kernels.py, 14336 x 4096 at M = 8: 10.8 ms against 7.7 ms)
  if (a.bits == 8) return a.M <= kMaxRowBlock;
  return (a.bits == 2 || a.bits == 3 || a.bits == 4) && a.M <= kDecodeMaxM;
#else
  // the portable path: 2, 4 and 8 bits (3-bit codes cross bytes: the exact kernels)
  return (a.bits == 2 || a.bits == 4 || a.bits == 8) && a.M <= kDecodeMaxM;
#endif
}

void qmatmul_act8(const QMatmulArgs& a) {
  if (!act8_native(a)) {
    fake_quantized_matmul(a);
    return;
  }
#if defined(__AVX2__)
  integer_path(a, [&](auto bits, float* out32) PYENGINE_INLINE {
    act8_decode<decltype(bits)::value>(a, out32);
  });
#else
  portable_path(a);
#endif
}

}  // namespace PYENGINE_ISA
}  // namespace cpu
}  // namespace pyengine
