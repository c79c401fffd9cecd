"""xbar_conv2d / xbar_linear: argument checks, lowering to the crossbar GEMM, backend choice
and autograd (docs/SPEC.md sections 4-6).

Data path: check -> quantise (reference.py rules) -> lower to x_codes [M, K], w_codes [K, N]
-> one backend kernel -> back to the layer's output layout.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from . import reference as ref
from ._ops import get_backend
from .config import GemmParams, XbarConfig

ScaleArg = Union[None, float, torch.Tensor]
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ------------------------------------------------------------------ lowering of a layer to the GEMM
@dataclass(frozen=True)
class _ConvLowering:
    """Conv2d as X [M, K] @ W [K, N], M = B*Ho*Wo, K = Cin*kh*kw (PyTorch's (c, i, j) order)."""

    x_shape: Tuple[int, ...]
    w_shape: Tuple[int, ...]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]

    @property
    def out_hw(self) -> Tuple[int, int]:
        h, w = self.x_shape[2:]
        kh, kw = self.w_shape[2:]
        return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1 for size, k, s, p, d in
                     zip((h, w), (kh, kw), self.stride, self.padding, self.dilation))

    def unfold(self, t: torch.Tensor) -> torch.Tensor:
        cols = F.unfold(t, self.w_shape[2:], dilation=self.dilation, padding=self.padding, stride=self.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])

    def unfold_codes(self, codes: torch.Tensor, backend) -> torch.Tensor:
        """Integer codes [B, Cin, H, W] -> [M, K], without a float copy when the backend can."""
        if backend.unfold_codes is None:
            return self.unfold(codes.to(torch.float32)).to(codes.dtype)  # codes of <= 16 bits: exact
        return backend.unfold_codes(codes, self.w_shape[2:], self.dilation, self.padding, self.stride)

    def fold_output(self, y: torch.Tensor) -> torch.Tensor:
        ho, wo = self.out_hw
        return y.reshape(self.x_shape[0], ho, wo, self.w_shape[0]).permute(0, 3, 1, 2).contiguous()

    def float_forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, None, self.stride, self.padding, self.dilation)

    def ste_grads(self, gy: torch.Tensor, x: torch.Tensor, w: torch.Tensor):
        """(dL/dx, dL/dw) of float_forward at (x, w) for the GEMM-layout gradient gy [M, N]."""
        g = self.fold_output(gy)
        gx = torch.nn.grad.conv2d_input(self.x_shape, w, g, self.stride, self.padding, self.dilation)
        gw = torch.nn.grad.conv2d_weight(x, self.w_shape, g, self.stride, self.padding, self.dilation)
        return gx, gw


@dataclass(frozen=True)
class _LinearLowering:
    x_shape: Tuple[int, ...]
    w_shape: Tuple[int, ...]

    def unfold(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, self.x_shape[-1])

    def unfold_codes(self, codes: torch.Tensor, backend) -> torch.Tensor:
        return self.unfold(codes)

    def fold_output(self, y: torch.Tensor) -> torch.Tensor:
        return y.reshape(*self.x_shape[:-1], self.w_shape[0])

    def float_forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w)

    def ste_grads(self, gy: torch.Tensor, x: torch.Tensor, w: torch.Tensor):
        gx = (gy @ w).reshape(self.x_shape)
        gw = gy.T @ x.reshape(-1, self.x_shape[-1])
        return gx, gw


# ------------------------------------------------------------------ the two-tier masks as weights/coefficients
def effective_weight(w_b: torch.Tensor, w_t: Optional[torch.Tensor], pe_mask: torch.Tensor, col_scale: torch.Tensor,
                     rows: int, cols: int) -> torch.Tensor:
    """W_eff = m W_t + (1 - m) alpha W_b per PE (SPEC 4), in the weight's own layout [N, ...]."""
    n, k = w_b.shape[0], w_b[0].numel()
    m_kn = ref.expand_tiles(pe_mask, k, n, rows, cols)
    a_kn = ref.expand_rows(col_scale, k, rows)
    w_eff = ((1 - m_kn) * a_kn).T.reshape(w_b.shape) * w_b
    if w_t is not None:
        w_eff = w_eff + m_kn.T.reshape(w_b.shape) * w_t
    return w_eff


