// Tensor-core prefill GEMM for the canonical packed weights (fp16 / bf16 activations):
//   out[m, n] (+)= sum_k x[m, k] * W[n, k] + bias[n]
//
// Block tile BM x BN = 64 x 64 outputs, K walked one packing block (BK = 32 codes) at a time;
// 4 warps in a 2 x 2 grid, each owning a 32 x 32 sub-tile = 2 x 2 WMMA 16x16x16 fragments
// (mma.sync on sm_80+), fp32 accumulation.
//
// Per K step every thread stages, in registers, 16 activations of one tile row and the packed
// words + scale/zero of one weight row's block; the weight codes are dequantized in registers
// ((code - z) * s, converted to the activation type) and both go to shared memory. The staging
// is double-buffered: the next step's global loads are issued before this step's MMAs and
// stored into the other shared buffer after them, so loads overlap tensor-core work.
//
// Shared-memory tiles (T = __half or __nv_bfloat16):
//   a_tile[buf][r * kLdA + c]   x[m0 + r, k0 + c]          r < 64, c < 32  (row-major A)
//   b_tile[buf][r * kLdB + c]   W[n0 + r, k0 + c]          r < 64, c < 32  (= column-major B = W^T)
//   c_tile[r * kLdC + c]        accumulators of out[m0 + r, n0 + c], for a coalesced epilogue
// Elements past M, N or K are stored as zero, so tails need no other masking in the MMAs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <stdexcept>
#include <string>

#include "cuda/device_util.cuh"
#include "cuda/qmatmul.h"

