// Schemas of the xma2_ops operators: declared once here, implemented per device in
// cpu/xbar_cpu.cpp and cuda/xbar_cuda.cpp, faked (for torch.compile/opcheck) in xma2_ops/_ops.py.
#include <torch/library.h>

TORCH_LIBRARY(xma2_ops, m) {
  // Per row tile r, the digital shift-and-add of ADC codes T_int[r, m, n] (int64, exact).
  m.def("xbar_tile_sums(Tensor x_codes, Tensor w_codes, int rows, int cols, int input_bits, "
        "bool input_signed, int dac_bits, int weight_bits, int cell_bits, int adc_levels, int adc_clip) -> Tensor");
  // y[m, n] = sum_r coef_b[r, n] * T_b_int[r, m, n] + coef_t[r, n] * T_t_int[r, m, n], in coef's dtype.
  // A PE (r, c) whose coefficients are all zero is skipped (its result cannot matter).
  m.def("xbar_mvm(Tensor x_codes, Tensor wb_codes, Tensor? wt_codes, Tensor coef_b, Tensor? coef_t, "
        "int rows, int cols, int input_bits, bool input_signed, int dac_bits, int weight_bits, int cell_bits, "
        "int adc_levels, int adc_clip) -> Tensor");
}
