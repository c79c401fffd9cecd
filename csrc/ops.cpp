// Schemas of the xma2_ops operators: declared once here, implemented per device in
// cpu/ops_cpu.cpp (the device-model ops in cpu/cells.cpp) and cuda/xbar_cuda.cpp, faked (for torch.compile/opcheck) in xma2_ops/backends/cpp.py.
#include <torch/library.h>

TORCH_LIBRARY(xma2_ops, m) {
  // `periphery`: the SPEC 8 conventions as GemmParams' bit field (xma2_ops/config.py PERIPHERY_BIT); the CPU
  // kernels compute 1 (differential sensing), 4 (sign-magnitude inputs), 8 (half-even ADC rounding), 16 (even
  // row split), 32 (per-tile ADC range, with adc_clip the full scale of R rows) and any combination; 2 (analog
  // accumulation), and any bit on CUDA, is refused (xma2_ops/periphery.py computes those).
  // Per row tile r, the digital shift-and-add of ADC codes T_int[r, m, n] (int64, exact).
  m.def("xbar_tile_sums(Tensor x_codes, Tensor w_codes, int rows, int cols, int input_bits, "
        "bool input_signed, int dac_bits, int weight_bits, int cell_bits, int adc_levels, int adc_clip, int periphery=0) -> Tensor");
  // y[m, n] = sum_r coef_b[r, n] * T_b_int[r, m, n] + coef_t[r, n] * T_t_int[r, m, n], in coef's dtype.
  // A PE (r, c) whose coefficients are all zero is skipped (its result cannot matter).
  m.def("xbar_mvm(Tensor x_codes, Tensor wb_codes, Tensor? wt_codes, Tensor coef_b, Tensor? coef_t, "
        "int rows, int cols, int input_bits, bool input_signed, int dac_bits, int weight_bits, int cell_bits, "
        "int adc_levels, int adc_clip, int periphery=0) -> Tensor");
  // G[r, n] = sum_m gy[m, n] * T_int[r, m, n] in float64 [Tr, N]: the exact gradient of xbar_mvm
  // w.r.t. its coefficients, without materialising T_int.
  m.def("xbar_coef_grad(Tensor x_codes, Tensor w_codes, Tensor gy, int rows, int cols, int input_bits, "
        "bool input_signed, int dac_bits, int weight_bits, int cell_bits, int adc_levels, int adc_clip, int periphery=0) -> Tensor");
  // The kernel's form of w_codes for these parameters, made once per programmed weight (CPU: bit planes
  // or AMX bytes with a header that every use checks; the exact float weights on the lossless GEMM path),
  // and xbar_mvm / xbar_coef_grad reading it instead of packing w_codes on every call.  A packed tensor
  // must come from xbar_pack_weights of the same codes with the same parameters.
  m.def("xbar_pack_weights(Tensor w_codes, int rows, int cols, int input_bits, bool input_signed, int dac_bits, "
        "int weight_bits, int cell_bits, int adc_levels, int adc_clip, int periphery=0) -> Tensor");
  m.def("xbar_mvm_packed(Tensor x_codes, Tensor wb_codes, Tensor? wb_packed, Tensor? wt_codes, Tensor? wt_packed, "
        "Tensor coef_b, Tensor? coef_t, int rows, int cols, int input_bits, bool input_signed, int dac_bits, "
        "int weight_bits, int cell_bits, int adc_levels, int adc_clip, int periphery=0) -> Tensor");
  m.def("xbar_coef_grad_packed(Tensor x_codes, Tensor w_codes, Tensor? w_packed, Tensor gy, int rows, int cols, "
        "int input_bits, bool input_signed, int dac_bits, int weight_bits, int cell_bits, int adc_levels, "
        "int adc_clip, int periphery=0) -> Tensor");
  // The device model (docs/SPEC.md 7.2): the same three contracts over fixed-point conductances
  // g [2, S, K, N] int32 (polarity, slice, row, column) of programmed cells instead of weight codes;
  // frac_bits = F of Gq = round(G 2^F).  With adc_levels == 0 T_int is in units of 2^-F.  `periphery`: the
  // same SPEC 8 bits as the codes ops compute on the CPU (cpu/cells.cpp).
  m.def("xbar_cell_tile_sums(Tensor x_codes, Tensor g, int rows, int cols, int input_bits, bool input_signed, "
        "int dac_bits, int weight_bits, int cell_bits, int adc_levels, int adc_clip, int frac_bits, int periphery=0) -> Tensor");
  m.def("xbar_cell_mvm(Tensor x_codes, Tensor gb, Tensor? gt, Tensor coef_b, Tensor? coef_t, int rows, int cols, "
        "int input_bits, bool input_signed, int dac_bits, int weight_bits, int cell_bits, int adc_levels, "
        "int adc_clip, int frac_bits, int periphery=0) -> Tensor");
  m.def("xbar_cell_coef_grad(Tensor x_codes, Tensor g, Tensor gy, int rows, int cols, int input_bits, "
        "bool input_signed, int dac_bits, int weight_bits, int cell_bits, int adc_levels, int adc_clip, "
        "int frac_bits, int periphery=0) -> Tensor");
  // im2col of integer codes [B, C, H, W] -> [B*Ho*Wo, C*kh*kw] (PyTorch's (c, i, j) order), same dtype.
  m.def("xbar_unfold_codes(Tensor x, int[2] kernel_size, int[2] dilation, int[2] padding, int[2] stride) -> Tensor");
}
