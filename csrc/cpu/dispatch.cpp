// Run-time choice of the CPU kernel build: the widest instruction set that both this binary was
// built with and the running CPU supports.
#include <cstdlib>
#include <cstring>
#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif
#include <string>
#include <vector>

#include "cpu/decode_ops.h"
#include "cpu/qmatmul.h"
#include "cpu/quant_ops.h"

namespace pyengine {
namespace cpu {

namespace {

using KernelFn = void (*)(const QMatmulArgs&);
using PlaneKernelFn = void (*)(const PlaneMatmulArgs&);

// One instruction-set build: its canonical and plane-layout kernels, GPTQ's column loop, the clip
// search's errors and a decode step's small operations (the Walsh-Hadamard transform among them).
struct Build {
  KernelFn fn;
  bool (*rows8_fn)(const QMatmulArgs&);  // whether the interleaved decode kernel serves a call
  PlaneKernelFn plane_fn;
  GptqColumnsFn gptq_fn;
  ClipErrorsFn clip_fn;
  StepKernels step;
  const char* name;
};

#define PYENGINE_BUILD(isa)                                                                     \
  Build {                                                                                       \
    &isa::qmatmul, &isa::rows8_native, &isa::plane_matmul, &isa::gptq_columns,                  \
        &isa::clip_errors,                                                                      \
        StepKernels{&isa::rms_norm, &isa::silu_mul, &isa::hadamard, &isa::attention_step,       \
                    &isa::attention_step_tasks},                                                \
        #isa                                                                                    \
  }

bool cpu_has(const std::string& isa) {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (isa == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (isa == "avx2")
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
#endif
  return isa == "generic";
}

bool vnni_usable() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool usable = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl");
  }();
  return usable;
#else
  return false;
#endif
}

// Whether this CPU, given that it runs the AVX-512 build, runs 512-bit operations at full width:
// it is not AMD family 0x19 (Zen 4: 512-bit operations as two 256-bit halves; Zen 3, the same
// family, has no AVX-512).
bool zmm_full_width() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool full = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx)) return true;
    char vendor[13] = {};
    std::memcpy(vendor, &ebx, 4);
    std::memcpy(vendor + 4, &edx, 4);
    std::memcpy(vendor + 8, &ecx, 4);
    if (std::strcmp(vendor, "AuthenticAMD") != 0) return true;
    if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return true;
    const unsigned base = (eax >> 8) & 0xF;
    const unsigned family = base == 0xF ? base + ((eax >> 20) & 0xFF) : base;
    return family != 0x19;
  }();
  return full;
#else
  return false;
#endif
}

}  // namespace

bool zmm_rows_enabled() {
  static const bool avx512 = cpu_has("avx512");
  if (!avx512) return false;
  const char* env = std::getenv("PYENGINE_CPU_ZMM");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  if (env != nullptr && std::strcmp(env, "1") == 0) return true;
  return zmm_full_width();
}

