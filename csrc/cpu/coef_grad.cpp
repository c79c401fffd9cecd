// The ordered sum of the coefficient gradients (coef_grad.h).
#include "coef_grad.h"

#include "../xbar_check.h"

// Each product and sum rounded on its own (the documented order, reproduced in PyTorch by the tests):
// no contraction into fused multiply-adds, even in a build for a CPU that has them.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace xma2 {
namespace cpu {

CoefGradSum::CoefGradSum(const double* gy, int64_t M, int64_t Tr, int64_t N, const char* op)
    : gy_(gy), M_(M), Tr_(Tr), N_(N), op_(op) {
  const int64_t blocks = (M + kGradRows - 1) / kGradRows;
  slots_.assign((size_t)mul_checked(blocks, mul_checked(Tr, N, op), op), 0.0);
}

template <typename T>
void CoefGradSum::add_t(int64_t r, int64_t n0, int64_t nl, int64_t m0, int64_t nm, const T* t, int64_t ldt) {
  TORCH_CHECK(m0 % kGradRows == 0 && (nm % kGradRows == 0 || m0 + nm == M_), op_,
              ": internal error, rows not in whole gradient blocks (", m0, ", ", nm, ")");
  for (int64_t mi = 0; mi < nm; ++mi) {
    const int64_t m = m0 + mi;
    double* s = slots_.data() + ((m / kGradRows) * Tr_ + r) * N_ + n0;
    const double* g = gy_ + m * N_ + n0;
    const T* tm = t + mi * ldt;
    for (int64_t l = 0; l < nl; ++l) s[l] += g[l] * (double)tm[l];
  }
}

void CoefGradSum::add(int64_t r, int64_t n0, int64_t nl, int64_t m0, int64_t nm, const int64_t* t, int64_t ldt) {
  add_t(r, n0, nl, m0, nm, t, ldt);
}
void CoefGradSum::add(int64_t r, int64_t n0, int64_t nl, int64_t m0, int64_t nm, const float* t, int64_t ldt) {
  add_t(r, n0, nl, m0, nm, t, ldt);
}
void CoefGradSum::add(int64_t r, int64_t n0, int64_t nl, int64_t m0, int64_t nm, const double* t, int64_t ldt) {
  add_t(r, n0, nl, m0, nm, t, ldt);
}

at::Tensor CoefGradSum::result() const {
  at::Tensor out = at::zeros({Tr_, N_}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  const int64_t size = Tr_ * N_;
  for (size_t b = 0; b * (size_t)size < slots_.size(); ++b) {
    const double* s = slots_.data() + b * (size_t)size;
    for (int64_t i = 0; i < size; ++i) o[i] += s[i];
  }
  return out;
}

}  // namespace cpu
}  // namespace xma2
