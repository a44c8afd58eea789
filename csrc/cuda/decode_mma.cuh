// Tensor-core decode kernel for small M (1..16), fp16 / bf16 activations: packed 2, 3, 4 and 8-bit
// weights repacked once into the fragment-native layout of csrc/mma_frag.h (its header gives the
// product, the fragments, the layout and the bit tricks). out[m, n] (+)= sum_k x[m, k] W[n, k]
// (+ bias[n]).
//
// ---- Work split ---------------------------------------------------------------------------------
// A warp owns one 16-row tile and walks its iterations (S inputs each, mma_frag.h); a block has
// WR tiles x WK warps per tile: warp wk of a tile takes iterations wk, wk + WK, ... and the WK
// partial sums meet in shared memory at the end (fixed order: deterministic, no atomics). All
// tokens (M <= 8: one n8 tile, M <= 16: two) are in one block, so the weight is read once.
// Heuristic (host): WR = the largest of 8, 4, 2 with ceil(tiles / WR) >= 2 * SMs, else 1;
// WK = min(8 / WR, iterations rounded down to a power of two).
//
// ---- Activations --------------------------------------------------------------------------------
// Slabs of slab_iters iterations (a multiple of WK, about 2048 / NT inputs) are staged in shared
// memory as B fragments (mma_frag.h: one 16-byte entry per lane and step pair, conflict-free;
// the token tiles of a step pair side by side, so a lane reaches both at fixed offsets),
// then the sums of x over every unit (X, and X' for the offsets the raw codes carry: mma_frag.h)
// are read back from them, for the tokens below M. Every warp crosses the same slab boundaries
// at the same loop step, so the barriers match.
//
// ---- Steady state (per lane, per iteration) -----------------------------------------------------
// two iterations per loop trip, the word buffers swapping roles; the next iteration's words are
// loaded (one 16-byte load, two for 2 bits, three for 3 bits) before this one is computed; one
// address per iteration for its units' scales; per unit: the unit's scale pair (one 16-byte
// load) and per token tile the accumulator's start -X' (one 16-byte shared load) and X (one
// 8-byte shared load), then per step the A fragment of raw codes (one shift-and-mask with the
// magic exponent per register, shared shifts between registers), one 16-byte shared load of B
// per step pair and token tile and one mma per token tile; then 8 FFMA per token tile apply the
// unit's scale and zero.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.h"
#include "cuda/device_util.cuh"
#include "mma_frag.h"
#include "mma_stage.h"

namespace pyengine {
namespace cuda {
namespace decode_mma {

using namespace pyengine::mma;

constexpr int kMaxWarps = 8;
constexpr int kSlabInputs = 2048;  // inputs staged per slab with one token tile (half with two)

struct Plan {
  int WR;          // row tiles per block
  int WK;          // warps per row tile (split of the iterations)
  int slab_iters;  // iterations per staged slab (a multiple of WK)
  bool x32;        // activation rows allow 4-byte loads of element pairs
};

template <bool BF16>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (BF16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#else
  __trap();  // the host refuses devices below sm_80 before launching
#endif
}

// (a & b) | c in one LOP3 (b an immediate, c a register: SASS LOP3 takes one immediate, so
// the compiler's own and-then-or of two constants costs two instructions).
template <uint32_t B>
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "n"(B), "r"(c));
  return d;
}

// extract_pair (mma_frag.h) with one LOP3 per term; `magic` holds the field's magic exponent
// pair.
template <int BITS, bool BF16, int S, int R>
__device__ __forceinline__ uint32_t extract_pair_lop3(const uint32_t* w, uint32_t magic) {
  constexpr PairExtract e = pair_extract(BITS, BF16, S, R);
  uint32_t v = and_or<e.mask0>(w[e.word0] >> e.shift0, magic);
  if constexpr (e.parts == 3) {
    v = and_or<e.mask1>(w[e.word1] >> e.shift1, v);
    v = and_or<e.mask2>(w[e.word2] >> e.shift2, v);
  }
  return v;
}

// Register r of step s of the A fragment: two codes as fp16 / bf16, each E_f + q (mma_frag.h;
// 8 bits with bf16: q). magics[f] holds the magic exponent pair of field position f (LOP3 takes
// one immediate, the mask: the magic comes from a register).
template <int BITS, bool BF16, int S, int R>
__device__ __forceinline__ uint32_t a_register(const uint32_t* w, const uint32_t (&magics)[10]) {
  if constexpr (BITS == 8 && BF16) {
    constexpr int word = 2 * S + R / 2, byte = R % 2;
    // fp32_magic_byte in one PRMT each (byte_perm, mma_frag.h).
    const float lo = __uint_as_float(__byte_perm(w[word], kMagicByteHigh,
                                                 magic_byte_selector(byte))) - 8388608.f;
    const float hi = __uint_as_float(__byte_perm(w[word], kMagicByteHigh,
                                                 magic_byte_selector(byte + 2))) - 8388608.f;
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // lo in the low half
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    constexpr PairExtract e = pair_extract(BITS, BF16, S, R);
    return extract_pair_lop3<BITS, BF16, S, R>(w, magics[e.f]);
  }
}

template <int BITS, bool BF16, int S>
__device__ __forceinline__ void a_fragment(const uint32_t* w, const uint32_t (&magics)[10],
                                           uint32_t (&a)[4]) {
  a[0] = a_register<BITS, BF16, S, 0>(w, magics);
  a[1] = a_register<BITS, BF16, S, 1>(w, magics);
  a[2] = a_register<BITS, BF16, S, 2>(w, magics);
  a[3] = a_register<BITS, BF16, S, 3>(w, magics);
}

// A lane's words of one iteration (always a valid address: callers clamp instead of branching).
template <int WORDS>
__device__ __forceinline__ void load_words(const uint32_t* src, uint32_t (&w)[WORDS]) {
#pragma unroll
  for (int i = 0; i < WORDS / 4; ++i) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(src) + i);  // static-gpu: weight load
    w[4 * i] = v.x; w[4 * i + 1] = v.y; w[4 * i + 2] = v.z; w[4 * i + 3] = v.w;
  }
}

