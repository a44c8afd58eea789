// The tensor-core decode kernel (decode_mma.cuh; layout and bit tricks in mma_frag.h) for
// weights repacked into the fragment-native layout: host checks, tiling and launch.
#include <sstream>
#include <stdexcept>
#include <string>

#include "cuda/decode_mma.cuh"
#include "cuda/qmatmul.h"

namespace pyengine {
namespace cuda {

void qmatmul_mma(const mma::MmaDecodeArgs& a, int device, uintptr_t stream) {
  constexpr const char* kOp = "qmatmul_cuda_mma";
  check_mma_decode_args(kOp, a);
  if (a.M == 0 || a.N == 0) return;
  check_cuda(cudaSetDevice(device), kOp, "cudaSetDevice", a);
  int sms = 0, major = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), kOp,
             "cudaDeviceGetAttribute(MultiProcessorCount)", a);
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), kOp,
             "cudaDeviceGetAttribute(ComputeCapabilityMajor)", a);
  if (major < 8)
    throw std::invalid_argument(describe(kOp, a) + ": mma.sync with fp16 / bf16 needs sm_80 or "
                                "newer; this device is sm_" + std::to_string(major) + "x");
  sms = std::max(sms, 1);

  if (a.iterations * mma::iteration_k(a.bits) >= ((int64_t)1 << 31) ||
      a.iterations * 32 * mma::words_per_lane(a.bits) >= ((int64_t)1 << 31))
    throw std::invalid_argument(describe(kOp, a) + ": K too large (the kernel indexes inputs "
                                "with 32-bit integers)");
  using namespace decode_mma;
  Plan p;
  // Tiling (heuristic in decode_mma.cuh).
  p.WR = 1;
  for (int wr : {8, 4, 2}) {
    if ((a.tiles + wr - 1) / wr >= 2 * (int64_t)sms) {
      p.WR = wr;
      break;
    }
  }
  p.WK = std::max(1, std::min(kMaxWarps / p.WR, floor_pow2(a.iterations)));
  const int nt = a.M > kTokens ? 2 : 1;
  const int per_slab = std::max(1, kSlabInputs / nt / iteration_k(a.bits));
  p.slab_iters = (per_slab + p.WK - 1) / p.WK * p.WK;
  p.x32 = reinterpret_cast<uintptr_t>(a.x) % 4 == 0 && a.ldx % 2 == 0;

  const int64_t grid_x = (a.tiles + p.WR - 1) / p.WR;
  if (grid_x > 0x7FFFFFFF) throw std::invalid_argument(describe(kOp, a) + ": N too large");
  const dim3 grid((unsigned)grid_x);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (a.bits) {
    case 2: launch_bits<2>(a, p, grid, s); break;
    case 3: launch_bits<3>(a, p, grid, s); break;
    case 4: launch_bits<4>(a, p, grid, s); break;
    default: launch_bits<8>(a, p, grid, s); break;
  }
  check_cuda(cudaGetLastError(), kOp, "kernel launch", a);
}

}  // namespace cuda
}  // namespace pyengine
