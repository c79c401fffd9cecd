// Argument checks of the xbar operators, shared by the CPU kernels and the CUDA binding.  Every
// integer argument is range-checked as the int64 the op received, before any cast to int, and
// every size product is checked for int64 overflow before anything is allocated.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <optional>

#include "xbar_quant.h"

namespace xma2 {

constexpr int kMaxXBitsCheck = 16;              // input magnitude bits per polarity
constexpr int kMaxWBitsCheck = 15;              // weight magnitude bits per polarity
constexpr int64_t kMaxDimCheck = 1 << 16;       // rows, cols (XbarConfig's limit)
constexpr int64_t kMaxAdcLevels = (1 << 24) - 1;  // n = min(2^ba - 1, clip), ba <= 24
constexpr int64_t kMaxAdcClip = 1LL << 32;      // MAX_ADC_CLIP of xma2_ops/config.py

// a * b, or a RuntimeError naming `what` when the product does not fit int64.
inline int64_t mul_checked(int64_t a, int64_t b, const char* what) {
  int64_t out = 0;
  TORCH_CHECK(!__builtin_mul_overflow(a, b, &out), what, ": size ", a, " x ", b, " overflows int64");
  return out;
}

inline int64_t add_checked(int64_t a, int64_t b, const char* what) {
  int64_t out = 0;
  TORCH_CHECK(!__builtin_add_overflow(a, b, &out), what, ": size ", a, " + ", b, " overflows int64");
  return out;
}

inline XbarParams make_params_checked(const at::Tensor& x, const at::Tensor& w, int64_t rows, int64_t cols,
                                      int64_t input_bits, bool input_signed, int64_t dac_bits, int64_t weight_bits,
                                      int64_t cell_bits, int64_t adc_levels, int64_t adc_clip,
                                      int64_t periphery = 0, int64_t periphery_supported = 0) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "xbar: x_codes must be [M, K] and w_codes [K, N], got ",
              x.sizes(), " and ", w.sizes());
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kInt || xt == at::kShort || xt == at::kChar || xt == at::kByte,
              "xbar: x_codes must be int32, int16, int8 or uint8, got ", xt);
  TORCH_CHECK(w.scalar_type() == at::kInt, "xbar: w_codes must be int32, got ", w.scalar_type());
  TORCH_CHECK(x.size(1) == w.size(0), "xbar: x_codes has K=", x.size(1), " but w_codes has K=", w.size(0));
  TORCH_CHECK(rows >= 1 && rows <= kMaxDimCheck, "xbar: rows must be in [1, ", kMaxDimCheck, "], got ", rows);
  TORCH_CHECK(cols >= 1 && cols <= kMaxDimCheck, "xbar: cols must be in [1, ", kMaxDimCheck, "], got ", cols);
  const int64_t ib_lo = input_signed ? 2 : 1, ib_hi = kMaxXBitsCheck + (input_signed ? 1 : 0);
  TORCH_CHECK(input_bits >= ib_lo && input_bits <= ib_hi, "xbar: input_bits must be in [", ib_lo, ", ", ib_hi,
              "] (input_signed=", input_signed, "), got ", input_bits);
  TORCH_CHECK(weight_bits >= 2 && weight_bits <= kMaxWBitsCheck + 1, "xbar: weight_bits must be in [2, ",
              kMaxWBitsCheck + 1, "], got ", weight_bits);
  TORCH_CHECK(dac_bits >= 1 && dac_bits <= 8, "xbar: dac_bits must be in [1, 8], got ", dac_bits);
  TORCH_CHECK(cell_bits >= 1 && cell_bits <= 8, "xbar: cell_bits must be in [1, 8], got ", cell_bits);
  TORCH_CHECK(adc_clip >= 1 && adc_clip <= kMaxAdcClip, "xbar: adc_clip must be in [1, 2^32], got ", adc_clip);
  TORCH_CHECK(adc_levels >= 0 && adc_levels <= kMaxAdcLevels, "xbar: adc_levels must be in [0, 2^24 - 1] "
              "(0 = ideal ADC), got ", adc_levels);
  TORCH_CHECK(periphery >= 0 && periphery < 64 && (periphery & ~periphery_supported) == 0,
              "xbar: periphery must be a combination of the SPEC 8 bits that this kernel computes (",
              periphery_supported, ": 1 = differential sensing, 4 = sign-magnitude inputs, 8 = half-even ADC "
              "rounding, 16 = even row split, 32 = per-tile ADC range; the others run xma2_ops/backends/periphery.py), "
              "got ", periphery);
  const bool adc_signed = (periphery & kPeripheryDifferential) || ((periphery & kPeripherySignMagnitude) && input_signed);
  if (adc_signed) {
    TORCH_CHECK(adc_levels <= 2 * adc_clip && adc_levels % 2 == 0, "xbar: a signed ADC (periphery ", periphery,
                ") needs an even adc_levels <= 2 * adc_clip (n = min(2^adc_bits - 2, 2 clip)), got adc_levels=",
                adc_levels, ", adc_clip=", adc_clip);
  } else {
    TORCH_CHECK(adc_levels <= adc_clip, "xbar: adc_levels must be <= adc_clip (n = min(2^adc_bits - 1, clip)), got "
                "adc_levels=", adc_levels, ", adc_clip=", adc_clip);
  }
  // Only now, with every value in range, the narrowing casts.
  XbarParams p;
  p.M = x.size(0);
  p.K = x.size(1);
  p.N = w.size(1);
  p.rows = (int)rows;
  p.cols = (int)cols;
  p.x_bits = (int)(input_signed ? input_bits - 1 : input_bits);
  p.x_pols = input_signed ? 2 : 1;
  p.dac_bits = (int)dac_bits;
  p.w_bits = (int)(weight_bits - 1);
  p.cell_bits = (int)cell_bits;
  p.adc_levels = (int)adc_levels;
  p.adc_clip = adc_clip;
  p.periphery = (int)periphery;
  mul_checked(p.M, p.N, "xbar: the output [M, N]");
  // SPEC 8.4 (config.row_tile_sizes refuses the same K): the last tile of an even split must fit R rows.
  if (p.even_split() && p.Tr() > 1)
    TORCH_CHECK(p.tile_rows(p.Tr() - 1) <= p.rows, "xbar: row_split='even' (periphery 16) splits K = ", p.K,
                " rows into ", p.Tr(), " tiles of ", p.tile_size(), " and a last one of ", p.tile_rows(p.Tr() - 1),
                " > R = ", p.rows, " rows");
  // adc_range="tile_rows" holds only with the default clip (XbarConfig.periphery): the full scale of R rows.
  if (p.adc_tile_rows())
    TORCH_CHECK(adc_clip == p.pmax(), "xbar: adc_range='tile_rows' (periphery 32) scales each tile's ADC from its "
                "rows, so adc_clip must be the full scale of R rows, rows (2^cell_bits - 1)(2^dac_bits - 1) = ", p.pmax(),
                ", got ", adc_clip);
  return p;
}

