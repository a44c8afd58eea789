// Decode GEMV for small M (1..16): out[m, n] (+)= sum_k x[m, k] * W[n, k] (+ bias[n]), written
// once for every weight source of weight_sources.cuh: the canonical packed weight of
// docs/FORMAT.md (every bits 2, 3, 4, 8: qmatmul_decode) and the Matryoshka bit planes (every
// precision: plane_matmul_cuda); any group size, symmetric or not, fp32 / fp16 / bf16
// activations, scales and outputs. Same contract as qmatmul_simple (QMatmulArgs or
// PlaneMatmulArgs, csrc/common.h): N and K may be a sub-block of the stored weight (row strides ldq
// and lds), x has row stride ldx, `accumulate` adds into the output (the shortcut product arrives
// that way), codes past K are never multiplied by anything but zero.
//
// ---- Work split -------------------------------------------------------------------------------
// Packing block: 32 consecutive codes of a row = `bits` words (FORMAT.md). A lane always handles
// whole packing blocks, so every block lies in one quantization group (group_size % 32 == 0).
// Pass: 32 consecutive packing blocks (1024 codes), one per lane of a warp; lane l of the warp
//   covering pass P takes block b = 32 * P + l, codes k = 32 * b + j, j = 0..31.
// Each warp owns kRows = 4 weight rows: every lane loads the same block of the 4 rows and keeps
//   4 x MT accumulators, so one activation value read from shared memory feeds 4 rows.
// Block of NW = WR * WK warps: WR warps along N (RB = WR * 4 rows per block) times WK warps along
//   K (warp wk takes passes wk, wk + WK, ...; the WK partial sums meet in shared memory at the
//   end: split-K inside the block, no workspace and no atomics, deterministic).
// Activation rows: MT of them per block (MT in {1, 2, 3, 4, 6, 8}, at most Src::kMaxTileM),
//   grid.y = ceil(M / MT) tiles; M = 9..16 takes at least two (each tile reads the weight
//   again, which at these M is cheaper than the FMA work the tiles share). Bit-plane sources
//   stop at MT = 4: their three planes' words per row, two passes deep, leave no registers for
//   6 or 8 rows (sm_90a: 255 registers and spills at MT = 6 and 8).
//
// Heuristic (host, qmatmul_decode), from N, K, M and the SM count:
//   RB = the largest of 32, 16, 8 rows with ceil(N / RB) * grid.y >= 2 * SMs, else 4:
//     big layers get 8-warp blocks over 32 rows (activations staged once per 32 rows);
//     small layers get small blocks, so that N = 1024 still makes 256 blocks.
//   WK = min(8 / WR, floor_pow2(8 / MT), floor_pow2(passes of K)): the warps left over by a
//     small RB split K instead (capped so the staged activations of one step stay <= 32 KiB
//     and every warp has at least one pass of K).
//   If the grid still has fewer than 4 * SMs warps and MT > 2 (small N at M >= 3), the M tile
//     is halved (grid.y doubled) and the choice made again: more blocks and a larger K split
//     for one more read of a weight small enough to stay in L2.
//   Examples (H100, 132 SMs): M = 1: 14336 x 4096 -> RB 32, WK 1, 448 blocks of 8 warps;
//     4096 x 4096 -> RB 8, WK 4, 512 blocks of 8 warps; 1024 x 4096 -> RB 4, WK 4, 256 blocks
//     of 4 warps; 1536 x 576 -> RB 4, WK 1, 384 blocks of 1 warp. M = 8: 1024 x 4096 -> two
//     M tiles of 4, RB 4, WK 2, 512 blocks of 2 warps.
//
// ---- Activations in shared memory -------------------------------------------------------------
// A slab of Q passes (Q a multiple of WK; MT * Q * 4 KiB <= 40 KiB) of x is staged as fp32 with
// zeros past K (and in tile rows past M), together with the sum of x over every packing block:
//   xs  [MT][Q * 1024]: code j of the block of lane l in pass q of the slab sits at
//        q * 1024 + (j / 4) * 128 + l * 4 + (j % 4)
//        so that the warp's float4 read of codes 4i..4i+3 (all lanes, same i) covers 512
//        consecutive bytes: no bank conflicts;
//   xsum[MT][Q * 32]: sum of the block's 32 activations, at q * 32 + l;
//   red [NW][32]: the split-K exchange.
// Staging: a thread takes one (row, packing block) item, reads its 32 activations (16-byte loads
// when the row is aligned and the 8 codes lie inside K) and writes 8 float4 (consecutive threads
// take consecutive blocks: conflict-free stores).
//
// ---- Weights ----------------------------------------------------------------------------------
// A lane's block of one row is `bits` consecutive words at row + bits * b:
//   4 bits: one 16-byte load (uint4); 8 bits: two 16-byte loads; 2 bits: one 8-byte load (uint2);
//   3 bits: three 4-byte loads (a block is 12 bytes, not 16-byte aligned).
// The vector loads need a 16-byte (2 bits: 8-byte) aligned qweight and ldq a multiple of 4
// (2 bits: 2); otherwise (e.g. K = 576 at 2 bits) the same words are read one by one. Across a
// warp the loads of one row cover a contiguous 32 * 4 * bits bytes: fully coalesced. The next
// pass's words and scales are loaded before the current pass is computed (two passes in flight
// per lane: 8 rows' worth of loads).
// Bit planes (PlaneSource<R>): a lane loads the block of each plane the slice reads: 12 bytes of
// plane_hi, for R >= 3 8 bytes of plane_mid (one 8-byte load when aligned), for R >= 6 12 bytes
// of plane_lo; across the warp each plane's loads are contiguous as above.
//
// ---- Dequantization (bit tricks) ---------------------------------------------------------------
// With T = 23 - bits, a code q moved to bits [T, T + bits) of a word and or-ed with 0x3F800000
// (1.0f) is the float v = 1 + q * 2^-bits: one shift (funnel shift for the straddling 3-bit codes)
// and one and-or (a LOP3) per code, no int-to-float conversion. The affine map is folded into the
// scales: with w = (q - z) * s and q = (v - 1) * 2^bits,
//   sum_j x_j w_j = S * sum_j x_j v_j + C * sum_j x_j,   S = s * 2^bits, C = -s * (z + 2^bits)
// per packing block; sum_j x_j is the staged block sum. v lies in [1, 2), so the fp32 products
// keep every bit of q; the cancellation of the x_j * 1 parts costs a factor of about
// (2^bits + z) / |q - z| of fp32 precision.
// Field positions (code j of the block, `bits * j` into the little-endian bit string):
//   2, 4, 8 bits: word j / (32 / bits), at bit (j % (32 / bits)) * bits: shift right or left
//                 to T (compile-time amounts after unrolling);
//   3 bits: code j at bit 3j: j <= 9 in word 0, 11..20 in word 1 (bits 1..30), 22..31 in word 2
//           (bits 2..31); code 10 = bits 30, 31 of word 0 + bit 0 of word 1, code 21 = bit 31 of
//           word 1 + bits 0, 1 of word 2: __funnelshift_r(lo, hi, off - T) brings bits
//           [off, off + 3) of hi:lo to [T, T + 3) in one instruction (off = 30 -> shift 10,
//           off = 31 -> shift 11).
// Bit planes: the slice code c is placed the same way (weight_sources.cuh: R = 2 converts a
// whole plane_hi block to int2 codes with a few word-wide operations, the others combine the
// planes' fields per code) and S, C use the source's unit U instead of 2^bits.
//
// ---- Reduction and epilogue ---------------------------------------------------------------------
// Each lane's 4 x MT sums are reduced over the warp with __shfl_xor_sync (5 steps); lane
// i = r * MT + m then owns output (n0 + r, m0 + m), adds the other K-split warps' values from
// shared memory (fixed order), the bias and (accumulate) the old output, and stores it converted
// to the output dtype.
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
#include "cuda/weight_sources.cuh"

