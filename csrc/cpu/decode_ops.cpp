// The small per-token operations of a decode step on the CPU (pyengine/decoder.py): RMS norm,
// SiLU-and-multiply, and one attention step (rope, KV-cache append, attention over the cache).
// Each replaces several torch ops whose dispatch costs more than their arithmetic at batch 1.
// All math is in fp32; tensors may be fp32, fp16 or bf16 (dtype codes of common.h).

#include "cpu/decode_ops.h"

#include <algorithm>
#include <exception>
#include <atomic>
#include <chrono>
#include <mutex>
#include <stdexcept>
#include <string>

#include "cpu/qmatmul.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace pyengine {
namespace cpu {


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

inline float inv_rms(const float* x, int64_t n, float eps) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += x[i] * x[i];
  return 1.f / std::sqrt(sum / static_cast<float>(n) + eps);
}

// y = x / rms(x) * w over n elements (in place allowed).
inline void rms_norm_row(const float* x, const float* w, float eps, int64_t n, float* y) {
  const float r = inv_rms(x, n, eps);
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * r * w[i];
}

// Rotary embedding of one head in place: x * cos + rotate_half(x) * sin, rotate_half(x) =
// [-x2, x1]; signed_sin holds sin with its first half negated, so the second term is
// x[(i + half) % hd] * signed_sin[i].
inline void rope_row(float* x, const float* cos, const float* signed_sin, int64_t hd) {
  const int64_t half = hd / 2;
  float rotated[1024];
  for (int64_t i = 0; i < half; ++i) {
    rotated[i] = x[i + half];
    rotated[i + half] = x[i];
  }
  for (int64_t i = 0; i < hd; ++i) x[i] = x[i] * cos[i] + rotated[i] * signed_sin[i];
}

}  // namespace

void rms_norm(const RmsNormArgs& a) {
  RowReader xr, wr;
  const float* w = wr.read(a.w, a.w_dtype, 0, a.dim);
  std::vector<float> y(a.dim);
  for (int64_t r = 0; r < a.rows; ++r) {
    const float* x = xr.read(a.x, a.x_dtype, r * a.ldx, a.dim);
    rms_norm_row(x, w, a.eps, a.dim, y.data());
    store_row(a.out, a.out_dtype, r * a.ldo, y.data(), a.dim);
  }
}

