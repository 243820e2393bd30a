// Kernel templates shared by the ISA files. Each ISA file includes this after its target pragma,
// so everything here has internal linkage: no copy compiled for one ISA can stand in for another.
//
// An ISA type I provides: L (codes per chunk), LOAD (bytes a chunk load may touch), vector type V,
// table type T, table<BITS>(values), lookup<BITS>(table, chunk bytes) -> V in lane order,
// zero/load/fma/add/hsum, store (back to column order) and lane_column(lane). L == 1 means no
// vector body: the scalar loops below do all the work.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "lut_kernels.h"

namespace sketchtune {
namespace {

template <int BITS>
inline int code_at(const uint8_t* row, int64_t c) {
  const int64_t bit = c * BITS;
  const int shift = static_cast<int>(bit & 7);
  unsigned v = row[bit >> 3];
  if (BITS == 3 && shift > 5) v |= unsigned(row[(bit >> 3) + 1]) << 8;  // straddles two bytes
  return static_cast<int>(v >> shift) & ((1 << BITS) - 1);
}

// 16 codes from a chunk as one word: codes 0-7 in the low 32 bits, codes 8-15 in the high 32.
template <int BITS>
inline uint64_t chunk_pair(const uint8_t* p) {
  uint64_t w;
  std::memcpy(&w, p, 8);
  if constexpr (BITS == 4) {
    return w;
  } else {
    constexpr int half = 8 * BITS;
    constexpr uint64_t mask = (uint64_t(1) << half) - 1;
    return (w & mask) | (((w >> half) & mask) << 32);
  }
}

// acc[b] += sum over c in [c0, c1) of table[code(c)] * x[b, c].
template <int BITS, int NB>
inline void scalar_dot(const uint8_t* row, const float* table, const float* x, int64_t d_in,
                       int64_t c0, int64_t c1, float* acc) {
  for (int64_t c = c0; c < c1; ++c) {
    const float w = table[code_at<BITS>(row, c)];
    for (int b = 0; b < NB; ++b) acc[b] += w * x[b * d_in + c];
  }
}

template <int BITS>
inline void scalar_dequant(const uint8_t* row, const float* table, int64_t c0, int64_t c1,
                           float* out) {
  for (int64_t c = c0; c < c1; ++c) out[c - c0] = table[code_at<BITS>(row, c)];
}

// The chunk-aligned range [b0, b1) inside [c0, c1) whose loads stay inside the codes buffer
// (bytes_left: bytes from the row's start to the buffer's end). Columns outside it go scalar.
template <class I, int BITS>
inline void body_range(int64_t c0, int64_t c1, int64_t bytes_left, int64_t& b0, int64_t& b1) {
  if constexpr (I::L == 1) {
    b0 = b1 = c1;
    return;
  }
  b0 = (c0 + I::L - 1) / I::L * I::L;
  b1 = c1 / I::L * I::L;
  while (b1 > b0 && (b1 - I::L) * BITS / 8 + I::LOAD > bytes_left) b1 -= I::L;
  if (b1 <= b0) b0 = b1 = c1;
}

template <class I, int BITS, int NB>
void gemv_rows(const Sketch& s, const GemvArgs& a, int64_t r0, int64_t r1) {
  using V = typename I::V;
  constexpr int L = I::L, K = 1 << BITS;
  constexpr int U = NB == 1 ? 4 : (NB == 2 ? 2 : 1);  // independent accumulators hide FMA latency
  const int64_t n = s.d_in, group = s.group(), rb = s.row_bytes();
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = s.codes + r * rb;
    V acc[U][NB];
    for (auto& au : acc)
      for (auto& v : au) v = I::zero();
    float rest[NB] = {};
    for (int64_t g = 0; g < s.gpr; ++g) {
      const float* table = s.values + (r * s.gpr + g) * K;
      const int64_t c0 = g * group, c1 = c0 + group;
      int64_t b0, b1;
      body_range<I, BITS>(c0, c1, (s.d_out - r) * rb, b0, b1);
      scalar_dot<BITS, NB>(row, table, a.x, n, c0, b0, rest);
      if constexpr (L > 1) {
        const auto t = I::template table<BITS>(table);
        const float* xl = a.x_lane;
        int64_t c = b0;
        for (; c + U * L <= b1; c += U * L) {
          for (int u = 0; u < U; ++u) {
            const V w = I::template lookup<BITS>(t, row + (c + u * L) * BITS / 8);
            for (int b = 0; b < NB; ++b)
              acc[u][b] = I::fma(w, I::load(xl + b * n + c + u * L), acc[u][b]);
          }
        }
        for (; c < b1; c += L) {
          const V w = I::template lookup<BITS>(t, row + c * BITS / 8);
          for (int b = 0; b < NB; ++b) acc[0][b] = I::fma(w, I::load(xl + b * n + c), acc[0][b]);
        }
      }
      scalar_dot<BITS, NB>(row, table, a.x, n, b1, c1, rest);
    }
    for (int b = 0; b < NB; ++b) {
      V sum = acc[0][b];
      for (int u = 1; u < U; ++u) sum = I::add(sum, acc[u][b]);
      a.y[b * a.ldy + r] = I::hsum(sum) + rest[b];
    }
  }
}

template <class I, int BITS>
void dequant_rows(const Sketch& s, int64_t r0, int64_t r1, int64_t c0, int64_t c1, float* out,
                  int64_t ldo) {
  constexpr int L = I::L, K = 1 << BITS;
  const int64_t group = s.group(), rb = s.row_bytes();
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = s.codes + r * rb;
    float* o = out + (r - r0) * ldo;
    for (int64_t g = c0 / group; g * group < c1; ++g) {
      const float* table = s.values + (r * s.gpr + g) * K;
      const int64_t lo = std::max(c0, g * group), hi = std::min(c1, (g + 1) * group);
      int64_t b0, b1;
      body_range<I, BITS>(lo, hi, (s.d_out - r) * rb, b0, b1);
      scalar_dequant<BITS>(row, table, lo, b0, o + (lo - c0));
      if constexpr (L > 1) {
        const auto t = I::template table<BITS>(table);
        for (int64_t c = b0; c < b1; c += L)
          I::store(o + (c - c0), I::template lookup<BITS>(t, row + c * BITS / 8));
      }
      scalar_dequant<BITS>(row, table, b1, hi, o + (b1 - c0));
    }
  }
}

