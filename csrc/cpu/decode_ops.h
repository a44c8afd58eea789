// The small per-token operations of a CPU decode step (step_kernels.cpp, compiled once per
// instruction set; decode_ops.cpp dispatches them) and the StepProgram that runs a whole step.
// Pointers are raw, dtypes are the codes of common.h, strides and sizes count elements. An
// operation's isa names the build that runs it (nullptr or "": the best this CPU runs; else
// std::invalid_argument where this binary lacks it or the CPU cannot run it).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common.h"

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
  const char* isa = nullptr;
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
  const char* isa = nullptr;
};
void silu_mul(const SiluMulArgs& a);

// out[r, :n] = the orthonormal Walsh-Hadamard transform of each block of `block` consecutive
// elements of x[r, :n]: block c of the output is H (block c of x) / sqrt(block), H the Sylvester
// Hadamard matrix (H[i][j] = (-1)^popcount(i & j): symmetric, H H = block I, so the transform is
// its own inverse). n a multiple of block, block a power of two; one dtype for x and out; in
// place allowed (out == x). Rows are split over up to num_threads threads.
struct HadamardArgs {
  const void* x = nullptr;
  int64_t ldx = 0;
  void* out = nullptr;
  int64_t ldo = 0;
  int dtype = 0;
  int64_t rows = 0, n = 0, block = 0;
  int num_threads = 1;
  const char* isa = nullptr;
};
void hadamard(const HadamardArgs& a);

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
  const char* isa = nullptr;
};
void attention_step(const AttentionStepArgs& a);

// Rows of a quantized table in the canonical layout (docs/FORMAT.md) for token ids, dequantized:
// out[r, k] = (code(ids[r], k) - zero) * scale for r < rows, k < dim, in fp32, rounded to
// round_dtype (the table's own output dtype, as its lookup in torch returns the rows) and
// stored as out_dtype. code(v, k) is code k of table row v: block k / 32 of the row's words holds
// `bits` words, read as the little-endian bit string word0 | word1 << 32 | ..., in which code
// k % 32 takes bits [(k % 32) * bits, (k % 32 + 1) * bits) (3-bit codes 10 and 21 straddle two
// words). scale / zero: row v's of k's group (k / group_size; one group per row where
// group_size <= 0); zeros null: 2^(bits - 1). Every id must lie in [0, vocab), else
// std::out_of_range before anything is written.
struct EmbeddingArgs {
  const int64_t* ids = nullptr;    // [rows]
  int64_t rows = 0;
  const uint32_t* qweight = nullptr;
  int64_t ldq = 0;                 // words per table row
  const void* scales = nullptr;    // [vocab, groups], row stride lds
  const void* zeros = nullptr;     // as scales (same dtype), or null
  int64_t lds = 0;
  int sz_dtype = 0;
  int bits = 8;
  int64_t group_size = 0;
  int64_t vocab = 0, dim = 0;
  void* out = nullptr;             // [rows, >= dim], row stride ldo
  int out_dtype = 0;
  int64_t ldo = 0;
  int round_dtype = 0;
};
void embedding_rows(const EmbeddingArgs& a);

// attention_step is batch * n_kv_heads independent tasks: task t = (sequence t / n_kv_heads, kv
// head t % n_kv_heads) appends that head's k and v at the position and attends its query heads
// (a parallel StepProgram run hands them out to its threads).
inline int64_t attention_tasks(const AttentionStepArgs& a) { return a.batch * a.n_kv_heads; }

// The step operations of one instruction-set build. attention_step_tasks runs tasks [first,
// last) of an attention step on the calling thread.
struct StepKernels {
  void (*rms_norm)(const RmsNormArgs&);
  void (*silu_mul)(const SiluMulArgs&);
  void (*hadamard)(const HadamardArgs&);
  void (*attention_step)(const AttentionStepArgs&);
  void (*attention_step_tasks)(const AttentionStepArgs&, int64_t first, int64_t last);
};
// The build named isa (dispatch.cpp; "": the best this CPU runs; errors name op).
const StepKernels& step_kernels(const std::string& isa, const char* op = "StepProgram");