def _coefficients(pe_mask, col_scale, s_x, s_w, s_t, cols: int, adc_step: float, dtype, with_task: bool):
    """coef_b, coef_t [Tr, N] such that y = sum_r coef_b T_b_int + coef_t T_t_int (SPEC 4)."""
    m_col = ref.column_tiles(pe_mask, col_scale.shape[1], cols).to(dtype)
    base = s_x.to(dtype) * adc_step
    coef_b = base * (1 - m_col) * col_scale.to(dtype) * s_w.to(dtype)
    coef_t = base * m_col * s_t.to(dtype) if with_task else None
    return coef_b, coef_t


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Quantisers run in x's dtype, half precisions in float32 (so 16-bit codes stay exact)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _QuantizedXbar(torch.autograd.Function):
    """The bit-sliced crossbar forward; exact gradients for pe_mask/col_scale (they act after the
    ADC), straight-through gradients for x and the weights (SPEC 5)."""

    @staticmethod
    def forward(ctx, x, w_b, w_t, pe_mask, col_scale, s_x, s_w, s_t, lowering, params: GemmParams,
                adc_step: float, backend):
        cd = _compute_dtype(x)
        x_int = ref.quantize_input(x.to(cd), s_x.to(cd), params.input_bits, params.input_signed)
        x_codes = lowering.unfold_codes(x_int.to(_code_dtype(params, backend)), backend)
        wb_codes = _weight_codes(w_b, s_w, params.weight_bits, cd)
        use_task = w_t is not None and bool((pe_mask != 0).any())
        wt_codes = _weight_codes(w_t, s_t, params.weight_bits, cd) if use_task else None
        coef_b, coef_t = _coefficients(pe_mask, col_scale, s_x, s_w, s_t, params.cols, adc_step, cd, use_task)
        y = backend.mvm(x_codes, wb_codes, wt_codes, coef_b, coef_t, params)
        # The codes are kept for the exact mask/scale gradients (they are small: one byte per entry
        # for inputs of up to 8 bits on the CPU backend).
        keep = x_codes if ctx.needs_input_grad[3] or ctx.needs_input_grad[4] else None
        ctx.save_for_backward(x, w_b, w_t, pe_mask, col_scale, s_x, s_w, s_t, keep)
        ctx.meta = (lowering, params, adc_step, backend, use_task)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, gy):
        x, w_b, w_t, pe_mask, col_scale, s_x, s_w, s_t, x_codes = ctx.saved_tensors
        lowering, params, adc_step, backend, use_task = ctx.meta
        need = ctx.needs_input_grad
        cd = _compute_dtype(x)
        gx = gwb = gwt = gm = ga = None
        gy = gy.to(cd)
        if need[3] or need[4]:
            # Exact: y is linear in the coefficients, dy/dcoef[r, n] = T_int[r, :, n].
            g_b = backend.coef_gradient(x_codes, _weight_codes(w_b, s_w, params.weight_bits, cd), gy, params)
            g_t = (backend.coef_gradient(x_codes, _weight_codes(w_t, s_t, params.weight_bits, cd), gy, params)
                   if w_t is not None else None)
            with torch.enable_grad():
                m_ = pe_mask.detach().requires_grad_()
                a_ = col_scale.detach().requires_grad_()
                coef_b, coef_t = _coefficients(m_, a_, s_x, s_w, s_t, params.cols, adc_step, torch.float64,
                                               g_t is not None)
                outs, grads = [coef_b], [g_b]
                if g_t is not None:
                    outs.append(coef_t)
                    grads.append(g_t)
                gm, ga = torch.autograd.grad(outs, [m_, a_], grads, allow_unused=True)
            gm = None if gm is None or not need[3] else gm.to(pe_mask.dtype)
            ga = None if ga is None or not need[4] else ga.to(col_scale.dtype)
        if need[0] or need[1] or need[2]:
            # Straight-through: the float layer at the dequantised point, quantisers as identity.
            x_int = ref.quantize_input(x.to(cd), s_x.to(cd), params.input_bits, params.input_signed)
            x_deq = (x_int * s_x.to(cd)).to(x.dtype)
            wb_deq = _dequantized(w_b, s_w, params.weight_bits, cd)
            wt_deq = _dequantized(w_t, s_t, params.weight_bits, cd) if w_t is not None else None
            m, a = pe_mask.detach().to(w_b.dtype), col_scale.detach().to(w_b.dtype)
            w_eff = effective_weight(wb_deq, wt_deq, m, a, params.rows, params.cols)
            gx_, gw_eff = lowering.ste_grads(gy.to(x.dtype), x_deq, w_eff)
            if need[0]:
                gx = gx_ * ref.input_in_range(x.to(cd), s_x.to(cd), params.input_bits, params.input_signed)
            if need[1]:
                gwb = effective_weight(gw_eff, None, m, a, params.rows, params.cols)
            if need[2] and w_t is not None:
                gwt = gw_eff * _mask_in_weight_layout(m, w_b.shape, params.rows, params.cols)
        return gx, gwb, gwt, gm, ga, None, None, None, None, None, None, None


