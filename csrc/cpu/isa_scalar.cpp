// The portable bit-plane kernel: one output column at a time, int64 sums and the exact integer
// ADC division.  Runs everywhere, and is the fallback for configs whose sums or float ADC the
// vector kernels cannot do exactly (Plan::simd_exact).
#include <algorithm>

#include "isa.h"

namespace xma2 {
namespace cpu {
namespace {
namespace scalar {
struct V {
  static constexpr int kLanes = 1;
  using Cnt = int64_t;
  using Acc = int64_t;
  static Cnt zero() { return 0; }
  static Cnt popcnt_and(uint32_t x, const uint32_t* w) { return __builtin_popcount(x & *w); }
  static Cnt add(Cnt a, Cnt b) { return a + b; }
  static Cnt sub(Cnt a, Cnt b) { return a - b; }
  using Consts = Adc;
  static Consts consts(const Adc& adc) { return adc; }
  static Cnt add_shifted(const Consts&, Cnt a, Cnt b, int s) { return a + (b << s); }
  static Acc zero_acc() { return 0; }
  template <bool kSgn = false, bool kEven = false, bool kDbl = false>  // (kDbl: no float form here)
  static Acc add_code(const Consts& adc, Acc t, Cnt p, int s, bool neg) {
    const int64_t code = (kSgn || kEven ? adc_code_ext(p, adc.levels, adc.clip, kSgn, kEven)
                                        : adc_code(p, adc.levels, adc.clip)) * ((int64_t)1 << s);
    return neg ? t - code : t + code;
  }
  static void store(int64_t* o, Acc t) { *o = t; }
  static void planes32(const uint16_t* mags, int nbits, uint32_t* dst, int64_t stride) {
    for (int a = 0; a < nbits; ++a) {
      uint32_t word = 0;
      for (int e = 0; e < 32; ++e) word |= (uint32_t)((mags[e] >> a) & 1u) << e;
      dst[a * stride] = word;
    }
  }
};
#include "xbar_cpu_block.h"
}  // namespace scalar
}  // namespace

const Isa kScalar{"scalar", 1, false, &scalar::row_words, &scalar::row_planes, &scalar::block_tile_sums};

}  // namespace cpu
}  // namespace xma2
