// Shared definitions of pyengine._C: dtype codes, the quantized-matmul problem description and
// portable fp16/bf16 conversions. Nothing here depends on torch or CUDA.
#pragma once

#include <cstdint>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>

#include "mma_frag.h"

namespace pyengine {

// Dtype codes shared with pyengine/_ext.py (DTYPE_CODES). Keep both in sync.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline const char* dtype_name(int code) {
  switch (code) {
    case kFloat32: return "float32";
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    default: return "unknown";
  }
}

// What every quantized matmul of this module shares: activations, per-group scales and zeros,
// bias, output, sizes.  out[m, n] (+)= sum_k x[m, k] * W[n, k] + bias[n]  for m < M, n < N,
// k < K; the weight W is described by the derived argument structs below.
//   scales/zeros: row n at + n * lds, one value per group of `group_size` codes (a multiple of
//   32; a per-channel weight passes its padded row length). zeros == nullptr: symmetric.
// N and K may be smaller than the stored weight (sliced_matmul reads a sub-block); K need not
// be a multiple of 32: codes past K are never multiplied by anything but zero.
struct MatmulProblem {
  const void* x = nullptr;        // [M, K] activations, row stride ldx elements
  int x_dtype = kFloat32;
  int64_t ldx = 0;
  const void* scales = nullptr;   // [N, lds]
  const void* zeros = nullptr;    // [N, lds] or nullptr (symmetric)
  int sz_dtype = kFloat32;        // dtype of scales and zeros
  int64_t lds = 0;
  const void* bias = nullptr;     // [N] or nullptr
  int bias_dtype = kFloat32;
  void* out = nullptr;            // [M, N], row stride ldo elements
  int out_dtype = kFloat32;
  int64_t ldo = 0;
  int64_t M = 0, N = 0, K = 0;
  int64_t group_size = 128;
  int num_threads = 0;            // <= 0: the OpenMP default (CPU kernels)
};

// A matmul on the canonical packed weight of docs/FORMAT.md:
//   qweight: uint32 words, row n at qweight + n * ldq; a block of 32 codes takes `bits` words.
//   A symmetric weight's zero point is 2^(bits-1).
//   act_bits = 8: the activations are first quantized to int8 per block of kActBlock
//   consecutive elements of a row along K (symmetric, d = max|x| / 127, q = round(x / d) with
//   ties to even, x -> d * q), and the product is that of the quantized activations
//   (pyengine/ops/act_quant.py is the reference); 0: the activations as they are.
struct QMatmulArgs : MatmulProblem {
  const uint32_t* qweight = nullptr;
  int64_t ldq = 0;                // words per stored row
  bool accumulate = false;        // out += result instead of out = result
  int bits = 4;
  int act_bits = 0;               // 0 or 8
  // 0: rows as above. 8: rows interleaved by eights (docs/FORMAT.md, "CPU row-interleaved
  // layout"): word w of row 8o + r at qweight + (8o) * ldq + 8w + r (3 bits: the split blocks
  // of split3_high_bit), and group g's scale / zero of that row at + (8o) * lds + 8g + r; N
  // must be a multiple of 8.
  int interleave = 0;
  // With interleave: the same rows in the canonical layout (qweight, ldq, scales, zeros and lds
  // as above with interleave 0), read by the calls the interleaved kernel does not serve (M
  // above the decode sizes, float activations, the generic build). Null: those calls convert
  // the interleaved rows back on every call (cpu/kernel_util.h: deinterleaved).
  struct CanonicalRows {
    const uint32_t* qweight = nullptr;
    int64_t ldq = 0;
    const void* scales = nullptr;
    const void* zeros = nullptr;
    int64_t lds = 0;
  } canonical;
};

// An interleaved call's arguments on its canonical rows (QMatmulArgs::canonical, which must be
// set): the same problem with interleave 0.
inline QMatmulArgs on_canonical_rows(const QMatmulArgs& a) {
  QMatmulArgs c = a;
  c.interleave = 0;
  c.qweight = a.canonical.qweight;
  c.ldq = a.canonical.ldq;
  c.scales = a.canonical.scales;
  c.zeros = a.canonical.zeros;
  c.lds = a.canonical.lds;
  c.canonical = QMatmulArgs::CanonicalRows();
  return c;
}