void silu_mul(const SiluMulArgs& a) {
  RowReader gr, ur;
  std::vector<float> y(a.width);
  for (int64_t r = 0; r < a.rows; ++r) {
    const float* g = gr.read(a.gate_up, a.dtype, r * a.ld_in, a.width);
    const float* u = ur.read(a.gate_up, a.dtype, r * a.ld_in + a.width, a.width);
    for (int64_t i = 0; i < a.width; ++i) y[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
    store_row(a.out, a.dtype, r * a.ld_out, y.data(), a.width);
  }
}

void hadamard(const HadamardArgs& a) {
  const WalshHadamardFn walsh_hadamard = walsh_hadamard_fn(a.isa ? a.isa : "");
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

void attention_step(const AttentionStepArgs& a) {
  const int64_t hd = a.head_dim, nh = a.n_heads, nkv = a.n_kv_heads, p = a.position;
  const int64_t group = nh / nkv;
  const int64_t context = p + 1;
  RowReader cr, sr, qnr, knr;
  const float* cos = cr.read(a.cos, a.dtype, p * hd, hd);
  const float* sin = sr.read(a.signed_sin, a.dtype, p * hd, hd);
  const float* q_norm = a.q_norm ? qnr.read(a.q_norm, a.norm_dtype, 0, hd) : nullptr;
  const float* k_norm = a.k_norm ? knr.read(a.k_norm, a.norm_dtype, 0, hd) : nullptr;

  // rope'd queries of every sequence in fp32: [batch, nh, hd]
  std::vector<float> queries(a.batch * nh * hd);
  {
    RowReader xr;
    std::vector<float> head(hd);
    for (int64_t b = 0; b < a.batch; ++b) {
      const int64_t row = b * a.ld_qkv;
      for (int64_t h = 0; h < nh; ++h) {
        float* q = queries.data() + (b * nh + h) * hd;
        std::memcpy(q, xr.read(a.qkv, a.dtype, row + h * hd, hd), hd * sizeof(float));
        if (q_norm) rms_norm_row(q, q_norm, a.norm_eps, hd, q);
        rope_row(q, cos, sin, hd);
      }
      for (int64_t h = 0; h < nkv; ++h) {  // append k (rope'd) and v at position p
        std::memcpy(head.data(), xr.read(a.qkv, a.dtype, row + (nh + h) * hd, hd),
                    hd * sizeof(float));
        if (k_norm) rms_norm_row(head.data(), k_norm, a.norm_eps, hd, head.data());
        rope_row(head.data(), cos, sin, hd);
        const int64_t at = b * a.cache_batch_stride + h * a.cache_head_stride + p * hd;
        store_row(a.k_cache, a.dtype, at, head.data(), hd);
        const float* v = xr.read(a.qkv, a.dtype, row + (nh + nkv + h) * hd, hd);
        store_row(a.v_cache, a.dtype, at, v, hd);
      }
    }
  }

  // one task per (sequence, query head): softmax(q K^T * scale) V over positions 0..p
  const int64_t tasks = a.batch * nh;
  const bool parallel = a.num_threads > 1 && tasks > 1 && tasks * context * hd >= (1 << 16);
#pragma omp parallel for schedule(static) num_threads(a.num_threads) if (parallel)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t b = t / nh, h = t % nh, kv = h / group;
    const float* q = queries.data() + t * hd;
    const int64_t base = b * a.cache_batch_stride + kv * a.cache_head_stride;
    std::vector<float> scores(context);
    std::vector<float> acc(hd, 0.f);
    RowReader kr, vr;
    float top = -INFINITY;
    for (int64_t j = 0; j < context; ++j) {
      const float* k = kr.read(a.k_cache, a.dtype, base + j * hd, hd);
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < hd; ++i) s += q[i] * k[i];
      s *= a.scale;
      scores[j] = s;
      top = s > top ? s : top;
    }
    float total = 0.f;
    for (int64_t j = 0; j < context; ++j) {
      scores[j] = std::exp(scores[j] - top);
      total += scores[j];
    }
    for (int64_t j = 0; j < context; ++j) {
      const float* v = vr.read(a.v_cache, a.dtype, base + j * hd, hd);
      const float wj = scores[j];
#pragma omp simd
      for (int64_t i = 0; i < hd; ++i) acc[i] += wj * v[i];
    }
    const float inv = 1.f / total;
    for (int64_t i = 0; i < hd; ++i) acc[i] *= inv;
    store_row(a.out, a.dtype, b * a.ld_out + h * hd, acc.data(), hd);
  }
}


// ---- StepProgram -------------------------------------------------------------------------------

namespace {
bool independent_matmuls(const QMatmulArgs& a, const QMatmulArgs& b);
}  // namespace

void StepProgram::add_qmatmul(const QMatmulArgs& a, const std::string& isa) {
  check_qmatmul_args("StepProgram.add_qmatmul", a);
  if (!ops_.empty() && ops_.back().kind == Kind::kQMatmul &&
      independent_matmuls(qmatmuls_[ops_.back().index], a))
    ops_.back().barrier_after = false;
  ops_.push_back({Kind::kQMatmul, qmatmuls_.size()});
  qmatmuls_.push_back(a);
  isas_.push_back(isa);
}

void StepProgram::add_rms_norm(const RmsNormArgs& a) {
  ops_.push_back({Kind::kRmsNorm, norms_.size()});
  norms_.push_back(a);
}

void StepProgram::add_silu_mul(const SiluMulArgs& a) {
  ops_.push_back({Kind::kSiluMul, silu_muls_.size()});
  silu_muls_.push_back(a);
}

void StepProgram::add_hadamard(const HadamardArgs& a) {
  ops_.push_back({Kind::kHadamard, hadamards_.size()});
  hadamards_.push_back(a);
  hadamards_.back().num_threads = 1;
}