template <class I, int BITS>
void gemv_bits(const Sketch& s, const GemvArgs& a, int64_t r0, int64_t r1) {
  static_assert(kGemvRows == 4, "one instantiation per activation row count");
  switch (a.nb) {
    case 1: return gemv_rows<I, BITS, 1>(s, a, r0, r1);
    case 2: return gemv_rows<I, BITS, 2>(s, a, r0, r1);
    case 3: return gemv_rows<I, BITS, 3>(s, a, r0, r1);
    default: return gemv_rows<I, BITS, 4>(s, a, r0, r1);
  }
}

template <class I>
void gemv(const Sketch& s, const GemvArgs& a, int64_t r0, int64_t r1) {
  switch (s.bits) {
    case 2: return gemv_bits<I, 2>(s, a, r0, r1);
    case 3: return gemv_bits<I, 3>(s, a, r0, r1);
    default: return gemv_bits<I, 4>(s, a, r0, r1);
  }
}

template <class I>
void dequant(const Sketch& s, int64_t r0, int64_t r1, int64_t c0, int64_t c1, float* out,
             int64_t ldo) {
  switch (s.bits) {
    case 2: return dequant_rows<I, 2>(s, r0, r1, c0, c1, out, ldo);
    case 3: return dequant_rows<I, 3>(s, r0, r1, c0, c1, out, ldo);
    default: return dequant_rows<I, 4>(s, r0, r1, c0, c1, out, ldo);
  }
}

template <class I>
const Kernels* make_kernels(const char* name) {
  static int columns[I::L];
  for (int lane = 0; lane < I::L; ++lane) columns[lane] = I::lane_column(lane);
  static const Kernels k{name, I::L, columns, &gemv<I>, &dequant<I>};
  return &k;
}

}  // namespace
}  // namespace sketchtune
