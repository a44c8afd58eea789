// Helpers shared by the CUDA kernels: dtype-generic element loads/stores, the epilogue's
// accumulate flag and the host-side CUDA error check. The code
// extraction of a packing block (block_code, Matryoshka slice codes) lives in code_bits.h,
// which the host module shares.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

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

// Whether an epilogue adds into the output: the canonical kernels' shortcut product arrives
// that way; the plane matmul always overwrites.
__host__ __device__ __forceinline__ bool accumulates(const QMatmulArgs& a) { return a.accumulate; }
__host__ __device__ __forceinline__ bool accumulates(const PlaneMatmulArgs&) { return false; }

// Raises std::runtime_error naming op, the problem (M, N, K, bits / precision, group size) and
// the failed call when err is not cudaSuccess.
template <class Args>
void check_cuda(cudaError_t err, const char* op, const char* what, const Args& a) {
  if (err != cudaSuccess)
    throw std::runtime_error(describe(op, a) + ": " + what + ": " + cudaGetErrorString(err));
}

}  // namespace cuda
}  // namespace pyengine