// Steps [S0, S0 + COUNT) of one unit into part[NT][4].
// bq: this lane's entry of the iteration's first step pair and token tile 0.
template <int BITS, bool BF16, int NT, int S0, int COUNT>
__device__ __forceinline__ void unit_steps(const uint32_t* w, const uint32_t (&magics)[10],
                                           const uint4* bq,
                                           float (&part)[NT][4]) {
  if constexpr (COUNT > 0) {
    uint32_t a[4];
    a_fragment<BITS, BF16, S0>(w, magics, a);
#pragma unroll
    for (int tt = 0; tt < NT; ++tt) {
      const uint4 b = bq[bfrag_entry(S0 / 2, tt, 0, NT)];
      if constexpr (S0 % 2 == 0) mma16816<BF16>(part[tt], a, b.x, b.y);
      else mma16816<BF16>(part[tt], a, b.z, b.w);
    }
    unit_steps<BITS, BF16, NT, S0 + 1, COUNT - 1>(w, magics, bq, part);
  }
}

// xr: this lane's record (unit_sums) of the iteration's first unit and token tile 0.
// sc: the units' (s, -s z, s, -s z) of rows g, g + 8.
template <int BITS, bool BF16, int NT, int UNITS, int U = 0>
__device__ __forceinline__ void iteration_units(const uint32_t* w, const uint32_t (&magics)[10],
                                                const uint4* bq, const float* xr,
                                                const float4* sc, float (&acc)[NT][4]) {
  if constexpr (U < UNITS) {
    constexpr int SPU = steps_per_iteration(BITS) / UNITS;
    float part[NT][4];
#pragma unroll
    for (int tt = 0; tt < NT; ++tt) {
      if constexpr (carries_offsets(BITS, BF16)) {
        const float4 start = *reinterpret_cast<const float4*>(xr + unit_record(U, tt, 0, NT));
        part[tt][0] = start.x; part[tt][1] = start.y;
        part[tt][2] = start.z; part[tt][3] = start.w;
      } else {  // exact codes: no offset to take back
#pragma unroll
        for (int i = 0; i < 4; ++i) part[tt][i] = 0.f;
      }
    }
    unit_steps<BITS, BF16, NT, U * SPU, SPU>(w, magics, bq, part);
    const float4 s = sc[U];
#pragma unroll
    for (int tt = 0; tt < NT; ++tt) {
      const float2 xs = *reinterpret_cast<const float2*>(xr + unit_record(U, tt, 0, NT) + 4);
      acc[tt][0] = fmaf(s.x, part[tt][0], fmaf(s.y, xs.x, acc[tt][0]));
      acc[tt][1] = fmaf(s.x, part[tt][1], fmaf(s.y, xs.y, acc[tt][1]));
      acc[tt][2] = fmaf(s.z, part[tt][2], fmaf(s.w, xs.x, acc[tt][2]));
      acc[tt][3] = fmaf(s.z, part[tt][3], fmaf(s.w, xs.y, acc[tt][3]));
    }
    iteration_units<BITS, BF16, NT, UNITS, U + 1>(w, magics, bq, xr, sc, acc);
  }
}

// Shared memory of a launch: B fragments and unit records (unit_sums) of one slab; the split-K
// exchange reuses the start afterwards.
struct SmemLayout {
  int slab_pairs, slab_units;
  size_t bfrag_bytes, xrec_bytes, total;
};

