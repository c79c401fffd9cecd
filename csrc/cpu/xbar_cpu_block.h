// The inner loop of the CPU crossbar kernel, written once and compiled once per instruction
// set: isa_scalar.cpp, isa_avx2.cpp and isa_avx512.cpp include this file inside a namespace that
// defines the vector type `V` (scalar, AVX2 or AVX-512) under the matching `#pragma GCC target`.
// No include guard on purpose.
//
// V provides, for L = V::kLanes output columns at a time:
//   Consts                 consts(adc): broadcast ADC constants and shift counts, made once per call
//   Cnt  (partial sums P)  zero(), popcnt_and(x_word, lane_words) = popcount(x & w) per lane,
//                          add(Cnt, Cnt), add_shifted(k, Cnt P, Cnt c, s) = P + (c << s)
//   Cnt                    sub(Cnt, Cnt) (V of differential / sign-magnitude conversions, SPEC 8.1)
//   Acc  (tile sums T)     zero_acc(), add_code<kSgn, kEven, kDbl>(k, T, V, s, negative) = T +- (ADC code of V << s)
//                          (kSgn: the signed ADC, centred code; kEven: round half to even; SPEC 8.2; kDbl: the
//                          float64 form of the float ADC, Adc::dbl; the scalar kernel ignores it),
//                          store(int64_t*, T)
//   planes32(mags, nbits, dst, stride): bit planes of 32 uint16 magnitudes, dst[a*stride] = plane a.
// and optionally (AVX2, no vector popcount): kMaxByteWords, popcount_bytes(x_word, lane_words) = the
//   per-byte counts, add_bytes, widen(bytes) = Cnt, so that the counts of a plane's words are added
//   as bytes and widened once per plane pair instead of once per word.

// T_int[r, m, n] for `nm` rows m and L columns n of one row tile (SPEC section 3), into
// out[mi * L + lane], through the tile's ADC `adc` (Plan::tile_adc).  xp: the rows' bit planes of this
// tile, `x_stride` words apart, each [pol][bit][word]; wp: the lane block's weight planes [pol][bit][word][lane].
// kW > 0: the words per plane (rows / 32, rounded up) known at compile time, so that the word
// loop unrolls; 0: read from the plan.
template <typename T, typename = void>
constexpr bool kByteCounts = false;
template <typename T>
constexpr bool kByteCounts<T, std::void_t<decltype(T::kMaxByteWords)>> = true;

// sum over the W words of popcount(x plane word & weight plane word), per lane.
template <typename VV, int kW>
inline typename VV::Cnt plane_pair_count(const uint32_t* xw, const uint32_t* ww, int W) {
  constexpr int L = VV::kLanes;
  if constexpr (kByteCounts<VV> && kW > 0) {
    static_assert(kW <= VV::kMaxByteWords, "the byte counts of kW words must fit a byte");
    auto bytes = VV::popcount_bytes(xw[0], ww);
#pragma GCC unroll 4
    for (int w = 1; w < kW; ++w) bytes = VV::add_bytes(bytes, VV::popcount_bytes(xw[w], ww + w * L));
    return VV::widen(bytes);
  } else {
    typename VV::Cnt c = VV::popcnt_and(xw[0], ww);
#pragma GCC unroll 4
    for (int w = 1; w < W; ++w) c = VV::add(c, VV::popcnt_and(xw[w], ww + w * L));
    return c;
  }
}

// P of input polarity px, bit planes [a0, a1) (one chunk), weight polarity qw, bit planes [b0, b1)
// (one slice), per lane.
// (always inlined: the default branch of block_tile_sums_w then compiles to the loop it had before SPEC 8.)
template <int kW>
__attribute__((always_inline)) inline typename V::Cnt chunk_slice_sum(const typename V::Consts& k, const uint32_t* xm, int W, int xb, int wbits,
                                       const uint32_t* wp, int px, int a0, int a1, int qw, int b0, int b1) {
  constexpr int L = V::kLanes;
  typename V::Cnt p = V::zero();
  for (int a = a0; a < a1; ++a) {
    const uint32_t* xw = xm + (px * xb + a) * W;
    for (int b = b0; b < b1; ++b) {
      const uint32_t* ww = wp + (int64_t)(qw * wbits + b) * W * L;
      p = V::add_shifted(k, p, plane_pair_count<V, kW>(xw, ww, W), (a - a0) + (b - b0));
    }
  }
  return p;
}

