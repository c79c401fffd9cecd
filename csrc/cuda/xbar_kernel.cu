// CUDA kernels of the crossbar GEMM (docs/SPEC.md section 3).  No torch headers: this file
// compile-checks with plain `nvcc -c` (scripts/check_cuda_compile.sh).
//
// One block of 16 x 16 threads owns a 16 x 16 output block, one output per thread.  For each row
// tile and each (input polarity, weight polarity, DAC chunk, cell slice) the block stages K in
// steps of 64 rows through shared memory: every thread extracts its polarity/field from four
// consecutive codes and packs them as bytes, so the partial sum is a chain of unsigned __dp4a
// (exact: fields < 2^8, P <= rows * 255 * 255 < 2^32 for rows <= kCudaMaxRows).  The ADC and
// the shift-and-add run in registers in int64.  Codes are re-read (from L2) per partial sum.
//
// Lossless configs (XbarParams::adc_identity: ideal ADC, or adc_levels == adc_clip >= Pmax) need no slicing:
// T_int = sum_k x_int * w_int, computed directly from the int32 codes.
#include "xbar_kernel.h"

namespace xma2 {
namespace {

constexpr int kTile = 16;         // output block kTile x kTile, one thread per output
constexpr int kStepK = 64;        // rows of K staged per step
constexpr int kWords = kStepK / 4;  // packed bytes: four K rows per 32-bit word
static_assert(kWords == kTile, "one packed word per thread and step");

struct Smem {
  uint32_t xq[kTile][kWords];      // packed input fields   [m][k/4]
  uint32_t wq[kWords][kTile];      // packed weight fields  [k/4][n]
  int32_t xi[kTile][kStepK];       // raw codes, lossless path
  int32_t wi[kStepK][kTile + 1];   // +1: no bank conflicts when writing rows
};


// Field `index` of the polarity max(sign * v, 0) of a signed code.
__device__ __forceinline__ uint32_t field(int32_t v, int sign, int index, int width) {
  const int32_t pol = sign * v;
  return pol > 0 ? (uint32_t)bit_field(pol, index, width) : 0u;
}

// T_int of row tile [k0, k1) for output (m0 + threadIdx.y, n0 + threadIdx.x); every thread of
// the block must call it (it synchronises).  Out-of-range rows and columns read zeros.
__device__ int64_t row_tile_sum(const int32_t* __restrict__ x, const int32_t* __restrict__ w, const XbarParams& p,
                                bool lossless, int64_t m0, int64_t n0, int64_t k0, int64_t k1, Smem& sm) {
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * kTile + tx;
  int64_t t = 0;
  if (lossless) {
    for (int64_t kb = k0; kb < k1; kb += kStepK) {
      __syncthreads();
      for (int e = tid; e < kTile * kStepK; e += kTile * kTile) {
        const int row = e / kStepK, col = e % kStepK;  // x: coalesced along k
        const int64_t m = m0 + row, k = kb + col;
        sm.xi[row][col] = (m < p.M && k < k1) ? x[m * p.K + k] : 0;
        const int wr = e / kTile, wc = e % kTile;  // w: coalesced along n
        const int64_t kw = kb + wr, n = n0 + wc;
        sm.wi[wr][wc] = (kw < k1 && n < p.N) ? w[kw * p.N + n] : 0;
      }
      __syncthreads();
#pragma unroll 16
      for (int kk = 0; kk < kStepK; ++kk) t += (int64_t)(sm.xi[ty][kk] * sm.wi[kk][tx]);  // |product| < 2^31
    }
    return t;
  }
  const int I = p.chunks(), S = p.slices();
  const int64_t m = m0 + ty, n = n0 + tx;
  for (int px = 0; px < p.x_pols; ++px) {
    const int sx = 1 - 2 * px;
    for (int qw = 0; qw < 2; ++qw) {
      const int sw = 1 - 2 * qw;
      for (int i = 0; i < I; ++i) {
        for (int j = 0; j < S; ++j) {
          uint32_t psum = 0;
          for (int64_t kb = k0; kb < k1; kb += kStepK) {
            __syncthreads();
            uint32_t xw = 0, ww = 0;
            for (int b = 0; b < 4; ++b) {
              const int64_t kx = kb + 4 * tx + b;  // thread (ty, tx) packs x[m0+ty, 4tx..4tx+3]
              if (m < p.M && kx < k1) xw |= field(x[m * p.K + kx], sx, i, p.dac_bits) << (8 * b);
              const int64_t kw = kb + 4 * ty + b;  // and w[4ty..4ty+3, n0+tx]
              if (kw < k1 && n < p.N) ww |= field(w[kw * p.N + n], sw, j, p.cell_bits) << (8 * b);
            }
            sm.xq[ty][tx] = xw;
            sm.wq[ty][tx] = ww;
            __syncthreads();
#pragma unroll
            for (int kw = 0; kw < kWords; ++kw) psum = __dp4a(sm.xq[ty][kw], sm.wq[kw][tx], psum);
          }
          const int64_t code = adc_code((int64_t)psum, p.adc_levels, p.adc_clip);
          t += (int64_t)(sx * sw) * (code << (i * p.dac_bits + j * p.cell_bits));
        }
      }
    }
  }
  return t;
}

__global__ void __launch_bounds__(kTile * kTile)
tile_sums_kernel(const int32_t* __restrict__ x, const int32_t* __restrict__ w, int64_t* __restrict__ out,
                 XbarParams p, bool lossless) {
  __shared__ Smem sm;
  const int64_t m0 = (int64_t)blockIdx.x * kTile, n0 = (int64_t)blockIdx.y * kTile;
  const int64_t m = m0 + threadIdx.y, n = n0 + threadIdx.x;
  for (int64_t r = 0; r < p.Tr(); ++r) {
    const int64_t k0 = r * p.rows, k1 = k0 + p.rows < p.K ? k0 + p.rows : p.K;
    const int64_t t = row_tile_sum(x, w, p, lossless, m0, n0, k0, k1, sm);
    if (m < p.M && n < p.N) out[(r * p.M + m) * p.N + n] = t;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kTile * kTile)
mvm_kernel(const int32_t* __restrict__ x, const int32_t* __restrict__ wb, const int32_t* __restrict__ wt,
           const scalar_t* __restrict__ coef_b, const scalar_t* __restrict__ coef_t, scalar_t* __restrict__ y,
           XbarParams p, bool lossless) {
  __shared__ Smem sm;
  const int64_t m0 = (int64_t)blockIdx.x * kTile, n0 = (int64_t)blockIdx.y * kTile;
  const int64_t m = m0 + threadIdx.y, n = n0 + threadIdx.x;
  double acc = 0.0;
  for (int64_t r = 0; r < p.Tr(); ++r) {
    const int64_t k0 = r * p.rows, k1 = k0 + p.rows < p.K ? k0 + p.rows : p.K;
    for (int path = 0; path < 2; ++path) {
      const scalar_t* coef = path == 0 ? coef_b : coef_t;
      if (coef == nullptr) continue;  // uniform across the block
      const double c = n < p.N ? (double)coef[r * p.N + n] : 0.0;
      // A PE whose coefficients are all zero cannot change y: skip it (here per output block).
      if (!__syncthreads_or(c != 0.0)) continue;
      const int64_t t = row_tile_sum(x, path == 0 ? wb : wt, p, lossless, m0, n0, k0, k1, sm);
      acc += c * (double)t;
    }
  }
  if (m < p.M && n < p.N) y[m * p.N + n] = (scalar_t)acc;
}

bool grid_for(const XbarParams& p, dim3& grid) {
  const int64_t gm = (p.M + kTile - 1) / kTile, gn = (p.N + kTile - 1) / kTile;
  if (gm > 0x7fffffff || gn > 65535) return false;
  grid = dim3((unsigned)gm, (unsigned)gn);
  return true;
}

template <typename scalar_t>
cudaError_t mvm_launch(const int32_t* x, const int32_t* wb, const int32_t* wt, const scalar_t* coef_b,
                       const scalar_t* coef_t, scalar_t* y, const XbarParams& p, cudaStream_t stream) {
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  if (p.rows > kCudaMaxRows) return cudaErrorInvalidValue;
  dim3 grid;
  if (!grid_for(p, grid)) return cudaErrorInvalidConfiguration;
  mvm_kernel<scalar_t><<<grid, dim3(kTile, kTile), 0, stream>>>(x, wb, wt, coef_b, coef_t, y, p, p.adc_identity());
  return cudaGetLastError();
}

}  // namespace

cudaError_t xbar_tile_sums_launch(const int32_t* x, const int32_t* w, int64_t* out, const XbarParams& p,
                                  cudaStream_t stream) {
  if (p.M == 0 || p.N == 0 || p.K == 0) return cudaSuccess;
  if (p.rows > kCudaMaxRows) return cudaErrorInvalidValue;
  dim3 grid;
  if (!grid_for(p, grid)) return cudaErrorInvalidConfiguration;
  tile_sums_kernel<<<grid, dim3(kTile, kTile), 0, stream>>>(x, w, out, p, p.adc_identity());
  return cudaGetLastError();
}

cudaError_t xbar_mvm_launch(const int32_t* x, const int32_t* wb, const int32_t* wt, const float* coef_b,
                            const float* coef_t, float* y, const XbarParams& p, cudaStream_t stream) {
  return mvm_launch<float>(x, wb, wt, coef_b, coef_t, y, p, stream);
}

cudaError_t xbar_mvm_launch(const int32_t* x, const int32_t* wb, const int32_t* wt, const double* coef_b,
                            const double* coef_t, double* y, const XbarParams& p, cudaStream_t stream) {
  return mvm_launch<double>(x, wb, wt, coef_b, coef_t, y, p, stream);
}

}  // namespace xma2
