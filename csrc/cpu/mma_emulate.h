// A host emulation of the tensor-core decode kernel (csrc/cuda/decode_mma.cuh) for tests: the
// same fragment layout, bit extraction and epilogue arithmetic (csrc/mma_frag.h), with every
// mma.sync of a warp replayed from the PTX fragment coordinates.
#pragma once

#include <vector>

#include "common.h"

namespace pyengine {
namespace mma {

// The stored positions (word * 32 + bit within the lane's iteration words) of every code bit:
// entry ((s * 4 + r) * 2 + h) * bits + b is bit b of the code of A register r, half h, step s.
std::vector<int> code_positions(int bits);

// out (float32 [M, N], row stride a.ldo) (+)= the kernel's result for the call `a` (a.out is
// ignored; a.bias, a.accumulate honoured). Raises std::invalid_argument as the kernel does, and
// std::logic_error when a raw A value is not its field's offset plus an exact integer in
// [0, 2^bits).
void decode_emulate(const MmaDecodeArgs& a, float* out);

}  // namespace mma
}  // namespace pyengine
