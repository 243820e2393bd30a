// AVX2 + FMA. 2 and 3 bits: 8 codes per chunk, one vpermps on the 8-entry (or replicated 4-entry)
// table. 4 bits: 64 codes per chunk through byte planes: the table's 16 floats split into 4
// 16-byte planes (byte k of every entry), vpshufb looks up 32 codes in a plane, and unpacks
// reassemble the floats (in a lane order the GEMV's x follows). Where a group has no room for a
// 64-code chunk, 8-code chunks with two vpermps and a blend on the top bit take over. bf16 tables
// at 4 and 2 bits take a two-plane variant of the byte-plane chunk (64 or 128 codes), and at 4
// bits a 16-code form of it for group tails.
#include "lut_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

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
  static constexpr int W = 8;
  using V = __m256;

  template <int BITS>
  struct Perm {
    static constexpr int L = 8, LOAD = 4;
    using Entry = float;
    struct T {
      __m256 lo, hi;
    };

    static int lane_column(int lane) { return lane; }

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

    static void lookup(const T& t, const uint8_t* p, V* out) {
      uint32_t w;
      std::memcpy(&w, p, 4);
      const __m256i v = _mm256_set1_epi32(static_cast<int>(w));
      const __m256i idx = _mm256_srlv_epi32(
          v, _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS,
                               7 * BITS));
      if constexpr (BITS == 4) {
        // Bit 3 of code i moved to bit 31 selects the upper half of the table.
        const __m256i top = _mm256_sllv_epi32(v, _mm256_setr_epi32(28, 24, 20, 16, 12, 8, 4, 0));
        *out = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t.lo, idx),
                                _mm256_permutevar8x32_ps(t.hi, idx), _mm256_castsi256_ps(top));
      } else {
        *out = _mm256_permutevar8x32_ps(t.lo, idx);
      }
    }

    static void store(const T& t, const uint8_t* p, float* out) {
      V w;
      lookup(t, p, &w);
      _mm256_storeu_ps(out, w);
    }
  };

  struct Planes {
    static constexpr int L = 64, LOAD = 32;
    using Entry = float;
    struct T {
      __m256i plane[4];  // plane k: byte k of the 16 entries, in both 128-bit halves
    };

    // out[4h + q] lane i holds the code in nibble h of byte 16 (i / 4) + 4 q + i % 4.
    static int lane_column(int lane) {
      const int j = lane / 8, i = lane % 8;
      return 2 * (16 * (i / 4) + 4 * (j % 4) + i % 4) + j / 4;
    }

    static T table(const float* v) {
      const __m128i bytes = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
      __m128i q[4];
      for (int i = 0; i < 4; ++i)
        q[i] = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + 4 * i)),
                                bytes);
      // q[i] dword k = byte k of entries 4i..4i+3: transpose the 4 x 4 dwords.
      const __m128i t0 = _mm_unpacklo_epi32(q[0], q[1]), t1 = _mm_unpacklo_epi32(q[2], q[3]);
      const __m128i t2 = _mm_unpackhi_epi32(q[0], q[1]), t3 = _mm_unpackhi_epi32(q[2], q[3]);
      return {{_mm256_broadcastsi128_si256(_mm_unpacklo_epi64(t0, t1)),
               _mm256_broadcastsi128_si256(_mm_unpackhi_epi64(t0, t1)),
               _mm256_broadcastsi128_si256(_mm_unpacklo_epi64(t2, t3)),
               _mm256_broadcastsi128_si256(_mm_unpackhi_epi64(t2, t3))}};
    }

    static void lookup(const T& t, const uint8_t* p, V* out) {
      const __m256i nibble = _mm256_set1_epi8(0x0F);
      const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      const __m256i idx[2] = {_mm256_and_si256(c, nibble),
                              _mm256_and_si256(_mm256_srli_epi16(c, 4), nibble)};
      for (int h = 0; h < 2; ++h) {
        const __m256i b0 = _mm256_shuffle_epi8(t.plane[0], idx[h]);
        const __m256i b1 = _mm256_shuffle_epi8(t.plane[1], idx[h]);
        const __m256i b2 = _mm256_shuffle_epi8(t.plane[2], idx[h]);
        const __m256i b3 = _mm256_shuffle_epi8(t.plane[3], idx[h]);
        const __m256i lo01 = _mm256_unpacklo_epi8(b0, b1), hi01 = _mm256_unpackhi_epi8(b0, b1);
        const __m256i lo23 = _mm256_unpacklo_epi8(b2, b3), hi23 = _mm256_unpackhi_epi8(b2, b3);
        out[4 * h + 0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(lo01, lo23));
        out[4 * h + 1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(lo01, lo23));
        out[4 * h + 2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(hi01, hi23));
        out[4 * h + 3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(hi01, hi23));
      }
    }
  };

  // 4 and 2 bits from bf16 tables: 32 bytes of codes per chunk through 2 byte planes (8 shuffles
  // per 64 codes, not 24), then each 16-bit value becomes an fp32 by a shift or a mask.
  template <int BITS>
  struct Bf16Planes {
    static constexpr int FIELDS = 8 / BITS;  // codes per byte
    static constexpr int L = 32 * FIELDS, LOAD = 32, PARTS = FIELDS;
    using Entry = uint16_t;
    struct T {
      __m256i low, high;  // low (high) byte of the 2**BITS entries, in both 128-bit halves
    };

    // out[4h + 2m + e] lane i holds the code in field h of byte 16 (i / 4) + 8 m + 2 (i % 4) + e.
    static int lane_column(int lane) {
      const int k = lane / 8, i = lane % 8;
      const int h = k / 4, m = (k / 2) % 2, e = k % 2;
      return FIELDS * (16 * (i / 4) + 8 * m + 2 * (i % 4) + e) + h;
    }

    static T table(const uint16_t* v) {
      const __m128i split =
          _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
      if constexpr (BITS == 4) {  // entries 0-7 and 8-15, each as 8 low bytes then 8 high bytes
        const __m128i a = _mm_shuffle_epi8(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(v)), split);
        const __m128i b = _mm_shuffle_epi8(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(v + 8)), split);
        return {_mm256_broadcastsi128_si256(_mm_unpacklo_epi64(a, b)),
                _mm256_broadcastsi128_si256(_mm_unpackhi_epi64(a, b))};
      } else {  // 4 entries: low bytes in bytes 0-3, high bytes in bytes 8-11
        const __m128i a = _mm_shuffle_epi8(
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(v)), split);
        return {_mm256_broadcastsi128_si256(a),
                _mm256_broadcastsi128_si256(_mm_srli_si128(a, 8))};
      }
    }

    // Field h of the 32 bytes: out[2m + e] is vector 4h + 2m + e of the chunk. One field at a
    // time, so that 2 bits' 16 vectors per chunk are never all live.
    static void lookup_part(const T& t, const uint8_t* p, int h, V* out) {
      const __m256i field = _mm256_set1_epi8((1 << BITS) - 1);
      const __m256i upper = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
      const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      // 16-bit shifts move bits across bytes; the mask keeps each byte's own field
      const __m256i idx = _mm256_and_si256(h ? _mm256_srli_epi16(c, BITS * h) : c, field);
      const __m256i lo = _mm256_shuffle_epi8(t.low, idx);
      const __m256i hi = _mm256_shuffle_epi8(t.high, idx);
      const __m256i words[2] = {_mm256_unpacklo_epi8(lo, hi), _mm256_unpackhi_epi8(lo, hi)};
      for (int m = 0; m < 2; ++m) {
        out[2 * m] = _mm256_castsi256_ps(_mm256_slli_epi32(words[m], 16));
        out[2 * m + 1] = _mm256_castsi256_ps(_mm256_and_si256(words[m], upper));
      }
    }
  };

  // 16 codes at 4 bits from bf16 tables, in column order: what 64-code chunks leave at a group's
  // end (SmolLM2's 144-wide groups), on the same two byte planes, with 128-bit shuffles.
  struct Bf16Tail {
    static constexpr int L = 16, LOAD = 8;
    using Entry = uint16_t;
    using T = Bf16Planes<4>::T;

    static int lane_column(int lane) { return lane; }
    static T table(const uint16_t* v) { return Bf16Planes<4>::table(v); }

    static void lookup(const T& t, const uint8_t* p, V* out) {
      const __m128i nibble = _mm_set1_epi8(0x0F);
      const __m128i c = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
      // byte j holds codes 2j (low nibble) and 2j + 1: interleaved, they are in column order
      const __m128i idx = _mm_unpacklo_epi8(_mm_and_si128(c, nibble),
                                            _mm_and_si128(_mm_srli_epi16(c, 4), nibble));
      const __m128i lo = _mm_shuffle_epi8(_mm256_castsi256_si128(t.low), idx);
      const __m128i hi = _mm_shuffle_epi8(_mm256_castsi256_si128(t.high), idx);
      out[0] = _mm256_castsi256_ps(
          _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_unpacklo_epi8(lo, hi)), 16));
      out[1] = _mm256_castsi256_ps(
          _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_unpackhi_epi8(lo, hi)), 16));
    }
  };

  template <int BITS>
  using Big = std::conditional_t<BITS == 4, Planes, Perm<BITS>>;
  template <int BITS>
  using BigBf16 = std::conditional_t<BITS == 3, Big<3>, Bf16Planes<BITS>>;
  template <int BITS>
  using Small = std::conditional_t<BITS == 3, NoChunk, Perm<BITS>>;
  template <int BITS>
  using SmallBf16 = std::conditional_t<BITS == 4, Bf16Tail, Small<BITS>>;

  template <int K>
  static void widen_bf16(const uint16_t* in, float* out) {
    if constexpr (K == 4) {
      const __m128i w = _mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(in)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_slli_epi32(w, 16));
    } else {
      for (int k = 0; k < K; k += 8) {
        const __m256i w =
            _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + k)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k), _mm256_slli_epi32(w, 16));
      }
    }
  }

  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load_bf16(const uint16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static float hsum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
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
