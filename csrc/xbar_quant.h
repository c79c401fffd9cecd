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

// Periphery conventions (SPEC 8) the C++ kernels may compute: bits of GemmParams.periphery
// (xma2_ops/config.py PERIPHERY_BIT).  The CPU bit-plane kernels compute all but analog accumulation (which
// GemmParams.kernel_form reduces to one DAC chunk where it can); the CUDA kernel and the cell ops compute none
// (their ops pass 0).
constexpr int kPeripheryDifferential = 1;   // sensing="differential"
constexpr int kPeripheryAnalog = 2;         // input_accumulation="analog" (not computed here)
constexpr int kPeripherySignMagnitude = 4;  // signed_inputs="sign_magnitude"
constexpr int kPeripheryHalfEven = 8;       // adc_rounding="half_even"
constexpr int kPeripheryEvenSplit = 16;     // row_split="even" (SPEC 8.4)
constexpr int kPeripheryTileRows = 32;      // adc_range="tile_rows" (only with the default clip)
constexpr int kPeripheryCpuKernel = kPeripheryDifferential | kPeripherySignMagnitude | kPeripheryHalfEven |
                                    kPeripheryEvenSplit | kPeripheryTileRows;

// The ADC of one row tile: n and the full scale (SPEC 8.1-8.2).
struct TileAdc {
  int64_t levels, clip;
};

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
  int periphery = 0;    // SPEC 8 conventions (kPeriphery* bits); 0 = Sections 2-3.  Last: the CUDA mirror
                        // (python_tests/test_cuda_emulated.py) lists it too.

  XBAR_HD int64_t Tr() const { return (K + rows - 1) / rows; }  // row tiles
  // The row tiles (SPEC 1 and 8.4; config.row_tile_sizes is the Python rule): every tile but the last has
  // tile_size() rows, R under the fixed split; under the even split K / Tr when Tr divides K, else
  // round_half_even(K / Tr) (CrossSim's EQUAL rule).  The last tile has the rest, at most R rows where the
  // split was checked (make_params_checked).  So a call has at most two tile sizes.
  XBAR_HD bool even_split() const { return (periphery & kPeripheryEvenSplit) != 0; }
  XBAR_HD int64_t tile_size() const {
    const int64_t tr = Tr();
    if (!even_split() || tr <= 1) return rows;
    const int64_t q = K / tr, rem = K % tr;  // K / Tr = q + rem / Tr: round half to even
    return 2 * rem > tr || (2 * rem == tr && (q & 1)) ? q + 1 : q;
  }
  XBAR_HD int64_t tile_start(int64_t r) const { return r * tile_size(); }
  XBAR_HD int64_t tile_rows(int64_t r) const { return r + 1 < Tr() ? tile_size() : K - (Tr() - 1) * tile_size(); }
  XBAR_HD int64_t Tc() const { return (N + cols - 1) / cols; }  // column tiles
  XBAR_HD int chunks() const { return (x_bits + dac_bits - 1) / dac_bits; }   // DAC cycles per polarity
  XBAR_HD int slices() const { return (w_bits + cell_bits - 1) / cell_bits; }  // cells per weight polarity
  // The largest partial sum, R (2^db - 1) (2^cb - 1), with the full R also for a partly filled tile.
  XBAR_HD int64_t pmax() const { return (int64_t)rows * full_scale_unit(); }
  // SPEC 8.1: differential sensing subtracts the two weight polarities before one conversion; with
  // signed inputs, sign_magnitude drives the two input polarities in one pass (V = P(x+) - P(x-)).
  XBAR_HD bool differential() const { return (periphery & kPeripheryDifferential) != 0; }
  XBAR_HD bool sign_magnitude() const { return (periphery & kPeripherySignMagnitude) != 0 && x_pols == 2; }
  XBAR_HD bool half_even() const { return (periphery & kPeripheryHalfEven) != 0; }
  // adc_range="tile_rows": each tile's full scale from its own rows (the ops take it only with adc_clip the
  // full scale of R rows, make_params_checked).
  XBAR_HD bool adc_tile_rows() const { return (periphery & kPeripheryTileRows) != 0; }
  // The full scale of one row, (2^cb - 1)(2^db - 1) (SPEC 8.1; analog accumulation comes as one chunk of
  // db = every input bit).
  XBAR_HD int64_t full_scale_unit() const { return ((1LL << cell_bits) - 1) * ((1LL << dac_bits) - 1); }
  // The ADC of a tile of `n_rows` rows (GemmParams.tile_adc): under adc_range="tile_rows" the full scale of
  // its rows and n = min(adc_levels, span) (the R-row n caps it; span = clip, 2 clip for the signed ADC), else
  // (adc_levels, adc_clip).  The ideal ADC stays ideal.
  XBAR_HD TileAdc tile_adc(int64_t n_rows) const {
    if (!adc_tile_rows() || adc_levels == 0) return {adc_levels, adc_clip};
    const int64_t clip = n_rows * full_scale_unit(), span = adc_signed() ? 2 * clip : clip;
    return {adc_levels < span ? adc_levels : span, clip};
  }
  // A conversion may see V < 0: the signed, symmetric ADC of SPEC 8.2 over [-clip, clip].
  XBAR_HD bool adc_signed() const { return differential() || sign_magnitude(); }
  // Lossless (SPEC 8.2): n = hi - lo and |V| <= clip for every reachable V (|V| <= Pmax under both
  // differential sensing and sign-magnitude inputs).
  XBAR_HD bool adc_identity() const {
    return adc_signed() ? (adc_levels == 0 || (adc_levels == 2 * adc_clip && adc_clip >= pmax()))
                        : adc_is_identity(adc_levels, adc_clip, pmax());
  }
};

