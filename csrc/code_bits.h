// Bit-level code extraction shared by the CUDA kernels and the host module: the codes of one
// 32-code packing block of the canonical packing (docs/FORMAT.md) and the r-bit slice codes of a
// Matryoshka parent read from its bit planes ("Matryoshka weights" in docs/FORMAT.md).
//
// Everything here is portable C++ (host and device). The device kernels use these functions;
// the host module binds them (pyengine._C.plane_block_codes / plane_int2_block) so the tests
// check on the CPU the very bit manipulation the GPU runs.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PYENGINE_HD __host__ __device__ __forceinline__
#else
#define PYENGINE_HD inline
#endif

namespace pyengine {

// Code j (0..31) of a packing block held in words[0..BITS). Codes are packed LSB-first, code j
// at bits [BITS * j, BITS * j + BITS) of the block's little-endian bit string; a 3-bit block's
// codes 10 (bits 30..32) and 21 (bits 63..65) straddle two words.
template <int BITS>
PYENGINE_HD uint32_t block_code(const uint32_t* words, int j) {
  if constexpr (BITS == 3) {
    const int bit = 3 * j;
    const int w = bit >> 5, shift = bit & 31;
    uint32_t v = words[w] >> shift;
    if (shift > 29) v |= words[w + 1] << (32 - shift);
    return v & 7u;
  } else {
    constexpr int per_word = 32 / BITS;
    return (words[j / per_word] >> ((j % per_word) * BITS)) & ((1u << BITS) - 1u);
  }
}

// ---- Matryoshka slices from bit planes ------------------------------------------------------
// Parent code q = hi << 5 | mid << 3 | lo. One packing block of each plane: hi = 3 words (3-bit
// codes), mid = 2 words (2-bit codes), lo = 3 words (3-bit codes). The r-bit slice code is
//   c_r = min((u + 1) >> 1, 2^r - 1),  u = q >> (7 - r)  (the top r + 1 bits),   c_8 = q,
// so r = 2 reads hi only, r = 3 and 4 read hi and mid, r = 6 and 8 read all three.

// Slice code c_R of code j of the block. Planes the precision does not read are never touched
// (they may be null).
template <int R>
PYENGINE_HD uint32_t slice_code(const uint32_t* hi, const uint32_t* mid, const uint32_t* lo,
                                int j) {
  static_assert(R == 2 || R == 3 || R == 4 || R == 6 || R == 8, "precision 8, 6, 4, 3 or 2");
  const uint32_t h = block_code<3>(hi, j);
  uint32_t u;
  if constexpr (R == 2) {
    u = h;
  } else {
    const uint32_t m = block_code<2>(mid, j);
    if constexpr (R == 3) {
      u = (h << 1) | (m >> 1);
    } else if constexpr (R == 4) {
      u = (h << 2) | m;
    } else {
      const uint32_t q = (h << 5) | (m << 3) | block_code<3>(lo, j);
      if constexpr (R == 8) return q;
      u = q >> 1;
    }
  }
  const uint32_t c = (u + 1u) >> 1, cap = (1u << R) - 1u;
  return c < cap ? c : cap;
}

// The 96-bit block string shifted right / left by k (0 < k < 32) as one number.
PYENGINE_HD void shift_right96(const uint32_t* w, int k, uint32_t* out) {
  out[0] = (w[0] >> k) | (w[1] << (32 - k));
  out[1] = (w[1] >> k) | (w[2] << (32 - k));
  out[2] = w[2] >> k;
}

PYENGINE_HD void shift_left96(const uint32_t* w, int k, uint32_t* out) {
  out[2] = (w[2] << k) | (w[1] >> (32 - k));
  out[1] = (w[1] << k) | (w[0] >> (32 - k));
  out[0] = w[0] << k;
}

// The int2 slice codes of a whole block of plane_hi at once (SWAR): out (3 words; may alias hi)
// holds c_2 of code j in the 3-bit field j, its top bit 0, so that block_code<3>(out, j) ==
// slice_code<2>(hi, -, -, j). With the field t = b2 b1 b0 of hi,
//   c_2 = min((t + 1) >> 1, 3) = (t >> 1) + carry,  carry = b0 & ~(b1 & b2),
// written bitwise so that no carry leaves a field (fields 10 and 21 straddle words):
//   c_lo = b1 ^ carry,  c_hi = b2 | (b1 & carry).
// Shifting the whole 96-bit string right by 1 (2) brings b1 (b2) of every field to its bit 3j.
PYENGINE_HD void int2_block_from_hi(const uint32_t* hi, uint32_t* out) {
  // Bit 3j of the 96-bit string (the lowest bit of every field), per word.
  const uint32_t kFieldLsb[3] = {0x49249249u, 0x92492492u, 0x24924924u};
  uint32_t b1[3], b2[3], c_hi[3];
  shift_right96(hi, 1, b1);
  shift_right96(hi, 2, b2);
  uint32_t c_lo[3];
  for (int i = 0; i < 3; ++i) {
    const uint32_t carry = hi[i] & ~(b1[i] & b2[i]);
    c_lo[i] = (b1[i] ^ carry) & kFieldLsb[i];
    c_hi[i] = (b2[i] | (b1[i] & carry)) & kFieldLsb[i];
  }
  uint32_t c_hi_up[3];
  shift_left96(c_hi, 1, c_hi_up);
  for (int i = 0; i < 3; ++i) out[i] = c_lo[i] | c_hi_up[i];
}

}  // namespace pyengine
