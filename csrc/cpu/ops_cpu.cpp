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
#include <vector>

#include "../xbar_check.h"
#include "cells.h"
#include "driver.h"
#include "unfold.h"

namespace xma2 {
namespace cpu {
namespace {

constexpr int64_t kGemmRowBlock = 8192;  // input rows converted to float at a time (few, large GEMM calls)

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

Plan checked_plan(const at::Tensor& x, const at::Tensor& w, int64_t rows, int64_t cols, int64_t input_bits,
                  bool input_signed, int64_t dac_bits, int64_t weight_bits, int64_t cell_bits, int64_t adc_levels,
                  int64_t adc_clip) {
  return make_plan(make_params_checked(x, w, rows, cols, input_bits, input_signed, dac_bits, weight_bits, cell_bits,
                                       adc_levels, adc_clip));
}

// Packed weights of one set, and the (tile, lane block) pairs whose coefficients are not all zero
// (all when coef is undefined).
template <typename scalar_t>
WeightSet weight_set(const at::Tensor& w, const at::Tensor& coef, const Plan& pl, const Isa& isa, const char* name) {
  const at::Tensor wc = w.contiguous();
  WeightSet ws{pack_weights(wc.data_ptr<int32_t>(), pl, isa, name), {}};
  const int64_t Tr = pl.p.Tr(), N = pl.p.N, blocks = ws.planes.blocks, lanes = isa.lanes;
  ws.active.assign((size_t)(Tr * blocks), coef.defined() ? 0 : 1);
  if (coef.defined()) {
    const scalar_t* c = coef.data_ptr<scalar_t>();
    for (int64_t r = 0; r < Tr; ++r)
      for (int64_t n = 0; n < N; ++n)
        if (c[r * N + n] != scalar_t(0)) ws.active[(size_t)(r * blocks + n / lanes)] = 1;
  }
  return ws;
}

void check_codes(const at::Tensor& x, const at::Tensor& w, const Plan& pl, const char* w_name) {
  check_input_codes(x, pl.p);
  check_weight_codes(w, pl.p, w_name);
}

// Float type in which every T_int of one tile (|T| <= rows * Qx * Qw) is exact.
at::ScalarType exact_float(const Plan& pl) {
  const double bound = (double)pl.p.rows * ((1LL << pl.p.x_bits) - 1) * ((1LL << pl.p.w_bits) - 1);
  return bound < 16777216.0 ? at::kFloat : at::kDouble;
}

// ------------------------------------------------------------------ xbar_tile_sums
at::Tensor xbar_tile_sums_cpu(const at::Tensor& x_codes, const at::Tensor& w_codes, int64_t rows, int64_t cols,
                              int64_t input_bits, bool input_signed, int64_t dac_bits, int64_t weight_bits,
                              int64_t cell_bits, int64_t adc_levels, int64_t adc_clip) {
  Plan pl = checked_plan(x_codes, w_codes, rows, cols, input_bits, input_signed, dac_bits, weight_bits, cell_bits,
                         adc_levels, adc_clip);
  const int64_t M = pl.p.M, N = pl.p.N, Tr = pl.p.Tr();
  mul_checked(mul_checked(Tr, M, "xbar_tile_sums: the output [Tr, M, N]"), N, "xbar_tile_sums: the output [Tr, M, N]");
  at::Tensor out = at::empty({Tr, M, N}, x_codes.options().dtype(at::kLong));
  const Isa* amx_lossless = pl.lossless ? lossless_on_amx(pl) : nullptr;
  if (pl.lossless && !amx_lossless) {
    check_codes(x_codes, w_codes, pl, "w_codes");
    const auto ft = exact_float(pl);
    const at::Tensor wf = w_codes.to(ft);
    for (int64_t r = 0; r < Tr; ++r) {
      const int64_t k0 = r * pl.p.rows, kr = std::min<int64_t>(pl.p.rows, pl.p.K - k0);
      out[r].copy_(at::mm(x_codes.narrow(1, k0, kr).to(ft), wf.narrow(0, k0, kr)));
    }
    return out;
  }
  const Isa& isa = amx_lossless ? *amx_lossless : choose_isa(pl);
  std::vector<WeightSet> sets;
  sets.push_back(weight_set<float>(w_codes, at::Tensor(), pl, isa, "w_codes"));
  int64_t* o = out.data_ptr<int64_t>();
  const int64_t L = isa.lanes;
  run_quantized(codes_view(x_codes), pl, isa, sets,
                [&](int, int64_t r, int64_t n0, int64_t m0, int64_t nm, const int64_t* t) {
                  const int64_t nl = std::min(L, N - n0);
                  for (int64_t mi = 0; mi < nm; ++mi)
                    std::memcpy(o + (r * M + m0 + mi) * N + n0, t + mi * L, sizeof(int64_t) * nl);
                },
                [](int64_t, int64_t) {});
  return out;
}

// ------------------------------------------------------------------ xbar_mvm
// Quantised (or lossless on AMX): the driver hands each (row tile, set, lane block) to the
// epilogue in that order; every output element of a row block gets its terms added in float64.
template <typename scalar_t>
void mvm_quantized(const at::Tensor& x, const std::vector<at::Tensor>& w, const std::vector<at::Tensor>& coef,
                   const Plan& pl, const Isa& isa, at::Tensor& y) {
  static const char* kNames[2] = {"wb_codes", "wt_codes"};
  const int64_t N = pl.p.N, L = isa.lanes;
  std::vector<WeightSet> sets;
  std::vector<const scalar_t*> cp;
  for (size_t s = 0; s < w.size(); ++s) {
    sets.push_back(weight_set<scalar_t>(w[s], coef[s], pl, isa, kNames[s]));
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
                [&](int64_t m0, int64_t nm) {
                  std::vector<double>& a = acc[(size_t)at::get_thread_num()];
                  for (int64_t i = 0; i < nm * N; ++i) out[m0 * N + i] = (scalar_t)a[(size_t)i];
                  std::fill(a.begin(), a.end(), 0.0);
                });
}

// Lossless: T_int of each tile is one exact float GEMM (the sum of x_int * w_int), combined with its
// coefficients in float64 per block of input rows in the order of the quantised path (row tile
// outer, then the sets), so both paths give the same bits.
template <typename scalar_t>
void mvm_lossless(const at::Tensor& x, const std::vector<at::Tensor>& w, const std::vector<at::Tensor>& coef,
                  const Plan& pl, at::Tensor& y) {
  const auto ft = exact_float(pl);
  const int64_t M = pl.p.M, N = pl.p.N, Tr = pl.p.Tr(), R = pl.p.rows;
  std::vector<at::Tensor> wf;
  std::vector<std::vector<char>> row_used;  // tile rows with a non-zero coefficient
  for (size_t s = 0; s < w.size(); ++s) {
    wf.push_back(w[s].to(ft));
    const at::Tensor used = coef[s].ne(0).any(1).contiguous();
    row_used.emplace_back(used.data_ptr<bool>(), used.data_ptr<bool>() + Tr);
  }
  scalar_t* out = y.data_ptr<scalar_t>();
  std::vector<double> acc;
  for (int64_t m0 = 0; m0 < M; m0 += kGemmRowBlock) {
    const int64_t nm = std::min(kGemmRowBlock, M - m0);
    const at::Tensor xb = x.narrow(0, m0, nm).to(ft);
    acc.assign((size_t)(nm * N), 0.0);
    for (int64_t r = 0; r < Tr; ++r) {
      const int64_t k0 = r * R, kr = std::min(R, pl.p.K - k0);
      for (size_t s = 0; s < w.size(); ++s) {
        if (!row_used[s][(size_t)r]) continue;  // every PE of this tile row is skipped
        const scalar_t* c = coef[s].data_ptr<scalar_t>() + r * N;
        const at::Tensor t = at::mm(xb.narrow(1, k0, kr), wf[s].narrow(0, k0, kr)).to(at::kDouble).contiguous();
        const double* tp = t.data_ptr<double>();
        at::parallel_for(0, nm, 64, [&](int64_t a, int64_t b) {
          for (int64_t mi = a; mi < b; ++mi)
            for (int64_t n = 0; n < N; ++n) acc[(size_t)(mi * N + n)] += (double)c[n] * tp[mi * N + n];
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
  Plan pl = checked_plan(x_codes, wb_codes, rows, cols, input_bits, input_signed, dac_bits, weight_bits, cell_bits,
                         adc_levels, adc_clip);
  TORCH_CHECK(wt_codes.has_value() == coef_t.has_value(), "xbar_mvm: wt_codes and coef_t must be given together");
  TORCH_CHECK(coef_b.scalar_type() == at::kFloat || coef_b.scalar_type() == at::kDouble,
              "xbar_mvm: coef_b must be float32 or float64, got ", coef_b.scalar_type());
  TORCH_CHECK(coef_b.dim() == 2 && coef_b.size(0) == pl.p.Tr() && coef_b.size(1) == pl.p.N,
              "xbar_mvm: coef_b must be [Tr, N] = [", pl.p.Tr(), ", ", pl.p.N, "], got ", coef_b.sizes());
  std::vector<at::Tensor> w{wb_codes}, coef{coef_b.contiguous()};
  if (coef_t.has_value()) {
    TORCH_CHECK(wt_codes->sizes() == wb_codes.sizes() && wt_codes->scalar_type() == at::kInt,
                "xbar_mvm: wt_codes must be int32 of shape ", wb_codes.sizes(), ", got ", wt_codes->scalar_type(), " ",
                wt_codes->sizes());
    TORCH_CHECK(coef_t->sizes() == coef_b.sizes() && coef_t->scalar_type() == coef_b.scalar_type(),
                "xbar_mvm: coef_t must match coef_b in shape and dtype");
    w.push_back(*wt_codes);
    coef.push_back(coef_t->contiguous());
  }
  const Isa* amx_lossless = pl.lossless ? lossless_on_amx(pl) : nullptr;
  const bool gemm = pl.lossless && !amx_lossless;
  if (gemm) {
    check_codes(x_codes, w[0], pl, "wb_codes");
    if (w.size() > 1) check_weight_codes(w[1], pl.p, "wt_codes");
  }
  at::Tensor y = at::empty({pl.p.M, pl.p.N}, coef_b.options());
  AT_DISPATCH_FLOATING_TYPES(coef_b.scalar_type(), "xbar_mvm_cpu", [&] {
    if (gemm) mvm_lossless<scalar_t>(x_codes, w, coef, pl, y);
    else mvm_quantized<scalar_t>(x_codes, w, coef, pl, amx_lossless ? *amx_lossless : choose_isa(pl), y);
  });
  return y;
}

// ------------------------------------------------------------------ xbar_coef_grad
// G[r, n] = sum_m gy[m, n] * T_int[r, m, n] (float64), without materialising T_int.
at::Tensor xbar_coef_grad_cpu(const at::Tensor& x_codes, const at::Tensor& w_codes, const at::Tensor& gy, int64_t rows,
                              int64_t cols, int64_t input_bits, bool input_signed, int64_t dac_bits, int64_t weight_bits,
                              int64_t cell_bits, int64_t adc_levels, int64_t adc_clip) {
  Plan pl = checked_plan(x_codes, w_codes, rows, cols, input_bits, input_signed, dac_bits, weight_bits, cell_bits,
                         adc_levels, adc_clip);
  const int64_t M = pl.p.M, N = pl.p.N, Tr = pl.p.Tr();
  TORCH_CHECK(gy.dim() == 2 && gy.size(0) == M && gy.size(1) == N, "xbar_coef_grad: gy must be [M, N] = [", M, ", ",
              N, "], got ", gy.sizes());
  TORCH_CHECK(gy.is_floating_point(), "xbar_coef_grad: gy must be floating point, got ", gy.scalar_type());
  const int64_t g_size = mul_checked(Tr, N, "xbar_coef_grad: the output [Tr, N]");
  const at::Tensor g64 = gy.to(at::kDouble).contiguous();
  const Isa* amx_lossless = pl.lossless ? lossless_on_amx(pl) : nullptr;
  if (pl.lossless && !amx_lossless) {
    // sum_m gy[m, n] sum_{k in r} x[m, k] w[k, n] = sum_{k in r} w[k, n] (X^T gy)[k, n]
    check_codes(x_codes, w_codes, pl, "w_codes");
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
  std::vector<WeightSet> sets;
  sets.push_back(weight_set<float>(w_codes, at::Tensor(), pl, isa, "w_codes"));
  const double* g = g64.data_ptr<double>();
  // One partial G per thread, summed at the end.
  std::vector<std::vector<double>> part((size_t)at::get_num_threads(), std::vector<double>((size_t)g_size, 0.0));
  run_quantized(codes_view(x_codes), pl, isa, sets,
                [&](int, int64_t r, int64_t n0, int64_t m0, int64_t nm, const int64_t* t) {
                  double* gr = part[(size_t)at::get_thread_num()].data() + r * N + n0;
                  const int64_t nl = std::min(L, N - n0);
                  for (int64_t mi = 0; mi < nm; ++mi) {
                    const double* gm = g + (m0 + mi) * N + n0;
                    const int64_t* tr = t + mi * L;
                    for (int64_t l = 0; l < nl; ++l) gr[l] += gm[l] * (double)tr[l];
                  }
                },
                [](int64_t, int64_t) {});
  at::Tensor out = at::zeros({Tr, N}, g64.options());
  double* o = out.data_ptr<double>();
  for (const auto& pt : part)
    for (int64_t i = 0; i < g_size; ++i) o[i] += pt[(size_t)i];
  return out;
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(xma2_ops, CPU, m) {
  m.impl("xbar_tile_sums", &cpu::xbar_tile_sums_cpu);
  m.impl("xbar_mvm", &cpu::xbar_mvm_cpu);
  m.impl("xbar_coef_grad", &cpu::xbar_coef_grad_cpu);
  m.impl("xbar_unfold_codes", &cpu::xbar_unfold_codes_cpu);
  // The device model (SPEC 7.2): cells.cpp.
  m.impl("xbar_cell_tile_sums", &cpu::xbar_cell_tile_sums_cpu);
  m.impl("xbar_cell_mvm", &cpu::xbar_cell_mvm_cpu);
  m.impl("xbar_cell_coef_grad", &cpu::xbar_cell_coef_grad_cpu);
}

}  // namespace xma2
