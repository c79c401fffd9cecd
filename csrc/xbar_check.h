// Argument checks of the xbar operators, shared by the CPU kernels and the CUDA binding.
#pragma once
#include <ATen/ATen.h>

#include "xbar_quant.h"

namespace xma2 {

constexpr int kMaxXBitsCheck = 16;  // input magnitude bits per polarity
constexpr int kMaxWBitsCheck = 15;  // weight magnitude bits per polarity

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
  TORCH_CHECK(rows >= 1 && cols >= 1, "xbar: rows and cols must be >= 1, got ", rows, ", ", cols);
  const int x_bits = (int)(input_signed ? input_bits - 1 : input_bits);
  TORCH_CHECK(x_bits >= 1 && x_bits <= kMaxXBitsCheck, "xbar: input_bits out of range: ", input_bits);
  TORCH_CHECK(weight_bits >= 2 && weight_bits - 1 <= kMaxWBitsCheck, "xbar: weight_bits out of range: ", weight_bits);
  TORCH_CHECK(dac_bits >= 1 && dac_bits <= 8 && cell_bits >= 1 && cell_bits <= 8,
              "xbar: dac_bits and cell_bits must be in [1, 8], got ", dac_bits, ", ", cell_bits);
  TORCH_CHECK(adc_levels >= 0 && adc_clip >= 1, "xbar: adc_levels must be >= 0 and adc_clip >= 1, got ",
              adc_levels, ", ", adc_clip);
  TORCH_CHECK(rows <= (1 << 16), "xbar: rows must be <= 65536, got ", rows);
  XbarParams p;
  p.M = x.size(0);
  p.K = x.size(1);
  p.N = w.size(1);
  p.rows = (int)rows;
  p.cols = (int)cols;
  p.x_bits = x_bits;
  p.x_pols = input_signed ? 2 : 1;
  p.dac_bits = (int)dac_bits;
  p.w_bits = (int)(weight_bits - 1);
  p.cell_bits = (int)cell_bits;
  p.adc_levels = (int)adc_levels;
  p.adc_clip = adc_clip;
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
