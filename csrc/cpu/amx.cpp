// AMX (Sapphire Rapids and later): the partial sums of 16 rows x 16 columns come from int8 tile
// multiplies, A = input chunk values (one byte per k, uint8), B = weight slice values (int8,
// 4 k per column in a 32-bit group), C += A B in int32; the ADC and shift-and-add then run on
// AVX-512 registers.  Chunk values <= 255 and slice values <= 127 (dac_bits <= 8, cell_bits <= 7).
// Also the lossless path on AMX (Plan::identity: one chunk, one slice, the ADC is the identity).
#include "isa.h"

#if defined(XMA2_CPU_AMX)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace xma2 {
namespace cpu {
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,avx512vpopcntdq,avx2,fma,popcnt"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,avx512vpopcntdq,avx2,fma,popcnt")
#endif
namespace {
namespace amx {
#include "vec_avx512.h"

// One input row: [tile][pol][chunk][kpad] bytes.
inline int64_t row_words(const Plan& pl) { return (int64_t)pl.p.Tr() * pl.p.x_pols * pl.p.chunks() * pl.kpad / 4; }

inline void row_bytes(const Plan& pl, const uint16_t* mags, uint32_t* dst32) {
  uint8_t* dst = reinterpret_cast<uint8_t*>(dst32);
  const int I = pl.p.chunks(), db = pl.p.dac_bits, pols = pl.p.x_pols;
  const int64_t Tr = pl.p.Tr(), kp = pl.kpad;
  const __m512i mask = _mm512_set1_epi16((short)((1 << db) - 1));
  for (int px = 0; px < pols; ++px)
    for (int64_t r = 0; r < Tr; ++r) {
      const uint16_t* m = mags + (px * Tr + r) * kp;
      for (int i = 0; i < I; ++i) {
        uint8_t* d = dst + ((r * pols + px) * I + i) * kp;
        const __m128i sh = _mm_cvtsi32_si128(i * db);
        for (int64_t k = 0; k < kp; k += 32) {
          const __m512i v = _mm512_and_si512(_mm512_srl_epi16(_mm512_loadu_si512(m + k), sh), mask);
          _mm256_storeu_si256((__m256i*)(d + k), _mm512_cvtepi16_epi8(v));
        }
      }
    }
}

// The same layout straight from one contiguous row of 8-bit codes (uint8 unsigned, int8 signed),
// 64 codes per step; flags codes outside [-qx or 0, qx].
inline void row_bytes_from_codes(const Plan& pl, const uint8_t* row, bool is_signed, uint32_t* dst32, bool& bad) {
  uint8_t* dst = reinterpret_cast<uint8_t*>(dst32);
  const int I = pl.p.chunks(), db = pl.p.dac_bits, pols = pl.p.x_pols;
  const int64_t Tr = pl.p.Tr(), kp = pl.kpad;
  const int qx = (1 << pl.p.x_bits) - 1;
  __mmask64 out_of_range = 0;
  for (int64_t r = 0; r < Tr; ++r) {
    const int64_t k0 = pl.p.tile_start(r), n = pl.p.tile_rows(r);
    for (int64_t k = 0; k < kp; k += 64) {
      const __mmask64 valid = n >= k + 64 ? ~0ULL : n > k ? (~0ULL >> (64 - (n - k))) : 0ULL;
      const __m512i v = _mm512_maskz_loadu_epi8(valid, row + k0 + k);
      __m512i mag[2];
      if (is_signed) {
        out_of_range |= _mm512_cmpgt_epi8_mask(v, _mm512_set1_epi8((char)qx)) |
                        _mm512_cmplt_epi8_mask(v, _mm512_set1_epi8((char)-qx));
        mag[0] = _mm512_max_epi8(v, _mm512_setzero_si512());
        mag[1] = _mm512_max_epi8(_mm512_sub_epi8(_mm512_setzero_si512(), v), _mm512_setzero_si512());
      } else {
        out_of_range |= _mm512_cmpgt_epu8_mask(v, _mm512_set1_epi8((char)qx));
        mag[0] = v;
      }
      for (int px = 0; px < pols; ++px)
        for (int i = 0; i < I; ++i) {
          // A 16-bit shift pulls bits of the neighbouring byte into the top: the mask drops them.
          const int sh = i * db;
          const __m512i keep = _mm512_set1_epi8((char)(((1 << db) - 1) & (0xFF >> sh)));
          const __m512i d = _mm512_and_si512(_mm512_srl_epi16(mag[px], _mm_cvtsi32_si128(sh)), keep);
          _mm512_storeu_si512(dst + ((r * pols + px) * I + i) * kp + k, d);
        }
    }
  }
  if (out_of_range) bad = true;
}

struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// T += sign * 2^s * ADC(P) for 16 rows of partial sums c[row][lane].  kFloat: T in float32 lanes
// (exact below 2^24) with the code floored in float and scaled by one FMA, fewer instructions than
// the int32 form; kClamp: codes clamped to `levels` (partial sums may exceed clip).
template <bool kFloat, bool kClamp, bool kIdentity>
inline void adc_rows(const V::Consts& k, __m512i* t, const int32_t (*c)[16], int s, bool neg) {
  if (kIdentity) {  // lossless: T +- P, in float32 (exact below 2^24) or int32 lanes
#pragma GCC unroll 16
    for (int mm = 0; mm < 16; ++mm) {
      const __m512i p = _mm512_load_si512(c[mm]);
      if (kFloat) {
        const __m512 f = _mm512_castsi512_ps(t[mm]), pf = _mm512_cvtepi32_ps(p);
        t[mm] = _mm512_castps_si512(neg ? _mm512_sub_ps(f, pf) : _mm512_add_ps(f, pf));
      } else {
        t[mm] = neg ? _mm512_sub_epi32(t[mm], p) : _mm512_add_epi32(t[mm], p);
      }
    }
  } else if (kFloat) {
    const __m512 scale = _mm512_set1_ps(neg ? -std::ldexp(1.0f, s) : std::ldexp(1.0f, s));
    const __m512 levels = _mm512_cvtepi32_ps(k.levels);
#pragma GCC unroll 16
    for (int mm = 0; mm < 16; ++mm) {
      __m512 code = _mm512_roundscale_ps(_mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c[mm])), k.a, k.b),
                                         _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
      if (kClamp) code = _mm512_min_ps(code, levels);
      t[mm] = _mm512_castps_si512(_mm512_fmadd_ps(code, scale, _mm512_castsi512_ps(t[mm])));
    }
  } else {
#pragma GCC unroll 16
    for (int mm = 0; mm < 16; ++mm) t[mm] = V::add_code(k, t[mm], _mm512_load_si512(c[mm]), s, neg);
  }
}

