// im2col of integer codes: the conv lowering without a float copy of the unfolded input.
#include "unfold.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../xbar_check.h"
#include "driver.h"

namespace xma2 {
namespace cpu {

at::Tensor xbar_unfold_codes_cpu(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef dilation,
                                 at::IntArrayRef padding, at::IntArrayRef stride) {
  constexpr const char* kOp = "xbar_unfold_codes";
  TORCH_CHECK(x.dim() == 4, "xbar_unfold_codes: x must be [B, C, H, W], got ", x.sizes());
  TORCH_CHECK(!x.is_floating_point() && !x.is_complex() && x.scalar_type() != at::kBool,
              "xbar_unfold_codes: x must hold integer codes, got ", x.scalar_type());
  TORCH_CHECK(kernel_size.size() == 2 && dilation.size() == 2 && padding.size() == 2 && stride.size() == 2,
              "xbar_unfold_codes: kernel_size, dilation, padding and stride must have 2 values each");
  for (int d = 0; d < 2; ++d)
    TORCH_CHECK(kernel_size[d] >= 1 && dilation[d] >= 1 && stride[d] >= 1 && padding[d] >= 0,
                "xbar_unfold_codes: expected kernel_size, dilation, stride >= 1 and padding >= 0, got ", kernel_size,
                ", ", dilation, ", ", stride, ", ", padding);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), Wd = x.size(3);
  const int64_t kh = kernel_size[0], kw = kernel_size[1];
  // Every size below in overflow-checked int64: Ho = (H + 2 p - d (k - 1) - 1) / s + 1, and so on.
  int64_t out_hw[2];
  const int64_t in_hw[2] = {H, Wd};
  for (int d = 0; d < 2; ++d) {
    const int64_t padded = add_checked(in_hw[d], mul_checked(2, padding[d], kOp), kOp);
    const int64_t span = add_checked(mul_checked(dilation[d], kernel_size[d] - 1, kOp), 1, kOp);
    TORCH_CHECK(padded >= span, "xbar_unfold_codes: input ", x.sizes(), " with padding ", padding,
                " is too small for kernel ", kernel_size, " with dilation ", dilation);
    out_hw[d] = (padded - span) / stride[d] + 1;
  }
  const int64_t Ho = out_hw[0], Wo = out_hw[1];
  const int64_t K = mul_checked(mul_checked(C, kh, kOp), kw, kOp);
  const int64_t M = mul_checked(mul_checked(B, Ho, kOp), Wo, kOp);
  mul_checked(M, K, kOp);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({M, K}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_INTEGRAL_TYPES(x.scalar_type(), "xbar_unfold_codes", [&] {
    const scalar_t* src = xc.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int64_t sh = stride[0], sw = stride[1], ph = padding[0], pw = padding[1], dh = dilation[0], dw = dilation[1];
    const int64_t numel = xc.numel();
#if defined(__x86_64__)
    // Offsets of the window's elements from its top-left corner, for the gather path (1-byte codes).
    // A window inside the input spans at most numel elements, so its offsets fit int32 with numel.
    const bool gather = sizeof(scalar_t) == 1 && numel < (1LL << 31) && cpu_runs("avx512");
#else
    const bool gather = false;
#endif
    std::vector<int32_t> off(gather ? (size_t)K : 0);
    int64_t max_off = 0;
    const bool window_fits = kh <= H && kw <= Wd && (kh - 1) * dh < H && (kw - 1) * dw < Wd;
    for (int64_t c = 0, k = 0; gather && window_fits && c < C; ++c)
      for (int64_t i = 0; i < kh; ++i)
        for (int64_t j = 0; j < kw; ++j, ++k) {
          off[(size_t)k] = (int32_t)((c * H + i * dh) * Wd + j * dw);
          max_off = std::max<int64_t>(max_off, off[(size_t)k]);
        }
    at::parallel_for(0, B * Ho, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t bh = p0; bh < p1; ++bh) {
        const int64_t b = bh / Ho, ho = bh % Ho;
        const int64_t h0 = ho * sh - ph;
        const bool h_inside = h0 >= 0 && h0 + (kh - 1) * dh < H;
        for (int64_t wo = 0; wo < Wo; ++wo) {
          scalar_t* o = dst + (bh * Wo + wo) * K;
          const int64_t w0 = wo * sw - pw;
          const bool w_inside = w0 >= 0 && w0 + (kw - 1) * dw < Wd;  // no padding column: no checks
#if defined(__x86_64__)
          // Away from the padding, a row is a gather at fixed offsets from the window's corner.
          if (gather && window_fits && h_inside && w_inside) {
            const int64_t corner = (b * C * H + h0) * Wd + w0;
            if (corner + max_off + 4 <= numel) {
              gather_bytes_avx512(reinterpret_cast<const uint8_t*>(src) + corner, off.data(), K,
                                  reinterpret_cast<uint8_t*>(o));
              continue;
            }
          }
#endif
          for (int64_t c = 0; c < C; ++c) {
            const scalar_t* plane = src + (b * C + c) * H * Wd;
            for (int64_t i = 0; i < kh; ++i, o += kw) {
              const int64_t h = h0 + i * dh;
              if (h < 0 || h >= H) {
                std::fill(o, o + kw, scalar_t(0));
                continue;
              }
              const scalar_t* line = plane + h * Wd;
              if (w_inside) {
                for (int64_t j = 0; j < kw; ++j) o[j] = line[w0 + j * dw];
              } else {
                for (int64_t j = 0; j < kw; ++j) {
                  const int64_t w = w0 + j * dw;
                  o[j] = (w >= 0 && w < Wd) ? line[w] : scalar_t(0);
                }
              }
            }
          }
        }
      }
    });
  });
  return out;
}

}  // namespace cpu
}  // namespace xma2
