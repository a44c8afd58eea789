// The small per-token operations of a CPU decode step (decode_ops.cpp). Pointers are raw, dtypes
// are the codes of common.h, strides and sizes count elements.
#pragma once

#include <cstdint>

namespace pyengine {
namespace cpu {

// out[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * w, for r < rows (in place allowed).
struct RmsNormArgs {
  const void* x = nullptr;
  int x_dtype = 0;
  int64_t ldx = 0;
  const void* w = nullptr;  // [dim]
  int w_dtype = 0;
  void* out = nullptr;
  int out_dtype = 0;
  int64_t ldo = 0;
  int64_t rows = 0, dim = 0;
  float eps = 0.f;
};
void rms_norm(const RmsNormArgs& a);

// out[r, i] = silu(gate_up[r, i]) * gate_up[r, width + i] (one dtype for both).
struct SiluMulArgs {
  const void* gate_up = nullptr;  // [rows, >= 2 width], row stride ld_in
  int64_t ld_in = 0;
  void* out = nullptr;            // [rows, >= width], row stride ld_out
  int64_t ld_out = 0;
  int dtype = 0;
  int64_t rows = 0, width = 0;
};
void silu_mul(const SiluMulArgs& a);

// One decode position p for `batch` sequences: each row of qkv holds [q heads | k heads | v heads]
// (head_dim each). Per sequence: q and k get the optional per-head RMS norms (q_norm / k_norm,
// [head_dim]) and the rotary embedding of position p (cos / signed_sin rows [max_len, head_dim],
// signed_sin = sin with the first half negated); k and v are written to the caches at p
// (cache[b, h, p, :] at b * cache_batch_stride + h * cache_head_stride + p * head_dim); then
// out[b, h * head_dim:] = softmax(q_h K_g[0..p]^T * scale) V_g[0..p] with g = h / (n_heads /
// n_kv_heads). One dtype for qkv, caches, tables and out.
struct AttentionStepArgs {
  const void* qkv = nullptr;
  int64_t ld_qkv = 0;
  void* k_cache = nullptr;
  void* v_cache = nullptr;
  int64_t cache_batch_stride = 0, cache_head_stride = 0;
  const void* cos = nullptr;
  const void* signed_sin = nullptr;
  const void* q_norm = nullptr;
  const void* k_norm = nullptr;
  int norm_dtype = 0;
  float norm_eps = 0.f;
  void* out = nullptr;
  int64_t ld_out = 0;
  int dtype = 0;
  int64_t batch = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0, position = 0;
  float scale = 0.f;
  int num_threads = 1;
};
void attention_step(const AttentionStepArgs& a);

}  // namespace cpu
}  // namespace pyengine
