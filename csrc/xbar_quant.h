// The crossbar arithmetic of docs/SPEC.md sections 2-3, shared by the CPU and CUDA kernels.
// No torch headers: this file also compiles under plain nvcc.
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define XBAR_HD __host__ __device__ __forceinline__
#else
#define XBAR_HD inline
#endif

namespace xma2 {

// Integer parameters of one crossbar GEMM, resolved on the host from XbarConfig.
struct XbarParams {
  int64_t M, K, N;      // GEMM sizes: x_codes [M, K], w_codes [K, N]
  int rows, cols;       // crossbar size R x C
  int x_bits;           // magnitude bits per input polarity (ab, or ab-1 when signed)
  int x_pols;           // 1 unsigned, 2 signed (two passes)
  int dac_bits;         // db
  int w_bits;           // magnitude bits per weight polarity (wb-1)
  int cell_bits;        // cb
  int adc_levels;       // n = min(2^ba - 1, clip); 0 = ideal ADC
  int64_t adc_clip;     // full-scale partial sum
  int Tr() const { return (int)((K + rows - 1) / rows); }
  int Tc() const { return (int)((N + cols - 1) / cols); }
  int chunks() const { return (x_bits + dac_bits - 1) / dac_bits; }
  int slices() const { return (w_bits + cell_bits - 1) / cell_bits; }
};

// ADC code of a non-negative partial sum: clamp(floor((2 P n + clip) / (2 clip)), 0, n).
// levels == 0 is the ideal ADC (the code is P itself).
XBAR_HD int64_t adc_code(int64_t p, int64_t levels, int64_t clip) {
  if (levels == 0) return p;
  int64_t c = (2 * p * levels + clip) / (2 * clip);  // p >= 0: division is floor
  return c > levels ? levels : c;
}

// Field `index` of width `width` bits of a non-negative code (an input chunk or weight slice).
XBAR_HD int32_t bit_field(int32_t v, int index, int width) {
  return (v >> (index * width)) & ((1 << width) - 1);
}

}  // namespace xma2