inline SmemLayout smem_layout(int bits, int nt, int units, const Plan& p) {
  SmemLayout L;
  L.slab_pairs = p.slab_iters * steps_per_iteration(bits) / 2;
  L.slab_units = p.slab_iters * units;
  L.bfrag_bytes = (size_t)bfrag_entry(L.slab_pairs, 0, 0, nt) * kEntryWords * 4;
  L.xrec_bytes = (size_t)unit_record(L.slab_units, 0, 0, nt) * 4;
  const size_t red = (size_t)kMaxWarps * nt * 4 * 32 * 4;
  L.total = std::max(L.bfrag_bytes + L.xrec_bytes, red);
  return L;
}

template <int BITS, bool BF16, int NT, int UNITS>
__global__ void __launch_bounds__(kMaxWarps * 32, 1)
decode_mma_kernel(const MmaDecodeArgs a, const Plan p) {
  constexpr int STEPS = steps_per_iteration(BITS), WORDS = words_per_lane(BITS);
  constexpr int IK = iteration_k(BITS), UK = IK / UNITS;
  extern __shared__ uint4 smem[];
  const int slab_pairs = p.slab_iters * STEPS / 2, slab_units = p.slab_iters * UNITS;
  uint4* bfrag = smem;
  float* xrec = reinterpret_cast<float*>(bfrag + bfrag_entry(slab_pairs, 0, 0, NT));

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wr = warp / p.WK, wk = warp - wr * p.WK;
  const int64_t tile = (int64_t)blockIdx.x * p.WR + wr;
  const bool tile_ok = tile < a.tiles;
  const int iterations = (int)a.iterations;  // < 2^31 (host check)
  // This warp's words: iteration i of its tile at wsrc + i * 32 * WORDS (a row past N reads
  // tile 0 and stores nothing).
  const uint32_t* wsrc = a.frag + ((tile_ok ? tile : 0) * a.iterations * 32 + lane) * WORDS;
  // (a tile past N computes on tile 0 and stores nothing: no branch in the loop)
  const float4* params = reinterpret_cast<const float4*>(a.params) +
                         (tile_ok ? tile : 0) * a.groups * 8 + b_token(lane);
  // The magic exponent pairs of every field position f, in registers (a_register).
  uint32_t magics[10];
#pragma unroll
  for (int f = 0; f < 10; ++f) magics[f] = half_pair(field_magic_bits(BF16, f));
  const int gshift = min(a.gshift, 31);      // inputs < 2^31 (host check): 31 = one group

  float acc[NT][4];
#pragma unroll
  for (int tt = 0; tt < NT; ++tt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[tt][i] = 0.f;

  // Slabs of slab_iters iterations (a multiple of WK, the same for every warp, so the barriers
  // match); inside one, warp wk computes iterations wk, wk + WK, ... The next iteration's words
  // are loaded before the current one is computed, across slab boundaries too; past a tile's
  // last iteration that load reads the next tile's words or the layout's tail (kFragTail
  // iterations after the last tile), which nothing uses: no branch around the load.
  const uint32_t* wp = wsrc + wk * 32 * WORDS;
  const int stride = p.WK * 32 * WORDS;
  uint32_t cur[WORDS], nxt[WORDS];
  load_words<WORDS>(wp, cur);
  int k0 = wk * IK;  // first input of the warp's current iteration
  for (int slab_base = 0; slab_base < iterations; slab_base += p.slab_iters) {
    const int iters_here = min(p.slab_iters, iterations - slab_base);
    __syncthreads();  // every warp is done with the previous slab
    stage_pairs<NT>(a, p.x32, (int64_t)slab_base * IK, iters_here * STEPS / 2, threadIdx.x,
                    blockDim.x, reinterpret_cast<uint32_t*>(bfrag));
    __syncthreads();
    unit_sums<BITS, BF16, NT>(a.M, iters_here * UNITS, UK / 32, threadIdx.x, blockDim.x,
                              reinterpret_cast<const uint32_t*>(bfrag), xrec);
    __syncthreads();
    // this lane's entry of the warp's first iteration's first step pair and token tile 0, and
    // its record of that iteration's first unit (mma_stage.h)
    const uint4* bq = bfrag + bfrag_entry(wk * (STEPS / 2), 0, lane, NT);
    const float* xr = xrec + unit_record(wk * UNITS, 0, lane & 3, NT);
    // One iteration: compute the words in `w` while the next iteration's load into `into` is in
    // flight. Two per loop trip with the buffers' roles swapped: no register copies.
    auto iteration = [&](const uint32_t (&w)[WORDS], uint32_t (&into)[WORDS]) {
      wp += stride;
      load_words<WORDS>(wp, into);
      // Several units per iteration are consecutive groups (a unit is then a group and an
      // iteration starts at a group's start): one address, the units at fixed offsets from it.
      const float4* sc_iter = params + ((uint32_t)k0 >> gshift) * 8u;
      float4 sc[UNITS];
#pragma unroll
      for (int u = 0; u < UNITS; ++u) sc[u] = __ldg(sc_iter + u * 8);
      iteration_units<BITS, BF16, NT, UNITS>(w, magics, bq, xr, sc, acc);
      bq += bfrag_entry(p.WK * (STEPS / 2), 0, 0, NT);  // WK iterations on
      xr += unit_record(p.WK * UNITS, 0, 0, NT);
      k0 += p.WK * IK;
    };
    int j = wk;
    for (; j + p.WK < iters_here; j += 2 * p.WK) {
      iteration(cur, nxt);
      iteration(nxt, cur);
    }
    if (j < iters_here) {  // one left: its successor arrives in nxt
      iteration(cur, nxt);
#pragma unroll
      for (int i = 0; i < WORDS; ++i) cur[i] = nxt[i];
    }
  }

  // Split-K: the WK warps of a tile add up in shared memory, in warp order.
  float* red = reinterpret_cast<float*>(smem);
  __syncthreads();
  if (p.WK > 1) {
#pragma unroll
    for (int tt = 0; tt < NT; ++tt)
#pragma unroll
      for (int i = 0; i < 4; ++i) red[((warp * NT + tt) * 4 + i) * 32 + lane] = acc[tt][i];
    __syncthreads();
    if (wk == 0)
      for (int k = 1; k < p.WK; ++k)
#pragma unroll
        for (int tt = 0; tt < NT; ++tt)
#pragma unroll
          for (int i = 0; i < 4; ++i)
            acc[tt][i] += red[(((warp + k) * NT + tt) * 4 + i) * 32 + lane];
  }
  if (wk != 0 || !tile_ok) return;
#pragma unroll
  for (int tt = 0; tt < NT; ++tt)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t n = tile * kTileRows + c_row(lane, i);
      const int64_t m = tt * kTokens + c_token(lane, i);
      if (n >= a.N || m >= a.M) continue;
      float v = acc[tt][i];
      if (a.bias) v += load_f(a.bias, a.bias_dtype, n);
      const int64_t o = m * a.ldo + n;
      if (a.accumulate) v += load_f(a.out, a.out_dtype, o);
      store_f(a.out, a.out_dtype, o, v);
    }
}

