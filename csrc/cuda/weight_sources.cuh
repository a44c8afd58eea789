// The weight sources of the CUDA matmul kernels: how one 32-code packing block of a weight row
// is loaded and turned into values. The decode GEMV (decode_gemv.cuh) and the simple kernel
// (simple_gemm.cuh) are written once against this interface and instantiated per source:
//
//   PackedSource<BITS>  the canonical packed weight (docs/FORMAT.md), QMatmulArgs;
//   PlaneSource<R>      the r-bit slice of a Matryoshka int8 parent read from its bit planes
//                       (docs/FORMAT.md, "Matryoshka weights"), PlaneMatmulArgs: only the planes
//                       the slice needs are loaded.
//
// A source provides
//   Words                         the loaded words of one block of one row (registers);
//   load(a, n, b, vec, words)     loads block b of row n (vec: vector loads are aligned);
//   prepare(words)                work done once per loaded block before its codes are read;
//   value(words, j)               code j (0..31, compile-time after unrolling) as the float
//                                 v = 1 + c * 2^-F, c the code the weight is dequantized from,
//                                 placed in the mantissa by bit operations (no int-to-float
//                                 conversion);
//   kUnit                         U with  c * 2^m = (v - 1) * U  (the weight in parent units:
//                                 w = ((v - 1) * U - z) * s; canonical U = 2^BITS, m = 0);
//   kSymmetricZero                the zero point of a symmetric weight;
//   kMaxTileM                     the most activation rows one decode block takes (4 or 8:
//                                 the registers its words leave for accumulators);
//   vector_loads(a)               whether its vector loads are aligned for these arguments.
// Folded into a block's scale s and zero z (x_j its activations):
//   sum_j x_j w_j = S * sum_j x_j v_j + C * sum_j x_j,   S = s * U,  C = -s * (z + U).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "code_bits.h"
#include "common.h"
#include "cuda/device_util.cuh"

namespace pyengine {
namespace cuda {

// A scale or zero is loaded as its raw bits and converted only where it is used, so that a load
// issued one pass ahead does not stall the warp on a conversion.
__device__ __forceinline__ uint32_t load_param_bits(const void* p, int dtype, int64_t i) {
  if (dtype == kFloat32) return __ldg(static_cast<const unsigned int*>(p) + i);
  return __ldg(static_cast<const unsigned short*>(p) + i);
}

__device__ __forceinline__ float param_from_bits(uint32_t u, int dtype) {
  switch (dtype) {
    case kFloat16: return __half2float(__ushort_as_half((unsigned short)u));
    case kBFloat16: return __uint_as_float(u << 16);
    default: return __uint_as_float(u);
  }
}

// The `bits` words of one packing block starting at p: one 16-byte load for 4 bits, two for 8
// bits, one 8-byte load for 2 bits when `vec` (the caller checked the alignment); otherwise, and
// always for 3 bits (12-byte blocks), word by word.
template <int BITS>
__device__ __forceinline__ void load_block_words(const uint32_t* p, bool vec, uint32_t (&w)[BITS]) {
  if constexpr (BITS == 4) {
    if (vec) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));  // static-gpu: weight load
      w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
      return;
    }
  } else if constexpr (BITS == 8) {
    if (vec) {
      const uint4 v0 = __ldg(reinterpret_cast<const uint4*>(p));  // static-gpu: weight load
      const uint4 v1 = __ldg(reinterpret_cast<const uint4*>(p) + 1);  // static-gpu: weight load
      w[0] = v0.x; w[1] = v0.y; w[2] = v0.z; w[3] = v0.w;
      w[4] = v1.x; w[5] = v1.y; w[6] = v1.z; w[7] = v1.w;
      return;
    }
  } else if constexpr (BITS == 2) {
    if (vec) {
      const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));  // static-gpu: weight load
      w[0] = v.x; w[1] = v.y;
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < BITS; ++i) w[i] = __ldg(p + i);  // static-gpu: weight load
}

// Code j (0..31, a compile-time constant after unrolling) of a packing block, as the float
// 1 + q * 2^-BITS (see the header). Layout: docs/FORMAT.md.
template <int BITS>
__device__ __forceinline__ float code_value(const uint32_t (&w)[BITS], int j) {
  constexpr int T = 23 - BITS;                              // q lands at bits [T, T + BITS)
  constexpr uint32_t kField = ((1u << BITS) - 1u) << T;
  const int bit = j * BITS, i = bit >> 5, off = bit & 31;
  uint32_t u;
  if (BITS == 3 && off + BITS > 32) {
    // codes 10 (off 30) and 21 (off 31): bits [off, off + 3) of w[i + 1]:w[i]
    u = __funnelshift_r(w[i], w[i + 1 < BITS ? i + 1 : BITS - 1], off - T);
  } else if (off >= T) {
    u = w[i] >> (off - T);
  } else {
    u = w[i] << (T - off);
  }
  return __uint_as_float((u & kField) | 0x3F800000u);
}