inline void check_code_range(const at::Tensor& codes, int64_t lo, int64_t hi, const char* name) {
  if (codes.numel() == 0) return;
  const int64_t mn = codes.min().item<int64_t>(), mx = codes.max().item<int64_t>();
  TORCH_CHECK(mn >= lo && mx <= hi, "xbar: ", name, " must hold codes in [", lo, ", ", hi, "], got [", mn, ", ", mx, "]");
}

inline void check_input_codes(const at::Tensor& x, const XbarParams& p) {
  const int64_t q = (1LL << p.x_bits) - 1;
  check_code_range(x, p.x_pols == 2 ? -q : 0, q, "x_codes");
}

inline void check_weight_codes(const at::Tensor& w, const XbarParams& p, const char* name) {
  const int64_t q = (1LL << p.w_bits) - 1;
  check_code_range(w, -q, q, name);
}

// The coefficients of an mvm op (xbar_mvm, xbar_cell_mvm; every backend): coef_b float32 or float64
// [Tr, N], coef_t (given with the task weights) like coef_b.  Devices are the caller's to check.
inline void check_mvm_coefs(const char* op, const at::Tensor& coef_b, const std::optional<at::Tensor>& coef_t,
                            int64_t Tr, int64_t N) {
  TORCH_CHECK(coef_b.scalar_type() == at::kFloat || coef_b.scalar_type() == at::kDouble, op,
              ": coef_b must be float32 or float64, got ", coef_b.scalar_type());
  TORCH_CHECK(coef_b.dim() == 2 && coef_b.size(0) == Tr && coef_b.size(1) == N, op, ": coef_b must be [Tr, N] = [",
              Tr, ", ", N, "], got ", coef_b.sizes());
  if (coef_t.has_value())
    TORCH_CHECK(coef_t->sizes() == coef_b.sizes() && coef_t->scalar_type() == coef_b.scalar_type(), op,
                ": coef_t must match coef_b in shape and dtype, got ", coef_t->scalar_type(), " ", coef_t->sizes());
}

