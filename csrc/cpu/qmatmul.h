// CPU quantized matmul. qmatmul_kernels.cpp (canonical packed weights), act8_kernels.cpp (the
// same with int8 activations, QMatmulArgs::act_bits = 8) and plane_kernels.cpp (Matryoshka bit
// planes) are compiled once per instruction set into the namespace pyengine::cpu::<isa>;
// dispatch.cpp picks the best one the running CPU supports. qmatmul_act8 is reached through
// qmatmul; act8_native says whether it runs the integer path for these arguments (else the
// exact kernels on the quantized activations: the same product).
#pragma once

#include <string>
#include <vector>

#include "common.h"

namespace pyengine {
namespace cpu {

#define PYENGINE_DECLARE_ISA(isa)                  \
  namespace isa {                                  \
  void qmatmul(const QMatmulArgs& args);           \
  void qmatmul_act8(const QMatmulArgs& args);      \
  bool act8_native(const QMatmulArgs& args);       \
  bool rows8_native(const QMatmulArgs& args);      \
  void qmatmul_rows8(const QMatmulArgs& args);     \
  void plane_matmul(const PlaneMatmulArgs& args);  \
  void walsh_hadamard(float* v, int64_t b);        \
  }

PYENGINE_DECLARE_ISA(generic)
PYENGINE_DECLARE_ISA(avx2)
PYENGINE_DECLARE_ISA(avx512)
#undef PYENGINE_DECLARE_ISA

// Whether the int8-activation kernels of the AVX-512 build take vpdpbusd (AVX512_VNNI) for 8-bit
// codes: the CPU has it and the environment does not set PYENGINE_CPU_VNNI=0 (read at every
// call, so that tests and benchmarks can run both paths in one process).
bool vnni_enabled();

// Whether the AVX-512 build's interleaved decode kernel works on pairs of octets in 512-bit
// vectors (Rows8Zmm in act8_kernels.cpp) instead of one octet in 256-bit vectors: by default
// where the CPU has AVX-512 and runs it at full width (not AMD Zen 4, family 0x19, which splits
// 512-bit operations in two halves); PYENGINE_CPU_ZMM=1 / =0 forces it on / off (read at every
// call, as PYENGINE_CPU_VNNI).
bool zmm_rows_enabled();

// Whether the interleaved decode kernel at M = 1 works on pairs of its vectors (Rows8Pair in
// act8_kernels.cpp: two weight streams in flight, two octets of rows in 256-bit vectors, four
// in 512-bit ones) instead of one: by default; PYENGINE_CPU_VECTOR_PAIRS=0 turns it off (read
// at every call, as PYENGINE_CPU_VNNI).
bool vector_pairs_enabled();

// Whether the interleaved decode kernel at M = 1 prefetches its weight streams ahead of the
// loads in 256-bit vectors (Rows8Ymm::kPrefetchBytes in act8_kernels.cpp; the 512-bit ones do
// not): by default; PYENGINE_CPU_PREFETCH=0 turns it off (read at every call, as
// PYENGINE_CPU_VNNI).
bool prefetch_enabled();

// Runs the quantized matmul on the best instruction set of this CPU (validates args first).
void qmatmul(const QMatmulArgs& args);

// Runs the build for one named instruction set (tests use it to check every build); raises
// std::invalid_argument if this binary lacks it or the CPU cannot run it.
void qmatmul_with_isa(const QMatmulArgs& args, const std::string& isa);

// The instruction-set builds of this binary that this CPU can run, widest first.
std::vector<std::string> usable_isas();

// The code widths whose decode calls (int8 activations, M <= kDecodeMaxM) the build for `isa`
// runs on row-interleaved weights (QMatmulArgs::interleave) in its own kernel; other calls on
// such weights read their canonical rows. Raises as qmatmul_with_isa.
std::vector<int> interleaved_bits(const std::string& isa);

// Name of the instruction set qmatmul() uses on this CPU ("avx512", "avx2" or "generic").
const char* selected_isa();

// Largest M served by the single-row decode (GEMV-style) path; larger M uses the prefill path
// (panels of dequantized rows), or with AVX-512 the tiled decode path up to kTiledMaxM (see
// tiled_path in qmatmul_kernels.cpp).
constexpr int64_t kDecodeMaxM = 8;
constexpr int64_t kTiledMaxM = 16;

// Rows per group of QMatmulArgs::interleave (the CPU row-interleaved layout).
constexpr int kInterleaveRows = 8;

// The Matryoshka plane-layout matmul on the best instruction set (validates args first).
void plane_matmul(const PlaneMatmulArgs& args);

// The plane-layout matmul of one named instruction-set build (errors as qmatmul_with_isa).
void plane_matmul_with_isa(const PlaneMatmulArgs& args, const std::string& isa);


// Largest M served by the plane kernels' decode path (one pass over the planes, every x row
// multiplied by each unpacked code); larger M dequantizes panels and runs the tiled path.
constexpr int64_t kPlaneDecodeMaxM = 8;

}  // namespace cpu
}  // namespace pyengine
