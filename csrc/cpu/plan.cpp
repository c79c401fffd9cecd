// make_plan: the per-call decisions of the CPU kernel that depend only on the parameters.
#include "plan.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <mutex>
#include <tuple>

namespace xma2 {
namespace cpu {

FloatAdc float_adc(int64_t levels, int64_t span) {
  return {(float)((double)levels / (double)span),
          (float)(0.5 + 0.25 / (double)span),   // the quarter step keeps exact halves from rounding down
          (float)(0.5 - 0.25 / (double)span)};  // ... and here from rounding up
}

bool float_adc_exact(int64_t levels, int64_t span, int64_t ulo, int64_t uhi, bool half_even, bool clamped) {
  // The answer depends only on these numbers: checked once per process for each, not on every call.
  static std::mutex mu;
  static std::map<std::tuple<int64_t, int64_t, int64_t, int64_t, int>, bool> known;
  const auto key = std::make_tuple(levels, span, ulo, uhi, (half_even ? 1 : 0) | (clamped ? 2 : 0));
  {
    std::lock_guard<std::mutex> lock(mu);
    const auto it = known.find(key);
    if (it != known.end()) return it->second;
  }
  const FloatAdc f = float_adc(levels, span);
  const auto code = [&](int64_t u, float b) {
    const int64_t c = (int64_t)std::fma((float)u, f.a, b);
    return clamped ? std::min(c, levels) : c;
  };
  bool exact = true;
  for (int64_t u = ulo; u <= uhi && exact; ++u) {
    const int64_t num = 2 * u * levels + span;
    const int64_t up = num / (2 * span), down = (num - 1) / (2 * span);  // half up, half down (num >= 1)
    exact = code(u, f.b) == up;
    if (half_even) exact = exact && code(u, f.b_dn) == down;
  }
  std::lock_guard<std::mutex> lock(mu);
  if (known.size() > 256) known.clear();
  known[key] = exact;
  return exact;
}

namespace {

// Checks that the float32 ADC (and the int32 sums) of the vector kernels are exact for every
// partial sum this config can produce.  |V| <= Pmax (V >= 0 for the unsigned ADC), u = V + offset is
// clamped to >= 0 before the float ADC; past hi every code is `levels`, and trunc(u*a + b) is monotone
// in u, so checking u in [max(0, offset - Pmax), min(span, offset + Pmax)] covers all.  Under half_even
// both the half-up and the half-down form are checked (the even one of the two is then the exact
// half-even code: they differ, by one, exactly at a tie).
bool vector_adc_exact(const XbarParams& p, Adc& adc) {
  if (p.adc_levels == 0) return false;
  const int64_t pmax = p.pmax();
  const bool sgn = p.adc_signed(), even = p.half_even();
  const int64_t span = sgn ? 2 * p.adc_clip : p.adc_clip;
  adc.sgn = sgn;
  adc.half_even = even;
  adc.offset = sgn ? p.adc_clip : 0;
  adc.half = sgn ? p.adc_levels / 2 : 0;
  const FloatAdc f = float_adc(p.adc_levels, span);
  adc.a = f.a;
  adc.b = f.b;
  adc.b_dn = f.b_dn;
  const int64_t ulo = std::max<int64_t>(0, adc.offset - pmax), uhi = std::min(span, adc.offset + pmax);
  // float u, int32 lanes for u (and for the offset added to V), and a bounded check
  if (pmax >= (1LL << 24) || uhi >= (1LL << 24) || adc.offset >= (1LL << 24) || uhi - ulo > (sgn ? (1 << 21) : (1 << 20))) return false;
  // unclamped: up to hi the code needs no clamp either
  return float_adc_exact(p.adc_levels, span, ulo, uhi, even, false);
}

}  // namespace

Plan make_plan(const XbarParams& p) {
  Plan pl;
  pl.p = p;
  pl.words = (p.rows + 31) / 32;
  pl.kpad = ((int64_t)p.rows + 63) / 64 * 64;
  pl.lossless = p.adc_identity();
  pl.adc = Adc{p.adc_levels, p.adc_clip, 0.f, 0.f};
  pl.adc.sgn = p.adc_signed();
  pl.adc.half_even = p.half_even();
  pl.adc.offset = pl.adc.sgn ? p.adc_clip : 0;
  pl.adc.half = pl.adc.sgn ? p.adc_levels / 2 : 0;
  // The tile-sum bound (xbar_quant.h) must fit the int32 lanes.
  const double t_bound = tile_sum_bound(p, (double)p.adc_levels);
  pl.simd_exact = vector_adc_exact(p, pl.adc) && t_bound < 2147483647.0;
  pl.float_sums = t_bound < 16777216.0;
  pl.no_clamp = p.adc_clip >= p.pmax();
  pl.identity = false;
  return pl;
}

}  // namespace cpu
}  // namespace xma2
