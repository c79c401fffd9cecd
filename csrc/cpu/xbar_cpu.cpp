// CPU kernels of the crossbar GEMM (docs/SPEC.md section 3).
//
// Quantised path (an ADC that can lose information): inputs and weight polarities are split
// into binary bit planes packed along K, 32 rows per word, per row tile.  The partial sum of
// input chunk i and weight slice j for L output columns at once is
//   P = sum_{a in chunk i, b in slice j} 2^(a - i*db + b - j*cb) * popcount(x_a & w_b),
// exact; it goes through the ADC and is shifted and added in registers (xbar_cpu_block.h).
// The inner loop is compiled for AVX-512 (VPOPCNTDQ, 16 columns), AVX2 (8 columns) and portable
// scalar code (1 column, int64, exact ADC division: also the fallback for configs whose sums
// do not fit the int32/float32 lanes); the best one this CPU runs is picked per call, or the one
// named by the environment variable XMA2_CPU_ISA=scalar|avx2|avx512 (read on every call).
//
// Lossless path (adc_levels == 0, or adc_levels == adc_clip >= Pmax): every ADC code equals its
// partial sum, so T_int of a row tile is sum_k x_int * w_int: one float GEMM per tile, exact
// because every partial sum is an integer below 2^24 (float32) or 2^53 (float64).
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
#include <immintrin.h>
#endif

#include "../xbar_quant.h"

