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

// Checks that the float32 ADC (and the int32 sums) of the vector kernels are exact for every
// partial sum this config can produce.  P <= Pmax; past clip every code is `levels`, and
// trunc(P*a + b) is monotone in P, so checking P in [0, min(Pmax, clip)] covers all.
bool vector_adc_exact(const XbarParams& p, Adc& adc) {
  if (p.adc_levels == 0) return false;
  const int64_t pmax = p.pmax();
  adc.a = (float)((double)p.adc_levels / (double)p.adc_clip);
  adc.b = (float)(0.5 + 0.25 / (double)p.adc_clip);  // the quarter step keeps exact halves from rounding down
  const int64_t pcap = std::min(pmax, p.adc_clip);
  if (pmax >= (1LL << 24) || pcap > (1 << 20)) return false;  // float P, and a bounded check
  // The answer depends only on (levels, clip, pcap): checked once per process for each (up to 2^20
  // steps), not on every call.
  static std::mutex mu;
  static std::map<std::tuple<int64_t, int64_t, int64_t>, bool> known;
  const auto key = std::make_tuple((int64_t)p.adc_levels, p.adc_clip, pcap);
  {
    std::lock_guard<std::mutex> lock(mu);
    const auto it = known.find(key);
    if (it != known.end()) return it->second;
  }
  bool exact = true;
  for (int64_t v = 0; v <= pcap && exact; ++v)  // unclamped: up to clip the code needs no clamp either
    exact = (int64_t)std::fma((float)v, adc.a, adc.b) == adc_code(v, p.adc_levels, p.adc_clip);
  std::lock_guard<std::mutex> lock(mu);
  known[key] = exact;
  return exact;
}

}  // namespace

Plan make_plan(const XbarParams& p) {
  Plan pl;
  pl.p = p;
  pl.words = (p.rows + 31) / 32;
  pl.kpad = ((int64_t)p.rows + 63) / 64 * 64;
  pl.lossless = p.adc_identity();
  pl.adc = {p.adc_levels, p.adc_clip, 0.f, 0.f};
  // |T| <= 2 * levels * sum_{i,j} 2^(i*db + j*cb) must fit the int32 lanes.
  double shifts = 0;
  for (int i = 0; i < p.chunks(); ++i)
    for (int j = 0; j < p.slices(); ++j) shifts += std::ldexp(1.0, i * p.dac_bits + j * p.cell_bits);
  const double t_bound = 2.0 * (double)p.adc_levels * shifts;
  pl.simd_exact = vector_adc_exact(p, pl.adc) && t_bound < 2147483647.0;
  pl.float_sums = t_bound < 16777216.0;
  pl.no_clamp = p.adc_clip >= p.pmax();
  pl.identity = false;
  return pl;
}

}  // namespace cpu
}  // namespace xma2
