// The device-model ops on the CPU (docs/SPEC.md 7.2, docs/CPU_KERNEL.md "Device model"): partial sums
// of input chunks with fixed-point conductances g [2, S, K, N] int32, each through the fixed-point
// ADC, shifted and added into T_int [Tr, M, N] int64 -- bit-exact, as xma2_ops.backends.reference.cell_tile_sums.
// Under the SPEC 8 conventions of the codes kernels (`periphery`, every bit but analog accumulation): a
// conversion sees the difference of the two polarities' cells (differential sensing: one weight group
// g+ - g- per slice), a signed input chunk (sign-magnitude: one input pass), the signed ADC, half-even
// rounding, the even row split and the per-tile ADC range.
//
// Three paths, all exact:
//  - ideal ADC (adc_levels == 0): T_int is linear in the partial sums, so per tile one GEMM of the
//    whole input codes with W[k, n] = sum_j 2^(j cb) (g[+, j, k, n] - g[-, j, k, n]), in float64
//    when every sum is below 2^53, else int64 (as the GEMM route of ops_cpu.cpp).
//  - fast (x86 with AVX2, max(g) < 2^15, every |V_F| < 2^31, the float32 ADC of each tile size -- else its
//    float64 form, at twice the ADC instructions -- checked equal to the integer rule for every reachable
//    V_F (plan.h float_adc_exact), |T_int| < 2^31): per
//    block of 96 input rows and row tile,
//    the input chunks and the conductances (or their differences) as int16 pairs, a 6 x 16 AVX2 microkernel
//    (vpmaddwd, exact int32 sums) per (input group, weight group, slice, 16 columns), the ADC and the
//    shift-and-add on its registers into int32 T.
//  - generic (anything else, or XMA2_CPU_ISA=scalar): per block of rows, tile and chunk one exact
//    ATen GEMM (float32 / float64 / int64 by the bound of P_F), the exact integer ADC, int64 T.
// Every path runs its work items on the one parallel loop of the CPU kernels (driver.h parallel_items).
// xbar_cell_mvm combines coef * T_int in float64 in the order row tile outer, then base, then task
// set (as xbar_mvm), one rounding to the coefficient dtype at the end.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../xbar_check.h"
#include "cells.h"
#include "coef_grad.h"
#include "driver.h"
#include "plan.h"

