"""Triton building blocks shared by the matmul kernels: loading weight tiles (canonical packed
quantized weights, docs/FORMAT.md, or dense weights) and the fused epilogue.

Conventions of every helper here:

* A weight tile covers rows ``offs_n`` (output channels, [BLOCK_N]) and the codes
  ``k0 .. k0 + BLOCK_K - 1`` of the reduction dimension; ``k0`` is a multiple of BLOCK_K, and
  BLOCK_K is a power of two >= 32, so a tile holds whole 32-code packing blocks.
* ``n_lim`` / ``k_lim`` are the used sub-block (the kernel computes with W[:n_lim, :k_lim]);
  anything outside it is masked on load (other=0), so it neither faults nor contributes.
  ``k_lim`` is, by the format's slicing rule, either a multiple of 32 or the stored K (whose
  row is padded to 32 codes), so every 32-code block that starts below ``k_lim`` exists.
* Quantized codes come out as a 3-D tensor ``[BLOCK_N, SEGS, SEG_LEN]`` in natural K order:
  code ``k0 + a * SEG_LEN + b`` sits at ``[:, a, b]``. A segment is one 32-bit word for 2, 4 and
  8 bits (SEG_LEN = 32 / bits codes, loaded as contiguous words, shifts only), and one 32-code
  block of three words for 3 bits (SEG_LEN = 32). A segment never crosses a group boundary
  (groups are multiples of 32 codes), so scales and zeros are per (row, segment).
"""

import triton
import triton.language as tl


