// The Matryoshka plane-layout matmul on CUDA: the decode GEMV (decode_gemv.cuh) and the simple
// kernel (simple_gemm.cuh) instantiated on PlaneSource<R> (weight_sources.cuh), which loads only
// the bit planes an r-bit slice reads: plane_hi for int2 (3/8 of the parent's code bytes),
// plane_hi and plane_mid for int3 / int4 (5/8), all three for int6 / int8.
#include <stdexcept>
#include <string>

#include "cuda/decode_gemv.cuh"
#include "cuda/qmatmul.h"
#include "cuda/simple_gemm.cuh"

namespace pyengine {
namespace cuda {
namespace {

constexpr const char* kOp = "plane_matmul_cuda";

template <int R>
void run(const PlaneMatmulArgs& a, int device, uintptr_t stream, bool decode) {
  if (decode)
    launch_decode_gemv<PlaneSource<R>>(kOp, a, device, stream);
  else
    launch_simple_gemm<PlaneSource<R>>(kOp, a, device, stream);
}

}  // namespace

void plane_matmul(const PlaneMatmulArgs& a, int device, uintptr_t stream,
                  const std::string& kernel) {
  check_plane_matmul_args(kOp, a);
  if (!kernel.empty() && kernel != "auto" && kernel != "decode" && kernel != "simple")
    throw std::invalid_argument(describe(kOp, a) + ": kernel must be 'auto', 'decode' or "
                                "'simple', got '" + kernel + "'");
  if (kernel == "decode" && a.M > kDecodeMaxM)
    throw std::invalid_argument(describe(kOp, a) + ": the decode kernel serves M <= " +
                                std::to_string(kDecodeMaxM));
  const bool decode = kernel == "decode" || (kernel != "simple" && a.M <= kDecodeMaxM);
  switch (a.precision) {
    case 2: run<2>(a, device, stream, decode); break;
    case 3: run<3>(a, device, stream, decode); break;
    case 4: run<4>(a, device, stream, decode); break;
    case 6: run<6>(a, device, stream, decode); break;
    default: run<8>(a, device, stream, decode); break;
  }
}

}  // namespace cuda
}  // namespace pyengine