namespace xma2 {
namespace cpu {
namespace {

constexpr int kMR = 6;                 // rows of the microkernel
constexpr int kNR = 16;                // columns of the microkernel (two registers of 8 int32)
// Input rows per work item (fewer for very long rows, so that per-thread buffers stay a few MiB).
constexpr int64_t kFastRows = 96;      // fast path (16 microkernel rows)
constexpr int64_t kGenericRows = 256;  // generic path
constexpr int64_t kLinearRows = 4096;  // rows per GEMM of the ideal-ADC path
constexpr int64_t kMaxAdcCheck = 1 << 22;  // largest P_F range whose float ADC is checked value by value

enum class Path { kLinear, kFast, kGeneric };

struct CellPlan {
  XbarParams p;
  int S = 0, F = 0;
  int C = 0;                // input groups: input polarity x chunk (one polarity under sign-magnitude)
  int Q = 2;                // weight groups per slice: the two polarities, or their difference (differential)
  CellBounds b{};
  Path path = Path::kGeneric;
  // The float ADC of the fast path for every tile but the last ([0]) and the last ([1]) (they differ only
  // under adc_range="tile_rows"): code = min(trunc(fma(clamp(V, -cap, cap) + offset, a, b)), n) - half, with
  // offset = clip 2^F and half = n / 2 for the signed ADC (SPEC 8.2), else 0; under half_even also the
  // half-down form (b_dn), the even one of the two taken at a tie.  `dbl`: in float64 (ad, bd, bd_dn), where
  // float32 is not exact for some V_F (half-even's half-down form on fine conductance grids, typically).
  struct FastAdc {
    float a = 0.f, b = 0.f, b_dn = 0.f;
    double ad = 0., bd = 0., bd_dn = 0.;
    int32_t cap = 0, offset = 0, levels = 0, half = 0;
  } fast[2];
  bool fast_dbl = false;    // both tiles' fast ADC in float64
  int64_t block_rows = 1;   // input rows per work item
};

// The fast path's ADC of a tile with ADC `ta` (into f), when its float form (float64 when `dbl`) is exact for
// every reachable V_F: past clip 2^F every code is n (0 below -clip 2^F), so with cap = min(|V_F| bound,
// clip 2^F) the check on u = clamp(V, -cap, cap) + offset holds for every V.
bool fast_adc(const CellPlan& pl, const TileAdc& ta, bool dbl, CellPlan::FastAdc& f) {
  const bool sgn = pl.p.adc_signed();
  const int64_t clip_f = ta.clip << pl.F, cap = std::min(pl.b.pbound, clip_f), offset = sgn ? clip_f : 0;
  const int64_t span = sgn ? 2 * clip_f : clip_f, ulo = sgn ? offset - cap : 0, uhi = offset + cap;
  if (uhi >= (1LL << 31) || uhi - ulo > kMaxAdcCheck ||
      !float_adc_exact(ta.levels, span, ulo, uhi, pl.p.half_even(), true, dbl))
    return false;
  const FloatAdc fa = float_adc(ta.levels, span);
  const FloatAdcOf<double> fd = float_adc_of<double>(ta.levels, span);
  f = {fa.a, fa.b, fa.b_dn, fd.a, fd.b, fd.b_dn, (int32_t)cap, (int32_t)offset, (int32_t)ta.levels,
       sgn ? (int32_t)(ta.levels / 2) : 0};
  return true;
}

// The AVX2 cell kernel runs unless XMA2_CPU_ISA=scalar (any other choice, avx512 and amx included, runs
// it: the bit-plane instruction sets have no cell kernel).
bool fast_cpu() {
  const char* env = std::getenv("XMA2_CPU_ISA");
  if (env && std::string(env) == "scalar") return false;
  return cpu_runs("avx2");
}

// ------------------------------------------------------------------ checks and the plan
// Checks every argument (shapes, dtypes, ranges, the int64 bounds from the actual max of the
// conductances) and chooses the path.
CellPlan make_cell_plan(const at::Tensor& x, const std::vector<std::pair<at::Tensor, const char*>>& gs, int64_t rows,
                        int64_t cols, int64_t input_bits, bool input_signed, int64_t dac_bits, int64_t weight_bits,
                        int64_t cell_bits, int64_t adc_levels, int64_t adc_clip, int64_t frac_bits,
                        int64_t periphery) {
  CellPlan pl;
  TORCH_CHECK(x.device().is_cpu(), "xbar_cell: x_codes must be a CPU tensor, got ", x.device());
  pl.p = make_cell_params_checked(x, gs[0].first, gs[0].second, rows, cols, input_bits, input_signed, dac_bits,
                                  weight_bits, cell_bits, adc_levels, adc_clip, frac_bits, periphery);
  int64_t g_max = 0;
  for (const auto& g : gs) {
    TORCH_CHECK(g.first.sizes() == gs[0].first.sizes() && g.first.scalar_type() == at::kInt, "xbar_cell: ", g.second,
                " must be int32 of shape ", gs[0].first.sizes(), " (as ", gs[0].second, "), got ",
                g.first.scalar_type(), " ", g.first.sizes());
    TORCH_CHECK(g.first.device() == x.device(), "xbar_cell: ", g.second, " must be on ", x.device(), ", got ",
                g.first.device());
    if (g.first.numel() == 0) continue;
    const auto mm = at::aminmax(g.first);
    const int64_t lo = std::get<0>(mm).item<int64_t>(), hi = std::get<1>(mm).item<int64_t>();
    TORCH_CHECK(lo >= 0, "xbar_cell: ", g.second, " must hold conductances >= 0 (fixed point), got a minimum of ", lo);
    g_max = std::max(g_max, hi);
  }
  check_input_codes(x, pl.p);
  pl.S = pl.p.slices();
  pl.F = (int)frac_bits;
  pl.C = (pl.p.sign_magnitude() ? 1 : pl.p.x_pols) * pl.p.chunks();
  pl.Q = pl.p.differential() ? 1 : 2;
  pl.b = cell_bounds_checked(pl.p, g_max, frac_bits);
  if (pl.p.adc_levels == 0) {
    pl.path = Path::kLinear;  // T_int is linear in the partial sums under every convention
  } else if (fast_cpu() && g_max < (1 << 15) && pl.b.pbound < (1LL << 31) && pl.b.t_bound < (1LL << 31)) {
    const int64_t last = std::max<int64_t>(pl.p.Tr() - 1, 0);
    const TileAdc first_adc = pl.p.tile_adc(pl.p.tile_rows(0)), last_adc = pl.p.tile_adc(pl.p.tile_rows(last));
    for (const bool dbl : {false, true})  // float32 where both tiles are exact in it, else float64
      if (fast_adc(pl, first_adc, dbl, pl.fast[0]) && fast_adc(pl, last_adc, dbl, pl.fast[1])) {
        pl.path = Path::kFast;
        pl.fast_dbl = dbl;
        break;
      }
  }
  const int64_t R = std::max<int64_t>(1, std::min<int64_t>(pl.p.rows, pl.p.K)), N = std::max<int64_t>(1, pl.p.N);
  if (pl.path == Path::kLinear) {
    pl.block_rows = std::clamp<int64_t>((1 << 23) / std::max(pl.p.K, N), 1, kLinearRows);
  } else if (pl.path == Path::kFast) {  // int16 chunk panels: C * ceil(R / 2) * 4 bytes per row, <= ~8 MiB
    const int64_t per_row = (int64_t)pl.C * ((R + 1) / 2) * 4;
    pl.block_rows = std::clamp<int64_t>((1 << 23) / per_row / kMR * kMR, kMR, kFastRows);
  } else {
    pl.block_rows = std::clamp<int64_t>((1 << 20) / std::max<int64_t>(R, pl.Q * pl.S * N), 1, kGenericRows);
  }
  return pl;
}

// Receives T_int of one (weight set, row tile, block of input rows, range of columns):
// t[mi * ldt + c] = T_int[r, m0 + mi, n0 + c] for c < nw; then done() for the item, on the same thread.
// `worker` is the item's thread (driver.h parallel_items).
struct Sink {
  virtual ~Sink() = default;
  virtual void tile(int64_t worker, int set, int64_t r, int64_t m0, int64_t nm, int64_t n0, int64_t nw,
                    const int64_t* t, int64_t ldt) = 0;
  virtual void done(int64_t worker, int64_t m0, int64_t nm, int64_t n0, int64_t n1) = 0;
};

// active[s][r * NP + np]: the 16-column panel np of tile r of set s is needed.
using Active = std::vector<std::vector<char>>;

bool any_active(const std::vector<char>& a, int64_t r, int64_t NP) {
  for (int64_t np = 0; np < NP; ++np)
    if (a[(size_t)(r * NP + np)]) return true;
  return false;
}

// The weight groups of conductances g [2, S, K, N]: g itself, or [1, S, K, N] = g+ - g- under differential
// sensing (|g+ - g-| <= max(g): int32, and int16 where the fast path takes g).
at::Tensor weight_groups(const at::Tensor& g, const CellPlan& pl) {
  if (pl.Q == 2) return g.contiguous();
  return (g.select(0, 0) - g.select(0, 1)).unsqueeze(0).contiguous();
}

// ------------------------------------------------------------------ ideal ADC: one GEMM per tile
void run_linear(const at::Tensor& x, const std::vector<at::Tensor>& gs, const CellPlan& pl, const Active& active,
                int64_t NP, Sink& sink) {
  const int64_t M = pl.p.M, K = pl.p.K, N = pl.p.N, Tr = pl.p.Tr(), R = pl.p.rows;
  const bool dbl = pl.b.t_bound < (1LL << 53);
  const auto ft = dbl ? at::kDouble : at::kLong;
  std::vector<at::Tensor> w;
  for (const auto& g : gs) {
    at::Tensor g64 = g.to(at::kLong);
    at::Tensor d = g64.select(0, 0) - g64.select(0, 1);  // [S, K, N]
    at::Tensor wk = at::zeros({K, N}, g64.options());
    for (int j = 0; j < pl.S; ++j) wk.add_(d.select(0, j), (int64_t)1 << (j * pl.p.cell_bits));
    w.push_back(wk.to(ft));
  }
  // The GEMM route of ops_cpu.cpp on the device cells: items of rows (and, when there are few, groups of
  // at least 64 columns) on the one parallel loop, each thread's GEMMs run by the thread.
  parallel_items(M, pl.block_rows, N, 64, [&](int64_t wk, int64_t m0, int64_t nm, int64_t n0, int64_t n1) {
    if (n1 <= n0) return;
    const at::Tensor xb = x.narrow(0, m0, nm).to(ft);
    for (int64_t r = 0; r < Tr; ++r) {
      const int64_t k0 = pl.p.tile_start(r), kr = pl.p.tile_rows(r);
      for (size_t s = 0; s < gs.size(); ++s) {
        if (!any_active(active[s], r, NP)) continue;
        const at::Tensor t =
            at::mm(xb.narrow(1, k0, kr), w[s].narrow(0, k0, kr).narrow(1, n0, n1 - n0)).to(at::kLong).contiguous();
        sink.tile(wk, (int)s, r, m0, nm, n0, n1 - n0, t.data_ptr<int64_t>(), n1 - n0);
      }
    }
    sink.done(wk, m0, nm, n0, n1);
  });
}

// ------------------------------------------------------------------ generic: ATen GEMMs, integer ADC
template <typename code_t>
void run_generic_t(const at::Tensor& x, const std::vector<at::Tensor>& gs, const CellPlan& pl, const Active& active,
                   int64_t NP, Sink& sink) {
  const int64_t M = pl.p.M, K = pl.p.K, N = pl.p.N, Tr = pl.p.Tr(), R = pl.p.rows, S = pl.S;
  // Every |partial sum| of a GEMM is at most pbound (the terms' magnitudes sum to it): exact in this type.
  const auto gt = pl.b.pbound < (1LL << 24) ? at::kFloat : pl.b.pbound < (1LL << 53) ? at::kDouble : at::kLong;
  // The weight groups of every set as [K, Q S N] (group, slice, column) in the exact type.
  const int64_t Q = pl.Q;
  std::vector<at::Tensor> gk;
  for (const auto& g : gs)
    gk.push_back(weight_groups(g, pl).permute({2, 0, 1, 3}).reshape({K, Q * S * N}).to(gt).contiguous());
  const code_t* xp = x.data_ptr<code_t>();
  const int64_t db = pl.p.dac_bits, cb = pl.p.cell_bits, mask = (1LL << db) - 1;
  const bool sm = pl.p.sign_magnitude(), sgn = pl.p.adc_signed(), half_even = pl.p.half_even();
  const int x_groups = pl.C / pl.p.chunks();
  parallel_items(M, pl.block_rows, 1, 1, [&](int64_t w, int64_t m0, int64_t nm, int64_t, int64_t) {
    std::vector<int64_t> t((size_t)(nm * N));
    std::vector<int64_t> chunk((size_t)(nm * R));
    for (int64_t r = 0; r < Tr; ++r) {
      const int64_t k0 = pl.p.tile_start(r), kr = pl.p.tile_rows(r);
      const TileAdc ta = pl.p.tile_adc(kr);
      const int64_t n = ta.levels, clip_f = ta.clip << pl.F;
      for (size_t s = 0; s < gs.size(); ++s) {
        if (!any_active(active[s], r, NP)) continue;
        std::fill(t.begin(), t.end(), 0);
        const at::Tensor gr = gk[s].narrow(0, k0, kr);
        for (int pol = 0; pol < x_groups; ++pol) {  // input polarity (one signed pass under sign-magnitude)
          for (int i = 0; i < pl.p.chunks(); ++i) {
            for (int64_t mi = 0; mi < nm; ++mi)
              for (int64_t k = 0; k < kr; ++k) {
                const int64_t v = (int64_t)xp[(m0 + mi) * K + k0 + k];
                if (sm) {
                  const int64_t c = (std::abs(v) >> (i * db)) & mask;
                  chunk[(size_t)(mi * kr + k)] = v < 0 ? -c : c;
                } else {
                  const int64_t mag = pol == 0 ? std::max<int64_t>(v, 0) : std::max<int64_t>(-v, 0);
                  chunk[(size_t)(mi * kr + k)] = (mag >> (i * db)) & mask;
                }
              }
            const at::Tensor a = at::from_blob(chunk.data(), {nm, kr}, at::kLong).to(gt);
            const at::Tensor ps = at::mm(a, gr).to(at::kLong).contiguous();  // [nm, Q S N]
            const int64_t* pp = ps.data_ptr<int64_t>();
            for (int q = 0; q < Q; ++q)  // weight polarity (0: the difference under differential sensing)
              for (int64_t j = 0; j < S; ++j) {
                const int64_t scale = ((pol == q) ? 1 : -1) * ((int64_t)1 << (i * db + j * cb));
                for (int64_t mi = 0; mi < nm; ++mi) {
                  const int64_t* prow = pp + mi * Q * S * N + (q * S + j) * N;
                  int64_t* trow = t.data() + mi * N;
                  for (int64_t c = 0; c < N; ++c) trow[c] += scale * adc_code_ext(prow[c], n, clip_f, sgn, half_even);
                }
              }
          }
        }
        sink.tile(w, (int)s, r, m0, nm, 0, N, t.data(), N);
      }
    }
    sink.done(w, m0, nm, 0, N);
  });
}

// ------------------------------------------------------------------ fast: AVX2 int16 microkernel
#if defined(__x86_64__)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

// Packs one row tile of the weight groups g [Q, S, K, N] of one set: dst[((q S + j) NP + np)][kp][16][2] int16,
// element (k, col) at ((k / 2) * 16 + col) * 2 + k % 2, zero padded (odd k, columns past N).
void pack_g_tile(const int32_t* g, int64_t Q, int64_t S, int64_t K, int64_t N, int64_t k0, int64_t kr, int64_t NP,
                 int16_t* dst) {
  const int64_t kp = (kr + 1) / 2, panel = kp * kNR * 2;
  std::memset(dst, 0, sizeof(int16_t) * (size_t)(Q * S * NP * panel));
  for (int64_t q = 0; q < Q; ++q)
    for (int64_t j = 0; j < S; ++j) {
      const int32_t* src = g + ((q * S + j) * K + k0) * N;
      int16_t* set_base = dst + (q * S + j) * NP * panel;
      for (int64_t k = 0; k < kr; ++k) {
        const int32_t* srow = src + k * N;
        int16_t* kbase = set_base + (k >> 1) * kNR * 2 + (k & 1);
        for (int64_t np = 0; np < NP; ++np) {
          int16_t* d = kbase + np * panel;
          const int64_t c0 = np * kNR, nc = std::min<int64_t>(kNR, N - c0);
          for (int64_t c = 0; c < nc; ++c) d[c * 2] = (int16_t)srow[c0 + c];
        }
      }
    }
}

// Packs the input chunks of rows [m0, m0 + nm) of one row tile: dst[c][micro][kp][kMR][2] int16
// (c = polarity * chunks + chunk; under sign-magnitude c = chunk, carrying the input's sign), rows past nm
// and the odd k zero; nonzero[c * nmicro + micro] says whether that panel holds a non-zero value (an all-zero
// one gives V = 0, the code of 0: skipped, as that code is 0 under either ADC).
// Unsigned inputs of at most 8 bits (the post-ReLU layers) take a vector form: the codes are laid out once as
// bytes in the panels' order (`stage`, at least nmicro kp kMR 2 + 32 bytes), then every chunk is one shift and
// mask of the whole run (dst needs 16 int16 of slack past the last chunk); a panel is non-zero where the OR of
// its codes has a bit in the chunk.
template <typename code_t>
void pack_x_tile(const code_t* x, int64_t K, int64_t m0, int64_t nm, int64_t k0, int64_t kr, const CellPlan& pl,
                 int64_t nmicro, int16_t* dst, char* nonzero, uint8_t* stage) {
  const int64_t kp = (kr + 1) / 2, cstride = nmicro * kp * kMR * 2;
  const int db = pl.p.dac_bits, chunks = pl.p.chunks();
  const int mask = (1 << db) - 1;
  const bool sm = pl.p.sign_magnitude();
  if (pl.p.x_pols == 1 && pl.p.x_bits <= 8) {
    const int64_t panel = kp * kMR * 2;
    std::memset(stage, 0, (size_t)(cstride + 32));
    for (int64_t mi = 0; mi < nm; ++mi) {
      const code_t* row = x + (m0 + mi) * K + k0;
      uint8_t* base = stage + (mi / kMR) * panel + (mi % kMR) * 2;
      for (int64_t k = 0; k < kr; ++k) base[(k >> 1) * kMR * 2 + (k & 1)] = (uint8_t)row[k];
    }
    for (int64_t mc = 0; mc < nmicro; ++mc) {
      __m256i any = _mm256_setzero_si256();
      for (int64_t j = 0; j < panel; j += 32)  // (bytes past the panel are the next panel's or zero: a superset)
        any = _mm256_or_si256(any, _mm256_loadu_si256((const __m256i*)(stage + mc * panel + j)));
      __m128i o = _mm_or_si128(_mm256_castsi256_si128(any), _mm256_extracti128_si256(any, 1));
      o = _mm_or_si128(o, _mm_srli_si128(o, 8));
      o = _mm_or_si128(o, _mm_srli_si128(o, 4));
      o = _mm_or_si128(o, _mm_srli_si128(o, 2));
      o = _mm_or_si128(o, _mm_srli_si128(o, 1));
      const int bits = _mm_cvtsi128_si32(o) & 0xff;
      for (int i = 0; i < chunks; ++i) nonzero[i * nmicro + mc] = ((bits >> (i * db)) & mask) != 0;
    }
    const __m256i vmask = _mm256_set1_epi16((int16_t)mask);
    for (int i = 0; i < chunks; ++i) {
      const __m128i sh = _mm_cvtsi32_si128(i * db);
      int16_t* d = dst + i * cstride;
      for (int64_t j = 0; j < cstride; j += 16) {
        const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(stage + j)));
        _mm256_storeu_si256((__m256i*)(d + j), _mm256_and_si256(_mm256_srl_epi16(v, sh), vmask));
      }
    }
    return;
  }
  std::memset(dst, 0, sizeof(int16_t) * (size_t)(pl.C * cstride));
  std::memset(nonzero, 0, (size_t)(pl.C * nmicro));
  for (int64_t mi = 0; mi < nm; ++mi) {
    const code_t* row = x + (m0 + mi) * K + k0;
    int16_t* base = dst + (mi / kMR) * kp * kMR * 2 + (mi % kMR) * 2;
    for (int64_t k = 0; k < kr; ++k) {
      const int v = (int)row[k];
      if (v == 0) continue;
      const int pol = v < 0 && !sm ? 1 : 0, mag = v < 0 ? -v : v, sign = v < 0 && sm ? -1 : 1;
      int16_t* e = base + (k >> 1) * kMR * 2 + (k & 1) + (int64_t)pol * chunks * cstride;
      char* nz = nonzero + (int64_t)pol * chunks * nmicro + mi / kMR;
      for (int i = 0; i < chunks; ++i) {
        const int16_t val = (int16_t)(sign * ((mag >> (i * db)) & mask));
        e[i * cstride] = val;
        nz[i * nmicro] |= val != 0;
      }
    }
  }
}

struct FastConsts {
  __m256 a, b, b_dn;
  __m256d ad, bd, bd_dn;
  __m256i cap, neg_cap, offset, levels, half;
};

FastConsts fast_consts(const CellPlan::FastAdc& f) {
  return {_mm256_set1_ps(f.a),          _mm256_set1_ps(f.b),           _mm256_set1_ps(f.b_dn),
          _mm256_set1_pd(f.ad),         _mm256_set1_pd(f.bd),          _mm256_set1_pd(f.bd_dn),
          _mm256_set1_epi32(f.cap),     _mm256_set1_epi32(-f.cap),     _mm256_set1_epi32(f.offset),
          _mm256_set1_epi32(f.levels),  _mm256_set1_epi32(f.half)};
}

// trunc(u a + b) of 8 int32 u, in float32 or (kDouble) in float64 as two halves of 4.
template <bool kDouble>
__attribute__((always_inline)) inline __m256i adc_trunc(__m256i u, __m256 a, __m256 b, __m256d ad, __m256d bd) {
  if (!kDouble) return _mm256_cvttps_epi32(_mm256_fmadd_ps(_mm256_cvtepi32_ps(u), a, b));
  const __m128i lo = _mm256_cvttpd_epi32(_mm256_fmadd_pd(_mm256_cvtepi32_pd(_mm256_castsi256_si128(u)), ad, bd));
  const __m128i hi = _mm256_cvttpd_epi32(_mm256_fmadd_pd(_mm256_cvtepi32_pd(_mm256_extracti128_si256(u, 1)), ad, bd));
  return _mm256_set_m128i(hi, lo);
}

// The ADC of 8 partial sums V (clamped to [-cap, cap] and offset, so the float formula checked on that range
// of u applies; the signed ADC's code less n/2), shifted by `sh` and added to (or subtracted from) 8 int32 tile
// sums.  kSigned = false (V >= 0, offset and half 0) keeps the per-polarity ADC at its three operations;
// kHalfEven: the half-up and half-down codes differ (by one) exactly at a tie, where the even one is taken;
// kDouble: the float64 form.
template <bool kNeg, bool kSigned, bool kHalfEven, bool kDouble>
__attribute__((always_inline)) inline void adc_add(__m256i p, const FastConsts& fc, __m128i sh, int32_t* dst) {
  __m256i u = _mm256_min_epi32(p, fc.cap);
  if (kSigned) u = _mm256_add_epi32(_mm256_max_epi32(u, fc.neg_cap), fc.offset);
  __m256i code = _mm256_min_epi32(adc_trunc<kDouble>(u, fc.a, fc.b, fc.ad, fc.bd), fc.levels);
  if (kHalfEven) {
    const __m256i dn = _mm256_min_epi32(adc_trunc<kDouble>(u, fc.a, fc.b_dn, fc.ad, fc.bd_dn), fc.levels);
    const __m256i odd_tie = _mm256_and_si256(_mm256_sub_epi32(code, dn), _mm256_and_si256(code, _mm256_set1_epi32(1)));
    code = _mm256_sub_epi32(code, odd_tie);
  }
  if (kSigned) code = _mm256_sub_epi32(code, fc.half);
  code = _mm256_sll_epi32(code, sh);
  const __m256i cur = _mm256_loadu_si256((const __m256i*)dst);
  _mm256_storeu_si256((__m256i*)dst, kNeg ? _mm256_sub_epi32(cur, code) : _mm256_add_epi32(cur, code));
}

// adc_add of the microkernel's 6 x 16 partial sums into t (row stride ldt).
template <bool kNeg, bool kSigned, bool kHalfEven, bool kDouble>
__attribute__((always_inline)) inline void adc_add_6x16(__m256i c00, __m256i c01, __m256i c10, __m256i c11,
                                                        __m256i c20, __m256i c21, __m256i c30, __m256i c31,
                                                        __m256i c40, __m256i c41, __m256i c50, __m256i c51,
                                                        const FastConsts& fc, __m128i sh, int32_t* t, int64_t ldt) {
  adc_add<kNeg, kSigned, kHalfEven, kDouble>(c00, fc, sh, t), adc_add<kNeg, kSigned, kHalfEven, kDouble>(c01, fc, sh, t + 8);
  adc_add<kNeg, kSigned, kHalfEven, kDouble>(c10, fc, sh, t + ldt), adc_add<kNeg, kSigned, kHalfEven, kDouble>(c11, fc, sh, t + ldt + 8);
  adc_add<kNeg, kSigned, kHalfEven, kDouble>(c20, fc, sh, t + 2 * ldt), adc_add<kNeg, kSigned, kHalfEven, kDouble>(c21, fc, sh, t + 2 * ldt + 8);
  adc_add<kNeg, kSigned, kHalfEven, kDouble>(c30, fc, sh, t + 3 * ldt), adc_add<kNeg, kSigned, kHalfEven, kDouble>(c31, fc, sh, t + 3 * ldt + 8);
  adc_add<kNeg, kSigned, kHalfEven, kDouble>(c40, fc, sh, t + 4 * ldt), adc_add<kNeg, kSigned, kHalfEven, kDouble>(c41, fc, sh, t + 4 * ldt + 8);
  adc_add<kNeg, kSigned, kHalfEven, kDouble>(c50, fc, sh, t + 5 * ldt), adc_add<kNeg, kSigned, kHalfEven, kDouble>(c51, fc, sh, t + 5 * ldt + 8);
}

// The accumulation of micro_6x16: c_i0, c_i1 += A[6 x 2kp] B[2kp x 16] (int16 pairs, exact int32 sums).  In
// assembly because the register budget is exact (12 accumulators, the two B registers, one broadcast A and one
// product: all 16 ymm registers) and gcc 12, given the same loop in intrinsics, hoists the six broadcasts and
// spills 9 accumulators to the stack on every step (~1.4x slower).
#define XMA2_ROW(off, c0, c1)                    \
  "vpbroadcastd " #off "(%[a]), %%ymm14\n\t"     \
  "vpmaddwd %%ymm12, %%ymm14, %%ymm15\n\t"       \
  "vpaddd %%ymm15, %[" #c0 "], %[" #c0 "]\n\t"   \
  "vpmaddwd %%ymm13, %%ymm14, %%ymm15\n\t"       \
  "vpaddd %%ymm15, %[" #c1 "], %[" #c1 "]\n\t"
__attribute__((always_inline)) inline void accumulate_6x16(const int32_t* a, const int32_t* b, int64_t kp,
                                                           __m256i& c00, __m256i& c01, __m256i& c10, __m256i& c11,
                                                           __m256i& c20, __m256i& c21, __m256i& c30, __m256i& c31,
                                                           __m256i& c40, __m256i& c41, __m256i& c50, __m256i& c51) {
  if (kp <= 0) return;
  __asm__ volatile(
      "1:\n\t"
      "vmovdqa (%[b]), %%ymm12\n\t"
      "vmovdqa 32(%[b]), %%ymm13\n\t"
      XMA2_ROW(0, c00, c01) XMA2_ROW(4, c10, c11) XMA2_ROW(8, c20, c21)
      XMA2_ROW(12, c30, c31) XMA2_ROW(16, c40, c41) XMA2_ROW(20, c50, c51)
      "add $64, %[b]\n\t"
      "add $24, %[a]\n\t"
      "dec %[n]\n\t"
      "jnz 1b\n\t"
      : [c00] "+x"(c00), [c01] "+x"(c01), [c10] "+x"(c10), [c11] "+x"(c11), [c20] "+x"(c20), [c21] "+x"(c21),
        [c30] "+x"(c30), [c31] "+x"(c31), [c40] "+x"(c40), [c41] "+x"(c41), [c50] "+x"(c50), [c51] "+x"(c51),
        [a] "+r"(a), [b] "+r"(b), [n] "+r"(kp)
      :
      : "xmm12", "xmm13", "xmm14", "xmm15", "cc", "memory");
}
#undef XMA2_ROW

// P[6 x 16] = A[6 x 2kp] B[2kp x 16] (int16 pairs, int32 sums), then per element the ADC, the shift
// and the signed add into t (row stride ldt).
template <bool kSigned, bool kHalfEven, bool kDouble>
void micro_6x16(const int32_t* A, const int32_t* B, int64_t kp, const FastConsts& fc, int shift, bool neg, int32_t* t,
                int64_t ldt) {
  __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
          c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  accumulate_6x16(A, B, kp, c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51);
  const __m128i sh = _mm_cvtsi32_si128(shift);
  if (neg)
    adc_add_6x16<true, kSigned, kHalfEven, kDouble>(c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51, fc, sh, t, ldt);
  else
    adc_add_6x16<false, kSigned, kHalfEven, kDouble>(c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51, fc, sh, t, ldt);
}

// micro_6x16 of a panel's first 8 columns only: the last panel of a layer whose columns end there (N mod 16 in
// 1 ... 8; the 24-column layers would otherwise spend a third of their multiply-adds on zero padding).
template <bool kSigned, bool kHalfEven, bool kDouble>
void micro_6x8(const int32_t* A, const int32_t* B, int64_t kp, const FastConsts& fc, int shift, bool neg, int32_t* t,
               int64_t ldt) {
  __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0;
  for (int64_t k = 0; k < kp; ++k) {
    const __m256i b0 = _mm256_load_si256((const __m256i*)(B + k * kNR));
    const int32_t* a = A + k * kMR;
    c0 = _mm256_add_epi32(c0, _mm256_madd_epi16(_mm256_set1_epi32(a[0]), b0));
    c1 = _mm256_add_epi32(c1, _mm256_madd_epi16(_mm256_set1_epi32(a[1]), b0));
    c2 = _mm256_add_epi32(c2, _mm256_madd_epi16(_mm256_set1_epi32(a[2]), b0));
    c3 = _mm256_add_epi32(c3, _mm256_madd_epi16(_mm256_set1_epi32(a[3]), b0));
    c4 = _mm256_add_epi32(c4, _mm256_madd_epi16(_mm256_set1_epi32(a[4]), b0));
    c5 = _mm256_add_epi32(c5, _mm256_madd_epi16(_mm256_set1_epi32(a[5]), b0));
  }
  const __m128i sh = _mm_cvtsi32_si128(shift);
  const __m256i c[kMR] = {c0, c1, c2, c3, c4, c5};
  for (int i = 0; i < kMR; ++i) {
    if (neg)
      adc_add<true, kSigned, kHalfEven, kDouble>(c[i], fc, sh, t + i * ldt);
    else
      adc_add<false, kSigned, kHalfEven, kDouble>(c[i], fc, sh, t + i * ldt);
  }
}

using Micro = void (*)(const int32_t*, const int32_t*, int64_t, const FastConsts&, int, bool, int32_t*, int64_t);
struct MicroPair {
  Micro full, half;  // micro_6x16, micro_6x8
};
template <bool kSigned, bool kHalfEven, bool kDouble>
constexpr MicroPair micro_pair() {
  return {&micro_6x16<kSigned, kHalfEven, kDouble>, &micro_6x8<kSigned, kHalfEven, kDouble>};
}

template <typename code_t>
void run_fast_t(const at::Tensor& x, const std::vector<at::Tensor>& gs, const CellPlan& pl, const Active& active,
                int64_t NP, Sink& sink) {
  const int64_t M = pl.p.M, K = pl.p.K, N = pl.p.N, Tr = pl.p.Tr(), R = pl.p.rows, S = pl.S, Q = pl.Q;
  const int64_t kp_max = (std::min(R, K) + 1) / 2, panel = kp_max * kNR * 2;  // int16 per panel (bound)
  const int64_t tile_size = Q * S * NP * panel;
  // Packed conductances of every set and tile (32-byte aligned: the microkernel's aligned loads).
  std::vector<at::Tensor> gp;
  for (const auto& g : gs) {
    const at::Tensor gc = weight_groups(g, pl);
    at::Tensor buf = at::empty({Tr, tile_size + 16}, at::TensorOptions().dtype(at::kShort));
    const int32_t* src = gc.data_ptr<int32_t>();
    int16_t* b = buf.data_ptr<int16_t>();
    at::parallel_for(0, Tr, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        int16_t* d = b + r * (tile_size + 16);
        d += ((32 - ((uintptr_t)d & 31)) & 31) / 2;
        const int64_t k0 = pl.p.tile_start(r), kr = pl.p.tile_rows(r);
        pack_g_tile(src, Q, S, K, N, k0, kr, NP, d);
      }
    });
    gp.push_back(buf);
  }
  auto g_tile = [&](size_t s, int64_t r) {
    int16_t* d = gp[s].data_ptr<int16_t>() + r * (tile_size + 16);
    return d + ((32 - ((uintptr_t)d & 31)) & 31) / 2;
  };
  const code_t* xp = x.data_ptr<code_t>();
  const FastConsts fcs[2] = {fast_consts(pl.fast[0]), fast_consts(pl.fast[1])};
  const int64_t nmicro_max = (pl.block_rows + kMR - 1) / kMR, ldt = NP * kNR;
  const int db = pl.p.dac_bits, cb = pl.p.cell_bits, chunks = pl.p.chunks();
  const bool sgn = pl.p.adc_signed(), he = pl.p.half_even();
  const MicroPair pairs[2][2][2] = {{{micro_pair<false, false, false>(), micro_pair<false, false, true>()},
                                     {micro_pair<false, true, false>(), micro_pair<false, true, true>()}},
                                    {{micro_pair<true, false, false>(), micro_pair<true, false, true>()},
                                     {micro_pair<true, true, false>(), micro_pair<true, true, true>()}}};
  const MicroPair& pair = pairs[sgn][he][pl.fast_dbl];
  // (the last panel through the 8-column kernel when its columns end in its first half)
  const Micro micro_full = pair.full;
  const Micro micro_last = N - (NP - 1) * kNR <= kNR / 2 ? pair.half : micro_full;
  parallel_items(M, pl.block_rows, 1, 1, [&](int64_t w, int64_t m0, int64_t nm, int64_t, int64_t) {
    std::vector<int16_t> xa((size_t)(pl.C * nmicro_max * kp_max * kMR * 2 + 16));
    std::vector<uint8_t> stage((size_t)(nmicro_max * kp_max * kMR * 2 + 32));
    std::vector<char> nonzero((size_t)(pl.C * nmicro_max));
    std::vector<int32_t> t32((size_t)(nmicro_max * kMR * ldt));
    std::vector<int64_t> t64((size_t)(nm * N));
    const int64_t nmicro = (nm + kMR - 1) / kMR;
    for (int64_t r = 0; r < Tr; ++r) {
      const int64_t k0 = pl.p.tile_start(r), kr = pl.p.tile_rows(r), kp = (kr + 1) / 2;
      const int64_t pan = kp * kNR * 2, cstride = nmicro * kp * kMR * 2;
      const FastConsts& fc = fcs[r + 1 < Tr ? 0 : 1];
      bool packed = false;
      for (size_t s = 0; s < gs.size(); ++s) {
        if (!any_active(active[s], r, NP)) continue;
        if (!packed) pack_x_tile<code_t>(xp, K, m0, nm, k0, kr, pl, nmicro, xa.data(), nonzero.data(), stage.data());
        packed = true;
        std::fill(t32.begin(), t32.end(), 0);
        const int16_t* gt = g_tile(s, r);
        for (int q = 0; q < Q; ++q)
          for (int64_t j = 0; j < S; ++j)
            for (int64_t np = 0; np < NP; ++np) {
              if (!active[s][(size_t)(r * NP + np)]) continue;
              const int32_t* B = (const int32_t*)(gt + ((q * S + j) * NP + np) * pan);
              const Micro micro = np + 1 < NP ? micro_full : micro_last;
              for (int64_t mc = 0; mc < nmicro; ++mc)
                for (int c = 0; c < pl.C; ++c) {
                  if (!nonzero[(size_t)(c * nmicro + mc)]) continue;
                  const int pol = c / chunks, i = c % chunks;
                  const int32_t* A = (const int32_t*)(xa.data() + c * cstride + mc * kp * kMR * 2);
                  micro(A, B, kp, fc, (int)(i * db + j * cb), pol != q, t32.data() + mc * kMR * ldt + np * kNR, ldt);
                }
            }
        for (int64_t mi = 0; mi < nm; ++mi)
          for (int64_t c = 0; c < N; ++c) t64[(size_t)(mi * N + c)] = t32[(size_t)(mi * ldt + c)];
        sink.tile(w, (int)s, r, m0, nm, 0, N, t64.data(), N);
      }
    }
    sink.done(w, m0, nm, 0, N);
  });
}

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // __x86_64__