// 3-bit codes in the row-interleaved layout (docs/FORMAT.md; split_3bit_blocks in
// pyengine/backends/cpu.py): a block of 32 codes c = 16t + 4i + p (t < 2, i < 4, p < 4) keeps
// three words: word t holds the low two bits of codes 16t .. 16t + 15 at bits [2(4i + p),
// 2(4i + p) + 2), word 2 their high bits, code c's at bit split3_high_bit(c).
constexpr int split3_high_bit(int c) {
  return 8 * (c % 16 / 4) + 2 * (c / 16) + (c % 4 & 1) + 4 * (c % 4 >> 1);
}

constexpr int64_t kActBlock = 32;  // activation elements per int8 scale (act_bits = 8)

// A Matryoshka plane-layout matmul:  out[m, n] = sum_k x[m, k] * W_r[n, k] + bias[n], where W_r
// is the r-bit slice (precision r in 8, 6, 4, 3, 2) of an int8 parent stored as three bit planes
// (pyengine/matryoshka/weight.py):
//   q = hi << 5 | mid << 3 | lo
//   plane_hi:  bits 7..5 of q, 3-bit canonical packing (3 words per 32-code block), row n at
//              plane_hi + n * ld_hi
//   plane_mid: bits 4..3 of q, 2-bit packing (2 words per block), row n at plane_mid + n * ld_mid
//   plane_lo:  bits 2..0 of q, 3-bit packing (3 words per block), row n at plane_lo + n * ld_lo
//   c_r = min(((q >> (7 - r)) + 1) >> 1, 2^r - 1) (c_8 = q);  W_r = (c_r * 2^(8-r) - z) * s
// with s, z the parent's per-group scale and zero (zeros == nullptr: symmetric, z = 128). A
// slice reads only the planes holding bits 7 .. 7-r of q: plane_mid is needed for r >= 3 and
// plane_lo for r >= 6; the others may be null and are never dereferenced.
struct PlaneMatmulArgs : MatmulProblem {
  const uint32_t* plane_hi = nullptr;
  int64_t ld_hi = 0;                // words per stored row of each plane
  const uint32_t* plane_mid = nullptr;
  int64_t ld_mid = 0;
  const uint32_t* plane_lo = nullptr;
  int64_t ld_lo = 0;
  int precision = 8;                // r: 8, 6, 4, 3 or 2
};

inline bool plane_needed(int precision, int plane /* 0 hi, 1 mid, 2 lo */) {
  return plane == 0 || (plane == 1 && precision >= 3) || (plane == 2 && precision >= 6);
}

// "op(M=.., N=.., K=.., <what>=<value>, group_size=.., x=.., out=..)" for error messages.
inline std::string describe_problem(const char* op, const MatmulProblem& a, const char* what,
                                    int value) {
  std::ostringstream s;
  s << op << "(M=" << a.M << ", N=" << a.N << ", K=" << a.K << ", " << what << "=" << value
    << ", group_size=" << a.group_size << ", x=" << dtype_name(a.x_dtype)
    << ", out=" << dtype_name(a.out_dtype) << ")";
  return s.str();
}

inline std::string describe(const char* op, const QMatmulArgs& a) {
  return describe_problem(op, a, "bits", a.bits);
}

inline std::string describe(const char* op, const PlaneMatmulArgs& a) {
  return describe_problem(op, a, "precision", a.precision);
}

// The checks of the shared fields; fail(why) must throw.
template <class Fail>
void check_problem(const MatmulProblem& a, Fail fail) {
  if (a.group_size <= 0 || a.group_size % 32 != 0)
    fail("group_size must be a positive multiple of 32");
  if (a.M < 0 || a.N < 0 || a.K < 0) fail("negative size");
  if (a.M > 0 && a.N > 0 && (!a.x || !a.scales || !a.out)) fail("null pointer");
  if (a.lds < (a.K + a.group_size - 1) / a.group_size)
    fail("lds is smaller than the number of groups of K");
  if (a.ldx < a.K || a.ldo < a.N) fail("row stride smaller than the row");
  for (int d : {a.x_dtype, a.sz_dtype, a.bias_dtype, a.out_dtype})
    if (d != kFloat32 && d != kFloat16 && d != kBFloat16) fail("unsupported dtype code");
}

