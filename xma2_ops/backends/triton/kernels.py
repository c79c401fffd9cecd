"""Backend "triton", the device code: one fused Triton kernel per call for the quantised crossbar GEMM
(launch.py launches it, ops.py registers the ops and the backend entries).

Each program owns an output block [BLOCK_M, BLOCK_N] and walks the row tiles.  Per row tile it
loads the integer codes (once, narrowed to 8 or 16 bits where they fit, when the row tile fits one
K block: up to 128 rows), expands input polarities and DAC chunks and weight polarities and cell
slices in registers, computes every analog partial sum with ``tl.dot``, applies the ADC of
docs/SPEC.md section 3 (a 32-bit multiply-high where ``config.adc_multiply_shift`` allows, else an
int64 division), shift-adds the codes into T_int (int32 where its bound allows, else int64) and
either stores T_int (``tile_sums``) or accumulates ``coef[r, n] * T_int`` in float64 (``mvm``).

Exactness of the dots: every operand is an int8 tensor with values in [-128, 127] and the dot
accumulates in int32 (int8 x int8 -> int32 is exact and runs on tensor cores).  Chunks and slices
are below 2^width; 8-bit wide ones (dac_bits or cell_bits = 8) are split into two 4-bit halves.
With rows <= 65536 (checked) a partial dot stays below 65536 * 127 * 127 < 2^31.  Float32 dots
were not used: they are exact only below 2^24, which rows * 255 * 255 passes for rows > 258.

Lossless configs (``GemmParams.adc_identity``: ideal ADC, or adc_levels == adc_clip >= Pmax, where
every ADC code equals its partial sum) skip the slicing: T_int = sum_k x_int * w_int, computed from signed base-128 digits
of the codes (one or two int8 dots for 8-bit codes).

On CPU tensors the kernels run in Triton's interpreter (slow; meant for tests).  Triton reads
TRITON_INTERPRET=1 when it is first imported; with a CPU-only build of torch, where compiled
Triton kernels cannot run at all, this module sets it by default (if Triton is not imported yet).
"""
from __future__ import annotations

import os
import sys

import torch

if torch.version.cuda is None and torch.version.hip is None and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton
    import triton.language as tl
except Exception as err:  # any failure to load Triton means: no triton backend (dispatch skips it)
    raise ImportError(f"xma2_ops.backends.triton needs Triton: {err}") from err

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICES = ("cuda", "cpu") if INTERPRET else ("cuda",)


# ------------------------------------------------------------------ device helpers
@triton.jit
def _dot_i8(a, b):
    """Exact int64 a @ b of int32 tensors holding values in [-128, 127]."""
    return tl.dot(a.to(tl.int8), b.to(tl.int8), out_dtype=tl.int32).to(tl.int64)


@triton.jit
def _dot_b(a, b, B8: tl.constexpr):
    """a @ b for a in [0, 127] and b a field of 8 bits (B8) or at most 7 bits."""
    if B8:
        return (_dot_i8(a, b >> 4) << 4) + _dot_i8(a, b & 15)
    else:
        return _dot_i8(a, b)


@triton.jit
def _split_dot(a, b, A8: tl.constexpr, B8: tl.constexpr):
    """Exact a @ b of non-negative fields of which 8-bit ones (A8, B8) are split into 4-bit halves."""
    if A8:
        return (_dot_b(a >> 4, b, B8) << 4) + _dot_b(a & 15, b, B8)
    else:
        return _dot_b(a, b, B8)


@triton.jit
def _digit_dot(x, w, X_DIGITS: tl.constexpr, W_DIGITS: tl.constexpr):
    """Exact int64 x @ w of signed codes via base-128 digits (the top digit keeps the sign)."""
    t = tl.zeros([x.shape[0], w.shape[1]], dtype=tl.int64)
    for a in tl.static_range(X_DIGITS):
        xd = x >> (7 * a)
        if a < X_DIGITS - 1:
            xd = xd & 127
        for b in tl.static_range(W_DIGITS):
            wd = w >> (7 * b)
            if b < W_DIGITS - 1:
                wd = wd & 127
            t += tl.dot(xd.to(tl.int8), wd.to(tl.int8), out_dtype=tl.int32).to(tl.int64) << (7 * (a + b))
    return t


