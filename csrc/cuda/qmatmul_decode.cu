// The decode GEMV (decode_gemv.cuh; its header describes the work split, the staging and the
// bit tricks) for canonical packed weights.
#include <stdexcept>
#include <string>

#include "cuda/decode_gemv.cuh"
#include "cuda/qmatmul.h"

namespace pyengine {
namespace cuda {

void qmatmul_decode(const QMatmulArgs& a, int device, uintptr_t stream) {
  constexpr const char* kOp = "qmatmul_cuda_decode";
  check_qmatmul_args(kOp, a);
  if (a.M > kDecodeMaxM)
    throw std::invalid_argument(describe(kOp, a) + ": the decode kernel serves M <= " +
                                std::to_string(kDecodeMaxM));
  switch (a.bits) {
    case 2: launch_decode_gemv<PackedSource<2>>(kOp, a, device, stream); break;
    case 3: launch_decode_gemv<PackedSource<3>>(kOp, a, device, stream); break;
    case 4: launch_decode_gemv<PackedSource<4>>(kOp, a, device, stream); break;
    default: launch_decode_gemv<PackedSource<8>>(kOp, a, device, stream); break;
  }
}

}  // namespace cuda
}  // namespace pyengine