void StepProgram::add_attention(const AttentionStepArgs& a, int64_t max_positions) {
  if (max_positions < 1 || a.cache_head_stride < max_positions * a.head_dim)
    throw std::invalid_argument("StepProgram.add_attention: the caches do not hold "
                                "max_positions positions");
  ops_.push_back({Kind::kAttention, attentions_.size()});
  attentions_.push_back(a);
  max_positions_ = max_positions_ < 0 ? max_positions : std::min(max_positions_, max_positions);
}

namespace {

size_t dtype_bytes(int dtype) { return dtype == kFloat32 ? 4 : 2; }

// The bytes [lo, hi) a row-major matrix of `rows` rows of `cols` elements, `ld` apart, spans.
struct ByteSpan {
  uintptr_t lo, hi;
  bool overlaps(const ByteSpan& o) const { return lo < o.hi && o.lo < hi; }
};
ByteSpan matrix_span(const void* p, int64_t rows, int64_t ld, int64_t cols, int dtype) {
  const uintptr_t lo = reinterpret_cast<uintptr_t>(p);
  if (rows <= 0 || cols <= 0) return {lo, lo};
  return {lo, lo + (uintptr_t)(((rows - 1) * ld + cols) * (int64_t)dtype_bytes(dtype))};
}

// Whether matmul b may run beside matmul a: neither writes what the other reads or writes
// (b's output is read too when it accumulates; the weights are never written).
bool independent_matmuls(const QMatmulArgs& a, const QMatmulArgs& b) {
  const ByteSpan a_in = matrix_span(a.x, a.M, a.ldx, a.K, a.x_dtype);
  const ByteSpan a_out = matrix_span(a.out, a.M, a.ldo, a.N, a.out_dtype);
  const ByteSpan b_in = matrix_span(b.x, b.M, b.ldx, b.K, b.x_dtype);
  const ByteSpan b_out = matrix_span(b.out, b.M, b.ldo, b.N, b.out_dtype);
  return !a_out.overlaps(b_in) && !a_out.overlaps(b_out) && !b_out.overlaps(a_in);
}

// Rows [lo, hi) of a matmul as a call of its own on one thread: the weight's rows (canonical or
// interleaved alike: row lo starts at lo * ldq words and lo * lds scales; lo is a multiple of
// the interleave; an interleaved call's canonical rows too), the bias and the output columns
// shifted.
QMatmulArgs row_slice(const QMatmulArgs& a, int64_t lo, int64_t hi) {
  QMatmulArgs s = a;
  s.N = hi - lo;
  s.num_threads = 1;
  // row lo of group parameters (scales or zeros, null stays null) lds apart
  const size_t sz = dtype_bytes(a.sz_dtype);
  auto params_at = [&](const void* p, int64_t lds) -> const void* {
    return p ? static_cast<const char*>(p) + lo * lds * sz : nullptr;
  };
  s.qweight = a.qweight + lo * a.ldq;
  s.scales = params_at(a.scales, a.lds);
  s.zeros = params_at(a.zeros, a.lds);
  if (a.canonical.qweight) {  // the canonical rows of an interleaved call: row lo likewise
    s.canonical.qweight = a.canonical.qweight + lo * a.canonical.ldq;
    s.canonical.scales = params_at(a.canonical.scales, a.canonical.lds);
    s.canonical.zeros = params_at(a.canonical.zeros, a.canonical.lds);
  }
  if (a.bias) s.bias = static_cast<const char*>(a.bias) + lo * dtype_bytes(a.bias_dtype);
  s.out = static_cast<char*>(a.out) + lo * dtype_bytes(a.out_dtype);
  return s;
}

}  // namespace