@triton.jit
def _load_codes(x_ptr, w_ptr, offs_m, offs_n, m_ok, n_ok, k0, k_end, sxm, sxk, swk, swn,
                BLOCK_K: tl.constexpr):
    """x codes [BLOCK_M, BLOCK_K] and w codes [BLOCK_K, BLOCK_N] of rows k0.., zero past k_end."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_ok = offs_k < k_end
    x = tl.load(x_ptr + offs_m[:, None] * sxm + offs_k[None, :] * sxk, mask=m_ok[:, None] & k_ok[None, :], other=0)
    w = tl.load(w_ptr + offs_k[:, None] * swk + offs_n[None, :] * swn, mask=k_ok[:, None] & n_ok[None, :], other=0)
    return x, w


@triton.jit
def _row_tile_sum(x_ptr, w_ptr, offs_m, offs_n, m_ok, n_ok, k0, k_end, sxm, sxk, swk, swn,
                  chunks, slices, adc_levels, adc_clip, adc_den, adc_mult, adc_shift,
                  X_POLS: tl.constexpr, DB: tl.constexpr, CB: tl.constexpr, LOSSLESS: tl.constexpr,
                  X_DIGITS: tl.constexpr, W_DIGITS: tl.constexpr, SINGLE_K: tl.constexpr,
                  X_T: tl.constexpr, W_T: tl.constexpr, ADC_MUL: tl.constexpr, T_T: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """T_int [BLOCK_M, BLOCK_N] (int64) of one row tile [k0, k_end) (SPEC 3)."""
    if LOSSLESS:
        t = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int64)
        for kb in range(k0, k_end, BLOCK_K):
            x, w = _load_codes(x_ptr, w_ptr, offs_m, offs_n, m_ok, n_ok, kb, k_end, sxm, sxk, swk, swn, BLOCK_K)
            t += _digit_dot(x, w, X_DIGITS, W_DIGITS)
    else:
        t = tl.zeros([BLOCK_M, BLOCK_N], dtype=T_T)  # int32 where the host's bound on |T_int| allows
        if SINGLE_K:  # the row tile's codes are loaded once and kept, narrowed to X_T / W_T, for every
            # (polarity, chunk, slice)
            x, w = _load_codes(x_ptr, w_ptr, offs_m, offs_n, m_ok, n_ok, k0, k_end, sxm, sxk, swk, swn, BLOCK_K)
            x = x.to(X_T)
            w = w.to(W_T)
        for px in range(X_POLS):
            sx = 1 - 2 * px  # polarity p of the input: max(sx * x, 0)
            for q in range(2):
                sw = 1 - 2 * q
                for i in range(chunks):
                    if SINGLE_K:
                        xc = (tl.maximum(x * sx, 0) >> (i * DB)) & ((1 << DB) - 1)
                    for j in range(slices):
                        if SINGLE_K:
                            wc = (tl.maximum(w * sw, 0) >> (j * CB)) & ((1 << CB) - 1)
                            if DB == 8 or CB == 8:
                                p = _split_dot(xc, wc, DB == 8, CB == 8)
                            else:  # inline: each nested call costs much in the interpreter
                                p = tl.dot(xc.to(tl.int8), wc.to(tl.int8), out_dtype=tl.int32).to(tl.int64)
                        else:  # large row tiles: stream K blocks per partial sum (codes re-read from cache)
                            p = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int64)
                            for kb in range(k0, k_end, BLOCK_K):
                                xb, wb = _load_codes(x_ptr, w_ptr, offs_m, offs_n, m_ok, n_ok, kb, k_end,
                                                     sxm, sxk, swk, swn, BLOCK_K)
                                xc = (tl.maximum(xb * sx, 0) >> (i * DB)) & ((1 << DB) - 1)
                                wc = (tl.maximum(wb * sw, 0) >> (j * CB)) & ((1 << CB) - 1)
                                if DB == 8 or CB == 8:
                                    p += _split_dot(xc, wc, DB == 8, CB == 8)
                                else:
                                    p += tl.dot(xc.to(tl.int8), wc.to(tl.int8), out_dtype=tl.int32).to(tl.int64)
                        # ADC: clamp(floor((2 P n + clip) / (2 clip)), 0, n); P >= 0 so // is floor
                        if ADC_MUL:  # the same codes by a multiply-high (config.adc_multiply_shift): all int32
                            num = p.to(tl.int32) * (2 * adc_levels) + adc_clip
                            code = tl.minimum(tl.umulhi(num, adc_mult) >> adc_shift, adc_levels)
                        else:  # int64 division (slow on GPUs)
                            code = tl.minimum((2 * p * adc_levels + adc_clip) // adc_den, adc_levels)
                        t += (sx * sw) * (code.to(T_T) << (i * DB + j * CB))
    return t.to(tl.int64)


@triton.jit
def _xbar_kernel(x_ptr, wb_ptr, wt_ptr, cb_ptr, ct_ptr, out_ptr,
                 M, N, K, plane, sxm, sxk, swk, swn,
                 rows, n_tiles, chunks, slices, adc_levels, adc_clip, adc_den, adc_mult, adc_shift,
                 X_POLS: tl.constexpr, DB: tl.constexpr, CB: tl.constexpr, LOSSLESS: tl.constexpr,
                 X_DIGITS: tl.constexpr, W_DIGITS: tl.constexpr, SINGLE_K: tl.constexpr,
                 X_T: tl.constexpr, W_T: tl.constexpr, ADC_MUL: tl.constexpr, T_T: tl.constexpr,
                 MVM: tl.constexpr, HAS_T: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """MVM: y[m, n] = sum_r cb[r, n] T_b[r, m, n] + ct[r, n] T_t[r, m, n] (float64 accumulation);
    otherwise out[r, m, n] = T_b[r, m, n] (int64)."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    out_off = offs_m[:, None] * N + offs_n[None, :]
    out_ok = m_ok[:, None] & n_ok[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float64)
    t_ptrs = out_ptr + out_off  # T_int of row tile r lives at out[r] (plane = M * N elements further each)
    for r in range(n_tiles):
        k0 = r * rows
        k_end = tl.minimum(k0 + rows, K)
        if MVM:
            # A PE whose coefficients are all zero cannot change y: skip it (here per output block).
            coef = tl.load(cb_ptr + r * N + offs_n, mask=n_ok, other=0.0).to(tl.float64)
            if tl.max(tl.abs(coef), axis=0) != 0:
                t = _row_tile_sum(x_ptr, wb_ptr, offs_m, offs_n, m_ok, n_ok, k0, k_end, sxm, sxk, swk, swn,
                                  chunks, slices, adc_levels, adc_clip, adc_den, adc_mult, adc_shift, X_POLS, DB, CB,
                                  LOSSLESS, X_DIGITS, W_DIGITS, SINGLE_K, X_T, W_T, ADC_MUL, T_T, BLOCK_M, BLOCK_N,
                                  BLOCK_K)
                acc += coef[None, :] * t.to(tl.float64)
            if HAS_T:
                coef = tl.load(ct_ptr + r * N + offs_n, mask=n_ok, other=0.0).to(tl.float64)
                if tl.max(tl.abs(coef), axis=0) != 0:
                    t = _row_tile_sum(x_ptr, wt_ptr, offs_m, offs_n, m_ok, n_ok, k0, k_end, sxm, sxk, swk, swn,
                                      chunks, slices, adc_levels, adc_clip, adc_den, adc_mult, adc_shift, X_POLS, DB, CB,
                                      LOSSLESS, X_DIGITS, W_DIGITS, SINGLE_K, X_T, W_T, ADC_MUL, T_T, BLOCK_M, BLOCK_N,
                                      BLOCK_K)
                    acc += coef[None, :] * t.to(tl.float64)
        else:
            t = _row_tile_sum(x_ptr, wb_ptr, offs_m, offs_n, m_ok, n_ok, k0, k_end, sxm, sxk, swk, swn,
                              chunks, slices, adc_levels, adc_clip, adc_den, adc_mult, adc_shift, X_POLS, DB, CB,
                              LOSSLESS, X_DIGITS, W_DIGITS, SINGLE_K, X_T, W_T, ADC_MUL, T_T, BLOCK_M, BLOCK_N,
                              BLOCK_K)
            tl.store(t_ptrs, t, mask=out_ok)
            t_ptrs += plane
    if MVM:
        tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=out_ok)