def _weight_codes(w: torch.Tensor, s: torch.Tensor, weight_bits: int, cd) -> torch.Tensor:
    """[K, N] int32 codes of a weight [N, ...] with a scalar or per-column scale (cached, see below)."""
    key = _weight_key(w, s, weight_bits, cd)
    hit = _WEIGHT_CODES.get(id(w)) if key is not None else None
    if hit is not None and hit[0]() is w and hit[1] == key:
        return hit[2]
    w2 = w.detach().reshape(w.shape[0], -1).to(cd)
    codes = ref.quantize_weight(w2, s.to(cd).reshape(-1, 1), weight_bits).T.contiguous().to(torch.int32)
    if key is not None:
        if len(_WEIGHT_CODES) >= _WEIGHT_CODES_SIZE:
            _WEIGHT_CODES.pop(next(iter(_WEIGHT_CODES)))
        _WEIGHT_CODES[id(w)] = (weakref.ref(w), key, codes)
    return codes


# Weight codes are re-made only when the weight changes: a CPU weight's codes are kept per tensor
# object (checked through a weak reference, so a new tensor at a recycled id never matches),
# keyed by its version counter (bumped by every in-place write, optimizer steps included), its
# storage, layout and the scale's values.  The CPU kernel caches its packed bit planes per codes
# tensor the same way, so an unchanged weight is neither quantised nor packed again.
_WEIGHT_CODES: dict = {}
_WEIGHT_CODES_SIZE = 64


def _weight_key(w: torch.Tensor, s: torch.Tensor, weight_bits: int, cd):
    if w.device.type != "cpu" or w.is_inference():
        return None
    return (w._version, w.data_ptr(), tuple(w.shape), w.stride(), w.dtype, s.detach().cpu().numpy().tobytes(),
            tuple(s.shape), weight_bits, cd)


def _dequantized(w: torch.Tensor, s: torch.Tensor, weight_bits: int, cd) -> torch.Tensor:
    """s * codes in the weight's own layout (the codes from _weight_codes, cached there)."""
    codes = _weight_codes(w, s, weight_bits, cd).T.to(cd)
    return (codes * s.to(cd).reshape(-1, 1)).reshape(w.shape).to(w.dtype)


def _mask_in_weight_layout(m: torch.Tensor, w_shape, rows: int, cols: int) -> torch.Tensor:
    n, k = w_shape[0], math.prod(w_shape[1:])
    return ref.expand_tiles(m, k, n, rows, cols).T.reshape(w_shape)


def _code_dtype(params: GemmParams, backend) -> torch.dtype:
    """The smallest integer dtype of the input codes that the backend takes (int32 by default)."""
    if not backend.small_codes:
        return torch.int32
    if params.input_bits <= 8:
        return torch.int8 if params.input_signed else torch.uint8
    return torch.int16 if params.input_bits <= 15 or params.input_signed else torch.int32


