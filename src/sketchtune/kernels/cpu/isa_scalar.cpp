// Portable kernels: the fallback on any CPU, and the values-gradient binning for all of them.
#include "lut_impl.h"

namespace sketchtune {
namespace {

struct Scalar {
  static constexpr int W = 1;
  using V = float;
  template <int BITS>
  using Big = NoChunk;
  template <int BITS>
  using Small = NoChunk;
  static V zero() { return 0.0f; }
  static V add(V a, V b) { return a + b; }
  static float hsum(V v) { return v; }
};

template <int BITS>
void bin_rows_bits(const Sketch& s, const float* dw, int64_t ld, int64_t r0, int64_t r1,
                   float* grad) {
  constexpr int K = 1 << BITS;
  const int64_t group = s.group(), rb = s.row_bytes();
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = s.codes + r * rb;
    const float* d = dw + (r - r0) * ld;
    for (int64_t g = 0; g < s.gpr; ++g) {
      // Four bin sets, so that runs of one code do not serialise on a single accumulator.
      float bins[4][K] = {};
      const int64_t c0 = g * group, c1 = c0 + group;
      int64_t c = c0;
      for (; c + 4 <= c1; c += 4)
        for (int j = 0; j < 4; ++j) bins[j][code_at<BITS>(row, c + j)] += d[c + j];
      for (; c < c1; ++c) bins[0][code_at<BITS>(row, c)] += d[c];
      float* out = grad + (r * s.gpr + g) * K;
      for (int k = 0; k < K; ++k) out[k] += (bins[0][k] + bins[1][k]) + (bins[2][k] + bins[3][k]);
    }
  }
}

}  // namespace

const Kernels* scalar_kernels() {
  static const Kernels* k = make_kernels<Scalar>("scalar");
  return k;
}

void bin_rows(const Sketch& s, const float* dw, int64_t ld, int64_t r0, int64_t r1, float* grad) {
  switch (s.bits) {
    case 2: return bin_rows_bits<2>(s, dw, ld, r0, r1, grad);
    case 3: return bin_rows_bits<3>(s, dw, ld, r0, r1, grad);
    default: return bin_rows_bits<4>(s, dw, ld, r0, r1, grad);
  }
}

}  // namespace sketchtune
