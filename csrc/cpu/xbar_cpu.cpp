// CPU kernels of the crossbar GEMM (docs/SPEC.md section 3; design notes in docs/CPU_KERNEL.md).
//
// Quantised path (an ADC that can lose information), per block of 128 input rows, per row tile
// and block of output columns, all (polarity, chunk, slice) partial sums, each through the ADC,
// shifted and added in registers.  Partial sums come from
//   - AMX int8 tile multiplies (chunk values x slice values; section "amx" below), or
//   - bit planes packed along K, 32 rows per word (xbar_cpu_block.h):
//       P = sum_{a in chunk i, b in slice j} 2^(a - i*db + b - j*cb) * popcount(x_a & w_b),
//     compiled for AVX-512 (VPOPCNTDQ, 16 columns), AVX2 (8 columns) and portable scalar code
//     (1 column, int64, exact ADC division: also the fallback for configs whose sums do not fit
//     the int32/float32 lanes).
// The fastest path this CPU runs is picked per call, or the one named by the environment
// variable XMA2_CPU_ISA=scalar|avx2|avx512|amx (read on every call).
//
// Lossless path (adc_levels == 0, or adc_levels == adc_clip >= Pmax): every ADC code equals its
// partial sum, so T_int of a row tile is sum_k x_int * w_int: on AMX one chunk x one slice with
// the identity as ADC, else one float GEMM per tile, exact because every partial sum is an
// integer below 2^24 (float32) or 2^53 (float64).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

#include "../xbar_check.h"
#include "../xbar_quant.h"

