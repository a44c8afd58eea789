// Host emulation of the tensor-core decode kernel; see mma_emulate.h.
#include "cpu/mma_emulate.h"

#include "mma_stage.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace pyengine {
namespace mma {

std::vector<int> code_positions(int bits) {
  if (bits != 2 && bits != 3 && bits != 4 && bits != 8)
    throw std::invalid_argument("mma_code_positions: bits must be 2, 3, 4 or 8");
  std::vector<int> pos;
  for (int s = 0; s < steps_per_iteration(bits); ++s)
    for (int r = 0; r < 4; ++r)
      for (int h = 0; h < 2; ++h)
        for (int b = 0; b < bits; ++b) pos.push_back(code_bit_position(bits, s, r, h, b));
  return pos;
}

namespace {

float half_bits(uint32_t h, bool bf16) {
  return bf16 ? bf16_to_float((uint16_t)h) : half_to_float((uint16_t)h);
}

// Register r of step s of one lane, as the kernel builds it (E_f + q per half, or q for 8 bits
// with bf16), decoded to two floats; checks that each is its offset plus an exact code.
void a_register(const uint32_t* w, int bits, bool bf16, int s, int r, float (&v)[2]) {
  if (bits == 8 && bf16) {
    const int word = 2 * s + r / 2, byte = r % 2;
    // the kernel's byte permute, by the PTX ISA's definition (mma_frag.h)
    v[0] = bits_to_float(byte_perm(w[word], kMagicByteHigh, magic_byte_selector(byte))) -
           8388608.f;
    v[1] = bits_to_float(byte_perm(w[word], kMagicByteHigh, magic_byte_selector(byte + 2))) -
           8388608.f;
  } else {
    const uint32_t raw = extract_pair(w, pair_extract(bits, bf16, s, r), bf16);
    for (int h = 0; h < 2; ++h) v[h] = half_bits((raw >> (16 * h)) & 0xFFFFu, bf16);
  }
  const float offset = register_offset(bits, bf16, s, r);
  for (int h = 0; h < 2; ++h) {
    const float q = v[h] - offset;  // exact: both are integers below 2^11
    if (!(q >= 0.f && q < (float)(1 << bits) && q == std::floor(q)))
      throw std::logic_error("mma_decode_emulate: step " + std::to_string(s) + " register " +
                             std::to_string(r) + " decodes to " + std::to_string(v[h]) +
                             ", not " + std::to_string(offset) + " plus a " +
                             std::to_string(bits) + "-bit code");
  }
}

// The kernel's activation staging (mma_stage.h) over the whole of K as one slab, on one thread.
struct Staged {
  std::vector<uint32_t> bfrag;  // B fragment entries
  std::vector<float> xrec;      // unit records
};

template <int BITS, bool BF16, int NT>
void stage_all(const MmaDecodeArgs& a, Staged& st) {
  const int pairs = (int)(a.iterations * steps_per_iteration(BITS) / 2);
  const int units = (int)(a.iterations * a.units);
  const bool x32 = reinterpret_cast<uintptr_t>(a.x) % 4 == 0 && a.ldx % 2 == 0;
  st.bfrag.assign((size_t)(bfrag_entry(pairs, 0, 0, NT) * kEntryWords), 0xFFFFFFFFu);
  st.xrec.assign((size_t)unit_record(units, 0, 0, NT), std::nanf(""));
  stage_pairs<NT>(a, x32, 0, pairs, 0, 1, st.bfrag.data());
  unit_sums<BITS, BF16, NT>(a.M, units, iteration_k(BITS) / a.units / 32, 0, 1,
                            st.bfrag.data(), st.xrec.data());
}

template <int BITS>
Staged stage_bits(const MmaDecodeArgs& a, bool bf16, int nt) {
  Staged st;
  if (bf16) {
    if (nt == 2) stage_all<BITS, true, 2>(a, st);
    else stage_all<BITS, true, 1>(a, st);
  } else {
    if (nt == 2) stage_all<BITS, false, 2>(a, st);
    else stage_all<BITS, false, 1>(a, st);
  }
  return st;
}

Staged stage(const MmaDecodeArgs& a, bool bf16, int nt) {
  switch (a.bits) {
    case 2: return stage_bits<2>(a, bf16, nt);
    case 3: return stage_bits<3>(a, bf16, nt);
    case 4: return stage_bits<4>(a, bf16, nt);
    default: return stage_bits<8>(a, bf16, nt);
  }
}

}  // namespace

void decode_emulate(const MmaDecodeArgs& a, float* out) {
  check_mma_decode_args("mma_decode_emulate", a);
  const bool bf16 = a.x_dtype == kBFloat16;
  const int steps = steps_per_iteration(a.bits), words = words_per_lane(a.bits);
  const int ik = iteration_k(a.bits), spu = steps / a.units;
  const int nt = a.M > kTokens ? 2 : 1;
  // Everything the warps read of the activations comes from the staged slab, by the kernel's
  // index functions.
  const Staged st = stage(a, bf16, nt);
  const bool offsets = carries_offsets(a.bits, bf16);
  for (int64_t tile = 0; tile < a.tiles; ++tile) {
    float acc[kMaxTokenTiles][32][4] = {};
    for (int64_t it = 0; it < a.iterations; ++it) {
      const int64_t k0 = it * ik;
      for (int u = 0; u < a.units; ++u) {
        const int64_t unit = it * a.units + u;
        // Each accumulator starts at its record's -X'_rh (none for exact codes).
        float part[kMaxTokenTiles][32][4] = {};
        for (int tt = 0; tt < nt; ++tt)
          for (int lane = 0; lane < 32; ++lane)
            for (int i = 0; i < 4; ++i)
              part[tt][lane][i] =
                  offsets ? st.xrec[unit_record(unit, tt, lane & 3, nt) + i] : 0.f;
        for (int s = u * spu; s < (u + 1) * spu; ++s) {
          // Operand A (16 x 16) gathered from the 32 lanes' registers.
          float A[kTileRows][kStepK];
          for (int lane = 0; lane < 32; ++lane) {
            const uint32_t* w = a.frag + ((tile * a.iterations + it) * 32 + lane) * words;
            for (int r = 0; r < 4; ++r) {
              float v[2];
              a_register(w, a.bits, bf16, s, r, v);
              for (int h = 0; h < 2; ++h) A[a_row(lane, r)][a_col(lane, r, h)] = v[h];
            }
          }
          const int64_t q = (it * steps + s) / 2;  // the step's pair in the slab
          for (int tt = 0; tt < nt; ++tt) {
            // Operand B (16 x 8) from the lanes' staged entries: words 2 (s % 2) + r.
            float B[kStepK][kTokens];
            for (int lane = 0; lane < 32; ++lane) {
              const uint32_t* e = st.bfrag.data() + bfrag_entry(q, tt, lane, nt) * kEntryWords;
              for (int r = 0; r < 2; ++r)
                for (int h = 0; h < 2; ++h)
                  B[b_k(lane, r, h)][b_token(lane)] =
                      half_bits((e[2 * (s % 2) + r] >> (16 * h)) & 0xFFFFu, bf16);
            }
            for (int lane = 0; lane < 32; ++lane)
              for (int i = 0; i < 4; ++i) {
                const int row = c_row(lane, i), tok = c_token(lane, i);
                double d = 0.0;
                for (int kk = 0; kk < kStepK; ++kk) d += (double)A[row][kk] * B[kk][tok];
                part[tt][lane][i] += (float)d;
              }
          }
        }
        // The unit's epilogue, lane by lane: X from the record; the unit's scales as the kernel
        // addresses them, one group index per iteration and the units at the groups after it
        // (units > 1 only when a unit is a group).
        const int64_t group = (k0 >> std::min(a.gshift, 31)) + u;
        for (int tt = 0; tt < nt; ++tt)
          for (int lane = 0; lane < 32; ++lane) {
            const float* sc = a.params + ((tile * a.groups + group) * 8 + b_token(lane)) * 4;
            const float* rec = st.xrec.data() + unit_record(unit, tt, lane & 3, nt);
            for (int i = 0; i < 4; ++i) {
              const float s = sc[2 * (i >> 1)], nsz = sc[2 * (i >> 1) + 1];
              acc[tt][lane][i] =
                  std::fma(s, part[tt][lane][i], std::fma(nsz, rec[4 + (i & 1)], acc[tt][lane][i]));
            }
          }
      }
    }
    for (int tt = 0; tt < nt; ++tt)
      for (int lane = 0; lane < 32; ++lane)
        for (int i = 0; i < 4; ++i) {
          const int64_t n = tile * kTileRows + c_row(lane, i);
          const int64_t m = tt * kTokens + c_token(lane, i);
          if (n >= a.N || m >= a.M) continue;
          float v = acc[tt][lane][i];
          if (a.bias) v += load_as_float(a.bias, a.bias_dtype, n);
          if (a.accumulate) v += out[m * a.ldo + n];
          out[m * a.ldo + n] = v;
        }
  }
}

}  // namespace mma
}  // namespace pyengine
