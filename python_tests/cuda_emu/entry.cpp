// extern "C" entry points of the CPU-emulated CUDA kernels, called with ctypes.
#include "xbar_kernel_emu.cpp"  // csrc/cuda/xbar_kernel.cu with its launches rewritten to emu_launch

using xma2::XbarParams;

extern "C" {

int emu_tile_sums(const int32_t* x, const int32_t* w, int64_t* out, const XbarParams* p) {
  return xma2::xbar_tile_sums_launch(x, w, out, *p, nullptr);
}

int emu_mvm_f64(const int32_t* x, const int32_t* wb, const int32_t* wt, const double* coef_b, const double* coef_t,
                double* y, const XbarParams* p) {
  return xma2::xbar_mvm_launch(x, wb, wt, coef_b, coef_t, y, *p, nullptr);
}

int emu_mvm_f32(const int32_t* x, const int32_t* wb, const int32_t* wt, const float* coef_b, const float* coef_t,
                float* y, const XbarParams* p) {
  return xma2::xbar_mvm_launch(x, wb, wt, coef_b, coef_t, y, *p, nullptr);
}

}  // extern "C"