namespace xma2 {
namespace {

constexpr int64_t kRowBlock = 128;  // input rows per parallel work item (their planes stay in L1/L2)

// The ADC of SPEC 3 in both forms: exact integers (scalar code) and code = min(trunc(P*a + b), levels)
// in float32 (vector code), the latter used only where it was checked equal for every reachable P.
struct Adc {
  int64_t levels, clip;
  float a, b;
};

// Everything the kernels need about one call, resolved once.
struct Plan {
  XbarParams p;
  int words;         // 32-bit words per bit plane of one row tile: ceil(rows / 32)
  int64_t kpad;      // rows of one tile padded to a multiple of 64 (input magnitudes, AMX bytes)
  bool lossless;     // every ADC code equals its partial sum
  bool simd_exact;   // the int32 / float32 vector kernels give the exact result for this config
  bool float_sums;   // |T_int| < 2^24: T can be summed in float32 lanes, exactly
  bool no_clamp;     // clip >= Pmax: no partial sum exceeds the ADC range, codes need no clamp
  bool identity;     // lossless, collapsed to one chunk and one slice: the code is the partial sum
  Adc adc;
};

// Checks that the float32 ADC (and the int32 sums) of the vector kernels are exact for every
// partial sum this config can produce.  P <= Pmax; past clip every code is `levels`, and
// trunc(P*a + b) is monotone in P, so checking P in [0, min(Pmax, clip)] covers all.
bool vector_adc_exact(const XbarParams& p, int64_t pmax, Adc& adc) {
  if (p.adc_levels == 0) return false;
  adc.a = (float)((double)p.adc_levels / (double)p.adc_clip);
  adc.b = (float)(0.5 + 0.25 / (double)p.adc_clip);  // the quarter step keeps exact halves from rounding down
  const int64_t pcap = std::min(pmax, p.adc_clip);
  if (pmax >= (1LL << 24) || pcap > (1 << 20)) return false;  // float P, and a bounded check
  for (int64_t v = 0; v <= pcap; ++v)  // unclamped: up to clip the code needs no clamp either
    if ((int64_t)std::fma((float)v, adc.a, adc.b) != adc_code(v, p.adc_levels, p.adc_clip)) return false;
  return true;
}

Plan make_plan(const XbarParams& p) {
  Plan pl;
  pl.p = p;
  pl.words = (p.rows + 31) / 32;
  pl.kpad = ((int64_t)p.rows + 63) / 64 * 64;
  const int64_t pmax = (int64_t)p.rows * ((1LL << p.dac_bits) - 1) * ((1LL << p.cell_bits) - 1);
  pl.lossless = p.adc_levels == 0 || (p.adc_levels == p.adc_clip && p.adc_clip >= pmax);  // code = P
  pl.adc = {p.adc_levels, p.adc_clip, 0.f, 0.f};
  // |T| <= 2 * levels * sum_{i,j} 2^(i*db + j*cb) must fit the int32 lanes.
  double shifts = 0;
  for (int i = 0; i < p.chunks(); ++i)
    for (int j = 0; j < p.slices(); ++j) shifts += std::ldexp(1.0, i * p.dac_bits + j * p.cell_bits);
  const double t_bound = 2.0 * (double)p.adc_levels * shifts;
  pl.simd_exact = vector_adc_exact(p, pmax, pl.adc) && t_bound < 2147483647.0;
  pl.float_sums = t_bound < 16777216.0;
  pl.no_clamp = p.adc_clip >= pmax;
  pl.identity = false;
  return pl;
}

// ------------------------------------------------------------------ the inner loop, once per ISA
namespace scalar {
struct V {
  static constexpr int kLanes = 1;
  using Cnt = int64_t;
  using Acc = int64_t;
  static Cnt zero() { return 0; }
  static Cnt popcnt_and(uint32_t x, const uint32_t* w) { return __builtin_popcount(x & *w); }
  static Cnt add(Cnt a, Cnt b) { return a + b; }
  using Consts = Adc;
  static Consts consts(const Adc& adc) { return adc; }
  static Cnt add_shifted(const Consts&, Cnt a, Cnt b, int s) { return a + (b << s); }
  static Acc zero_acc() { return 0; }
  static Acc add_code(const Consts& adc, Acc t, Cnt p, int s, bool neg) {
    const int64_t code = adc_code(p, adc.levels, adc.clip) << s;
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

#if defined(__x86_64__)
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
  // AVX2 has no vector popcount: nibble lookup per byte, then bytes summed into their dword.
  static Cnt popcnt_and(uint32_t x, const uint32_t* w) {
    const __m256i v = _mm256_and_si256(_mm256_set1_epi32((int)x), _mm256_loadu_si256((const __m256i*)w));
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i nib = _mm256_set1_epi8(0x0f);
    const __m256i bytes = _mm256_add_epi8(_mm256_shuffle_epi8(lut, _mm256_and_si256(v, nib)),
                                          _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), nib)));
    return _mm256_madd_epi16(_mm256_maddubs_epi16(bytes, _mm256_set1_epi8(1)), _mm256_set1_epi16(1));
  }
  static Cnt add(Cnt a, Cnt b) { return _mm256_add_epi32(a, b); }
  // Shift counts as vectors: a variable shift (vpsllvd) is one cheap instruction, unlike a shift
  // by a count moved from a general register.
  struct Consts {
    __m256 a, b;
    __m256i levels, shift[32];
  };
  static Consts consts(const Adc& adc) {
    Consts k{_mm256_set1_ps(adc.a), _mm256_set1_ps(adc.b), _mm256_set1_epi32((int)adc.levels), {}};
    for (int s = 0; s < 32; ++s) k.shift[s] = _mm256_set1_epi32(s);
    return k;
  }
  static Cnt add_shifted(const Consts& k, Cnt a, Cnt b, int s) { return _mm256_add_epi32(a, _mm256_sllv_epi32(b, k.shift[s])); }
  static Acc zero_acc() { return _mm256_setzero_si256(); }
  static Acc add_code(const Consts& k, Acc t, Cnt p, int s, bool neg) {
    const __m256 f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), k.a, k.b);
    const __m256i code = _mm256_sllv_epi32(_mm256_min_epi32(_mm256_cvttps_epi32(f), k.levels), k.shift[s]);
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

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vpopcntdq,avx2,fma,popcnt"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vpopcntdq,avx2,fma,popcnt")
#endif
namespace avx512 {
struct V {
  static constexpr int kLanes = 16;
  using Cnt = __m512i;
  using Acc = __m512i;
  static Cnt zero() { return _mm512_setzero_si512(); }
  static Cnt popcnt_and(uint32_t x, const uint32_t* w) {
    return _mm512_popcnt_epi32(_mm512_and_si512(_mm512_set1_epi32((int)x), _mm512_loadu_si512(w)));
  }
  static Cnt add(Cnt a, Cnt b) { return _mm512_add_epi32(a, b); }
  struct Consts {  // as in avx2::V
    __m512 a, b;
    __m512i levels, shift[32];
  };
  static Consts consts(const Adc& adc) {
    Consts k{_mm512_set1_ps(adc.a), _mm512_set1_ps(adc.b), _mm512_set1_epi32((int)adc.levels), {}};
    for (int s = 0; s < 32; ++s) k.shift[s] = _mm512_set1_epi32(s);
    return k;
  }
  static Cnt add_shifted(const Consts& k, Cnt a, Cnt b, int s) { return _mm512_add_epi32(a, _mm512_sllv_epi32(b, k.shift[s])); }
  static Acc zero_acc() { return _mm512_setzero_si512(); }
  static Acc add_code(const Consts& k, Acc t, Cnt p, int s, bool neg) {
    const __m512 f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), k.a, k.b);
    const __m512i code = _mm512_sllv_epi32(_mm512_min_epi32(_mm512_cvttps_epi32(f), k.levels), k.shift[s]);
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
#include "xbar_cpu_block.h"

// One im2col row of 1-byte codes: dst[k] = src[off[k]], 16 at a time (dword gathers at byte
// offsets, low bytes kept).  The caller guarantees src[off[k] + 3] is inside the tensor.
inline void gather_bytes(const uint8_t* src, const int32_t* off, int64_t K, uint8_t* dst) {
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
    const __m512i idx = _mm512_maskz_loadu_epi32(m, off + k);
    const __m512i g = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, idx, src, 1);
    _mm_mask_storeu_epi8(dst + k, m, _mm512_cvtepi32_epi8(g));
  }
}
}  // namespace avx512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// AMX (Sapphire Rapids and later): the partial sums of 16 rows x 16 columns come from int8 tile
// multiplies, A = input chunk values (one byte per k, uint8), B = weight slice values (int8,
// 4 k per column in a 32-bit group), C += A B in int32; the ADC and shift-and-add then run on
// AVX-512 registers.  Chunk values <= 255 and slice values <= 127 (dac_bits <= 8, cell_bits <= 7).
#if defined(__linux__)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,avx512vpopcntdq,avx2,fma,popcnt"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,avx512vpopcntdq,avx2,fma,popcnt")
#endif
namespace amx {
using avx512::V;

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
  const int64_t K = pl.p.K, R = pl.p.rows, Tr = pl.p.Tr(), kp = pl.kpad;
  const int qx = (1 << pl.p.x_bits) - 1;
  __mmask64 out_of_range = 0;
  for (int64_t r = 0; r < Tr; ++r) {
    const int64_t n = std::min(R, K - r * R);
    for (int64_t k = 0; k < kp; k += 64) {
      const __mmask64 valid = n >= k + 64 ? ~0ULL : n > k ? (~0ULL >> (64 - (n - k))) : 0ULL;
      const __m512i v = _mm512_maskz_loadu_epi8(valid, row + r * R + k);
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
inline void block_tile_sums_t(const Plan& pl, const uint32_t* xp32, int64_t x_stride, int64_t nm,
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
  const V::Consts k = V::consts(pl.adc);
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

inline void block_tile_sums(const Plan& pl, const uint32_t* xp, int64_t x_stride, int64_t nm, const uint32_t* wp,
                            int64_t* out) {
  if (pl.identity && pl.float_sums) return block_tile_sums_t<true, false, true>(pl, xp, x_stride, nm, wp, out);
  if (pl.identity) return block_tile_sums_t<false, false, true>(pl, xp, x_stride, nm, wp, out);
  if (pl.float_sums && pl.no_clamp) return block_tile_sums_t<true, false, false>(pl, xp, x_stride, nm, wp, out);
  if (pl.float_sums) return block_tile_sums_t<true, true, false>(pl, xp, x_stride, nm, wp, out);
  return block_tile_sums_t<false, true, false>(pl, xp, x_stride, nm, wp, out);
}
}  // namespace amx
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // __linux__
#endif  // __x86_64__

// ------------------------------------------------------------------ runtime choice of the ISA
struct Isa {
  const char* name;
  int lanes;
  bool amx;  // byte layout of inputs and weights instead of bit planes
  int64_t (*row_words)(const Plan&);
  void (*row)(const Plan&, const uint16_t*, uint32_t*);
  void (*block)(const Plan&, const uint32_t*, int64_t, int64_t, const uint32_t*, int64_t*);
};

const Isa kScalar{"scalar", 1, false, &scalar::row_words, &scalar::row_planes, &scalar::block_tile_sums};
#if defined(__x86_64__)
const Isa kAvx2{"avx2", 8, false, &avx2::row_words, &avx2::row_planes, &avx2::block_tile_sums};
const Isa kAvx512{"avx512", 16, false, &avx512::row_words, &avx512::row_planes, &avx512::block_tile_sums};
#if defined(__linux__)
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
#endif
#endif

bool cpu_runs(const std::string& name) {
#if defined(__x86_64__)
  if (name == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt");
  if (name == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vpopcntdq") && cpu_runs("avx2");
#if defined(__linux__)
  if (name == "amx") return cpu_runs("avx512") && amx_usable();
#endif
#endif
  return name == "scalar";
}

// The kernel for this call: XMA2_CPU_ISA when set (an error if this CPU cannot run it), else the
// fastest this CPU runs.  Configs whose sums do not fit the vector lanes always use the scalar
// code; AMX falls back to AVX-512 for cell_bits 8 (slices beyond int8).
const Isa& choose_isa(const Plan& pl) {
  const char* env = std::getenv("XMA2_CPU_ISA");
  std::string want = env ? env : "";
  if (want.empty() || want == "auto")
    want = cpu_runs("amx") ? "amx" : cpu_runs("avx512") ? "avx512" : cpu_runs("avx2") ? "avx2" : "scalar";
  TORCH_CHECK(want == "scalar" || want == "avx2" || want == "avx512" || want == "amx",
              "XMA2_CPU_ISA: expected one of auto, scalar, avx2, avx512, amx, got '", want, "'");
  TORCH_CHECK(cpu_runs(want), "XMA2_CPU_ISA=", want, ": this CPU (or build) cannot run that instruction set");
  if (!pl.simd_exact) return kScalar;
#if defined(__x86_64__)
#if defined(__linux__)
  if (want == "amx" && pl.p.cell_bits <= 7) return kAmx;
  if (want == "amx") return kAvx512;
#endif
  if (want == "avx512") return kAvx512;
  if (want == "avx2") return kAvx2;
#endif
  return kScalar;
}

// A lossless config on AMX: the whole input code is one chunk and the whole weight magnitude one
// slice (both fit int8 tiles), the ADC is the identity, and one int8 tile multiply per tile gives
// sum_k x w exactly.  Returns the AMX kernel and rewrites the plan, or nullptr (then the float
// GEMM path runs) when AMX is unavailable, not chosen by XMA2_CPU_ISA, or the codes are too wide.
const Isa* lossless_on_amx(Plan& pl) {
#if defined(__x86_64__) && defined(__linux__)
  const char* env = std::getenv("XMA2_CPU_ISA");
  const std::string want = env ? env : "";
  if (!(want.empty() || want == "auto" || want == "amx") || !cpu_runs("amx")) return nullptr;
  if (pl.p.x_bits > 8 || pl.p.w_bits > 7) return nullptr;
  const double bound = 2.0 * pl.p.rows * ((1 << pl.p.x_bits) - 1) * ((1 << pl.p.w_bits) - 1);
  if (bound >= 2147483647.0) return nullptr;
  pl.p.dac_bits = pl.p.x_bits;
  pl.p.cell_bits = pl.p.w_bits;
  pl.identity = true;
  pl.float_sums = bound < 16777216.0;
  return &kAmx;
#else
  (void)pl;
  return nullptr;
#endif
}

// ------------------------------------------------------------------ packing
// Input codes [M, K] of any integer dtype; out-of-range codes are reported after the pass.
template <typename T>
void row_mags(const T* row, int64_t sk, const Plan& pl, int64_t qx, uint16_t* mags, std::atomic<bool>& bad) {
  const int64_t K = pl.p.K, R = pl.p.rows, Tr = pl.p.Tr(), kp = pl.kpad;
  const bool two = pl.p.x_pols == 2;
  const int64_t lo = two ? -qx : 0;
  int64_t mn = 0, mx = 0;
  std::memset(mags, 0, sizeof(uint16_t) * pl.p.x_pols * Tr * kp);
  for (int64_t r = 0; r < Tr; ++r) {
    const int64_t k0 = r * R, n = std::min(K, k0 + R) - k0;
    uint16_t* pos = mags + r * kp;
    uint16_t* neg = mags + (Tr + r) * kp;  // only when two polarities
    const T* src = row + k0 * sk;
    for (int64_t k = 0; k < n; ++k) {  // branch-free: input codes are random-looking
      const int64_t v = (int64_t)src[k * sk];
      mn = std::min(mn, v);
      mx = std::max(mx, v);
      pos[k] = (uint16_t)(v > 0 ? v : 0);
    }
    if (two)
      for (int64_t k = 0; k < n; ++k) {
        const int64_t v = (int64_t)src[k * sk];
        neg[k] = (uint16_t)(v < 0 ? -v : 0);
      }
  }
  if (mn < lo || mx > qx) bad = true;
}

// The ISA's layout of input rows [m0, m0 + nm) -> dst, isa.row_words(pl) words per row.
void pack_input_rows(const at::Tensor& x, const Plan& pl, const Isa& isa, int64_t m0, int64_t nm,
                     std::vector<uint16_t>& mags, uint32_t* dst, std::atomic<bool>& bad) {
  const int64_t qx = (1LL << pl.p.x_bits) - 1;
  const int64_t stride = isa.row_words(pl);
#if defined(__x86_64__) && defined(__linux__)
  const bool bytes = x.scalar_type() == (pl.p.x_pols == 2 ? at::kChar : at::kByte) && x.stride(1) == 1;
  if (isa.amx && bytes) {  // 8-bit codes: chunk bytes without the uint16 detour
    const uint8_t* base = reinterpret_cast<const uint8_t*>(x.data_ptr());
    bool b = false;
    for (int64_t mi = 0; mi < nm; ++mi)
      amx::row_bytes_from_codes(pl, base + (m0 + mi) * x.stride(0), pl.p.x_pols == 2, dst + mi * stride, b);
    if (b) bad = true;
    return;
  }
#endif
  mags.resize((size_t)(pl.p.x_pols * pl.p.Tr() * pl.kpad));
  AT_DISPATCH_INTEGRAL_TYPES(x.scalar_type(), "xbar_cpu_pack", [&] {
    for (int64_t mi = 0; mi < nm; ++mi) {
      row_mags(x.data_ptr<scalar_t>() + (m0 + mi) * x.stride(0), x.stride(1), pl, qx, mags.data(), bad);
      isa.row(pl, mags.data(), dst + mi * stride);
    }
  });
}

// Weight bit planes for `lanes` columns per block: [tile][lane block][pol][bit][word][lane].
struct WeightPlanes {
  std::vector<uint32_t> data;
  int64_t blocks;     // ceil(N / lanes)
  int64_t per_block;  // words per (tile, lane block)
  const uint32_t* at(int64_t r, int64_t nb) const { return data.data() + (r * blocks + nb) * per_block; }
};

// AMX layout of one (tile, 16-column block): [pol * S + slice][kstep][k / 4 % 16][column][k % 4] bytes.
std::shared_ptr<const WeightPlanes> pack_weights_amx(const at::Tensor& w, const Plan& pl) {
  const int64_t K = pl.p.K, N = pl.p.N, R = pl.p.rows, Tr = pl.p.Tr(), KS = pl.kpad / 64;
  const int S = pl.p.slices(), cb = pl.p.cell_bits;
  const int64_t q = (1LL << pl.p.w_bits) - 1;
  auto wp = std::make_shared<WeightPlanes>();
  wp->blocks = (N + 15) / 16;
  wp->per_block = 2 * S * KS * 256;
  wp->data.assign((size_t)(Tr * wp->blocks * wp->per_block), 0);
  const at::Tensor wc = w.contiguous();
  const int32_t* c = wc.data_ptr<int32_t>();
  std::atomic<bool> bad{false};
  at::parallel_for(0, Tr, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t k = r * R; k < std::min(K, (r + 1) * R); ++k) {
        const int64_t kk = k - r * R;
        for (int64_t n = 0; n < N; ++n) {
          const int64_t v = c[k * N + n];
          if (v < -q || v > q) bad = true;
          if (v == 0 || v < -q || v > q) continue;
          const int pol = v > 0 ? 0 : 1;
          const uint32_t mag = (uint32_t)(v > 0 ? v : -v);
          uint8_t* base = reinterpret_cast<uint8_t*>(wp->data.data() + (r * wp->blocks + n / 16) * wp->per_block);
          for (int j = 0; j < S; ++j)
            base[(((int64_t)(pol * S + j) * KS + kk / 64) * 16 + kk % 64 / 4) * 64 + n % 16 * 4 + kk % 4] =
                (uint8_t)bit_field((int32_t)mag, j, cb);
        }
      }
  });
  TORCH_CHECK(!bad, "xbar: w_codes must hold codes in [", -q, ", ", q, "]");
  return wp;
}

std::shared_ptr<const WeightPlanes> pack_weights(const at::Tensor& w, const Plan& pl, int lanes) {
  const int64_t K = pl.p.K, N = pl.p.N, R = pl.p.rows, Tr = pl.p.Tr();
  const int W = pl.words, wbits = pl.p.w_bits;
  const int64_t q = (1LL << wbits) - 1;
  auto wp = std::make_shared<WeightPlanes>();
  wp->blocks = (N + lanes - 1) / lanes;
  wp->per_block = (int64_t)2 * wbits * W * lanes;
  wp->data.assign((size_t)(Tr * wp->blocks * wp->per_block), 0);
  const at::Tensor wc = w.contiguous();
  const int32_t* c = wc.data_ptr<int32_t>();
  std::atomic<bool> bad{false};
  at::parallel_for(0, Tr, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t k = r * R; k < std::min(K, (r + 1) * R); ++k) {
        const int64_t kk = k - r * R;
        for (int64_t n = 0; n < N; ++n) {
          const int64_t v = c[k * N + n];
          if (v < -q || v > q) bad = true;
          if (v == 0 || v < -q || v > q) continue;
          const int pol = v > 0 ? 0 : 1;
          const uint32_t mag = (uint32_t)(v > 0 ? v : -v);
          uint32_t* base = wp->data.data() + (r * wp->blocks + n / lanes) * wp->per_block + n % lanes;
          for (int b = 0; b < wbits; ++b)
            if ((mag >> b) & 1u) base[((int64_t)(pol * wbits + b) * W + kk / 32) * lanes] |= 1u << (kk % 32);
        }
      }
  });
  TORCH_CHECK(!bad, "xbar: w_codes must hold codes in [", -q, ", ", q, "]");
  return wp;
}

// Packed weights are reused while the codes tensor is unchanged: same tensor object (kept alive
// here, so its memory cannot be reused by another tensor), same version counter (bumped by every
// in-place write), same layout and packing parameters.
class WeightCache {
 public:
  std::shared_ptr<const WeightPlanes> get(const at::Tensor& w, const Plan& pl, const Isa& isa) {
    auto pack = [&] { return isa.amx ? pack_weights_amx(w, pl) : pack_weights(w, pl, isa.lanes); };
    if (w.is_inference()) return pack();  // no version counter to trust
    const Key key{w.unsafeGetTensorImpl(), w._version(), w.data_ptr(), w.sizes().vec(), w.strides().vec(),
                  pl.p.rows, pl.p.w_bits, pl.p.cell_bits, isa.amx ? -1 : isa.lanes};
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = entries_.begin(); it != entries_.end(); ++it)
        if (it->key == key) {
          entries_.splice(entries_.begin(), entries_, it);
          return entries_.front().planes;
        }
    }
    auto planes = pack();
    std::lock_guard<std::mutex> lock(mu_);
    entries_.push_front(Entry{key, w, planes});
    if (entries_.size() > kCapacity) entries_.pop_back();
    return planes;
  }

 private:
  struct Key {
    const void* impl;
    int64_t version;
    const void* data;
    std::vector<int64_t> sizes, strides;
    int rows, w_bits, cell_bits, layout;
    bool operator==(const Key& o) const {
      return impl == o.impl && version == o.version && data == o.data && sizes == o.sizes && strides == o.strides &&
             rows == o.rows && w_bits == o.w_bits && cell_bits == o.cell_bits && layout == o.layout;
    }
  };
  struct Entry {
    Key key;
    at::Tensor tensor;
    std::shared_ptr<const WeightPlanes> planes;
  };
  static constexpr size_t kCapacity = 16;
  std::mutex mu_;
  std::list<Entry> entries_;
};

