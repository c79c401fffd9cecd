// CPU kernels of the crossbar GEMM (docs/SPEC.md section 3).
//
// Inputs and weights are split into binary bit planes packed along K, 64 rows per word,
// per row tile.  A partial sum of input chunk i and weight slice j is then
//   P = sum_{a in chunk i, b in slice j} 2^(a - i*db + b - j*cb) * popcount(X_a & W_b),
// exact, and goes through the ADC before the shift-and-add.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "../xbar_quant.h"

namespace xma2 {
namespace {

constexpr int kMaxXBits = 16;  // input magnitude bits per polarity
constexpr int kMaxWBits = 15;  // weight magnitude bits per polarity

// Packed bit planes: plane(idx, r, pol, bit) is `words` uint64 covering rows r*R .. r*R+R-1.
struct BitPlanes {
  std::vector<uint64_t> data;
  int64_t tiles, pols, bits, words;
  const uint64_t* plane(int64_t idx, int64_t r, int64_t pol, int64_t bit) const {
    return data.data() + (((idx * tiles + r) * pols + pol) * bits + bit) * words;
  }
};

// codes: element (idx, k) at codes[idx * sidx + k * sk]; polarity 0 = max(v,0), 1 = max(-v,0).
BitPlanes pack_planes(const int32_t* codes, int64_t count, int64_t K, int64_t sidx, int64_t sk,
                      int rows, int pols, int bits) {
  BitPlanes bp;
  bp.tiles = (K + rows - 1) / rows;
  bp.pols = pols;
  bp.bits = bits;
  bp.words = (rows + 63) / 64;
  bp.data.assign((size_t)(count * bp.tiles * pols * bits * bp.words), 0);
  at::parallel_for(0, count, 16, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      for (int64_t k = 0; k < K; ++k) {
        const int32_t v = codes[idx * sidx + k * sk];
        if (v == 0) continue;
        const int pol = v > 0 ? 0 : 1;
        if (pol >= pols) continue;  // unsigned inputs: negative codes cannot occur (checked)
        const uint32_t mag = (uint32_t)(v > 0 ? v : -v);
        const int64_t r = k / rows, kk = k % rows;
        uint64_t* base = bp.data.data() + ((idx * bp.tiles + r) * pols + pol) * bits * bp.words;
        for (int b = 0; b < bits; ++b)
          if ((mag >> b) & 1u) base[b * bp.words + kk / 64] |= (uint64_t)1 << (kk % 64);
      }
    }
  });
  return bp;
}

// T_int of one (m, n, row tile): every (input polarity, weight polarity, chunk, slice)
// partial sum from bit-plane popcounts, each through the ADC, then shift-and-add.
int64_t tile_sum(const BitPlanes& xp, int64_t m, const BitPlanes& wp, int64_t n, int64_t r,
                 const XbarParams& p) {
  const int words = (int)xp.words;
  const int db = p.dac_bits, cb = p.cell_bits;
  const int I = p.chunks(), S = p.slices();
  int64_t total = 0;
  int64_t pc[kMaxXBits][kMaxWBits];
  for (int px = 0; px < p.x_pols; ++px) {
    for (int qw = 0; qw < 2; ++qw) {
      for (int a = 0; a < p.x_bits; ++a) {
        const uint64_t* xa = xp.plane(m, r, px, a);
        for (int b = 0; b < p.w_bits; ++b) {
          const uint64_t* wb = wp.plane(n, r, qw, b);
          int64_t c = 0;
          for (int w = 0; w < words; ++w) c += __builtin_popcountll(xa[w] & wb[w]);
          pc[a][b] = c;
        }
      }
      const int64_t sign = (px == qw) ? 1 : -1;
      for (int i = 0; i < I; ++i) {
        const int a1 = std::min((i + 1) * db, p.x_bits);
        for (int j = 0; j < S; ++j) {
          const int b1 = std::min((j + 1) * cb, p.w_bits);
          int64_t partial = 0;
          for (int a = i * db; a < a1; ++a)
            for (int b = j * cb; b < b1; ++b) partial += pc[a][b] << ((a - i * db) + (b - j * cb));
          total += sign * (adc_code(partial, p.adc_levels, p.adc_clip) << (i * db + j * cb));
        }
      }
    }
  }
  return total;
}

