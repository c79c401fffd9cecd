// The AVX-512 vector type V of the bit-plane kernel (xbar_cpu_block.h states the contract), 16
// output columns per register with VPOPCNTDQ.  Shared by isa_avx512.cpp and amx.cpp (whose ADC runs
// on these registers); include it only under their AVX-512 target pragma, inside a namespace.
// No include guard on purpose (one copy per including namespace).
struct V {
  static constexpr int kLanes = 16;
  using Cnt = __m512i;
  using Acc = __m512i;
  static Cnt zero() { return _mm512_setzero_si512(); }
  static Cnt popcnt_and(uint32_t x, const uint32_t* w) {
    return _mm512_popcnt_epi32(_mm512_and_si512(_mm512_set1_epi32((int)x), _mm512_loadu_si512(w)));
  }
  static Cnt add(Cnt a, Cnt b) { return _mm512_add_epi32(a, b); }
  static Cnt sub(Cnt a, Cnt b) { return _mm512_sub_epi32(a, b); }
  struct Consts {  // as in avx2::V
    __m512 a, b, b_dn;
    __m512d ad, bd, bd_dn;
    __m512i levels, offset, half, shift[32];
  };
  static Consts consts(const Adc& adc) {
    Consts k{_mm512_set1_ps(adc.a), _mm512_set1_ps(adc.b), _mm512_set1_ps(adc.b_dn), _mm512_set1_pd(adc.ad),
             _mm512_set1_pd(adc.bd), _mm512_set1_pd(adc.bd_dn), _mm512_set1_epi32((int)adc.levels),
             _mm512_set1_epi32((int)adc.offset), _mm512_set1_epi32((int)adc.half), {}};
    for (int s = 0; s < 32; ++s) k.shift[s] = _mm512_set1_epi32(s);
    return k;
  }
  // trunc(u a + b) of 16 int32 lanes in float64 (two halves of 8).
  static __m512i code_pd(__m512i u, __m512d a, __m512d b) {
    const __m256i lo = _mm512_cvttpd_epi32(_mm512_fmadd_pd(_mm512_cvtepi32_pd(_mm512_castsi512_si256(u)), a, b));
    const __m256i hi = _mm512_cvttpd_epi32(_mm512_fmadd_pd(_mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(u, 1)), a, b));
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
  }
  static Cnt add_shifted(const Consts& k, Cnt a, Cnt b, int s) { return _mm512_add_epi32(a, _mm512_sllv_epi32(b, k.shift[s])); }
  static Acc zero_acc() { return _mm512_setzero_si512(); }
  template <bool kSgn = false, bool kEven = false, bool kDbl = false>  // as in avx2::V
  static Acc add_code(const Consts& k, Acc t, Cnt p, int s, bool neg) {
    const __m512i ui = kSgn ? _mm512_max_epi32(_mm512_add_epi32(p, k.offset), _mm512_setzero_si512()) : p;
    const __m512 u = _mm512_cvtepi32_ps(ui);
    __m512i c = _mm512_min_epi32(kDbl ? code_pd(ui, k.ad, k.bd) : _mm512_cvttps_epi32(_mm512_fmadd_ps(u, k.a, k.b)),
                                 k.levels);
    if (kEven) {
      const __m512i dn = _mm512_min_epi32(
          kDbl ? code_pd(ui, k.ad, k.bd_dn) : _mm512_cvttps_epi32(_mm512_fmadd_ps(u, k.a, k.b_dn)), k.levels);
      c = _mm512_sub_epi32(c, _mm512_and_si512(_mm512_sub_epi32(c, dn), c));
    }
    if (kSgn) c = _mm512_sub_epi32(c, k.half);
    const __m512i code = _mm512_sllv_epi32(c, k.shift[s]);
    return neg ? _mm512_sub_epi32(t, code) : _mm512_add_epi32(t, code);
  }
  static void store(int64_t* o, Acc t) {
    _mm512_storeu_si512(o, _mm512_cvtepi32_epi64(_mm512_castsi512_si256(t)));
    _mm512_storeu_si512(o + 8, _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(t, 1)));
  }
  static void planes32(const uint16_t* mags, int nbits, uint32_t* dst, int64_t stride) {
    const __m512i v = _mm512_loadu_si512(mags);
    for (int a = 0; a < nbits; ++a) dst[a * stride] = (uint32_t)_mm512_test_epi16_mask(v, _mm512_set1_epi16((short)(1 << a)));
  }
};

