// The CPU implementations of the xma2_ops operators (docs/SPEC.md section 3, docs/CPU_KERNEL.md),
// registered for the CPU dispatch key.
//
// Quantised path (an ADC that can lose information): driver.cpp runs, per block of 128 input rows,
// per row tile and block of output columns, the kernel of one instruction set (isa_*.cpp, amx.cpp):
// all (polarity, chunk, slice) partial sums, each through the ADC, shifted and added in registers.
// Lossless path (plan.lossless): every ADC code equals its partial sum, so T_int of a row tile is
// sum_k x_int * w_int: on AMX one chunk x one slice with the identity as ADC, else one float GEMM
// per tile, exact because every partial sum is an integer below 2^24 (float32) or 2^53 (float64).
//
// xbar_mvm combines coef * T_int in float64 in one order on every path and instruction set: row
// tile outer, then the base weights, then the task weights; one rounding to the output dtype at
// the end.  So its bits do not depend on the CPU.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "../xbar_check.h"
#include "cells.h"
#include "coef_grad.h"
#include "driver.h"
#include "unfold.h"

namespace xma2 {
namespace cpu {
namespace {

constexpr int64_t kGemmRowBlock = 8192;  // input rows converted to float at a time (few, large GEMM calls)
static_assert(kRowBlock % kGradRows == 0, "the quantised driver's row blocks must be whole gradient blocks");

CodesView codes_view(const at::Tensor& x) {
  CodeType t = CodeType::kI32;
  switch (x.scalar_type()) {
    case at::kByte: t = CodeType::kU8; break;
    case at::kChar: t = CodeType::kI8; break;
    case at::kShort: t = CodeType::kI16; break;
    case at::kInt: t = CodeType::kI32; break;
    default: TORCH_CHECK(false, "xbar: x_codes must be int32, int16, int8 or uint8, got ", x.scalar_type());
  }
  return {x.data_ptr(), t, x.stride(0), x.stride(1)};
}

// How a call computes: one exact float GEMM per tile (lossless without AMX: isa == nullptr), or the
// quantised driver with an instruction set.
struct Route {
  Plan pl;
  const Isa* isa;
};

Route route_of(const XbarParams& p) {
  Route rt{make_plan(p), nullptr};
  rt.isa = rt.pl.lossless ? lossless_on_amx(rt.pl) : &choose_isa(rt.pl);
  return rt;
}

Route checked_route(const at::Tensor& x, const at::Tensor& w, int64_t rows, int64_t cols, int64_t input_bits,
                    bool input_signed, int64_t dac_bits, int64_t weight_bits, int64_t cell_bits, int64_t adc_levels,
                    int64_t adc_clip, int64_t periphery) {
  return route_of(make_params_checked(x, w, rows, cols, input_bits, input_signed, dac_bits, weight_bits, cell_bits,
                                      adc_levels, adc_clip, periphery, kPeripheryCpuKernel));
}

// Float type in which every partial sum of one tile's GEMM (|sum_k x w| <= rows Qx Qw, the Pmax of the call
// as one conversion, xbar_quant.h) is exact.
at::ScalarType exact_float(const Plan& pl) {
  return one_conversion(pl.p).pmax() < (1LL << 24) ? at::kFloat : at::kDouble;
}

// ------------------------------------------------------------------ packed weights (xbar_pack_weights)
// The kernel's form of one weight's codes, made once per programmed weight: an int32 tensor of a
// header (the route and everything the layout depends on, compared at every use) followed by the
// packed words (pack.h) on the quantised route, or by the codes as the exact float type [K, N] (their
// bits) on the GEMM route.
constexpr int64_t kPackedHeader = 16;
constexpr int32_t kPackedMagic = 0x31504258;  // "XBP1"

std::vector<int64_t> packed_header(const Route& rt) {
  const Plan& pl = rt.pl;
  if (!rt.isa) {
    const bool dbl = exact_float(pl) == at::kDouble;
    return {kPackedMagic, 0, pl.p.rows, pl.p.w_bits, pl.p.x_bits, dbl ? 1 : 0, 0, 0, pl.p.K, pl.p.N, 0, 0,
            pl.p.K * pl.p.N * (dbl ? 2 : 1), 0, 0, 0};
  }
  const Isa& isa = *rt.isa;
  const WeightGeometry g = weight_geometry(pl, isa);
  const std::string name = isa.name;
  const int64_t id = name == "scalar" ? 1 : name == "avx2" ? 2 : name == "avx512" ? 3 : name == "amx" ? 4 : 5;
  // [14]: the rows of every tile but the last under the even split (the planes start at other rows), else 0
  return {kPackedMagic, id, pl.p.rows, pl.p.w_bits, pl.p.cell_bits, pl.words, pl.kpad, isa.lanes, pl.p.K, pl.p.N,
          g.blocks, g.per_block, g.words, pl.identity ? 1 : 0, pl.p.even_split() ? pl.p.tile_size() : 0, 0};
}

// The words after the header of `packed`, checked to be the packed form for this route, or a RuntimeError.
const int32_t* packed_words(const at::Tensor& packed, const Route& rt, const char* name) {
  const std::vector<int64_t> want = packed_header(rt);
  bool ok = packed.device().is_cpu() && packed.scalar_type() == at::kInt && packed.dim() == 1 &&
            packed.is_contiguous() && packed.numel() == kPackedHeader + want[12];
  const int32_t* h = ok ? packed.data_ptr<int32_t>() : nullptr;
  for (int64_t i = 0; ok && i < kPackedHeader; ++i) ok = (int64_t)h[i] == want[(size_t)i];
  TORCH_CHECK(ok, "xbar: ", name, "_packed is not the packed form of ", name, " for these parameters and this "
              "instruction set (make it with xbar_pack_weights of the same codes and arguments)");
  return h + kPackedHeader;
}

// Packed planes of one set: from `packed` when given (checked), else packed from the codes now.  The
// tensors must outlive the planes.
WeightPlanes weight_planes(const at::Tensor& w, const at::Tensor& packed, const Route& rt, const char* name) {
  WeightPlanes wp;
  wp.g = weight_geometry(rt.pl, *rt.isa);
  if (packed.defined()) {
    wp.words = reinterpret_cast<const uint32_t*>(packed_words(packed, rt, name));
    return wp;
  }
  const at::Tensor wc = w.contiguous();
  wp.owned.resize((size_t)wp.g.words);
  pack_weights(wc.data_ptr<int32_t>(), rt.pl, *rt.isa, name, wp.owned.data());
  wp.words = wp.owned.data();
  return wp;
}

// Packed weights of one set, and the (tile, lane block) pairs whose coefficients are not all zero
// (all when coef is undefined).
template <typename scalar_t>
WeightSet weight_set(const at::Tensor& w, const at::Tensor& packed, const at::Tensor& coef, const Route& rt,
                     const char* name) {
  WeightSet ws;
  ws.planes = weight_planes(w, packed, rt, name);
  const int64_t Tr = rt.pl.p.Tr(), N = rt.pl.p.N, blocks = ws.planes.g.blocks, lanes = rt.isa->lanes;
  ws.active.assign((size_t)(Tr * blocks), coef.defined() ? 0 : 1);
  if (coef.defined()) {
    const scalar_t* c = coef.data_ptr<scalar_t>();
    for (int64_t r = 0; r < Tr; ++r)
      for (int64_t n = 0; n < N; ++n)
        if (c[r * N + n] != scalar_t(0)) ws.active[(size_t)(r * blocks + n / lanes)] = 1;
  }
  return ws;
}

// The weights of the GEMM route in the exact float type [K, N]: from `packed` when given (checked),
// else converted now (after the range check).
at::Tensor gemm_weights(const at::Tensor& w, const at::Tensor& packed, const Route& rt, const char* name) {
  const auto ft = exact_float(rt.pl);
  if (!packed.defined()) {
    check_weight_codes(w, rt.pl.p, name);
    return w.to(ft);
  }
  packed_words(packed, rt, name);
  return packed.narrow(0, kPackedHeader, packed.numel() - kPackedHeader).view(ft).view({rt.pl.p.K, rt.pl.p.N});
}

at::Tensor xbar_pack_weights_cpu(const at::Tensor& w_codes, int64_t rows, int64_t cols, int64_t input_bits,
                                 bool input_signed, int64_t dac_bits, int64_t weight_bits, int64_t cell_bits,
                                 int64_t adc_levels, int64_t adc_clip, int64_t periphery) {
  TORCH_CHECK(w_codes.dim() == 2, "xbar_pack_weights: w_codes must be [K, N], got ", w_codes.sizes());
  const at::Tensor no_rows = at::empty({0, w_codes.size(0)}, w_codes.options().dtype(at::kByte));
  const Route rt = checked_route(no_rows, w_codes, rows, cols, input_bits, input_signed, dac_bits, weight_bits,
                                 cell_bits, adc_levels, adc_clip, periphery);
  const std::vector<int64_t> header = packed_header(rt);
  for (const int64_t v : header)
    TORCH_CHECK(v >= INT32_MIN && v <= INT32_MAX, "xbar_pack_weights: w_codes ", w_codes.sizes(),
                " is too large to pack (a header field is ", v, ")");
  at::Tensor out = at::empty({add_checked(kPackedHeader, header[12], "xbar_pack_weights")},
                             w_codes.options().dtype(at::kInt));
  int32_t* o = out.data_ptr<int32_t>();
  for (int64_t i = 0; i < kPackedHeader; ++i) o[i] = (int32_t)header[(size_t)i];
  if (!rt.isa) {
    const auto ft = exact_float(rt.pl);
    out.narrow(0, kPackedHeader, header[12]).view(ft).view({rt.pl.p.K, rt.pl.p.N}).copy_(
        gemm_weights(w_codes, at::Tensor(), rt, "w_codes"));
    return out;
  }
  const at::Tensor wc = w_codes.contiguous();
  pack_weights(wc.data_ptr<int32_t>(), rt.pl, *rt.isa, "w_codes", reinterpret_cast<uint32_t*>(o + kPackedHeader));
  return out;
}

// ------------------------------------------------------------------ xbar_tile_sums
at::Tensor xbar_tile_sums_cpu(const at::Tensor& x_codes, const at::Tensor& w_codes, int64_t rows, int64_t cols,
                              int64_t input_bits, bool input_signed, int64_t dac_bits, int64_t weight_bits,
                              int64_t cell_bits, int64_t adc_levels, int64_t adc_clip, int64_t periphery) {
  const Route rt = checked_route(x_codes, w_codes, rows, cols, input_bits, input_signed, dac_bits, weight_bits,
                                 cell_bits, adc_levels, adc_clip, periphery);
  const Plan& pl = rt.pl;
  const int64_t M = pl.p.M, N = pl.p.N, Tr = pl.p.Tr();
  mul_checked(mul_checked(Tr, M, "xbar_tile_sums: the output [Tr, M, N]"), N, "xbar_tile_sums: the output [Tr, M, N]");
  at::Tensor out = at::empty({Tr, M, N}, x_codes.options().dtype(at::kLong));
  if (!rt.isa) {
    check_input_codes(x_codes, pl.p);
    const auto ft = exact_float(pl);
    const at::Tensor wf = gemm_weights(w_codes, at::Tensor(), rt, "w_codes");
    for (int64_t r = 0; r < Tr; ++r) {
      const int64_t k0 = pl.p.tile_start(r), kr = pl.p.tile_rows(r);
      out[r].copy_(at::mm(x_codes.narrow(1, k0, kr).to(ft), wf.narrow(0, k0, kr)));
    }
    return out;
  }
  const Isa& isa = *rt.isa;
  std::vector<WeightSet> sets;
  sets.push_back(weight_set<float>(w_codes, at::Tensor(), at::Tensor(), rt, "w_codes"));
  int64_t* o = out.data_ptr<int64_t>();
  const int64_t L = isa.lanes;
  run_quantized(codes_view(x_codes), pl, isa, sets,
                [&](int, int64_t r, int64_t n0, int64_t m0, int64_t nm, const int64_t* t) {
                  const int64_t nl = std::min(L, N - n0);
                  for (int64_t mi = 0; mi < nm; ++mi)
                    std::memcpy(o + (r * M + m0 + mi) * N + n0, t + mi * L, sizeof(int64_t) * nl);
                },
                [](int64_t, int64_t, int64_t, int64_t) {});
  return out;
}

// ------------------------------------------------------------------ xbar_mvm
// Quantised (or lossless on AMX): the driver hands each (row tile, set, lane block) to the
// epilogue in that order; every output element of a row block gets its terms added in float64.
template <typename scalar_t>
void mvm_quantized(const at::Tensor& x, const std::vector<at::Tensor>& w, const std::vector<at::Tensor>& packed,
                   const std::vector<at::Tensor>& coef, const Route& rt, at::Tensor& y) {
  static const char* kNames[2] = {"wb_codes", "wt_codes"};
  const Plan& pl = rt.pl;
  const Isa& isa = *rt.isa;
  const int64_t N = pl.p.N, L = isa.lanes;
  std::vector<WeightSet> sets;
  std::vector<const scalar_t*> cp;
  for (size_t s = 0; s < w.size(); ++s) {
    sets.push_back(weight_set<scalar_t>(w[s], packed[s], coef[s], rt, kNames[s]));
    cp.push_back(coef[s].data_ptr<scalar_t>());
  }
  scalar_t* out = y.data_ptr<scalar_t>();
  const int64_t acc_size = mul_checked(kRowBlock, N, "xbar_mvm: accumulator");
  std::vector<std::vector<double>> acc((size_t)at::get_num_threads(), std::vector<double>((size_t)acc_size, 0.0));
  run_quantized(codes_view(x), pl, isa, sets,
                [&](int s, int64_t r, int64_t n0, int64_t, int64_t nm, const int64_t* t) {
                  double* a = acc[(size_t)at::get_thread_num()].data() + n0;
                  const int64_t nl = std::min(L, N - n0);
                  const scalar_t* c = cp[(size_t)s] + r * N + n0;
                  for (int64_t mi = 0; mi < nm; ++mi) {
                    double* row = a + mi * N;
                    const int64_t* tr = t + mi * L;
                    for (int64_t l = 0; l < nl; ++l) row[l] += (double)c[l] * (double)tr[l];
                  }
                },
                [&](int64_t m0, int64_t nm, int64_t n0, int64_t n1) {
                  std::vector<double>& a = acc[(size_t)at::get_thread_num()];
                  for (int64_t mi = 0; mi < nm; ++mi) {
                    double* row = a.data() + mi * N;
                    for (int64_t n = n0; n < n1; ++n) out[(m0 + mi) * N + n] = (scalar_t)row[n];
                    std::fill(row + n0, row + n1, 0.0);
                  }
                });
}

// The work items of the GEMM route on the one parallel loop (driver.h): blocks of `block` rows, split over
// the columns too, in groups of at least 64, when there are few; each thread runs its items' small GEMMs
// itself (ATen does not nest parallel regions): no region per tile, nothing that spins while a core is busy
// with another process.  body(m0, nm, n0, nw) gets rows [m0, m0 + nm), columns [n0, n0 + nw).
template <typename F>
void for_gemm_items(int64_t M, int64_t N, int64_t block, const F& body) {
  parallel_items(M, block, N, 64, [&](int64_t, int64_t m0, int64_t nm, int64_t n0, int64_t n1) {
    if (n1 > n0) body(m0, nm, n0, n1 - n0);
  });
}

// Rows per GEMM item: about 2^18 GEMM outputs, at least `unit` rows and a multiple of it.
int64_t gemm_block(int64_t N, int64_t unit) {
  const int64_t rows = std::min<int64_t>(kGemmRowBlock, (1 << 18) / std::max<int64_t>(N, 1));
  return std::max<int64_t>(1, rows / unit) * unit;
}

// Lossless: T_int of each tile is one exact float GEMM (the sum of x_int * w_int), combined with its
// coefficients in float64 per input row in the order of the quantised path (row tile outer, then the
// sets), so both paths give the same bits.
template <typename scalar_t, typename ft_t>
void mvm_lossless_t(const at::Tensor& x, const std::vector<at::Tensor>& wf, const std::vector<at::Tensor>& coef,
                    const std::vector<std::vector<char>>& row_used, const Plan& pl, at::ScalarType ft, at::Tensor& y) {
  const int64_t N = pl.p.N, Tr = pl.p.Tr();
  scalar_t* out = y.data_ptr<scalar_t>();
  for_gemm_items(pl.p.M, N, gemm_block(N, 16), [&](int64_t m0, int64_t nm, int64_t n0, int64_t nw) {
    const at::Tensor xb = x.narrow(0, m0, nm).to(ft);
    std::vector<double> acc((size_t)(nm * nw), 0.0);
    for (int64_t r = 0; r < Tr; ++r) {
      const int64_t k0 = pl.p.tile_start(r), kr = pl.p.tile_rows(r);
      for (size_t s = 0; s < wf.size(); ++s) {
        if (!row_used[s][(size_t)r]) continue;  // every PE of this tile row is skipped
        const scalar_t* c = coef[s].data_ptr<scalar_t>() + r * N + n0;
        const at::Tensor t = at::mm(xb.narrow(1, k0, kr), wf[s].narrow(0, k0, kr).narrow(1, n0, nw)).contiguous();
        const ft_t* tp = t.data_ptr<ft_t>();  // exact integers
        for (int64_t mi = 0; mi < nm; ++mi) {
          double* a = acc.data() + mi * nw;
          const ft_t* tm = tp + mi * nw;
          for (int64_t n = 0; n < nw; ++n) a[n] += (double)c[n] * (double)tm[n];
        }
      }
    }
    for (int64_t mi = 0; mi < nm; ++mi)
      for (int64_t n = 0; n < nw; ++n) out[(m0 + mi) * N + n0 + n] = (scalar_t)acc[(size_t)(mi * nw + n)];
  });
}

// The coefficient gradient on the GEMM route: T_int of each tile by one exact float GEMM per item of
// whole gradient blocks, summed in the one order of coef_grad.h (as the quantised path).
template <typename ft_t>
void coef_grad_lossless_t(const at::Tensor& x, const at::Tensor& wf, const Plan& pl, at::ScalarType ft,
                          CoefGradSum& sum) {
  const int64_t Tr = pl.p.Tr();
  for_gemm_items(pl.p.M, pl.p.N, gemm_block(pl.p.N, kGradRows), [&](int64_t m0, int64_t nm, int64_t n0, int64_t nw) {
    const at::Tensor xb = x.narrow(0, m0, nm).to(ft);
    for (int64_t r = 0; r < Tr; ++r) {
      const int64_t k0 = pl.p.tile_start(r), kr = pl.p.tile_rows(r);
      const at::Tensor t = at::mm(xb.narrow(1, k0, kr), wf.narrow(0, k0, kr).narrow(1, n0, nw)).contiguous();
      sum.add(r, n0, nw, m0, nm, t.data_ptr<ft_t>(), nw);  // exact integers
    }
  });
}

template <typename scalar_t>
void mvm_lossless(const at::Tensor& x, const std::vector<at::Tensor>& w, const std::vector<at::Tensor>& packed,
                  const std::vector<at::Tensor>& coef, const Route& rt, at::Tensor& y) {
  static const char* kNames[2] = {"wb_codes", "wt_codes"};
  const Plan& pl = rt.pl;
  const auto ft = exact_float(pl);
  const int64_t Tr = pl.p.Tr();
  std::vector<at::Tensor> wf;
  std::vector<std::vector<char>> row_used;  // tile rows with a non-zero coefficient
  for (size_t s = 0; s < w.size(); ++s) {
    wf.push_back(gemm_weights(w[s], packed[s], rt, kNames[s]));
    const at::Tensor used = coef[s].ne(0).any(1).contiguous();
    row_used.emplace_back(used.data_ptr<bool>(), used.data_ptr<bool>() + Tr);
  }
  if (ft == at::kFloat) mvm_lossless_t<scalar_t, float>(x, wf, coef, row_used, pl, ft, y);
  else mvm_lossless_t<scalar_t, double>(x, wf, coef, row_used, pl, ft, y);
}

at::Tensor opt_tensor(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

// xbar_mvm with the packed forms of the weights (xbar_pack_weights) when given: no per-call packing.
at::Tensor xbar_mvm_packed_cpu(const at::Tensor& x_codes, const at::Tensor& wb_codes,
                               const std::optional<at::Tensor>& wb_packed, const std::optional<at::Tensor>& wt_codes,
                               const std::optional<at::Tensor>& wt_packed, const at::Tensor& coef_b,
                               const std::optional<at::Tensor>& coef_t, int64_t rows, int64_t cols, int64_t input_bits,
                               bool input_signed, int64_t dac_bits, int64_t weight_bits, int64_t cell_bits,
                               int64_t adc_levels, int64_t adc_clip, int64_t periphery) {
  const Route rt = checked_route(x_codes, wb_codes, rows, cols, input_bits, input_signed, dac_bits, weight_bits,
                                 cell_bits, adc_levels, adc_clip, periphery);
  const Plan& pl = rt.pl;
  check_task_given("xbar_mvm", "wt_codes", wt_codes.has_value(), coef_t.has_value());
  TORCH_CHECK(!wt_packed.has_value() || wt_codes.has_value(), "xbar_mvm: wt_packed given without wt_codes");
  check_mvm_coefs("xbar_mvm", coef_b, coef_t, pl.p.Tr(), pl.p.N);
  std::vector<at::Tensor> w{wb_codes}, packed{opt_tensor(wb_packed)}, coef{coef_b.contiguous()};
  if (coef_t.has_value()) {
    check_task_codes(wb_codes, *wt_codes);
    w.push_back(*wt_codes);
    packed.push_back(opt_tensor(wt_packed));
    coef.push_back(coef_t->contiguous());
  }
  if (!rt.isa) check_input_codes(x_codes, pl.p);
  at::Tensor y = at::empty({pl.p.M, pl.p.N}, coef_b.options());
  AT_DISPATCH_FLOATING_TYPES(coef_b.scalar_type(), "xbar_mvm_cpu", [&] {
    if (!rt.isa) mvm_lossless<scalar_t>(x_codes, w, packed, coef, rt, y);
    else mvm_quantized<scalar_t>(x_codes, w, packed, coef, rt, y);
  });
  return y;
}

at::Tensor xbar_mvm_cpu(const at::Tensor& x_codes, const at::Tensor& wb_codes, const std::optional<at::Tensor>& wt_codes,
                        const at::Tensor& coef_b, const std::optional<at::Tensor>& coef_t, int64_t rows, int64_t cols,
                        int64_t input_bits, bool input_signed, int64_t dac_bits, int64_t weight_bits, int64_t cell_bits,
                        int64_t adc_levels, int64_t adc_clip, int64_t periphery) {
  return xbar_mvm_packed_cpu(x_codes, wb_codes, std::nullopt, wt_codes, std::nullopt, coef_b, coef_t, rows, cols,
                             input_bits, input_signed, dac_bits, weight_bits, cell_bits, adc_levels, adc_clip,
                             periphery);
}

// ------------------------------------------------------------------ xbar_coef_grad
// G[r, n] = sum_m gy[m, n] * T_int[r, m, n] (float64), without materialising T_int, in the one order
// of coef_grad.h on every route and instruction set.
at::Tensor xbar_coef_grad_packed_cpu(const at::Tensor& x_codes, const at::Tensor& w_codes,
                                     const std::optional<at::Tensor>& w_packed, const at::Tensor& gy, int64_t rows,
                                     int64_t cols, int64_t input_bits, bool input_signed, int64_t dac_bits,
                                     int64_t weight_bits, int64_t cell_bits, int64_t adc_levels, int64_t adc_clip, int64_t periphery) {
  const Route rt = checked_route(x_codes, w_codes, rows, cols, input_bits, input_signed, dac_bits, weight_bits,
                                 cell_bits, adc_levels, adc_clip, periphery);
  const Plan& pl = rt.pl;
  const int64_t M = pl.p.M, N = pl.p.N, Tr = pl.p.Tr();
  check_coef_grad_gy("xbar_coef_grad", gy, M, N);
  const at::Tensor g64 = gy.to(at::kDouble).contiguous();
  CoefGradSum sum(g64.data_ptr<double>(), M, Tr, N, "xbar_coef_grad");
  if (!rt.isa) {
    check_input_codes(x_codes, pl.p);
    const at::Tensor wf = gemm_weights(w_codes, opt_tensor(w_packed), rt, "w_codes");
    if (exact_float(pl) == at::kFloat) coef_grad_lossless_t<float>(x_codes, wf, pl, at::kFloat, sum);
    else coef_grad_lossless_t<double>(x_codes, wf, pl, at::kDouble, sum);
    return sum.result();
  }
  // Quantised, or lossless on AMX: the driver's row blocks (kRowBlock rows) are whole gradient blocks,
  // and each (row block, tile, lane block) comes once.
  const int64_t L = rt.isa->lanes;
  std::vector<WeightSet> sets;
  sets.push_back(weight_set<float>(w_codes, opt_tensor(w_packed), at::Tensor(), rt, "w_codes"));
  run_quantized(codes_view(x_codes), pl, *rt.isa, sets,
                [&](int, int64_t r, int64_t n0, int64_t m0, int64_t nm, const int64_t* t) {
                  sum.add(r, n0, std::min(L, N - n0), m0, nm, t, L);
                },
                [](int64_t, int64_t, int64_t, int64_t) {});
  return sum.result();
}

at::Tensor xbar_coef_grad_cpu(const at::Tensor& x_codes, const at::Tensor& w_codes, const at::Tensor& gy, int64_t rows,
                              int64_t cols, int64_t input_bits, bool input_signed, int64_t dac_bits, int64_t weight_bits,
                              int64_t cell_bits, int64_t adc_levels, int64_t adc_clip, int64_t periphery) {
  return xbar_coef_grad_packed_cpu(x_codes, w_codes, std::nullopt, gy, rows, cols, input_bits, input_signed, dac_bits,
                                   weight_bits, cell_bits, adc_levels, adc_clip, periphery);
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(xma2_ops, CPU, m) {
  m.impl("xbar_tile_sums", &cpu::xbar_tile_sums_cpu);
  m.impl("xbar_mvm", &cpu::xbar_mvm_cpu);
  m.impl("xbar_coef_grad", &cpu::xbar_coef_grad_cpu);
  m.impl("xbar_pack_weights", &cpu::xbar_pack_weights_cpu);
  m.impl("xbar_mvm_packed", &cpu::xbar_mvm_packed_cpu);
  m.impl("xbar_coef_grad_packed", &cpu::xbar_coef_grad_packed_cpu);
  m.impl("xbar_unfold_codes", &cpu::xbar_unfold_codes_cpu);
  // The device model (SPEC 7.2): cells.cpp.
  m.impl("xbar_cell_tile_sums", &cpu::xbar_cell_tile_sums_cpu);
  m.impl("xbar_cell_mvm", &cpu::xbar_cell_mvm_cpu);
  m.impl("xbar_cell_coef_grad", &cpu::xbar_cell_coef_grad_cpu);
}

}  // namespace xma2