XbarParams make_params(const at::Tensor& x, const at::Tensor& w, int64_t rows, int64_t cols, int64_t input_bits,
                       bool input_signed, int64_t dac_bits, int64_t weight_bits, int64_t cell_bits,
                       int64_t adc_levels, int64_t adc_clip) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "xbar: x_codes must be [M, K] and w_codes [K, N], got ",
              x.sizes(), " and ", w.sizes());
  TORCH_CHECK(x.scalar_type() == at::kInt && w.scalar_type() == at::kInt,
              "xbar: x_codes and w_codes must be int32, got ", x.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK(x.size(1) == w.size(0), "xbar: x_codes has K=", x.size(1), " but w_codes has K=", w.size(0));
  TORCH_CHECK(rows >= 1 && cols >= 1, "xbar: rows and cols must be >= 1, got ", rows, ", ", cols);
  const int x_bits = (int)(input_signed ? input_bits - 1 : input_bits);
  TORCH_CHECK(x_bits >= 1 && x_bits <= kMaxXBits, "xbar: input_bits out of range: ", input_bits);
  TORCH_CHECK(weight_bits >= 2 && weight_bits - 1 <= kMaxWBits, "xbar: weight_bits out of range: ", weight_bits);
  TORCH_CHECK(dac_bits >= 1 && dac_bits <= 8 && cell_bits >= 1 && cell_bits <= 8,
              "xbar: dac_bits and cell_bits must be in [1, 8], got ", dac_bits, ", ", cell_bits);
  TORCH_CHECK(adc_levels >= 0 && adc_clip >= 1, "xbar: adc_levels must be >= 0 and adc_clip >= 1, got ",
              adc_levels, ", ", adc_clip);
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

BitPlanes pack_inputs(const at::Tensor& x, const XbarParams& p) {
  const int64_t q = (1LL << p.x_bits) - 1;
  check_code_range(x, p.x_pols == 2 ? -q : 0, q, "x_codes");
  return pack_planes(x.data_ptr<int32_t>(), p.M, p.K, x.stride(0), x.stride(1), p.rows, p.x_pols, p.x_bits);
}

BitPlanes pack_weights(const at::Tensor& w, const XbarParams& p) {
  const int64_t q = (1LL << p.w_bits) - 1;
  check_code_range(w, -q, q, "w_codes");
  return pack_planes(w.data_ptr<int32_t>(), p.N, p.K, w.stride(1), w.stride(0), p.rows, 2, p.w_bits);
}

at::Tensor xbar_tile_sums_cpu(const at::Tensor& x_codes, const at::Tensor& w_codes, int64_t rows, int64_t cols,
                              int64_t input_bits, bool input_signed, int64_t dac_bits, int64_t weight_bits,
                              int64_t cell_bits, int64_t adc_levels, int64_t adc_clip) {
  const XbarParams p = make_params(x_codes, w_codes, rows, cols, input_bits, input_signed, dac_bits, weight_bits,
                                   cell_bits, adc_levels, adc_clip);
  const BitPlanes xp = pack_inputs(x_codes, p), wp = pack_weights(w_codes, p);
  at::Tensor out = at::zeros({p.Tr(), p.M, p.N}, x_codes.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, p.M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = 0; r < p.Tr(); ++r)
      for (int64_t m = begin; m < end; ++m)
        for (int64_t n = 0; n < p.N; ++n) o[(r * p.M + m) * p.N + n] = tile_sum(xp, m, wp, n, r, p);
  });
  return out;
}

