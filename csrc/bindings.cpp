// pyengine._C: the one pybind11 module. Torch-free: every kernel takes raw pointers (integers),
// sizes, strides, dtype codes and, for CUDA, a device index and a stream handle. The Python side
// (pyengine/backends/*.py) validates tensors before it hands their pointers over.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <sstream>
#include <string>
#include <vector>

#include "code_bits.h"
#include "common.h"
#include "kernel_args.h"
#include "cpu/decode_ops.h"
#include "cpu/mma_emulate.h"
#include "cpu/qmatmul.h"
#include "cpu/quant_ops.h"
#if defined(PYENGINE_WITH_CUDA)
#include "cuda/qmatmul.h"
#endif

namespace py = pybind11;
using pyengine::PlaneMatmulArgs;
using pyengine::QMatmulArgs;

namespace {

std::vector<std::string> split_commas(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ','))
    if (!item.empty()) out.push_back(item);
  return out;
}

// The argument lists of the kernels (csrc/kernel_args.h) as pybind11 arguments:
// `py::arg("x"), py::arg("x_dtype"), ...`.
#define PYENGINE_PY_ARG_(type, name) , py::arg(#name)
#define PYENGINE_PY_ARGS(LIST) PYENGINE_DROP_FIRST(LIST(PYENGINE_PY_ARG_))

// A list's names as a Python tuple (exported as pyengine._C.<LIST>_NAMES).
#define PYENGINE_NAMES_TUPLE(LIST) py::make_tuple(PYENGINE_ARG_STRINGS(LIST))

// qmatmul_cpu on `isa` ("" for the widest this CPU runs).
void run_qmatmul(const QMatmulArgs& a, const std::string& isa) {
  if (isa.empty())
    pyengine::cpu::qmatmul(a);
  else
    pyengine::cpu::qmatmul_with_isa(a, isa);
}

// A qmatmul_cpu call with everything but the activations and the output bound once: weight,
// bias, dtypes, sizes, layout and instruction set (a prepared kernel call,
// pyengine.backends.cpu.CpuBackend.bind). A call then passes two pointers, two row strides, M
// and the thread count instead of qmatmul_cpu's 24 arguments; a StepProgram records it the same
// way (StepProgram.add_call).
struct QMatmulCall {
  QMatmulArgs args;  // x, ldx, out, ldo, M and accumulate are set per call
  std::string isa;

  QMatmulArgs at(PYENGINE_ARG_PARAMS(PYENGINE_QMATMUL_PER_CALL_ARGS)) const {
    QMatmulArgs a = args;
    PYENGINE_SET_ARGS(PYENGINE_QMATMUL_PER_CALL_ARGS, a);
    return a;
  }
};

// A pybind11 class registers per shared object; this very file loaded again under another
// name (an A/B of two builds in one process, benchmarks/ab_cpu_kernels.py) reuses the type it
// registered the first time. True when T was registered already (and is now bound as `name`).
template <class T>
bool bind_registered_type(py::module_& m, const char* name) {
  auto* known = py::detail::get_local_type_info(typeid(T));
  if (known) m.attr(name) = py::handle(reinterpret_cast<PyObject*>(known->type));
  return known != nullptr;
}

void check_step_dtype(const char* op, int d) {
  if (d != pyengine::kFloat32 && d != pyengine::kFloat16 && d != pyengine::kBFloat16)
    throw std::invalid_argument(std::string(op) + ": unsupported dtype code " + std::to_string(d));
}

// The checked arguments of the decode-step operations (csrc/cpu/decode_ops.h), shared by the
// one-call functions and StepProgram.
pyengine::cpu::RmsNormArgs rms_norm_args(uintptr_t x, int x_dtype, int64_t ldx, uintptr_t w,
                                         int w_dtype, uintptr_t out, int out_dtype, int64_t ldo,
                                         int64_t rows, int64_t dim, double eps) {
  for (int d : {x_dtype, w_dtype, out_dtype}) check_step_dtype("rms_norm_cpu", d);
  if (rows < 0 || dim < 1 || ldx < dim || ldo < dim || !x || !w || !out)
    throw std::invalid_argument("rms_norm_cpu: bad sizes, strides or pointers");
  pyengine::cpu::RmsNormArgs a;
  a.x = reinterpret_cast<const void*>(x); a.x_dtype = x_dtype; a.ldx = ldx;
  a.w = reinterpret_cast<const void*>(w); a.w_dtype = w_dtype;
  a.out = reinterpret_cast<void*>(out); a.out_dtype = out_dtype; a.ldo = ldo;
  a.rows = rows; a.dim = dim; a.eps = static_cast<float>(eps);
  return a;
}

pyengine::cpu::SiluMulArgs silu_mul_args(uintptr_t gate_up, int64_t ld_in, uintptr_t out,
                                         int64_t ld_out, int dtype, int64_t rows,
                                         int64_t width) {
  check_step_dtype("silu_mul_cpu", dtype);
  if (rows < 0 || width < 1 || ld_in < 2 * width || ld_out < width || !gate_up || !out)
    throw std::invalid_argument("silu_mul_cpu: bad sizes, strides or pointers");
  pyengine::cpu::SiluMulArgs a;
  a.gate_up = reinterpret_cast<const void*>(gate_up); a.ld_in = ld_in;
  a.out = reinterpret_cast<void*>(out); a.ld_out = ld_out; a.dtype = dtype;
  a.rows = rows; a.width = width;
  return a;
}

pyengine::cpu::HadamardArgs hadamard_args(uintptr_t x, int64_t ldx, uintptr_t out, int64_t ldo,
                                          int dtype, int64_t rows, int64_t n, int64_t block,
                                          int threads) {
  check_step_dtype("hadamard_cpu", dtype);
  if (rows < 0 || n < 1 || ldx < n || ldo < n || !x || !out)
    throw std::invalid_argument("hadamard_cpu: bad sizes, strides or pointers");
  if (block < 1 || (block & (block - 1)) != 0 || n % block != 0)
    throw std::invalid_argument("hadamard_cpu: block must be a power of two dividing n, got " +
                                std::to_string(block) + " for n = " + std::to_string(n));
  pyengine::cpu::HadamardArgs a;
  a.x = reinterpret_cast<const void*>(x); a.ldx = ldx;
  a.out = reinterpret_cast<void*>(out); a.ldo = ldo; a.dtype = dtype;
  a.rows = rows; a.n = n; a.block = block; a.num_threads = threads < 1 ? 1 : threads;
  return a;
}

