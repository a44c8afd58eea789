// A simple CUDA quantized matmul, written once for every weight source of weight_sources.cuh:
// one warp per output channel, each lane walking the 32-code packing blocks of that row, fp32
// accumulation, warp-shuffle reduction. It serves every M (grid.y walks M in chunks of
// kRowsPerWarp) and every bits / precision / group / dtype. It is correct rather than fast; the
// decode GEMV and the tensor-core GEMM replace it on their shapes.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "common.h"
#include "cuda/device_util.cuh"
#include "cuda/weight_sources.cuh"

namespace pyengine {
namespace cuda {
namespace simple_gemm {

constexpr int kWarpsPerBlock = 4;
constexpr int kRowsPerWarp = 8;  // activation rows handled by one warp

template <class Src>
__global__ void simple_gemm_kernel(const typename Src::Args a) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t n = (int64_t)blockIdx.x * kWarpsPerBlock + warp;
  const int64_t m0 = (int64_t)blockIdx.y * kRowsPerWarp;
  if (n >= a.N) return;  // whole warp leaves together
  const int rows = (int)min((int64_t)kRowsPerWarp, a.M - m0);

  float acc[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) acc[r] = 0.f;

  const int64_t n_blocks = (a.K + 31) / 32;
  for (int64_t b = lane; b < n_blocks; b += 32) {
    typename Src::Words words;
    Src::load(a, n, b, false, words);
    Src::prepare(words);
    const int64_t k0 = b * 32;
    const int64_t g = k0 / a.group_size;  // a block never straddles groups (group % 32 == 0)
    const float s = load_f(a.scales, a.sz_dtype, n * a.lds + g);
    const float z = a.zeros ? load_f(a.zeros, a.sz_dtype, n * a.lds + g) : Src::kSymmetricZero;
    const int valid = (int)min((int64_t)32, a.K - k0);
    for (int j = 0; j < valid; ++j) {
      // (v - 1) * kUnit is the code in parent units, exactly (weight_sources.cuh).
      const float w = ((Src::value(words, j) - 1.f) * Src::kUnit - z) * s;
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r)
        if (r < rows) acc[r] += load_f(a.x, a.x_dtype, (m0 + r) * a.ldx + k0 + j) * w;
    }
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r)
    for (int off = 16; off > 0; off >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], off);

  if (lane == 0) {
    const float bias = a.bias ? load_f(a.bias, a.bias_dtype, n) : 0.f;
    for (int r = 0; r < rows; ++r) {
      const int64_t o = (m0 + r) * a.ldo + n;
      float v = acc[r] + bias;
      if (accumulates(a)) v += load_f(a.out, a.out_dtype, o);
      store_f(a.out, a.out_dtype, o, v);
    }
  }
}

// Launches the simple kernel for weight source Src on checked arguments; raises
// std::runtime_error (naming op and the problem) when a CUDA call fails.
template <class Src>
void launch_simple_gemm(const char* op, const typename Src::Args& a, int device,
                        uintptr_t stream) {
  if (a.M == 0 || a.N == 0) return;
  check_cuda(cudaSetDevice(device), op, "cudaSetDevice", a);
  const int64_t grid_x = (a.N + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const int64_t grid_y = (a.M + kRowsPerWarp - 1) / kRowsPerWarp;
  if (grid_y > 65535) throw std::invalid_argument(describe(op, a) + ": M too large");
  if (grid_x > 0x7FFFFFFF) throw std::invalid_argument(describe(op, a) + ": N too large");
  const dim3 grid((unsigned)grid_x, (unsigned)grid_y);
  const dim3 block(kWarpsPerBlock * 32);
  simple_gemm_kernel<Src><<<grid, block, 0, reinterpret_cast<cudaStream_t>(stream)>>>(a);
  check_cuda(cudaGetLastError(), op, "kernel launch", a);
}

}  // namespace simple_gemm

using simple_gemm::launch_simple_gemm;

}  // namespace cuda
}  // namespace pyengine