// ------------------------------------------------------------------ dispatch over the paths
void run_cells(const at::Tensor& x_in, const std::vector<at::Tensor>& gs, const CellPlan& pl, const Active& active,
               int64_t NP, Sink& sink) {
  const at::Tensor x = x_in.contiguous();
  if (pl.path == Path::kLinear) return run_linear(x, gs, pl, active, NP, sink);
  const std::vector<at::Tensor> gc(gs.begin(), gs.end());
  auto go = [&](auto tag) {
    using code_t = decltype(tag);
#if defined(__x86_64__)
    if (pl.path == Path::kFast) return run_fast_t<code_t>(x, gc, pl, active, NP, sink);
#endif
    run_generic_t<code_t>(x, gc, pl, active, NP, sink);
  };
  switch (x.scalar_type()) {
    case at::kByte: go(uint8_t()); break;
    case at::kChar: go(int8_t()); break;
    case at::kShort: go(int16_t()); break;
    default: go(int32_t()); break;
  }
}

int64_t panels(int64_t N) { return (N + kNR - 1) / kNR; }

Active all_active(size_t sets, int64_t Tr, int64_t NP) {
  return Active(sets, std::vector<char>((size_t)(Tr * NP), 1));
}

}  // namespace

// ------------------------------------------------------------------ xbar_cell_tile_sums
namespace {
struct TileSumsSink : Sink {
  int64_t* o;
  int64_t M, N;
  void tile(int64_t, int, int64_t r, int64_t m0, int64_t nm, int64_t n0, int64_t nw, const int64_t* t,
            int64_t ldt) override {
    for (int64_t mi = 0; mi < nm; ++mi)
      std::memcpy(o + (r * M + m0 + mi) * N + n0, t + mi * ldt, sizeof(int64_t) * (size_t)nw);
  }
  void done(int64_t, int64_t, int64_t, int64_t, int64_t) override {}
};
}  // namespace

