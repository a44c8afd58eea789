// The quantizers' CPU helpers (quant_ops.h): GPTQ's column loop and the clip search's errors,
// compiled once per instruction set with PYENGINE_ISA set to the namespace name and without
// floating-point contraction (CMakeLists.txt): every build rounds each step alike.
#include <cmath>
#include <cstdint>

#include "cpu/kernel_util.h"  // also checks that PYENGINE_ISA names the build's namespace
#include "cpu/quant_ops.h"

namespace pyengine {
namespace cpu {
namespace PYENGINE_ISA {

namespace {

// Output rows per task: the block's slice of w for one task ([rows, kChunk] fp32, 64 KiB at
// 128 rows) stays in L2 across the whole column loop.
constexpr int64_t kChunk = 128;

void columns_of_chunk(const GptqColumnsArgs& a, int64_t n0, int64_t nc) {
  const float maxq = static_cast<float>(a.maxq);
  for (int64_t i = a.start; i < a.stop; ++i) {
    float* wi = a.w + i * a.ldw + n0;
    float* ei = a.err + i * a.lde + n0;
    uint8_t* ci = a.codes + a.code_row[i] * a.ldc + n0;
    const float* s = a.scales + a.group[i] * a.lds + n0;
    const float* z = a.zeros + a.group[i] * a.lds + n0;
    const float d = a.h_inv[i * a.ldh + i];
#pragma omp simd
    for (int64_t t = 0; t < nc; ++t) {
      const float x = wi[t];
      float q = std::nearbyint(x / s[t] + z[t]);  // the default mode: half to even
      q = q < 0.f ? 0.f : (q > maxq ? maxq : q);
      ci[t] = static_cast<uint8_t>(q);
      ei[t] = (x - (q - z[t]) * s[t]) / d;
    }
    const float* hi = a.h_inv + i * a.ldh;
    for (int64_t j = i + 1; j < a.rows; ++j) {
      const float h = hi[j];
      float* wj = a.w + j * a.ldw + n0;
#pragma omp simd
      for (int64_t t = 0; t < nc; ++t) wj[t] = wj[t] - h * ei[t];
    }
  }
}

}  // namespace

void gptq_columns(const GptqColumnsArgs& a) {
  const int64_t chunks = (a.n + kChunk - 1) / kChunk;
  const int64_t work = (a.stop - a.start) * a.rows * a.n;
  const bool parallel = a.num_threads > 1 && chunks > 1 && work >= (1 << 16);
#pragma omp parallel for num_threads(a.num_threads) schedule(static) if (parallel)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t n0 = c * kChunk;
    columns_of_chunk(a, n0, a.n - n0 < kChunk ? a.n - n0 : kChunk);
  }
}

void clip_errors(const ClipErrorsArgs& a) {
  const int64_t groups = a.rows * a.groups, gs = a.group_size;
  const float maxq = static_cast<float>(a.maxq);
  const int64_t work = groups * gs * a.candidates;
  const bool parallel = a.num_threads > 1 && groups > 1 && work >= (1 << 16);
#pragma omp parallel for num_threads(a.num_threads) schedule(static) if (parallel)
  for (int64_t rg = 0; rg < groups; ++rg) {
    const float* w = a.w + rg * gs;
    const float* c = a.cost + (rg % a.groups) * gs;
    for (int64_t f = 0; f < a.candidates; ++f) {
      const float s = a.scales[f * groups + rg], z = a.zeros[f * groups + rg];
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < gs; ++j) {
        float q = std::nearbyint(w[j] / s + z);
        q = q < 0.f ? 0.f : (q > maxq ? maxq : q);
        const float e = (q - z) * s - w[j];
        sum += e * e * c[j];
      }
      a.err[f * groups + rg] = sum;
    }
  }
}

}  // namespace PYENGINE_ISA
}  // namespace cpu
}  // namespace pyengine
