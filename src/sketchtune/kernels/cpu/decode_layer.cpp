// sketchtune::decode_layer: one decoder layer of a Llama-family model for one new token, in one
// op call (fast_decode.py): RMSNorm, sketched q/k/v (+ bias), rotary, KV-cache write, causal
// attention over the cache, sketched o, residual, RMSNorm, sketched gate/up, SiLU-gate, sketched
// down, residual. A small model's decode step is otherwise dominated by the ~40 tensor ops a
// layer costs in Python; here only the seven GEMVs touch memory of any size.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "lut_ops.h"

namespace sketchtune {
namespace {

using at::Tensor;

// out = weight * x / sqrt(mean(x²) + eps), fp32 (transformers' Llama RMSNorm).
void rms_norm(const float* x, const float* weight, int64_t n, double eps, float* out) {
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) sum += x[i] * x[i];
  const float scale = 1.f / std::sqrt(sum / static_cast<float>(n) + static_cast<float>(eps));
  for (int64_t i = 0; i < n; ++i) out[i] = weight[i] * (x[i] * scale);
}

// x (heads, dim) rotated in place: x * cos + rotate_half(x) * sin, halves as transformers splits.
void rotate(float* x, int64_t heads, int64_t dim, const float* cos, const float* sin) {
  const int64_t half = dim / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* v = x + h * dim;
    for (int64_t i = 0; i < half; ++i) {
      const float a = v[i], b = v[i + half];
      v[i] = a * cos[i] - b * sin[i];
      v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
  }
}

void project(const Tensor& codes, const Tensor& values, int64_t bits, const Tensor& bias,
             const float* x, float* y) {
  lut_gemv_row(codes, values, bits, x, y);
  if (bias.numel() > 0) {
    const float* b = bias.data_ptr<float>();
    for (int64_t i = 0; i < codes.size(0); ++i) y[i] += b[i];
  }
}

// x (1, hidden) fp32 -> x after the layer. Projections in the order q, k, v, o, gate, up, down;
// biases: fp32 or empty (none). keys/values: (kv_heads, max_len, head_dim) fp32; `pos` is the
// new token's position; cos/sin (head_dim,) for it.
Tensor decode_layer_cpu(const Tensor& x, const Tensor& norm_in, const Tensor& norm_post,
                        double eps, at::TensorList codes, at::TensorList values,
                        at::IntArrayRef bits, at::TensorList biases, const Tensor& keys,
                        const Tensor& vals, int64_t pos, const Tensor& cos, const Tensor& sin,
                        int64_t heads, double scaling) {
  TORCH_CHECK(codes.size() == 7 && values.size() == 7 && bits.size() == 7 && biases.size() == 7,
              "sketchtune: decode_layer takes q, k, v, o, gate, up, down");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.numel() == norm_in.numel(),
              "sketchtune: decode_layer takes one contiguous fp32 row");
  TORCH_CHECK(keys.dim() == 3 && keys.is_contiguous() && vals.is_contiguous() &&
                  keys.scalar_type() == at::kFloat && pos < keys.size(1),
              "sketchtune: decode_layer's cache must be (kv_heads, max_len, head_dim) fp32");
  const int64_t hidden = x.numel(), kv_heads = keys.size(0), dim = keys.size(2);
  const int64_t group = heads / kv_heads, length = pos + 1;
  TORCH_CHECK(heads % kv_heads == 0 && codes[0].size(0) == heads * dim &&
                  codes[1].size(0) == kv_heads * dim && codes[2].size(0) == kv_heads * dim,
              "sketchtune: decode_layer's q/k/v do not fit the heads");
  Tensor out = x.clone();
  float* residual = out.data_ptr<float>();
  const int64_t inter = codes[4].size(0);
  std::vector<float> h(std::max(hidden, inter)), q(heads * dim), k(kv_heads * dim),
      v(kv_heads * dim), attn(heads * dim), y(std::max(hidden, inter)), up(inter),
      scores(length);

  rms_norm(residual, norm_in.data_ptr<float>(), hidden, eps, h.data());
  project(codes[0], values[0], bits[0], biases[0], h.data(), q.data());
  project(codes[1], values[1], bits[1], biases[1], h.data(), k.data());
  project(codes[2], values[2], bits[2], biases[2], h.data(), v.data());
  rotate(q.data(), heads, dim, cos.data_ptr<float>(), sin.data_ptr<float>());
  rotate(k.data(), kv_heads, dim, cos.data_ptr<float>(), sin.data_ptr<float>());
  float* key_cache = keys.data_ptr<float>();
  float* value_cache = vals.data_ptr<float>();
  const int64_t stride = keys.size(1) * dim;  // one kv head's rows
  for (int64_t g = 0; g < kv_heads; ++g) {
    std::copy_n(k.data() + g * dim, dim, key_cache + g * stride + pos * dim);
    std::copy_n(v.data() + g * dim, dim, value_cache + g * stride + pos * dim);
  }
  for (int64_t head = 0; head < heads; ++head) {  // softmax(q Kᵀ · scaling) V over the cache
    const float* qh = q.data() + head * dim;
    const float* kh = key_cache + (head / group) * stride;
    const float* vh = value_cache + (head / group) * stride;
    float top = -INFINITY;
    for (int64_t t = 0; t < length; ++t) {
      float dot = 0.f;
      for (int64_t i = 0; i < dim; ++i) dot += qh[i] * kh[t * dim + i];
      scores[t] = dot * static_cast<float>(scaling);
      top = std::max(top, scores[t]);
    }
    float total = 0.f;
    for (int64_t t = 0; t < length; ++t) total += scores[t] = std::exp(scores[t] - top);
    float* oh = attn.data() + head * dim;
    std::fill_n(oh, dim, 0.f);
    for (int64_t t = 0; t < length; ++t) {
      const float p = scores[t] / total;
      for (int64_t i = 0; i < dim; ++i) oh[i] += p * vh[t * dim + i];
    }
  }
  project(codes[3], values[3], bits[3], biases[3], attn.data(), y.data());
  for (int64_t i = 0; i < hidden; ++i) residual[i] += y[i];

  rms_norm(residual, norm_post.data_ptr<float>(), hidden, eps, h.data());
  project(codes[4], values[4], bits[4], biases[4], h.data(), y.data());
  project(codes[5], values[5], bits[5], biases[5], h.data(), up.data());
  for (int64_t i = 0; i < inter; ++i) h[i] = y[i] / (1.f + std::exp(-y[i])) * up[i];
  project(codes[6], values[6], bits[6], biases[6], h.data(), y.data());
  for (int64_t i = 0; i < hidden; ++i) residual[i] += y[i];
  return out;
}

}  // namespace
}  // namespace sketchtune

TORCH_LIBRARY_FRAGMENT(sketchtune, m) {
  m.def(
      "decode_layer(Tensor x, Tensor norm_in, Tensor norm_post, float eps, Tensor[] codes, "
      "Tensor[] values, int[] bits, Tensor[] biases, Tensor(a!) keys, Tensor(b!) vals, int pos, "
      "Tensor cos, Tensor sin, int heads, float scaling) -> Tensor");
}

TORCH_LIBRARY_IMPL(sketchtune, CPU, m) { m.impl("decode_layer", &sketchtune::decode_layer_cpu); }