namespace pyengine {
namespace cuda {
namespace {

using namespace nvcuda;

constexpr int kBM = 64, kBN = 64, kBK = 32;
constexpr int kThreads = 128;          // 4 warps
constexpr int kLdA = kBK + 8;          // halves per a_tile row (+8: spreads rows over banks;
constexpr int kLdB = kBK + 8;          //  WMMA wants a multiple of 8 for 16-bit types)
constexpr int kLdC = kBN + 4;          // floats per c_tile row (WMMA: multiple of 4)
constexpr int kCodesPerThread = 16;    // each thread stages half a row of a 32-code block

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T> __device__ __forceinline__ uint32_t to_bits(T v);
template <> __device__ __forceinline__ uint32_t to_bits<__half>(__half v) { return __half_as_ushort(v); }
template <> __device__ __forceinline__ uint32_t to_bits<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat16_as_ushort(v);
}

// What one thread carries from global memory to shared memory for one K step. Everything is
// indexed with compile-time constants after unrolling, so it stays in registers.
template <int BITS>
struct Stage {
  uint32_t xw[kCodesPerThread / 2];  // x[m0 + row, k0 + half*16 + i], two 16-bit values per
                                     // word, element i in bits 16*(i%2) of word i/2 (zero past
                                     // M or K)
  uint32_t words[BITS];              // the packed block of W[n0 + row, k0 : k0 + 32]
  float scale, zero;
};

template <int BITS, typename T>
__device__ __forceinline__ void load_stage(const QMatmulArgs& a, int64_t m0, int64_t n0,
                                           int64_t k0, int row, int half, bool x_vector_ok,
                                           Stage<BITS>& st) {
  const T* x = static_cast<const T*>(a.x);
  const int64_t m = m0 + row, kc = k0 + half * kCodesPerThread;
  if (m < a.M && x_vector_ok && kc + kCodesPerThread <= a.K) {
    // 16 consecutive 16-bit values = two 16-byte loads (alignment checked by the launcher)
    const uint4* src = reinterpret_cast<const uint4*>(x + m * a.ldx + kc);
    const uint4 v0 = src[0], v1 = src[1];
    st.xw[0] = v0.x; st.xw[1] = v0.y; st.xw[2] = v0.z; st.xw[3] = v0.w;
    st.xw[4] = v1.x; st.xw[5] = v1.y; st.xw[6] = v1.z; st.xw[7] = v1.w;
  } else {
#pragma unroll
    for (int i = 0; i < kCodesPerThread; i += 2) {
      const uint32_t lo = (m < a.M && kc + i < a.K) ? to_bits<T>(x[m * a.ldx + kc + i]) : 0u;
      const uint32_t hi = (m < a.M && kc + i + 1 < a.K) ? to_bits<T>(x[m * a.ldx + kc + i + 1]) : 0u;
      st.xw[i / 2] = lo | (hi << 16);  // +0.0 is all zero bits in fp16 and bf16
    }
  }
  const int64_t n = n0 + row;
  if (n < a.N) {
    const uint32_t* wblock = a.qweight + n * a.ldq + (k0 / 32) * BITS;
#pragma unroll
    for (int i = 0; i < BITS; ++i) st.words[i] = wblock[i];
    const int64_t g = k0 / a.group_size;  // a 32-code block never straddles two groups
    st.scale = load_f(a.scales, a.sz_dtype, n * a.lds + g);
    st.zero = a.zeros ? load_f(a.zeros, a.sz_dtype, n * a.lds + g) : (float)(1 << (BITS - 1));
  } else {
#pragma unroll
    for (int i = 0; i < BITS; ++i) st.words[i] = 0u;
    st.scale = 0.f;  // rows past N dequantize to zero
    st.zero = 0.f;
  }
}

// Writes a thread's staged half row: activations as they are, weights dequantized.
// HALF is a template parameter so that the code index j is a compile-time constant.
template <int BITS, typename T, int HALF>
__device__ __forceinline__ void store_half_row(const QMatmulArgs& a, int64_t k0, int row,
                                               const Stage<BITS>& st, T* a_tile, T* b_tile) {
  uint4* a_dst = reinterpret_cast<uint4*>(a_tile + row * kLdA + HALF * kCodesPerThread);
  a_dst[0] = make_uint4(st.xw[0], st.xw[1], st.xw[2], st.xw[3]);  // 16-byte aligned: kLdA * 2
  a_dst[1] = make_uint4(st.xw[4], st.xw[5], st.xw[6], st.xw[7]);  // and 32 are multiples of 16
  T* b_dst = b_tile + row * kLdB + HALF * kCodesPerThread;
#pragma unroll
  for (int i = 0; i < kCodesPerThread; ++i) {
    constexpr int base = HALF * kCodesPerThread;
    const int j = base + i;  // code index within the 32-code block
    const float w = ((float)block_code<BITS>(st.words, j) - st.zero) * st.scale;
    b_dst[i] = from_float<T>(k0 + j < a.K ? w : 0.f);  // padding codes past K contribute 0
  }
}

template <int BITS, typename T>
__device__ __forceinline__ void store_stage(const QMatmulArgs& a, int64_t k0, int row, int half,
                                            const Stage<BITS>& st, T* a_tile, T* b_tile) {
  if (half == 0)
    store_half_row<BITS, T, 0>(a, k0, row, st, a_tile, b_tile);
  else
    store_half_row<BITS, T, 1>(a, k0, row, st, a_tile, b_tile);
}

template <int BITS, typename T>
__global__ void __launch_bounds__(kThreads) qmatmul_tc_kernel(const QMatmulArgs a, bool x_vector_ok) {
  __shared__ __align__(32) T a_tile[2][kBM * kLdA];
  __shared__ __align__(32) T b_tile[2][kBN * kLdB];
  __shared__ __align__(32) float c_tile[kBM * kLdC];

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int warp_m = warp >> 1, warp_n = warp & 1;  // this warp's 32 x 32 sub-tile
  const int row = tid >> 1, half = tid & 1;         // staged row (of A and of W) and half block
  const int64_t m0 = (int64_t)blockIdx.y * kBM;
  const int64_t n0 = (int64_t)blockIdx.x * kBN;
  const int64_t k_blocks = (a.K + kBK - 1) / kBK;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  Stage<BITS> st;
  load_stage<BITS, T>(a, m0, n0, 0, row, half, x_vector_ok, st);
  store_stage<BITS, T>(a, 0, row, half, st, a_tile[0], b_tile[0]);
  __syncthreads();

  for (int64_t kb = 0; kb < k_blocks; ++kb) {
    const int cur = (int)(kb & 1);
    const bool has_next = kb + 1 < k_blocks;
    if (has_next) load_stage<BITS, T>(a, m0, n0, (kb + 1) * kBK, row, half, x_vector_ok, st);

#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i)
        wmma::load_matrix_sync(fa[i], a_tile[cur] + (warp_m * 32 + i * 16) * kLdA + kk, kLdA);
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::load_matrix_sync(fb[j], b_tile[cur] + (warp_n * 32 + j * 16) * kLdB + kk, kLdB);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }

    // The other buffer was last read in step kb - 1, which every warp finished before the
    // barrier that ended that step.
    if (has_next) store_stage<BITS, T>(a, (kb + 1) * kBK, row, half, st, a_tile[cur ^ 1],
                                       b_tile[cur ^ 1]);
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(c_tile + (warp_m * 32 + i * 16) * kLdC + warp_n * 32 + j * 16,
                              acc[i][j], kLdC, wmma::mem_row_major);
  __syncthreads();

  // Epilogue: consecutive threads write consecutive n of one output row (coalesced).
  for (int idx = tid; idx < kBM * kBN; idx += kThreads) {
    const int r = idx / kBN, c = idx % kBN;
    const int64_t m = m0 + r, n = n0 + c;
    if (m >= a.M || n >= a.N) continue;
    float v = c_tile[r * kLdC + c];
    if (a.bias) v += load_f(a.bias, a.bias_dtype, n);
    const int64_t o = m * a.ldo + n;
    if (accumulates(a)) v += load_f(a.out, a.out_dtype, o);
    store_f(a.out, a.out_dtype, o, v);
  }
}

constexpr const char* kOp = "qmatmul_cuda_tc";

template <typename T>
void launch(const QMatmulArgs& a, bool x_vector_ok, dim3 grid, cudaStream_t s) {
  switch (a.bits) {
    case 2: qmatmul_tc_kernel<2, T><<<grid, kThreads, 0, s>>>(a, x_vector_ok); break;
    case 3: qmatmul_tc_kernel<3, T><<<grid, kThreads, 0, s>>>(a, x_vector_ok); break;
    case 4: qmatmul_tc_kernel<4, T><<<grid, kThreads, 0, s>>>(a, x_vector_ok); break;
    default: qmatmul_tc_kernel<8, T><<<grid, kThreads, 0, s>>>(a, x_vector_ok); break;
  }
}

}  // namespace

void qmatmul_tc(const QMatmulArgs& a, int device, uintptr_t stream) {
  check_qmatmul_args(kOp, a);
  if (a.x_dtype != kFloat16 && a.x_dtype != kBFloat16)
    throw std::invalid_argument(describe(kOp, a) +
                                ": the tensor-core kernel takes float16 or bfloat16 activations");
  if (a.M == 0 || a.N == 0) return;
  check_cuda(cudaSetDevice(device), kOp, "cudaSetDevice", a);
  const dim3 grid((unsigned)((a.N + kBN - 1) / kBN), (unsigned)((a.M + kBM - 1) / kBM));
  if (grid.y > 65535u)
    throw std::invalid_argument(describe(kOp, a) + ": M too large");
  // 16-byte activation loads need a 16-byte aligned base and rows starting at multiples of 8
  // elements; otherwise the kernel loads element by element.
  const bool x_vector_ok = (reinterpret_cast<uintptr_t>(a.x) % 16 == 0) && (a.ldx % 8 == 0);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (a.x_dtype == kFloat16)
    launch<__half>(a, x_vector_ok, grid, s);
  else
    launch<__nv_bfloat16>(a, x_vector_ok, grid, s);
  check_cuda(cudaGetLastError(), kOp, "kernel launch", a);
}

}  // namespace cuda
}  // namespace pyengine