# ------------------------------------------------------------------ device model (SPEC 7.2)
@triton.jit
def _cell_dot(xc, g, X8: tl.constexpr, G_DIGITS: tl.constexpr):
    """Exact int64 xc @ g of input chunks xc in [0, 2^XW - 1] (XW <= 8) and conductances g >= 0.

    g is split into G_DIGITS base-128 digits gd in [0, 127] (g < 2^(7 G_DIGITS), checked on the
    host), xc into 4-bit halves when it is 8 bits wide (X8), so every operand fits int8 and
    xc @ g = sum_d 2^(7 d) xc @ gd.  Each int8 dot spans one K block (<= 64 rows), so it is at most
    64 * 127 * 127 < 2^20: exact in its int32 accumulator; the digits are combined in int64, where
    the whole partial sum P_F is below 2^63 (checked on the host)."""
    p = tl.zeros([xc.shape[0], g.shape[1]], dtype=tl.int64)
    if X8:
        xh = (xc >> 4).to(tl.int8)
        xl = (xc & 15).to(tl.int8)
    else:
        x8 = xc.to(tl.int8)
    for d in tl.static_range(G_DIGITS):
        gd = ((g >> (7 * d)) & 127).to(tl.int8)
        if X8:
            pd = ((tl.dot(xh, gd, out_dtype=tl.int32).to(tl.int64) << 4)
                  + tl.dot(xl, gd, out_dtype=tl.int32).to(tl.int64))
        else:
            pd = tl.dot(x8, gd, out_dtype=tl.int32).to(tl.int64)
        p += pd << (7 * d)
    return p


