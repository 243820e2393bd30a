// The dense bf16 GEMV (the served output head of a small model, read at half the bytes of fp32)
// and the bf16 widening the LUT kernels share. Like lut_impl.h, included by each ISA file after its
// target pragma, so everything here has internal linkage. I is an ISA type as lut_impl.h describes;
// it may add load_bf16, W bf16 weights widened into one vector.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "lut_kernels.h"

namespace sketchtune {
namespace {

inline float bf16_to_float(uint16_t bits) {
  const uint32_t u = uint32_t{bits} << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// W bf16 weights as one fp32 vector: I::load_bf16 where I has one, else widened through memory.
template <class I, class = void>
struct LoadBf16 {
  static typename I::V run(const uint16_t* p) {
    float wide[I::W];
    for (int i = 0; i < I::W; ++i) wide[i] = bf16_to_float(p[i]);
    return I::load(wide);
  }
};
template <class I>
struct LoadBf16<I, std::void_t<decltype(I::load_bf16(nullptr))>> {
  static typename I::V run(const uint16_t* p) { return I::load_bf16(p); }
};

template <class I, int NB>
void bf16_gemv_rows(const uint16_t* w, int64_t d_in, const GemvArgs& a, int64_t r0, int64_t r1) {
  using V = typename I::V;
  constexpr int NACC = NB >= 4 ? 1 : 4 / NB;  // FMA chains per activation row
  constexpr int STEP = NACC * I::W;
  for (int64_t r = r0; r < r1; ++r) {
    const uint16_t* row = w + r * d_in;
    float rest[NB] = {};
    int64_t c = 0;
    if constexpr (I::W > 1) {
      V acc[NACC][NB];
      for (auto& chain : acc)
        for (auto& v : chain) v = I::zero();
      for (; c + STEP <= d_in; c += STEP)
        for (int k = 0; k < NACC; ++k) {
          const V wv = LoadBf16<I>::run(row + c + k * I::W);
          for (int b = 0; b < NB; ++b)
            acc[k][b] = I::fma(wv, I::load(a.x + b * d_in + c + k * I::W), acc[k][b]);
        }
      for (int b = 0; b < NB; ++b) {
        V sum = acc[0][b];
        for (int k = 1; k < NACC; ++k) sum = I::add(sum, acc[k][b]);
        rest[b] = I::hsum(sum);
      }
    }
    for (; c < d_in; ++c) {
      const float wc = bf16_to_float(row[c]);
      for (int b = 0; b < NB; ++b) rest[b] += wc * a.x[b * d_in + c];
    }
    for (int b = 0; b < NB; ++b) a.y[b * a.ldy + r] = rest[b];
  }
}

template <class I>
void bf16_gemv(const uint16_t* w, int64_t d_in, const GemvArgs& a, int64_t r0, int64_t r1) {
  static_assert(kGemvRows == 4, "one instantiation per activation row count");
  switch (a.nb) {
    case 1: return bf16_gemv_rows<I, 1>(w, d_in, a, r0, r1);
    case 2: return bf16_gemv_rows<I, 2>(w, d_in, a, r0, r1);
    case 3: return bf16_gemv_rows<I, 3>(w, d_in, a, r0, r1);
    default: return bf16_gemv_rows<I, 4>(w, d_in, a, r0, r1);
  }
}

}  // namespace
}  // namespace sketchtune