at::Tensor xbar_cell_tile_sums_cpu(const at::Tensor& x_codes, const at::Tensor& g, int64_t rows, int64_t cols,
                                   int64_t input_bits, bool input_signed, int64_t dac_bits, int64_t weight_bits,
                                   int64_t cell_bits, int64_t adc_levels, int64_t adc_clip, int64_t frac_bits,
                                   int64_t periphery) {
  const CellPlan pl = make_cell_plan(x_codes, {{g, "g"}}, rows, cols, input_bits, input_signed, dac_bits, weight_bits,
                                     cell_bits, adc_levels, adc_clip, frac_bits, periphery);
  const int64_t M = pl.p.M, N = pl.p.N, Tr = pl.p.Tr();
  const char* what = "xbar_cell_tile_sums: the output [Tr, M, N]";
  mul_checked(mul_checked(Tr, M, what), N, what);
  at::Tensor out = at::zeros({Tr, M, N}, x_codes.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  TileSumsSink sink;
  sink.o = out.data_ptr<int64_t>();
  sink.M = M;
  sink.N = N;
  run_cells(x_codes, {g}, pl, all_active(1, Tr, panels(N)), panels(N), sink);
  return out;
}

// ------------------------------------------------------------------ xbar_cell_mvm
namespace {
template <typename scalar_t>
struct MvmSink : Sink {
  std::vector<const scalar_t*> coef;
  scalar_t* out;
  int64_t N;
  int64_t acc_size = 0;
  std::vector<std::vector<double>> acc;  // per worker [rows of a block, N], made on the worker's first use
  void tile(int64_t w, int s, int64_t r, int64_t, int64_t nm, int64_t n0, int64_t nw, const int64_t* t,
            int64_t ldt) override {
    std::vector<double>& aw = acc[(size_t)w];
    if (aw.empty()) aw.assign((size_t)acc_size, 0.0);
    double* a = aw.data() + n0;
    const scalar_t* c = coef[(size_t)s] + r * N + n0;
    for (int64_t mi = 0; mi < nm; ++mi) {
      double* row = a + mi * N;
      const int64_t* tr = t + mi * ldt;
      for (int64_t n = 0; n < nw; ++n) row[n] += (double)c[n] * (double)tr[n];
    }
  }
  void done(int64_t w, int64_t m0, int64_t nm, int64_t n0, int64_t n1) override {
    std::vector<double>& a = acc[(size_t)w];
    if (a.empty()) a.assign((size_t)acc_size, 0.0);  // no active tile: every output is 0
    for (int64_t mi = 0; mi < nm; ++mi) {
      double* row = a.data() + mi * N;
      for (int64_t n = n0; n < n1; ++n) out[(m0 + mi) * N + n] = (scalar_t)row[n];
      std::fill(row + n0, row + n1, 0.0);
    }
  }
};
}  // namespace

at::Tensor xbar_cell_mvm_cpu(const at::Tensor& x_codes, const at::Tensor& gb, const std::optional<at::Tensor>& gt,
                             const at::Tensor& coef_b, const std::optional<at::Tensor>& coef_t, int64_t rows,
                             int64_t cols, int64_t input_bits, bool input_signed, int64_t dac_bits, int64_t weight_bits,
                             int64_t cell_bits, int64_t adc_levels, int64_t adc_clip, int64_t frac_bits,
                             int64_t periphery) {
  check_task_given("xbar_cell_mvm", "gt", gt.has_value(), coef_t.has_value());
  std::vector<std::pair<at::Tensor, const char*>> named{{gb, "gb"}};
  if (gt.has_value()) named.push_back({*gt, "gt"});
  const CellPlan pl = make_cell_plan(x_codes, named, rows, cols, input_bits, input_signed, dac_bits, weight_bits,
                                     cell_bits, adc_levels, adc_clip, frac_bits, periphery);
  const int64_t M = pl.p.M, N = pl.p.N, Tr = pl.p.Tr(), NP = panels(N);
  check_mvm_coefs("xbar_cell_mvm", coef_b, coef_t, Tr, N);
  TORCH_CHECK(coef_b.device().is_cpu(), "xbar_cell_mvm: coef_b must be a CPU tensor, got ", coef_b.device());
  std::vector<at::Tensor> gs{gb}, coef{coef_b.contiguous()};
  if (coef_t.has_value()) {
    TORCH_CHECK(coef_t->device() == coef_b.device(), "xbar_cell_mvm: coef_t must be on coef_b's device, got ",
                coef_t->device());
    gs.push_back(*gt);
    coef.push_back(coef_t->contiguous());
  }
  at::Tensor y = at::zeros({M, N}, coef_b.options());
  if (y.numel() == 0 || Tr == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(coef_b.scalar_type(), "xbar_cell_mvm_cpu", [&] {
    MvmSink<scalar_t> sink;
    Active active(gs.size(), std::vector<char>((size_t)(Tr * NP), 0));
    for (size_t s = 0; s < gs.size(); ++s) {
      const scalar_t* c = coef[s].data_ptr<scalar_t>();
      sink.coef.push_back(c);
      for (int64_t r = 0; r < Tr; ++r)
        for (int64_t n = 0; n < N; ++n)
          if (c[r * N + n] != scalar_t(0)) active[s][(size_t)(r * NP + n / kNR)] = 1;
    }
    sink.out = y.data_ptr<scalar_t>();
    sink.N = N;
    sink.acc_size = mul_checked(std::min(pl.block_rows, M), N, "xbar_cell_mvm");
    sink.acc.resize((size_t)at::get_num_threads());
    run_cells(x_codes, gs, pl, active, NP, sink);
  });
  return y;
}

// ------------------------------------------------------------------ xbar_cell_coef_grad
namespace {
// Hands every T_int to the ordered sum of coef_grad.h (the order of xbar_coef_grad).
struct CoefGradSink : Sink {
  CoefGradSum* sum;
  int64_t N;
  void tile(int64_t, int, int64_t r, int64_t m0, int64_t nm, int64_t n0, int64_t nw, const int64_t* t,
            int64_t ldt) override {
    sum->add(r, n0, nw, m0, nm, t, ldt);
  }
  void done(int64_t, int64_t, int64_t, int64_t, int64_t) override {}
};
}  // namespace

at::Tensor xbar_cell_coef_grad_cpu(const at::Tensor& x_codes, const at::Tensor& g, const at::Tensor& gy, int64_t rows,
                                   int64_t cols, int64_t input_bits, bool input_signed, int64_t dac_bits,
                                   int64_t weight_bits, int64_t cell_bits, int64_t adc_levels, int64_t adc_clip,
                                   int64_t frac_bits, int64_t periphery) {
  CellPlan pl = make_cell_plan(x_codes, {{g, "g"}}, rows, cols, input_bits, input_signed, dac_bits, weight_bits,
                               cell_bits, adc_levels, adc_clip, frac_bits, periphery);
  // Work items of whole gradient blocks (kGradRows rows each, the last one may end at M), whatever the
  // path: every block's rows then come in one call, in order.
  pl.block_rows = std::max<int64_t>(1, pl.block_rows / kGradRows) * kGradRows;
  const int64_t M = pl.p.M, N = pl.p.N, Tr = pl.p.Tr();
  check_coef_grad_gy("xbar_cell_coef_grad", gy, M, N);
  TORCH_CHECK(gy.device().is_cpu(), "xbar_cell_coef_grad: gy must be a CPU tensor, got ", gy.device());
  const int64_t g_size = mul_checked(Tr, N, "xbar_cell_coef_grad: the output [Tr, N]");
  if (g_size == 0 || M == 0) return at::zeros({Tr, N}, gy.options().dtype(at::kDouble));
  const at::Tensor g64 = gy.to(at::kDouble).contiguous();
  CoefGradSum sum(g64.data_ptr<double>(), M, Tr, N, "xbar_cell_coef_grad");
  CoefGradSink sink;
  sink.sum = &sum;
  sink.N = N;
  run_cells(x_codes, {g}, pl, all_active(1, Tr, panels(N)), panels(N), sink);
  return sum.result();
}

}  // namespace cpu
}  // namespace xma2
