// The quantised CPU driver: which instruction set runs a call, and the loop over row blocks, row
// tiles, weight sets and lane blocks that calls it (docs/CPU_KERNEL.md).
#pragma once
#include <stdint.h>

#include <functional>
#include <string>
#include <vector>

#include "pack.h"

namespace xma2 {
namespace cpu {

// This CPU (and build) runs the named instruction set: scalar, avx2, avx512, amx.
bool cpu_runs(const std::string& name);

// The kernel for this call: XMA2_CPU_ISA when set (an error if this CPU cannot run it), else the
// fastest this CPU runs.  Configs whose sums do not fit the vector lanes always use the scalar
// code; AMX falls back to AVX-512 for cell_bits 8 (slices beyond int8) and for any periphery (SPEC 8).
const Isa& choose_isa(const Plan& pl);

// A lossless config on AMX: returns the AMX kernel and rewrites the plan to one chunk, one slice and
// the identity ADC, or nullptr (then the float-GEMM path runs).
const Isa* lossless_on_amx(Plan& pl);

// One weight set (backbone or task weights) and which (tile, lane block) pairs are needed.
struct WeightSet {
  WeightPlanes planes;
  std::vector<char> active;  // [Tr * blocks]
};

// Per (set, tile r, lane block n0), T[mi * L + lane] = T_int[r, m0 + mi, n0 + lane] (lanes past N
// hold zeros).
using TileEpilogue = std::function<void(int set, int64_t r, int64_t n0, int64_t m0, int64_t nm, const int64_t* t)>;
using BlockDone = std::function<void(int64_t m0, int64_t nm, int64_t n0, int64_t n1)>;

// Into how many groups of output columns each of `row_blocks` row blocks is split so that every
// thread has work: 1 with at least 4 row blocks per thread (or nothing to split), else up to
// `column_units` (the smallest column ranges the caller hands out).
int64_t column_groups(int64_t row_blocks, int64_t column_units);

// The one parallel loop of the CPU kernels (run_quantized below, the GEMM route of ops_cpu.cpp, the device
// cells of cells.cpp): work items of `block` input rows [m0, m0 + nm) and a range [u0, u1) of `units` column
// units, handed out one at a time rather than in equal shares (on a machine shared with other processes a
// thread whose core is busy then takes fewer items instead of stalling all; one parallel region per call,
// nothing nested).  Each row block is split into column_groups(row blocks, ceil(units / min_units)) groups
// of ceil(units / groups) units; an item with an empty range is skipped, except with units == 0 (each row
// block then comes once, with u0 = u1 = 0).  `worker` < at::get_num_threads() is the item's thread, for
// per-thread scratch.
using ItemBody = std::function<void(int64_t worker, int64_t m0, int64_t nm, int64_t u0, int64_t u1)>;
void parallel_items(int64_t M, int64_t block, int64_t units, int64_t min_units, const ItemBody& body);

// Calls epi for every needed (tile, set, lane block) of each work item -- a block of kRowBlock input
// rows and a range of lane blocks (output columns [n0, n1)) -- in this order: row tile outer, then
// the weight sets in order, then lane blocks (so every output element sees its terms in the order row
// tile, base set, task set); then done(m0, nm, n0, n1) on the same thread.  Work items run in
// parallel; one output element belongs to one item.  Refuses input codes outside the range.
void run_quantized(const CodesView& x, const Plan& pl, const Isa& isa, const std::vector<WeightSet>& sets,
                   const TileEpilogue& epi, const BlockDone& done);

}  // namespace cpu
}  // namespace xma2