WeightCache& weight_cache() {
  static WeightCache cache;
  return cache;
}

// ------------------------------------------------------------------ the quantised driver
// One weight set (backbone or task weights) and which (tile, lane block) pairs are needed.
struct WeightSet {
  std::shared_ptr<const WeightPlanes> planes;
  std::vector<char> active;  // [Tr * blocks]
};

// Calls epi(set, r, n0, m0, nm, T) with T[mi * L + lane] = T_int[r, m0 + mi, n0 + lane] (lanes past
// N hold zeros) for every needed (set, tile, lane block), input rows in blocks, in parallel; then
// done(m0, nm) once the row block is complete (on the same thread).
template <typename Epi, typename Done>
void run_quantized(const at::Tensor& x, const Plan& pl, const Isa& isa, const std::vector<WeightSet>& sets, Epi epi,
                   Done done) {
  const int64_t M = pl.p.M, Tr = pl.p.Tr(), L = isa.lanes;
  std::atomic<bool> bad{false};
  // Row blocks are handed out one at a time rather than in equal shares: on a machine shared with
  // other processes, a thread whose core is busy then takes fewer blocks instead of stalling all.
  const int64_t blocks = (M + kRowBlock - 1) / kRowBlock;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), blocks), 1, [&](int64_t, int64_t) {
    std::vector<uint16_t> mags;
    const int64_t stride = isa.row_words(pl);
    std::vector<uint32_t> xplanes((size_t)(kRowBlock * stride));
    std::vector<int64_t> t((size_t)(kRowBlock * L));
    for (int64_t blk = next++; blk < blocks; blk = next++) {
      const int64_t m0 = blk * kRowBlock, nm = std::min(kRowBlock, M - m0);
      pack_input_rows(x, pl, isa, m0, nm, mags, xplanes.data(), bad);
      for (int64_t r = 0; r < Tr; ++r) {
        const uint32_t* xr = xplanes.data() + r * (stride / Tr);
        for (size_t s = 0; s < sets.size(); ++s) {
          const WeightPlanes& wp = *sets[s].planes;
          for (int64_t nb = 0; nb < wp.blocks; ++nb) {
            if (!sets[s].active[r * wp.blocks + nb]) continue;
            isa.block(pl, xr, stride, nm, wp.at(r, nb), t.data());
            epi((int)s, r, nb * L, m0, nm, t.data());
          }
        }
      }
      done(m0, nm);
    }
  });
  TORCH_CHECK(!bad, "xbar: x_codes must hold codes in [", pl.p.x_pols == 2 ? -((1LL << pl.p.x_bits) - 1) : 0, ", ",
              (1LL << pl.p.x_bits) - 1, "]");
}

