// The fragment-native weight layout of the tensor-core decode kernel (csrc/cuda/decode_mma.cuh)
// and the bit tricks that turn it into mma.sync operands. Portable C++ (host and device): the
// kernel runs these functions on the GPU; the host module runs them in the warp emulator
// (csrc/cpu/mma_emulate.cpp, pyengine._C.mma_decode_emulate) so the tests check on the CPU the
// index math and the bit manipulation the GPU runs.
//
// ---- The product -------------------------------------------------------------------------------
// out[m, n] = sum_k x[m, k] * (q[n, k] - z[n, g]) * s[n, g] is computed as mma.m16n8k16 products
// with the WEIGHT as operand A (16 rows n x 16 inputs k) and the ACTIVATIONS as operand B (16 k x 8
// tokens m): one mma covers 16 rows, 16 inputs and up to 8 tokens, so M <= 8 takes one mma per
// 256 weights and M <= 16 two. A holds the codes q exactly, each plus a power-of-two offset E
// that the bit trick below leaves on it (small integers are exact in fp16 and bf16); the
// accumulator is fp32 and starts each unit at -X' (the offsets' share, below). Per "unit"
// (min(group size, iteration span) inputs of one row tile) a lane applies its rows' scale and
// zero to the unit's partial sum P = sum_k x[m, k] q[n, k]:
//   acc += s * P - s * z * X,   X = sum over the unit's inputs of x[m, k]
// (X and X' staged per token beside the activations; s and -s*z stored per row and group in
// fp32), so fractional zero points cost nothing extra and no fp16 rounding of (q - z) * s ever
// happens.
//
// ---- Fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type") ---------
// lane = 4 * g + t (g = groupID = lane >> 2, t = lane % 4). A: 4 registers of 2 halves; element
// e = 2 * r + h (register r, half h: h = 0 the low 16 bits) sits at
//   row = g + 8 * (r & 1),   col = 2 * t + h + 8 * (r >> 1).
// B: 2 registers; element e = 2 * r + h at  k = 2 * t + h + 8 * r,  n (token) = g.
// C/D: 4 fp32; element i at  row = g + 8 * (i >> 1),  col (token) = 2 * t + (i & 1).
//
// ---- The layout ---------------------------------------------------------------------------------
// Rows are cut into tiles of 16 (N padded with zero rows), K into iterations of S = 16 * STEPS
// inputs (K padded with zero codes): STEPS = 2 (8 bits), 4 (4 bits), 16 (2 and 3 bits). For
// tile T, iteration i and lane l the kernel loads WORDS consecutive 32-bit words (WORDS = 4: one
// 16-byte load; 2 bits: 8, two loads; 3 bits: 12, three loads) at
//   frag + ((T * iterations + i) * 32 + l) * WORDS,
// and kFragTail more iterations of words after the last tile must be readable (the kernel
// prefetches up to kFragTail iterations past a tile's end instead of branching); a warp streams
// 512 contiguous bytes per load instruction. (The 2-bit iteration spans 256 inputs, two loads,
// so that the loop's fixed work per iteration, addresses and scale loads, is spread over
// 1 KiB.) The words hold the codes of lane l's A fragments for the iteration's steps. Each
// register r of step s (two codes, h = 0, 1: the same row, consecutive k) is built from one
// field per 16-bit half of a word, so one shift + one and-or (LOP3) with a magic exponent makes
// both halves at once:
//   8 bits: word 2s + r/2, bits 8(r%2) of each half (fp16: 1024 + q after or-ing 0x6400).
//   4 bits: word s, bits 4r of each half.
//   2 bits: word s/2, 2-bit slot j = 4(s%2) + r of each half (bits 2j).
//   3 bits: triple u = s/4 (words 3u..3u+2), pair p = 4(s%4) + r: for p < 15 word 3u + p/5,
//           3-bit slot p%5 of each half (bits 3(p%5)); pair 15 takes bit 15 of each half of the
//           three words (word 3u + b gives code bit b). 96 bits hold 32 codes: no bit wasted.
// A field q at bit f of a half or-ed with the magic exponent of that position, E_f (fp16:
// 2^(10 - f), 10 mantissa bits; bf16: 2^(7 - f), 7 mantissa bits: the power of two whose mantissa
// unit is 2^-f), is exactly the number E_f + q when f + bits fits the mantissa. Fields beyond the
// mantissa are shifted down first (pair_extract lists the shift, mask and f of every pair). The
// mma multiplies these raw values, offset included, so no instruction turns them into q: the
// offsets' share of a unit's product, X'_rh = sum_k x[m, k] E(k, rh) (E depends on the step, the
// register and so on the input k and the row half rh = r & 1 of the A register), is a property of
// the activations alone. It is summed once per block with the staged activations and the unit's
// accumulator starts at -X'_rh (field_offset, below). Cost: the fp32 accumulator sums E + q
// instead of q (E <= 1024), so its rounding is relative to sum_k |x| (E + q) s rather than
// sum_k |x| |q - z| s: in the host replay, 2-bit codes with fp16 activations at K = 4096 are
// 6.4e-5 off the fp64 product (relative norm), 0.3x the error of rounding it to fp16. The 8-bit
// codes with bf16 activations exceed bf16's 7 mantissa bits: they go through fp32
// (0x4B000000 | q = 2^23 + q), one subtraction each and a packed conversion, and carry no
// offset.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PYENGINE_MMA_HD __host__ __device__ __forceinline__
#else
#define PYENGINE_MMA_HD inline
#endif

