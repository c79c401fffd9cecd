// Input rows and weights into the layouts of the instruction-set kernels (pack.h).
#include "pack.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>

namespace xma2 {
namespace cpu {
namespace {

int64_t mul(int64_t a, int64_t b) {
  int64_t out = 0;
  TORCH_CHECK(!__builtin_mul_overflow(a, b, &out), "xbar: packed weight size ", a, " x ", b, " overflows int64");
  return out;
}

// One input row of codes -> magnitudes [pol][tile][kpad] (zero padded per tile); out-of-range codes
// set `bad` after the pass (branch-free: input codes are random-looking).
template <typename T>
void row_mags(const T* row, int64_t sk, const Plan& pl, int64_t qx, uint16_t* mags, std::atomic<bool>& bad) {
  const int64_t Tr = pl.p.Tr(), kp = pl.kpad;
  const bool two = pl.p.x_pols == 2;
  const int64_t lo = two ? -qx : 0;
  int64_t mn = 0, mx = 0;
  if (Tr == 0) return;  // K == 0: nothing to pack (and mags may be null)
  std::memset(mags, 0, sizeof(uint16_t) * pl.p.x_pols * Tr * kp);
  for (int64_t r = 0; r < Tr; ++r) {
    const int64_t k0 = pl.p.tile_start(r), n = pl.p.tile_rows(r);
    uint16_t* pos = mags + r * kp;
    uint16_t* neg = mags + (Tr + r) * kp;  // only when two polarities
    const T* src = row + k0 * sk;
    for (int64_t k = 0; k < n; ++k) {
      const int64_t v = (int64_t)src[k * sk];
      mn = std::min(mn, v);
      mx = std::max(mx, v);
      pos[k] = (uint16_t)(v > 0 ? v : 0);
    }
    if (two)
      for (int64_t k = 0; k < n; ++k) {
        const int64_t v = (int64_t)src[k * sk];
        neg[k] = (uint16_t)(v < 0 ? -v : 0);
      }
  }
  if (mn < lo || mx > qx) bad = true;
}

template <typename T>
void pack_rows_as(const CodesView& x, const Plan& pl, const Isa& isa, int64_t m0, int64_t nm, uint16_t* mags,
                  uint32_t* dst, std::atomic<bool>& bad) {
  const int64_t qx = (1LL << pl.p.x_bits) - 1, stride = isa.row_words(pl);
  const T* base = static_cast<const T*>(x.data);
  for (int64_t mi = 0; mi < nm; ++mi) {
    row_mags(base + (m0 + mi) * x.s0, x.s1, pl, qx, mags, bad);
    isa.row(pl, mags, dst + mi * stride);
  }
}

// Calls set(v, r, kk, n) for every non-zero in-range code v = w[k, n] (k = tile_start(r) + kk), tiles in
// parallel; refuses out-of-range codes.
template <typename Set>
void for_each_weight(const int32_t* c, const Plan& pl, const char* name, Set set) {
  const int64_t N = pl.p.N, Tr = pl.p.Tr();
  const int64_t q = (1LL << pl.p.w_bits) - 1;
  std::atomic<bool> bad{false};
  at::parallel_for(0, Tr, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t k0 = pl.p.tile_start(r), k1 = k0 + pl.p.tile_rows(r);
      for (int64_t k = k0; k < k1; ++k)
        for (int64_t n = 0; n < N; ++n) {
          const int64_t v = c[k * N + n];
          if (v < -q || v > q) bad = true;
          if (v == 0 || v < -q || v > q) continue;
          set(v, r, k - k0, n);
        }
    }
  });
  TORCH_CHECK(!bad, "xbar: ", name, " must hold codes in [", -q, ", ", q, "]");
}

// The bit planes [pol][bit][word][lane] of one (row tile r, lane block nb): each word built in
// registers from 32 rows of L columns and written once (no read-modify-write of scattered words);
// out-of-range codes set `bad`.
template <int L>
void planes_block(const int32_t* w, const Plan& pl, int64_t r, int64_t nb, uint32_t* out, bool& bad) {
  const int64_t N = pl.p.N;
  const int W = pl.words, wbits = pl.p.w_bits;
  const int32_t q = (int32_t)((1LL << wbits) - 1);
  const int64_t n0 = nb * L, nl = std::min<int64_t>(L, N - n0);
  const int64_t k0 = pl.p.tile_start(r), kr = pl.p.tile_rows(r);
  constexpr int kMaxBits = 16;
  for (int wd = 0; wd < W; ++wd) {
    uint32_t acc[2][kMaxBits][L] = {};
    const int64_t kb = (int64_t)wd * 32, ke = std::min<int64_t>(kr, kb + 32);
    for (int64_t kk = kb; kk < ke; ++kk) {
      const int32_t* row = w + (k0 + kk) * N + n0;
      const int sh = (int)(kk - kb);
      uint32_t pos[L], neg[L];
      for (int l = 0; l < L; ++l) {
        const int32_t v = l < nl ? row[l] : 0;
        bad |= v < -q || v > q;
        pos[l] = (uint32_t)(v > 0 ? v : 0);
        neg[l] = (uint32_t)(v < 0 ? -v : 0);
      }
      for (int b = 0; b < wbits; ++b)
        for (int l = 0; l < L; ++l) {
          acc[0][b][l] |= ((pos[l] >> b) & 1u) << sh;
          acc[1][b][l] |= ((neg[l] >> b) & 1u) << sh;
        }
    }
    for (int pol = 0; pol < 2; ++pol)
      for (int b = 0; b < wbits; ++b)
        std::memcpy(out + ((int64_t)(pol * wbits + b) * W + wd) * L, acc[pol][b], sizeof(uint32_t) * L);
  }
}

}  // namespace