// positions: how many cache positions the step reads (position + 1 for one call; the cache
// length for a StepProgram, whose position comes with each run).
pyengine::cpu::AttentionStepArgs attention_args(
    uintptr_t qkv, int64_t ld_qkv, uintptr_t k_cache, uintptr_t v_cache,
    int64_t cache_batch_stride, int64_t cache_head_stride, uintptr_t cos, uintptr_t signed_sin,
    uintptr_t q_norm, uintptr_t k_norm, int norm_dtype, double norm_eps, uintptr_t out,
    int64_t ld_out, int dtype, int64_t batch, int64_t n_heads, int64_t n_kv_heads,
    int64_t head_dim, int64_t positions, double scale) {
  check_step_dtype("attention_step_cpu", dtype);
  check_step_dtype("attention_step_cpu", norm_dtype);
  if (head_dim < 2 || head_dim > 1024 || head_dim % 2 || n_kv_heads < 1 ||
      n_heads % n_kv_heads || batch < 0 || positions < 1)
    throw std::invalid_argument("attention_step_cpu: bad head counts, head_dim (even, "
                                "<= 1024), batch or position");
  if (ld_qkv < (n_heads + 2 * n_kv_heads) * head_dim || ld_out < n_heads * head_dim ||
      cache_head_stride < positions * head_dim ||
      cache_batch_stride < n_kv_heads * cache_head_stride || !qkv || !k_cache || !v_cache ||
      !cos || !signed_sin || !out || ((q_norm == 0) != (k_norm == 0)))
    throw std::invalid_argument("attention_step_cpu: bad strides or pointers");
  pyengine::cpu::AttentionStepArgs a;
  a.qkv = reinterpret_cast<const void*>(qkv); a.ld_qkv = ld_qkv;
  a.k_cache = reinterpret_cast<void*>(k_cache); a.v_cache = reinterpret_cast<void*>(v_cache);
  a.cache_batch_stride = cache_batch_stride; a.cache_head_stride = cache_head_stride;
  a.cos = reinterpret_cast<const void*>(cos);
  a.signed_sin = reinterpret_cast<const void*>(signed_sin);
  a.q_norm = reinterpret_cast<const void*>(q_norm);
  a.k_norm = reinterpret_cast<const void*>(k_norm);
  a.norm_dtype = norm_dtype; a.norm_eps = static_cast<float>(norm_eps);
  a.out = reinterpret_cast<void*>(out); a.ld_out = ld_out; a.dtype = dtype;
  a.batch = batch; a.n_heads = n_heads; a.n_kv_heads = n_kv_heads; a.head_dim = head_dim;
  a.scale = static_cast<float>(scale);
  return a;
}

pyengine::cpu::EmbeddingArgs embedding_args(uintptr_t ids, int64_t rows, uintptr_t qweight,
                                            int64_t ldq, uintptr_t scales, uintptr_t zeros,
                                            int64_t lds, int sz_dtype, int bits,
                                            int64_t group_size, int64_t vocab, int64_t dim,
                                            uintptr_t out, int out_dtype, int64_t ldo,
                                            int round_dtype) {
  pyengine::cpu::EmbeddingArgs a;
  a.ids = reinterpret_cast<const int64_t*>(ids); a.rows = rows;
  a.qweight = reinterpret_cast<const uint32_t*>(qweight); a.ldq = ldq;
  a.scales = reinterpret_cast<const void*>(scales);
  a.zeros = reinterpret_cast<const void*>(zeros); a.lds = lds; a.sz_dtype = sz_dtype;
  a.bits = bits; a.group_size = group_size; a.vocab = vocab; a.dim = dim;
  a.out = reinterpret_cast<void*>(out); a.out_dtype = out_dtype; a.ldo = ldo;
  a.round_dtype = round_dtype;
  return a;  // checked by embedding_rows / StepProgram::add_embedding
}

#define PYENGINE_EMBEDDING_PY_ARGS                                                            \
  py::arg("ids"), py::arg("rows"), py::arg("qweight"), py::arg("ldq"), py::arg("scales"),     \
      py::arg("zeros"), py::arg("lds"), py::arg("sz_dtype"), py::arg("bits"),                 \
      py::arg("group_size"), py::arg("vocab"), py::arg("dim"), py::arg("out"),                \
      py::arg("out_dtype"), py::arg("ldo"), py::arg("round_dtype")

// The 32 slice codes of one packing block (code_bits.h): the host build of the functions the
// CUDA plane kernels run, so that tests check their bit manipulation on the CPU.
std::vector<uint32_t> plane_block_codes(const std::vector<uint32_t>& hi,
                                        const std::vector<uint32_t>& mid,
                                        const std::vector<uint32_t>& lo, int precision) {
  if (hi.size() != 3 || mid.size() != 2 || lo.size() != 3)
    throw std::invalid_argument("plane_block_codes: one block is 3 words of plane_hi, 2 of "
                                "plane_mid and 3 of plane_lo");
  std::vector<uint32_t> codes(32);
  for (int j = 0; j < 32; ++j) {
    switch (precision) {
      case 2: codes[j] = pyengine::slice_code<2>(hi.data(), mid.data(), lo.data(), j); break;
      case 3: codes[j] = pyengine::slice_code<3>(hi.data(), mid.data(), lo.data(), j); break;
      case 4: codes[j] = pyengine::slice_code<4>(hi.data(), mid.data(), lo.data(), j); break;
      case 6: codes[j] = pyengine::slice_code<6>(hi.data(), mid.data(), lo.data(), j); break;
      case 8: codes[j] = pyengine::slice_code<8>(hi.data(), mid.data(), lo.data(), j); break;
      default: throw std::invalid_argument("plane_block_codes: precision must be 8, 6, 4, 3 or 2");
    }
  }
  return codes;
}