namespace {

void run_matmul(const QMatmulArgs& a, const std::string& isa) {
  if (isa.empty()) qmatmul(a);
  else qmatmul_with_isa(a, isa);
}

// The schedule choice of StepProgram::run: the faster of the two by the means of their recent
// step times (a mean, not a median: on a busy machine a parallel step is now and then a hundred
// times slower, and those steps are what it costs), and the other one once in a while, so that
// a change (the machine gets busy or quiet) is noticed: after the chosen schedule has run for
// kProbeRatio times the other's mean step time, which bounds the time lost to tries near
// kProbeSteps / kProbeRatio. A try is kProbeSteps steps: the first after a switch is not timed
// (ScheduleTimes), the others are.
constexpr double kProbeRatio = 32;
constexpr int kProbeSteps = 3;

// What the process has learned of the machine: parallel / one-thread step time of the last
// program that timed both (0: none yet), and when. Where that says the machine is busy (a
// parallel step kBusyRatio times slower or more) and is recent (kVerdictLifetimeS), a new
// program (pyengine.Decoder makes one per decoder) estimates its parallel step time from it
// until it has run one itself, so that a fresh decoder does not open with parallel steps (up to
// a second each under load). Below that ratio it is one of another program (of another model,
// whose layers split better or worse), and a new program measures its own. The lifetime keeps
// one noisy program from holding every later one on one thread: a program that relies on the
// verdict runs no parallel step for a while, so nothing would refresh or revise it.
struct MachineVerdict {
  std::mutex mutex;
  double parallel_over_serial = 0;
  std::chrono::steady_clock::time_point learned_at{};
};
MachineVerdict g_machine;
constexpr double kBusyRatio = 2;

// The verdict's ratio where it is recent enough to rely on, else 0.
double recent_parallel_over_serial() {
  std::lock_guard<std::mutex> lock(g_machine.mutex);
  const double age_s = std::chrono::duration<double>(std::chrono::steady_clock::now() -
                                                     g_machine.learned_at).count();
  return age_s < StepProgram::kVerdictLifetimeS ? g_machine.parallel_over_serial : 0;
}

}  // namespace

void StepProgram::run_small(const Op& op, int64_t position) {
  switch (op.kind) {
    case Kind::kRmsNorm: rms_norm(norms_[op.index]); break;
    case Kind::kSiluMul: silu_mul(silu_muls_[op.index]); break;
    case Kind::kHadamard: hadamard(hadamards_[op.index]); break;
    case Kind::kAttention: {
      AttentionStepArgs a = attentions_[op.index];
      a.position = position;
      a.num_threads = 1;
      attention_step(a);
      break;
    }
    default: break;
  }
}

void StepProgram::run_serial(int64_t position) {
  for (const Op& op : ops_) {
    if (op.kind != Kind::kQMatmul) {
      run_small(op, position);
      continue;
    }
    QMatmulArgs a = qmatmuls_[op.index];
    a.num_threads = 1;
    run_matmul(a, isas_[op.index]);
  }
}

void StepProgram::run_parallel(int64_t position, int threads) {
#ifdef _OPENMP
  // One parallel region for the whole step (a region per operation would fork and join a few
  // hundred times per token): each matmul's rows are cut into `threads` slices that the
  // threads take in turn from a counter (a thread held up by the machine leaves its slice to
  // the others), the small operations run on one thread, and a barrier separates operations
  // (but the consecutive matmuls of Op::barrier_after).
  std::vector<std::atomic<int64_t>> next(ops_.size());
  for (auto& n : next) n.store(0, std::memory_order_relaxed);
  std::exception_ptr error;
  std::atomic<bool> failed{false};
#pragma omp parallel num_threads(threads)
  {
    const bool first = omp_get_thread_num() == 0;
    for (size_t i = 0; i < ops_.size(); ++i) {
      const Op& op = ops_[i];
      if (!failed.load(std::memory_order_relaxed)) {
        try {
          if (op.kind == Kind::kQMatmul) {
            const QMatmulArgs& a = qmatmuls_[op.index];
            const int64_t unit = a.interleave ? a.interleave : 4;
            const int64_t units = (a.N + unit - 1) / unit;
            const int64_t per = (units + threads - 1) / threads * unit;  // rows per slice
            for (int64_t lo; (lo = next[i].fetch_add(1) * per) < a.N;)
              run_matmul(row_slice(a, lo, std::min(a.N, lo + per)), isas_[op.index]);
          } else if (first) {
            run_small(op, position);
          }
        } catch (...) {
#pragma omp critical(pyengine_step_error)
          if (!error) error = std::current_exception();
          failed.store(true);
        }
      }
      if (op.barrier_after) {  // the same for every thread of the team
#pragma omp barrier
      }
    }
  }
  if (error) std::rethrow_exception(error);
#else
  (void)threads;
  run_serial(position);
#endif
}

