"""Backend "triton": one fused Triton kernel per call for the quantised crossbar GEMM.

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
from typing import Optional

import torch

if torch.version.cuda is None and torch.version.hip is None and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton
    import triton.language as tl
except Exception as err:  # any failure to load Triton means: no triton backend (``_ops`` skips it)
    raise ImportError(f"xma2_ops.triton_kernels needs Triton: {err}") from err

from .config import MAX_ADC_CLIP, GemmParams, adc_multiply_shift

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICES = ("cuda", "cpu") if _INTERPRET else ("cuda",)

_MAX_X_BITS = 16  # input magnitude bits per polarity (as the C++ kernels)
_MAX_W_BITS = 15  # weight magnitude bits per polarity
_MAX_ROWS = 1 << 16  # keeps every int32 partial dot exact (module docstring)
_MAX_COLS = 1 << 16  # as rows (XbarConfig's limit)
_MAX_ADC_LEVELS = (1 << 24) - 1  # n = min(2^adc_bits - 1, clip) with adc_bits <= 24
_MAX_FRAC_BITS = 16  # DeviceModel.frac_bits
_MAX_G_DIGITS = 5  # base-128 digits of an int32 conductance (< 2^31 <= 2^35)
# Tile sizes picked from ptxas register/spill reports for sm_80 and sm_90 (Triton compiled ahead of
# time, scripts/check_triton_compile.py prints them; no GPU timings yet): a 64 x 64 output block with
# 8 warps; a row tile of up to 128 rows (the default crossbar) has its codes loaded once and kept in
# registers, with a 64 x 32 block above 64 rows (no spills at the default config; 64 x 64 spills
# ~200 bytes); longer row tiles stream K in steps of 32.  The cell kernel (int32 conductances of up to
# 5 base-128 digits) keeps its codes in registers up to 64 rows.
_BLOCK_M = 64
_BLOCK_N = 64
_BLOCK_N_WIDE_K = 32
_NUM_WARPS = 8
_MAX_SINGLE_K = 128
_CELL_MAX_SINGLE_K = 64
_STREAM_K = 32


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


# ------------------------------------------------------------------ host side: checks
def _check_codes(name: str, codes: torch.Tensor, lo: int, hi: int) -> None:
    if codes.numel() and not (int(codes.min()) >= lo and int(codes.max()) <= hi):
        raise RuntimeError(f"xbar: {name} must hold codes in [{lo}, {hi}], "
                           f"got [{int(codes.min())}, {int(codes.max())}]")


def _check_params(p: GemmParams) -> None:
    """The parameter checks of the C++ ops (csrc/xbar_check.h make_params_checked)."""
    if not 1 <= p.rows <= _MAX_ROWS:
        raise RuntimeError(f"xbar: rows must be in [1, {_MAX_ROWS}], got {p.rows}")
    if not 1 <= p.cols <= _MAX_COLS:
        raise RuntimeError(f"xbar: cols must be in [1, {_MAX_COLS}], got {p.cols}")
    lo, hi = (2, _MAX_X_BITS + 1) if p.input_signed else (1, _MAX_X_BITS)
    if not lo <= p.input_bits <= hi:
        raise RuntimeError(f"xbar: input_bits must be in [{lo}, {hi}] (input_signed={p.input_signed}), "
                           f"got {p.input_bits}")
    if not 2 <= p.weight_bits <= _MAX_W_BITS + 1:
        raise RuntimeError(f"xbar: weight_bits must be in [2, {_MAX_W_BITS + 1}], got {p.weight_bits}")
    if not 1 <= p.dac_bits <= 8:
        raise RuntimeError(f"xbar: dac_bits must be in [1, 8], got {p.dac_bits}")
    if not 1 <= p.cell_bits <= 8:
        raise RuntimeError(f"xbar: cell_bits must be in [1, 8], got {p.cell_bits}")
    if not 1 <= p.adc_clip <= MAX_ADC_CLIP:
        raise RuntimeError(f"xbar: adc_clip must be in [1, 2^32], got {p.adc_clip}")
    if not 0 <= p.adc_levels <= _MAX_ADC_LEVELS:
        raise RuntimeError(f"xbar: adc_levels must be in [0, 2^24 - 1] (0 = ideal ADC), got {p.adc_levels}")
    if p.adc_levels > p.adc_clip:
        raise RuntimeError(f"xbar: adc_levels must be <= adc_clip (n = min(2^adc_bits - 1, clip)), got "
                           f"adc_levels={p.adc_levels}, adc_clip={p.adc_clip}")


def _check_x(x_codes: torch.Tensor) -> None:
    if x_codes.dim() != 2:
        raise RuntimeError(f"xbar: x_codes must be [M, K], got {tuple(x_codes.shape)}")
    if x_codes.dtype != torch.int32:
        raise RuntimeError(f"xbar: x_codes must be int32, got {x_codes.dtype}")


def _check(x_codes: torch.Tensor, w_codes: torch.Tensor, p: GemmParams) -> None:
    """Shapes, dtypes, devices and parameters (no data: also inside the ops, under tracing)."""
    if x_codes.dim() != 2 or w_codes.dim() != 2:
        raise RuntimeError(f"xbar: x_codes must be [M, K] and w_codes [K, N], got {tuple(x_codes.shape)} "
                           f"and {tuple(w_codes.shape)}")
    if x_codes.dtype != torch.int32 or w_codes.dtype != torch.int32:
        raise RuntimeError(f"xbar: x_codes and w_codes must be int32, got {x_codes.dtype} and {w_codes.dtype}")
    if x_codes.shape[1] != w_codes.shape[0]:
        raise RuntimeError(f"xbar: x_codes has K={x_codes.shape[1]} but w_codes has K={w_codes.shape[0]}")
    if x_codes.device != w_codes.device:
        raise RuntimeError(f"xbar: x_codes and w_codes must be on one device, got {x_codes.device} and "
                           f"{w_codes.device}")
    _check_params(p)


def _check_x_values(x_codes: torch.Tensor, p: GemmParams) -> None:
    qx = (1 << p.x_bits) - 1
    _check_codes("x_codes", x_codes, -qx if p.input_signed else 0, qx)


def _check_data(x_codes: torch.Tensor, w_codes: torch.Tensor, p: GemmParams) -> None:
    _check_x_values(x_codes, p)
    qw = (1 << (p.weight_bits - 1)) - 1
    _check_codes("w_codes", w_codes, -qw, qw)


def _check_coefs(x_codes, n: int, n_tiles: int, w_name: str, wb, wt, coef_b, coef_t, op: str) -> None:
    """The coefficient and task-weight checks of mvm / cell_mvm (shapes, dtypes, devices)."""
    if (wt is None) != (coef_t is None):
        raise RuntimeError(f"{op}: {w_name[1]} and coef_t must be given together")
    if coef_b.dtype not in (torch.float32, torch.float64):
        raise RuntimeError(f"{op}: coef_b must be float32 or float64, got {coef_b.dtype}")
    if coef_b.device != x_codes.device:
        raise RuntimeError(f"{op}: coef_b must be on {x_codes.device} (like x_codes), got {coef_b.device}")
    if tuple(coef_b.shape) != (n_tiles, n):
        raise RuntimeError(f"{op}: coef_b must be [Tr, N] = [{n_tiles}, {n}], got {tuple(coef_b.shape)}")
    if wt is not None:
        if wt.shape != wb.shape or wt.dtype != torch.int32:
            raise RuntimeError(f"{op}: {w_name[1]} must be int32 of shape {tuple(wb.shape)} (like {w_name[0]}), "
                               f"got {wt.dtype} of shape {tuple(wt.shape)}")
        if coef_t.shape != coef_b.shape or coef_t.dtype != coef_b.dtype:
            raise RuntimeError(f"{op}: coef_t must match coef_b in shape and dtype")
        if wt.device != x_codes.device or coef_t.device != x_codes.device:
            raise RuntimeError(f"{op}: {w_name[1]} and coef_t must be on x_codes' device")


_CELL_NAMES = ("gb", "gt")


def _check_cells(x_codes: torch.Tensor, gq: torch.Tensor, p: GemmParams, frac_bits: int, name: str = "gq") -> None:
    """Shapes, dtypes, devices and parameters of a cell call (no data)."""
    _check_x(x_codes)
    _check_params(p)
    if gq.dim() != 4 or gq.dtype != torch.int32:
        raise RuntimeError(f"xbar_cells: {name} must be int32 [2, S, K, N] (polarity, slice, row, column), got "
                           f"{gq.dtype} of shape {tuple(gq.shape)}")
    want = (2, p.slices, x_codes.shape[1])
    if tuple(gq.shape[:3]) != want:
        raise RuntimeError(f"xbar_cells: {name} must be [2, S, K, N] with S = {p.slices} slices (weight_bits="
                           f"{p.weight_bits}, cell_bits={p.cell_bits}) and K = {x_codes.shape[1]} (x_codes), got "
                           f"{tuple(gq.shape)}")
    if gq.device != x_codes.device:
        raise RuntimeError(f"xbar_cells: x_codes and {name} must be on one device, got {x_codes.device} and "
                           f"{gq.device}")
    if isinstance(frac_bits, bool) or not isinstance(frac_bits, int) or not 0 <= frac_bits <= _MAX_FRAC_BITS:
        raise RuntimeError(f"xbar_cells: frac_bits must be an int in [0, {_MAX_FRAC_BITS}], got {frac_bits!r}")


def _cell_digits(p: GemmParams, k: int, frac_bits: int, *gqs) -> int:
    """Checks the conductances' values; returns the base-128 digits the kernel splits them into.

    Refused, with the bound in the message: a negative conductance, and any whose partial sums
    could leave int64 anywhere in the kernel -- P_F <= R (2^db - 1) g_max, the ADC numerator
    2 P_F n + clip 2^F, and the shift-and-add T_int (bounded by the sum of its terms' magnitudes)."""
    g_max = 0
    for name, g in gqs:
        if g is not None and g.numel():
            lo, hi = torch.aminmax(g)
            lo, hi = int(lo), int(hi)
            if lo < 0:
                raise RuntimeError(f"xbar_cells: {name} must hold conductances >= 0, got {lo}")
            g_max = max(g_max, hi)
    rows = max(1, min(p.rows, k))
    shifts_w = sum(1 << (j * p.cell_bits) for j in range(p.slices))
    if p.adc_levels == 0:  # code = P_F; sum over input polarities and chunks of 2^shift P_F <= sum_k |x_k| g
        p_f = rows * ((1 << 7) - 1) * g_max
        t_abs = 2 * rows * ((1 << p.x_bits) - 1) * g_max * shifts_w
        adc = 0
    else:
        p_f = rows * ((1 << p.dac_bits) - 1) * g_max
        shifts_x = sum(1 << (i * p.dac_bits) for i in range(p.chunks))
        t_abs = (2 if p.input_signed else 1) * 2 * p.adc_levels * shifts_x * shifts_w
        adc = 2 * p_f * p.adc_levels + (p.adc_clip << frac_bits)
    worst = max(p_f, t_abs, adc)
    if worst >= 1 << 63:
        raise RuntimeError(f"xbar_cells: conductances up to {g_max} (fixed point, {g_max / 2 ** frac_bits:.4g} level "
                           f"steps) with rows={p.rows} give partial sums or tile sums up to {worst} >= 2^63: "
                           f"they would overflow int64; lower frac_bits, rows or the conductances")
    return max(1, -(-g_max.bit_length() // 7))


# ------------------------------------------------------------------ host side: launches
def _xbar_launch(kernel, x_codes: torch.Tensor, wb_codes: torch.Tensor, wt_codes: Optional[torch.Tensor],
                 coef_b: Optional[torch.Tensor], coef_t: Optional[torch.Tensor], out: torch.Tensor,
                 p: GemmParams) -> None:
    m, k = x_codes.shape
    n = wb_codes.shape[1]
    n_tiles = -(-k // p.rows)
    single_k = p.rows <= _MAX_SINGLE_K
    block_k = max(32, triton.next_power_of_2(p.rows)) if single_k else _STREAM_K
    levels = max(p.adc_levels, 1)  # unused when lossless (levels 0 is the ideal ADC)
    signed_digits = 7  # base-128 digits: |code| < 2^bits needs ceil(bits / 7) of them
    adc_mul = None if p.adc_identity else adc_multiply_shift(p.adc_levels, p.adc_clip, p.pmax)
    mult, shift = adc_mul if adc_mul else (1, 32)
    block_n = _BLOCK_N_WIDE_K if single_k and block_k > 64 else _BLOCK_N
    grid = (triton.cdiv(m, _BLOCK_M), triton.cdiv(n, block_n))
    kernel[grid](
        x_codes, wb_codes, wt_codes if wt_codes is not None else wb_codes,
        coef_b if coef_b is not None else out, coef_t if coef_t is not None else out, out,
        m, n, k, m * n, x_codes.stride(0), x_codes.stride(1), wb_codes.stride(0), wb_codes.stride(1),
        p.rows, n_tiles, p.chunks, p.slices, levels, p.adc_clip, 2 * p.adc_clip, mult, shift - 32,
        X_POLS=2 if p.input_signed else 1, DB=p.dac_bits, CB=p.cell_bits, LOSSLESS=p.adc_identity,
        X_DIGITS=-(-p.x_bits // signed_digits), W_DIGITS=-(-(p.weight_bits - 1) // signed_digits),
        SINGLE_K=single_k, X_T=_narrow_x(p), W_T=tl.int8 if p.weight_bits <= 8 else tl.int16,
        ADC_MUL=adc_mul is not None, T_T=tl.int32 if p.tile_sum_bound < 1 << 31 else tl.int64,
        MVM=coef_b is not None, HAS_T=wt_codes is not None,
        BLOCK_M=_BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=_NUM_WARPS,
    )


def _narrow_x(p: GemmParams):
    """The narrowest integer type that holds every input code (|code| <= 2^x_bits - 1)."""
    if not p.input_signed and p.x_bits <= 8:
        return tl.uint8
    return tl.int16 if p.x_bits <= 15 else tl.int32


def _cell_launch(kernel, x_codes: torch.Tensor, gb: torch.Tensor, gt: Optional[torch.Tensor],
                 coef_b: Optional[torch.Tensor], coef_t: Optional[torch.Tensor], out: torch.Tensor,
                 p: GemmParams, frac_bits: int, g_digits: int) -> None:
    m, k = x_codes.shape
    n = gb.shape[3]
    n_tiles = -(-k // p.rows)
    single_k = p.rows <= _CELL_MAX_SINGLE_K
    block_k = max(32, triton.next_power_of_2(p.rows)) if single_k else _STREAM_K
    ideal = p.adc_levels == 0
    xw = 7 if ideal else p.dac_bits  # ideal ADC: base-128 digits of the input instead of DAC chunks
    grid = (triton.cdiv(m, _BLOCK_M), triton.cdiv(n, _BLOCK_N))
    kernel[grid](
        x_codes, gb, gt if gt is not None else gb,
        coef_b if coef_b is not None else out, coef_t if coef_t is not None else out, out,
        m, n, k, m * n, x_codes.stride(0), x_codes.stride(1), gb.stride(0), gb.stride(1), gb.stride(2), gb.stride(3),
        p.rows, n_tiles, -(-p.x_bits // xw), p.slices, max(p.adc_levels, 1), p.adc_clip << frac_bits,
        2 * (p.adc_clip << frac_bits),
        X_POLS=2 if p.input_signed else 1, XW=xw, CB=p.cell_bits, IDEAL=ideal, X8=xw == 8, G_DIGITS=g_digits,
        SINGLE_K=single_k, MVM=coef_b is not None, HAS_T=gt is not None,
        BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_K=block_k,
        num_warps=_NUM_WARPS,
    )


# ------------------------------------------------------------------ the ops (torch.library.triton_op)
# Each kernel call is a ``torch.library.triton_op`` whose body launches the kernel through
# ``torch.library.wrap_triton``: torch.compile / make_fx see the kernel itself (a
# triton_kernel_wrapper_functional node that Inductor can schedule), not an opaque op.  The bodies
# check shapes, dtypes, devices and parameters only (they also run on fake tensors while tracing);
# the checks of values (codes in range, conductances that could overflow) need the data and live in
# the Python entry points below (tile_sums, mvm, cell_tile_sums, cell_mvm), which call the ops.
#
# The interpreter (TRITON_INTERPRET=1, CPU tensors): torch 2.13's wrap_triton hands an interpreted
# kernel (triton.runtime.interpreter.InterpretedFunction) back unchanged (torch/_library/triton.py,
# _is_interpreted_triton_kernel): there is no triton_kernel_wrapper HOP for it, so the body would
# launch the interpreter on whatever tensors it gets.  Eager calls on CPU tensors are fine (the body
# is the same as on a GPU), but the triton_op's fake impl (its body on FakeTensors) and its
# decomposition under FunctionalTensorMode (AOTAutograd) would hand fake tensors to the interpreter,
# which copies their (absent) storage and fails ("Attempted to set the storage of a tensor on
# device meta to a storage on different device cpu").  So in interpreter mode a body that runs under
# any dispatch mode or on a tensor subclass calls an opaque twin custom op (same schema, fake impl =
# the body's allocation) instead: traced graphs hold the twin, which launches the interpreter on real
# tensors at run time.  On CUDA (compiled Triton) the twins do not exist.
def _interpreted_trace(*tensors) -> bool:
    return _INTERPRET and (torch._C._len_torch_dispatch_stack() > 0
                           or any(t is not None and type(t) is not torch.Tensor for t in tensors))


def _params(*ints) -> GemmParams:
    return GemmParams(*ints)


def _tile_sums_body(x_codes, w_codes, p: GemmParams, launch: bool = True) -> torch.Tensor:
    _check(x_codes, w_codes, p)
    m, k = x_codes.shape
    out = x_codes.new_empty((-(-k // p.rows), m, w_codes.shape[1]), dtype=torch.int64)
    if launch and out.numel():
        _xbar_launch(torch.library.wrap_triton(_xbar_kernel), x_codes, w_codes, None, None, None, out, p)
    return out


def _mvm_body(x_codes, wb_codes, wt_codes, coef_b, coef_t, p: GemmParams, launch: bool = True) -> torch.Tensor:
    _check(x_codes, wb_codes, p)
    m, k = x_codes.shape
    n = wb_codes.shape[1]
    n_tiles = -(-k // p.rows)
    _check_coefs(x_codes, n, n_tiles, ("wb_codes", "wt_codes"), wb_codes, wt_codes, coef_b, coef_t, "xbar_mvm")
    if wt_codes is not None:  # the kernel indexes both weights with wb's strides
        wb_codes, wt_codes, coef_t = wb_codes.contiguous(), wt_codes.contiguous(), coef_t.contiguous()
    y = x_codes.new_zeros((m, n), dtype=coef_b.dtype)
    if launch and y.numel() and n_tiles:
        _xbar_launch(torch.library.wrap_triton(_xbar_kernel), x_codes, wb_codes, wt_codes, coef_b.contiguous(),
                     coef_t, y, p)
    return y


def _cell_tile_sums_body(x_codes, gq, p: GemmParams, frac_bits: int, g_digits: int,
                         launch: bool = True) -> torch.Tensor:
    _check_cells(x_codes, gq, p, frac_bits)
    _check_digits(g_digits)
    m, k = x_codes.shape
    out = x_codes.new_empty((-(-k // p.rows), m, gq.shape[3]), dtype=torch.int64)
    if launch and out.numel():
        _cell_launch(torch.library.wrap_triton(_cell_kernel), x_codes, gq, None, None, None, out, p, frac_bits,
                     g_digits)
    return out


def _cell_mvm_body(x_codes, gb, gt, coef_b, coef_t, p: GemmParams, frac_bits: int, g_digits: int,
                   launch: bool = True) -> torch.Tensor:
    _check_cells(x_codes, gb, p, frac_bits, "gb")
    _check_digits(g_digits)
    m, k = x_codes.shape
    n = gb.shape[3]
    n_tiles = -(-k // p.rows)
    _check_coefs(x_codes, n, n_tiles, _CELL_NAMES, gb, gt, coef_b, coef_t, "xbar_cell_mvm")
    if gt is not None:  # the kernel indexes both with gb's strides
        gb, gt, coef_t = gb.contiguous(), gt.contiguous(), coef_t.contiguous()
    y = x_codes.new_zeros((m, n), dtype=coef_b.dtype)
    if launch and y.numel() and n_tiles:
        _cell_launch(torch.library.wrap_triton(_cell_kernel), x_codes, gb, gt, coef_b.contiguous(), coef_t, y, p,
                     frac_bits, g_digits)
    return y


def _check_digits(g_digits: int) -> None:
    if not 1 <= g_digits <= _MAX_G_DIGITS:
        raise RuntimeError(f"xbar_cells: g_digits must be in [1, {_MAX_G_DIGITS}] (base-128 digits of int32 "
                           f"conductances), got {g_digits}")


Tensor = torch.Tensor


@torch.library.triton_op("xma2_ops::triton_tile_sums", mutates_args=())
def _op_tile_sums(x_codes: Tensor, w_codes: Tensor, rows: int, cols: int, input_bits: int, input_signed: bool,
                  dac_bits: int, weight_bits: int, cell_bits: int, adc_levels: int, adc_clip: int) -> Tensor:
    ints = (rows, cols, input_bits, input_signed, dac_bits, weight_bits, cell_bits, adc_levels, adc_clip)
    if _interpreted_trace(x_codes, w_codes):
        return torch.ops.xma2_ops.triton_tile_sums_interpreted(x_codes, w_codes, *ints)
    return _tile_sums_body(x_codes, w_codes, _params(*ints))


@torch.library.triton_op("xma2_ops::triton_mvm", mutates_args=())
def _op_mvm(x_codes: Tensor, wb_codes: Tensor, wt_codes: Optional[Tensor], coef_b: Tensor, coef_t: Optional[Tensor],
            rows: int, cols: int, input_bits: int, input_signed: bool, dac_bits: int, weight_bits: int,
            cell_bits: int, adc_levels: int, adc_clip: int) -> Tensor:
    ints = (rows, cols, input_bits, input_signed, dac_bits, weight_bits, cell_bits, adc_levels, adc_clip)
    if _interpreted_trace(x_codes, wb_codes, wt_codes, coef_b, coef_t):
        return torch.ops.xma2_ops.triton_mvm_interpreted(x_codes, wb_codes, wt_codes, coef_b, coef_t, *ints)
    return _mvm_body(x_codes, wb_codes, wt_codes, coef_b, coef_t, _params(*ints))


@torch.library.triton_op("xma2_ops::triton_cell_tile_sums", mutates_args=())
def _op_cell_tile_sums(x_codes: Tensor, gq: Tensor, rows: int, cols: int, input_bits: int, input_signed: bool,
                       dac_bits: int, weight_bits: int, cell_bits: int, adc_levels: int, adc_clip: int,
                       frac_bits: int, g_digits: int) -> Tensor:
    ints = (rows, cols, input_bits, input_signed, dac_bits, weight_bits, cell_bits, adc_levels, adc_clip)
    if _interpreted_trace(x_codes, gq):
        return torch.ops.xma2_ops.triton_cell_tile_sums_interpreted(x_codes, gq, *ints, frac_bits, g_digits)
    return _cell_tile_sums_body(x_codes, gq, _params(*ints), frac_bits, g_digits)


@torch.library.triton_op("xma2_ops::triton_cell_mvm", mutates_args=())
def _op_cell_mvm(x_codes: Tensor, gb: Tensor, gt: Optional[Tensor], coef_b: Tensor, coef_t: Optional[Tensor],
                 rows: int, cols: int, input_bits: int, input_signed: bool, dac_bits: int, weight_bits: int,
                 cell_bits: int, adc_levels: int, adc_clip: int, frac_bits: int, g_digits: int) -> Tensor:
    ints = (rows, cols, input_bits, input_signed, dac_bits, weight_bits, cell_bits, adc_levels, adc_clip)
    if _interpreted_trace(x_codes, gb, gt, coef_b, coef_t):
        return torch.ops.xma2_ops.triton_cell_mvm_interpreted(x_codes, gb, gt, coef_b, coef_t, *ints, frac_bits,
                                                               g_digits)
    return _cell_mvm_body(x_codes, gb, gt, coef_b, coef_t, _params(*ints), frac_bits, g_digits)


if _INTERPRET:  # the opaque twins of the ops for traces in interpreter mode (see above)
    def _twin(name: str, body, n_tensors: int) -> None:
        def impl(*args, launch: bool = True):
            ints = args[n_tensors:n_tensors + 9]
            return body(*args[:n_tensors], _params(*ints), *args[n_tensors + 9:], launch=launch)

        schema = str(getattr(torch.ops.xma2_ops, name).default._schema)
        twin = torch.library.custom_op(f"xma2_ops::{name}_interpreted", impl, mutates_args=(),
                                       schema=schema[schema.index("("):])
        twin.register_fake(lambda *args: impl(*args, launch=False))

    _twin("triton_tile_sums", _tile_sums_body, 2)
    _twin("triton_mvm", _mvm_body, 5)
    _twin("triton_cell_tile_sums", _cell_tile_sums_body, 2)
    _twin("triton_cell_mvm", _cell_mvm_body, 5)


# ------------------------------------------------------------------ entry points (the backend's functions)
def tile_sums(x_codes: torch.Tensor, w_codes: torch.Tensor, p: GemmParams) -> torch.Tensor:
    """T_int [Tr, M, N] int64 (contract in xma2_ops/_ops.py)."""
    _check(x_codes, w_codes, p)
    _check_data(x_codes, w_codes, p)
    return torch.ops.xma2_ops.triton_tile_sums(x_codes, w_codes, *p.as_args())


def mvm(x_codes: torch.Tensor, wb_codes: torch.Tensor, wt_codes: Optional[torch.Tensor], coef_b: torch.Tensor,
        coef_t: Optional[torch.Tensor], p: GemmParams) -> torch.Tensor:
    """y [M, N] = sum_r coef_b T_b_int + coef_t T_t_int, in coef_b's dtype (contract in xma2_ops/_ops.py)."""
    _check(x_codes, wb_codes, p)
    m, k = x_codes.shape
    _check_coefs(x_codes, wb_codes.shape[1], -(-k // p.rows), ("wb_codes", "wt_codes"), wb_codes, wt_codes, coef_b,
                 coef_t, "xbar_mvm")
    _check_data(x_codes, wb_codes, p)
    if wt_codes is not None:
        qw = (1 << (p.weight_bits - 1)) - 1
        _check_codes("wt_codes", wt_codes, -qw, qw)
    return torch.ops.xma2_ops.triton_mvm(x_codes, wb_codes, wt_codes, coef_b, coef_t, *p.as_args())


def pack_weights(w_codes: torch.Tensor, p: GemmParams) -> torch.Tensor:
    """The programmed weight's form for ``mvm_packed``: the int32 codes themselves, their range checked
    here, once per programmed weight (xma2_ops/programmed.py), instead of on every call."""
    if w_codes.dim() != 2 or w_codes.dtype != torch.int32:
        raise RuntimeError(f"xbar: w_codes must be int32 [K, N], got {w_codes.dtype} {tuple(w_codes.shape)}")
    _check_params(p)
    qw = (1 << (p.weight_bits - 1)) - 1
    _check_codes("w_codes", w_codes, -qw, qw)
    return w_codes


def mvm_packed(x_codes: torch.Tensor, wb_codes: torch.Tensor, wb_packed: Optional[torch.Tensor],
               wt_codes: Optional[torch.Tensor], wt_packed: Optional[torch.Tensor], coef_b: torch.Tensor,
               coef_t: Optional[torch.Tensor], p: GemmParams) -> torch.Tensor:
    """``mvm`` without a host synchronisation (the layers' path on CUDA): the weights were checked by
    ``pack_weights``; the input codes' range is asserted on the device (``torch._assert_async``: an
    out-of-range code stops the program with a device-side assertion instead of being read back)."""
    for name, codes, packed in (("wb", wb_codes, wb_packed), ("wt", wt_codes, wt_packed)):
        if codes is not None and packed is not None and not (
                packed.shape == codes.shape and packed.dtype == codes.dtype and packed.device == codes.device
                and packed.data_ptr() == codes.data_ptr()):
            raise RuntimeError(f"xbar: {name}_packed is not the packed form of {name}_codes (pack_weights)")
    if (wb_packed is None) or (wt_codes is not None and wt_packed is None):
        return mvm(x_codes, wb_codes, wt_codes, coef_b, coef_t, p)
    _check(x_codes, wb_codes, p)
    m, k = x_codes.shape
    _check_coefs(x_codes, wb_codes.shape[1], -(-k // p.rows), ("wb_codes", "wt_codes"), wb_codes, wt_codes, coef_b,
                 coef_t, "xbar_mvm")
    if x_codes.numel():
        qx = (1 << p.x_bits) - 1
        lo, hi = torch.aminmax(x_codes)
        torch._assert_async((lo >= (-qx if p.input_signed else 0)) & (hi <= qx),
                            f"xbar: x_codes must hold codes in [{-qx if p.input_signed else 0}, {qx}]")
    return torch.ops.xma2_ops.triton_mvm(x_codes, wb_codes, wt_codes, coef_b, coef_t, *p.as_args())


def cell_tile_sums(x_codes: torch.Tensor, gq: torch.Tensor, p: GemmParams, frac_bits: int) -> torch.Tensor:
    """T_int [Tr, M, N] int64 over the cells' fixed-point conductances ``gq`` [2, S, K, N] int32
    (SPEC 7.2; the contract of reference.cell_tile_sums: with the ideal ADC T_int is in units of 2^-F)."""
    _check_cells(x_codes, gq, p, frac_bits)
    _check_x_values(x_codes, p)
    digits = _cell_digits(p, x_codes.shape[1], frac_bits, ("gq", gq))
    return torch.ops.xma2_ops.triton_cell_tile_sums(x_codes, gq, *p.as_args(), frac_bits, digits)


def cell_mvm(x_codes: torch.Tensor, gb: torch.Tensor, gt: Optional[torch.Tensor], coef_b: torch.Tensor,
             coef_t: Optional[torch.Tensor], p: GemmParams, frac_bits: int) -> torch.Tensor:
    """y [M, N] = sum_r coef_b T_b_int + coef_t T_t_int over the cells gb / gt [2, S, K, N] int32, in coef_b's
    dtype, accumulated in float64 (row tile outer, then base, then task; contract in xma2_ops/_ops.py)."""
    _check_cells(x_codes, gb, p, frac_bits, "gb")
    m, k = x_codes.shape
    _check_coefs(x_codes, gb.shape[3], -(-k // p.rows), _CELL_NAMES, gb, gt, coef_b, coef_t, "xbar_cell_mvm")
    _check_x_values(x_codes, p)
    digits = _cell_digits(p, k, frac_bits, ("gb", gb), ("gt", gt))
    return torch.ops.xma2_ops.triton_cell_mvm(x_codes, gb, gt, coef_b, coef_t, *p.as_args(), frac_bits, digits)
