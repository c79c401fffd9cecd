// Packing of codes into the layouts of the instruction-set kernels (isa.h): input rows per row
// block, weights once per call (layers will own their programmed state on the Python side; the C++
// kernel keeps no cache, so a write through `.data` or a reused storage can never go unseen).
#pragma once
#include <stdint.h>

#include <atomic>
#include <vector>

#include "isa.h"

namespace xma2 {
namespace cpu {

// x_codes [M, K] of one integer dtype, strides in elements (any strides).
enum class CodeType { kU8, kI8, kI16, kI32 };
struct CodesView {
  const void* data;
  CodeType type;
  int64_t s0, s1;
};

// Weights for `lanes` columns per block, per (row tile, lane block) `per_block` words: bit planes
// [pol][bit][word][lane], or the AMX bytes [pol * S + slice][kstep][k / 4 % 16][column][k % 4].
struct WeightPlanes {
  std::vector<uint32_t> data;
  int64_t blocks = 0;     // ceil(N / lanes)
  int64_t per_block = 0;  // words per (tile, lane block)
  const uint32_t* at(int64_t r, int64_t nb) const { return data.data() + (r * blocks + nb) * per_block; }
};

// w: contiguous int32 codes [K, N].  Refuses codes outside [-Qw, Qw] (RuntimeError naming `name`).
WeightPlanes pack_weights(const int32_t* w, const Plan& pl, const Isa& isa, const char* name);

// The ISA's layout of input rows [m0, m0 + nm) -> dst, isa.row_words(pl) words per row; `mags` is
// the caller's scratch.  Codes outside the input range set `bad` (reported by the caller).
void pack_input_rows(const CodesView& x, const Plan& pl, const Isa& isa, int64_t m0, int64_t nm,
                     std::vector<uint16_t>& mags, uint32_t* dst, std::atomic<bool>& bad);

}  // namespace cpu
}  // namespace xma2
