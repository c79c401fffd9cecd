// The AVX-512 bit-plane kernel (F/BW/VL/DQ + VPOPCNTDQ): 16 output columns per register, and the
// byte gather of the im2col op.  Compiled for AVX-512 by a target pragma; driver.cpp picks it only
// where the CPU runs it.
#if defined(__x86_64__)
#include <immintrin.h>

#include <algorithm>

#include "isa.h"

namespace xma2 {
namespace cpu {
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vpopcntdq,avx2,fma,popcnt"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vpopcntdq,avx2,fma,popcnt")
#endif
namespace {
namespace avx512 {
#include "vec_avx512.h"
#include "xbar_cpu_block.h"
}  // namespace avx512
}  // namespace

const Isa kAvx512{"avx512", 16, false, &avx512::row_words, &avx512::row_planes, &avx512::block_tile_sums};

// One im2col row of 1-byte codes: dst[k] = src[off[k]], 16 at a time (dword gathers at byte
// offsets, low bytes kept).  The caller guarantees src[off[k] + 3] is inside the tensor.
void gather_bytes_avx512(const uint8_t* src, const int32_t* off, int64_t K, uint8_t* dst) {
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
    const __m512i idx = _mm512_maskz_loadu_epi32(m, off + k);
    const __m512i g = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, idx, src, 1);
    _mm_mask_storeu_epi8(dst + k, m, _mm512_cvtepi32_epi8(g));
  }
}
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

}  // namespace cpu
}  // namespace xma2
#endif  // __x86_64__
