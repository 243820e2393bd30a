// AVX2 + FMA: 8 codes per chunk. A 16-entry table is two 8-float registers: two vpermps and a
// blend on the code's top bit; 8-entry (3-bit) and replicated 4-entry (2-bit) tables need one.
#include "lut_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

#include "lut_impl.h"

namespace sketchtune {
namespace {

struct Avx2 {
  static constexpr int L = 8, LOAD = 4;
  using V = __m256;
  struct T {
    __m256 lo, hi;
  };

  static int lane_column(int lane) { return lane; }

  template <int BITS>
  static T table(const float* v) {
    if constexpr (BITS == 4) {
      return {_mm256_loadu_ps(v), _mm256_loadu_ps(v + 8)};
    } else if constexpr (BITS == 3) {
      return {_mm256_loadu_ps(v), _mm256_setzero_ps()};
    } else {  // 4 entries twice: vpermps reads 3 index bits, the third belongs to the next code
      const __m128 q = _mm_loadu_ps(v);
      return {_mm256_set_m128(q, q), _mm256_setzero_ps()};
    }
  }

  template <int BITS>
  static V lookup(const T& t, const uint8_t* p) {
    uint32_t w;
    std::memcpy(&w, p, 4);
    const __m256i v = _mm256_set1_epi32(static_cast<int>(w));
    const __m256i idx = _mm256_srlv_epi32(
        v, _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS));
    if constexpr (BITS == 4) {
      // Bit 3 of code i moved to bit 31 selects the upper half of the table.
      const __m256i top = _mm256_sllv_epi32(v, _mm256_setr_epi32(28, 24, 20, 16, 12, 8, 4, 0));
      return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t.lo, idx),
                              _mm256_permutevar8x32_ps(t.hi, idx), _mm256_castsi256_ps(top));
    } else {
      return _mm256_permutevar8x32_ps(t.lo, idx);
    }
  }

  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static float hsum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
};

}  // namespace

const Kernels* avx2_kernels() {
  static const Kernels* k = make_kernels<Avx2>("avx2");
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
const Kernels* avx2_kernels() { return nullptr; }
}  // namespace sketchtune
#endif