namespace pyengine {
namespace cuda {
namespace decode_gemv {

constexpr int kRows = 4;             // weight rows per warp
constexpr int kMaxWarps = 8;         // warps per block
constexpr int kPassBlocks = 32;      // packing blocks per pass (one per lane)
constexpr int kPassCodes = 32 * kPassBlocks;
constexpr int kSlabFloats = 10240;   // staged activations per block: 40 KiB
constexpr int kMaxTileM = 8;         // activation rows per block, the most any source takes

// What the host decided; the same for every block of a launch.
struct DecodePlan {
  int64_t Kb;   // packing blocks covering K
  int RB;       // weight rows per block (WR * kRows)
  int WK;       // warps splitting K inside a block
  int Q;        // passes per staged slab (a multiple of WK)
  int GT;       // passes covering K, rounded up to a multiple of WK
  int gshift;   // >= 0: group of packing block b = b >> gshift; -1: b / bpg
  int64_t bpg;  // packing blocks per group
  bool wvec;    // vector loads of packed words are aligned
  bool xvec;    // 16-byte loads of activation rows are aligned
};

__device__ __forceinline__ float f4_get(const float4& v, int c) {
  return c == 0 ? v.x : c == 1 ? v.y : c == 2 ? v.z : v.w;
}

// Activations x[mm, k0 .. k0 + 8) as fp32 (k0 a multiple of 8), zero past K and for mm >= M.
template <class Args>
__device__ __forceinline__ void load_x8(const Args& a, bool xvec, int64_t mm, int64_t k0,
                                        float (&v)[8]) {
  if (mm >= a.M || k0 >= a.K) {
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = 0.f;
    return;
  }
  const int64_t base = mm * a.ldx + k0;
  if (xvec && k0 + 8 <= a.K) {
    if (a.x_dtype == kFloat32) {
      const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(a.x) + base);
      const float4 t0 = __ldg(p), t1 = __ldg(p + 1);
      v[0] = t0.x; v[1] = t0.y; v[2] = t0.z; v[3] = t0.w;
      v[4] = t1.x; v[5] = t1.y; v[6] = t1.z; v[7] = t1.w;
    } else {
      // 8 fp16 / bf16 values in 16 bytes; element 2c is the low half of word c.
      const uint4 t = __ldg(reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(a.x) + base));
      const uint32_t words[4] = {t.x, t.y, t.z, t.w};
      const bool bf = a.x_dtype == kBFloat16;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const uint32_t u = words[c];
        if (bf) {
          v[2 * c] = __uint_as_float(u << 16);
          v[2 * c + 1] = __uint_as_float(u & 0xFFFF0000u);
        } else {
          v[2 * c] = __half2float(__ushort_as_half((unsigned short)(u & 0xFFFFu)));
          v[2 * c + 1] = __half2float(__ushort_as_half((unsigned short)(u >> 16)));
        }
      }
    }
    return;
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) v[j] = k0 + j < a.K ? load_f(a.x, a.x_dtype, base + j) : 0.f;
}

