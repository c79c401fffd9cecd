// The one summation order of every CPU coefficient gradient (the pe_mask / col_scale gradients,
// docs/SPEC.md 5): G[r, n] = sum_m gy[m, n] T_int[r, m, n] is summed as
//
//   S_b[r, n] = sum over the rows m of block b (kGradRows rows), in ascending m, of gy[m, n] * T_int[r, m, n]
//   G[r, n]   = sum over the blocks b, in ascending b, of S_b[r, n]
//
// each product and each sum rounded to float64 (no fused multiply-add).  Every path (instruction
// set, lossless GEMM or quantised, packed or not, device cells) hands its T_int to a CoefGradSum, so
// G does not depend on the path, the thread count or which thread ran which rows.
// (python_tests/helpers.py: ordered_coef_grad is this order in PyTorch.)
#pragma once
#include <ATen/ATen.h>

#include <vector>

namespace xma2 {
namespace cpu {

constexpr int64_t kGradRows = 128;  // input rows per block of the sum (a multiple of every path's work item)

class CoefGradSum {
 public:
  // gy: contiguous float64 [M, N], kept alive by the caller.
  CoefGradSum(const double* gy, int64_t M, int64_t Tr, int64_t N, const char* op);
  // Adds T_int[r, m0 : m0 + nm, n0 : n0 + nl] = t[mi * ldt + l].  m0 is a multiple of kGradRows and the
  // rows are whole blocks (or end at M); each (block, r, column) comes in one call.  Calls for different
  // blocks or columns may run on different threads at once.
  void add(int64_t r, int64_t n0, int64_t nl, int64_t m0, int64_t nm, const int64_t* t, int64_t ldt);
  void add(int64_t r, int64_t n0, int64_t nl, int64_t m0, int64_t nm, const float* t, int64_t ldt);
  void add(int64_t r, int64_t n0, int64_t nl, int64_t m0, int64_t nm, const double* t, int64_t ldt);
  // G [Tr, N] float64: the block sums added in block order.
  at::Tensor result() const;

 private:
  template <typename T>
  void add_t(int64_t r, int64_t n0, int64_t nl, int64_t m0, int64_t nm, const T* t, int64_t ldt);
  const double* gy_;
  int64_t M_, Tr_, N_;
  const char* op_;
  std::vector<double> slots_;  // S_b: [blocks][Tr][N]
};

}  // namespace cpu
}  // namespace xma2
