// What the CPU kernels know about one call (docs/CPU_KERNEL.md): the checked parameters, the
// packing geometry and the ADC in both its exact integer and its checked float32 form.
// No torch headers: the instruction-set files (isa_*.cpp, amx.cpp) include only this and isa.h.
#pragma once
#include <stdint.h>

#include "../xbar_quant.h"

namespace xma2 {
namespace cpu {

constexpr int64_t kRowBlock = 128;  // input rows per parallel work item (their planes stay in L1/L2)

// The ADC of SPEC 3 / 8.2 in both forms: exact integers (scalar code, adc_code_ext) and, in float32
// (vector code), on u = V + offset (offset = clip for the signed ADC, else 0):
//   up   = min(trunc(max(u, 0) * a + b), levels)       round half up
//   down = min(trunc(max(u, 0) * a + b_dn), levels)    round half down (differs from up only at a tie)
//   code = up, or under half_even the even one of up and down; minus `half` (n/2, signed ADC).
// Where the float32 form is not exact (large spans: the quarter step 0.25 / span below float32's rounding of
// u * a), the same in float64 (`dbl`: ad, bd, bd_dn).  The float forms are used only where they were checked
// equal to the integer rule for every reachable u.
struct Adc {
  int64_t levels, clip;
  float a, b;
  float b_dn = 0.f;     // half-down constant (half_even only)
  int64_t offset = 0;   // clip (signed ADC) or 0
  int64_t half = 0;     // levels / 2 (signed ADC) or 0
  bool sgn = false;     // signed ADC (SPEC 8.2)
  bool half_even = false;
  bool dbl = false;     // the vector kernels use the float64 form
  double ad = 0, bd = 0, bd_dn = 0;
};

// The float form of the ADC on u in [0, span] (u = V + offset; span = clip, 2 clip for the signed ADC,
// clip 2^F for the cell ops), in float32 or float64: code = trunc(fma((F)u, a, b)) rounds half up, with b_dn
// half down.
template <typename F>
struct FloatAdcOf {
  F a, b, b_dn;
};
template <typename F>
FloatAdcOf<F> float_adc_of(int64_t levels, int64_t span) {
  return {(F)((double)levels / (double)span),
          (F)(0.5 + 0.25 / (double)span),   // the quarter step keeps exact halves from rounding down
          (F)(0.5 - 0.25 / (double)span)};  // ... and here from rounding up
}
using FloatAdc = FloatAdcOf<float>;
inline FloatAdc float_adc(int64_t levels, int64_t span) { return float_adc_of<float>(levels, span); }

// The float-ADC exactness check, the one rule for every vector kernel (the bit-plane kernels through
// make_plan, the AVX2 cell kernel of cells.cpp): true when, for every u in [ulo, uhi] (uhi <= span), the
// float form (min(., levels) first when `clamped`: the kernel clamps the code) equals the integer rule of
// xbar_quant.h (half up; under half_even also half down); in float64 when `in_double`.  Checked value by
// value, once per process for each argument set; the caller bounds uhi - ulo.
bool float_adc_exact(int64_t levels, int64_t span, int64_t ulo, int64_t uhi, bool half_even, bool clamped,
                     bool in_double = false);

// Everything the kernels need about one call, resolved once (make_plan).
struct Plan {
  XbarParams p;
  int words;         // 32-bit words per bit plane of one row tile: ceil(rows / 32)
  int64_t kpad;      // rows of one tile padded to a multiple of 64 (input magnitudes, AMX bytes)
  bool lossless;     // every ADC code equals its partial sum (p.adc_identity())
  bool simd_exact;   // the int32 / float32 vector kernels give the exact result for this config
  bool float_sums;   // |T_int| < 2^24: T can be summed in float32 lanes, exactly
  bool no_clamp;     // clip >= Pmax: no partial sum exceeds the ADC range, codes need no clamp
  bool identity;     // lossless, collapsed to one chunk and one slice: the code is the partial sum
  // The ADC of every row tile but the last ([0]) and of the last ([1]): the same one unless
  // adc_range="tile_rows" gives each tile size its own (a call has at most two: XbarParams::tile_size).
  Adc adc[2];
  const Adc& tile_adc(int64_t r) const { return adc[r + 1 < p.Tr() ? 0 : 1]; }
};

Plan make_plan(const XbarParams& p);  // plan.cpp

}  // namespace cpu
}  // namespace xma2