namespace xma2 {
namespace {

constexpr int kMaxXBits = 16;  // input magnitude bits per polarity
constexpr int kMaxWBits = 15;  // weight magnitude bits per polarity
constexpr int64_t kRowBlock = 64;  // input rows per parallel work item (their planes stay in L1/L2)

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
  int64_t x_stride;  // words of bit planes per input row, all tiles
  bool lossless;     // every ADC code equals its partial sum
  bool simd_exact;   // the int32 / float32 vector kernels give the exact result for this config
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
  for (int64_t v = 0; v <= pcap; ++v) {
    const int64_t f = std::min<int64_t>((int64_t)std::fma((float)v, adc.a, adc.b), p.adc_levels);
    if (f != adc_code(v, p.adc_levels, p.adc_clip)) return false;
  }
  return true;
}

Plan make_plan(const XbarParams& p) {
  Plan pl;
  pl.p = p;
  pl.words = (p.rows + 31) / 32;
  pl.x_stride = (int64_t)p.Tr() * p.x_pols * p.x_bits * pl.words;
  const int64_t pmax = (int64_t)p.rows * ((1LL << p.dac_bits) - 1) * ((1LL << p.cell_bits) - 1);
  pl.lossless = p.adc_levels == 0 || (p.adc_levels == p.adc_clip && p.adc_clip >= pmax);  // code = P
  pl.adc = {p.adc_levels, p.adc_clip, 0.f, 0.f};
  // |T| <= 2 * levels * sum_{i,j} 2^(i*db + j*cb) must fit the int32 lanes.
  double shifts = 0;
  for (int i = 0; i < p.chunks(); ++i)
    for (int j = 0; j < p.slices(); ++j) shifts += std::ldexp(1.0, i * p.dac_bits + j * p.cell_bits);
  pl.simd_exact = vector_adc_exact(p, pmax, pl.adc) && 2.0 * (double)p.adc_levels * shifts < 2147483647.0;
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
  static Cnt add_shifted(Cnt a, Cnt b, int s) { return a + (b << s); }
  static Acc zero_acc() { return 0; }
  static Acc add_code(Acc t, Cnt p, const Adc& adc, int s, bool neg) {
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
  static Cnt add_shifted(Cnt a, Cnt b, int s) { return _mm256_add_epi32(a, _mm256_sll_epi32(b, _mm_cvtsi32_si128(s))); }
  static Acc zero_acc() { return _mm256_setzero_si256(); }
  static Acc add_code(Acc t, Cnt p, const Adc& adc, int s, bool neg) {
    const __m256 f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(adc.a), _mm256_set1_ps(adc.b));
    __m256i code = _mm256_min_epi32(_mm256_cvttps_epi32(f), _mm256_set1_epi32((int)adc.levels));
    code = _mm256_sll_epi32(code, _mm_cvtsi32_si128(s));
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
  static Cnt add_shifted(Cnt a, Cnt b, int s) { return _mm512_add_epi32(a, _mm512_sll_epi32(b, _mm_cvtsi32_si128(s))); }
  static Acc zero_acc() { return _mm512_setzero_si512(); }
  static Acc add_code(Acc t, Cnt p, const Adc& adc, int s, bool neg) {
    const __m512 f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_set1_ps(adc.a), _mm512_set1_ps(adc.b));
    __m512i code = _mm512_min_epi32(_mm512_cvttps_epi32(f), _mm512_set1_epi32((int)adc.levels));
    code = _mm512_sll_epi32(code, _mm_cvtsi32_si128(s));
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
}  // namespace avx512
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // __x86_64__

// ------------------------------------------------------------------ runtime choice of the ISA
struct Isa {
  const char* name;
  int lanes;
  void (*block)(const Plan&, const uint32_t*, int64_t, int64_t, const uint32_t*, int64_t*);
  void (*planes)(const Plan&, const uint16_t*, uint32_t*);
};

const Isa kScalar{"scalar", 1, &scalar::block_tile_sums, &scalar::row_planes};
#if defined(__x86_64__)
const Isa kAvx2{"avx2", 8, &avx2::block_tile_sums, &avx2::row_planes};
const Isa kAvx512{"avx512", 16, &avx512::block_tile_sums, &avx512::row_planes};
#endif

bool cpu_runs(const std::string& name) {
#if defined(__x86_64__)
  if (name == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt");
  if (name == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vpopcntdq") && cpu_runs("avx2");
#endif
  return name == "scalar";
}

// The kernel for this call: XMA2_CPU_ISA when set (an error if this CPU cannot run it), else the
// widest this CPU runs.  Configs whose sums do not fit the vector lanes always use the scalar code.
const Isa& choose_isa(const Plan& pl) {
  const char* env = std::getenv("XMA2_CPU_ISA");
  std::string want = env ? env : "";
  if (want.empty() || want == "auto") want = cpu_runs("avx512") ? "avx512" : cpu_runs("avx2") ? "avx2" : "scalar";
  TORCH_CHECK(want == "scalar" || want == "avx2" || want == "avx512",
              "XMA2_CPU_ISA: expected one of auto, scalar, avx2, avx512, got '", want, "'");
  TORCH_CHECK(cpu_runs(want), "XMA2_CPU_ISA=", want, ": this CPU (or build) cannot run that instruction set");
  if (!pl.simd_exact) return kScalar;
#if defined(__x86_64__)
  if (want == "avx512") return kAvx512;
  if (want == "avx2") return kAvx2;
#endif
  return kScalar;
}

// ------------------------------------------------------------------ packing
// Input codes [M, K] of any integer dtype; out-of-range codes are reported after the pass.
template <typename T>
void row_mags(const T* row, int64_t sk, const Plan& pl, int64_t qx, uint16_t* mags, std::atomic<bool>& bad) {
  const int64_t K = pl.p.K, R = pl.p.rows, Tr = pl.p.Tr(), padded = (int64_t)pl.words * 32;
  const int pols = pl.p.x_pols;
  const int64_t lo = pols == 2 ? -qx : 0;
  bool out_of_range = false;
  std::memset(mags, 0, sizeof(uint16_t) * pols * Tr * padded);
  for (int64_t r = 0; r < Tr; ++r) {
    const int64_t k0 = r * R, k1 = std::min(K, k0 + R);
    uint16_t* pos = mags + r * padded;
    uint16_t* neg = mags + (Tr + r) * padded;  // only used when pols == 2
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t v = (int64_t)row[k * sk];
      out_of_range |= (v < lo) | (v > qx);
      if (v > 0) pos[k - k0] = (uint16_t)v;
      else if (v < 0 && pols == 2) neg[k - k0] = (uint16_t)(-v);
    }
  }
  if (out_of_range) bad = true;
}

// Bit planes of input rows [m0, m0 + nm) -> dst [m][tile][pol][bit][word].
void pack_input_rows(const at::Tensor& x, const Plan& pl, const Isa& isa, int64_t m0, int64_t nm,
                     std::vector<uint16_t>& mags, uint32_t* dst, std::atomic<bool>& bad) {
  const int64_t qx = (1LL << pl.p.x_bits) - 1;
  mags.resize((size_t)(pl.p.x_pols * pl.p.Tr() * pl.words * 32));
  AT_DISPATCH_INTEGRAL_TYPES(x.scalar_type(), "xbar_cpu_pack", [&] {
    for (int64_t mi = 0; mi < nm; ++mi) {
      row_mags(x.data_ptr<scalar_t>() + (m0 + mi) * x.stride(0), x.stride(1), pl, qx, mags.data(), bad);
      isa.planes(pl, mags.data(), dst + mi * pl.x_stride);
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
  std::shared_ptr<const WeightPlanes> get(const at::Tensor& w, const Plan& pl, int lanes) {
    if (w.is_inference()) return pack_weights(w, pl, lanes);  // no version counter to trust
    const Key key{w.unsafeGetTensorImpl(), w._version(), w.data_ptr(), w.sizes().vec(), w.strides().vec(),
                  pl.p.rows, pl.p.w_bits, lanes};
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = entries_.begin(); it != entries_.end(); ++it)
        if (it->key == key) {
          entries_.splice(entries_.begin(), entries_, it);
          return entries_.front().planes;
        }
    }
    auto planes = pack_weights(w, pl, lanes);
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
    int rows, w_bits, lanes;
    bool operator==(const Key& o) const {
      return impl == o.impl && version == o.version && data == o.data && sizes == o.sizes && strides == o.strides &&
             rows == o.rows && w_bits == o.w_bits && lanes == o.lanes;
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
// N hold zeros) for every needed (set, tile, lane block), input rows in blocks, in parallel.
template <typename Epi>
void run_quantized(const at::Tensor& x, const Plan& pl, const Isa& isa, const std::vector<WeightSet>& sets, Epi epi) {
  const int64_t M = pl.p.M, Tr = pl.p.Tr(), L = isa.lanes;
  std::atomic<bool> bad{false};
  at::parallel_for(0, (M + kRowBlock - 1) / kRowBlock, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint16_t> mags;
    std::vector<uint32_t> xplanes((size_t)(kRowBlock * pl.x_stride));
    std::vector<int64_t> t((size_t)(kRowBlock * L));
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t m0 = blk * kRowBlock, nm = std::min(kRowBlock, M - m0);
      pack_input_rows(x, pl, isa, m0, nm, mags, xplanes.data(), bad);
      for (int64_t r = 0; r < Tr; ++r) {
        const uint32_t* xr = xplanes.data() + r * (pl.x_stride / Tr);
        for (size_t s = 0; s < sets.size(); ++s) {
          const WeightPlanes& wp = *sets[s].planes;
          for (int64_t nb = 0; nb < wp.blocks; ++nb) {
            if (!sets[s].active[r * wp.blocks + nb]) continue;
            isa.block(pl, xr, pl.x_stride, nm, wp.at(r, nb), t.data());
            epi((int)s, r, nb * L, m0, nm, t.data());
          }
        }
      }
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
XbarParams make_params(const at::Tensor& x, const at::Tensor& w, int64_t rows, int64_t cols, int64_t input_bits,
                       bool input_signed, int64_t dac_bits, int64_t weight_bits, int64_t cell_bits,
                       int64_t adc_levels, int64_t adc_clip) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "xbar: x_codes must be [M, K] and w_codes [K, N], got ",
              x.sizes(), " and ", w.sizes());
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kInt || xt == at::kShort || xt == at::kChar || xt == at::kByte,
              "xbar: x_codes must be int32, int16, int8 or uint8, got ", xt);
  TORCH_CHECK(w.scalar_type() == at::kInt, "xbar: w_codes must be int32, got ", w.scalar_type());
  TORCH_CHECK(x.size(1) == w.size(0), "xbar: x_codes has K=", x.size(1), " but w_codes has K=", w.size(0));
  TORCH_CHECK(rows >= 1 && cols >= 1, "xbar: rows and cols must be >= 1, got ", rows, ", ", cols);
  const int x_bits = (int)(input_signed ? input_bits - 1 : input_bits);
  TORCH_CHECK(x_bits >= 1 && x_bits <= kMaxXBits, "xbar: input_bits out of range: ", input_bits);
  TORCH_CHECK(weight_bits >= 2 && weight_bits - 1 <= kMaxWBits, "xbar: weight_bits out of range: ", weight_bits);
  TORCH_CHECK(dac_bits >= 1 && dac_bits <= 8 && cell_bits >= 1 && cell_bits <= 8,
              "xbar: dac_bits and cell_bits must be in [1, 8], got ", dac_bits, ", ", cell_bits);
  TORCH_CHECK(adc_levels >= 0 && adc_clip >= 1, "xbar: adc_levels must be >= 0 and adc_clip >= 1, got ",
              adc_levels, ", ", adc_clip);
  TORCH_CHECK(rows <= (1 << 16), "xbar: rows must be <= 65536, got ", rows);
  XbarParams p;
  p.M = x.size(0);
  p.K = x.size(1);
  p.N = w.size(1);
  p.rows = (int)rows;
  p.cols = (int)cols;
  p.x_bits = x_bits;
  p.x_pols = input_signed ? 2 : 1;
  p.dac_bits = (int)dac_bits;
  p.w_bits = (int)(weight_bits - 1);
  p.cell_bits = (int)cell_bits;
  p.adc_levels = (int)adc_levels;
  p.adc_clip = adc_clip;
  return p;
}

void check_code_range(const at::Tensor& codes, int64_t lo, int64_t hi, const char* name) {
  if (codes.numel() == 0) return;
  const int64_t mn = codes.min().item<int64_t>(), mx = codes.max().item<int64_t>();
  TORCH_CHECK(mn >= lo && mx <= hi, "xbar: ", name, " must hold codes in [", lo, ", ", hi, "], got [", mn, ", ", mx, "]");
}

void check_codes(const at::Tensor& x, const at::Tensor& w, const Plan& pl) {
  const int64_t qx = (1LL << pl.p.x_bits) - 1, qw = (1LL << pl.p.w_bits) - 1;
  check_code_range(x, pl.p.x_pols == 2 ? -qx : 0, qx, "x_codes");
  check_code_range(w, -qw, qw, "w_codes");
}

// ------------------------------------------------------------------ lossless: one exact GEMM per tile
// Float type in which every T_int of one tile (|T| <= rows * Qx * Qw) is exact.
at::ScalarType exact_float(const Plan& pl) {
  const double bound = (double)pl.p.rows * ((1LL << pl.p.x_bits) - 1) * ((1LL << pl.p.w_bits) - 1);
  return bound < 16777216.0 ? at::kFloat : at::kDouble;
}

constexpr int64_t kGemmRowBlock = 4096;  // input rows converted to float at a time

// ------------------------------------------------------------------ the ops
at::Tensor xbar_tile_sums_cpu(const at::Tensor& x_codes, const at::Tensor& w_codes, int64_t rows, int64_t cols,
                              int64_t input_bits, bool input_signed, int64_t dac_bits, int64_t weight_bits,
                              int64_t cell_bits, int64_t adc_levels, int64_t adc_clip) {
  const Plan pl = make_plan(make_params(x_codes, w_codes, rows, cols, input_bits, input_signed, dac_bits,
                                        weight_bits, cell_bits, adc_levels, adc_clip));
  const int64_t M = pl.p.M, N = pl.p.N, Tr = pl.p.Tr();
  at::Tensor out = at::empty({Tr, M, N}, x_codes.options().dtype(at::kLong));
  if (pl.lossless) {
    check_codes(x_codes, w_codes, pl);
    const auto ft = exact_float(pl);
    const at::Tensor wf = w_codes.to(ft);
    for (int64_t r = 0; r < Tr; ++r) {
      const int64_t k0 = r * pl.p.rows, kr = std::min<int64_t>(pl.p.rows, pl.p.K - k0);
      out[r].copy_(at::mm(x_codes.narrow(1, k0, kr).to(ft), wf.narrow(0, k0, kr)));
    }
    return out;
  }
  const Isa& isa = choose_isa(pl);
  std::vector<WeightSet> sets{{weight_cache().get(w_codes, pl, isa.lanes), {}}};
  sets[0].active = active_blocks<float>(at::Tensor(), pl, isa.lanes);
  int64_t* o = out.data_ptr<int64_t>();
  run_quantized(x_codes, pl, isa, sets, [&](int, int64_t r, int64_t n0, int64_t m0, int64_t nm, const int64_t* t) {
    const int64_t L = isa.lanes, nl = std::min(L, N - n0);
    for (int64_t mi = 0; mi < nm; ++mi)
      std::memcpy(o + (r * M + m0 + mi) * N + n0, t + mi * L, sizeof(int64_t) * nl);
  });
  return out;
}

// y[m, n] = sum_s sum_r coef_s[r, n] * T_s[r, m, n], summed in float64 (acc [M, N]).
template <typename scalar_t>
void mvm_quantized(const at::Tensor& x, const std::vector<at::Tensor>& w, const std::vector<at::Tensor>& coef,
                   const Plan& pl, at::Tensor& acc) {
  const Isa& isa = choose_isa(pl);
  const int64_t N = pl.p.N, L = isa.lanes;
  std::vector<WeightSet> sets;
  std::vector<const scalar_t*> cp;
  for (size_t s = 0; s < w.size(); ++s) {
    sets.push_back({weight_cache().get(w[s], pl, isa.lanes), active_blocks<scalar_t>(coef[s], pl, L)});
    cp.push_back(coef[s].data_ptr<scalar_t>());
  }
  double* a = acc.data_ptr<double>();  // rows of one row block are written by one thread only
  run_quantized(x, pl, isa, sets, [&](int s, int64_t r, int64_t n0, int64_t m0, int64_t nm, const int64_t* t) {
    const int64_t nl = std::min(L, N - n0);
    const scalar_t* c = cp[s] + r * N + n0;
    for (int64_t mi = 0; mi < nm; ++mi) {
      double* row = a + (m0 + mi) * N + n0;
      const int64_t* tr = t + mi * L;
      for (int64_t l = 0; l < nl; ++l) row[l] += (double)c[l] * (double)tr[l];
    }
  });
}

// The same sum through one exact float GEMM per tile, input rows in blocks.
template <typename scalar_t>
void mvm_lossless(const at::Tensor& x, const std::vector<at::Tensor>& w, const std::vector<at::Tensor>& coef,
                  const Plan& pl, at::Tensor& acc) {
  const auto ft = exact_float(pl);
  const int64_t M = pl.p.M, N = pl.p.N, Tr = pl.p.Tr();
  std::vector<at::Tensor> wf;
  for (const auto& wi : w) wf.push_back(wi.to(ft));
  for (int64_t m0 = 0; m0 < M; m0 += kGemmRowBlock) {
    const int64_t nm = std::min(kGemmRowBlock, M - m0);
    const at::Tensor xb = x.narrow(0, m0, nm).to(ft);
    at::Tensor ab = acc.narrow(0, m0, nm);
    for (size_t s = 0; s < w.size(); ++s) {
      const at::Tensor cd = coef[s].to(at::kDouble);
      for (int64_t r = 0; r < Tr; ++r) {
        if (!cd[r].ne(0).any().item<bool>()) continue;  // every PE of this tile row is skipped
        const int64_t k0 = r * pl.p.rows, kr = std::min<int64_t>(pl.p.rows, pl.p.K - k0);
        ab.addcmul_(at::mm(xb.narrow(1, k0, kr), wf[s].narrow(0, k0, kr)).to(at::kDouble), cd[r]);
      }
    }
  }
}

at::Tensor xbar_mvm_cpu(const at::Tensor& x_codes, const at::Tensor& wb_codes, const std::optional<at::Tensor>& wt_codes,
                        const at::Tensor& coef_b, const std::optional<at::Tensor>& coef_t, int64_t rows, int64_t cols,
                        int64_t input_bits, bool input_signed, int64_t dac_bits, int64_t weight_bits, int64_t cell_bits,
                        int64_t adc_levels, int64_t adc_clip) {
  const Plan pl = make_plan(make_params(x_codes, wb_codes, rows, cols, input_bits, input_signed, dac_bits,
                                        weight_bits, cell_bits, adc_levels, adc_clip));
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
  at::Tensor acc = at::zeros({pl.p.M, pl.p.N}, coef_b.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(coef_b.scalar_type(), "xbar_mvm_cpu", [&] {
    if (pl.lossless) {
      for (const auto& wi : w) check_codes(x_codes, wi, pl);
      mvm_lossless<scalar_t>(x_codes, w, coef, pl, acc);
    } else {
      mvm_quantized<scalar_t>(x_codes, w, coef, pl, acc);
    }
  });
  return acc.to(coef_b.scalar_type());
}

// G[r, n] = sum_m gy[m, n] * T_int[r, m, n] (float64), without materialising T_int.
at::Tensor xbar_coef_grad_cpu(const at::Tensor& x_codes, const at::Tensor& w_codes, const at::Tensor& gy, int64_t rows,
                              int64_t cols, int64_t input_bits, bool input_signed, int64_t dac_bits, int64_t weight_bits,
                              int64_t cell_bits, int64_t adc_levels, int64_t adc_clip) {
  const Plan pl = make_plan(make_params(x_codes, w_codes, rows, cols, input_bits, input_signed, dac_bits,
                                        weight_bits, cell_bits, adc_levels, adc_clip));
  const int64_t M = pl.p.M, N = pl.p.N, Tr = pl.p.Tr();
  TORCH_CHECK(gy.dim() == 2 && gy.size(0) == M && gy.size(1) == N, "xbar_coef_grad: gy must be [M, N] = [", M, ", ",
              N, "], got ", gy.sizes());
  TORCH_CHECK(gy.is_floating_point(), "xbar_coef_grad: gy must be floating point, got ", gy.scalar_type());
  const at::Tensor g64 = gy.to(at::kDouble).contiguous();
  if (pl.lossless) {
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
  const Isa& isa = choose_isa(pl);
  const int64_t L = isa.lanes;
  std::vector<WeightSet> sets{{weight_cache().get(w_codes, pl, isa.lanes), {}}};
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
  });
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
    at::parallel_for(0, B * Ho, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t bh = p0; bh < p1; ++bh) {
        const int64_t b = bh / Ho, ho = bh % Ho;
        for (int64_t wo = 0; wo < Wo; ++wo) {
          scalar_t* o = dst + (bh * Wo + wo) * K;
          for (int64_t c = 0; c < C; ++c) {
            const scalar_t* plane = src + (b * C + c) * H * Wd;
            for (int64_t i = 0; i < kh; ++i) {
              const int64_t h = ho * stride[0] - padding[0] + i * dilation[0];
              for (int64_t j = 0; j < kw; ++j) {
                const int64_t w = wo * stride[1] - padding[1] + j * dilation[1];
                *o++ = (h >= 0 && h < H && w >= 0 && w < Wd) ? plane[h * Wd + w] : scalar_t(0);
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
