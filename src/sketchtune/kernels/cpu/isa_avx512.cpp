// AVX-512F: 16 codes per chunk and the whole 16-entry table in one register, so one vpermps
// looks up 16 weights. Lanes hold codes 0,8,1,9,...,7,15 of a chunk (one 64-bit broadcast and one
// shift); the GEMV permutes x to match, dequantize permutes the weights back.
#include "lut_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f")
#endif

#include "lut_impl.h"

namespace sketchtune {
namespace {

struct Avx512 {
  static constexpr int W = 16;
  using V = __m512;

  template <int BITS>
  struct Chunk {
    static constexpr int L = 16, LOAD = 8;
    using Entry = float;
    using T = __m512;

    static int lane_column(int lane) { return lane / 2 + 8 * (lane % 2); }

    static T table(const float* v) {
      if constexpr (BITS == 4) {
        return _mm512_loadu_ps(v);
      } else {  // replicated: vpermps reads 4 index bits, the upper ones belong to the next code
        alignas(64) float t[16];
        for (int i = 0; i < 16; ++i) t[i] = v[i % (1 << BITS)];
        return _mm512_load_ps(t);
      }
    }

    static void lookup(T t, const uint8_t* p, V* out) {
      const __m512i pair = _mm512_set1_epi64(static_cast<long long>(chunk_pair<BITS>(p)));
      const __m512i idx = _mm512_srlv_epi32(
          pair, _mm512_setr_epi32(0, 0, BITS, BITS, 2 * BITS, 2 * BITS, 3 * BITS, 3 * BITS,
                                  4 * BITS, 4 * BITS, 5 * BITS, 5 * BITS, 6 * BITS, 6 * BITS,
                                  7 * BITS, 7 * BITS));
      *out = _mm512_permutexvar_ps(idx, t);
    }

    static void store(T t, const uint8_t* p, float* out) {
      V w;
      lookup(t, p, &w);
      // Column j sits in lane 2j (j < 8) or 2(j - 8) + 1.
      const __m512i to_columns =
          _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
      _mm512_storeu_ps(out, _mm512_permutexvar_ps(to_columns, w));
    }
  };

  template <int BITS>
  using Big = Chunk<BITS>;
  template <int BITS>
  using Small = NoChunk;

  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load_bf16(const uint16_t* p) {
    const __m512i w =
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static float hsum(V v) { return _mm512_reduce_add_ps(v); }
};

}  // namespace

const Kernels* avx512_kernels() {
  static const Kernels* k = make_kernels<Avx512>("avx512");
  return k;
}

}  // namespace sketchtune

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else
namespace sketchtune {
const Kernels* avx512_kernels() { return nullptr; }
}  // namespace sketchtune
#endif