// Needed (tile, lane block) pairs: those with a non-zero coefficient (all when coef is undefined).
template <typename scalar_t>
std::vector<char> active_blocks(const at::Tensor& coef, const Plan& pl, int64_t lanes) {
  const int64_t Tr = pl.p.Tr(), N = pl.p.N, blocks = (N + lanes - 1) / lanes;
  std::vector<char> act((size_t)(Tr * blocks), coef.defined() ? 0 : 1);
  if (!coef.defined()) return act;
  const scalar_t* c = coef.data_ptr<scalar_t>();
  for (int64_t r = 0; r < Tr; ++r)
    for (int64_t n = 0; n < N; ++n)
      if (c[r * N + n] != scalar_t(0)) act[r * blocks + n / lanes] = 1;
  return act;
}

// ------------------------------------------------------------------ checks
void check_codes(const at::Tensor& x, const at::Tensor& w, const Plan& pl) {
  check_input_codes(x, pl.p);
  check_weight_codes(w, pl.p, "w_codes");
}

// ------------------------------------------------------------------ lossless: one exact GEMM per tile
// Float type in which every T_int of one tile (|T| <= rows * Qx * Qw) is exact.
at::ScalarType exact_float(const Plan& pl) {
  const double bound = (double)pl.p.rows * ((1LL << pl.p.x_bits) - 1) * ((1LL << pl.p.w_bits) - 1);
  return bound < 16777216.0 ? at::kFloat : at::kDouble;
}