template <typename scalar_t>
void mvm_kernel(const BitPlanes& xp, const BitPlanes& wbp, const BitPlanes* wtp, const at::Tensor& coef_b,
                const at::Tensor& coef_t, const XbarParams& p, at::Tensor& y) {
  const int64_t M = p.M, N = p.N, Tr = p.Tr(), Tc = p.Tc();
  // Which PEs are needed: a PE whose coefficients are all zero cannot change the result.
  auto pe_active = [&](const at::Tensor& coef) {
    std::vector<char> act((size_t)(Tr * Tc), 0);
    if (!coef.defined()) return act;
    const scalar_t* c = coef.data_ptr<scalar_t>();
    for (int64_t r = 0; r < Tr; ++r)
      for (int64_t n = 0; n < N; ++n)
        if (c[r * N + n] != scalar_t(0)) act[r * Tc + n / p.cols] = 1;
    return act;
  };
  const std::vector<char> act_b = pe_active(coef_b), act_t = pe_active(coef_t);
  const scalar_t* cb = coef_b.data_ptr<scalar_t>();
  const scalar_t* ct = coef_t.defined() ? coef_t.data_ptr<scalar_t>() : nullptr;
  scalar_t* out = y.data_ptr<scalar_t>();
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    std::vector<double> acc((size_t)N);
    for (int64_t m = begin; m < end; ++m) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t r = 0; r < Tr; ++r) {
        for (int64_t n = 0; n < N; ++n) {
          const int64_t pe = r * Tc + n / p.cols;
          if (act_b[pe]) acc[n] += (double)cb[r * N + n] * (double)tile_sum(xp, m, wbp, n, r, p);
          if (act_t[pe]) acc[n] += (double)ct[r * N + n] * (double)tile_sum(xp, m, *wtp, n, r, p);
        }
      }
      for (int64_t n = 0; n < N; ++n) out[m * N + n] = (scalar_t)acc[n];
    }
  });
}

at::Tensor xbar_mvm_cpu(const at::Tensor& x_codes, const at::Tensor& wb_codes, const std::optional<at::Tensor>& wt_codes,
                        const at::Tensor& coef_b, const std::optional<at::Tensor>& coef_t, int64_t rows, int64_t cols,
                        int64_t input_bits, bool input_signed, int64_t dac_bits, int64_t weight_bits, int64_t cell_bits,
                        int64_t adc_levels, int64_t adc_clip) {
  const XbarParams p = make_params(x_codes, wb_codes, rows, cols, input_bits, input_signed, dac_bits, weight_bits,
                                   cell_bits, adc_levels, adc_clip);
  TORCH_CHECK(wt_codes.has_value() == coef_t.has_value(), "xbar_mvm: wt_codes and coef_t must be given together");
  TORCH_CHECK(coef_b.scalar_type() == at::kFloat || coef_b.scalar_type() == at::kDouble,
              "xbar_mvm: coef_b must be float32 or float64, got ", coef_b.scalar_type());
  TORCH_CHECK(coef_b.dim() == 2 && coef_b.size(0) == p.Tr() && coef_b.size(1) == p.N,
              "xbar_mvm: coef_b must be [Tr, N] = [", p.Tr(), ", ", p.N, "], got ", coef_b.sizes());
  const at::Tensor cbc = coef_b.contiguous();
  at::Tensor ctc;
  if (coef_t.has_value()) {
    TORCH_CHECK(wt_codes->sizes() == wb_codes.sizes() && wt_codes->scalar_type() == at::kInt,
                "xbar_mvm: wt_codes must be int32 of shape ", wb_codes.sizes(), ", got ", wt_codes->sizes());
    TORCH_CHECK(coef_t->sizes() == coef_b.sizes() && coef_t->scalar_type() == coef_b.scalar_type(),
                "xbar_mvm: coef_t must match coef_b in shape and dtype");
    ctc = coef_t->contiguous();
  }
  const BitPlanes xp = pack_inputs(x_codes, p), wbp = pack_weights(wb_codes, p);
  BitPlanes wtp;
  if (coef_t.has_value()) wtp = pack_weights(*wt_codes, p);
  at::Tensor y = at::empty({p.M, p.N}, coef_b.options());
  AT_DISPATCH_FLOATING_TYPES(coef_b.scalar_type(), "xbar_mvm_cpu", [&] {
    mvm_kernel<scalar_t>(xp, wbp, coef_t.has_value() ? &wtp : nullptr, cbc, ctc, p, y);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(xma2_ops, CPU, m) {
  m.impl("xbar_tile_sums", &xbar_tile_sums_cpu);
  m.impl("xbar_mvm", &xbar_mvm_cpu);
}

}  // namespace xma2