// Stages passes [pass0, pass0 + npass) of the MT activation rows m0.. into xs / xsum (layout in
// the header). Every thread of the block takes part; the caller synchronises around it.
template <int MT, class Args>
__device__ __forceinline__ void stage_slab(const Args& a, const DecodePlan& p, int64_t m0,
                                           int pass0, int npass, float* xs, float* xsum) {
  const int blocks = npass * kPassBlocks;  // packing blocks per activation row in this slab
  const int items = MT * blocks;
  for (int it = threadIdx.x; it < items; it += blockDim.x) {
    const int m = it / blocks;
    const int bl = it - m * blocks;        // block within the slab: pass bl / 32, lane bl % 32
    const int q = bl >> 5, ln = bl & 31;
    const int64_t k0 = ((int64_t)(pass0 + q) * kPassBlocks + ln) * 32;
    float4* dst = reinterpret_cast<float4*>(xs + m * p.Q * kPassCodes + q * kPassCodes) + ln;
    float sum = 0.f;
#pragma unroll
    for (int h = 0; h < 4; ++h) {  // codes 8h .. 8h + 7 of the block
      float v[8];
      load_x8(a, p.xvec, m0 + m, k0 + 8 * h, v);
      dst[(2 * h) * 32] = make_float4(v[0], v[1], v[2], v[3]);
      dst[(2 * h + 1) * 32] = make_float4(v[4], v[5], v[6], v[7]);
      sum += ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
    }
    xsum[m * p.Q * kPassBlocks + q * kPassBlocks + ln] = sum;
  }
}

