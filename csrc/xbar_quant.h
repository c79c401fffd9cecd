// The crossbar arithmetic of docs/SPEC.md sections 2-3, shared by the CPU and CUDA kernels: the
// one C++ definition of the derived numbers (Pmax, chunks, slices, Tr, Tc), of the ADC and of the
// lossless-ADC predicate (xma2_ops/config.py holds the Python ones).
// No torch headers: this file also compiles under plain nvcc.
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define XBAR_HD __host__ __device__ __forceinline__
#else
#define XBAR_HD inline
#endif

namespace xma2 {

// Every ADC code equals its partial sum: the ideal ADC (levels == 0), or one level per partial-sum
// value (levels == clip makes the step 1) with nothing saturating (clip >= Pmax).  levels > clip is
// NOT lossless (code = round(P n / clip) != P); the ops refuse it (xbar_check.h).
XBAR_HD bool adc_is_identity(int64_t levels, int64_t clip, int64_t pmax) {
  return levels == 0 || (levels == clip && clip >= pmax);
}

// Integer parameters of one crossbar GEMM, resolved on the host from XbarConfig and checked by
// make_params_checked (xbar_check.h).  Plain data: python_tests/test_cuda_emulated.py mirrors the
// field layout.
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

  XBAR_HD int64_t Tr() const { return (K + rows - 1) / rows; }  // row tiles
  XBAR_HD int64_t Tc() const { return (N + cols - 1) / cols; }  // column tiles
  XBAR_HD int chunks() const { return (x_bits + dac_bits - 1) / dac_bits; }   // DAC cycles per polarity
  XBAR_HD int slices() const { return (w_bits + cell_bits - 1) / cell_bits; }  // cells per weight polarity
  // The largest partial sum, R (2^db - 1) (2^cb - 1), with the full R also for a partly filled tile.
  XBAR_HD int64_t pmax() const { return (int64_t)rows * ((1LL << dac_bits) - 1) * ((1LL << cell_bits) - 1); }
  XBAR_HD bool adc_identity() const { return adc_is_identity(adc_levels, adc_clip, pmax()); }
};

// ADC code of a non-negative partial sum: clamp(floor((2 P n + clip) / (2 clip)), 0, n).
// levels == 0 is the ideal ADC (the code is P itself).  Within the checked limits (P <= Pmax < 2^33,
// n < 2^24, clip <= 2^32) 2 P n + clip < 2^58: no int64 overflow.
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
