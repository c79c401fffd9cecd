// make_plan: the per-call decisions of the CPU kernel that depend only on the parameters.
#include "plan.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <mutex>
#include <tuple>

namespace xma2 {
namespace cpu {

namespace {
// float_adc_exact in the float type F.
template <typename F>
bool adc_form_exact(int64_t levels, int64_t span, int64_t ulo, int64_t uhi, bool half_even, bool clamped) {
  const FloatAdcOf<F> f = float_adc_of<F>(levels, span);
  const auto code = [&](int64_t u, F b) {
    const int64_t c = (int64_t)std::fma((F)u, f.a, b);
    return clamped ? std::min(c, levels) : c;
  };
  bool exact = true;
  for (int64_t u = ulo; u <= uhi && exact; ++u) {
    const int64_t num = 2 * u * levels + span;
    const int64_t up = num / (2 * span), down = (num - 1) / (2 * span);  // half up, half down (num >= 1)
    exact = code(u, f.b) == up;
    if (half_even) exact = exact && code(u, f.b_dn) == down;
  }
  return exact;
}
}  // namespace

bool float_adc_exact(int64_t levels, int64_t span, int64_t ulo, int64_t uhi, bool half_even, bool clamped,
                     bool in_double) {
  // The answer depends only on these numbers: checked once per process for each, not on every call.
  static std::mutex mu;
  static std::map<std::tuple<int64_t, int64_t, int64_t, int64_t, int>, bool> known;
  const int flags = (half_even ? 1 : 0) | (clamped ? 2 : 0) | (in_double ? 4 : 0);
  const auto key = std::make_tuple(levels, span, ulo, uhi, flags);
  {
    std::lock_guard<std::mutex> lock(mu);
    const auto it = known.find(key);
    if (it != known.end()) return it->second;
  }
  const bool exact = in_double ? adc_form_exact<double>(levels, span, ulo, uhi, half_even, clamped)
                               : adc_form_exact<float>(levels, span, ulo, uhi, half_even, clamped);
  std::lock_guard<std::mutex> lock(mu);
  if (known.size() > 256) known.clear();
  known[key] = exact;
  return exact;
}

namespace {

// Checks that the float32 ADC (and the int32 sums) of the vector kernels are exact for every
// partial sum this config can produce, and sets the float constants of `adc`.  |V| <= Pmax (V >= 0 for
// the unsigned ADC), u = V + offset is clamped to >= 0 before the float ADC; past hi every code is
// `levels`, and trunc(u*a + b) is monotone in u, so checking u in [max(0, offset - Pmax), min(span, offset +
// Pmax)] covers all.  Under half_even both the half-up and the half-down form are checked (the even one of
// the two is then the exact half-even code: they differ, by one, exactly at a tie).
bool vector_adc_exact(const XbarParams& p, Adc& adc) {
  if (p.adc_levels == 0) return false;
  const int64_t pmax = p.pmax();
  const int64_t span = adc.sgn ? 2 * p.adc_clip : p.adc_clip;
  const FloatAdc f = float_adc(p.adc_levels, span);
  adc.a = f.a;
  adc.b = f.b;
  adc.b_dn = f.b_dn;
  const int64_t ulo = std::max<int64_t>(0, adc.offset - pmax), uhi = std::min(span, adc.offset + pmax);
  // float u, int32 lanes for u (and for the offset added to V), and a bounded check
  if (pmax >= (1LL << 24) || uhi >= (1LL << 24) || adc.offset >= (1LL << 24) || uhi - ulo > (adc.sgn ? (1 << 21) : (1 << 20))) return false;
  // unclamped: up to hi the code needs no clamp either.  float32 where it is exact, else float64 (2 x the
  // ADC instructions, still far cheaper than the scalar kernel).
  if (float_adc_exact(p.adc_levels, span, ulo, uhi, adc.half_even, false)) return true;
  adc.dbl = float_adc_exact(p.adc_levels, span, ulo, uhi, adc.half_even, false, true);
  const FloatAdcOf<double> d = float_adc_of<double>(p.adc_levels, span);
  adc.ad = d.a;
  adc.bd = d.b;
  adc.bd_dn = d.b_dn;
  return adc.dbl;
}

// The ADC of `q` (one tile's rows and ADC) in both forms; `exact`: its float form is exact for every
// partial sum of such a tile (vector_adc_exact).
Adc make_adc(const XbarParams& q, bool& exact) {
  Adc adc{q.adc_levels, q.adc_clip, 0.f, 0.f};
  adc.sgn = q.adc_signed();
  adc.half_even = q.half_even();
  adc.offset = adc.sgn ? q.adc_clip : 0;
  adc.half = adc.sgn ? q.adc_levels / 2 : 0;
  exact = vector_adc_exact(q, adc);
  return adc;
}

}  // namespace

Plan make_plan(const XbarParams& p) {
  Plan pl;
  pl.p = p;
  pl.words = (p.rows + 31) / 32;  // every tile has at most R rows
  pl.kpad = ((int64_t)p.rows + 63) / 64 * 64;
  pl.lossless = p.adc_identity();  // (with tile_rows every tile is then lossless too: n_r = span_r = its Vmax)
  bool exact = true;
  if (!p.adc_tile_rows()) {
    pl.adc[0] = pl.adc[1] = make_adc(p, exact);
  } else {  // one ADC per tile size, checked on that tile's own partial sums (its rows)
    const int64_t Tr = p.Tr();
    for (int e = 0; e < 2; ++e) {
      XbarParams q = p;
      q.rows = (int)(e == 0 || Tr == 0 ? p.tile_size() : p.tile_rows(Tr - 1));
      const TileAdc t = p.tile_adc(q.rows);
      q.adc_levels = (int)t.levels;
      q.adc_clip = t.clip;
      bool tile_exact = false;
      pl.adc[e] = make_adc(q, tile_exact);
      if (e == 1 || Tr > 1) exact = exact && tile_exact;  // [0] serves tiles 0 .. Tr - 2 only
    }
  }
  // The tile-sum bound (xbar_quant.h) must fit the int32 lanes (a tile's n is at most adc_levels).
  const double t_bound = tile_sum_bound(p, (double)p.adc_levels);
  pl.simd_exact = exact && t_bound < 2147483647.0;
  pl.float_sums = t_bound < 16777216.0;
  pl.no_clamp = p.adc_clip >= p.pmax();
  pl.identity = false;
  return pl;
}

}  // namespace cpu
}  // namespace xma2
