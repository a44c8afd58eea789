// The positional argument lists of the pyengine._C kernels, written once. Each list is an
// X-macro: LIST(X) expands X(type, name) for every argument, in the order the bound functions
// take them. bindings.cpp generates from a list the C++ parameter list of the bound function,
// the filling of the argument struct (every name is a field of that struct; integers become
// pointers where the field is one), the py::arg list and the tuple of names exported to Python
// (pyengine._C.QMATMUL_ARG_NAMES, ...), which tests/backends/test_native_args.py compares with
// the tuples pyengine/backends/*.py build per call. The types are what the binding takes
// (pointers as uintptr_t); none holds a comma.
#pragma once

#include <cstdint>
#include <type_traits>

// qmatmul_cpu / qmatmul_cuda (QMatmulArgs, csrc/common.h); the trailing arguments of each
// (threads and instruction set, or device, stream and kernel) are written in bindings.cpp.
#define PYENGINE_QMATMUL_ARGS(X)                                                              \
  X(uintptr_t, x) X(int, x_dtype) X(int64_t, ldx) X(uintptr_t, qweight) X(int64_t, ldq)       \
  X(uintptr_t, scales) X(uintptr_t, zeros) X(int, sz_dtype) X(int64_t, lds)                   \
  X(uintptr_t, bias) X(int, bias_dtype) X(uintptr_t, out) X(int, out_dtype) X(int64_t, ldo)   \
  X(bool, accumulate) X(int64_t, M) X(int64_t, N) X(int64_t, K) X(int, bits)                  \
  X(int64_t, group_size)

// QMatmulCall: the part of PYENGINE_QMATMUL_ARGS bound once (its constructor, before the
// instruction set and layout options) and the part passed per call (__call__,
// StepProgram.add_call). Together they are PYENGINE_QMATMUL_ARGS' names.
#define PYENGINE_QMATMUL_BOUND_ARGS(X)                                                        \
  X(uintptr_t, qweight) X(int64_t, ldq) X(uintptr_t, scales) X(uintptr_t, zeros)              \
  X(int, sz_dtype) X(int64_t, lds) X(uintptr_t, bias) X(int, bias_dtype) X(int, x_dtype)      \
  X(int, out_dtype) X(int64_t, N) X(int64_t, K) X(int, bits) X(int64_t, group_size)
#define PYENGINE_QMATMUL_PER_CALL_ARGS(X)                                                     \
  X(uintptr_t, x) X(int64_t, ldx) X(uintptr_t, out) X(int64_t, ldo) X(int64_t, M)             \
  X(bool, accumulate)

// plane_matmul_cpu / plane_matmul_cuda (PlaneMatmulArgs, csrc/common.h).
#define PYENGINE_PLANE_ARGS(X)                                                                \
  X(uintptr_t, x) X(int, x_dtype) X(int64_t, ldx) X(uintptr_t, plane_hi) X(int64_t, ld_hi)    \
  X(uintptr_t, plane_mid) X(int64_t, ld_mid) X(uintptr_t, plane_lo) X(int64_t, ld_lo)         \
  X(uintptr_t, scales) X(uintptr_t, zeros) X(int, sz_dtype) X(int64_t, lds)                   \
  X(uintptr_t, bias) X(int, bias_dtype) X(uintptr_t, out) X(int, out_dtype) X(int64_t, ldo)   \
  X(int64_t, M) X(int64_t, N) X(int64_t, K) X(int, precision) X(int64_t, group_size)

// qmatmul_cuda_mma and its host replay mma_decode_emulate (MmaDecodeArgs, csrc/mma_frag.h).
#define PYENGINE_MMA_DECODE_ARGS(X)                                                           \
  X(uintptr_t, frag) X(uintptr_t, params) X(uintptr_t, x) X(int, x_dtype) X(int64_t, ldx)     \
  X(uintptr_t, bias) X(int, bias_dtype) X(uintptr_t, out) X(int, out_dtype) X(int64_t, ldo)   \
  X(bool, accumulate) X(int64_t, M) X(int64_t, N) X(int64_t, K) X(int, bits)                  \
  X(int64_t, tiles) X(int64_t, iterations) X(int64_t, groups) X(int, gshift) X(int, units)

// ---- expansions -------------------------------------------------------------------------------
// A comma-separated expansion is made with a leading comma per entry, the first one dropped
// (PYENGINE_DROP_FIRST_): the result can end a parameter list or be followed by more entries.
#define PYENGINE_DROP_FIRST_(first, ...) __VA_ARGS__
#define PYENGINE_DROP_FIRST(...) PYENGINE_DROP_FIRST_(__VA_ARGS__)
#define PYENGINE_ARG_PARAM_(type, name) , type name
#define PYENGINE_ARG_NAME_(type, name) , name
#define PYENGINE_ARG_STRING_(type, name) , #name

// `uintptr_t x, int x_dtype, ...`: the parameters of a function taking LIST.
#define PYENGINE_ARG_PARAMS(LIST) PYENGINE_DROP_FIRST(LIST(PYENGINE_ARG_PARAM_))
// `x, x_dtype, ...`: those parameters passed on.
#define PYENGINE_ARG_NAMES(LIST) PYENGINE_DROP_FIRST(LIST(PYENGINE_ARG_NAME_))
// `"x", "x_dtype", ...`: the names as string literals.
#define PYENGINE_ARG_STRINGS(LIST) PYENGINE_DROP_FIRST(LIST(PYENGINE_ARG_STRING_))
// `set_arg(a.x, x); ...`: the fields of the argument struct `a` set from the parameters of
// the same names (in scope where it expands).
#define PYENGINE_SET_ARG_(type, name) pyengine::set_arg(pyengine_args_.name, name);
#define PYENGINE_SET_ARGS(LIST, a)    \
  do {                                \
    auto& pyengine_args_ = (a);       \
    LIST(PYENGINE_SET_ARG_)           \
  } while (0)

namespace pyengine {

// One field of an argument struct from the binding's value: pointers arrive as integers.
template <class Field, class Value>
inline void set_arg(Field& field, Value value) {
  if constexpr (std::is_pointer_v<Field>)
    field = reinterpret_cast<Field>(value);
  else
    field = static_cast<Field>(value);
}

}  // namespace pyengine