namespace pyengine {
namespace mma {

constexpr int kTileRows = 16;   // weight rows per tile (the m16 of mma.m16n8k16)
constexpr int kStepK = 16;      // inputs per mma step (the k16)
constexpr int kTokens = 8;      // tokens per mma (the n8)
constexpr int kMaxTokenTiles = 2;  // M <= 16
constexpr int kMaxM = kTokens * kMaxTokenTiles;  // the most tokens one call takes
constexpr int kFragTail = 8;       // readable iterations after the last tile (the most warps
                                   // splitting one tile's iterations)
constexpr int kBitWidths[] = {2, 3, 4, 8};  // the code widths the layout holds
constexpr int kOneGroupShift = 62;          // MmaDecodeArgs::gshift when one group covers K

PYENGINE_MMA_HD constexpr int steps_per_iteration(int bits) {
  return bits == 8 ? 2 : bits == 4 ? 4 : 16;
}
PYENGINE_MMA_HD constexpr int words_per_lane(int bits) {
  return bits == 3 ? 12 : bits == 2 ? 8 : 4;
}
PYENGINE_MMA_HD constexpr int iteration_k(int bits) { return kStepK * steps_per_iteration(bits); }

// Fragment coordinates (header): A element e = 2r + h, B element e = 2r + h, C element i.
PYENGINE_MMA_HD constexpr int a_row(int lane, int r) { return (lane >> 2) + 8 * (r & 1); }
PYENGINE_MMA_HD constexpr int a_col(int lane, int r, int h) {
  return 2 * (lane & 3) + h + 8 * (r >> 1);
}
PYENGINE_MMA_HD constexpr int b_k(int lane, int r, int h) { return 2 * (lane & 3) + h + 8 * r; }
PYENGINE_MMA_HD constexpr int b_token(int lane) { return lane >> 2; }
PYENGINE_MMA_HD constexpr int c_row(int lane, int i) { return (lane >> 2) + 8 * (i >> 1); }
PYENGINE_MMA_HD constexpr int c_token(int lane, int i) { return 2 * (lane & 3) + (i & 1); }

// How register r of step s is cut out of a lane's iteration words: the or of `parts` terms
// (word[w] >> shift) & mask, then the magic exponent; the field's lowest bit then sits at bit
// `f` of each half. Every term keeps one field (or, for the 3-bit pair 15, one bit) per half.
struct PairExtract {
  int parts;
  int word0, shift0;
  uint32_t mask0;
  int word1, shift1;
  uint32_t mask1;
  int word2, shift2;
  uint32_t mask2;
  int f;
};

PYENGINE_MMA_HD constexpr uint32_t half_pair(uint32_t field) { return field | (field << 16); }

// bf16: 7 mantissa bits, fp16: 10. A field at bit b of the stored half with width `bits` is
// usable in place when b + bits <= mantissa bits; otherwise the word is shifted right first.
PYENGINE_MMA_HD constexpr PairExtract pair_extract(int bits, bool bf16, int s, int r) {
  const int mant = bf16 ? 7 : 10;
  if (bits == 8) {
    // word 2s + r/2, byte 8(r%2) of each half; the bf16 path reads the same bytes via fp32.
    const int b = 8 * (r % 2);
    return {1, 2 * s + r / 2, b, half_pair(0xFFu), 0, 0, 0u, 0, 0, 0u, 0};
  }
  if (bits == 4) {
    const int b = 4 * r;
    // fp16: nibbles 0, 2 at f = 0 and nibbles 1, 3 in place at f = 4 (after one shift by 8
    // for r >= 2); bf16: each nibble shifted to bit 0.
    if (bf16) return {1, s, b, half_pair(0xFu), 0, 0, 0u, 0, 0, 0u, 0};
    const int shift = r >= 2 ? 8 : 0;
    const int f = b - shift;
    return {1, s, shift, half_pair(0xFu << f), 0, 0, 0u, 0, 0, 0u, f};
  }
  if (bits == 2) {
    const int j = 4 * (s % 2) + r;           // slot: bits 2j of each half
    const int per = mant / 2;                // slots usable in place: fp16 5, bf16 3
    const int shift = (j / per) * 2 * per;   // fp16: 0 or 10; bf16: 0, 6 or 12
    const int f = 2 * j - shift;
    return {1, s / 2, shift, half_pair(3u << f), 0, 0, 0u, 0, 0, 0u, f};
  }
  // 3 bits
  const int u = s / 4, p = 4 * (s % 4) + r;
  if (p == 15)  // bit 15 of each half of words 3u, 3u+1, 3u+2 = code bits 0, 1, 2
    return {3, 3 * u, 15, half_pair(1u), 3 * u + 1, 14, half_pair(2u), 3 * u + 2, 13,
            half_pair(4u), 0};
  const int j = p % 5;                       // slot: bits 3j of each half
  const int per = mant / 3;                  // fp16 3, bf16 2
  const int shift = (j / per) * 3 * per;     // fp16: 0 or 9; bf16: 0, 6 or 12
  const int f = 3 * j - shift;
  return {1, 3 * u + p / 5, shift, half_pair(7u << f), 0, 0, 0u, 0, 0, 0u, f};
}

// Stored position of bit `bit` of the code of register r, half h, step s: word * 32 + bit
// index within the word (for the repack, pyengine/backends/cuda_layout.py).
PYENGINE_MMA_HD constexpr int code_bit_position(int bits, int s, int r, int h, int bit) {
  const PairExtract e = pair_extract(bits, false, s, r);
  if (bits == 3 && e.parts == 3) return (e.word0 + bit) * 32 + 16 * h + 15;
  // One field: bit `bit` of the code at (f + shift) within half h of word0.
  return e.word0 * 32 + 16 * h + e.f + e.shift0 + bit;
}

// The magic exponent E_f of a field at bit f, as the 16-bit pattern of fp16 / bf16 (header).
PYENGINE_MMA_HD constexpr uint16_t field_magic_bits(bool bf16, int f) {
  return bf16 ? (uint16_t)((127 + 7 - f) << 7) : (uint16_t)((15 + 10 - f) << 10);
}

// The offset E_f a raw half carries on top of its code (header), as a float.
PYENGINE_MMA_HD constexpr float field_offset(bool bf16, int f) {
  return (float)(1u << ((bf16 ? 7 : 10) - f));
}

// Whether the raw codes carry offsets: all but the 8-bit codes with bf16, which go through fp32.
PYENGINE_MMA_HD constexpr bool carries_offsets(int bits, bool bf16) {
  return !(bits == 8 && bf16);
}

// The offset carried by register r of step s: E_f of its field, 0 where the codes carry none.
// The two halves of a register share it.
PYENGINE_MMA_HD constexpr float register_offset(int bits, bool bf16, int s, int r) {
  return carries_offsets(bits, bf16) ? field_offset(bf16, pair_extract(bits, bf16, s, r).f)
                                     : 0.f;
}

// The two raw halves of register r of step s (E_f + q each), from a lane's words.
PYENGINE_MMA_HD uint32_t extract_pair(const uint32_t* w, const PairExtract& e, bool bf16) {
  const uint32_t magic = half_pair(field_magic_bits(bf16, e.f));
  uint32_t v = ((w[e.word0] >> e.shift0) & e.mask0) | magic;
  if (e.parts == 3)
    v |= ((w[e.word1] >> e.shift1) & e.mask1) | ((w[e.word2] >> e.shift2) & e.mask2);
  return v;
}

// Byte `byte` (0..3) of a word as 2^23 + byte value in fp32 bits (8-bit codes, bf16).
PYENGINE_MMA_HD constexpr uint32_t fp32_magic_byte(uint32_t word, int byte) {
  return 0x4B000000u | ((word >> (8 * byte)) & 0xFFu);
}

// The same in one byte permute: PRMT (prmt.b32, __byte_perm) as the PTX ISA defines its default
// mode: byte n of the result is byte (s >> 4n) & 7 of the 8 bytes {b, a} (a: bytes 0..3, b: bytes
// 4..7; a nibble of 8 or more would copy a sign instead, and none is used here). With b =
// kMagicByteHigh and magic_byte_selector(byte): the word's byte, two zero bytes, then 0x4B.
constexpr uint32_t kMagicByteHigh = 0x4B000000u;
PYENGINE_MMA_HD constexpr uint32_t magic_byte_selector(int byte) { return 0x7440u | byte; }
PYENGINE_MMA_HD constexpr uint32_t byte_perm(uint32_t a, uint32_t b, uint32_t s) {
  uint32_t d = 0;
  for (int n = 0; n < 4; ++n) {
    const uint32_t sel = (s >> (4 * n)) & 7u;
    const uint32_t byte = sel < 4 ? (a >> (8 * sel)) & 0xFFu : (b >> (8 * (sel - 4))) & 0xFFu;
    d |= byte << (8 * n);
  }
  return d;
}
static_assert(byte_perm(0xA1B2C3D4u, kMagicByteHigh, magic_byte_selector(0)) ==
                  fp32_magic_byte(0xA1B2C3D4u, 0) &&
              byte_perm(0xA1B2C3D4u, kMagicByteHigh, magic_byte_selector(3)) ==
                  fp32_magic_byte(0xA1B2C3D4u, 3),
              "the byte permute must build fp32_magic_byte");

// ---- The call -----------------------------------------------------------------------------------
// out[m, n] (+)= sum_k x[m, k] W[n, k] (+ bias[n]) for m < M <= 16, n < N, k < K, W in the layout
// above (pyengine/backends/cuda_layout.py makes it from a canonical packed weight).
struct MmaDecodeArgs {
  const uint32_t* frag = nullptr;   // [tiles][iterations][32][words_per_lane(bits)]
  const float* params = nullptr;    // [tiles][groups][8][4]: for lane group g of tile T, rows
                                    // 16T + g and 16T + g + 8: s, -s * z, s, -s * z (fp32)
  const void* x = nullptr;          // [M, K] float16 / bfloat16, row stride ldx
  int x_dtype = 1;
  int64_t ldx = 0;
  const void* bias = nullptr;       // [N] or nullptr
  int bias_dtype = 0;
  void* out = nullptr;              // [M, N], row stride ldo
  int out_dtype = 1;
  int64_t ldo = 0;
  bool accumulate = false;          // out += result
  int64_t M = 0, N = 0, K = 0;
  int bits = 4;
  int64_t tiles = 0;                // ceil(N / 16) (at least)
  int64_t iterations = 0;           // ceil(K / iteration_k(bits)) (at least)
  int64_t groups = 0;               // groups per tile in params
  int gshift = kOneGroupShift;      // group of input k: k >> gshift (kOneGroupShift: one)
  int units = 1;                    // iteration_k / min(iteration_k, group size): 1, 2, 4, 8
};

// ---- Activations in shared memory ---------------------------------------------------------------
// The B fragments of two consecutive steps for one lane are one 16-byte entry: step pair q of a
// slab, token tile tt, lane l at  bfrag[(tt * pairs + q) * 32 + l]  (uint4 of 4 x 2 halves):
//   .x = B register 0 of step 2q, .y = register 1 of step 2q, .z, .w = registers 0, 1 of 2q + 1.
// Register r, half h of step s of lane l holds x[token tt*8 + g][slab_k0 + 16 s + b_k(l, r, h)].
PYENGINE_MMA_HD constexpr int staged_k(int s, int lane, int r, int h) {
  return kStepK * s + b_k(lane, r, h);
}

}  // namespace mma
}  // namespace pyengine
