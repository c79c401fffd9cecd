// CUDA implementations of xma2_ops::xbar_tile_sums / xbar_mvm: argument checks (as on CPU),
// contiguous inputs, launch of xbar_kernel.cu on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../xbar_check.h"
#include "xbar_kernel.h"

namespace xma2 {
namespace {

void check_cuda(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), "xbar: ", name, " must be on ", like.device(),
              " (like x_codes), got ", t.device());
}

XbarParams cuda_params(const at::Tensor& x, const at::Tensor& w, int64_t rows, int64_t cols, int64_t input_bits,
                       bool input_signed, int64_t dac_bits, int64_t weight_bits, int64_t cell_bits,
                       int64_t adc_levels, int64_t adc_clip, int64_t periphery) {
  // The CUDA kernel computes Sections 2-3 only (periphery 0; SPEC 8 runs xma2_ops/backends/periphery.py).
  const XbarParams p = make_params_checked(x, w, rows, cols, input_bits, input_signed, dac_bits, weight_bits,
                                           cell_bits, adc_levels, adc_clip, periphery, 0);
  TORCH_CHECK(x.is_cuda(), "xbar: x_codes must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kInt, "xbar (CUDA): x_codes must be int32, got ", x.scalar_type());
  check_cuda(w, x, "w_codes");
  // The kernels' unsigned 32-bit partial sums are exact up to this size (xbar_kernel.h).
  TORCH_CHECK(rows <= kCudaMaxRows, "xbar (CUDA): rows must be <= ", kCudaMaxRows, ", got ", rows);
  TORCH_CHECK((p.N + 15) / 16 <= 65535, "xbar (CUDA): N must be <= ", 65535 * 16, ", got ", p.N);
  check_input_codes(x, p);
  return p;
}

void check_launch(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "xbar (CUDA): kernel launch failed: ", cudaGetErrorString(err));
}

at::Tensor xbar_tile_sums_cuda(const at::Tensor& x_codes, const at::Tensor& w_codes, int64_t rows, int64_t cols,
                               int64_t input_bits, bool input_signed, int64_t dac_bits, int64_t weight_bits,
                               int64_t cell_bits, int64_t adc_levels, int64_t adc_clip, int64_t periphery) {
  const XbarParams p = cuda_params(x_codes, w_codes, rows, cols, input_bits, input_signed, dac_bits, weight_bits,
                                   cell_bits, adc_levels, adc_clip, periphery);
  check_weight_codes(w_codes, p, "w_codes");
  const c10::cuda::CUDAGuard guard(x_codes.device());
  const at::Tensor x = x_codes.contiguous(), w = w_codes.contiguous();
  mul_checked(mul_checked(p.Tr(), p.M, "xbar_tile_sums: the output [Tr, M, N]"), p.N,
              "xbar_tile_sums: the output [Tr, M, N]");
  at::Tensor out = at::empty({p.Tr(), p.M, p.N}, x.options().dtype(at::kLong));
  check_launch(xbar_tile_sums_launch(x.data_ptr<int32_t>(), w.data_ptr<int32_t>(), out.data_ptr<int64_t>(), p,
                                     c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor xbar_mvm_cuda(const at::Tensor& x_codes, const at::Tensor& wb_codes,
                         const std::optional<at::Tensor>& wt_codes, const at::Tensor& coef_b,
                         const std::optional<at::Tensor>& coef_t, int64_t rows, int64_t cols, int64_t input_bits,
                         bool input_signed, int64_t dac_bits, int64_t weight_bits, int64_t cell_bits,
                         int64_t adc_levels, int64_t adc_clip, int64_t periphery) {
  const XbarParams p = cuda_params(x_codes, wb_codes, rows, cols, input_bits, input_signed, dac_bits, weight_bits,
                                   cell_bits, adc_levels, adc_clip, periphery);
  check_weight_codes(wb_codes, p, "wb_codes");
  const int64_t tr = p.Tr();
  check_task_given("xbar_mvm", "wt_codes", wt_codes.has_value(), coef_t.has_value());
  check_mvm_coefs("xbar_mvm", coef_b, coef_t, tr, p.N);
  check_cuda(coef_b, x_codes, "coef_b");
  if (coef_t.has_value()) {
    check_task_codes(wb_codes, *wt_codes);
    check_cuda(*wt_codes, x_codes, "wt_codes");
    check_cuda(*coef_t, x_codes, "coef_t");
    check_weight_codes(*wt_codes, p, "wt_codes");
  }
  const c10::cuda::CUDAGuard guard(x_codes.device());
  const at::Tensor x = x_codes.contiguous(), wb = wb_codes.contiguous(), cb = coef_b.contiguous();
  const at::Tensor wt = coef_t.has_value() ? wt_codes->contiguous() : at::Tensor();
  const at::Tensor ct = coef_t.has_value() ? coef_t->contiguous() : at::Tensor();
  at::Tensor y = at::empty({p.M, p.N}, cb.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int32_t* wt_ptr = wt.defined() ? wt.data_ptr<int32_t>() : nullptr;
  if (cb.scalar_type() == at::kFloat) {
    check_launch(xbar_mvm_launch(x.data_ptr<int32_t>(), wb.data_ptr<int32_t>(), wt_ptr, cb.data_ptr<float>(),
                                 ct.defined() ? ct.data_ptr<float>() : nullptr, y.data_ptr<float>(), p, stream));
  } else {
    check_launch(xbar_mvm_launch(x.data_ptr<int32_t>(), wb.data_ptr<int32_t>(), wt_ptr, cb.data_ptr<double>(),
                                 ct.defined() ? ct.data_ptr<double>() : nullptr, y.data_ptr<double>(), p, stream));
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(xma2_ops, CUDA, m) {
  m.impl("xbar_tile_sums", &xbar_tile_sums_cuda);
  m.impl("xbar_mvm", &xbar_mvm_cuda);
}

}  // namespace xma2