// C[c0] = A B0, C[c1] = A B1 over all k steps: the partial sums of two (polarity, slice) pairs for
// one input chunk.  Tile numbers are immediates, so each of the two tile sets gets its own copy.
#define XBAR_AMX_PAIR(name, c0, c1, b0t, b1t)                                                   \
  inline void name(const uint8_t* a, int64_t xs, const uint8_t* b0, const uint8_t* b1, int64_t KS) { \
    _tile_zero(c0);                                                                             \
    _tile_zero(c1);                                                                             \
    for (int64_t ks = 0; ks < KS; ++ks) {                                                       \
      _tile_loadd(4, a + ks * 64, xs);                                                          \
      _tile_loadd(b0t, b0 + ks * 1024, 64);                                                     \
      _tile_dpbusd(c0, 4, b0t);                                                                 \
      _tile_loadd(b1t, b1 + ks * 1024, 64);                                                     \
      _tile_dpbusd(c1, 4, b1t);                                                                 \
    }                                                                                           \
  }
XBAR_AMX_PAIR(pair_set0, 0, 1, 5, 6)
XBAR_AMX_PAIR(pair_set1, 2, 3, 7, 5)
#undef XBAR_AMX_PAIR

// Same contract as block_tile_sums: 16 rows at a time (rows past nm are computed and ignored; the
// caller's buffers hold kRowBlock rows).  Weights: [pol * S + slice][kstep][16 k-groups][16 cols][4].
// The work is a list of jobs (input polarity, chunk, pair of weight (polarity, slice)), software
// pipelined over two tile sets: the tile multiplies of job n+1 run while the ADC of job n does.
template <bool kFloat, bool kClamp, bool kIdentity>
inline void block_tile_sums_t(const Plan& pl, const Adc& adc, const uint32_t* xp32, int64_t x_stride, int64_t nm,
                              const uint32_t* wp32, int64_t* out) {
  TileConfig cfg{};
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
  const uint8_t* xp = reinterpret_cast<const uint8_t*>(xp32);
  const uint8_t* wp = reinterpret_cast<const uint8_t*>(wp32);
  const int64_t xs = x_stride * 4, kp = pl.kpad, KS = kp / 64;
  const int I = pl.p.chunks(), S = pl.p.slices(), db = pl.p.dac_bits, cb = pl.p.cell_bits, G = 2 * S;
  const V::Consts k = V::consts(adc);
  alignas(64) int32_t c[3][2][16][16];  // [job % 3][pair member][row][column]
  struct Job {
    int px, i, g;
  };
  std::vector<Job> jobs;
  jobs.reserve((size_t)(pl.p.x_pols * I * S));
  for (int64_t m0 = 0; m0 < nm; m0 += 16) {
    const int64_t rows = std::min<int64_t>(16, nm - m0);
    const uint8_t* xm = xp + m0 * xs;
    jobs.clear();
    for (int px = 0; px < pl.p.x_pols; ++px)
      for (int i = 0; i < I; ++i) {
        // An all-zero input chunk (in every row of the block) adds nothing.
        const uint8_t* a = xm + (px * I + i) * kp;
        __m512i any = _mm512_setzero_si512();
        for (int64_t mm = 0; mm < rows; ++mm)
          for (int64_t q = 0; q < kp; q += 64) any = _mm512_or_si512(any, _mm512_loadu_si512(a + mm * xs + q));
        if (_mm512_test_epi32_mask(any, any))
          for (int g = 0; g < G; g += 2) jobs.push_back({px, i, g});  // G = 2 S is even
      }
    auto issue = [&](size_t n) {
      const Job& jb = jobs[n];
      const uint8_t* a = xm + (jb.px * I + jb.i) * kp;
      const uint8_t* b = wp + (int64_t)jb.g * KS * 1024;
      if (n % 2 == 0) pair_set0(a, xs, b, b + KS * 1024, KS);
      else pair_set1(a, xs, b, b + KS * 1024, KS);
    };
    __m512i t[16];  // int32 lanes, or float32 lanes when kFloat (all-zero bits are 0 in both)
#pragma GCC unroll 16
    for (int mm = 0; mm < 16; ++mm) t[mm] = _mm512_setzero_si512();
    // The ADC reads job n-1's partial sums one step after their tile stores, so that the loads do
    // not wait on stores still in flight; c is a ring of three buffers.
    auto adc_job = [&](size_t n) {
      const Job& jb = jobs[n];
      for (int h = 0; h < 2; ++h) {
        const int q = (jb.g + h) / S, j = (jb.g + h) % S;
        adc_rows<kFloat, kClamp, kIdentity>(k, t, c[n % 3][h], jb.i * db + j * cb, jb.px != q);
      }
    };
    if (!jobs.empty()) issue(0);
    for (size_t n = 0; n < jobs.size(); ++n) {
      if (n + 1 < jobs.size()) issue(n + 1);
      int32_t(*cn)[16][16] = c[n % 3];
      if (n % 2 == 0) {
        _tile_stored(0, cn[0], 64);
        _tile_stored(1, cn[1], 64);
      } else {
        _tile_stored(2, cn[0], 64);
        _tile_stored(3, cn[1], 64);
      }
      if (n > 0) adc_job(n - 1);
    }
    if (!jobs.empty()) adc_job(jobs.size() - 1);
#pragma GCC unroll 16
    for (int mm = 0; mm < 16; ++mm)
      V::store(out + (m0 + mm) * 16, kFloat ? _mm512_cvtps_epi32(_mm512_castsi512_ps(t[mm])) : t[mm]);
  }
  // No _tile_release(): the next call loads the same configuration, and every AMX user loads its own.
}