// One lane's loads for one pass: the block's words, scale and zero for each of its kRows rows.
template <class Src>
struct Frag {
  typename Src::Words w[kRows];
  uint32_t s[kRows];
  uint32_t z[kRows];
};

template <class Src>
__device__ __forceinline__ void load_frag(const typename Src::Args& a, const DecodePlan& p,
                                          int64_t n0, int pass, int lane, Frag<Src>& f) {
  const int64_t b = (int64_t)pass * kPassBlocks + lane;
  const bool valid = b < p.Kb;
  // A block lies in one group: g = b / (group_size / 32), a shift for the usual sizes.
  const int64_t g = !valid ? 0 : p.gshift >= 0 ? b >> p.gshift : b / p.bpg;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t n = n0 + r;
    if (valid && n < a.N) {
      Src::load(a, n, b, p.wvec, f.w[r]);
      f.s[r] = load_param_bits(a.scales, a.sz_dtype, n * a.lds + g);
      f.z[r] = a.zeros ? load_param_bits(a.zeros, a.sz_dtype, n * a.lds + g) : 0u;
    } else {
      Src::clear(f.w[r]);
      f.s[r] = 0u;  // scale 0: the row adds nothing (and is never stored)
      f.z[r] = 0u;
    }
  }
}

template <class Src, int MT>
__global__ void __launch_bounds__(kMaxWarps * 32, 1)
decode_gemv_kernel(const typename Src::Args a, const DecodePlan p) {
  extern __shared__ float4 smem4[];
  float* xs = reinterpret_cast<float*>(smem4);          // [MT][Q * 1024]
  float* xsum = xs + MT * p.Q * kPassCodes;             // [MT][Q * 32]
  float* red = xsum + MT * p.Q * kPassBlocks;           // [NW][32]

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wr = warp / p.WK, wk = warp - wr * p.WK;
  const int64_t n0 = (int64_t)blockIdx.x * p.RB + wr * kRows;
  const int64_t m0 = (int64_t)blockIdx.y * MT;
  constexpr float kUnit = Src::kUnit;  // w = ((v - 1) * kUnit - z) * s

  float acc[kRows][MT];
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[r][m] = 0.f;

  // Step t: warp wk computes pass t * WK + wk; a new slab is staged when t * WK hits a multiple
  // of Q (the same t for every warp, so the barriers match).
  const int steps = p.GT / p.WK;
  Frag<Src> cur, nxt;
  load_frag<Src>(a, p, n0, wk, lane, cur);
  for (int t = 0; t < steps; ++t) {
    const int base = t * p.WK;
    if (t + 1 < steps) load_frag<Src>(a, p, n0, base + p.WK + wk, lane, nxt);
    if (base % p.Q == 0) {
      __syncthreads();  // every warp is done with the previous slab
      stage_slab<MT>(a, p, m0, base, min(p.Q, p.GT - base), xs, xsum);
      __syncthreads();
    }
    const int pass = base + wk;
    const int q = base % p.Q + wk;  // pass within the slab
    if ((int64_t)pass * kPassBlocks + lane < p.Kb) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) Src::prepare(cur.w[r]);
      float dot[kRows][MT];
#pragma unroll
      for (int r = 0; r < kRows; ++r)
#pragma unroll
        for (int m = 0; m < MT; ++m) dot[r][m] = 0.f;
      const float4* xq = reinterpret_cast<const float4*>(xs + q * kPassCodes) + lane;
#pragma unroll
      for (int i = 0; i < 8; ++i) {  // codes 4i .. 4i + 3 of the block
        float4 xv[MT];
#pragma unroll
        for (int m = 0; m < MT; ++m) xv[m] = xq[m * p.Q * (kPassCodes / 4) + i * 32];
#pragma unroll
        for (int c = 0; c < 4; ++c) {
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
            const float v = Src::value(cur.w[r], 4 * i + c);
#pragma unroll
            for (int m = 0; m < MT; ++m) dot[r][m] = fmaf(f4_get(xv[m], c), v, dot[r][m]);
          }
        }
      }
      float xb[MT];
