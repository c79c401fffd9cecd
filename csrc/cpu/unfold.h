// xbar_unfold_codes on the CPU (unfold.cpp), registered in ops_cpu.cpp.
#pragma once
#include <ATen/ATen.h>

namespace xma2 {
namespace cpu {

// im2col of integer codes [B, C, H, W] -> [B*Ho*Wo, C*kh*kw] in PyTorch's (c, i, j) order, zero
// padded, same dtype.  Sizes whose products overflow int64 are refused before anything is allocated.
at::Tensor xbar_unfold_codes_cpu(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef dilation,
                                 at::IntArrayRef padding, at::IntArrayRef stride);

}  // namespace cpu
}  // namespace xma2