// The task weights of an mvm op (xbar_mvm's wt_codes, xbar_cell_mvm's gt; every backend) and their
// coefficients coef_t: both or neither.
inline void check_task_given(const char* op, const char* task, bool has_task, bool has_coef_t) {
  TORCH_CHECK(has_task == has_coef_t, op, ": ", task, " and coef_t must be given together");
}

// gy of a coefficient-gradient op (xbar_coef_grad, xbar_cell_coef_grad): floating point [M, N].
inline void check_coef_grad_gy(const char* op, const at::Tensor& gy, int64_t M, int64_t N) {
  TORCH_CHECK(gy.dim() == 2 && gy.size(0) == M && gy.size(1) == N, op, ": gy must be [M, N] = [", M, ", ", N,
              "], got ", gy.sizes());
  TORCH_CHECK(gy.is_floating_point(), op, ": gy must be floating point, got ", gy.scalar_type());
}

// The task weight codes of xbar_mvm beside the base ones: int32 of the same shape.
inline void check_task_codes(const at::Tensor& wb_codes, const at::Tensor& wt_codes) {
  TORCH_CHECK(wt_codes.sizes() == wb_codes.sizes() && wt_codes.scalar_type() == at::kInt,
              "xbar_mvm: wt_codes must be int32 of shape ", wb_codes.sizes(), ", got ", wt_codes.scalar_type(), " ",
              wt_codes.sizes());
}

// ------------------------------------------------------------------ device-model cells (SPEC 7.2)
constexpr int64_t kMaxFracBits = 16;  // DeviceModel.frac_bits (xma2_ops/device.py)