void StepProgram::run(int64_t position, int num_threads, bool adaptive) {
  if (position < 0 || (max_positions_ >= 0 && position >= max_positions_))
    throw std::invalid_argument("StepProgram.run: position " + std::to_string(position) +
                                " is outside the caches (" + std::to_string(max_positions_) +
                                " positions)");
#ifdef _OPENMP
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
#else
  const int threads = 1;
#endif
  last_run_threads_ = 1;
  if (threads <= 1) {
    run_serial(position);
    return;
  }
  if (!adaptive) {
    last_run_threads_ = threads;
    run_parallel(position, threads);
    return;
  }
  // The one-thread schedule first (never slow), then the faster one lately, the other one now
  // and then. Until this program has run a parallel step, its time is estimated from what the
  // process has learned lately (machine_verdict) where that says the machine is busy; else it
  // is tried.
  bool parallel;
  const double serial_ms = serial_.mean_ms();
  const double learned = recent_parallel_over_serial();
  const bool busy = learned >= kBusyRatio;
  const double parallel_ms = parallel_.timed > 0 ? parallel_.mean_ms()
                             : busy && serial_.timed > 0 ? learned * serial_ms
                                                         : -1;
  // The opening: kProbeSteps one-thread steps, then as many parallel ones (unless the process
  // has learned that the machine is busy), each schedule's first untimed, so that the first
  // choice rests on two timed steps of each.
  if (serial_.timed < kProbeSteps - 1) {
    parallel = false;
  } else if (parallel_.timed < kProbeSteps - 1 && !(busy && parallel_.timed == 0)) {
    parallel = true;
  } else if (probe_steps_left_ > 0) {  // trying the other schedule: its steps in a row
    parallel = last_schedule_ == 1;
    --probe_steps_left_;
  } else {
    parallel = parallel_ms <= serial_ms;
    if (ms_since_probe_ >= kProbeRatio * (parallel ? serial_ms : parallel_ms)) {
      parallel = !parallel;
      ms_since_probe_ = 0;
      probe_steps_left_ = kProbeSteps - 1;
    }
  }
  const bool switched = last_schedule_ != (int)parallel;  // the program's first run too
  last_schedule_ = parallel ? 1 : 0;
  last_run_threads_ = parallel ? threads : 1;
  const auto start = std::chrono::steady_clock::now();
  if (parallel) run_parallel(position, threads);
  else run_serial(position);
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  (parallel ? parallel_ : serial_).add(ms, !switched);
  ms_since_probe_ += ms;
  if (parallel_.timed > 0 && serial_.timed > 0)
    set_machine_verdict(parallel_.mean_ms() / serial_.mean_ms(), 0);
}

StepProgram::MachineVerdict StepProgram::machine_verdict() {
  std::lock_guard<std::mutex> lock(g_machine.mutex);
  const double age_s = std::chrono::duration<double>(std::chrono::steady_clock::now() -
                                                     g_machine.learned_at).count();
  return {g_machine.parallel_over_serial, g_machine.parallel_over_serial > 0 ? age_s : -1};
}

void StepProgram::set_machine_verdict(double parallel_over_serial, double age_s) {
  if (!(parallel_over_serial >= 0) || !(age_s >= 0))
    throw std::invalid_argument("StepProgram.set_machine_verdict: the ratio and the age must be "
                                ">= 0");
  std::lock_guard<std::mutex> lock(g_machine.mutex);
  g_machine.parallel_over_serial = parallel_over_serial;
  g_machine.learned_at = std::chrono::steady_clock::now() -
                         std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                             std::chrono::duration<double>(age_s));
}

size_t StepProgram::barriers() const {
  size_t n = 0;
  for (const Op& op : ops_) n += op.barrier_after;
  return n;
}

double StepProgram::ScheduleTimes::mean_ms() const {
  if (timed == 0) return -1;
  const int n = (int)std::min<int64_t>(timed, kRecentSteps);
  double total = 0;
  for (int i = 0; i < n; ++i) total += recent_ms[i];
  return total / n;
}

}  // namespace cpu
}  // namespace pyengine
