// The unnormalised fast Walsh-Hadamard transform of one block, compiled once per instruction set
// (generic, avx2, avx512) with PYENGINE_ISA set to the namespace name, like the matmul kernels;
// dispatch.cpp picks the build (decode_ops.cpp: hadamard()).
#include <cstdint>

#include "cpu/kernel_util.h"  // also checks that PYENGINE_ISA names the build's namespace
#include "cpu/qmatmul.h"

namespace pyengine {
namespace cpu {
namespace PYENGINE_ISA {

namespace {

// Two stages at once, h and 2h: the 4-point transform of (j, j + h, j + 2h, j + 3h) for every
// run of 4h elements. H > 0 fixes h at compile time (a short run the vectoriser would otherwise
// leave to its scalar remainder loop in the 512-bit build).
template <int H>
inline void radix4_pass(float* v, int64_t b, int64_t h_runtime) {
  const int64_t h = H > 0 ? H : h_runtime;
  for (int64_t i = 0; i < b; i += 4 * h) {
    float* p0 = v + i;
    float* p1 = p0 + h;
    float* p2 = p1 + h;
    float* p3 = p2 + h;
#pragma omp simd
    for (int64_t j = 0; j < h; ++j) {
      const float a = p0[j] + p1[j], c = p0[j] - p1[j];
      const float e = p2[j] + p3[j], f = p2[j] - p3[j];
      p0[j] = a + e; p1[j] = c + f; p2[j] = a - e; p3[j] = c - f;
    }
  }
}

}  // namespace

// In-place fast Walsh-Hadamard transform of v[0, b) (b a power of two), unnormalised. Stage h
// adds and subtracts the pairs (j, j + h) inside each run of 2h elements. The stages h = 1, 2, 4
// (inside each 8-element chunk) run as one 8-point transform per chunk; the later stages go two
// at a time (a 4-point transform of j, j + h, j + 2h, j + 3h: one pass over memory for two
// stages) and vectorise over j.
void walsh_hadamard(float* v, int64_t b) {
  int64_t h = 1;
  if (b >= 8) {
    for (int64_t i = 0; i < b; i += 8) {
      float* c = v + i;
      const float s0 = c[0] + c[1], d0 = c[0] - c[1], s1 = c[2] + c[3], d1 = c[2] - c[3];
      const float s2 = c[4] + c[5], d2 = c[4] - c[5], s3 = c[6] + c[7], d3 = c[6] - c[7];
      const float t0 = s0 + s1, t1 = d0 + d1, t2 = s0 - s1, t3 = d0 - d1;
      const float t4 = s2 + s3, t5 = d2 + d3, t6 = s2 - s3, t7 = d2 - d3;
      c[0] = t0 + t4; c[1] = t1 + t5; c[2] = t2 + t6; c[3] = t3 + t7;
      c[4] = t0 - t4; c[5] = t1 - t5; c[6] = t2 - t6; c[7] = t3 - t7;
    }
    h = 8;
  }
  if (h == 8 && 32 <= b) {  // a compile-time trip count: one 256-bit register per run
    radix4_pass<8>(v, b, 8);
    h = 32;
  }
  for (; 4 * h <= b; h *= 4) radix4_pass<0>(v, b, h);
  for (; h < b; h *= 2) {
    for (int64_t i = 0; i < b; i += 2 * h) {
      float* lo = v + i;
      float* hi = v + i + h;
#pragma omp simd
      for (int64_t j = 0; j < h; ++j) {
        const float a = lo[j], c = hi[j];
        lo[j] = a + c;
        hi[j] = a - c;
      }
    }
  }
}

}  // namespace PYENGINE_ISA
}  // namespace cpu
}  // namespace pyengine
