// The small per-token operations of a CPU decode step (decode_ops.h: RMS norm, SiLU-and-multiply,
// Walsh-Hadamard transform, one attention step), compiled once per instruction set like the
// matmul kernels, so that their loops run at the vector width of the build the step's matmuls
// use (decode_ops.cpp dispatches through step_kernels(isa), dispatch.cpp). All math is in fp32;
// tensors may be fp32, fp16 or bf16 (dtype codes of common.h).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/decode_ops.h"
#include "cpu/kernel_util.h"
#include "cpu/qmatmul.h"

namespace pyengine {
namespace cpu {
namespace PYENGINE_ISA {
namespace {

// A row of n elements of any supported dtype as fp32 (fp32 rows are read in place).
struct RowReader {
  std::vector<float> scratch;
  const float* read(const void* p, int dtype, int64_t offset, int64_t n) {
    if (dtype == kFloat32) return static_cast<const float*>(p) + offset;
    scratch.resize(n);
    for (int64_t i = 0; i < n; ++i) scratch[i] = load_as_float(p, dtype, offset + i);
    return scratch.data();
  }
};

inline void store_row(void* p, int dtype, int64_t offset, const float* v, int64_t n) {
  if (dtype == kFloat32) {
    std::memcpy(static_cast<float*>(p) + offset, v, n * sizeof(float));
    return;
  }
  for (int64_t i = 0; i < n; ++i) store_from_float(p, dtype, offset + i, v[i]);
}

// A vector register of floats: 8 lanes in the AVX2 and AVX-512 builds (256-bit, as the matmul
// kernels), 4 in the generic one (SSE2 on x86-64, NEON on AArch64).
#if defined(__AVX2__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
using vf = std::conditional_t<kLanes == 8, v8f, v4f>;  // kernel_util.h's (hsum sums them)
typedef int32_t vi __attribute__((vector_size(4 * kLanes)));

// e^x lane-wise, within a few ulp of the exact value for x in [-87, 88] (inputs are clamped there:
// e^-87 ~ 1.6e-38, the smallest normal float's order): x = n ln2 + r with n = round(x / ln2)
// and |r| <= ln2 / 2 (ln2 in two parts, so that n ln2 is exact to float precision), e^r by its
// Taylor polynomial of degree 7 (|error| < r^8 / 8! < 4e-9), times 2^n built in the exponent
// bits.
PYENGINE_INLINE inline vf expv(vf x) {
  const vf lo = vf{} - 87.f, hi = vf{} + 88.f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const vf t = x * 1.44269504088896341f;                              // x / ln2
  const vi n = __builtin_convertvector(t + (t < 0 ? -0.5f : 0.5f), vi);  // rounds half away
  const vf nf = __builtin_convertvector(n, vf);
  const vf r = (x - nf * 0.693145751953125f) - nf * 1.42860682030941723212e-6f;
  vf p = vf{} + 1.f / 5040;
  p = p * r + 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const vi two_to_n = (n + 127) << 23;  // 2^n as a float's bits (n in [-126, 127])
  vf scale;
  std::memcpy(&scale, &two_to_n, sizeof(scale));
  return p * scale;
}

PYENGINE_INLINE inline vf loadv(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
PYENGINE_INLINE inline void storev(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

// f(v[i : i + kLanes], i) for every whole vector of v[0, n), then for the tail's lanes
// (zero-padded).
template <class F>
PYENGINE_INLINE inline void mapv(float* v, int64_t n, F f) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) storev(v + i, f(loadv(v + i), i));
  if (i < n) {
    float tail[kLanes] = {};
    std::memcpy(tail, v + i, (n - i) * sizeof(float));
    storev(tail, f(loadv(tail), i));
    std::memcpy(v + i, tail, (n - i) * sizeof(float));
  }
}

inline float inv_rms(const float* x, int64_t n, float eps) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += x[i] * x[i];
  return 1.f / std::sqrt(sum / static_cast<float>(n) + eps);
}

// y = x / rms(x) * w over n elements (in place allowed).
inline void rms_norm_row(const float* x, const float* w, float eps, int64_t n, float* y) {
  const float r = inv_rms(x, n, eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * r * w[i];
}

// Rotary embedding of one head (hd <= 1024, even) from x into y (may be x): x * cos +
// rotate_half(x) * sin, rotate_half(x) = [-x2, x1]; signed_sin holds sin with its first half
// negated, so the second term is x[(i + half) % hd] * signed_sin[i].
inline void rope_row(const float* x, const float* cos, const float* signed_sin, int64_t hd,
                     float* y) {
  const int64_t half = hd / 2;
  float rotated[1024];
  std::memcpy(rotated, x + half, half * sizeof(float));
  std::memcpy(rotated + half, x, half * sizeof(float));
#pragma omp simd
  for (int64_t i = 0; i < hd; ++i) y[i] = x[i] * cos[i] + rotated[i] * signed_sin[i];
}

// The most query heads that share a kv head handled in one pass over its cache (larger groups
// are taken in parts).
constexpr int64_t kMaxGroup = 8;

// scores[i][j] = q_i . k_j for H query heads (queries [H][hd], rows hd apart) against the cache
// rows keys[j] (j < context, rows hd apart): each key row read once for the H heads, its
// products summed in vectors (two accumulators per head, alternate vectors: independent
// chains), the hd % kLanes last elements one by one.
template <int H>
void attention_scores(const float* queries, const float* keys, int64_t hd, int64_t context,
                      float* scores) {
  const int64_t hdv = hd / kLanes * kLanes;
  for (int64_t j = 0; j < context; ++j) {
    const float* k = keys + j * hd;
    vf even[H], odd[H];
    unroll<H>([&](auto i) PYENGINE_INLINE { even[i] = odd[i] = vf{}; });
    int64_t e = 0;
    for (; e + 2 * kLanes <= hdv; e += 2 * kLanes) {
      const vf k0 = loadv(k + e), k1 = loadv(k + e + kLanes);
      unroll<H>([&](auto i) PYENGINE_INLINE {
        even[i] += loadv(queries + i * hd + e) * k0;
        odd[i] += loadv(queries + i * hd + e + kLanes) * k1;
      });
    }
    if (e < hdv) {
      const vf k0 = loadv(k + e);
      unroll<H>([&](auto i) PYENGINE_INLINE { even[i] += loadv(queries + i * hd + e) * k0; });
    }
    unroll<H>([&](auto i) PYENGINE_INLINE {
      float sum = hsum(even[i] + odd[i]);
      for (int64_t t = hdv; t < hd; ++t) sum += queries[i * hd + t] * k[t];
      scores[i * context + j] = sum;
    });
  }
}

// outs[i] = sum over j < context of weights[i][j] values[j] for H heads (weights [H][context],
// value rows hd apart, outs [H][hd]): two vectors of every head's output at a time in
// registers (2 x H accumulators), over all the rows, then the next two; the hd % kLanes last
// elements one by one.
template <int H>
void attention_values(const float* weights, const float* values, int64_t hd, int64_t context,
                      float* outs) {
  const int64_t hdv = hd / kLanes * kLanes;
  for (int64_t e = 0; e < hdv; e += 2 * kLanes) {
    const bool pair = e + 2 * kLanes <= hdv;  // else one last vector
    vf low[H], high[H];
    unroll<H>([&](auto i) PYENGINE_INLINE { low[i] = high[i] = vf{}; });
    for (int64_t j = 0; j < context; ++j) {
      const float* v = values + j * hd + e;
      const vf v0 = loadv(v), v1 = pair ? loadv(v + kLanes) : vf{};
      unroll<H>([&](auto i) PYENGINE_INLINE {
        const float w = weights[i * context + j];
        low[i] += w * v0;
        high[i] += w * v1;
      });
    }
    unroll<H>([&](auto i) PYENGINE_INLINE {
      storev(outs + i * hd + e, low[i]);
      if (pair) storev(outs + i * hd + e + kLanes, high[i]);
    });
  }
  for (int64_t i = 0; i < H; ++i)
    for (int64_t t = hdv; t < hd; ++t) {
      float sum = 0.f;
      for (int64_t j = 0; j < context; ++j) sum += weights[i * context + j] * values[j * hd + t];
      outs[i * hd + t] = sum;
    }
}

// f(std::integral_constant<int, h>) for the run-time head count h in [1, kMaxGroup].
template <class F>
void with_heads(int64_t heads, F f) {
  switch (heads) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{});
  }
}
static_assert(kMaxGroup == 8, "with_heads covers 1..kMaxGroup");

// Rows [0, rows) of hd elements of a cache at offset `base` as fp32: in place for an fp32 cache,
// else converted into `converted`.
const float* cache_rows(const void* cache, int dtype, int64_t base, int64_t rows, int64_t hd,
                        std::vector<float>& converted) {
  if (dtype == kFloat32) return static_cast<const float*>(cache) + base;
  converted.resize((size_t)(rows * hd));
  for (int64_t i = 0; i < rows * hd; ++i) converted[i] = load_as_float(cache, dtype, base + i);
  return converted.data();
}

// Scratch of one thread's attention tasks (reused across them).
struct AttentionScratch {
  std::vector<float> heads;  // queries [kMaxGroup][hd], then outputs [kMaxGroup][hd]
  std::vector<float> scores;  // [kMaxGroup][context]
  std::vector<float> keys, values;  // the cache rows as fp32 (caches of other dtypes)
};

// One (sequence b, kv head g) of attention_step: k and v of position p appended to the caches,
// then each of the group's query heads (normed, rope'd) attends positions 0..p: softmax(q K^T
// scale) V, every cache row read once for up to kMaxGroup heads. Tasks of different (b, g)
// touch disjoint cache rows and outputs.
void attention_group(const AttentionStepArgs& a, int64_t b, int64_t g, const float* cos,
                     const float* sin, const float* q_norm, const float* k_norm,
                     AttentionScratch& scratch) {
  const int64_t hd = a.head_dim, nh = a.n_heads, nkv = a.n_kv_heads, p = a.position;
  const int64_t group = nh / nkv, context = p + 1;
  const int64_t row = b * a.ld_qkv;
  const int64_t base = b * a.cache_batch_stride + g * a.cache_head_stride;
  RowReader xr;
  {  // append k (normed, rope'd) and v at position p
    float k[1024];
    std::memcpy(k, xr.read(a.qkv, a.dtype, row + (nh + g) * hd, hd), hd * sizeof(float));
    if (k_norm) rms_norm_row(k, k_norm, a.norm_eps, hd, k);
    rope_row(k, cos, sin, hd, k);
    store_row(a.k_cache, a.dtype, base + p * hd, k, hd);
    store_row(a.v_cache, a.dtype, base + p * hd,
              xr.read(a.qkv, a.dtype, row + (nh + nkv + g) * hd, hd), hd);
  }
  const float* keys = cache_rows(a.k_cache, a.dtype, base, context, hd, scratch.keys);
  const float* values = cache_rows(a.v_cache, a.dtype, base, context, hd, scratch.values);
  scratch.heads.resize((size_t)(2 * kMaxGroup * hd));
  scratch.scores.resize((size_t)(kMaxGroup * context));
  float* queries = scratch.heads.data();
  float* outs = queries + kMaxGroup * hd;
  float* scores = scratch.scores.data();
  for (int64_t h0 = g * group; h0 < (g + 1) * group; h0 += kMaxGroup) {
    const int64_t heads = std::min(kMaxGroup, (g + 1) * group - h0);
    for (int64_t i = 0; i < heads; ++i) {
      float* q = queries + i * hd;
      std::memcpy(q, xr.read(a.qkv, a.dtype, row + (h0 + i) * hd, hd), hd * sizeof(float));
      if (q_norm) rms_norm_row(q, q_norm, a.norm_eps, hd, q);
      rope_row(q, cos, sin, hd, q);
#pragma omp simd
      for (int64_t e = 0; e < hd; ++e) q[e] *= a.scale;  // the scores' scale, once per head
    }
    with_heads(heads, [&](auto h) {
      attention_scores<decltype(h)::value>(queries, keys, hd, context, scores);
    });
    float inv_total[kMaxGroup];
    for (int64_t i = 0; i < heads; ++i) {  // softmax numerators and 1 / their sum
      float* s = scores + i * context;
      const float top = *std::max_element(s, s + context);
      vf total = {};
      mapv(s, context, [&](vf x, int64_t j) PYENGINE_INLINE {
        const vf e = expv(x - top);
        total += j + kLanes <= context ? e : vf{};  // the tail's padding lanes are not summed
        return e;
      });
      float sum = hsum(total);
      for (int64_t j = context / kLanes * kLanes; j < context; ++j) sum += s[j];
      inv_total[i] = 1.f / sum;
    }
    with_heads(heads, [&](auto h) {
      attention_values<decltype(h)::value>(scores, values, hd, context, outs);
    });
    for (int64_t i = 0; i < heads; ++i) {
      float* o = outs + i * hd;
#pragma omp simd
      for (int64_t e = 0; e < hd; ++e) o[e] *= inv_total[i];
      store_row(a.out, a.dtype, b * a.ld_out + (h0 + i) * hd, o, hd);
    }
  }
}

}  // namespace

void rms_norm(const RmsNormArgs& a) {
  RowReader xr, wr;
  const float* w = wr.read(a.w, a.w_dtype, 0, a.dim);
  thread_local std::vector<float> y;  // not allocated per call
  y.resize(a.dim);
  for (int64_t r = 0; r < a.rows; ++r) {
    const float* x = xr.read(a.x, a.x_dtype, r * a.ldx, a.dim);
    rms_norm_row(x, w, a.eps, a.dim, y.data());
    store_row(a.out, a.out_dtype, r * a.ldo, y.data(), a.dim);
  }
}

void silu_mul(const SiluMulArgs& a) {
  RowReader gr, ur;
  thread_local std::vector<float> y;  // not allocated per call
  y.resize(a.width);
  for (int64_t r = 0; r < a.rows; ++r) {
    const float* g = gr.read(a.gate_up, a.dtype, r * a.ld_in, a.width);
    const float* u = ur.read(a.gate_up, a.dtype, r * a.ld_in + a.width, a.width);
    std::memcpy(y.data(), g, a.width * sizeof(float));
    mapv(y.data(), a.width, [&](vf gv, int64_t i) PYENGINE_INLINE {  // g u / (1 + e^-g)
      vf uv;
      if (i + kLanes <= a.width) {
        uv = loadv(u + i);
      } else {
        float tail[kLanes] = {};
        std::memcpy(tail, u + i, (a.width - i) * sizeof(float));
        uv = loadv(tail);
      }
      return gv * uv / (1.f + expv(-gv));
    });
    store_row(a.out, a.dtype, r * a.ld_out, y.data(), a.width);
  }
}

void hadamard(const HadamardArgs& a) {
  const float norm = 1.f / std::sqrt(static_cast<float>(a.block));
  const bool parallel = a.num_threads > 1 && a.rows > 1 && a.rows * a.n >= (1 << 15);
#pragma omp parallel num_threads(a.num_threads) if (parallel)
  {
    RowReader xr;
    std::vector<float> y(a.n);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < a.rows; ++r) {
      std::memcpy(y.data(), xr.read(a.x, a.dtype, r * a.ldx, a.n), a.n * sizeof(float));
      for (int64_t c = 0; c < a.n; c += a.block) walsh_hadamard(y.data() + c, a.block);
#pragma omp simd
      for (int64_t i = 0; i < a.n; ++i) y[i] *= norm;
      store_row(a.out, a.dtype, r * a.ldo, y.data(), a.n);
    }
  }
}