# ------------------------------------------------------------------ argument checks (SPEC 6)
def _check_tensor(name: str, t, ref_t: torch.Tensor, shape: Optional[Sequence[int]] = None,
                  float_only: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if float_only and t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    if t.device != ref_t.device:
        raise RuntimeError(f"{name}: expected a tensor on {ref_t.device} (like x), got one on {t.device}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: expected finite values, got NaN or inf")


def _scale_tensor(name: str, given: ScaleArg, like: torch.Tensor, qmax: int, n_cols: Optional[int],
                  amax: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A given scale (float or tensor: scalar, or [N] when n_cols is set) checked, or the derived one;
    in the compute dtype of ``like`` (float32 for half precisions, like the quantisers).
    ``amax``: max|like|, when the caller already has it."""
    cd = _compute_dtype(like)
    if given is None:
        return ref.derived_scale(like.to(cd), qmax) if amax is None else ref.derived_scale(like, qmax, amax.to(cd))
    if isinstance(given, bool) or not isinstance(given, (int, float, torch.Tensor)):
        raise TypeError(f"{name}: expected None, a float or a tensor, got {type(given).__name__}")
    if isinstance(given, torch.Tensor):
        _check_tensor(name, given, like)
        s = given.detach()
    else:
        s = torch.tensor(float(given), dtype=cd, device=like.device)
    allowed = {()} | ({(n_cols,), (1,)} if n_cols is not None else {(1,)})
    if tuple(s.shape) not in allowed:
        what = f"a scalar or shape ({n_cols},)" if n_cols is not None else "a scalar"
        raise ValueError(f"{name}: expected {what}, got shape {tuple(s.shape)}")
    if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        raise ValueError(f"{name}: expected positive finite values, got {s.cpu().tolist()}")
    return s.to(cd)


def _pair(name: str, v, minimum: int) -> Tuple[int, int]:
    t = (v, v) if isinstance(v, int) and not isinstance(v, bool) else tuple(v) if isinstance(v, (tuple, list)) else None
    if t is None or len(t) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) and i >= minimum for i in t):
        raise ValueError(f"{name}: expected an int >= {minimum} or a pair of them, got {v!r}")
    return t


def _check_masks(config: XbarConfig, k: int, n: int, ref_t: torch.Tensor, task_weight, pe_mask, col_scale):
    tr, tc = config.tiles(k, n)
    if pe_mask is None:
        pe_mask = torch.zeros(tr, tc, dtype=ref_t.dtype, device=ref_t.device)
    else:
        _check_tensor("pe_mask", pe_mask, ref_t, (tr, tc))
        _check_finite("pe_mask", pe_mask)
        if bool(((pe_mask < 0) | (pe_mask > 1)).any()):
            raise ValueError("pe_mask: expected values in [0, 1] (1 = re-programmed PE)")
        if task_weight is None and bool((pe_mask != 0).any()):
            raise ValueError("pe_mask: selects re-programmed PEs but task_weight is None")
    if col_scale is None:
        col_scale = torch.ones(tr, n, dtype=ref_t.dtype, device=ref_t.device)
    else:
        _check_tensor("col_scale", col_scale, ref_t, (tr, n))
        _check_finite("col_scale", col_scale)
    return pe_mask, col_scale


def _check_common(x, weight, bias, config, task_weight):
    if not isinstance(config, XbarConfig):
        raise TypeError(f"config: expected an XbarConfig, got {type(config).__name__}")
    _check_tensor("x", x, x)
    _check_tensor("weight", weight, x)
    if weight.dtype != x.dtype:
        raise TypeError(f"weight: expected dtype {x.dtype} (like x), got {weight.dtype}")
    if bias is not None:
        _check_tensor("bias", bias, x, (weight.shape[0],))
    if task_weight is not None:
        _check_tensor("task_weight", task_weight, x, tuple(weight.shape))
        if task_weight.dtype != x.dtype:
            raise TypeError(f"task_weight: expected dtype {x.dtype} (like x), got {task_weight.dtype}")


# ------------------------------------------------------------------ the public functions
def _xbar(x, weight, bias, lowering, config: XbarConfig, task_weight, pe_mask, col_scale, input_scale,
          weight_scale, task_weight_scale, backend) -> torch.Tensor:
    n, k = weight.shape[0], weight[0].numel()
    pe_mask, col_scale = _check_masks(config, k, n, x, task_weight, pe_mask, col_scale)
    if config.weight_bits is not None:
        s_w = _scale_tensor("weight_scale", weight_scale, weight, config.weight_qmax, n)
        s_t = (_scale_tensor("task_weight_scale", task_weight_scale, task_weight, config.weight_qmax, n)
               if task_weight is not None else s_w)
    if not config.quantized:
        w_b, w_t = weight, task_weight
        if config.weight_bits is not None:  # weight-only: fake quantisation with a straight-through gradient
            cd = _compute_dtype(x)
            w_b = w_b + (_dequantized(w_b, s_w, config.weight_bits, cd) - w_b).detach()
            if w_t is not None:
                w_t = w_t + (_dequantized(w_t, s_t, config.weight_bits, cd) - w_t).detach()
        w_eff = effective_weight(w_b, w_t, pe_mask.to(x.dtype), col_scale.to(x.dtype), config.rows, config.cols)
        y = lowering.float_forward(x, w_eff)
    else:
        be = get_backend(backend, x.device)
        # One pass over x gives the sign decision, max|x| for a derived scale, and finiteness.
        lo, hi = torch.aminmax(x.detach()) if x.numel() else (x.new_zeros(()), x.new_zeros(()))
        # NaN/inf have no integer code: refuse them rather than feed garbage codes to a kernel.
        if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
            raise ValueError("x: expected finite values, got NaN or inf")
        for name, t in (("weight", weight), ("task_weight", task_weight)):
            if t is not None:
                _check_finite(name, t)
        signed = config.resolve_signed(bool(lo < 0))
        if signed and config.input_bits < 2:
            raise ValueError("config.input_bits: signed inputs need input_bits >= 2, got 1")
        s_x = _scale_tensor("input_scale", input_scale, x, config.input_qmax(signed), None, torch.maximum(-lo, hi))
        params = GemmParams.from_config(config, signed)
        if x.numel() == 0:
            y = lowering.fold_output(x.new_zeros(0, n)) + 0 * (weight.sum() + pe_mask.sum() + col_scale.sum())
        else:
            y = lowering.fold_output(_QuantizedXbar.apply(
                x, weight, task_weight, pe_mask, col_scale, s_x, s_w, s_t, lowering, params, config.adc_step, be))
    if bias is not None:
        y = y + (bias.view(-1, 1, 1) if isinstance(lowering, _ConvLowering) else bias)
    return y


def xbar_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: Union[int, Tuple[int, int]] = 1,
    padding: Union[int, Tuple[int, int], str] = 0,
    dilation: Union[int, Tuple[int, int]] = 1,
    groups: int = 1,
    *,
    config: XbarConfig,
    task_weight: Optional[torch.Tensor] = None,
    pe_mask: Optional[torch.Tensor] = None,
    col_scale: Optional[torch.Tensor] = None,
    input_scale: ScaleArg = None,
    weight_scale: ScaleArg = None,
    task_weight_scale: ScaleArg = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Conv2d computed on simulated crossbars (docs/SPEC.md).

    x [B, Cin, H, W] (or unbatched [Cin, H, W]); weight [Cout, Cin, kh, kw]; pe_mask [Tr, Tc];
    col_scale [Tr, Cout] with Tr = ceil(Cin*kh*kw / rows), Tc = ceil(Cout / cols).
    """
    _check_common(x, weight, bias, config, task_weight)
    if groups != 1:
        raise ValueError(f"groups: only groups=1 is supported (each group would need its own PE grid), got {groups}")
    if weight.dim() != 4:
        raise ValueError(f"weight: expected 4 dims [Cout, Cin, kh, kw], got shape {tuple(weight.shape)}")
    if x.dim() == 3:
        return xbar_conv2d(x.unsqueeze(0), weight, bias, stride, padding, dilation, groups, config=config,
                           task_weight=task_weight, pe_mask=pe_mask, col_scale=col_scale, input_scale=input_scale,
                           weight_scale=weight_scale, task_weight_scale=task_weight_scale, backend=backend)[0]
    if x.dim() != 4:
        raise ValueError(f"x: expected 4 dims [B, Cin, H, W] (or 3 unbatched), got shape {tuple(x.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x: expected {weight.shape[1]} input channels (weight.shape[1]), got {x.shape[1]}")
    stride = _pair("stride", stride, 1)
    dilation = _pair("dilation", dilation, 1)
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError("padding: 'same' needs stride 1 (as in torch.nn.functional.conv2d)")
            totals = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
            x = F.pad(x, (totals[1] // 2, totals[1] - totals[1] // 2, totals[0] // 2, totals[0] - totals[0] // 2))
            padding = (0, 0)
        else:
            raise ValueError(f"padding: expected an int, a pair, 'valid' or 'same', got {padding!r}")
    padding = _pair("padding", padding, 0)
    low = _ConvLowering(tuple(x.shape), tuple(weight.shape), stride, padding, dilation)
    ho, wo = low.out_hw
    if ho < 1 or wo < 1:
        raise ValueError(f"x: input {tuple(x.shape[2:])} is too small for kernel {tuple(weight.shape[2:])} "
                         f"with padding {padding} and dilation {dilation}")
    return _xbar(x, weight, bias, low, config, task_weight, pe_mask, col_scale, input_scale, weight_scale,
                 task_weight_scale, backend)


def xbar_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    config: XbarConfig,
    task_weight: Optional[torch.Tensor] = None,
    pe_mask: Optional[torch.Tensor] = None,
    col_scale: Optional[torch.Tensor] = None,
    input_scale: ScaleArg = None,
    weight_scale: ScaleArg = None,
    task_weight_scale: ScaleArg = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Linear layer on simulated crossbars: x [..., in] -> [..., out]; weight [out, in]."""
    _check_common(x, weight, bias, config, task_weight)
    if weight.dim() != 2:
        raise ValueError(f"weight: expected 2 dims [out_features, in_features], got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x: expected last dim {weight.shape[1]} (in_features), got shape {tuple(x.shape)}")
    low = _LinearLowering(tuple(x.shape), tuple(weight.shape))
    return _xbar(x, weight, bias, low, config, task_weight, pe_mask, col_scale, input_scale, weight_scale,
                 task_weight_scale, backend)
