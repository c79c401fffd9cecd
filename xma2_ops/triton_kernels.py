"""Backend "triton": one fused Triton kernel per call for the quantised crossbar GEMM.

Each program owns an output block [BLOCK_M, BLOCK_N] and walks the row tiles.  Per row tile it
loads the integer codes (once, when the row tile fits one K block), expands input polarities and
DAC chunks and weight polarities and cell slices in registers, computes every analog partial sum
with ``tl.dot``, applies the ADC of docs/SPEC.md section 3, shift-adds the codes into T_int (int64)
and either stores T_int (``tile_sums``) or accumulates ``coef[r, n] * T_int`` in float64 (``mvm``).

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

from .config import MAX_ADC_CLIP, GemmParams

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICES = ("cuda", "cpu") if _INTERPRET else ("cuda",)

_MAX_X_BITS = 16  # input magnitude bits per polarity (as the C++ kernels)
_MAX_W_BITS = 15  # weight magnitude bits per polarity
_MAX_ROWS = 1 << 16  # keeps every int32 partial dot exact (module docstring)
_MAX_COLS = 1 << 16  # as rows (XbarConfig's limit)
_MAX_ADC_LEVELS = (1 << 24) - 1  # n = min(2^adc_bits - 1, clip) with adc_bits <= 24
# Tile sizes picked from ptxas register/spill reports for sm_80 and sm_90 (Triton compiled ahead of
# time, no GPU timings yet): a 64 x 64 output block with 8 warps keeps spills small while the row tile's
# codes stay in registers up to 64 rows; longer row tiles stream K in steps of 32.
_BLOCK_M = 64
_BLOCK_N = 64
_NUM_WARPS = 8
_MAX_SINGLE_K = 64
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
                  chunks, slices, adc_levels, adc_clip, adc_den,
                  X_POLS: tl.constexpr, DB: tl.constexpr, CB: tl.constexpr, LOSSLESS: tl.constexpr,
                  X_DIGITS: tl.constexpr, W_DIGITS: tl.constexpr, SINGLE_K: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """T_int [BLOCK_M, BLOCK_N] (int64) of one row tile [k0, k_end) (SPEC 3)."""
    t = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int64)
    if LOSSLESS:
        for kb in range(k0, k_end, BLOCK_K):
            x, w = _load_codes(x_ptr, w_ptr, offs_m, offs_n, m_ok, n_ok, kb, k_end, sxm, sxk, swk, swn, BLOCK_K)
            t += _digit_dot(x, w, X_DIGITS, W_DIGITS)
    else:
        if SINGLE_K:  # the whole row tile stays in registers for every (polarity, chunk, slice)
            x, w = _load_codes(x_ptr, w_ptr, offs_m, offs_n, m_ok, n_ok, k0, k_end, sxm, sxk, swk, swn, BLOCK_K)
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
                        code = tl.minimum((2 * p * adc_levels + adc_clip) // adc_den, adc_levels)
                        t += (sx * sw) * (code << (i * DB + j * CB))
    return t


@triton.jit
def _xbar_kernel(x_ptr, wb_ptr, wt_ptr, cb_ptr, ct_ptr, out_ptr,
                 M, N, K, plane, sxm, sxk, swk, swn,
                 rows, n_tiles, chunks, slices, adc_levels, adc_clip, adc_den,
                 X_POLS: tl.constexpr, DB: tl.constexpr, CB: tl.constexpr, LOSSLESS: tl.constexpr,
                 X_DIGITS: tl.constexpr, W_DIGITS: tl.constexpr, SINGLE_K: tl.constexpr,
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
                                  chunks, slices, adc_levels, adc_clip, adc_den, X_POLS, DB, CB, LOSSLESS,
                                  X_DIGITS, W_DIGITS, SINGLE_K, BLOCK_M, BLOCK_N, BLOCK_K)
                acc += coef[None, :] * t.to(tl.float64)
            if HAS_T:
                coef = tl.load(ct_ptr + r * N + offs_n, mask=n_ok, other=0.0).to(tl.float64)
                if tl.max(tl.abs(coef), axis=0) != 0:
                    t = _row_tile_sum(x_ptr, wt_ptr, offs_m, offs_n, m_ok, n_ok, k0, k_end, sxm, sxk, swk, swn,
                                      chunks, slices, adc_levels, adc_clip, adc_den, X_POLS, DB, CB, LOSSLESS,
                                      X_DIGITS, W_DIGITS, SINGLE_K, BLOCK_M, BLOCK_N, BLOCK_K)
                    acc += coef[None, :] * t.to(tl.float64)
        else:
            t = _row_tile_sum(x_ptr, wb_ptr, offs_m, offs_n, m_ok, n_ok, k0, k_end, sxm, sxk, swk, swn,
                              chunks, slices, adc_levels, adc_clip, adc_den, X_POLS, DB, CB, LOSSLESS,
                              X_DIGITS, W_DIGITS, SINGLE_K, BLOCK_M, BLOCK_N, BLOCK_K)
            tl.store(t_ptrs, t, mask=out_ok)
            t_ptrs += plane
    if MVM:
        tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=out_ok)


# ------------------------------------------------------------------ host side
def _check_codes(name: str, codes: torch.Tensor, lo: int, hi: int) -> None:
    if codes.numel() and not (int(codes.min()) >= lo and int(codes.max()) <= hi):
        raise RuntimeError(f"xbar: {name} must hold codes in [{lo}, {hi}], "
                           f"got [{int(codes.min())}, {int(codes.max())}]")


def _check(x_codes: torch.Tensor, w_codes: torch.Tensor, p: GemmParams) -> None:
    """The checks of the C++ ops (csrc/xbar_check.h make_params_checked), plus device agreement."""
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
    qx = (1 << p.x_bits) - 1
    _check_codes("x_codes", x_codes, -qx if p.input_signed else 0, qx)
    qw = (1 << (p.weight_bits - 1)) - 1
    _check_codes("w_codes", w_codes, -qw, qw)


def _launch(x_codes: torch.Tensor, wb_codes: torch.Tensor, wt_codes: Optional[torch.Tensor],
            coef_b: Optional[torch.Tensor], coef_t: Optional[torch.Tensor], out: torch.Tensor,
            p: GemmParams) -> None:
    m, k = x_codes.shape
    n = wb_codes.shape[1]
    n_tiles = -(-k // p.rows)
    single_k = p.rows <= _MAX_SINGLE_K
    block_k = max(32, triton.next_power_of_2(p.rows)) if single_k else _STREAM_K
    levels = max(p.adc_levels, 1)  # unused when lossless (levels 0 is the ideal ADC)
    signed_digits = 7  # base-128 digits: |code| < 2^bits needs ceil(bits / 7) of them
    grid = (triton.cdiv(m, _BLOCK_M), triton.cdiv(n, _BLOCK_N))
    _xbar_kernel[grid](
        x_codes, wb_codes, wt_codes if wt_codes is not None else wb_codes,
        coef_b if coef_b is not None else out, coef_t if coef_t is not None else out, out,
        m, n, k, m * n, x_codes.stride(0), x_codes.stride(1), wb_codes.stride(0), wb_codes.stride(1),
        p.rows, n_tiles, p.chunks, p.slices, levels, p.adc_clip, 2 * p.adc_clip,
        X_POLS=2 if p.input_signed else 1, DB=p.dac_bits, CB=p.cell_bits, LOSSLESS=p.adc_identity,
        X_DIGITS=-(-p.x_bits // signed_digits), W_DIGITS=-(-(p.weight_bits - 1) // signed_digits),
        SINGLE_K=single_k, MVM=coef_b is not None, HAS_T=wt_codes is not None,
        BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_K=block_k,
        num_warps=_NUM_WARPS,
    )


def tile_sums(x_codes: torch.Tensor, w_codes: torch.Tensor, p: GemmParams) -> torch.Tensor:
    """T_int [Tr, M, N] int64 (contract in xma2_ops/_ops.py)."""
    _check(x_codes, w_codes, p)
    m, k = x_codes.shape
    out = torch.empty((-(-k // p.rows), m, w_codes.shape[1]), dtype=torch.int64, device=x_codes.device)
    if out.numel():
        _launch(x_codes, w_codes, None, None, None, out, p)
    return out


def mvm(x_codes: torch.Tensor, wb_codes: torch.Tensor, wt_codes: Optional[torch.Tensor], coef_b: torch.Tensor,
        coef_t: Optional[torch.Tensor], p: GemmParams) -> torch.Tensor:
    """y [M, N] = sum_r coef_b T_b_int + coef_t T_t_int, in coef_b's dtype (contract in xma2_ops/_ops.py)."""
    _check(x_codes, wb_codes, p)
    if (wt_codes is None) != (coef_t is None):
        raise RuntimeError("xbar_mvm: wt_codes and coef_t must be given together")
    m, k = x_codes.shape
    n = wb_codes.shape[1]
    n_tiles = -(-k // p.rows)
    if coef_b.dtype not in (torch.float32, torch.float64):
        raise RuntimeError(f"xbar_mvm: coef_b must be float32 or float64, got {coef_b.dtype}")
    if coef_b.device != x_codes.device:
        raise RuntimeError(f"xbar_mvm: coef_b must be on {x_codes.device} (like x_codes), got {coef_b.device}")
    if tuple(coef_b.shape) != (n_tiles, n):
        raise RuntimeError(f"xbar_mvm: coef_b must be [Tr, N] = [{n_tiles}, {n}], got {tuple(coef_b.shape)}")
    if wt_codes is not None:
        if wt_codes.shape != wb_codes.shape or wt_codes.dtype != torch.int32:
            raise RuntimeError(f"xbar_mvm: wt_codes must be int32 of shape {tuple(wb_codes.shape)}, "
                               f"got {tuple(wt_codes.shape)}")
        if coef_t.shape != coef_b.shape or coef_t.dtype != coef_b.dtype:
            raise RuntimeError("xbar_mvm: coef_t must match coef_b in shape and dtype")
        if wt_codes.device != x_codes.device or coef_t.device != x_codes.device:
            raise RuntimeError("xbar_mvm: wt_codes and coef_t must be on x_codes' device")
        qw = (1 << (p.weight_bits - 1)) - 1
        _check_codes("wt_codes", wt_codes, -qw, qw)
        # the kernel indexes both weights with wb's strides
        wb_codes, wt_codes, coef_t = wb_codes.contiguous(), wt_codes.contiguous(), coef_t.contiguous()
    y = torch.zeros((m, n), dtype=coef_b.dtype, device=x_codes.device)
    if y.numel() and n_tiles:
        _launch(x_codes, wb_codes, wt_codes, coef_b.contiguous(), coef_t, y, p)
    return y