// The checked parameters of a cell op: x_codes [M, K] and conductances g [2, S, K, N] int32
// (polarity, slice, row, column), S = ceil((weight_bits - 1) / cell_bits).  `name` names g in messages.
inline XbarParams make_cell_params_checked(const at::Tensor& x, const at::Tensor& g, const char* name, int64_t rows,
                                           int64_t cols, int64_t input_bits, bool input_signed, int64_t dac_bits,
                                           int64_t weight_bits, int64_t cell_bits, int64_t adc_levels,
                                           int64_t adc_clip, int64_t frac_bits, int64_t periphery) {
  TORCH_CHECK(g.dim() == 4 && g.size(0) == 2 && g.size(1) >= 1, "xbar_cell: ", name,
              " must be [2, S, K, N] (polarity, slice, row, column), got ", g.sizes());
  TORCH_CHECK(g.scalar_type() == at::kInt, "xbar_cell: ", name, " must be int32, got ", g.scalar_type());
  TORCH_CHECK(x.dim() == 2, "xbar_cell: x_codes must be [M, K], got ", x.sizes());
  TORCH_CHECK(x.size(1) == g.size(2), "xbar_cell: x_codes has K=", x.size(1), " but ", name, " has K=", g.size(2));
  TORCH_CHECK(x.device() == g.device(), "xbar_cell: x_codes and ", name, " must be on one device, got ", x.device(),
              " and ", g.device());
  XbarParams p = make_params_checked(x, g.select(0, 0).select(0, 0), rows, cols, input_bits, input_signed, dac_bits,
                                     weight_bits, cell_bits, adc_levels, adc_clip, periphery, kPeripheryCpuKernel);
  TORCH_CHECK(g.size(1) == p.slices(), "xbar_cell: ", name, " must have S = ceil((weight_bits - 1) / cell_bits) = ",
              p.slices(), " slices, got ", g.size(1));
  TORCH_CHECK(frac_bits >= 0 && frac_bits <= kMaxFracBits, "xbar_cell: frac_bits must be in [0, ", kMaxFracBits,
              "], got ", frac_bits);
  return p;
}

// The numbers that bound every integer of a cell op, from the actual largest conductance g_max:
// every |V_F| <= pbound = rows (2^db - 1) g_max (also a difference of two polarities, or of two input
// signs), the ADC's 2 u n + span (u = P_F unsigned, clamp(V_F + clip 2^F, 0, span) signed), and the digital sum
// |T_int| <= tile_sum_bound(p, code_max) (xbar_quant.h; code_max = n, or pbound for the ideal ADC).  A
// config where one could overflow int64 is refused.
struct CellBounds {
  int64_t pbound, t_bound;
};

inline CellBounds cell_bounds_checked(const XbarParams& p, int64_t g_max, int64_t frac_bits) {
  using i128 = __int128;
  const i128 lim = (i128)INT64_MAX;
  const i128 pb = (i128)p.rows * ((1LL << p.dac_bits) - 1) * (i128)g_max;
  TORCH_CHECK(pb <= lim, "xbar_cell: rows * (2^dac_bits - 1) * max(g) = ", p.rows, " * ", (1LL << p.dac_bits) - 1,
              " * ", g_max, " overflows int64: lower rows, frac_bits or the conductances");
  const i128 clip_f = (i128)p.adc_clip << frac_bits;
  // adc_code_ext clamps u to span before it multiplies; adc_code (unsigned) multiplies P itself.
  const i128 u_max = p.adc_signed() ? std::min(pb + clip_f, 2 * clip_f) : pb;
  const i128 span = p.adc_signed() ? 2 * clip_f : clip_f;
  if (p.adc_levels > 0)
    TORCH_CHECK(pb + clip_f <= lim && 2 * u_max * p.adc_levels + span <= lim,
                "xbar_cell: the ADC's 2 * u * adc_levels + span overflows int64 (", p.adc_signed() ?
                "signed ADC: u = clamp(P_F + adc_clip * 2^frac_bits, 0, span), span = 2 * adc_clip * 2^frac_bits" :
                "u = P_F, span = adc_clip * 2^frac_bits", "; largest P_F = ", (int64_t)pb, ", adc_levels = ",
                p.adc_levels, ", adc_clip = ", p.adc_clip, ", frac_bits = ", frac_bits,
                "): lower rows, frac_bits or the conductances");
  const i128 shifts = shift_sum(p);
  const i128 code_max = p.adc_levels > 0 ? (i128)p.adc_levels : pb;
  const bool t_ok = code_max == 0 || shifts <= lim / (2 * code_max);
  TORCH_CHECK(t_ok, "xbar_cell: the tile sums (up to 2 * ", (int64_t)code_max, " * ", (int64_t)shifts,
              ") overflow int64: lower rows, frac_bits or the conductances");
  return {(int64_t)pb, (int64_t)tile_sum_bound<i128>(p, code_max)};
}

}  // namespace xma2