constexpr int64_t kGemmRowBlock = 8192;  // input rows converted to float at a time (few, large GEMM calls)

// ------------------------------------------------------------------ the ops
at::Tensor xbar_tile_sums_cpu(const at::Tensor& x_codes, const at::Tensor& w_codes, int64_t rows, int64_t cols,
                              int64_t input_bits, bool input_signed, int64_t dac_bits, int64_t weight_bits,
                              int64_t cell_bits, int64_t adc_levels, int64_t adc_clip) {
  Plan pl = make_plan(make_params_checked(x_codes, w_codes, rows, cols, input_bits, input_signed, dac_bits, weight_bits,
                                  cell_bits, adc_levels, adc_clip));
  const int64_t M = pl.p.M, N = pl.p.N, Tr = pl.p.Tr();
  at::Tensor out = at::empty({Tr, M, N}, x_codes.options().dtype(at::kLong));
  const Isa* amx_lossless = pl.lossless ? lossless_on_amx(pl) : nullptr;
  if (pl.lossless && !amx_lossless) {
    check_codes(x_codes, w_codes, pl);
    const auto ft = exact_float(pl);
    const at::Tensor wf = w_codes.to(ft);
    for (int64_t r = 0; r < Tr; ++r) {
      const int64_t k0 = r * pl.p.rows, kr = std::min<int64_t>(pl.p.rows, pl.p.K - k0);
      out[r].copy_(at::mm(x_codes.narrow(1, k0, kr).to(ft), wf.narrow(0, k0, kr)));
    }
    return out;
  }
  const Isa& isa = amx_lossless ? *amx_lossless : choose_isa(pl);
  std::vector<WeightSet> sets{{weight_cache().get(w_codes, pl, isa), {}}};
  sets[0].active = active_blocks<float>(at::Tensor(), pl, isa.lanes);
  int64_t* o = out.data_ptr<int64_t>();
  run_quantized(x_codes, pl, isa, sets, [&](int, int64_t r, int64_t n0, int64_t m0, int64_t nm, const int64_t* t) {
    const int64_t L = isa.lanes, nl = std::min(L, N - n0);
    for (int64_t mi = 0; mi < nm; ++mi)
      std::memcpy(o + (r * M + m0 + mi) * N + n0, t + mi * L, sizeof(int64_t) * nl);
  }, [](int64_t, int64_t) {});
  return out;
}