#define PYENGINE_DECLARE_STEP_ISA(isa)                                                  \
  namespace isa {                                                                       \
  void rms_norm(const RmsNormArgs& a);                                                  \
  void silu_mul(const SiluMulArgs& a);                                                  \
  void hadamard(const HadamardArgs& a);                                                 \
  void attention_step(const AttentionStepArgs& a);                                      \
  void attention_step_tasks(const AttentionStepArgs& a, int64_t first, int64_t last);   \
  }
PYENGINE_DECLARE_STEP_ISA(generic)
PYENGINE_DECLARE_STEP_ISA(avx2)
PYENGINE_DECLARE_STEP_ISA(avx512)
#undef PYENGINE_DECLARE_STEP_ISA

// A decode step written down once as the list of its operations (quantized matmuls of
// qmatmul.h and the operations above, on buffers that live as long as the program) and run
// in order by one call: a step of a small model is a few hundred operations, each of which
// would otherwise pay a round trip through the interpreter.
class StepProgram {
 public:
  // The norms, SiLU-and-multiplies, Walsh-Hadamard transforms and attentions run on the build
  // named isa ("": the best this CPU runs; else as step_kernels).
  explicit StepProgram(const std::string& isa = "");
  // Appends one operation (copied; an added operation's own isa is not read). A matmul runs on
  // the build named isa ("": the best this CPU runs); num_threads of the matmuls and attentions
  // are set per run.
  void add_qmatmul(const QMatmulArgs& a, const std::string& isa);
  void add_rms_norm(const RmsNormArgs& a);
  void add_silu_mul(const SiluMulArgs& a);
  void add_hadamard(const HadamardArgs& a);
  // An attention step at the position given to run(); the caches must hold max_positions.
  void add_attention(const AttentionStepArgs& a, int64_t max_positions);
  // The table rows of the ids in a.ids at each run (a buffer the caller writes before it; the
  // arguments are checked here, the ids at each run).
  void add_embedding(const EmbeddingArgs& a);
  // Runs every operation in order, attention at `position` (< every attention's
  // max_positions, else std::invalid_argument before anything runs), on up to num_threads
  // threads (0: OpenMP's default). With more than one thread and `adaptive`, each run takes
  // whichever of the parallel and the one-thread schedule has been faster lately (see
  // ScheduleTimes): on a machine whose cores are busy with other work, the threads of a parallel
  // step wait at every barrier for a thread that has lost its core, and one thread is then
  // several times faster. The result is the same either way (each matmul slice computes its
  // rows as a whole call would).
  void run(int64_t position, int num_threads, bool adaptive = true);
  size_t size() const { return ops_.size(); }
  // Barriers of a parallel run (ops but the merged matmuls, see Op::barrier_after).
  size_t barriers() const;

  // The step times of each schedule: the mean of its last kRecentSteps timed runs (ms; < 0:
  // none yet), how many runs took it and how many of them were timed. A program's first run
  // and a run right after a switch of schedule are not timed: the threads of a parallel step
  // wake from sleep and find their slices' caches cold then, and one such step would stand for
  // the schedule (a probe that always looked slow would never switch back).
  static constexpr int kRecentSteps = 8;
  struct ScheduleTimes {
    double recent_ms[kRecentSteps] = {};
    int64_t runs = 0;
    int64_t timed = 0;
    double mean_ms() const;
    void add(double ms, bool timed_run) {
      ++runs;
      if (timed_run) recent_ms[timed++ % kRecentSteps] = ms;
    }
  };
  const ScheduleTimes& parallel_times() const { return parallel_; }
  const ScheduleTimes& serial_times() const { return serial_; }
  // What the process has learned of the machine, shared by every program: the parallel /
  // one-thread ratio of mean step times of the last program that timed both (0: none), its age
  // (s; -1: none), and the one-thread time (ms) that programs relying on it have run since it
  // was learned. Where it says the machine is busy, a new program relies on it instead of
  // opening with parallel steps, until that shared time reaches 32 of its estimated parallel
  // steps; the program running then tries them and writes the verdict anew (see run()).
  struct MachineVerdict {
    double parallel_over_serial;
    double age_s;
    double reliant_ms;
  };
  static MachineVerdict machine_verdict();
  // Sets the verdict as if learned age_s seconds ago (ratio 0: none), nothing run on it yet;
  // both >= 0, else std::invalid_argument.
  static void set_machine_verdict(double parallel_over_serial, double age_s);
  // Threads of the last run (1 when it took the one-thread schedule; 0 before the first run):
  // what the caller's own work around the step (a decoder's head) had better use too.
  int last_run_threads() const { return last_run_threads_; }

