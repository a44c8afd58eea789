// CUDA quantized matmul entry points (compiled only when nvcc is found).
#pragma once

#include <cstdint>
#include <string>

#include "common.h"

namespace pyengine {
namespace cuda {

// out (+)= x @ dequant(W)^T (+ bias) on the given device and stream (a cudaStream_t as an
// integer; 0 is the legacy default stream). All pointers are device pointers. Raises
// std::runtime_error naming op, M, N, K, bits and group size when a CUDA call fails.
void qmatmul_simple(const QMatmulArgs& args, int device, uintptr_t stream);

// Largest M the decode GEMV serves.
constexpr int64_t kDecodeMaxM = 16;

// The decode GEMV (csrc/cuda/qmatmul_decode.cu): same contract as qmatmul_simple for
// M <= kDecodeMaxM; raises std::invalid_argument for larger M.
void qmatmul_decode(const QMatmulArgs& args, int device, uintptr_t stream);

// The tensor-core GEMM (csrc/cuda/qmatmul_tc.cu): same contract, float16 / bfloat16
// activations only (raises std::invalid_argument for float32); meant for larger M.
void qmatmul_tc(const QMatmulArgs& args, int device, uintptr_t stream);

// The default route: the decode GEMV for M <= kDecodeMaxM; above that the tensor-core GEMM for
// float16 / bfloat16 activations and the simple kernel for float32 ones.
inline void qmatmul(const QMatmulArgs& args, int device, uintptr_t stream) {
  if (args.M <= kDecodeMaxM)
    qmatmul_decode(args, device, stream);
  else if (args.x_dtype == kFloat16 || args.x_dtype == kBFloat16)
    qmatmul_tc(args, device, stream);
  else
    qmatmul_simple(args, device, stream);
}

// The tensor-core decode kernel (csrc/cuda/qmatmul_mma.cu) on a weight repacked into the
// fragment-native layout of csrc/mma_frag.h: float16 / bfloat16 activations, M <= 16, sm_80 or
// newer. Raises std::invalid_argument for anything else (check_mma_decode_args, common.h) and
// std::runtime_error when a CUDA call fails.
void qmatmul_mma(const mma::MmaDecodeArgs& args, int device, uintptr_t stream);

// The Matryoshka plane-layout matmul (csrc/cuda/plane_matmul.cu): out = x @ W_r^T (+ bias), W_r
// the r-bit slice of an int8 parent read from its bit planes (PlaneMatmulArgs, csrc/common.h;
// only the planes the slice needs are read). kernel: "decode" (the decode GEMV, M <= kDecodeMaxM;
// raises std::invalid_argument above), "simple", or "" / "auto" (decode for M <= kDecodeMaxM,
// simple above).
void plane_matmul(const PlaneMatmulArgs& args, int device, uintptr_t stream,
                  const std::string& kernel = "");

// Number of CUDA devices the runtime sees (0 when there is no driver or no device).
int device_count();

}  // namespace cuda
}  // namespace pyengine