// y[m, n] = sum_s sum_r coef_s[r, n] * T_s[r, m, n], summed in float64 per row block, rounded once.
template <typename scalar_t>
void mvm_quantized(const at::Tensor& x, const std::vector<at::Tensor>& w, const std::vector<at::Tensor>& coef,
                   const Plan& pl, const Isa& isa, at::Tensor& y) {
  const int64_t N = pl.p.N, L = isa.lanes;
  std::vector<WeightSet> sets;
  std::vector<const scalar_t*> cp;
  for (size_t s = 0; s < w.size(); ++s) {
    sets.push_back({weight_cache().get(w[s], pl, isa), active_blocks<scalar_t>(coef[s], pl, L)});
    cp.push_back(coef[s].data_ptr<scalar_t>());
  }
  scalar_t* out = y.data_ptr<scalar_t>();
  std::vector<std::vector<double>> acc((size_t)at::get_num_threads(), std::vector<double>((size_t)(kRowBlock * N), 0.0));
  run_quantized(x, pl, isa, sets, [&](int s, int64_t r, int64_t n0, int64_t, int64_t nm, const int64_t* t) {
    double* a = acc[(size_t)at::get_thread_num()].data() + n0;
    const int64_t nl = std::min(L, N - n0);
    const scalar_t* c = cp[s] + r * N + n0;
    for (int64_t mi = 0; mi < nm; ++mi) {
      double* row = a + mi * N;
      const int64_t* tr = t + mi * L;
      for (int64_t l = 0; l < nl; ++l) row[l] += (double)c[l] * (double)tr[l];
    }
  }, [&](int64_t m0, int64_t nm) {
    std::vector<double>& a = acc[(size_t)at::get_thread_num()];
    for (int64_t i = 0; i < nm * N; ++i) out[m0 * N + i] = (scalar_t)a[(size_t)i];
    std::fill(a.begin(), a.end(), 0.0);
  });
}

// Lossless: T_int of each tile is one exact float GEMM (the sum of x_int * w_int); the tiles are
// combined with their coefficients in float64 per block of input rows, like the quantised path.
template <typename scalar_t>
void mvm_lossless(const at::Tensor& x, const std::vector<at::Tensor>& w, const std::vector<at::Tensor>& coef,
                  const Plan& pl, at::Tensor& y) {
  const auto ft = exact_float(pl);
  const int64_t M = pl.p.M, N = pl.p.N, Tr = pl.p.Tr(), R = pl.p.rows;
  std::vector<at::Tensor> wf;
  std::vector<std::vector<char>> row_used;  // tile rows with a non-zero coefficient
  for (size_t s = 0; s < w.size(); ++s) {
    wf.push_back(w[s].to(ft));
    const at::Tensor used = coef[s].ne(0).any(1);
    row_used.emplace_back(used.data_ptr<bool>(), used.data_ptr<bool>() + Tr);
  }
  scalar_t* out = y.data_ptr<scalar_t>();
  std::vector<double> acc;
  for (int64_t m0 = 0; m0 < M; m0 += kGemmRowBlock) {
    const int64_t nm = std::min(kGemmRowBlock, M - m0);
    const at::Tensor xb = x.narrow(0, m0, nm).to(ft);
    acc.assign((size_t)(nm * N), 0.0);
    for (size_t s = 0; s < w.size(); ++s) {
      const scalar_t* c = coef[s].data_ptr<scalar_t>();
      for (int64_t r = 0; r < Tr; ++r) {
        if (!row_used[s][(size_t)r]) continue;  // every PE of this tile row is skipped
        const int64_t k0 = r * R, kr = std::min(R, pl.p.K - k0);
        const at::Tensor t = at::mm(xb.narrow(1, k0, kr), wf[s].narrow(0, k0, kr)).to(at::kDouble).contiguous();
        const double* tp = t.data_ptr<double>();
        at::parallel_for(0, nm, 64, [&](int64_t a, int64_t b) {
          for (int64_t mi = a; mi < b; ++mi)
            for (int64_t n = 0; n < N; ++n) acc[(size_t)(mi * N + n)] += (double)c[r * N + n] * tp[mi * N + n];
        });
      }
    }
    for (int64_t i = 0; i < nm * N; ++i) out[m0 * N + i] = (scalar_t)acc[(size_t)i];
  }
}

