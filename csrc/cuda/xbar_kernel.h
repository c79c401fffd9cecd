// C-style launchers of the CUDA crossbar-GEMM kernels (xbar_kernel.cu).  No torch headers:
// the binding (xbar_cuda.cpp) validates the arguments and hands over raw, contiguous pointers.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include "../xbar_quant.h"

namespace xma2 {

// Rows per crossbar the kernels accept: keeps every unsigned 32-bit partial sum exact
// (rows * 255 * 255 < 2^32).
constexpr int64_t kCudaMaxRows = 1 << 16;

// out [Tr, M, N] int64 = T_int; x [M, K] and w [K, N] int32 row-major.
cudaError_t xbar_tile_sums_launch(const int32_t* x, const int32_t* w, int64_t* out, const XbarParams& p,
                                  cudaStream_t stream);

// y [M, N] = sum_r coef_b[r, n] T_b[r, m, n] + coef_t[r, n] T_t[r, m, n]; wt and coef_t may be null
// (together).  coef [Tr, N] row-major; accumulation in double.
cudaError_t xbar_mvm_launch(const int32_t* x, const int32_t* wb, const int32_t* wt, const float* coef_b,
                            const float* coef_t, float* y, const XbarParams& p, cudaStream_t stream);
cudaError_t xbar_mvm_launch(const int32_t* x, const int32_t* wb, const int32_t* wt, const double* coef_b,
                            const double* coef_t, double* y, const XbarParams& p, cudaStream_t stream);

}  // namespace xma2
