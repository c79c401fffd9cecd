// Packing of codes into the layouts of the instruction-set kernels (isa.h): input rows per row
// block; weights once per programmed weight (xbar_pack_weights, kept by the Python ProgrammedWeight
// next to the codes it was made from) or, when no packed form is given, once per call.  The C++
// kernel keeps no cache, so a write through `.data` or a reused storage can never go unseen.
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
struct WeightGeometry {
  int64_t blocks = 0;     // ceil(N / lanes)
  int64_t per_block = 0;  // words per (tile, lane block)
  int64_t words = 0;      // Tr * blocks * per_block
};
WeightGeometry weight_geometry(const Plan& pl, const Isa& isa);

// The packed weights a call reads: `words` points into `owned` (packed for this call) or into a
// packed tensor that the caller keeps alive (packed once, when the weight was programmed).
struct WeightPlanes {
  WeightPlanes() = default;
  WeightPlanes(const WeightPlanes&) = delete;  // `words` may point into `owned`: moves only
  WeightPlanes& operator=(const WeightPlanes&) = delete;
  WeightPlanes(WeightPlanes&&) = default;
  WeightPlanes& operator=(WeightPlanes&&) = default;
  WeightGeometry g;
  const uint32_t* words = nullptr;
  std::vector<uint32_t> owned;
  const uint32_t* at(int64_t r, int64_t nb) const { return words + (r * g.blocks + nb) * g.per_block; }
};

// w: contiguous int32 codes [K, N] -> dst (weight_geometry(pl, isa).words words, overwritten).
// Refuses codes outside [-Qw, Qw] (RuntimeError naming `name`).
void pack_weights(const int32_t* w, const Plan& pl, const Isa& isa, const char* name, uint32_t* dst);

// The ISA's layout of input rows [m0, m0 + nm) -> dst, isa.row_words(pl) words per row; `mags` is
// the caller's scratch.  Codes outside the input range set `bad` (reported by the caller).
void pack_input_rows(const CodesView& x, const Plan& pl, const Isa& isa, int64_t m0, int64_t nm,
                     std::vector<uint16_t>& mags, uint32_t* dst, std::atomic<bool>& bad);

}  // namespace cpu
}  // namespace xma2