inline int floor_pow2(int64_t v) {
  int p = 1;
  while (p * 2 <= v && p < (1 << 20)) p *= 2;
  return p;
}

template <int BITS, bool BF16, int NT, int UNITS>
void launch_units(const MmaDecodeArgs& a, const Plan& p, dim3 grid, cudaStream_t s) {
  const SmemLayout L = smem_layout(BITS, NT, UNITS, p);
  auto kernel = decode_mma_kernel<BITS, BF16, NT, UNITS>;
  if (L.total > 48 * 1024)
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    (int)L.total),
               "qmatmul_cuda_mma", "cudaFuncSetAttribute", a);
  kernel<<<grid, dim3(p.WR * p.WK * 32), L.total, s>>>(a, p);
}

// Units per iteration: iteration_k / min(iteration_k, group size); the compiled cases.
template <int BITS, bool BF16, int NT>
void launch_nt(const MmaDecodeArgs& a, const Plan& p, dim3 grid, cudaStream_t s) {
  switch (a.units) {
    case 1: launch_units<BITS, BF16, NT, 1>(a, p, grid, s); break;
    case 2:
      if constexpr (steps_per_iteration(BITS) % 2 == 0 && iteration_k(BITS) >= 64)
        launch_units<BITS, BF16, NT, 2>(a, p, grid, s);
      break;
    case 4:
      if constexpr (iteration_k(BITS) >= 128) launch_units<BITS, BF16, NT, 4>(a, p, grid, s);
      break;
    default:
      if constexpr (iteration_k(BITS) >= 256) launch_units<BITS, BF16, NT, 8>(a, p, grid, s);
      break;
  }
}

template <int BITS>
void launch_bits(const MmaDecodeArgs& a, const Plan& p, dim3 grid, cudaStream_t s) {
  const bool bf16 = a.x_dtype == kBFloat16;
  const bool two = a.M > kTokens;
  if (bf16) {
    if (two) launch_nt<BITS, true, 2>(a, p, grid, s);
    else launch_nt<BITS, true, 1>(a, p, grid, s);
  } else {
    if (two) launch_nt<BITS, false, 2>(a, p, grid, s);
    else launch_nt<BITS, false, 1>(a, p, grid, s);
  }
}

}  // namespace decode_mma
}  // namespace cuda
}  // namespace pyengine