at::Tensor xbar_mvm_cpu(const at::Tensor& x_codes, const at::Tensor& wb_codes, const std::optional<at::Tensor>& wt_codes,
                        const at::Tensor& coef_b, const std::optional<at::Tensor>& coef_t, int64_t rows, int64_t cols,
                        int64_t input_bits, bool input_signed, int64_t dac_bits, int64_t weight_bits, int64_t cell_bits,
                        int64_t adc_levels, int64_t adc_clip) {
  Plan pl = make_plan(make_params_checked(x_codes, wb_codes, rows, cols, input_bits, input_signed, dac_bits, weight_bits,
                                  cell_bits, adc_levels, adc_clip));
  TORCH_CHECK(wt_codes.has_value() == coef_t.has_value(), "xbar_mvm: wt_codes and coef_t must be given together");
  TORCH_CHECK(coef_b.scalar_type() == at::kFloat || coef_b.scalar_type() == at::kDouble,
              "xbar_mvm: coef_b must be float32 or float64, got ", coef_b.scalar_type());
  TORCH_CHECK(coef_b.dim() == 2 && coef_b.size(0) == pl.p.Tr() && coef_b.size(1) == pl.p.N,
              "xbar_mvm: coef_b must be [Tr, N] = [", pl.p.Tr(), ", ", pl.p.N, "], got ", coef_b.sizes());
  std::vector<at::Tensor> w{wb_codes}, coef{coef_b.contiguous()};
  if (coef_t.has_value()) {
    TORCH_CHECK(wt_codes->sizes() == wb_codes.sizes() && wt_codes->scalar_type() == at::kInt,
                "xbar_mvm: wt_codes must be int32 of shape ", wb_codes.sizes(), ", got ", wt_codes->sizes());
    TORCH_CHECK(coef_t->sizes() == coef_b.sizes() && coef_t->scalar_type() == coef_b.scalar_type(),
                "xbar_mvm: coef_t must match coef_b in shape and dtype");
    w.push_back(*wt_codes);
    coef.push_back(coef_t->contiguous());
  }
  const Isa* amx_lossless = pl.lossless ? lossless_on_amx(pl) : nullptr;
  const bool gemm = pl.lossless && !amx_lossless;
  if (gemm)
    for (const auto& wi : w) check_codes(x_codes, wi, pl);
  at::Tensor y = at::empty({pl.p.M, pl.p.N}, coef_b.options());
  AT_DISPATCH_FLOATING_TYPES(coef_b.scalar_type(), "xbar_mvm_cpu", [&] {
    if (gemm) mvm_lossless<scalar_t>(x_codes, w, coef, pl, y);
    else mvm_quantized<scalar_t>(x_codes, w, coef, pl, amx_lossless ? *amx_lossless : choose_isa(pl), y);
  });
  return y;
}

// G[r, n] = sum_m gy[m, n] * T_int[r, m, n] (float64), without materialising T_int.
at::Tensor xbar_coef_grad_cpu(const at::Tensor& x_codes, const at::Tensor& w_codes, const at::Tensor& gy, int64_t rows,
                              int64_t cols, int64_t input_bits, bool input_signed, int64_t dac_bits, int64_t weight_bits,
                              int64_t cell_bits, int64_t adc_levels, int64_t adc_clip) {
  Plan pl = make_plan(make_params_checked(x_codes, w_codes, rows, cols, input_bits, input_signed, dac_bits, weight_bits,
                                  cell_bits, adc_levels, adc_clip));
  const int64_t M = pl.p.M, N = pl.p.N, Tr = pl.p.Tr();
  TORCH_CHECK(gy.dim() == 2 && gy.size(0) == M && gy.size(1) == N, "xbar_coef_grad: gy must be [M, N] = [", M, ", ",
              N, "], got ", gy.sizes());
  TORCH_CHECK(gy.is_floating_point(), "xbar_coef_grad: gy must be floating point, got ", gy.scalar_type());
  const at::Tensor g64 = gy.to(at::kDouble).contiguous();
  const Isa* amx_lossless = pl.lossless ? lossless_on_amx(pl) : nullptr;
  if (pl.lossless && !amx_lossless) {
    // sum_m gy[m, n] sum_{k in r} x[m, k] w[k, n] = sum_{k in r} w[k, n] (X^T gy)[k, n]
    check_codes(x_codes, w_codes, pl);
    at::Tensor z = at::zeros({pl.p.K, N}, g64.options());
    for (int64_t m0 = 0; m0 < M; m0 += kGemmRowBlock) {
      const int64_t nm = std::min(kGemmRowBlock, M - m0);
      z.addmm_(x_codes.narrow(0, m0, nm).to(at::kDouble).t(), g64.narrow(0, m0, nm));
    }
    const int64_t pad = Tr * pl.p.rows - pl.p.K;
    at::Tensor prod = at::constant_pad_nd(z.mul_(w_codes.to(at::kDouble)), {0, 0, 0, pad});
    return prod.view({Tr, pl.p.rows, N}).sum(1);
  }
  const Isa& isa = amx_lossless ? *amx_lossless : choose_isa(pl);
  const int64_t L = isa.lanes;
  std::vector<WeightSet> sets{{weight_cache().get(w_codes, pl, isa), {}}};
  sets[0].active = active_blocks<float>(at::Tensor(), pl, L);
  const double* g = g64.data_ptr<double>();
  // One partial G per thread, summed at the end.
  std::vector<std::vector<double>> part((size_t)at::get_num_threads(), std::vector<double>((size_t)(Tr * N), 0.0));
  run_quantized(x_codes, pl, isa, sets, [&](int, int64_t r, int64_t n0, int64_t m0, int64_t nm, const int64_t* t) {
    double* gr = part[(size_t)at::get_thread_num()].data() + r * N + n0;
    const int64_t nl = std::min(L, N - n0);
    for (int64_t mi = 0; mi < nm; ++mi) {
      const double* gm = g + (m0 + mi) * N + n0;
      const int64_t* tr = t + mi * L;
      for (int64_t l = 0; l < nl; ++l) gr[l] += gm[l] * (double)tr[l];
    }
  }, [](int64_t, int64_t) {});
  at::Tensor out = at::zeros({Tr, N}, g64.options());
  double* o = out.data_ptr<double>();
  for (const auto& pt : part)
    for (int64_t i = 0; i < Tr * N; ++i) o[i] += pt[(size_t)i];
  return out;
}

