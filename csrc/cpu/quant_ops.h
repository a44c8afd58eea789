// CPU helpers of the quantizers (pyengine/quant): the sequential inner loop of GPTQ, whose
// per-column steps are too small for one torch call each, and the clip search's error of every
// candidate scale and zero in one pass over the weights. quant_kernels.cpp is compiled once per
// instruction set; dispatch.cpp picks the build.
#pragma once

#include <cstdint>
#include <string>

namespace pyengine {
namespace cpu {

// GPTQ over the columns [start, stop) of one block (pyengine/quant/gptq.py: gptq_quantize).
// The block is worked on transposed: row i of w holds weight column i (visiting order) for
// every output row n. For each i in [start, stop), in order, with g = group[i]:
//
//   q        = clamp(round_half_even(w[i, :] / scales[g, :] + zeros[g, :]), 0, maxq)
//   codes[code_row[i], :] = q
//   err[i, :] = (w[i, :] - (q - zeros[g, :]) * scales[g, :]) / h_inv[i, i]
//   w[j, :] -= h_inv[i, j] * err[i, :]           for every j in (i, rows)
//
// h_inv is the block's [rows, rows] part of the upper Cholesky factor of the inverse Hessian.
// Every step is one IEEE operation per element, in the order written (quant_kernels.cpp is
// compiled without floating-point contraction), so every instruction-set build gives the same
// bits. The torch loop it replaces can differ in the last bit of the update (torch's addr_ may
// fuse its multiply-add). Output rows n are independent: they are split over up to num_threads
// threads.
struct GptqColumnsArgs {
  float* w = nullptr;             // [rows, ldw]
  int64_t ldw = 0;
  const float* h_inv = nullptr;   // [rows, ldh]
  int64_t ldh = 0;
  float* err = nullptr;           // [rows, lde]
  int64_t lde = 0;
  uint8_t* codes = nullptr;       // rows code_row[i], [*, ldc]
  int64_t ldc = 0;
  const int64_t* code_row = nullptr;  // [rows]
  const float* scales = nullptr;  // [groups, lds]
  const float* zeros = nullptr;   // [groups, lds]
  int64_t lds = 0;
  const int64_t* group = nullptr;     // [rows]
  int64_t start = 0, stop = 0, rows = 0, n = 0;
  int maxq = 0;
  int num_threads = 1;
  const char* isa = nullptr;      // the build; null or "": the best this CPU runs
};

// The clip search's errors (pyengine/quant/rtn.py: _rtn_groups): for every candidate f < F of
// every group (r, g) of w [R, G, gs] (contiguous),
//
//   err[f, r, g] = sum_j cost[g, j] * ((clamp(round_half_even(w / s + z), 0, maxq) - z) * s - w)^2
//
// with s = scales[f, r, g], z = zeros[f, r, g] ([F, R, G] contiguous) and w = w[r, g, j]. Each
// element's steps round as the torch calls do; the sum over j runs in this build's order (a
// different order than torch's sum: the last bits may differ). Groups over up to num_threads
// threads.
struct ClipErrorsArgs {
  const float* w = nullptr;       // [R, G, gs]
  const float* cost = nullptr;    // [G, gs]
  const float* scales = nullptr;  // [F, R, G]
  const float* zeros = nullptr;   // [F, R, G]
  float* err = nullptr;           // [F, R, G]
  int64_t candidates = 0, rows = 0, groups = 0, group_size = 0;
  int maxq = 0;
  int num_threads = 1;
  const char* isa = nullptr;
};

void clip_errors(const ClipErrorsArgs& a);
using ClipErrorsFn = void (*)(const ClipErrorsArgs& a);
ClipErrorsFn clip_errors_fn(const std::string& isa);

namespace generic {
void gptq_columns(const GptqColumnsArgs& a);
void clip_errors(const ClipErrorsArgs& a);
}
namespace avx2 {
void gptq_columns(const GptqColumnsArgs& a);
void clip_errors(const ClipErrorsArgs& a);
}
namespace avx512 {
void gptq_columns(const GptqColumnsArgs& a);
void clip_errors(const ClipErrorsArgs& a);
}

// Checks the arguments (std::invalid_argument naming the op) and runs the loop.
void gptq_columns(const GptqColumnsArgs& a);

using GptqColumnsFn = void (*)(const GptqColumnsArgs& a);
// The build named isa ("" for the best this CPU runs); std::invalid_argument when unusable.
GptqColumnsFn gptq_columns_fn(const std::string& isa);

}  // namespace cpu
}  // namespace pyengine
