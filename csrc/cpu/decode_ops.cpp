// The small per-token operations of a decode step on the CPU (pyengine/decoder.py), dispatched to
// the instruction-set build that runs them (step_kernels.cpp), and the StepProgram that runs a
// whole step in one call.

#include "cpu/decode_ops.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"
#include "cpu/qmatmul.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace pyengine {
namespace cpu {


namespace {

const char* or_empty(const char* isa) { return isa ? isa : ""; }

}  // namespace

void rms_norm(const RmsNormArgs& a) { step_kernels(or_empty(a.isa)).rms_norm(a); }

void silu_mul(const SiluMulArgs& a) { step_kernels(or_empty(a.isa)).silu_mul(a); }

void hadamard(const HadamardArgs& a) { step_kernels(or_empty(a.isa)).hadamard(a); }

void attention_step(const AttentionStepArgs& a) {
  step_kernels(or_empty(a.isa)).attention_step(a);
}

namespace {

void check_embedding_args(const EmbeddingArgs& a) {
  auto fail = [](const std::string& why) {
    throw std::invalid_argument("embedding_rows: " + why);
  };
  if (a.bits != 2 && a.bits != 3 && a.bits != 4 && a.bits != 8)
    fail("bits must be 2, 3, 4 or 8, got " + std::to_string(a.bits));
  if (a.rows < 0 || a.vocab < 1 || a.dim < 1) fail("rows >= 0, vocab >= 1 and dim >= 1 needed");
  if (!a.qweight || !a.scales || !a.out || (a.rows > 0 && !a.ids)) fail("a null pointer");
  const int64_t blocks = (a.dim + 31) / 32;  // a row's words: `bits` per block of 32 codes
  if (a.ldq < blocks * a.bits) fail("ldq holds fewer words than dim codes need");
  const int64_t groups = a.group_size > 0 ? (a.dim + a.group_size - 1) / a.group_size : 1;
  if (a.lds < groups) fail("lds holds fewer scales than dim's groups");
  if (a.ldo < a.dim) fail("ldo must be >= dim");
  for (int d : {a.sz_dtype, a.out_dtype, a.round_dtype})
    if (d != kFloat32 && d != kFloat16 && d != kBFloat16) fail("unsupported dtype code");
}

}  // namespace

void embedding_rows(const EmbeddingArgs& a) {
  check_embedding_args(a);
  for (int64_t r = 0; r < a.rows; ++r)
    if (a.ids[r] < 0 || a.ids[r] >= a.vocab)
      throw std::out_of_range("embedding_rows: token id " + std::to_string(a.ids[r]) +
                              " is outside the table's " + std::to_string(a.vocab) + " rows");
  const uint64_t mask = (1u << a.bits) - 1;
  const float symmetric_zero = static_cast<float>(1 << (a.bits - 1));
  for (int64_t r = 0; r < a.rows; ++r) {
    const uint32_t* row = a.qweight + a.ids[r] * a.ldq;
    const int64_t srow = a.ids[r] * a.lds;
    for (int64_t k = 0; k < a.dim; ++k) {
      const uint32_t* block = row + (k >> 5) * a.bits;  // the words of k's block of 32 codes
      const int64_t bit = (k & 31) * a.bits;           // k's first bit in the block's string
      const int64_t word = bit >> 5, shift = bit & 31;
      uint64_t bits = block[word];
      if (shift + a.bits > 32) bits |= static_cast<uint64_t>(block[word + 1]) << 32;  // straddles
      const float code = static_cast<float>((bits >> shift) & mask);
      const int64_t g = srow + (a.group_size > 0 ? k / a.group_size : 0);
      const float zero = a.zeros ? load_as_float(a.zeros, a.sz_dtype, g) : symmetric_zero;
      float value = (code - zero) * load_as_float(a.scales, a.sz_dtype, g);
      if (a.round_dtype == kFloat16) value = half_to_float(float_to_half(value));
      if (a.round_dtype == kBFloat16) value = bf16_to_float(float_to_bf16(value));
      store_from_float(a.out, a.out_dtype, r * a.ldo + k, value);
    }
  }
}

// ---- StepProgram -------------------------------------------------------------------------------

namespace {
bool independent_matmuls(const QMatmulArgs& a, const QMatmulArgs& b);
}  // namespace

StepProgram::StepProgram(const std::string& isa) : kernels_(&step_kernels(isa)) {}

void StepProgram::add_qmatmul(const QMatmulArgs& a, const std::string& isa) {
  check_qmatmul_args("StepProgram.add_qmatmul", a);
  Op op{Kind::kQMatmul, qmatmuls_.size()};
  join_prologue(op, a);
  if (!ops_.empty() && ops_.back().kind == Kind::kQMatmul &&
      independent_matmuls(qmatmuls_[ops_.back().index], a) &&
      op.prologue == ops_.back().prologue)
    ops_.back().barrier_after = false;
  ops_.push_back(op);
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
  hadamards_.back().isa = nullptr;  // the program's kernels_ run it
}

void StepProgram::add_embedding(const EmbeddingArgs& a) {
  check_embedding_args(a);
  ops_.push_back({Kind::kEmbedding, embeddings_.size()});
  embeddings_.push_back(a);
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

bool within(const ByteSpan& inner, const ByteSpan& outer) {
  return outer.lo <= inner.lo && inner.hi <= outer.hi;
}

}  // namespace

// A matmul joins the group after a prologue (the RMS norm or SiLU-multiply that came right
// before it, or before the matmuls it would run beside) where every thread may compute the
// prologue on its own while the group's slices run: the prologue does not work in place, the
// matmul writes neither what the prologue reads nor what it writes, and reads the prologue's
// output whole (then from each thread's copy) or not at all. The first matmul after the
// prologue must read it (else there is nothing to gain).
void StepProgram::join_prologue(Op& op, const QMatmulArgs& a) {
  if (ops_.empty()) return;
  const bool first = ops_.back().kind != Kind::kQMatmul;
  const int64_t at = first ? (int64_t)ops_.size() - 1 : ops_.back().prologue;
  if (at < 0) return;
  const Op& pro = ops_[at];
  ByteSpan in, out;
  if (pro.kind == Kind::kRmsNorm) {
    const RmsNormArgs& n = norms_[pro.index];
    in = matrix_span(n.x, n.rows, n.ldx, n.dim, n.x_dtype);
    out = matrix_span(n.out, n.rows, n.ldo, n.dim, n.out_dtype);
  } else if (pro.kind == Kind::kSiluMul) {
    const SiluMulArgs& m = silu_muls_[pro.index];
    in = matrix_span(m.gate_up, m.rows, m.ld_in, 2 * m.width, m.dtype);
    out = matrix_span(m.out, m.rows, m.ld_out, m.width, m.dtype);
  } else {
    return;
  }
  const ByteSpan x = matrix_span(a.x, a.M, a.ldx, a.K, a.x_dtype);
  const ByteSpan y = matrix_span(a.out, a.M, a.ldo, a.N, a.out_dtype);
  const bool reads = within(x, out);
  if (in.overlaps(out) || y.overlaps(in) || y.overlaps(out) || (!reads && x.overlaps(out)) ||
      (first && !reads))
    return;
  op.prologue = at;
  op.reads_prologue = reads;
  if (first) {
    ops_.back().barrier_after = false;
    prologue_bytes_ = std::max<size_t>(prologue_bytes_, out.hi - out.lo);
  }
}

namespace {

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
// parallel step kBusyRatio times slower or more), a new program (pyengine.Decoder makes one per
// decoder) estimates its parallel step time from it until it has run one itself, so that a
// fresh decoder does not open with parallel steps (up to a second each under load). Below that
// ratio it is one of another program (of another model, whose layers split better or worse),
// and a new program measures its own.
//
// The programs that rely on a busy verdict share one probe budget: the one-thread time they
// have run on it since it was learned (reliant_ms). Once that reaches kProbeRatio times the
// estimated parallel step, the program running then tries the parallel schedule (kProbeSteps
// steps) and, having timed both, writes the verdict anew. So a verdict is revised at the rate
// one long decoder would revise its own choice, however short the decoders that rely on it: one
// noisy program cannot hold every later one on one thread, and a busy machine does not make
// every new decoder pay parallel steps under load.
struct MachineVerdict {
  std::mutex mutex;
  double parallel_over_serial = 0;
  std::chrono::steady_clock::time_point learned_at{};
  double reliant_ms = 0;
};
MachineVerdict g_machine;
constexpr double kBusyRatio = 2;

// Adds ms of one-thread steps run on the verdict (set_machine_verdict spends them).
void add_reliant_ms(double ms) {
  std::lock_guard<std::mutex> lock(g_machine.mutex);
  g_machine.reliant_ms += ms;
}

}  // namespace

AttentionStepArgs StepProgram::attention_at(const Op& op, int64_t position) const {
  AttentionStepArgs a = attentions_[op.index];
  a.position = position;
  a.num_threads = 1;
  return a;
}

void StepProgram::run_small(const Op& op, int64_t position) {
  switch (op.kind) {
    case Kind::kRmsNorm: kernels_->rms_norm(norms_[op.index]); break;
    case Kind::kSiluMul: kernels_->silu_mul(silu_muls_[op.index]); break;
    case Kind::kHadamard: kernels_->hadamard(hadamards_[op.index]); break;
    case Kind::kEmbedding: embedding_rows(embeddings_[op.index]); break;
    case Kind::kAttention: {
      const AttentionStepArgs a = attention_at(op, position);
      kernels_->attention_step_tasks(a, 0, attention_tasks(a));
      break;
    }
    default: break;
  }
}

const void* StepProgram::prologue_output(const Op& op) const {
  return op.kind == Kind::kRmsNorm ? norms_[op.index].out : silu_muls_[op.index].out;
}

void StepProgram::run_prologue_into(const Op& op, void* out) const {
  if (op.kind == Kind::kRmsNorm) {
    RmsNormArgs a = norms_[op.index];
    a.out = out;
    kernels_->rms_norm(a);
  } else {
    SiluMulArgs a = silu_muls_[op.index];
    a.out = out;
    kernels_->silu_mul(a);
  }
}

namespace {
using StepClock = std::chrono::steady_clock;
double ms_between(StepClock::time_point from, StepClock::time_point to) {
  return std::chrono::duration<double, std::milli>(to - from).count();
}
}  // namespace

void StepProgram::run_serial(int64_t position) {
  const bool timing = profiling_;
  if (timing) ++profiled_runs_[0];
  for (size_t i = 0; i < ops_.size(); ++i) {
    const Op& op = ops_[i];
    const auto start = timing ? StepClock::now() : StepClock::time_point{};
    if (op.kind != Kind::kQMatmul) {
      run_small(op, position);
    } else {
      QMatmulArgs a = qmatmuls_[op.index];
      a.num_threads = 1;
      run_matmul(a, isas_[op.index]);
    }
    if (timing) op_ms_[0][i] += ms_between(start, StepClock::now());
  }
}

void StepProgram::set_profiling(bool on) {
  if (on) {  // a fresh profile; turned off, the recorded one stays readable
    for (auto& ms : op_ms_) ms.assign(ops_.size(), 0.0);
    profiled_runs_[0] = profiled_runs_[1] = 0;
  }
  profiling_ = on;
}

std::vector<StepProgram::OpProfile> StepProgram::profile() const {
  static const char* const kKinds[] = {"qmatmul",   "rms_norm",  "silu_mul",
                                       "hadamard",  "attention", "embedding"};  // Kind's order
  static_assert(static_cast<int>(Kind::kEmbedding) == 5, "kKinds follows Kind");
  std::vector<OpProfile> out;
  out.reserve(ops_.size());
  for (size_t i = 0; i < ops_.size(); ++i) {
    const Op& op = ops_[i];
    OpProfile p{kKinds[static_cast<int>(op.kind)], 0, 0, 0,
                i < op_ms_[0].size() ? op_ms_[0][i] : 0.0,
                i < op_ms_[1].size() ? op_ms_[1][i] : 0.0, op.barrier_after};
    if (op.kind == Kind::kQMatmul) {
      const QMatmulArgs& a = qmatmuls_[op.index];
      p.n = a.N, p.k = a.K, p.bits = a.bits;
    }
    out.push_back(p);
  }
  return out;
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
  const bool timing = profiling_;
  if (timing) ++profiled_runs_[1];
#pragma omp parallel num_threads(threads)
  {
    const bool first = omp_get_thread_num() == 0;
    auto since_barrier = timing && first ? StepClock::now() : StepClock::time_point{};
    // this thread's copy of the prologue of the running group (Op::prologue; not the first's)
    thread_local std::vector<char> scratch;
    if (!first) scratch.resize(prologue_bytes_);
    for (size_t i = 0; i < ops_.size(); ++i) {
      const Op& op = ops_[i];
      if (!failed.load(std::memory_order_relaxed)) {
        try {
          if (op.kind == Kind::kQMatmul) {
            QMatmulArgs a = qmatmuls_[op.index];
            if (op.reads_prologue && !first)  // x from this thread's copy, at its offset
              a.x = scratch.data() + (static_cast<const char*>(a.x) -
                                      static_cast<const char*>(prologue_output(ops_[op.prologue])));
            const int64_t unit = a.interleave ? a.interleave : 4;
            const int64_t units = (a.N + unit - 1) / unit;
            const int64_t per = (units + threads - 1) / threads * unit;  // rows per slice
            for (int64_t lo; (lo = next[i].fetch_add(1) * per) < a.N;)
              run_matmul(row_slice(a, lo, std::min(a.N, lo + per)), isas_[op.index]);
          } else if (op.kind == Kind::kAttention) {  // its tasks, taken in turn
            const AttentionStepArgs a = attention_at(op, position);
            const int64_t tasks = attention_tasks(a);
            for (int64_t t; (t = next[i].fetch_add(1)) < tasks;)
              kernels_->attention_step_tasks(a, t, t + 1);
          } else if (!op.barrier_after) {  // a prologue: every thread (Op::prologue)
            if (first) run_small(op, position);
            else run_prologue_into(op, scratch.data());
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
        if (timing && first) {  // thread 0's time since the last barrier (set_profiling)
          const auto now = StepClock::now();
          op_ms_[1][i] += ms_between(since_barrier, now);
          since_barrier = now;
        }
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
  if (profiling_)  // operations added since profiling was turned on
    for (auto& ms : op_ms_) ms.resize(ops_.size(), 0.0);
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
  // process has learned (machine_verdict) where that says the machine is busy; else it is tried.
  bool parallel;
  const double serial_ms = serial_.mean_ms();
  const MachineVerdict verdict = machine_verdict();
  const double learned = verdict.parallel_over_serial;
  // relying on the verdict: its parallel time is an estimate, its tries come out of the
  // process's probe budget (MachineVerdict)
  const bool reliant = parallel_.timed == 0 && learned >= kBusyRatio;
  const double parallel_ms = parallel_.timed > 0            ? parallel_.mean_ms()
                             : reliant && serial_.timed > 0 ? learned * serial_ms
                                                            : -1;
  // The opening: kProbeSteps one-thread steps, then as many parallel ones (unless the program
  // relies on a busy verdict), each schedule's first untimed, so that the first choice rests on
  // two timed steps of each.
  if (serial_.timed < kProbeSteps - 1) {
    parallel = false;
  } else if (parallel_.timed < kProbeSteps - 1 && !(reliant && parallel_.runs == 0)) {
    parallel = true;
  } else if (probe_steps_left_ > 0) {  // trying the other schedule: its steps in a row
    parallel = last_schedule_ == 1;
    --probe_steps_left_;
  } else {
    parallel = parallel_ms <= serial_ms;
    const double since_probe = reliant ? verdict.reliant_ms : ms_since_probe_;
    if (since_probe >= kProbeRatio * (parallel ? serial_ms : parallel_ms)) {
      parallel = !parallel;
      ms_since_probe_ = 0;
      // (a program relying on the verdict tries by the opening's rule above, from its next
      // step; the budget is spent when its try has timed both schedules and writes the verdict
      // anew, set_machine_verdict: a program that ends before that leaves the budget to the
      // next one, which then tries at once instead of relying on the old verdict again)
      probe_steps_left_ = reliant ? 0 : kProbeSteps - 1;
    }
  }
  const bool switched = last_schedule_ != (int)parallel;  // the program's first run too
  last_schedule_ = parallel ? 1 : 0;
  last_run_threads_ = parallel ? threads : 1;
  const auto start = StepClock::now();
  if (parallel) run_parallel(position, threads);
  else run_serial(position);
  const double ms = ms_between(start, StepClock::now());
  (parallel ? parallel_ : serial_).add(ms, !switched);
  ms_since_probe_ += ms;
  if (reliant && !parallel) add_reliant_ms(ms);
  if (parallel_.timed > 0 && serial_.timed > 0)
    set_machine_verdict(parallel_.mean_ms() / serial_.mean_ms(), 0);
}

StepProgram::MachineVerdict StepProgram::machine_verdict() {
  std::lock_guard<std::mutex> lock(g_machine.mutex);
  const double age_s = std::chrono::duration<double>(std::chrono::steady_clock::now() -
                                                     g_machine.learned_at).count();
  const bool known = g_machine.parallel_over_serial > 0;
  return {g_machine.parallel_over_serial, known ? age_s : -1, g_machine.reliant_ms};
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
  g_machine.reliant_ms = 0;
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