#pragma unroll
      for (int m = 0; m < MT; ++m) xb[m] = xsum[m * p.Q * kPassBlocks + q * kPassBlocks + lane];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const float s = param_from_bits(cur.s[r], a.sz_dtype);
        const float z = a.zeros ? param_from_bits(cur.z[r], a.sz_dtype) : Src::kSymmetricZero;
        const float S = s * kUnit;
        const float C = -s * (z + kUnit);
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[r][m] = fmaf(S, dot[r][m], fmaf(C, xb[m], acc[r][m]));
      }
    }
    if (t + 1 < steps) cur = nxt;
  }

  // Warp reduction; afterwards every lane holds every sum.
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int off = 16; off > 0; off >>= 1)
        acc[r][m] += __shfl_xor_sync(0xffffffffu, acc[r][m], off);
  float mine = 0.f;  // lane r * MT + m owns output (n0 + r, m0 + m)
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m)
      if (lane == r * MT + m) mine = acc[r][m];

  if (p.WK > 1) {  // uniform over the block
    red[warp * 32 + lane] = mine;
    __syncthreads();
    if (wk == 0)
      for (int k = 1; k < p.WK; ++k) mine += red[(warp + k) * 32 + lane];
  }
  if (wk == 0 && lane < kRows * MT) {
    const int r = lane / MT, m = lane - (lane / MT) * MT;
    const int64_t n = n0 + r, mm = m0 + m;
    if (n < a.N && mm < a.M) {
      float v = mine;
      if (a.bias) v += load_f(a.bias, a.bias_dtype, n);
      const int64_t o = mm * a.ldo + n;
      if (accumulates(a)) v += load_f(a.out, a.out_dtype, o);
      store_f(a.out, a.out_dtype, o, v);
    }
  }
}

inline int floor_pow2(int64_t v) {
  int p = 1;
  while (p * 2 <= v && p < (1 << 20)) p *= 2;
  return p;
}

// Activation rows per block for `need` rows: the smallest compiled tile that holds them, at
// most max_tile (a source's kMaxTileM).
inline int pick_tile_m(int64_t need, int max_tile) {
  for (int mt : {1, 2, 3, 4, 6, 8})
    if (mt <= max_tile && need <= mt) return mt;
  return max_tile;
}

template <class Src>
void launch_tile(int mt, const typename Src::Args& a, const DecodePlan& p, dim3 grid, dim3 block,
                 size_t smem, cudaStream_t s) {
  switch (mt) {
    case 1: decode_gemv_kernel<Src, 1><<<grid, block, smem, s>>>(a, p); break;
    case 2: decode_gemv_kernel<Src, 2><<<grid, block, smem, s>>>(a, p); break;
    case 3: decode_gemv_kernel<Src, 3><<<grid, block, smem, s>>>(a, p); break;
    default:
      if constexpr (Src::kMaxTileM == 4) {
        decode_gemv_kernel<Src, 4><<<grid, block, smem, s>>>(a, p);
      } else {
        static_assert(Src::kMaxTileM == 8, "a source's tile limit is 4 or 8 rows");
        if (mt == 4)
          decode_gemv_kernel<Src, 4><<<grid, block, smem, s>>>(a, p);
        else if (mt == 6)
          decode_gemv_kernel<Src, 6><<<grid, block, smem, s>>>(a, p);
        else
          decode_gemv_kernel<Src, 8><<<grid, block, smem, s>>>(a, p);
      }
      break;
  }
}