void attention_step_tasks(const AttentionStepArgs& a, int64_t first, int64_t last) {
  const int64_t hd = a.head_dim, p = a.position;
  RowReader cr, sr, qnr, knr;
  const float* cos = cr.read(a.cos, a.dtype, p * hd, hd);
  const float* sin = sr.read(a.signed_sin, a.dtype, p * hd, hd);
  const float* q_norm = a.q_norm ? qnr.read(a.q_norm, a.norm_dtype, 0, hd) : nullptr;
  const float* k_norm = a.k_norm ? knr.read(a.k_norm, a.norm_dtype, 0, hd) : nullptr;
  AttentionScratch scratch;
  for (int64_t t = first; t < last; ++t)
    attention_group(a, t / a.n_kv_heads, t % a.n_kv_heads, cos, sin, q_norm, k_norm, scratch);
}

void attention_step(const AttentionStepArgs& a) {
  const int64_t tasks = attention_tasks(a);
  const int threads = (int)std::min<int64_t>(std::max(a.num_threads, 1), tasks);
  const int64_t work = tasks * (a.n_heads / a.n_kv_heads) * (a.position + 1) * a.head_dim;
  const bool parallel = threads > 1 && work >= (1 << 16);
  if (!parallel) {
    attention_step_tasks(a, 0, tasks);
    return;
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t t = 0; t < tasks; ++t) attention_step_tasks(a, t, t + 1);
}

}  // namespace PYENGINE_ISA
}  // namespace cpu
}  // namespace pyengine
