// The instruction-set kernels of the quantised CPU path, one object per ISA (isa_scalar.cpp,
// isa_avx2.cpp, isa_avx512.cpp, amx.cpp), chosen at run time by driver.cpp.  No torch headers.
#pragma once
#include <stdint.h>

#include <type_traits>  // (xbar_cpu_block.h, included inside the ISA namespaces)

#include "plan.h"

namespace xma2 {
namespace cpu {

struct Isa {
  const char* name;
  int lanes;  // output columns per block call
  bool amx;   // byte layout of inputs and weights instead of bit planes
  // Words of one packed input row, and the packing of one row from its uint16 magnitudes
  // [pol][tile][kpad] (zero padded per tile).
  int64_t (*row_words)(const Plan&);
  void (*row)(const Plan&, const uint16_t* mags, uint32_t* dst);
  // T_int[r, m, n] of `nm` rows (x_stride words apart) and `lanes` columns of one row tile, whose ADC is
  // `adc` (Plan::tile_adc), into out[mi * lanes + lane] (xbar_cpu_block.h states the contract).
  void (*block)(const Plan&, const Adc& adc, const uint32_t* xp, int64_t x_stride, int64_t nm, const uint32_t* wp,
                int64_t* out);
};

extern const Isa kScalar;
#if defined(__x86_64__)
extern const Isa kAvx2;
extern const Isa kAvx512;

// One im2col row of 1-byte codes: dst[k] = src[off[k]] by AVX-512 gathers (isa_avx512.cpp).  The
// caller guarantees src[off[k] + 3] is inside the tensor, and that the CPU runs AVX-512.
void gather_bytes_avx512(const uint8_t* src, const int32_t* off, int64_t K, uint8_t* dst);

#if defined(__linux__)
#define XMA2_CPU_AMX 1
extern const Isa kAmx;
// The CPU has AMX and the kernel granted the tile state (asked once).
bool amx_usable();
// AMX input layout straight from one contiguous row of 8-bit codes (uint8 unsigned, int8 signed);
// sets `bad` for codes outside the input range.
void amx_row_bytes_from_codes(const Plan& pl, const uint8_t* row, bool is_signed, uint32_t* dst, bool& bad);
#endif
#endif

}  // namespace cpu
}  // namespace xma2