// Checks that every kernel relies on; raises std::invalid_argument naming the problem.
inline void check_qmatmul_args(const char* op, const QMatmulArgs& a) {
  auto fail = [&](const std::string& why) {
    throw std::invalid_argument(describe(op, a) + ": " + why);
  };
  if (a.bits != 2 && a.bits != 3 && a.bits != 4 && a.bits != 8) fail("bits must be 2, 3, 4 or 8");
  if (a.act_bits != 0 && a.act_bits != 8) fail("act_bits must be 0 or 8");
  check_problem(a, fail);
  if (a.M > 0 && a.N > 0 && !a.qweight) fail("null pointer");
  if (a.ldq < (a.K + 31) / 32 * a.bits) fail("ldq is smaller than the packed length of K");
  if (a.interleave != 0 && a.interleave != 8) fail("interleave must be 0 or 8");
  if (a.interleave && a.N % a.interleave) fail("N must be a multiple of the row interleave");
  const QMatmulArgs::CanonicalRows& c = a.canonical;
  if (c.qweight || c.scales || c.zeros) {
    if (!a.interleave) fail("canonical rows are given for a call that is not interleaved");
    if (!c.qweight || !c.scales) fail("canonical rows without their words or scales");
    if (!c.zeros != !a.zeros) fail("canonical rows and interleaved rows differ in zero points");
    if (c.ldq < (a.K + 31) / 32 * a.bits)
      fail("the canonical ldq is smaller than the packed length of K");
    if (c.lds < (a.K + a.group_size - 1) / a.group_size)
      fail("the canonical lds is smaller than the number of groups of K");
  }
}

// The fragment-native decode call (csrc/mma_frag.h: MmaDecodeArgs).
inline std::string describe(const char* op, const mma::MmaDecodeArgs& a) {
  std::ostringstream s;
  s << op << "(M=" << a.M << ", N=" << a.N << ", K=" << a.K << ", bits=" << a.bits
    << ", units=" << a.units << ", x=" << dtype_name(a.x_dtype)
    << ", out=" << dtype_name(a.out_dtype) << ")";
  return s.str();
}

// Checks that the fragment-native decode kernel and its emulator rely on; raises
// std::invalid_argument naming the problem.
inline void check_mma_decode_args(const char* op, const mma::MmaDecodeArgs& a) {
  auto fail = [&](const std::string& why) {
    throw std::invalid_argument(describe(op, a) + ": " + why);
  };
  if (a.bits != 2 && a.bits != 3 && a.bits != 4 && a.bits != 8) fail("bits must be 2, 3, 4 or 8");
  if (a.x_dtype != kFloat16 && a.x_dtype != kBFloat16)
    fail("the activations must be float16 or bfloat16");
  for (int d : {a.bias_dtype, a.out_dtype})
    if (d != kFloat32 && d != kFloat16 && d != kBFloat16) fail("unsupported dtype code");
  if (a.M < 0 || a.N < 0 || a.K < 0) fail("negative size");
  if (a.M > mma::kMaxM) fail("M must be at most " + std::to_string(mma::kMaxM));
  const int ik = mma::iteration_k(a.bits);
  if (a.units != 1 && a.units != 2 && a.units != 4 && a.units != 8)
    fail("units must be 1, 2, 4 or 8");
  if (ik / a.units < 32 || ik % a.units) fail("units leave fewer than 32 inputs per unit");
  if (a.gshift < 0 || a.gshift > mma::kOneGroupShift) fail("gshift out of range");
  if (a.gshift < mma::kOneGroupShift && ((int64_t)1 << a.gshift) < ik / a.units)
    fail("a group is smaller than a unit");
  if (a.tiles * mma::kTileRows < a.N) fail("tiles do not cover N");
  if (a.iterations * ik < a.K) fail("iterations do not cover K");
  const int64_t group_len = a.gshift < mma::kOneGroupShift ? (int64_t)1 << a.gshift : 0;
  if (a.groups < 1 || (group_len && a.groups < (a.iterations * ik + group_len - 1) / group_len))
    fail("params hold too few groups");
  if (a.ldx < a.K || a.ldo < a.N) fail("row stride smaller than the row");
  if (a.M > 0 && a.N > 0 && (!a.frag || !a.params || !a.x || !a.out)) fail("null pointer");
}