@triton.jit
def _cell_row_tile_sum(x_ptr, g_ptr, offs_m, offs_n, m_ok, n_ok, k0, k_end, sxm, sxk, sgq, sgj, sgk, sgn,
                       chunks, slices, adc_levels, adc_half, adc_den,
                       X_POLS: tl.constexpr, XW: tl.constexpr, CB: tl.constexpr, IDEAL: tl.constexpr,
                       X8: tl.constexpr, G_DIGITS: tl.constexpr, SINGLE_K: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """T_int [BLOCK_M, BLOCK_N] (int64) of one row tile [k0, k_end) over the cells g [2, S, K, N]
    (SPEC 7.2): per weight polarity q, slice j, input polarity and input chunk i of XW bits, the
    exact P_F, the fixed-point ADC, the shift-and-add.  With the ideal ADC (IDEAL: code = P_F, linear
    in the input) the chunks are base-128 digits of the input (XW = 7): fewer dots, the same sum."""
    t = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int64)
    if SINGLE_K:  # the row tile's inputs stay in registers for every (polarity, slice, chunk)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_end
        x = tl.load(x_ptr + offs_m[:, None] * sxm + offs_k[None, :] * sxk, mask=m_ok[:, None] & k_ok[None, :],
                    other=0)
    for q in range(2):
        sw = 1 - 2 * q
        for j in range(slices):
            gp = g_ptr + q * sgq + j * sgj
            if SINGLE_K:
                g = tl.load(gp + offs_k[:, None] * sgk + offs_n[None, :] * sgn, mask=k_ok[:, None] & n_ok[None, :],
                            other=0)
            for px in range(X_POLS):
                sx = 1 - 2 * px  # input polarity: max(sx * x, 0)
                for i in range(chunks):
                    if SINGLE_K:
                        xc = (tl.maximum(x * sx, 0) >> (i * XW)) & ((1 << XW) - 1)
                        p = _cell_dot(xc, g, X8, G_DIGITS)
                    else:  # long row tiles: stream K blocks per partial sum
                        p = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int64)
                        for kb in range(k0, k_end, BLOCK_K):
                            offs_kb = kb + tl.arange(0, BLOCK_K)
                            kb_ok = offs_kb < k_end
                            xb = tl.load(x_ptr + offs_m[:, None] * sxm + offs_kb[None, :] * sxk,
                                         mask=m_ok[:, None] & kb_ok[None, :], other=0)
                            gb = tl.load(gp + offs_kb[:, None] * sgk + offs_n[None, :] * sgn,
                                         mask=kb_ok[:, None] & n_ok[None, :], other=0)
                            xc = (tl.maximum(xb * sx, 0) >> (i * XW)) & ((1 << XW) - 1)
                            p += _cell_dot(xc, gb, X8, G_DIGITS)
                    if IDEAL:
                        code = p
                    else:
                        # clamp(floor((2 P_F n + clip 2^F) / (2 clip 2^F)), 0, n); P_F >= 0 so // is floor
                        code = tl.minimum((2 * p * adc_levels + adc_half) // adc_den, adc_levels)
                    t += (sx * sw) * (code << (i * XW + j * CB))
    return t


@triton.jit
def _cell_kernel(x_ptr, gb_ptr, gt_ptr, cb_ptr, ct_ptr, out_ptr,
                 M, N, K, plane, sxm, sxk, sgq, sgj, sgk, sgn,
                 rows, n_tiles, chunks, slices, adc_levels, adc_half, adc_den,
                 X_POLS: tl.constexpr, XW: tl.constexpr, CB: tl.constexpr, IDEAL: tl.constexpr,
                 X8: tl.constexpr, G_DIGITS: tl.constexpr, SINGLE_K: tl.constexpr,
                 MVM: tl.constexpr, HAS_T: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """As _xbar_kernel over the cells' conductances gb/gt [2, S, K, N] (both with gb's strides):
    MVM: y[m, n] = sum_r cb[r, n] T_b[r, m, n] + ct[r, n] T_t[r, m, n] (float64, row tile outer, then
    base, then task); otherwise out[r, m, n] = T_b[r, m, n] (int64)."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    out_off = offs_m[:, None] * N + offs_n[None, :]
    out_ok = m_ok[:, None] & n_ok[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float64)
    t_ptrs = out_ptr + out_off
    for r in range(n_tiles):
        k0 = r * rows
        k_end = tl.minimum(k0 + rows, K)
        if MVM:
            coef = tl.load(cb_ptr + r * N + offs_n, mask=n_ok, other=0.0).to(tl.float64)
            if tl.max(tl.abs(coef), axis=0) != 0:  # a PE with all-zero coefficients cannot change y
                t = _cell_row_tile_sum(x_ptr, gb_ptr, offs_m, offs_n, m_ok, n_ok, k0, k_end, sxm, sxk,
                                       sgq, sgj, sgk, sgn, chunks, slices, adc_levels, adc_half, adc_den,
                                       X_POLS, XW, CB, IDEAL, X8, G_DIGITS, SINGLE_K, BLOCK_M, BLOCK_N, BLOCK_K)
                acc += coef[None, :] * t.to(tl.float64)
            if HAS_T:
                coef = tl.load(ct_ptr + r * N + offs_n, mask=n_ok, other=0.0).to(tl.float64)
                if tl.max(tl.abs(coef), axis=0) != 0:
                    t = _cell_row_tile_sum(x_ptr, gt_ptr, offs_m, offs_n, m_ok, n_ok, k0, k_end, sxm, sxk,
                                           sgq, sgj, sgk, sgn, chunks, slices, adc_levels, adc_half, adc_den,
                                           X_POLS, XW, CB, IDEAL, X8, G_DIGITS, SINGLE_K, BLOCK_M, BLOCK_N,
                                           BLOCK_K)
                    acc += coef[None, :] * t.to(tl.float64)
        else:
            t = _cell_row_tile_sum(x_ptr, gb_ptr, offs_m, offs_n, m_ok, n_ok, k0, k_end, sxm, sxk,
                                   sgq, sgj, sgk, sgn, chunks, slices, adc_levels, adc_half, adc_den,
                                   X_POLS, XW, CB, IDEAL, X8, G_DIGITS, SINGLE_K, BLOCK_M, BLOCK_N, BLOCK_K)
            tl.store(t_ptrs, t, mask=out_ok)
            t_ptrs += plane
    if MVM:
        tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=out_ok)
