// Device helpers shared by the CUDA kernels: dtype-generic element loads/stores and the code
// extraction of a canonical packing block (docs/FORMAT.md).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common.h"

namespace pyengine {
namespace cuda {

// Element i of a float32 / float16 / bfloat16 array (dtype: a DType code), as float.
__device__ __forceinline__ float load_f(const void* p, int dtype, int64_t i) {
  switch (dtype) {
    case kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    case kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// Stores v as element i of a float32 / float16 / bfloat16 array (round to nearest even).
__device__ __forceinline__ void store_f(void* p, int dtype, int64_t i, float v) {
  switch (dtype) {
    case kFloat16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    case kBFloat16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(p)[i] = v; break;
  }
}

// Code j (0..31) of a packing block held in words[0..BITS). Codes are packed LSB-first; a 3-bit
// block's codes 10 and 21 straddle two words.
template <int BITS>
__device__ __forceinline__ uint32_t block_code(const uint32_t* words, int j) {
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

}  // namespace cuda
}  // namespace pyengine
