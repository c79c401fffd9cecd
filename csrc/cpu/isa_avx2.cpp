// The AVX2 bit-plane kernel: 8 output columns per register, popcount by nibble lookup, the float32
// ADC (checked exact per config) and int32 sums.  Compiled for AVX2 by a target pragma (no -march
// flag: the same build runs on any x86-64; driver.cpp picks it only where the CPU has AVX2).
#if defined(__x86_64__)
#include <immintrin.h>

#include <algorithm>

#include "isa.h"

namespace xma2 {
namespace cpu {
namespace {
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,popcnt"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,popcnt")
#endif
namespace avx2 {
struct V {
  static constexpr int kLanes = 8;
  using Cnt = __m256i;
  using Acc = __m256i;
  static Cnt zero() { return _mm256_setzero_si256(); }
  // AVX2 has no vector popcount: nibble lookup per byte (popcount_bytes), then bytes summed into
  // their dword (widen: two multiply-adds).  The block kernel adds the byte counts of up to
  // kMaxByteWords words (at most 8 each) before widening once.
  static constexpr int kMaxByteWords = 31;
  static __m256i popcount_bytes(uint32_t x, const uint32_t* w) {
    const __m256i v = _mm256_and_si256(_mm256_set1_epi32((int)x), _mm256_loadu_si256((const __m256i*)w));
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i nib = _mm256_set1_epi8(0x0f);
    return _mm256_add_epi8(_mm256_shuffle_epi8(lut, _mm256_and_si256(v, nib)),
                           _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), nib)));
  }
  static __m256i add_bytes(__m256i a, __m256i b) { return _mm256_add_epi8(a, b); }
  static Cnt widen(__m256i bytes) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(bytes, _mm256_set1_epi8(1)), _mm256_set1_epi16(1));
  }
  static Cnt popcnt_and(uint32_t x, const uint32_t* w) { return widen(popcount_bytes(x, w)); }
  static Cnt add(Cnt a, Cnt b) { return _mm256_add_epi32(a, b); }
  static Cnt sub(Cnt a, Cnt b) { return _mm256_sub_epi32(a, b); }
  // Shift counts as vectors: a variable shift (vpsllvd) is one cheap instruction, unlike a shift
  // by a count moved from a general register.
  struct Consts {
    __m256 a, b, b_dn;
    __m256d ad, bd, bd_dn;  // the float64 form (Adc::dbl)
    __m256i levels, offset, half, shift[32];
  };
  static Consts consts(const Adc& adc) {
    Consts k{_mm256_set1_ps(adc.a), _mm256_set1_ps(adc.b), _mm256_set1_ps(adc.b_dn), _mm256_set1_pd(adc.ad),
             _mm256_set1_pd(adc.bd), _mm256_set1_pd(adc.bd_dn), _mm256_set1_epi32((int)adc.levels),
             _mm256_set1_epi32((int)adc.offset), _mm256_set1_epi32((int)adc.half), {}};
    for (int s = 0; s < 32; ++s) k.shift[s] = _mm256_set1_epi32(s);
    return k;
  }
  // trunc(u a + b) of 8 int32 lanes in float64 (two halves of 4).
  static __m256i code_pd(__m256i u, __m256d a, __m256d b) {
    const __m128i lo = _mm256_cvttpd_epi32(_mm256_fmadd_pd(_mm256_cvtepi32_pd(_mm256_castsi256_si128(u)), a, b));
    const __m128i hi = _mm256_cvttpd_epi32(_mm256_fmadd_pd(_mm256_cvtepi32_pd(_mm256_extracti128_si256(u, 1)), a, b));
    return _mm256_set_m128i(hi, lo);
  }
  static Cnt add_shifted(const Consts& k, Cnt a, Cnt b, int s) { return _mm256_add_epi32(a, _mm256_sllv_epi32(b, k.shift[s])); }
  static Acc zero_acc() { return _mm256_setzero_si256(); }
  // The float ADC of plan.h (Adc): u = max(V + offset, 0) for the signed ADC; under half_even the even
  // one of the half-up and the half-down code (they differ, by one, only at a tie); centred when signed;
  // kDbl: in float64.
  template <bool kSgn = false, bool kEven = false, bool kDbl = false>
  static Acc add_code(const Consts& k, Acc t, Cnt p, int s, bool neg) {
    const __m256i ui = kSgn ? _mm256_max_epi32(_mm256_add_epi32(p, k.offset), _mm256_setzero_si256()) : p;
    const __m256 u = _mm256_cvtepi32_ps(ui);
    __m256i c = _mm256_min_epi32(kDbl ? code_pd(ui, k.ad, k.bd) : _mm256_cvttps_epi32(_mm256_fmadd_ps(u, k.a, k.b)),
                                 k.levels);
    if (kEven) {
      const __m256i dn = _mm256_min_epi32(
          kDbl ? code_pd(ui, k.ad, k.bd_dn) : _mm256_cvttps_epi32(_mm256_fmadd_ps(u, k.a, k.b_dn)), k.levels);
      c = _mm256_sub_epi32(c, _mm256_and_si256(_mm256_sub_epi32(c, dn), c));  // a tie with an odd code: one down
    }
    if (kSgn) c = _mm256_sub_epi32(c, k.half);
    const __m256i code = _mm256_sllv_epi32(c, k.shift[s]);
    return neg ? _mm256_sub_epi32(t, code) : _mm256_add_epi32(t, code);
  }
  static void store(int64_t* o, Acc t) {
    _mm256_storeu_si256((__m256i*)o, _mm256_cvtepi32_epi64(_mm256_castsi256_si128(t)));
    _mm256_storeu_si256((__m256i*)(o + 4), _mm256_cvtepi32_epi64(_mm256_extracti128_si256(t, 1)));
  }
  // Bit a of each uint16 moved to its sign bit, packed to bytes (saturation keeps the sign), movemask.
  static void planes32(const uint16_t* mags, int nbits, uint32_t* dst, int64_t stride) {
    const __m256i lo = _mm256_loadu_si256((const __m256i*)mags), hi = _mm256_loadu_si256((const __m256i*)(mags + 16));
    for (int a = 0; a < nbits; ++a) {
      const __m128i s = _mm_cvtsi32_si128(15 - a);
      const __m256i packed = _mm256_packs_epi16(_mm256_sll_epi16(lo, s), _mm256_sll_epi16(hi, s));
      dst[a * stride] = (uint32_t)_mm256_movemask_epi8(_mm256_permute4x64_epi64(packed, 0xD8));
    }
  }
};
#include "xbar_cpu_block.h"
}  // namespace avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
}  // namespace

const Isa kAvx2{"avx2", 8, false, &avx2::row_words, &avx2::row_planes, &avx2::block_tile_sums};

}  // namespace cpu
}  // namespace xma2
#endif  // __x86_64__