@triton.jit
def codes_to_float(codes):
    """uint32 codes (< 2^23) -> exact fp32 without an int->float convert instruction.

    OR-ing c into the mantissa of 2^23 (bit pattern 0x4B000000) gives the float 2^23 + c."""
    return (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def unpack_codes(q_ptr, stride_qn, offs_n, n_lim, k0, k_lim,
                 BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Codes of the tile W[offs_n, k0:k0+BLOCK_K] of a packed int32 qweight [N, words].

    Returns (codes uint32 [BLOCK_N, SEGS, SEG_LEN], seg_k0 int32 [SEGS]) where seg_k0[a] is the
    K index of the first code of segment a. Rows >= n_lim and segments starting at >= k_lim
    are loaded as 0.
    """
    rows = offs_n.to(tl.int64) * stride_qn
    n_ok = offs_n < n_lim
    if BITS == 3:
        # 32 codes = 96 bits = words 3b, 3b+1, 3b+2 of the row. Code j of a block starts at bit
        # 3j of the little-endian string word0 | word1 << 32 | word2 << 64, i.e. in word
        # 3j // 32 at bit 3j % 32. Codes 10 (bits 30..32) and 21 (bits 63..65) straddle two
        # words: their high bits are the low bits of the next word.
        SEGS: tl.constexpr = BLOCK_K // 32
        seg_k0 = k0 + tl.arange(0, SEGS) * 32
        block = seg_k0 // 32
        mask = n_ok[:, None] & (seg_k0 < k_lim)[None, :]
        base = q_ptr + rows[:, None] + (block * 3)[None, :]
        w0 = tl.load(base, mask=mask, other=0)  # static-gpu: weight load
        w1 = tl.load(base + 1, mask=mask, other=0)  # static-gpu: weight load
        w2 = tl.load(base + 2, mask=mask, other=0)  # static-gpu: weight load
        w0 = w0.to(tl.uint32, bitcast=True)[:, :, None]
        w1 = w1.to(tl.uint32, bitcast=True)[:, :, None]
        w2 = w2.to(tl.uint32, bitcast=True)[:, :, None]
        bit = tl.arange(0, 32) * 3
        word_of_code = (bit // 32)[None, None, :]            # 0, 1 or 2
        shift = (bit % 32).to(tl.uint32)[None, None, :]
        low_word = tl.where(word_of_code == 0, w0, tl.where(word_of_code == 1, w1, w2))
        next_word = tl.where(word_of_code == 0, w1, w2)
        straddles = shift > 29                               # shift + 3 > 32: codes 10, 21
        # (32 - shift) & 31 keeps the shift amount legal (< 32) where the lane is unused.
        high_bits = tl.where(straddles, next_word << ((32 - shift) & 31), 0)
        codes = ((low_word >> shift) | high_bits) & 7
    else:
        # 2, 4, 8 bits: word i of a row holds codes i*C .. i*C + C - 1 (C = 32 / bits), code
        # i*C + j at bits [j*bits, (j+1)*bits). One contiguous load of SEGS words per row.
        CODES_PER_WORD: tl.constexpr = 32 // BITS
        SEGS: tl.constexpr = BLOCK_K // CODES_PER_WORD
        word = k0 // CODES_PER_WORD + tl.arange(0, SEGS)
        seg_k0 = word * CODES_PER_WORD
        mask = n_ok[:, None] & (seg_k0 < k_lim)[None, :]
        word_ptrs = q_ptr + rows[:, None] + word[None, :]
        words = tl.load(word_ptrs, mask=mask, other=0)  # static-gpu: weight load
        words = words.to(tl.uint32, bitcast=True)
        shift = (tl.arange(0, CODES_PER_WORD) * BITS).to(tl.uint32)
        codes = (words[:, :, None] >> shift[None, None, :]) & ((1 << BITS) - 1)
    return codes, seg_k0


@triton.jit
def group_params(s_ptr, stride_sn, z_ptr, stride_zn, offs_n, n_lim, k0, seg_k0, k_lim,
                 BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """Scale and zero point (fp32) of each (row, segment) of the tile.

    GROUP_SIZE is the effective group size, or 0 when the whole used K range lies in group 0
    (per-channel weights). Returns (scale, zero), each [BLOCK_N, SEGS] or, when the tile lies in
    one group (GROUP_SIZE a multiple of BLOCK_K, or 0), [BLOCK_N, 1]. Masked rows/segments get
    scale 0 so that they dequantize to exactly 0.
    """
    rows = offs_n.to(tl.int64)
    n_ok = offs_n < n_lim
    if GROUP_SIZE == 0 or GROUP_SIZE % BLOCK_K == 0:
        if GROUP_SIZE == 0:
            g = 0
        else:
            g = k0 // GROUP_SIZE
        scale = tl.load(s_ptr + rows * stride_sn + g, mask=n_ok, other=0.0)
        scale = scale.to(tl.float32)[:, None]
        if HAS_ZEROS:
            zero = tl.load(z_ptr + rows * stride_zn + g, mask=n_ok, other=0.0)
            zero = zero.to(tl.float32)[:, None]
        else:
            zero = tl.full((1, 1), 1 << (BITS - 1), tl.float32)
    else:
        g = (seg_k0 // GROUP_SIZE)[None, :]
        mask = n_ok[:, None] & (seg_k0 < k_lim)[None, :]
        scale = tl.load(s_ptr + rows[:, None] * stride_sn + g, mask=mask, other=0.0)
        scale = scale.to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(z_ptr + rows[:, None] * stride_zn + g, mask=mask, other=0.0)
            zero = zero.to(tl.float32)
        else:
            zero = tl.full((1, 1), 1 << (BITS - 1), tl.float32)
    return scale, zero


@triton.jit
def dequant_tile(q_ptr, stride_qn, s_ptr, stride_sn, z_ptr, stride_zn, offs_n, n_lim, k0, k_lim,
                 BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W[offs_n, k0:k0+BLOCK_K] dequantized, fp32 [BLOCK_N, BLOCK_K]: (q - z) * s."""
    codes, seg_k0 = unpack_codes(q_ptr, stride_qn, offs_n, n_lim, k0, k_lim, BITS, BLOCK_K)
    scale, zero = group_params(s_ptr, stride_sn, z_ptr, stride_zn, offs_n, n_lim, k0, seg_k0,
                               k_lim, BITS, GROUP_SIZE, HAS_ZEROS, BLOCK_K)
    w = (codes_to_float(codes) - zero[:, :, None]) * scale[:, :, None]
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def dense_tile(w_ptr, stride_wn, offs_n, n_lim, k0, k_lim, BLOCK_K: tl.constexpr):
    """W[offs_n, k0:k0+BLOCK_K] of a dense row-major weight (unit stride along K), in its own
    dtype, [BLOCK_N, BLOCK_K]; outside W[:n_lim, :k_lim] it is 0."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = (offs_n < n_lim)[:, None] & (offs_k < k_lim)[None, :]
    ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    return tl.load(ptrs, mask=mask, other=0.0)  # static-gpu: weight load


@triton.jit
def load_words(q_ptr, stride_qn, offs_n, n_lim, word, seg_k0, k_lim):
    """uint32 words [BLOCK_N, SEGS] q[offs_n, word] of a packed int32 tensor (word: [SEGS] word
    indices, the word of segment a starting at K index seg_k0[a]); 0 in rows >= n_lim and in
    segments starting at >= k_lim."""
    mask = (offs_n < n_lim)[:, None] & (seg_k0 < k_lim)[None, :]
    ptrs = q_ptr + (offs_n.to(tl.int64) * stride_qn)[:, None] + word[None, :]
    words = tl.load(ptrs, mask=mask, other=0)  # static-gpu: weight load
    return words.to(tl.uint32, bitcast=True)


@triton.jit
def weight_tile(w_ptr, stride_wn, s_ptr, stride_sn, z_ptr, stride_zn, offs_n, n_lim, k0, k_lim,
                BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_N, BLOCK_K] tile of W (BITS = 0: dense weight in its dtype; else fp32 dequant)."""
    if BITS == 0:
        return dense_tile(w_ptr, stride_wn, offs_n, n_lim, k0, k_lim, BLOCK_K)
    else:
        return dequant_tile(w_ptr, stride_wn, s_ptr, stride_sn, z_ptr, stride_zn, offs_n, n_lim,
                            k0, k_lim, BITS, GROUP_SIZE, HAS_ZEROS, BLOCK_N, BLOCK_K)


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (offs_m [BLOCK_M], offs_n [BLOCK_N]): the rows and columns of its output
    tile of an [M, N] output. Programs go in groups of GROUP_M row tiles; inside a group the row
    tile varies fastest, so consecutive programs share a column tile of W (L2 reuse)."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    programs_per_group = GROUP_M * tiles_n
    first_m = (pid // programs_per_group) * GROUP_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % programs_per_group) % rows_in_group
    pid_n = (pid % programs_per_group) // rows_in_group
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def split_k_program(K, K_PER_SPLIT, BLOCK_N: tl.constexpr):
    """The work of a program of a split-K decode grid (cdiv(N, BLOCK_N), split_k): program
    (i, s) owns output columns offs_n = [i BLOCK_N, (i + 1) BLOCK_N) and the K slice
    [k_begin, k_end) = [s K_PER_SPLIT, (s + 1) K_PER_SPLIT) clipped to K. Returns
    (pid_k = s, offs_n, k_begin, k_end); K_PER_SPLIT is a multiple of BLOCK_K, so no K step
    crosses into the next slice."""
    pid_k = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    return pid_k, offs_n, k_begin, k_end


@triton.jit
def x_tile(x_ptr, stride_xm, offs_m, m_lim, k0, k_lim, BLOCK_K: tl.constexpr):
    """x[offs_m, k0:k0+BLOCK_K] of a row-major activation (unit stride along K), in its dtype,
    [BLOCK_M, BLOCK_K]; outside x[:m_lim, :k_lim] it is 0."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = (offs_m < m_lim)[:, None] & (offs_k < k_lim)[None, :]
    return tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :], mask=mask,
                   other=0.0)


@triton.jit
def dot_acc(a, b, acc, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation. DOT_FP32 upcasts both operands first (the launcher
    sets it for bf16 under the interpreter, whose bf16 dot is wrong); DOT_PRECISION is "ieee"
    for fp32 operands (no TF32 rounding) and "tf32" (ignored) otherwise."""
    if DOT_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def dot_wt(x, w, acc, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + x @ w^T for an x tile [BLOCK_M, BLOCK_K] and a weight tile w [BLOCK_N, BLOCK_K]
    (fp32 dequantized, or dense), w rounded to x's dtype first (the tl.dot operands' dtype)."""
    return dot_acc(x, tl.trans(w.to(x.dtype)), acc, DOT_FP32, DOT_PRECISION)


@triton.jit
def dot_loop(x_ptr, stride_xm, offs_m, m_lim, w_ptr, stride_wn, s_ptr, stride_sn, z_ptr,
             stride_zn, offs_n, n_lim, k_begin, k_end, k_lim,
             BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr,
             DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The tl.dot loop of the 16-row decode form and of the prefill kernel over a canonical
    weight (weight_tile: packed BITS, or dense for BITS = 0): x[offs_m, k_begin:k_end] @
    W[offs_n, k_begin:k_end]^T, fp32 [BLOCK_M, BLOCK_N], in steps of BLOCK_K codes (k_begin a
    multiple of BLOCK_K; x and W are masked at m_lim, n_lim and k_lim)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        x = x_tile(x_ptr, stride_xm, offs_m, m_lim, k0, k_lim, BLOCK_K)
        w = weight_tile(w_ptr, stride_wn, s_ptr, stride_sn, z_ptr, stride_zn, offs_n, n_lim, k0,
                        k_lim, BITS, GROUP_SIZE, HAS_ZEROS, BLOCK_N, BLOCK_K)
        acc = dot_wt(x, w, acc, DOT_FP32, DOT_PRECISION)
    return acc


@triton.jit
def finish_tile(acc, offs_m, offs_n, m_lim, n_lim,
                bias_ptr, stride_b, res_ptr, stride_rm, stride_rr, sc_ptr, stride_sr, stride_sc,
                R, out_ptr, stride_om,
                HAS_BIAS: tl.constexpr, HAS_SHORTCUT: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_R: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The epilogue of every path: acc [BLOCK_M, BLOCK_N] (fp32) + bias[offs_n]
    + residual[offs_m, :R] @ shortcut[:R, offs_n], written once to out[offs_m, offs_n] in out's
    dtype. The shortcut product runs on tl.dot when BLOCK_M >= 16 and as a broadcast
    multiply-reduce below that (the GEMV path, BLOCK_M = 1)."""
    m_ok = offs_m < m_lim
    n_ok = offs_n < n_lim
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_b, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_SHORTCUT:
        rows = offs_m.to(tl.int64) * stride_rm
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_ok = offs_r < R
            res = tl.load(res_ptr + rows[:, None] + offs_r[None, :] * stride_rr,
                          mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            sc = tl.load(sc_ptr + offs_r.to(tl.int64)[:, None] * stride_sr
                         + offs_n[None, :] * stride_sc,
                         mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            if BLOCK_M >= 16:
                acc = dot_acc(res, sc, acc, DOT_FP32, DOT_PRECISION)
            else:
                acc += tl.sum(res.to(tl.float32)[:, :, None] * sc.to(tl.float32)[None, :, :],
                              axis=1)
    ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def finish_split(acc, pid_k, offs_m, offs_n, M, N, part_ptr,
                 bias_ptr, stride_b, res_ptr, stride_rm, stride_rr, sc_ptr, stride_sr, stride_sc,
                 R, out_ptr, stride_om,
                 HAS_BIAS: tl.constexpr, HAS_SHORTCUT: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_R: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 WRITE_PARTIAL: tl.constexpr):
    """The end of a split-K decode program (see split_k_program) with its fp32 sum acc
    [BLOCK_M, BLOCK_N] over its K slice: with one slice (WRITE_PARTIAL off) the epilogue
    (finish_tile) writes out; with several, acc goes to part[pid_k, offs_m, offs_n] of the fp32
    workspace [split_k, M, N] (contiguous), whose reduce kernel adds the epilogue."""
    if not WRITE_PARTIAL:
        finish_tile(acc, offs_m, offs_n, M, N, bias_ptr, stride_b, res_ptr, stride_rm, stride_rr,
                    sc_ptr, stride_sr, stride_sc, R, out_ptr, stride_om, HAS_BIAS, HAS_SHORTCUT,
                    BLOCK_M, BLOCK_R, DOT_FP32, DOT_PRECISION)
    else:
        ptrs = part_ptr + (pid_k * M + offs_m)[:, None] * N + offs_n[None, :]
        tl.store(ptrs, acc, mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


# ---- helpers for layouts made of several packed planes (pyengine/kernels/matryoshka.py) -----------------

@triton.jit
def block_code(w0, w1, w2, J: tl.constexpr, BITS: tl.constexpr):
    """Code J (a compile-time index, 0..31) of 32-code packing blocks whose words are w0, w1,
    w2 (uint32 tensors of one shape, one block per element; BITS = 2 uses w0 and w1, BITS = 3
    all three), so every shift and word choice is a constant.

    Code J occupies bits [J * BITS, (J + 1) * BITS) of the little-endian bit string
    w0 | w1 << 32 | w2 << 64 (docs/FORMAT.md): it starts in word (J * BITS) // 32 at bit
    (J * BITS) % 32; for 3 bits, codes 10 and 21 continue in the next word.
    """
    BIT: tl.constexpr = J * BITS
    SHIFT: tl.constexpr = BIT % 32
    WORD: tl.constexpr = BIT // 32
    if WORD == 0:
        low = w0
        high = w1
    elif WORD == 1:
        low = w1
        high = w2
    else:
        low = w2
        high = w2
    code = low >> SHIFT
    if SHIFT + BITS > 32:
        code = code | (high << (32 - SHIFT))
    return code & ((1 << BITS) - 1)


@triton.jit
def unpack_code_blocks(q_ptr, stride_qn, offs_n, n_lim, k0, k_lim,
                       BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Codes of the tile W[offs_n, k0:k0+BLOCK_K] of a packed int32 qweight [N, words], with
    one segment per 32-code packing block whatever the width (BITS = 2, 3, 4 or 8).

    Returns (codes uint32 [BLOCK_N, BLOCK_K // 32, 32], seg_k0 int32 [BLOCK_K // 32]): code
    k0 + 32 * a + b sits at [:, a, b], seg_k0[a] = k0 + 32 * a. For 3 bits this is
    :func:`unpack_codes`; for 2, 4 and 8 bits (whose :func:`unpack_codes` segments are single
    words) the BITS words of each block are loaded as BITS [BLOCK_N, SEGS] tensors and code b
    is taken from word b // (32 / BITS) at bit (b % (32 / BITS)) * BITS. Codes of planes with
    different widths then line up element by element. Rows >= n_lim and blocks starting at
    >= k_lim are loaded as 0.
    """
    if BITS == 3:
        codes, seg_k0 = unpack_codes(q_ptr, stride_qn, offs_n, n_lim, k0, k_lim, 3, BLOCK_K)
    else:
        SEGS: tl.constexpr = BLOCK_K // 32
        CODES_PER_WORD: tl.constexpr = 32 // BITS
        seg_k0 = k0 + tl.arange(0, SEGS) * 32
        mask = (offs_n < n_lim)[:, None] & (seg_k0 < k_lim)[None, :]
        # block a of the row starts at word (seg_k0[a] / 32) * BITS
        rows = offs_n.to(tl.int64) * stride_qn
        base = q_ptr + rows[:, None] + ((seg_k0 // 32) * BITS)[None, :]
        lane = tl.arange(0, 32)
        word_of_code = (lane // CODES_PER_WORD)[None, None, :]
        shift = ((lane % CODES_PER_WORD) * BITS).to(tl.uint32)[None, None, :]
        # words[:, a, b]: the word holding code b of block a ([BLOCK_N, SEGS, 32] throughout)
        first = tl.load(base, mask=mask, other=0)  # static-gpu: weight load
        first = first.to(tl.uint32, bitcast=True)[:, :, None]
        words = tl.where(word_of_code == 0, first, 0)
        for w in tl.static_range(1, BITS):
            next_words = tl.load(base + w, mask=mask, other=0)  # static-gpu: weight load
            next_words = next_words.to(tl.uint32, bitcast=True)
            words = tl.where(word_of_code == w, next_words[:, :, None], words)
        codes = (words >> shift) & ((1 << BITS) - 1)
    return codes, seg_k0