// (AMX runs Sections 2-3 only, driver.cpp: one ADC for every tile, no_clamp holds for all.)
inline void block_tile_sums(const Plan& pl, const Adc& adc, const uint32_t* xp, int64_t x_stride, int64_t nm,
                            const uint32_t* wp, int64_t* out) {
  if (pl.identity && pl.float_sums) return block_tile_sums_t<true, false, true>(pl, adc, xp, x_stride, nm, wp, out);
  if (pl.identity) return block_tile_sums_t<false, false, true>(pl, adc, xp, x_stride, nm, wp, out);
  if (pl.float_sums && pl.no_clamp) return block_tile_sums_t<true, false, false>(pl, adc, xp, x_stride, nm, wp, out);
  if (pl.float_sums) return block_tile_sums_t<true, true, false>(pl, adc, xp, x_stride, nm, wp, out);
  return block_tile_sums_t<false, true, false>(pl, adc, xp, x_stride, nm, wp, out);
}
}  // namespace amx
}  // namespace

void amx_row_bytes_from_codes(const Plan& pl, const uint8_t* row, bool is_signed, uint32_t* dst, bool& bad) {
  amx::row_bytes_from_codes(pl, row, is_signed, dst, bad);
}
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

const Isa kAmx{"amx", 16, true, &amx::row_words, &amx::row_bytes, &amx::block_tile_sums};

// AMX needs the CPU feature and the kernel's permission to use the tile state (asked once).
bool amx_usable() {
  static const bool ok = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 24) & 1u) || !((d >> 25) & 1u)) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

}  // namespace cpu
}  // namespace xma2
#endif  // XMA2_CPU_AMX