// ---- the canonical packed weight -----------------------------------------------------------

template <int BITS>
struct PackedSource {
  using Args = QMatmulArgs;
  struct Words {
    uint32_t w[BITS];
  };
  static constexpr float kUnit = (float)(1 << BITS);
  static constexpr float kSymmetricZero = (float)(1 << (BITS - 1));
  static constexpr int kMaxTileM = 8;

  __device__ static __forceinline__ void load(const Args& a, int64_t n, int64_t b, bool vec,
                                              Words& out) {
    load_block_words<BITS>(a.qweight + n * a.ldq + b * BITS, vec, out.w);
  }
  __device__ static __forceinline__ void clear(Words& out) {
#pragma unroll
    for (int i = 0; i < BITS; ++i) out.w[i] = 0u;
  }
  __device__ static __forceinline__ void prepare(Words&) {}
  __device__ static __forceinline__ float value(const Words& in, int j) {
    return code_value<BITS>(in.w, j);
  }
  // 16-byte loads for 4 and 8 bits, 8-byte loads for 2 bits; 3-bit blocks (12 bytes) are read
  // word by word.
  static bool vector_loads(const Args& a) {
    const uintptr_t qw = reinterpret_cast<uintptr_t>(a.qweight);
    if (BITS == 2) return qw % 8 == 0 && a.ldq % 2 == 0;
    return qw % 16 == 0 && a.ldq % 4 == 0;
  }
};

// ---- the Matryoshka bit planes --------------------------------------------------------------
// A block of each plane: hi 3 words (3-bit codes), mid 2 words (2-bit), lo 3 words (3-bit).
// R = 2 loads hi only and turns the whole block into int2 slice codes at once (SWAR,
// int2_block_from_hi): c_2 sits in 3-bit fields, F = 3, U = 2^(6 + 3) = 512. The other
// precisions compute c_R per code (slice_code<R>) and place it at F = R: U = 2^(8 - R + R) = 256.
// The parent's zero point is 128 when symmetric.

template <int R>
struct PlaneSource {
  using Args = PlaneMatmulArgs;
  static constexpr bool kReadsMid = R >= 3;
  static constexpr bool kReadsLo = R >= 6;
  struct Words {
    uint32_t hi[3];
    uint32_t mid[2];  // loaded for R >= 3 only
    uint32_t lo[3];   // loaded for R >= 6 only
  };
  static constexpr float kUnit = R == 2 ? 512.f : 256.f;
  static constexpr float kSymmetricZero = 128.f;
  static constexpr int kMaxTileM = 4;   // 6 and 8 spill on sm_90a (decode_gemv.cuh)

  __device__ static __forceinline__ void load(const Args& a, int64_t n, int64_t b, bool vec,
                                              Words& out) {
    load_block_words<3>(a.plane_hi + n * a.ld_hi + b * 3, false, out.hi);
    if constexpr (kReadsMid) load_block_words<2>(a.plane_mid + n * a.ld_mid + b * 2, vec, out.mid);
    if constexpr (kReadsLo) load_block_words<3>(a.plane_lo + n * a.ld_lo + b * 3, false, out.lo);
  }
  __device__ static __forceinline__ void clear(Words& out) {
#pragma unroll
    for (int i = 0; i < 3; ++i) out.hi[i] = out.lo[i] = 0u;
    out.mid[0] = out.mid[1] = 0u;
  }
  __device__ static __forceinline__ void prepare(Words& w) {
    if constexpr (R == 2) int2_block_from_hi(w.hi, w.hi);
  }
  __device__ static __forceinline__ float value(const Words& in, int j) {
    if constexpr (R == 2) {
      return code_value<3>(in.hi, j);
    } else {
      const uint32_t c = slice_code<R>(in.hi, in.mid, in.lo, j);
      return __uint_as_float((c << (23 - R)) | 0x3F800000u);
    }
  }
  // Only plane_mid (2-bit: 8-byte blocks) is read with vector loads; 3-bit blocks are 12 bytes.
  static bool vector_loads(const Args& a) {
    return reinterpret_cast<uintptr_t>(a.plane_mid) % 8 == 0 && a.ld_mid % 2 == 0;
  }
};

}  // namespace cuda
}  // namespace pyengine
