// The simple CUDA quantized matmul for canonical packed weights (simple_gemm.cuh), and the
// device count.
#include <cuda_runtime.h>

#include "cuda/qmatmul.h"
#include "cuda/simple_gemm.cuh"

namespace pyengine {
namespace cuda {

void qmatmul_simple(const QMatmulArgs& a, int device, uintptr_t stream) {
  constexpr const char* kOp = "qmatmul_cuda";
  check_qmatmul_args(kOp, a);
  switch (a.bits) {
    case 2: launch_simple_gemm<PackedSource<2>>(kOp, a, device, stream); break;
    case 3: launch_simple_gemm<PackedSource<3>>(kOp, a, device, stream); break;
    case 4: launch_simple_gemm<PackedSource<4>>(kOp, a, device, stream); break;
    default: launch_simple_gemm<PackedSource<8>>(kOp, a, device, stream); break;
  }
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