void pack_input_rows(const CodesView& x, const Plan& pl, const Isa& isa, int64_t m0, int64_t nm,
                     std::vector<uint16_t>& mags, uint32_t* dst, std::atomic<bool>& bad) {
#if defined(XMA2_CPU_AMX)
  const bool bytes = x.type == (pl.p.x_pols == 2 ? CodeType::kI8 : CodeType::kU8) && x.s1 == 1;
  if (isa.amx && bytes) {  // 8-bit codes: chunk bytes without the uint16 detour
    const uint8_t* base = static_cast<const uint8_t*>(x.data);
    const int64_t stride = isa.row_words(pl);
    bool b = false;
    for (int64_t mi = 0; mi < nm; ++mi)
      amx_row_bytes_from_codes(pl, base + (m0 + mi) * x.s0, pl.p.x_pols == 2, dst + mi * stride, b);
    if (b) bad = true;
    return;
  }
#endif
  mags.resize((size_t)(pl.p.x_pols * pl.p.Tr() * pl.kpad));
  switch (x.type) {
    case CodeType::kU8: return pack_rows_as<uint8_t>(x, pl, isa, m0, nm, mags.data(), dst, bad);
    case CodeType::kI8: return pack_rows_as<int8_t>(x, pl, isa, m0, nm, mags.data(), dst, bad);
    case CodeType::kI16: return pack_rows_as<int16_t>(x, pl, isa, m0, nm, mags.data(), dst, bad);
    case CodeType::kI32: return pack_rows_as<int32_t>(x, pl, isa, m0, nm, mags.data(), dst, bad);
  }
}

WeightGeometry weight_geometry(const Plan& pl, const Isa& isa) {
  WeightGeometry g;
  const int64_t N = pl.p.N, Tr = pl.p.Tr();
  if (isa.amx) {  // [pol * S + slice][kstep][k / 4 % 16][column][k % 4] bytes per (tile, 16-column block)
    g.blocks = (N + 15) / 16;
    g.per_block = mul(2 * pl.p.slices() * 256, pl.kpad / 64);
  } else {  // bit planes [pol][bit][word][lane] per (tile, lane block)
    g.blocks = (N + isa.lanes - 1) / isa.lanes;
    g.per_block = (int64_t)2 * pl.p.w_bits * pl.words * isa.lanes;
  }
  g.words = mul(mul(Tr, g.blocks), g.per_block);
  return g;
}

void pack_weights(const int32_t* w, const Plan& pl, const Isa& isa, const char* name, uint32_t* dst) {
  const WeightGeometry g = weight_geometry(pl, isa);
  if (isa.amx) {
    std::fill(dst, dst + g.words, 0u);
    const int64_t KS = pl.kpad / 64;
    const int S = pl.p.slices(), cb = pl.p.cell_bits;
    for_each_weight(w, pl, name, [&](int64_t v, int64_t r, int64_t kk, int64_t n) {
      const int pol = v > 0 ? 0 : 1;
      const uint32_t mag = (uint32_t)(v > 0 ? v : -v);
      uint8_t* base = reinterpret_cast<uint8_t*>(dst + (r * g.blocks + n / 16) * g.per_block);
      for (int j = 0; j < S; ++j)
        base[(((int64_t)(pol * S + j) * KS + kk / 64) * 16 + kk % 64 / 4) * 64 + n % 16 * 4 + kk % 4] =
            (uint8_t)bit_field((int32_t)mag, j, cb);
    });
    return;
  }
  std::atomic<bool> bad{false};
  const int64_t items = pl.p.Tr() * g.blocks;
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    bool b = false;
    for (int64_t i = i0; i < i1; ++i) {
      uint32_t* out = dst + i * g.per_block;
      switch (isa.lanes) {
        case 1: planes_block<1>(w, pl, i / g.blocks, i % g.blocks, out, b); break;
        case 8: planes_block<8>(w, pl, i / g.blocks, i % g.blocks, out, b); break;
        case 16: planes_block<16>(w, pl, i / g.blocks, i % g.blocks, out, b); break;
        default: TORCH_CHECK(false, "xbar: no weight packing for ", isa.lanes, " lanes");
      }
    }
    if (b) bad = true;
  });
  const int64_t q = (1LL << pl.p.w_bits) - 1;
  TORCH_CHECK(!bad, "xbar: ", name, " must hold codes in [", -q, ", ", q, "]");
}

}  // namespace cpu
}  // namespace xma2