// int2_block_from_hi (code_bits.h) on one block of plane_hi: 3 words of 3-bit fields holding
// the int2 slice codes.
std::vector<uint32_t> plane_int2_block(const std::vector<uint32_t>& hi) {
  if (hi.size() != 3) throw std::invalid_argument("plane_int2_block: a block of plane_hi is 3 words");
  std::vector<uint32_t> out(3);
  pyengine::int2_block_from_hi(hi.data(), out.data());
  return out;
}

// The layout's sizes (csrc/mma_frag.h) for pyengine/backends/cuda_layout.py: per code width
// the mma steps and the words per lane of one iteration, and the sizes shared by every width.
py::dict mma_layout_constants() {
  namespace mm = pyengine::mma;
  py::dict steps, words;
  py::list widths;
  for (int bits : mm::kBitWidths) {
    widths.append(bits);
    steps[py::int_(bits)] = mm::steps_per_iteration(bits);
    words[py::int_(bits)] = mm::words_per_lane(bits);
  }
  py::dict d;
  d["bits"] = py::tuple(widths);
  d["steps"] = steps;
  d["words"] = words;
  d["step_k"] = mm::kStepK;
  d["tile_rows"] = mm::kTileRows;
  d["max_m"] = mm::kMaxM;
  d["frag_tail"] = mm::kFragTail;
  d["one_group_shift"] = mm::kOneGroupShift;
  return d;
}