bool vector_pairs_enabled() {
  const char* env = std::getenv("PYENGINE_CPU_VECTOR_PAIRS");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

bool prefetch_enabled() {
  const char* env = std::getenv("PYENGINE_CPU_PREFETCH");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

bool vnni_enabled() {
  if (!vnni_usable()) return false;
  // read at every 8-bit int8-activation call: no allocation, one environment lookup
  const char* env = std::getenv("PYENGINE_CPU_VNNI");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

namespace {

// The builds compiled into this binary, widest first.
const std::vector<Build>& compiled() {
  static const std::vector<Build> builds = {
#if defined(PYENGINE_HAVE_ISA_avx512)
      PYENGINE_BUILD(avx512),
#endif
#if defined(PYENGINE_HAVE_ISA_avx2)
      PYENGINE_BUILD(avx2),
#endif
      PYENGINE_BUILD(generic),
  };
  return builds;
}

const Build& selected() {
  static const Build best = [] {
    for (const Build& b : compiled())
      if (cpu_has(b.name)) return b;
    return PYENGINE_BUILD(generic);
  }();
  return best;
}

// The build named `isa`; raises std::invalid_argument (naming `op`) if this binary lacks it or
// the CPU cannot run it.
const Build& build_named(const std::string& isa, const char* op) {
  for (const Build& b : compiled()) {
    if (isa != b.name) continue;
    if (!cpu_has(isa))
      throw std::invalid_argument(std::string(op) + ": this CPU cannot run the " + isa +
                                  " kernels");
    return b;
  }
  throw std::invalid_argument(std::string(op) + ": no kernels for instruction set '" + isa +
                              "' in this build");
}

}  // namespace

void qmatmul(const QMatmulArgs& args) {
  check_qmatmul_args("qmatmul_cpu", args);
  selected().fn(args);
}

void qmatmul_with_isa(const QMatmulArgs& args, const std::string& isa) {
  check_qmatmul_args("qmatmul_cpu", args);
  build_named(isa, "qmatmul_cpu").fn(args);
}

void plane_matmul(const PlaneMatmulArgs& args) {
  check_plane_matmul_args("plane_matmul_cpu", args);
  selected().plane_fn(args);
}

void plane_matmul_with_isa(const PlaneMatmulArgs& args, const std::string& isa) {
  check_plane_matmul_args("plane_matmul_cpu", args);
  build_named(isa, "plane_matmul_cpu").plane_fn(args);
}

const StepKernels& step_kernels(const std::string& isa, const char* op) {
  return isa.empty() ? selected().step : build_named(isa, op).step;
}

GptqColumnsFn gptq_columns_fn(const std::string& isa) {
  return isa.empty() ? selected().gptq_fn : build_named(isa, "gptq_columns_cpu").gptq_fn;
}

void gptq_columns(const GptqColumnsArgs& a) {
  const char* op = "gptq_columns_cpu";
  if (!a.w || !a.h_inv || !a.err || !a.codes || !a.code_row || !a.scales || !a.zeros ||
      !a.group)
    throw std::invalid_argument(std::string(op) + ": null pointer");
  if (a.n < 1 || a.rows < 1 || a.start < 0 || a.start > a.stop || a.stop > a.rows ||
      a.ldw < a.n || a.lde < a.n || a.ldc < a.n || a.lds < a.n || a.ldh < a.rows)
    throw std::invalid_argument(std::string(op) + ": bad sizes or strides");
  if (a.maxq < 1 || a.maxq > 255)
    throw std::invalid_argument(std::string(op) + ": maxq must be in [1, 255], got " +
                                std::to_string(a.maxq));
  gptq_columns_fn(a.isa ? a.isa : "")(a);
}

ClipErrorsFn clip_errors_fn(const std::string& isa) {
  return isa.empty() ? selected().clip_fn : build_named(isa, "clip_errors_cpu").clip_fn;
}

void clip_errors(const ClipErrorsArgs& a) {
  const char* op = "clip_errors_cpu";
  if (!a.w || !a.cost || !a.scales || !a.zeros || !a.err)
    throw std::invalid_argument(std::string(op) + ": null pointer");
  if (a.candidates < 0 || a.rows < 0 || a.groups < 1 || a.group_size < 1)
    throw std::invalid_argument(std::string(op) + ": bad sizes");
  if (a.maxq < 1 || a.maxq > 255)
    throw std::invalid_argument(std::string(op) + ": maxq must be in [1, 255], got " +
                                std::to_string(a.maxq));
  clip_errors_fn(a.isa ? a.isa : "")(a);
}

std::vector<std::string> usable_isas() {
  std::vector<std::string> names;
  for (const Build& b : compiled())
    if (cpu_has(b.name)) names.push_back(b.name);
  return names;
}

const char* selected_isa() { return selected().name; }

std::vector<int> interleaved_bits(const std::string& isa) {
  const Build& build = build_named(isa, "interleaved_bits");
  QMatmulArgs decode{};  // a decode call (M = 1, int8 activations) on interleaved rows
  decode.M = 1;
  decode.act_bits = 8;
  decode.interleave = kInterleaveRows;
  std::vector<int> bits;
  for (int b : {2, 3, 4, 8}) {
    decode.bits = b;
    if (build.rows8_fn(decode)) bits.push_back(b);
  }
  return bits;
}

}  // namespace cpu
}  // namespace pyengine
