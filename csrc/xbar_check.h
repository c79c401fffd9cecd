// Argument checks of the xbar operators, shared by the CPU kernels and the CUDA binding.  Every
// integer argument is range-checked as the int64 the op received, before any cast to int, and
// every size product is checked for int64 overflow before anything is allocated.
#pragma once
#include <ATen/ATen.h>

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
                                      int64_t cell_bits, int64_t adc_levels, int64_t adc_clip) {
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
  TORCH_CHECK(adc_levels <= adc_clip, "xbar: adc_levels must be <= adc_clip (n = min(2^adc_bits - 1, clip)), got "
              "adc_levels=", adc_levels, ", adc_clip=", adc_clip);
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
  mul_checked(p.M, p.N, "xbar: the output [M, N]");
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

}  // namespace xma2
