// The AVX-512 kernels' lane layout (16 lanes, codes 0-7 and 8-15 interleaved) in plain C++.
// Slow; it exists so that machines without AVX-512 still test that layout's index arithmetic.
#include "lut_impl.h"

namespace sketchtune {
namespace {

struct Emu16 {
  static constexpr int W = 16;
  struct V {
    float v[16];
  };

  template <int BITS>
  struct Chunk {
    static constexpr int L = 16, LOAD = 8;
    using Entry = float;
    using T = V;

    static int lane_column(int lane) { return lane / 2 + 8 * (lane % 2); }

    static T table(const float* values) {
      T t;
      for (int i = 0; i < 16; ++i) t.v[i] = values[i % (1 << BITS)];
      return t;
    }

    static void lookup(const T& t, const uint8_t* p, V* out) {
      const uint64_t pair = chunk_pair<BITS>(p);
      for (int i = 0; i < 16; ++i) {
        const uint32_t half = static_cast<uint32_t>(pair >> (32 * (i % 2)));
        out->v[i] = t.v[(half >> (BITS * (i / 2))) & 15];
      }
    }

    static void store(const T& t, const uint8_t* p, float* out) {
      V w;
      lookup(t, p, &w);
      for (int i = 0; i < 16; ++i) out[lane_column(i)] = w.v[i];
    }
  };

  template <int BITS>
  using Big = Chunk<BITS>;
  template <int BITS>
  using Small = NoChunk;

  static V zero() { return V{}; }
  static V load(const float* p) {
    V out;
    std::memcpy(out.v, p, sizeof(out.v));
    return out;
  }
  static V fma(const V& a, const V& b, const V& c) {
    V out;
    for (int i = 0; i < 16; ++i) out.v[i] = a.v[i] * b.v[i] + c.v[i];
    return out;
  }
  static V add(const V& a, const V& b) {
    V out;
    for (int i = 0; i < 16; ++i) out.v[i] = a.v[i] + b.v[i];
    return out;
  }
  static float hsum(const V& a) {
    float s = 0.0f;
    for (float v : a.v) s += v;
    return s;
  }
};

}  // namespace

const Kernels* emu16_kernels() {
  static const Kernels* k = make_kernels<Emu16>("emu16");
  return k;
}

}  // namespace sketchtune
