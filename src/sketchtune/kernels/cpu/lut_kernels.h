// Plain-pointer interface between the torch ops (ops.cpp) and the per-ISA kernels (isa_*.cpp).
// No torch headers here: the ISA files are compiled with their own target options, and anything
// they share with ops.cpp must not carry instructions that the running CPU may lack.
#pragma once

#include <cstdint>

namespace sketchtune {

// One sketched weight: packed codes (d_out, d_in * bits / 8) and tables (d_out, gpr, 2**bits),
// both contiguous. Column c of row r reads values[r, c / (d_in / gpr), code(r, c)]. The tables are
// fp32 (`values`) or, for the GEMV only, bf16 bit patterns (`values_bf16`); the other is nullptr.
struct Sketch {
  const uint8_t* codes;
  const float* values;
  const uint16_t* values_bf16;
  int64_t d_out, d_in, gpr, bits;

  int64_t row_bytes() const { return d_in * bits / 8; }
  int64_t group() const { return d_in / gpr; }
};

// Up to kGemvRows activation rows for the LUT GEMV, in fp32.
struct GemvArgs {
  const float* x;       // (nb, d_in), natural column order (scalar heads and tails)
  const float* x_lane;  // (nb, d_in), each aligned chunk permuted into the ISA's lane order
  float* y;             // (nb, ldy)
  int64_t nb, ldy;
};

constexpr int kGemvRows = 4;

// Where a group's run of GEMV body chunks begins: the first column at or after the group's start
// c0 whose code starts a byte. Chunks follow each other from there while they fit in the group.
inline int64_t body_chunk_start(int64_t c0, int64_t bits) {
  const int64_t codes_per_unit = bits == 3 ? 8 : 8 / bits;
  return (c0 + codes_per_unit - 1) / codes_per_unit * codes_per_unit;
}

// y[:, r0:r1] = x Ŵ[r0:r1]ᵀ, reading codes and tables directly.
struct Gemv {
  // For bits 2..4: codes per body chunk (0: none), and the column within its chunk of each
  // weight the chunk's lookup yields: x_lane holds x reordered so within every whole chunk.
  int chunk[5];
  const int* lane_column[5];
  void (*run)(const Sketch&, const GemvArgs&, int64_t r0, int64_t r1);
};

struct Kernels {
  const char* name;
  Gemv gemv;       // reads Sketch::values
  Gemv gemv_bf16;  // reads Sketch::values_bf16
  // out[r - r0, c - c0] = Ŵ[r, c] for r in [r0, r1), c in [c0, c1); row stride ldo.
  void (*dequant)(const Sketch&, int64_t r0, int64_t r1, int64_t c0, int64_t c1, float* out,
                  int64_t ldo);
  // y[:, r0:r1] = x W[r0:r1]ᵀ for a dense bf16 weight W (d_out, d_in), rows as in GemvArgs
  // (x_lane unused): the bf16 output head of a small model, read at half the bytes of fp32.
  void (*bf16_gemv)(const uint16_t* w, int64_t d_in, const GemvArgs&, int64_t r0, int64_t r1);
};

// nullptr where the file was not compiled for that ISA (another architecture or compiler).
const Kernels* scalar_kernels();
const Kernels* avx2_kernels();
const Kernels* avx512_kernels();
// The AVX-512 lane layout emulated in plain C++: lets any machine test that layout's index math.
const Kernels* emu16_kernels();

// grad[r, g, k] += sum of dw[r - r0, c] over the columns c of group g with code k, r in [r0, r1).
void bin_rows(const Sketch& s, const float* dw, int64_t ld, int64_t r0, int64_t r1, float* grad);

}  // namespace sketchtune
