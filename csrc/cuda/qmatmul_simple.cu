// A first, simple CUDA quantized matmul: one warp per output channel, each lane walking the
// 32-code packing blocks of that row, fp32 accumulation, warp-shuffle reduction. It serves every
// M (grid.y walks M in chunks of kRowsPerWarp) and every supported bits / group / dtype. It is
// correct rather than fast; the tuned decode GEMV and tensor-core GEMM replace it on their shapes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda/device_util.cuh"
#include "cuda/qmatmul.h"

namespace pyengine {
namespace cuda {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kRowsPerWarp = 8;  // activation rows handled by one warp

template <int BITS>
__global__ void qmatmul_simple_kernel(const QMatmulArgs a) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t n = (int64_t)blockIdx.x * kWarpsPerBlock + warp;
  const int64_t m0 = (int64_t)blockIdx.y * kRowsPerWarp;
  if (n >= a.N) return;  // whole warp leaves together
  const int rows = (int)min((int64_t)kRowsPerWarp, a.M - m0);

  float acc[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) acc[r] = 0.f;

  const uint32_t* wrow = a.qweight + n * a.ldq;
  const int64_t n_blocks = (a.K + 31) / 32;
  for (int64_t b = lane; b < n_blocks; b += 32) {
    uint32_t words[BITS];
#pragma unroll
    for (int i = 0; i < BITS; ++i) words[i] = wrow[b * BITS + i];
    const int64_t k0 = b * 32;
    const int64_t g = k0 / a.group_size;  // a block never straddles groups (group % 32 == 0)
    const float s = load_f(a.scales, a.sz_dtype, n * a.lds + g);
    const float z = a.zeros ? load_f(a.zeros, a.sz_dtype, n * a.lds + g) : (float)(1 << (BITS - 1));
    const int valid = (int)min((int64_t)32, a.K - k0);
    for (int j = 0; j < valid; ++j) {
      const float w = ((float)block_code<BITS>(words, j) - z) * s;
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
      if (a.accumulate) v += load_f(a.out, a.out_dtype, o);
      store_f(a.out, a.out_dtype, o, v);
    }
  }
}

void check_cuda(cudaError_t err, const char* what, const QMatmulArgs& a) {
  if (err != cudaSuccess)
    throw std::runtime_error(describe("qmatmul_cuda", a) + ": " + what + ": " +
                             cudaGetErrorString(err));
}

}  // namespace

void qmatmul_simple(const QMatmulArgs& a, int device, uintptr_t stream) {
  check_qmatmul_args("qmatmul_cuda", a);
  if (a.M == 0 || a.N == 0) return;
  check_cuda(cudaSetDevice(device), "cudaSetDevice", a);
  const dim3 grid((unsigned)((a.N + kWarpsPerBlock - 1) / kWarpsPerBlock),
                  (unsigned)((a.M + kRowsPerWarp - 1) / kRowsPerWarp));
  if (grid.y > 65535u) throw std::invalid_argument(describe("qmatmul_cuda", a) + ": M too large");
  const dim3 block(kWarpsPerBlock * 32);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (a.bits) {
    case 2: qmatmul_simple_kernel<2><<<grid, block, 0, s>>>(a); break;
    case 3: qmatmul_simple_kernel<3><<<grid, block, 0, s>>>(a); break;
    case 4: qmatmul_simple_kernel<4><<<grid, block, 0, s>>>(a); break;
    default: qmatmul_simple_kernel<8><<<grid, block, 0, s>>>(a); break;
  }
  check_cuda(cudaGetLastError(), "kernel launch", a);
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

}  // namespace cuda
}  // namespace pyengine
