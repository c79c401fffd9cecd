// Choice of the instruction set, and the parallel loop of the quantised path (driver.h).
#include "driver.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>

namespace xma2 {
namespace cpu {

bool cpu_runs(const std::string& name) {
#if defined(__x86_64__)
  if (name == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt");
  if (name == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vpopcntdq") && cpu_runs("avx2");
#if defined(XMA2_CPU_AMX)
  if (name == "amx") return cpu_runs("avx512") && amx_usable();
#endif
#endif
  return name == "scalar";
}

namespace {
std::string wanted_isa() {
  const char* env = std::getenv("XMA2_CPU_ISA");
  return env ? env : "";
}
}  // namespace

const Isa& choose_isa(const Plan& pl) {
  std::string want = wanted_isa();
  if (want.empty() || want == "auto")
    want = cpu_runs("amx") ? "amx" : cpu_runs("avx512") ? "avx512" : cpu_runs("avx2") ? "avx2" : "scalar";
  TORCH_CHECK(want == "scalar" || want == "avx2" || want == "avx512" || want == "amx",
              "XMA2_CPU_ISA: expected one of auto, scalar, avx2, avx512, amx, got '", want, "'");
  TORCH_CHECK(cpu_runs(want), "XMA2_CPU_ISA=", want, ": this CPU (or build) cannot run that instruction set");
  if (!pl.simd_exact) return kScalar;
#if defined(__x86_64__)
#if defined(XMA2_CPU_AMX)
  // The AMX kernel computes Sections 2-3 only, with the float32 ADC: a periphery (SPEC 8), or an ADC exact only
  // in float64, runs the AVX-512 bit-plane kernel.
  if (want == "amx" && pl.p.cell_bits <= 7 && pl.p.periphery == 0 && !pl.adc[0].dbl) return kAmx;
  if (want == "amx") return kAvx512;
#endif
  if (want == "avx512") return kAvx512;
  if (want == "avx2") return kAvx2;
#endif
  return kScalar;
}

// The whole input code is one chunk and the whole weight magnitude one slice (both fit int8 tiles),
// the ADC is the identity, and one int8 tile multiply per tile gives sum_k x w exactly.  Only when
// AMX is usable and chosen (XMA2_CPU_ISA unset, auto or amx) and the codes are narrow enough.
const Isa* lossless_on_amx(Plan& pl) {
#if defined(XMA2_CPU_AMX)
  const std::string want = wanted_isa();
  if (!(want.empty() || want == "auto" || want == "amx") || !cpu_runs("amx")) return nullptr;
  if (pl.p.x_bits > 8 || pl.p.w_bits > 7) return nullptr;
  if (pl.p.periphery != 0) return nullptr;  // (exact there too, but not run on hardware: the float GEMM)
  const XbarParams one = one_conversion(pl.p);
  const double bound = tile_sum_bound(one, (double)one.pmax());  // the code is the partial sum: code_max = Pmax
  if (bound >= 2147483647.0) return nullptr;
  pl.p = one;
  pl.identity = true;
  pl.float_sums = bound < 16777216.0;
  return &kAmx;
#else
  (void)pl;
  return nullptr;
#endif
}

int64_t column_groups(int64_t row_blocks, int64_t column_units) {
  const int64_t threads = at::get_num_threads();
  if (row_blocks == 0 || column_units == 0 || row_blocks >= 4 * threads) return 1;
  return std::min(column_units, (4 * threads + row_blocks - 1) / row_blocks);
}

void parallel_items(int64_t M, int64_t block, int64_t units, int64_t min_units, const ItemBody& body) {
  const int64_t blocks = (M + block - 1) / block;
  const int64_t groups = column_groups(blocks, (units + min_units - 1) / min_units);
  const int64_t per_group = (units + groups - 1) / groups;
  const int64_t items = blocks * groups;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), items), 1, [&](int64_t worker, int64_t) {
    for (int64_t item = next++; item < items; item = next++) {
      const int64_t blk = item / groups, u0 = (item % groups) * per_group, u1 = std::min(units, u0 + per_group);
      if (u0 >= u1 && units > 0) continue;  // an empty group (its rows are handled by the others)
      const int64_t m0 = blk * block;
      body(worker, m0, std::min(block, M - m0), u0, u1);
    }
  });
}

void run_quantized(const CodesView& x, const Plan& pl, const Isa& isa, const std::vector<WeightSet>& sets,
                   const TileEpilogue& epi, const BlockDone& done) {
  const int64_t Tr = pl.p.Tr(), L = isa.lanes;
  const int64_t stride = isa.row_words(pl);
  int64_t plane_words = 0;
  TORCH_CHECK(!__builtin_mul_overflow(stride, kRowBlock, &plane_words), "xbar: packed input size overflows int64");
  std::atomic<bool> bad{false};
  // Work items: (row block, group of lane blocks).  Few row blocks (small batches, late layers: M = 16 at
  // batch 1) are split over the output columns too, so that every thread has work; each item packs its
  // input rows.
  const int64_t lane_blocks = sets.empty() ? 0 : sets[0].planes.g.blocks;  // 0 when N == 0
  struct Scratch {
    std::vector<uint16_t> mags;
    std::vector<uint32_t> xplanes;
    std::vector<int64_t> t;
  };
  std::vector<Scratch> scratch((size_t)at::get_num_threads());
  parallel_items(pl.p.M, kRowBlock, lane_blocks, 1, [&](int64_t worker, int64_t m0, int64_t nm, int64_t nb0, int64_t nb1) {
    const int64_t n0 = nb0 * L, n1 = std::min(pl.p.N, nb1 * L);
    if (Tr == 0) {  // K == 0: no codes, every T_int is 0
      done(m0, nm, n0, n1);
      return;
    }
    Scratch& sc = scratch[(size_t)worker];
    if (sc.t.empty()) {
      sc.xplanes.resize((size_t)plane_words);
      sc.t.resize((size_t)(kRowBlock * L));
    }
    pack_input_rows(x, pl, isa, m0, nm, sc.mags, sc.xplanes.data(), bad);
    for (int64_t r = 0; r < Tr; ++r) {
      const uint32_t* xr = sc.xplanes.data() + r * (stride / Tr);
      for (size_t s = 0; s < sets.size(); ++s) {
        const WeightPlanes& wp = sets[s].planes;
        for (int64_t nb = nb0; nb < nb1; ++nb) {
          if (!sets[s].active[(size_t)(r * wp.g.blocks + nb)]) continue;
          isa.block(pl, pl.tile_adc(r), xr, stride, nm, wp.at(r, nb), sc.t.data());
          epi((int)s, r, nb * L, m0, nm, sc.t.data());
        }
      }
    }
    done(m0, nm, n0, n1);
  });
  TORCH_CHECK(!bad, "xbar: x_codes must hold codes in [", pl.p.x_pols == 2 ? -((1LL << pl.p.x_bits) - 1) : 0, ", ",
              (1LL << pl.p.x_bits) - 1, "]");
}

}  // namespace cpu
}  // namespace xma2
