// The activation staging of the tensor-core decode kernel (csrc/cuda/decode_mma.cuh), portable
// C++ like csrc/mma_frag.h: the kernel runs these functions on its block's threads into shared
// memory, the host emulation (csrc/cpu/mma_emulate.cpp) runs them on one "thread" into arrays and
// then reads the staged values with the same index functions as the kernel, so the tests check
// the staging and its indexing on the CPU.
//
// A slab of the activations, for NT token tiles of 8 tokens and `pairs` step pairs from input k0
// (k0 at an iteration's start), becomes:
//   * B fragment entries: 4 words (the 16 bytes a lane loads at once) per step pair q, token tile
//     tt and lane, at entry bfrag_entry(q, tt, lane, NT): step pair q's tiles side by side, so a
//     lane reaches both at fixed offsets. Words: B registers 0, 1 of step 2q, then of 2q + 1
//     (mma_frag.h: register r, half h of step s of lane l holds x[tt * 8 + g][k0 + staged_k]).
//   * unit records: 8 floats per unit u (of the slab), token tile tt and token pair (2j, 2j + 1),
//     at unit_record(u, tt, j, NT):
//       [0..3]  -X'_0(2j), -X'_0(2j + 1), -X'_1(2j), -X'_1(2j + 1): minus the sum of x times
//               the offset the raw codes of row half rh carry (mma_frag.h); lane 4g + j's
//               accumulators (C elements i: row half i >> 1, token 2j + (i & 1)) start there;
//       [4..5]  X(2j), X(2j + 1): the sum of the token's inputs in the unit;  [6..7] unused.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#endif

#include "common.h"
#include "mma_frag.h"

namespace pyengine {
namespace mma {

constexpr int kEntryWords = 4;   // words per B fragment entry (one 16-byte load)
constexpr int kRecordFloats = 8;  // floats per unit record

PYENGINE_MMA_HD constexpr int64_t bfrag_entry(int64_t q, int tt, int lane, int nt) {
  return (q * nt + tt) * 32 + lane;
}
PYENGINE_MMA_HD constexpr int64_t unit_record(int64_t u, int tt, int j, int nt) {
  return ((u * nt + tt) * 4 + j) * kRecordFloats;
}

// A stored fp16 / bf16 half as a float.
template <bool BF16>
PYENGINE_MMA_HD float stored_half(uint32_t h) {
#if defined(__CUDA_ARCH__)
  if constexpr (BF16) return __uint_as_float(h << 16);
  else return __half2float(__ushort_as_half((unsigned short)h));
#else
  return BF16 ? bf16_to_float((uint16_t)h) : half_to_float((uint16_t)h);
#endif
}

PYENGINE_MMA_HD uint32_t x_half_bits(const MmaDecodeArgs& a, int64_t m, int64_t k) {
  if (m >= a.M || k >= a.K) return 0u;
  return static_cast<const uint16_t*>(a.x)[m * a.ldx + k];
}

// Stages `pairs` step pairs (32 inputs each) from input k0 for NT token tiles into bfrag (words,
// kEntryWords per entry). x32: the activation rows allow 4-byte loads of element pairs. Items
// first, first + stride, ... (a block's threads, or first = 0, stride = 1).
template <int NT>
PYENGINE_MMA_HD void stage_pairs(const MmaDecodeArgs& a, bool x32, int64_t k0, int pairs,
                                 int first, int stride, uint32_t* bfrag) {
  const int items = NT * pairs * 32;
  for (int item = first; item < items; item += stride) {
    const int lane = item & 31, q = (item >> 5) % pairs, tt = (item >> 5) / pairs;
    const int64_t m = tt * kTokens + b_token(lane);
    uint32_t reg[4];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int e = 0; e < 4; ++e) {  // step 2q + e / 2, B register e % 2
      const int64_t k = k0 + staged_k(2 * q + e / 2, lane, e % 2, 0);  // even; h = 1 at k + 1
      if (x32 && m < a.M && k + 1 < a.K) {
        reg[e] = *reinterpret_cast<const uint32_t*>(static_cast<const uint16_t*>(a.x) +
                                                    m * a.ldx + k);
      } else {
        reg[e] = x_half_bits(a, m, k) | (x_half_bits(a, m, k + 1) << 16);
      }
    }
    uint32_t* dst = bfrag + bfrag_entry(q, tt, lane, NT) * kEntryWords;
#if defined(__CUDA_ARCH__)
    *reinterpret_cast<uint4*>(dst) = make_uint4(reg[0], reg[1], reg[2], reg[3]);
#else
    for (int e = 0; e < 4; ++e) dst[e] = reg[e];
#endif
  }
}

// The unit records of a staged slab of `units` units of pairs_per_unit step pairs, read back
// from its B fragments (a token's 32 inputs of pair q are the entries of lanes 4 * token ..
// 4 * token + 3). Tokens at or past M are zero and only written. Items as stage_pairs.
template <int BITS, bool BF16, int NT>
PYENGINE_MMA_HD void unit_sums(int64_t M, int units, int pairs_per_unit, int first, int stride,
                               const uint32_t* bfrag, float* xrec) {
  constexpr int STEPS = steps_per_iteration(BITS);
  for (int item = first; item < NT * units * kTokens; item += stride) {
    const int tok = item % kTokens, u = (item / kTokens) % units, tt = item / (kTokens * units);
    float sum = 0.f, off0 = 0.f, off1 = 0.f;
    if (tt * kTokens + tok < M) {
      for (int q = u * pairs_per_unit; q < (u + 1) * pairs_per_unit; ++q) {
        // Word c of an entry holds B register c % 2 (k half kh = c % 2) of step 2q + c / 2 (a
        // slab starts at an iteration, so that step's place in its iteration is mod STEPS); its
        // inputs meet A registers 2 kh (row half 0) and 2 kh + 1 (row half 1).
        float e0[4], e1[4];
        for (int c = 0; c < 4; ++c) {
          const int step = (2 * q + c / 2) % STEPS, kh = c % 2;
          e0[c] = register_offset(BITS, BF16, step, 2 * kh);
          e1[c] = register_offset(BITS, BF16, step, 2 * kh + 1);
        }
        for (int t = 0; t < 4; ++t) {
          const uint32_t* v = bfrag + bfrag_entry(q, tt, 4 * tok + t, NT) * kEntryWords;
#if defined(__CUDA_ARCH__)
          const uint4 w4 = *reinterpret_cast<const uint4*>(v);
          const uint32_t w[4] = {w4.x, w4.y, w4.z, w4.w};
#else
          const uint32_t w[4] = {v[0], v[1], v[2], v[3]};
#endif
          for (int c = 0; c < 4; ++c) {
            const float x2 = stored_half<BF16>(w[c] & 0xFFFFu) + stored_half<BF16>(w[c] >> 16);
            sum += x2;
            off0 = fmaf(e0[c], x2, off0);
            off1 = fmaf(e1[c], x2, off1);
          }
        }
      }
    }
    float* rec = xrec + unit_record(u, tt, tok / 2, NT);
    rec[tok % 2] = -off0;
    rec[2 + tok % 2] = -off1;
    rec[4 + tok % 2] = sum;
  }
}

}  // namespace mma
}  // namespace pyengine