// Plans and launches the decode GEMV for weight source Src. The caller has checked the
// arguments (check_qmatmul_args / check_plane_matmul_args) and that M <= kDecodeMaxM. Raises
// std::runtime_error (naming op and the problem) when a CUDA call fails.
template <class Src>
void launch_decode_gemv(const char* op, const typename Src::Args& a, int device,
                        uintptr_t stream) {
  if (a.M == 0 || a.N == 0) return;
  check_cuda(cudaSetDevice(device), op, "cudaSetDevice", a);
  int sms = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), op,
             "cudaDeviceGetAttribute(MultiProcessorCount)", a);
  sms = std::max(sms, 1);

  DecodePlan p;
  p.Kb = (a.K + 31) / 32;
  const int64_t passes = std::max<int64_t>(1, (p.Kb + kPassBlocks - 1) / kPassBlocks);
  if (passes > (int64_t)1 << 30) throw std::invalid_argument(describe(op, a) + ": K too large");
  // Tiling (heuristic in the header): M tile, rows per block, K split.
  const int64_t target_blocks = 2 * (int64_t)sms, target_warps = 4 * (int64_t)sms;
  constexpr int max_tile = Src::kMaxTileM;
  int split = (int)((a.M + max_tile - 1) / max_tile);  // M tiles wanted
  int mt = 0, wr = 0, tiles_m = 0;
  for (;;) {
    mt = pick_tile_m((a.M + split - 1) / split, max_tile);
    tiles_m = (int)((a.M + mt - 1) / mt);  // no tile past M
    p.RB = kRows;
    for (int rb : {8 * kRows, 4 * kRows, 2 * kRows}) {
      if ((a.N + rb - 1) / rb * tiles_m >= target_blocks) {
        p.RB = rb;
        break;
      }
    }
    wr = p.RB / kRows;
    p.WK = std::min({kMaxWarps / wr, floor_pow2(kMaxWarps / mt),
                     floor_pow2(std::min<int64_t>(passes, kMaxWarps))});
    const int64_t warps_total = (a.N + p.RB - 1) / p.RB * tiles_m * wr * p.WK;
    if (warps_total >= target_warps || mt <= 2) break;
    // Too few warps for the GPU (small N, M > 2): smaller M tiles allow more K split and more
    // blocks, at the price of reading the (small) weight once more per tile.
    split *= 2;
  }
  p.GT = (int)((passes + p.WK - 1) / p.WK * p.WK);
  const int q_cap = std::max(p.WK, kSlabFloats / (mt * kPassCodes) / p.WK * p.WK);
  p.Q = std::min(q_cap, p.GT);

  p.bpg = a.group_size / 32;
  p.gshift = -1;
  if (p.bpg >= p.Kb) {
    p.gshift = 62;  // one group covers K (per channel): g = 0
  } else if ((p.bpg & (p.bpg - 1)) == 0) {
    p.gshift = 0;
    while (((int64_t)1 << p.gshift) < p.bpg) ++p.gshift;
  }

  p.wvec = Src::vector_loads(a);
  const int64_t x_elem = a.x_dtype == kFloat32 ? 4 : 2;
  p.xvec = reinterpret_cast<uintptr_t>(a.x) % 16 == 0 && (a.ldx * x_elem) % 16 == 0;

  const int warps = wr * p.WK;
  const int64_t grid_x = (a.N + p.RB - 1) / p.RB;
  if (grid_x > 0x7FFFFFFF) throw std::invalid_argument(describe(op, a) + ": N too large");
  const dim3 grid((unsigned)grid_x, (unsigned)tiles_m);
  const dim3 block((unsigned)(warps * 32));
  const size_t smem =
      sizeof(float) * ((size_t)mt * p.Q * kPassCodes + (size_t)mt * p.Q * kPassBlocks + (size_t)warps * 32);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  launch_tile<Src>(mt, a, p, grid, block, smem, s);
  check_cuda(cudaGetLastError(), op, "kernel launch", a);
}

}  // namespace decode_gemv

using decode_gemv::launch_decode_gemv;

}  // namespace cuda
}  // namespace pyengine