py::dict build_info() {
  py::dict d;
  d["cpu_kernels"] = true;
  d["cpu_isas"] = split_commas(PYENGINE_CPU_ISAS);
  d["cpu_isa_selected"] = std::string(pyengine::cpu::selected_isa());
  d["cpu_isas_usable"] = pyengine::cpu::usable_isas();
  // per usable build, the code widths its interleaved decode kernel serves (CpuBackend.bind
  // prepares the row-interleaved copy for those)
  py::dict interleaved;
  for (const std::string& isa : pyengine::cpu::usable_isas())
    interleaved[py::str(isa)] = pyengine::cpu::interleaved_bits(isa);
  d["cpu_interleaved_bits"] = interleaved;
  // the AVX-512 build's int8-activation kernels take vpdpbusd (PYENGINE_CPU_VNNI=0: they do not)
  d["cpu_vnni"] = pyengine::cpu::vnni_enabled();
  // the AVX-512 build's interleaved decode kernel takes 512-bit vectors (PYENGINE_CPU_ZMM)
  d["cpu_zmm"] = pyengine::cpu::zmm_rows_enabled();
  // the interleaved decode kernel at M = 1 takes pairs of vectors (PYENGINE_CPU_VECTOR_PAIRS)
  d["cpu_vector_pairs"] = pyengine::cpu::vector_pairs_enabled();
  d["cpu_prefetch"] = pyengine::cpu::prefetch_enabled();
  d["cpu_plane_kernels"] = true;  // plane_matmul_cpu: Matryoshka bit planes read directly
#if defined(PYENGINE_OPENMP)
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
#if defined(PYENGINE_WITH_CUDA)
  d["cuda_kernels"] = true;
  d["cuda_plane_kernels"] = true;  // plane_matmul_cuda
  d["cuda_archs"] = split_commas(PYENGINE_CUDA_ARCHS);
  d["cuda_compiler_version"] = std::string(PYENGINE_CUDA_VERSION);
#else
  d["cuda_kernels"] = false;
  d["cuda_plane_kernels"] = false;
  d["cuda_archs"] = std::vector<std::string>{};
  d["cuda_compiler_version"] = py::none();
#endif
  d["cxx_compiler"] = std::string(__VERSION__);
  d["pybind11_version"] = std::to_string(PYBIND11_VERSION_MAJOR) + "." +
                          std::to_string(PYBIND11_VERSION_MINOR) + "." +
                          std::to_string(PYBIND11_VERSION_PATCH);
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyengine compiled kernels (torch-free: raw pointers, sizes, strides, dtype codes)";

  m.def("build_info", &build_info, "What this extension was built with.");

  // The kernels' positional argument lists (csrc/kernel_args.h), by name, for the Python side
  // that builds them per call (tests/backends/test_native_args.py compares).
  m.attr("QMATMUL_ARG_NAMES") = PYENGINE_NAMES_TUPLE(PYENGINE_QMATMUL_ARGS);
  m.attr("QMATMUL_BOUND_ARG_NAMES") = PYENGINE_NAMES_TUPLE(PYENGINE_QMATMUL_BOUND_ARGS);
  m.attr("QMATMUL_PER_CALL_ARG_NAMES") = PYENGINE_NAMES_TUPLE(PYENGINE_QMATMUL_PER_CALL_ARGS);
  m.attr("PLANE_ARG_NAMES") = PYENGINE_NAMES_TUPLE(PYENGINE_PLANE_ARGS);
  m.attr("MMA_DECODE_ARG_NAMES") = PYENGINE_NAMES_TUPLE(PYENGINE_MMA_DECODE_ARGS);

  m.def(
      "qmatmul_cpu",
      [](PYENGINE_ARG_PARAMS(PYENGINE_QMATMUL_ARGS), int num_threads, const std::string& isa,
         int act_bits, int interleave) {
        QMatmulArgs a;
        PYENGINE_SET_ARGS(PYENGINE_QMATMUL_ARGS, a);
        a.num_threads = num_threads;
        a.act_bits = act_bits;
        a.interleave = interleave;
        py::gil_scoped_release release;
        run_qmatmul(a, isa);
      },
      PYENGINE_PY_ARGS(PYENGINE_QMATMUL_ARGS), py::arg("num_threads") = 0, py::arg("isa") = "",
      py::arg("act_bits") = 0, py::arg("interleave") = 0,
      "out[M, N] (+)= x[M, K] @ dequant(W)[N, K]^T (+ bias) on the CPU; pointers are integers. "
      "act_bits=8: with x quantized to int8 per block of 32 along K first (common.h). "
      "interleave=8: W, scales and zeros in the row-interleaved layout (common.h).");

  m.def(
      "plane_matmul_cpu",
      [](PYENGINE_ARG_PARAMS(PYENGINE_PLANE_ARGS), int num_threads, const std::string& isa) {
        PlaneMatmulArgs a;
        PYENGINE_SET_ARGS(PYENGINE_PLANE_ARGS, a);
        a.num_threads = num_threads;
        py::gil_scoped_release release;
        if (isa.empty())
          pyengine::cpu::plane_matmul(a);
        else
          pyengine::cpu::plane_matmul_with_isa(a, isa);
      },
      PYENGINE_PY_ARGS(PYENGINE_PLANE_ARGS), py::arg("num_threads") = 0, py::arg("isa") = "",
      "out[M, N] = x[M, K] @ W_r[N, K]^T (+ bias) on the CPU, W_r the r-bit slice of a Matryoshka "
      "int8 parent read from its bit planes (only those the slice needs; the others may be 0). "
      "Pointers are integers.");
  // ---- the small operations of a CPU decode step (csrc/cpu/decode_ops.h) ----
  m.def(
      "rms_norm_cpu",
      [](uintptr_t x, int x_dtype, int64_t ldx, uintptr_t w, int w_dtype, uintptr_t out,
         int out_dtype, int64_t ldo, int64_t rows, int64_t dim, double eps,
         const std::string& isa) {
        auto a = rms_norm_args(x, x_dtype, ldx, w, w_dtype, out, out_dtype, ldo, rows, dim, eps);
        a.isa = isa.c_str();
        pyengine::cpu::step_kernels(isa, "rms_norm_cpu");  // raises for a bad isa
        pyengine::cpu::rms_norm(a);
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("ldx"), py::arg("w"), py::arg("w_dtype"),
      py::arg("out"), py::arg("out_dtype"), py::arg("ldo"), py::arg("rows"), py::arg("dim"),
      py::arg("eps"), py::arg("isa") = "",
      "out[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * w (pointers are integers; isa: the "
      "build, \"\" for the best this CPU runs).");
  m.def(
      "silu_mul_cpu",
      [](uintptr_t gate_up, int64_t ld_in, uintptr_t out, int64_t ld_out, int dtype,
         int64_t rows, int64_t width, const std::string& isa) {
        auto a = silu_mul_args(gate_up, ld_in, out, ld_out, dtype, rows, width);
        a.isa = isa.c_str();
        pyengine::cpu::step_kernels(isa, "silu_mul_cpu");  // raises for a bad isa
        pyengine::cpu::silu_mul(a);
      },
      py::arg("gate_up"), py::arg("ld_in"), py::arg("out"), py::arg("ld_out"), py::arg("dtype"),
      py::arg("rows"), py::arg("width"), py::arg("isa") = "",
      "out[r, i] = silu(gate_up[r, i]) * gate_up[r, width + i] (pointers are integers; isa: "
      "the build, \"\" for the best this CPU runs).");
  m.def(
      "hadamard_cpu",
      [](uintptr_t x, int64_t ldx, uintptr_t out, int64_t ldo, int dtype, int64_t rows,
         int64_t n, int64_t block, int threads, const std::string& isa) {
        auto a = hadamard_args(x, ldx, out, ldo, dtype, rows, n, block, threads);
        a.isa = isa.c_str();
        pyengine::cpu::step_kernels(isa, "hadamard_cpu");  // raises for a bad isa
        py::gil_scoped_release release;
        pyengine::cpu::hadamard(a);
      },
      py::arg("x"), py::arg("ldx"), py::arg("out"), py::arg("ldo"), py::arg("dtype"),
      py::arg("rows"), py::arg("n"), py::arg("block"), py::arg("threads") = 1,
      py::arg("isa") = "",
      "out[r, :n] = the orthonormal Walsh-Hadamard transform of each block of `block` elements "
      "of x[r, :n] (pointers are integers; in place allowed; rows over up to `threads` threads; "
      "isa: the build, \"\" for the best this CPU runs).");
  m.def(
      "gptq_columns_cpu",
      [](uintptr_t w, int64_t ldw, uintptr_t h_inv, int64_t ldh, uintptr_t err, int64_t lde,
         uintptr_t codes, int64_t ldc, uintptr_t code_row, uintptr_t scales, uintptr_t zeros,
         int64_t lds, uintptr_t group, int64_t start, int64_t stop, int64_t rows, int64_t n,
         int maxq, int threads, const std::string& isa) {
        pyengine::cpu::GptqColumnsArgs a;
        a.w = reinterpret_cast<float*>(w); a.ldw = ldw;
        a.h_inv = reinterpret_cast<const float*>(h_inv); a.ldh = ldh;
        a.err = reinterpret_cast<float*>(err); a.lde = lde;
        a.codes = reinterpret_cast<uint8_t*>(codes); a.ldc = ldc;
        a.code_row = reinterpret_cast<const int64_t*>(code_row);
        a.scales = reinterpret_cast<const float*>(scales);
        a.zeros = reinterpret_cast<const float*>(zeros); a.lds = lds;
        a.group = reinterpret_cast<const int64_t*>(group);
        a.start = start; a.stop = stop; a.rows = rows; a.n = n; a.maxq = maxq;
        a.num_threads = threads < 1 ? 1 : threads;
        a.isa = isa.c_str();
        pyengine::cpu::gptq_columns_fn(isa);  // an unknown or unusable isa raises here
        py::gil_scoped_release release;
        pyengine::cpu::gptq_columns(a);
      },
      py::arg("w"), py::arg("ldw"), py::arg("h_inv"), py::arg("ldh"), py::arg("err"),
      py::arg("lde"), py::arg("codes"), py::arg("ldc"), py::arg("code_row"), py::arg("scales"),
      py::arg("zeros"), py::arg("lds"), py::arg("group"), py::arg("start"), py::arg("stop"),
      py::arg("rows"), py::arg("n"), py::arg("maxq"), py::arg("threads") = 1,
      py::arg("isa") = "",
      "GPTQ's column loop over columns [start, stop) of a transposed fp32 block "
      "(csrc/cpu/quant_ops.h; pointers are integers; code_row and group are int64; output rows "
      "over up to `threads` threads; isa: the build, \"\" for the best this CPU runs).");
  m.def(
      "clip_errors_cpu",
      [](uintptr_t w, uintptr_t cost, uintptr_t scales, uintptr_t zeros, uintptr_t err,
         int64_t candidates, int64_t rows, int64_t groups, int64_t group_size, int maxq,
         int threads, const std::string& isa) {
        pyengine::cpu::ClipErrorsArgs a;
        a.w = reinterpret_cast<const float*>(w);
        a.cost = reinterpret_cast<const float*>(cost);
        a.scales = reinterpret_cast<const float*>(scales);
        a.zeros = reinterpret_cast<const float*>(zeros);
        a.err = reinterpret_cast<float*>(err);
        a.candidates = candidates; a.rows = rows; a.groups = groups; a.group_size = group_size;
        a.maxq = maxq; a.num_threads = threads < 1 ? 1 : threads;
        a.isa = isa.c_str();
        pyengine::cpu::clip_errors_fn(isa);  // an unknown or unusable isa raises here
        py::gil_scoped_release release;
        pyengine::cpu::clip_errors(a);
      },
      py::arg("w"), py::arg("cost"), py::arg("scales"), py::arg("zeros"), py::arg("err"),
      py::arg("candidates"), py::arg("rows"), py::arg("groups"), py::arg("group_size"),
      py::arg("maxq"), py::arg("threads") = 1, py::arg("isa") = "",
      "The clip search's weighed error of every candidate scale and zero of every group "
      "(csrc/cpu/quant_ops.h; fp32 contiguous, pointers are integers; groups over up to "
      "`threads` threads; isa: the build, \"\" for the best this CPU runs).");
  m.def(
      "embedding_rows_cpu",
      [](uintptr_t ids, int64_t rows, uintptr_t qweight, int64_t ldq, uintptr_t scales,
         uintptr_t zeros, int64_t lds, int sz_dtype, int bits, int64_t group_size,
         int64_t vocab, int64_t dim, uintptr_t out, int out_dtype, int64_t ldo,
         int round_dtype) {
        const pyengine::cpu::EmbeddingArgs a =
            embedding_args(ids, rows, qweight, ldq, scales, zeros, lds, sz_dtype, bits,
                           group_size, vocab, dim, out, out_dtype, ldo, round_dtype);
        py::gil_scoped_release release;
        pyengine::cpu::embedding_rows(a);
      },
      PYENGINE_EMBEDDING_PY_ARGS,
      "out[r, :dim] = the dequantized rows ids[r] (int64, r < rows) of a packed table in the "
      "canonical layout (qweight [vocab, ldq] words, scales / zeros [vocab, lds] of sz_dtype, "
      "zeros 0 for symmetric; group_size <= 0: one group per row), computed in float32, "
      "rounded to round_dtype (the table's output dtype) and stored in out_dtype; an id outside "
      "[0, vocab) raises IndexError before anything is written (csrc/cpu/decode_ops.h).");
  m.def(
      "attention_step_cpu",
      [](uintptr_t qkv, int64_t ld_qkv, uintptr_t k_cache, uintptr_t v_cache,
         int64_t cache_batch_stride, int64_t cache_head_stride, uintptr_t cos,
         uintptr_t signed_sin, uintptr_t q_norm, uintptr_t k_norm, int norm_dtype,
         double norm_eps, uintptr_t out, int64_t ld_out, int dtype, int64_t batch,
         int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, int64_t position, double scale,
         int num_threads, const std::string& isa) {
        pyengine::cpu::AttentionStepArgs a = attention_args(
            qkv, ld_qkv, k_cache, v_cache, cache_batch_stride, cache_head_stride, cos,
            signed_sin, q_norm, k_norm, norm_dtype, norm_eps, out, ld_out, dtype, batch, n_heads,
            n_kv_heads, head_dim, position + 1, scale);
        a.position = position;
        a.num_threads = num_threads < 1 ? 1 : num_threads;
        a.isa = isa.c_str();
        pyengine::cpu::step_kernels(isa, "attention_step_cpu");  // raises for a bad isa
        py::gil_scoped_release release;
        pyengine::cpu::attention_step(a);
      },
      py::arg("qkv"), py::arg("ld_qkv"), py::arg("k_cache"), py::arg("v_cache"),
      py::arg("cache_batch_stride"), py::arg("cache_head_stride"), py::arg("cos"),
      py::arg("signed_sin"), py::arg("q_norm"), py::arg("k_norm"), py::arg("norm_dtype"),
      py::arg("norm_eps"), py::arg("out"), py::arg("ld_out"), py::arg("dtype"), py::arg("batch"),
      py::arg("n_heads"), py::arg("n_kv_heads"), py::arg("head_dim"), py::arg("position"),
      py::arg("scale"), py::arg("num_threads"), py::arg("isa") = "",
      "One decode position of attention on the CPU: rope (and optional per-head q/k norms), "
      "KV-cache append at `position`, softmax(q K^T * scale) V over positions 0..position "
      "(grouped-query heads). Pointers are integers; see csrc/cpu/decode_ops.h.");
  // The classes are module_local: another build of this module loaded into the same process
  // (an A/B of two builds, benchmarks/ab_cpu_kernels.py) registers types of its own
  // (bind_registered_type: this very file loaded twice reuses its first registration).
  if (!bind_registered_type<QMatmulCall>(m, "QMatmulCall")) {
    py::class_<QMatmulCall>(
        m, "QMatmulCall", py::module_local(),
        "qmatmul_cpu with the weight, bias, dtypes, sizes, layout and instruction set bound once "
        "(the arguments of qmatmul_cpu but x, ldx, out, ldo, accumulate and M); call it with "
        "those (pointers as integers) and the thread count. With interleave=8, canonical_*: the "
        "same weight in the canonical layout (qweight, ldq, scales, zeros, lds), read by the "
        "calls the interleaved kernel does not serve (otherwise each converts the rows back).")
        .def(py::init([](PYENGINE_ARG_PARAMS(PYENGINE_QMATMUL_BOUND_ARGS),
                         const std::string& isa, int act_bits, int interleave,
                         uintptr_t canonical_qweight, int64_t canonical_ldq,
                         uintptr_t canonical_scales, uintptr_t canonical_zeros,
                         int64_t canonical_lds) {
               QMatmulCall c;
               PYENGINE_SET_ARGS(PYENGINE_QMATMUL_BOUND_ARGS, c.args);
               c.args.ldx = K;  // x, out and M come with each call: strides that pass the checks
               c.args.ldo = N;
               c.args.act_bits = act_bits;
               c.args.interleave = interleave;
               QMatmulArgs::CanonicalRows& rows = c.args.canonical;
               pyengine::set_arg(rows.qweight, canonical_qweight);
               rows.ldq = canonical_ldq;
               pyengine::set_arg(rows.scales, canonical_scales);
               pyengine::set_arg(rows.zeros, canonical_zeros);
               rows.lds = canonical_lds;
               c.isa = isa;
               pyengine::check_qmatmul_args("QMatmulCall", c.args);  // M = 0: no pointer read
               return c;
             }),
             PYENGINE_PY_ARGS(PYENGINE_QMATMUL_BOUND_ARGS), py::arg("isa") = "",
             py::arg("act_bits") = 0, py::arg("interleave") = 0,
             py::arg("canonical_qweight") = 0, py::arg("canonical_ldq") = 0,
             py::arg("canonical_scales") = 0, py::arg("canonical_zeros") = 0,
             py::arg("canonical_lds") = 0)
        .def_property_readonly(
            "isa", [](const QMatmulCall& c) { return c.isa; },
            "The instruction-set build the call runs on (\"\": the best this CPU runs).")
        .def(
            "__call__",
            [](const QMatmulCall& c, PYENGINE_ARG_PARAMS(PYENGINE_QMATMUL_PER_CALL_ARGS),
               int num_threads) {
              QMatmulArgs a = c.at(PYENGINE_ARG_NAMES(PYENGINE_QMATMUL_PER_CALL_ARGS));
              a.num_threads = num_threads;
              py::gil_scoped_release release;
              run_qmatmul(a, c.isa);
            },
            PYENGINE_PY_ARGS(PYENGINE_QMATMUL_PER_CALL_ARGS), py::arg("num_threads") = 0,
            "out[M, N] (+)= x[M, K] @ dequant(W)^T (+ bias), as qmatmul_cpu.");
  }
  if (!bind_registered_type<pyengine::cpu::StepProgram>(m, "StepProgram")) {
    py::class_<pyengine::cpu::StepProgram>(
        m, "StepProgram", py::module_local(),
        "A CPU decode step as a list of operations on fixed buffers, run in order by one call "
        "(csrc/cpu/decode_ops.h). add_call takes a QMatmulCall and its per-call arguments; the "
        "other add_* methods take the arguments of rms_norm_cpu, silu_mul_cpu and "
        "attention_step_cpu (threads and position: per run). isa: the build of every operation "
        "but the matmuls (\"\" for the best this CPU runs; a matmul runs on its call's).")
        .def(py::init<const std::string&>(), py::arg("isa") = "")
        .def("add_call",
             [](pyengine::cpu::StepProgram& p, const QMatmulCall& c,
                PYENGINE_ARG_PARAMS(PYENGINE_QMATMUL_PER_CALL_ARGS)) {
               p.add_qmatmul(c.at(PYENGINE_ARG_NAMES(PYENGINE_QMATMUL_PER_CALL_ARGS)), c.isa);
             },
             py::arg("call"), PYENGINE_PY_ARGS(PYENGINE_QMATMUL_PER_CALL_ARGS))
        .def("add_rms_norm",
             [](pyengine::cpu::StepProgram& p, uintptr_t x, int x_dtype, int64_t ldx, uintptr_t w,
                int w_dtype, uintptr_t out, int out_dtype, int64_t ldo, int64_t rows, int64_t dim,
                double eps) {
               p.add_rms_norm(
                   rms_norm_args(x, x_dtype, ldx, w, w_dtype, out, out_dtype, ldo, rows, dim, eps));
             })
        .def("add_silu_mul",
             [](pyengine::cpu::StepProgram& p, uintptr_t gate_up, int64_t ld_in, uintptr_t out,
                int64_t ld_out, int dtype, int64_t rows, int64_t width) {
               p.add_silu_mul(silu_mul_args(gate_up, ld_in, out, ld_out, dtype, rows, width));
             })
        .def("add_hadamard",
             [](pyengine::cpu::StepProgram& p, uintptr_t x, int64_t ldx, uintptr_t out,
                int64_t ldo, int dtype, int64_t rows, int64_t n, int64_t block) {
               p.add_hadamard(hadamard_args(x, ldx, out, ldo, dtype, rows, n, block, 1));
             })
        .def("add_attention",
             [](pyengine::cpu::StepProgram& p, uintptr_t qkv, int64_t ld_qkv, uintptr_t k_cache,
                uintptr_t v_cache, int64_t cache_batch_stride, int64_t cache_head_stride,
                uintptr_t cos, uintptr_t signed_sin, uintptr_t q_norm, uintptr_t k_norm,
                int norm_dtype, double norm_eps, uintptr_t out, int64_t ld_out, int dtype,
                int64_t batch, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                int64_t max_positions, double scale) {
               p.add_attention(
                   attention_args(qkv, ld_qkv, k_cache, v_cache, cache_batch_stride,
                                  cache_head_stride, cos, signed_sin, q_norm, k_norm, norm_dtype,
                                  norm_eps, out, ld_out, dtype, batch, n_heads, n_kv_heads,
                                  head_dim, max_positions, scale),
                   max_positions);
             })
        .def("add_embedding",
             [](pyengine::cpu::StepProgram& p, uintptr_t ids, int64_t rows, uintptr_t qweight,
                int64_t ldq, uintptr_t scales, uintptr_t zeros, int64_t lds, int sz_dtype,
                int bits, int64_t group_size, int64_t vocab, int64_t dim, uintptr_t out,
                int out_dtype, int64_t ldo, int round_dtype) {
               p.add_embedding(embedding_args(ids, rows, qweight, ldq, scales, zeros, lds,
                                              sz_dtype, bits, group_size, vocab, dim, out,
                                              out_dtype, ldo, round_dtype));
             },
             PYENGINE_EMBEDDING_PY_ARGS,
             "The table rows of the token ids in the `ids` buffer at each run, as "
             "embedding_rows_cpu (the caller writes the ids before each run).")
        .def(
            "run",
            [](pyengine::cpu::StepProgram& p, int64_t position, int num_threads,
               bool adaptive) {
              py::gil_scoped_release release;
              p.run(position, num_threads, adaptive);
            },
            py::arg("position"), py::arg("num_threads") = 0, py::arg("adaptive") = true,
            "Runs the operations in order; attention at `position`. With several threads and "
            "adaptive, on whichever of the parallel and the one-thread schedule has been faster "
            "lately (the other is tried now and then; csrc/cpu/decode_ops.h).")
        .def_property_readonly(
            "step_times",
            [](const pyengine::cpu::StepProgram& p) {
              py::dict d;
              d["parallel_ms"] = p.parallel_times().mean_ms();
              d["serial_ms"] = p.serial_times().mean_ms();
              d["parallel_runs"] = p.parallel_times().runs;
              d["serial_runs"] = p.serial_times().runs;
              d["parallel_timed"] = p.parallel_times().timed;
              d["serial_timed"] = p.serial_times().timed;
              return d;
            },
            "Recent step times of the parallel and one-thread schedules (ms, means of the last "
            "timed runs of each; -1: none yet), how many runs took each and how many of them "
            "were timed (not the first run after a switch of schedule).")
        .def_static(
            "machine_verdict",
            []() {
              const auto v = pyengine::cpu::StepProgram::machine_verdict();
              py::dict d;
              d["parallel_over_serial"] = v.parallel_over_serial;
              d["age_s"] = v.age_s;
              d["reliant_ms"] = v.reliant_ms;
              return d;
            },
            "What the process has learned of the machine, shared by every program: the "
            "parallel / one-thread ratio of mean step times of the last program that timed both "
            "(0: none), its age (s; -1: none), and the one-thread time (ms) run since by "
            "programs that rely on it (where it says the machine is busy: a parallel step 2x "
            "slower or more); at 32 estimated parallel steps, one of them measures again.")
        .def_static("set_machine_verdict", &pyengine::cpu::StepProgram::set_machine_verdict,
                    py::arg("parallel_over_serial"), py::arg("age_s") = 0.0,
                    "Sets the verdict as if learned age_s seconds ago (ratio 0: none; "
                    "nothing has relied on it yet).")
        .def_property_readonly("last_run_threads",
                               &pyengine::cpu::StepProgram::last_run_threads,
                               "Threads of the last run (1 when it took the one-thread "
                               "schedule; 0 before the first run).")
        .def_property(
            "profiling", &pyengine::cpu::StepProgram::profiling,
            &pyengine::cpu::StepProgram::set_profiling,
            "Whether runs record per-operation times (off by default; turning it on clears what "
            "was recorded, turning it off keeps it; see profile()).")
        .def(
            "profile",
            [](const pyengine::cpu::StepProgram& p) {
              py::list ops;
              for (const auto& o : p.profile()) {
                py::dict d;
                d["op"] = o.kind;
                d["n"] = o.n;
                d["k"] = o.k;
                d["bits"] = o.bits;
                d["serial_ms"] = o.serial_ms;
                d["parallel_ms"] = o.parallel_ms;
                d["barrier_after"] = o.barrier_after;
                ops.append(d);
              }
              py::dict out;
              out["ops"] = ops;
              out["serial_runs"] = p.profiled_serial_runs();
              out["parallel_runs"] = p.profiled_parallel_runs();
              return out;
            },
            "Per-operation times (ms, summed) of the runs made while profiling: {'ops': one "
            "dict per operation in order (op: qmatmul, rms_norm, silu_mul, hadamard, "
            "attention or embedding; n, k, bits: a matmul's, else 0; serial_ms, parallel_ms; "
            "barrier_after: whether a parallel run's threads wait after it), 'serial_runs', "
            "'parallel_runs'}. A parallel run's time between two barriers goes to the operation "
            "before the second (the others of its group, barrier_after False, read 0).")
        .def_property_readonly("barriers", &pyengine::cpu::StepProgram::barriers,
                               "Barriers of a parallel run: one after each operation but "
                               "between consecutive matmuls that neither read nor write what "
                               "the other writes (q, k and v; gate and up).")
        .def("__len__", &pyengine::cpu::StepProgram::size);
  }
  m.attr("cpu_plane_decode_max_m") = pyengine::cpu::kPlaneDecodeMaxM;
  m.attr("act_quant_block") = pyengine::kActBlock;

  m.def("plane_block_codes", &plane_block_codes, py::arg("hi"), py::arg("mid"), py::arg("lo"),
        py::arg("precision"),
        "The 32 r-bit slice codes of one block of Matryoshka bit planes (3 + 2 + 3 words), "
        "computed by the functions the CUDA plane kernels run (csrc/code_bits.h).");
  m.def("plane_int2_block", &plane_int2_block, py::arg("hi"),
        "One block of plane_hi (3 words) turned into int2 slice codes in 3-bit fields, as the "
        "CUDA int2 plane kernel does (csrc/code_bits.h).");

  m.def("mma_code_positions", &pyengine::mma::code_positions, py::arg("bits"),
        "Where the fragment-native layout (csrc/mma_frag.h) stores every code bit: entry "
        "((s * 4 + r) * 2 + h) * bits + b is word * 32 + bit (within a lane's words of one "
        "iteration) of bit b of the code of A register r, half h, step s.");
  m.def(
      "mma_fragment_coordinates",
      []() {
        namespace mm = pyengine::mma;
        py::dict d;
        py::list a, b, c;
        for (int lane = 0; lane < 32; ++lane) {
          for (int r = 0; r < 4; ++r)
            for (int h = 0; h < 2; ++h)
              a.append(py::make_tuple(lane, r, h, mm::a_row(lane, r), mm::a_col(lane, r, h)));
          for (int r = 0; r < 2; ++r)
            for (int h = 0; h < 2; ++h)
              b.append(py::make_tuple(lane, r, h, mm::b_k(lane, r, h), mm::b_token(lane)));
          for (int i = 0; i < 4; ++i)
            c.append(py::make_tuple(lane, i, mm::c_row(lane, i), mm::c_token(lane, i)));
        }
        d["a"] = a;
        d["b"] = b;
        d["c"] = c;
        return d;
      },
      "The mma.m16n8k16 fragment coordinates csrc/mma_frag.h uses: a (lane, register, half, "
      "row, col), b (lane, register, half, k, token), c (lane, element, row, token).");
  m.def(
      "mma_decode_emulate",
      [](PYENGINE_ARG_PARAMS(PYENGINE_MMA_DECODE_ARGS)) {
        pyengine::mma::MmaDecodeArgs a;
        PYENGINE_SET_ARGS(PYENGINE_MMA_DECODE_ARGS, a);
        if (out_dtype != pyengine::kFloat32)
          throw std::invalid_argument(pyengine::describe("mma_decode_emulate", a) +
                                      ": the emulator writes float32 (out_dtype 0)");
        py::gil_scoped_release release;
        pyengine::mma::decode_emulate(a, reinterpret_cast<float*>(out));
      },
      PYENGINE_PY_ARGS(PYENGINE_MMA_DECODE_ARGS),
      "The tensor-core decode kernel (csrc/cuda/decode_mma.cuh) replayed on the host, warp by "
      "warp, from the same layout and bit tricks (csrc/mma_frag.h): out (float32 [M, N]) (+)= "
      "x @ W^T (+ bias). The arguments of qmatmul_cuda_mma (out_dtype: float32). For tests.");
  m.def("mma_layout_constants", &mma_layout_constants,
        "The fragment-native layout's sizes (csrc/mma_frag.h): 'bits' (the code widths it "
        "holds), 'steps' and 'words' (per width: mma steps and 32-bit words per lane of one "
        "iteration), 'step_k', 'tile_rows', 'max_m', 'frag_tail', 'one_group_shift'.");

#if defined(PYENGINE_WITH_CUDA)
  m.def(
      "qmatmul_cuda",
      [](PYENGINE_ARG_PARAMS(PYENGINE_QMATMUL_ARGS), int device, uintptr_t stream,
         const std::string& kernel) {
        QMatmulArgs a;
        PYENGINE_SET_ARGS(PYENGINE_QMATMUL_ARGS, a);
        if (!kernel.empty() && kernel != "auto" && kernel != "simple" && kernel != "decode" &&
            kernel != "tc")
          throw std::invalid_argument("qmatmul_cuda: kernel must be 'auto', 'simple', "
                                      "'decode' or 'tc', got '" + kernel + "'");
        py::gil_scoped_release release;
        if (kernel == "simple")
          pyengine::cuda::qmatmul_simple(a, device, stream);
        else if (kernel == "decode")
          pyengine::cuda::qmatmul_decode(a, device, stream);
        else if (kernel == "tc")
          pyengine::cuda::qmatmul_tc(a, device, stream);
        else
          pyengine::cuda::qmatmul(a, device, stream);
      },
      PYENGINE_PY_ARGS(PYENGINE_QMATMUL_ARGS), py::arg("device"), py::arg("stream"),
      py::arg("kernel") = "",
      "out[M, N] (+)= x[M, K] @ dequant(W)[N, K]^T (+ bias) on a CUDA device and stream. "
      "kernel: '' or 'auto' (decode GEMV for M <= 16; above, the tensor-core GEMM for fp16/bf16 "
      "x and the simple kernel for fp32 x), 'simple', 'decode', 'tc'.");
  m.attr("cuda_decode_max_m") = pyengine::cuda::kDecodeMaxM;
  m.def(
      "qmatmul_cuda_mma",
      [](PYENGINE_ARG_PARAMS(PYENGINE_MMA_DECODE_ARGS), int device, uintptr_t stream) {
        pyengine::mma::MmaDecodeArgs a;
        PYENGINE_SET_ARGS(PYENGINE_MMA_DECODE_ARGS, a);
        py::gil_scoped_release release;
        pyengine::cuda::qmatmul_mma(a, device, stream);
      },
      PYENGINE_PY_ARGS(PYENGINE_MMA_DECODE_ARGS), py::arg("device"), py::arg("stream"),
      "out[M, N] (+)= x[M, K] @ W^T (+ bias) on a CUDA device and stream, W in the "
      "fragment-native layout of csrc/mma_frag.h (the tensor-core decode kernel: fp16 / bf16 "
      "activations, M <= 16, sm_80+).");


  m.def(
      "plane_matmul_cuda",
      [](PYENGINE_ARG_PARAMS(PYENGINE_PLANE_ARGS), int device, uintptr_t stream,
         const std::string& kernel) {
        PlaneMatmulArgs a;
        PYENGINE_SET_ARGS(PYENGINE_PLANE_ARGS, a);
        py::gil_scoped_release release;
        pyengine::cuda::plane_matmul(a, device, stream, kernel);
      },
      PYENGINE_PY_ARGS(PYENGINE_PLANE_ARGS), py::arg("device"), py::arg("stream"),
      py::arg("kernel") = "",
      "out[M, N] = x[M, K] @ W_r[N, K]^T (+ bias) on a CUDA device and stream, W_r the r-bit "
      "slice of a Matryoshka int8 parent read from its bit planes (only those the slice needs). "
      "kernel: '' or 'auto' (decode GEMV for M <= 16, simple kernel above), 'decode', 'simple'.");
  m.def("cuda_device_count", &pyengine::cuda::device_count);
#endif
}
