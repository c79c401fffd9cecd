// The device-model ops on the CPU (cells.cpp, docs/SPEC.md 7.2 and 8), registered in ops_cpu.cpp.
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace xma2 {
namespace cpu {

// T_int [Tr, M, N] int64 of the fixed-point conductances g [2, S, K, N] int32 (backends.reference.cell_tile_sums).
at::Tensor xbar_cell_tile_sums_cpu(const at::Tensor& x_codes, const at::Tensor& g, int64_t rows, int64_t cols,
                                   int64_t input_bits, bool input_signed, int64_t dac_bits, int64_t weight_bits,
                                   int64_t cell_bits, int64_t adc_levels, int64_t adc_clip, int64_t frac_bits,
                                   int64_t periphery);

// y [M, N] = sum_r coef_b[r] T_b_int[r] + coef_t[r] T_t_int[r], in float64 (row tile, base, task), coef's dtype.
at::Tensor xbar_cell_mvm_cpu(const at::Tensor& x_codes, const at::Tensor& gb, const std::optional<at::Tensor>& gt,
                             const at::Tensor& coef_b, const std::optional<at::Tensor>& coef_t, int64_t rows,
                             int64_t cols, int64_t input_bits, bool input_signed, int64_t dac_bits, int64_t weight_bits,
                             int64_t cell_bits, int64_t adc_levels, int64_t adc_clip, int64_t frac_bits,
                             int64_t periphery);

// G [Tr, N] float64 = sum_m gy[m, n] T_int[r, m, n].
at::Tensor xbar_cell_coef_grad_cpu(const at::Tensor& x_codes, const at::Tensor& g, const at::Tensor& gy, int64_t rows,
                                   int64_t cols, int64_t input_bits, bool input_signed, int64_t dac_bits,
                                   int64_t weight_bits, int64_t cell_bits, int64_t adc_levels, int64_t adc_clip,
                                   int64_t frac_bits, int64_t periphery);

}  // namespace cpu
}  // namespace xma2