// im2col of integer codes [B, C, H, W] -> [B*Ho*Wo, C*kh*kw] in PyTorch's (c, i, j) order, zero
// padded, same dtype: the conv lowering without a float copy of the unfolded input.
at::Tensor xbar_unfold_codes_cpu(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef dilation,
                                 at::IntArrayRef padding, at::IntArrayRef stride) {
  TORCH_CHECK(x.dim() == 4, "xbar_unfold_codes: x must be [B, C, H, W], got ", x.sizes());
  TORCH_CHECK(kernel_size.size() == 2 && dilation.size() == 2 && padding.size() == 2 && stride.size() == 2,
              "xbar_unfold_codes: kernel_size, dilation, padding and stride must have 2 values each");
  for (int d = 0; d < 2; ++d)
    TORCH_CHECK(kernel_size[d] >= 1 && dilation[d] >= 1 && stride[d] >= 1 && padding[d] >= 0,
                "xbar_unfold_codes: expected kernel_size, dilation, stride >= 1 and padding >= 0, got ", kernel_size,
                ", ", dilation, ", ", stride, ", ", padding);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), Wd = x.size(3);
  const int64_t kh = kernel_size[0], kw = kernel_size[1];
  const int64_t Ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) / stride[0] + 1;
  const int64_t Wo = (Wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) / stride[1] + 1;
  TORCH_CHECK(Ho >= 1 && Wo >= 1, "xbar_unfold_codes: input ", x.sizes(), " too small for the kernel");
  const at::Tensor xc = x.contiguous();
  const int64_t K = C * kh * kw;
  at::Tensor out = at::empty({B * Ho * Wo, K}, x.options());
  AT_DISPATCH_INTEGRAL_TYPES(x.scalar_type(), "xbar_unfold_codes", [&] {
    const scalar_t* src = xc.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int64_t sh = stride[0], sw = stride[1], ph = padding[0], pw = padding[1], dh = dilation[0], dw = dilation[1];
    const int64_t numel = xc.numel();
    // Offsets of the window's elements from its top-left corner, for the gather path (1-byte codes).
    const bool gather = sizeof(scalar_t) == 1 && cpu_runs("avx512") && numel < (1LL << 31);
    std::vector<int32_t> off(gather ? (size_t)K : 0);
    int64_t max_off = 0;
    for (int64_t c = 0, k = 0; gather && c < C; ++c)
      for (int64_t i = 0; i < kh; ++i)
        for (int64_t j = 0; j < kw; ++j, ++k) {
          off[(size_t)k] = (int32_t)((c * H + i * dh) * Wd + j * dw);
          max_off = std::max<int64_t>(max_off, off[(size_t)k]);
        }
    at::parallel_for(0, B * Ho, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t bh = p0; bh < p1; ++bh) {
        const int64_t b = bh / Ho, ho = bh % Ho;
        const int64_t h0 = ho * sh - ph;
        const bool h_inside = h0 >= 0 && h0 + (kh - 1) * dh < H;
        for (int64_t wo = 0; wo < Wo; ++wo) {
          scalar_t* o = dst + (bh * Wo + wo) * K;
          const int64_t w0 = wo * sw - pw;
          const bool w_inside = w0 >= 0 && w0 + (kw - 1) * dw < Wd;  // no padding column: no checks
#if defined(__x86_64__)
          // Away from the padding, a row is a gather at fixed offsets from the window's corner.
          const int64_t corner = (b * C * H + h0) * Wd + w0;
          if (gather && h_inside && w_inside && corner + max_off + 4 <= numel) {
            avx512::gather_bytes(reinterpret_cast<const uint8_t*>(src) + corner, off.data(), K,
                                 reinterpret_cast<uint8_t*>(o));
            continue;
          }
#endif
          for (int64_t c = 0; c < C; ++c) {
            const scalar_t* plane = src + (b * C + c) * H * Wd;
            for (int64_t i = 0; i < kh; ++i, o += kw) {
              const int64_t h = ho * sh - ph + i * dh;
              if (h < 0 || h >= H) {
                std::fill(o, o + kw, scalar_t(0));
                continue;
              }
              const scalar_t* line = plane + h * Wd;
              if (w_inside) {
                for (int64_t j = 0; j < kw; ++j) o[j] = line[w0 + j * dw];
              } else {
                for (int64_t j = 0; j < kw; ++j) {
                  const int64_t w = w0 + j * dw;
                  o[j] = (w >= 0 && w < Wd) ? line[w] : scalar_t(0);
                }
              }
            }
          }
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(xma2_ops, CPU, m) {
  m.impl("xbar_tile_sums", &xbar_tile_sums_cpu);
  m.impl("xbar_mvm", &xbar_mvm_cpu);
  m.impl("xbar_coef_grad", &xbar_coef_grad_cpu);
  m.impl("xbar_unfold_codes", &xbar_unfold_codes_cpu);
}

}  // namespace xma2
