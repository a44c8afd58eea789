// Shared definitions of pyengine._C: dtype codes, the quantized-matmul problem description and
// portable fp16/bf16 conversions. Nothing here depends on torch or CUDA.
#pragma once

#include <cstdint>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>

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

// One quantized matmul:  out[m, n] (+)= sum_k x[m, k] * W[n, k] + bias[n]
// for m < M, n < N, k < K, where W is the canonical packed weight of docs/FORMAT.md:
//   qweight: uint32 words, row n at qweight + n * ldq; a block of 32 codes takes `bits` words.
//   scales/zeros: row n at + n * lds, one value per group of `group_size` codes (a multiple of
//   32; a per-channel weight passes its padded row length). zeros == 0 means symmetric: the
//   zero point is 2^(bits-1).
// N and K may be smaller than the stored weight (sliced_matmul reads a sub-block); K need not
// be a multiple of 32: codes past K are never multiplied by anything but zero.
struct QMatmulArgs {
  const void* x = nullptr;        // [M, K] activations, row stride ldx elements
  int x_dtype = kFloat32;
  int64_t ldx = 0;
  const uint32_t* qweight = nullptr;
  int64_t ldq = 0;                // words per stored row
  const void* scales = nullptr;   // [N, lds]
  const void* zeros = nullptr;    // [N, lds] or nullptr (symmetric)
  int sz_dtype = kFloat32;        // dtype of scales and zeros
  int64_t lds = 0;
  const void* bias = nullptr;     // [N] or nullptr
  int bias_dtype = kFloat32;
  void* out = nullptr;            // [M, N], row stride ldo elements
  int out_dtype = kFloat32;
  int64_t ldo = 0;
  bool accumulate = false;        // out += result instead of out = result
  int64_t M = 0, N = 0, K = 0;
  int bits = 4;
  int64_t group_size = 128;
  int num_threads = 0;            // <= 0: the OpenMP default
};

inline std::string describe(const char* op, const QMatmulArgs& a) {
  std::ostringstream s;
  s << op << "(M=" << a.M << ", N=" << a.N << ", K=" << a.K << ", bits=" << a.bits
    << ", group_size=" << a.group_size << ", x=" << dtype_name(a.x_dtype)
    << ", out=" << dtype_name(a.out_dtype) << ")";
  return s.str();
}

// Checks that every kernel relies on; raises std::invalid_argument naming the problem.
inline void check_qmatmul_args(const char* op, const QMatmulArgs& a) {
  auto fail = [&](const std::string& why) {
    throw std::invalid_argument(describe(op, a) + ": " + why);
  };
  if (a.bits != 2 && a.bits != 3 && a.bits != 4 && a.bits != 8) fail("bits must be 2, 3, 4 or 8");
  if (a.group_size <= 0 || a.group_size % 32 != 0) fail("group_size must be a positive multiple of 32");
  if (a.M < 0 || a.N < 0 || a.K < 0) fail("negative size");
  if (!a.x || !a.qweight || !a.scales || !a.out) {
    if (a.M > 0 && a.N > 0) fail("null pointer");
  }
  const int64_t k_blocks = (a.K + 31) / 32;
  if (a.ldq < k_blocks * a.bits) fail("ldq is smaller than the packed length of K");
  if (a.lds < (a.K + a.group_size - 1) / a.group_size) fail("lds is smaller than the number of groups of K");
  if (a.ldx < a.K || a.ldo < a.N) fail("row stride smaller than the row");
  for (int d : {a.x_dtype, a.sz_dtype, a.bias_dtype, a.out_dtype})
    if (d != kFloat32 && d != kFloat16 && d != kBFloat16) fail("unsupported dtype code");
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