// Checks that the plane kernels rely on; raises std::invalid_argument naming the problem.
inline void check_plane_matmul_args(const char* op, const PlaneMatmulArgs& a) {
  auto fail = [&](const std::string& why) {
    throw std::invalid_argument(describe(op, a) + ": " + why);
  };
  const int r = a.precision;
  if (r != 2 && r != 3 && r != 4 && r != 6 && r != 8) fail("precision must be 8, 6, 4, 3 or 2");
  check_problem(a, fail);
  const int64_t k_blocks = (a.K + 31) / 32;
  const uint32_t* planes[3] = {a.plane_hi, a.plane_mid, a.plane_lo};
  const int64_t row_words[3] = {a.ld_hi, a.ld_mid, a.ld_lo};
  const char* names[3] = {"plane_hi", "plane_mid", "plane_lo"};
  const int plane_bits[3] = {3, 2, 3};
  for (int p = 0; p < 3; ++p) {
    if (!plane_needed(r, p)) continue;
    if (a.M > 0 && a.N > 0 && !planes[p])
      fail(std::string("a ") + std::to_string(r) + "-bit slice reads " + names[p] +
           ", got a null pointer");
    if (row_words[p] < k_blocks * plane_bits[p])
      fail(std::string("ld of ") + names[p] + " is smaller than the packed length of K");
  }
}

// ---- portable fp16 / bf16 conversions (round to nearest even, NaN/Inf preserved) -----------

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  if (exp == 0x1F) return bits_to_float(sign | 0x7F800000u | (man << 13));  // inf / nan
  if (exp == 0) {
    if (man == 0) return bits_to_float(sign);                                 // +-0
    // subnormal: value = man * 2^-24
    float v = (float)man * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}

inline uint16_t float_to_half(float f) {
  uint32_t u = float_to_bits(f);
  const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
  u &= 0x7FFFFFFFu;
  if (u >= 0x7F800000u) return sign | (u > 0x7F800000u ? 0x7E00u : 0x7C00u);  // nan / inf
  if (u >= 0x477FF000u) return sign | 0x7C00u;                                 // overflow -> inf
  if (u < 0x38800000u) {                                                        // subnormal / 0
    // Add 0.5 (as a float) so that the FPU rounds the mantissa to a multiple of 2^-24.
    float v = bits_to_float(u) + 0.5f;
    return sign | (uint16_t)(float_to_bits(v) - 0x3F000000u);
  }
  // normal: rebias exponent (127 -> 15) and round the 13 dropped bits to nearest even
  uint32_t mant_odd = (u >> 13) & 1u;
  u += 0xC8000FFFu + mant_odd;  // (15 - 127) << 23 plus rounding bias
  return sign | (uint16_t)(u >> 13);
}

inline float bf16_to_float(uint16_t b) { return bits_to_float((uint32_t)b << 16); }

inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40u);  // quiet nan
  u += 0x7FFFu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

inline float load_as_float(const void* p, int dtype, int64_t i) {
  switch (dtype) {
    case kFloat16: return half_to_float(static_cast<const uint16_t*>(p)[i]);
    case kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

inline void store_from_float(void* p, int dtype, int64_t i, float v) {
  switch (dtype) {
    case kFloat16: static_cast<uint16_t*>(p)[i] = float_to_half(v); break;
    case kBFloat16: static_cast<uint16_t*>(p)[i] = float_to_bf16(v); break;
    default: static_cast<float*>(p)[i] = v; break;
  }
}

}  // namespace pyengine
