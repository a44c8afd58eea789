// Host emulation of the tensor-core decode kernel; see mma_emulate.h.
#include "cpu/mma_emulate.h"

#include <cmath>
#include <stdexcept>
#include <string>

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

// Register r of step s of one lane, as the kernel builds it, decoded to two floats; checks that
// both are exact codes.
void a_register(const uint32_t* w, int bits, bool bf16, int s, int r, float (&v)[2]) {
  if (bits == 8 && bf16) {
    const int word = 2 * s + r / 2, byte = r % 2;
    v[0] = bits_to_float(fp32_magic_byte(w[word], byte)) - 8388608.f;
    v[1] = bits_to_float(fp32_magic_byte(w[word], byte + 2)) - 8388608.f;
  } else {
    const PairExtract e = pair_extract(bits, bf16, s, r);
    const uint32_t raw = extract_pair(w, e, bf16);
    const float mul = half_bits(normalize_mul_bits(bf16, e.f), bf16);
    const float add = half_bits(normalize_add_bits(bf16, e.f), bf16);
    for (int h = 0; h < 2; ++h) {
      // The HFMA2 is exact here (every operand and the result are representable), so a float
      // fma reproduces it.
      v[h] = std::fma(half_bits((raw >> (16 * h)) & 0xFFFFu, bf16), mul, add);
    }
  }
  for (int h = 0; h < 2; ++h)
    if (!(v[h] >= 0.f && v[h] < (float)(1 << bits) && v[h] == std::floor(v[h])))
      throw std::logic_error("mma_decode_emulate: step " + std::to_string(s) + " register " +
                             std::to_string(r) + " decodes to " + std::to_string(v[h]) +
                             ", not a " + std::to_string(bits) + "-bit code");
}

float x_at(const MmaDecodeArgs& a, int64_t m, int64_t k) {
  if (m >= a.M || k >= a.K) return 0.f;
  const uint16_t h = static_cast<const uint16_t*>(a.x)[m * a.ldx + k];
  return half_bits(h, a.x_dtype == kBFloat16);
}

}  // namespace

void decode_emulate(const MmaDecodeArgs& a, float* out) {
  check_mma_decode_args("mma_decode_emulate", a);
  const bool bf16 = a.x_dtype == kBFloat16;
  const int steps = steps_per_iteration(a.bits), words = words_per_lane(a.bits);
  const int ik = iteration_k(a.bits), uk = ik / a.units, spu = steps / a.units;
  const int nt = a.M > kTokens ? 2 : 1;
  for (int64_t tile = 0; tile < a.tiles; ++tile) {
    float acc[kMaxTokenTiles][32][4] = {};
    for (int64_t it = 0; it < a.iterations; ++it) {
      const int64_t k0 = it * ik;
      for (int u = 0; u < a.units; ++u) {
        float part[kMaxTokenTiles][32][4] = {};
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
          for (int tt = 0; tt < nt; ++tt) {
            // Operand B (16 x 8) from the lanes' staged registers.
            float B[kStepK][kTokens];
            for (int lane = 0; lane < 32; ++lane)
              for (int r = 0; r < 2; ++r)
                for (int h = 0; h < 2; ++h)
                  B[b_k(lane, r, h)][b_token(lane)] =
                      x_at(a, tt * kTokens + b_token(lane), k0 + staged_k(s, lane, r, h));
            for (int lane = 0; lane < 32; ++lane)
              for (int i = 0; i < 4; ++i) {
                const int row = c_row(lane, i), tok = c_token(lane, i);
                double d = 0.0;
                for (int kk = 0; kk < kStepK; ++kk) d += (double)A[row][kk] * B[kk][tok];
                part[tt][lane][i] += (float)d;
              }
          }
        }
        // The unit's epilogue, lane by lane.
        const int64_t group = (k0 + (int64_t)u * uk) >> a.gshift;
        for (int tt = 0; tt < nt; ++tt)
          for (int lane = 0; lane < 32; ++lane) {
            const float* sc = a.params + ((tile * a.groups + group) * 8 + b_token(lane)) * 4;
            float xs[2];
            for (int c = 0; c < 2; ++c) {
              float sum = 0.f;
              for (int kk = 0; kk < uk; ++kk)
                sum += x_at(a, tt * kTokens + c_token(lane, c), k0 + (int64_t)u * uk + kk);
              xs[c] = sum;
            }
            for (int i = 0; i < 4; ++i) {
              const float s = sc[2 * (i >> 1)], nsz = sc[2 * (i >> 1) + 1];
              acc[tt][lane][i] =
                  std::fma(s, part[tt][lane][i], std::fma(nsz, xs[i & 1], acc[tt][lane][i]));
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
