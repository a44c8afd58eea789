// Device helpers shared by the CUDA kernels: dtype-generic element loads/stores. The code
// extraction of a packing block (block_code, Matryoshka slice codes) lives in code_bits.h,
// which the host module shares.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "code_bits.h"
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

}  // namespace cuda
}  // namespace pyengine