// sum_{i < chunks, j < slices} 2^(i db + j cb): the weight that the digital shift-and-add gives one ADC
// code, summed over every (chunk, slice).  (chunks - 1) db < x_bits <= 16 and (slices - 1) cb < w_bits <= 15,
// so it is below 2^37: exact in int64 and in double.
XBAR_HD int64_t shift_sum(const XbarParams& p) {
  int64_t s = 0;
  for (int i = 0; i < p.chunks(); ++i)
    for (int j = 0; j < p.slices(); ++j) s += (int64_t)1 << (i * p.dac_bits + j * p.cell_bits);
  return s;
}

// The tile-sum bound (SPEC 3): |T_int| <= 2 code_max shift_sum(p), code_max the largest ADC code (n, or the
// largest partial sum under the ideal ADC).  The one rule behind every exactness decision on T_int: the
// vector lanes of the bit-plane kernels (plan.cpp, in double), the int64 check of the cell ops
// (xbar_check.h, in a wider integer) and the int8 AMX path (driver.cpp, on one_conversion).
template <typename T>
XBAR_HD T tile_sum_bound(const XbarParams& p, T code_max) {
  return 2 * code_max * (T)shift_sum(p);
}

// A lossless call as one conversion per tile: the whole input magnitude one chunk, the whole weight magnitude
// one slice (the ADC is then the identity and the code the partial sum).  Its pmax() = rows Qx Qw bounds
// every partial sum of the exact GEMM of one tile.
XBAR_HD XbarParams one_conversion(XbarParams p) {
  p.dac_bits = p.x_bits;
  p.cell_bits = p.w_bits;
  return p;
}

// ADC code of a non-negative partial sum: clamp(floor((2 P n + clip) / (2 clip)), 0, n).
// levels == 0 is the ideal ADC (the code is P itself).  Within the checked limits (P <= Pmax < 2^33,
// n < 2^24, clip <= 2^32) 2 P n + clip < 2^58: no int64 overflow.
XBAR_HD int64_t adc_code(int64_t p, int64_t levels, int64_t clip) {
  if (levels == 0) return p;
  int64_t c = (2 * p * levels + clip) / (2 * clip);  // p >= 0: division is floor
  return c > levels ? levels : c;
}

// The ADC of SPEC 8.2 on any V: unsigned (lo = 0, hi = clip) or signed (lo = -clip, hi = clip), n =
// levels (even when signed), round half up or half to even; returns the code, minus n/2 when signed
// (so that one unit is worth (hi - lo) / n).  levels == 0 is the ideal ADC (V itself).  Within the
// checked limits (|V| <= Pmax < 2^33, n < 2^24, clip <= 2^32) 2 u n + span < 2^59: no int64 overflow.
XBAR_HD int64_t adc_code_ext(int64_t v, int64_t levels, int64_t clip, bool sgn, bool half_even) {
  if (levels == 0) return v;
  const int64_t span = sgn ? 2 * clip : clip;
  int64_t u = sgn ? v + clip : v;
  u = u < 0 ? 0 : (u > span ? span : u);  // V outside [lo, hi] gives code 0 or n either way
  const int64_t num = 2 * u * levels + span;
  int64_t c = num / (2 * span);  // num > 0: division is floor
  if (half_even && num % (2 * span) == 0 && (c & 1)) c -= 1;
  return sgn ? c - levels / 2 : c;
}

// Field `index` of width `width` bits of a non-negative code (an input chunk or weight slice).
XBAR_HD int32_t bit_field(int32_t v, int index, int width) {
  return (v >> (index * width)) & ((1 << width) - 1);
}

}  // namespace xma2