  // Per-operation times of the runs made while profiling is on (off by default; turning it on
  // clears what was recorded, turning it off keeps it). A one-thread run times each operation on its own. A parallel run
  // has only thread 0's clock at each barrier: the time from the previous barrier to the one
  // after an operation goes to that operation, so the operations of a group that shares a
  // barrier (q, k and v; gate and up; a prologue and its matmuls) read 0 but the last, which
  // carries the group. Off, a run reads no clock per operation.
  void set_profiling(bool on);
  bool profiling() const { return profiling_; }
  struct OpProfile {
    const char* kind;  // "qmatmul", "rms_norm", "silu_mul", "hadamard", "attention",
                       // "embedding"
    int64_t n, k, bits;  // a matmul's (0 for the others)
    double serial_ms, parallel_ms;  // summed over the profiled runs of each schedule
    // whether a parallel run's threads wait for each other after it (Op::barrier_after): the
    // operations since the previous such one form the group whose time this one carries
    bool barrier_after;
  };
  std::vector<OpProfile> profile() const;  // one per operation, in order
  int64_t profiled_serial_runs() const { return profiled_runs_[0]; }
  int64_t profiled_parallel_runs() const { return profiled_runs_[1]; }

 private:
  enum class Kind { kQMatmul, kRmsNorm, kSiluMul, kHadamard, kAttention, kEmbedding };
  struct Op {
    Kind kind;
    size_t index;  // into the vector of its kind
    // whether the threads of a parallel run wait for each other after it: not between
    // consecutive matmuls that neither read nor write what the other writes (q, k and v; gate
    // and up), whose slices the threads then take in one go; nor after a prologue (below)
    bool barrier_after = true;
    // A matmul's prologue: the RMS norm or SiLU-multiply right before its group of matmuls,
    // whose output they read (ops_ index; -1: none). A parallel run has every thread compute
    // the prologue, the first into its output buffer and each other one into a scratch copy
    // that its slices then read (reads_prologue: x lies within the prologue's output), so that
    // no thread waits for one thread's small operation at a barrier.
    int64_t prologue = -1;
    bool reads_prologue = false;
  };
  std::vector<Op> ops_;
  std::vector<QMatmulArgs> qmatmuls_;
  std::vector<std::string> isas_;
  std::vector<RmsNormArgs> norms_;
  std::vector<SiluMulArgs> silu_muls_;
  std::vector<HadamardArgs> hadamards_;
  std::vector<AttentionStepArgs> attentions_;
  std::vector<EmbeddingArgs> embeddings_;
  const StepKernels* kernels_;  // of the operations but the matmuls
  int64_t max_positions_ = -1;  // the smallest of the attentions' (-1: none)
  size_t prologue_bytes_ = 0;   // the largest prologue output (a thread's scratch copy)
  ScheduleTimes parallel_, serial_;
  double ms_since_probe_ = 0;  // time spent in the chosen schedule since the other was tried
  int probe_steps_left_ = 0;   // steps the schedule being tried still takes
  int last_schedule_ = -1;     // of the last adaptive run: 1 parallel, 0 one thread, -1 none
  int last_run_threads_ = 0;
  bool profiling_ = false;
  std::vector<double> op_ms_[2];   // per operation: one-thread, parallel (set_profiling)
  int64_t profiled_runs_[2] = {0, 0};

  void run_small(const Op& op, int64_t position);  // a non-matmul operation, this thread
  // a prologue's (Op::prologue) output buffer; the prologue into `out`, laid out as that one
  const void* prologue_output(const Op& op) const;
  void run_prologue_into(const Op& op, void* out) const;
  // where matmul `op` may join the group after a prologue (see the .cpp)
  void join_prologue(Op& op, const QMatmulArgs& a);
  // the attention of op at this position, on one thread
  AttentionStepArgs attention_at(const Op& op, int64_t position) const;
  void run_serial(int64_t position);
  void run_parallel(int64_t position, int threads);
};

}  // namespace cpu
}  // namespace pyengine