// kSgn, kEven, kDbl: the tile's ADC (signed, SPEC 8.2; half-even rounding; the float64 form, Adc::dbl), as
// compile-time flags so that the default ADC's code is the same as without them.
template <int kW, bool kSgn, bool kEven, bool kDbl>
inline void block_tile_sums_w(const Plan& pl, const Adc& adc, const uint32_t* xp, int64_t x_stride, int64_t nm,
                              const uint32_t* wp, int64_t* out) {
  const int W = kW > 0 ? kW : pl.words, db = pl.p.dac_bits, cb = pl.p.cell_bits;
  const int xb = pl.p.x_bits, wbits = pl.p.w_bits, I = pl.p.chunks(), S = pl.p.slices();
  const typename V::Consts k = V::consts(adc);
  // SPEC 8.1: which partial sums one conversion sums.  Differential: both weight polarities (+ minus -);
  // sign-magnitude (signed inputs): both input polarities, V = P(x+ chunk) - P(x- chunk) = P(c_i(x)).  The ADC
  // is signed exactly when one of them is on (XbarParams::adc_signed): kSgn picks the loop at compile time, so
  // each instantiation holds one of the two (smaller functions that GCC keeps whole).
  const bool diff = pl.p.differential(), sm = pl.p.sign_magnitude();
  for (int64_t mi = 0; mi < nm; ++mi) {
    const uint32_t* xm = xp + mi * x_stride;
    typename V::Acc t = V::zero_acc();
    if constexpr (!kSgn) {  // Sections 2-3: one conversion per (polarity pair, chunk, slice)
      for (int px = 0; px < pl.p.x_pols; ++px) {
        for (int i = 0; i < I; ++i) {
          const int a0 = i * db, a1 = std::min(a0 + db, xb);
          const uint32_t* xa = xm + (px * xb + a0) * W;
          // An all-zero input chunk gives P = 0, and ADC code 0, in every column: nothing to add.
          uint32_t any = 0;
          for (int w = 0; w < (a1 - a0) * W; ++w) any |= xa[w];
          if (any == 0) continue;
          for (int qw = 0; qw < 2; ++qw) {
            for (int j = 0; j < S; ++j) {
              const int b0 = j * cb, b1 = std::min(b0 + cb, wbits);
              const typename V::Cnt p = chunk_slice_sum<kW>(k, xm, W, xb, wbits, wp, px, a0, a1, qw, b0, b1);
              t = V::template add_code<kSgn, kEven, kDbl>(k, t, p, i * db + j * cb, px != qw);
            }
          }
        }
      }
    } else {
      for (int i = 0; i < I; ++i) {
        const int a0 = i * db, a1 = std::min(a0 + db, xb);
        // An all-zero chunk of a polarity adds P = 0 to its sums; a conversion whose parts are all zero
        // sees V = 0: code 0 (unsigned) or the centre n/2 (signed), 0 after centring: nothing to add.
        bool any[2] = {false, false};
        for (int px = 0; px < pl.p.x_pols; ++px) {
          const uint32_t* xa = xm + (px * xb + a0) * W;
          uint32_t bits = 0;
          for (int w = 0; w < (a1 - a0) * W; ++w) bits |= xa[w];
          any[px] = bits != 0;
        }
        if (!any[0] && !any[1]) continue;
        for (int j = 0; j < S; ++j) {
          const int b0 = j * cb, b1 = std::min(b0 + cb, wbits);
          const int s = i * db + j * cb;
          auto part = [&](int px, int qw) {
            return chunk_slice_sum<kW>(k, xm, W, xb, wbits, wp, px, a0, a1, qw, b0, b1);
          };
          if (diff && sm) {  // one conversion: sum over (px, qw) of (-1)^(px + qw) P
            typename V::Cnt v = V::zero();
            for (int px = 0; px < 2; ++px) {
              if (!any[px]) continue;
              const typename V::Cnt d = V::sub(part(px, 0), part(px, 1));
              v = px == 0 ? V::add(v, d) : V::sub(v, d);
            }
            t = V::template add_code<kSgn, kEven, kDbl>(k, t, v, s, false);
          } else if (diff) {  // per input polarity: P(w+) - P(w-), the pass's sign outside
            for (int px = 0; px < pl.p.x_pols; ++px) {
              if (!any[px]) continue;
              t = V::template add_code<kSgn, kEven, kDbl>(k, t, V::sub(part(px, 0), part(px, 1)), s, px == 1);
            }
          } else {  // sign-magnitude, per weight polarity: P(x+) - P(x-), the polarity's sign outside
            for (int qw = 0; qw < 2; ++qw) {
              typename V::Cnt v = any[0] ? part(0, qw) : V::zero();
              if (any[1]) v = V::sub(v, part(1, qw));
              t = V::template add_code<kSgn, kEven, kDbl>(k, t, v, s, qw == 1);
            }
          }
        }
      }
    }
    V::store(out + mi * V::kLanes, t);
  }
}

template <int kW, bool kDbl>
inline void block_tile_sums_round(const Plan& pl, const Adc& adc, const uint32_t* xp, int64_t x_stride, int64_t nm,
                                  const uint32_t* wp, int64_t* out) {
  if (adc.sgn && adc.half_even) return block_tile_sums_w<kW, true, true, kDbl>(pl, adc, xp, x_stride, nm, wp, out);
  if (adc.sgn) return block_tile_sums_w<kW, true, false, kDbl>(pl, adc, xp, x_stride, nm, wp, out);
  if (adc.half_even) return block_tile_sums_w<kW, false, true, kDbl>(pl, adc, xp, x_stride, nm, wp, out);
  return block_tile_sums_w<kW, false, false, kDbl>(pl, adc, xp, x_stride, nm, wp, out);
}

template <int kW>
inline void block_tile_sums_adc(const Plan& pl, const Adc& adc, const uint32_t* xp, int64_t x_stride, int64_t nm,
                                const uint32_t* wp, int64_t* out) {
  if constexpr (V::kLanes > 1) {  // (the scalar kernel's ADC is the integer rule: no float form)
    if (adc.dbl) return block_tile_sums_round<kW, true>(pl, adc, xp, x_stride, nm, wp, out);
  }
  return block_tile_sums_round<kW, false>(pl, adc, xp, x_stride, nm, wp, out);
}

inline void block_tile_sums(const Plan& pl, const Adc& adc, const uint32_t* xp, int64_t x_stride, int64_t nm,
                            const uint32_t* wp, int64_t* out) {
  switch (pl.words) {  // rows <= 128 (one to four words) are the common crossbar sizes
    case 1: return block_tile_sums_adc<1>(pl, adc, xp, x_stride, nm, wp, out);
    case 2: return block_tile_sums_adc<2>(pl, adc, xp, x_stride, nm, wp, out);
    case 3: return block_tile_sums_adc<3>(pl, adc, xp, x_stride, nm, wp, out);
    case 4: return block_tile_sums_adc<4>(pl, adc, xp, x_stride, nm, wp, out);
    default: return block_tile_sums_adc<0>(pl, adc, xp, x_stride, nm, wp, out);
  }
}

// Bit planes of one input row: mags [pol][tile][kpad] uint16 magnitudes (zero padded per tile)
// -> dst [tile][pol][bit][word], row_words(pl) words.
inline int64_t row_words(const Plan& pl) { return (int64_t)pl.p.Tr() * pl.p.x_pols * pl.p.x_bits * pl.words; }

inline void row_planes(const Plan& pl, const uint16_t* mags, uint32_t* dst) {
  const int W = pl.words, xb = pl.p.x_bits, pols = pl.p.x_pols;
  const int64_t Tr = pl.p.Tr();
  for (int px = 0; px < pols; ++px)
    for (int64_t r = 0; r < Tr; ++r)
      for (int w = 0; w < W; ++w)
        V::planes32(mags + (px * Tr + r) * pl.kpad + w * 32, xb, dst + ((r * pols + px) * xb) * W + w, W);
}
