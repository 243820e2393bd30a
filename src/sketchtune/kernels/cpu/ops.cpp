// The sketchtune::lut_linear op family on CPU: ISA choice, small-batch LUT GEMV, tiled
// dequantize + GEMM for larger batches and for both gradients, and the autograd wiring.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

#include "lut_kernels.h"
#include "lut_ops.h"
#include "row_pool.h"

namespace sketchtune {
namespace {

using at::Tensor;

constexpr int64_t kGemvMaxRows = 16;  // up to here the LUT GEMV (4 rows a pass) beats tiles
constexpr int64_t kTileFloats = 1 << 22;  // one dequantized tile: 16 MiB, within L3
// Weights per block of rows handed to a thread. Each block starts its rows' prefetches afresh, so
// small blocks wait on DRAM more often: a SmolLM2 decode token's 210 calls, each layer read once,
// took 8-15% less time with blocks of 64K weights than of 16K (and 16K than 4K).
constexpr int64_t kGrainWeights = 1 << 16;

std::atomic<const Kernels*> g_kernels{nullptr};

const Kernels* best_kernels() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f"))
    if (const Kernels* k = avx512_kernels()) return k;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    if (const Kernels* k = avx2_kernels()) return k;
#endif
  return scalar_kernels();
}

const Kernels& kernels() {
  const Kernels* k = g_kernels.load();
  if (k == nullptr) {
    k = best_kernels();
    g_kernels.store(k);
  }
  return *k;
}

// "" reports the kernels in use; "best", "scalar", "emu16", "avx2" or "avx512" selects (tests).
std::string cpu_isa(const std::string& request) {
  if (!request.empty()) {
    const Kernels* k = nullptr;
    if (request == "best") k = best_kernels();
    if (request == "scalar") k = scalar_kernels();
    if (request == "emu16") k = emu16_kernels();
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (request == "avx2" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      k = avx2_kernels();
    if (request == "avx512" && __builtin_cpu_supports("avx512f")) k = avx512_kernels();
#endif
    TORCH_CHECK(k != nullptr, "sketchtune: CPU kernels '", request, "' unavailable here");
    g_kernels.store(k);
  }
  return kernels().name;
}

Sketch sketch_of(const Tensor& codes, const Tensor& values, int64_t bits, int64_t d_in) {
  TORCH_CHECK(bits >= 2 && bits <= 4, "sketchtune: bits must be 2, 3 or 4, got ", bits);
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte,
              "sketchtune: codes must be a 2-D uint8 tensor");
  TORCH_CHECK(codes.size(1) * 8 == d_in * bits, "sketchtune: codes of shape ", codes.sizes(),
              " do not hold ", d_in, " ", bits, "-bit codes per row");
  TORCH_CHECK(values.dim() == 3 && values.size(0) == codes.size(0) &&
                  values.size(2) == (int64_t{1} << bits) && values.size(1) > 0 &&
                  d_in % values.size(1) == 0,
              "sketchtune: values of shape ", values.sizes(), " do not fit codes of shape ",
              codes.sizes(), " at ", bits, " bits");
  const bool bf16 = values.scalar_type() == at::kBFloat16;
  TORCH_CHECK(codes.is_contiguous() && values.is_contiguous() &&
                  (bf16 || values.scalar_type() == at::kFloat),
              "sketchtune: internal: codes and fp32 or bf16 values must be contiguous");
  const auto* raw = values.data_ptr();
  return {codes.data_ptr<uint8_t>(), bf16 ? nullptr : static_cast<const float*>(raw),
          bf16 ? static_cast<const uint16_t*>(raw) : nullptr, codes.size(0), d_in,
          values.size(1), bits};
}

int64_t grain_rows(int64_t d_in) { return std::max<int64_t>(1, kGrainWeights / d_in); }

// Tile extent along one dimension: a multiple of 16 holding about kTileFloats with `other`.
int64_t tile_extent(int64_t other, int64_t full) {
  const int64_t n = std::max<int64_t>(16, kTileFloats / std::max<int64_t>(other, 1) / 16 * 16);
  return std::min(n, full);
}

// fn(r0, r1) over [begin, end) in blocks of `grain` rows handed out on demand (row_pool.h): a
// thread that starts late (the machine is shared) takes fewer blocks, or none, and holds no one
// up. As many threads as torch's intra-op setting allows.
template <class F>
void parallel_rows(int64_t begin, int64_t end, int64_t grain, const F& fn) {
  const int64_t blocks = (end - begin + grain - 1) / grain;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), blocks);
  if (threads <= 1 || at::in_parallel_region()) {
    if (end > begin) fn(begin, end);
    return;
  }
  RowPool::instance().run(blocks, static_cast<int>(threads - 1), [&](int64_t b) {
    fn(begin + b * grain, std::min(end, begin + (b + 1) * grain));
  });
}

void dequant_parallel(const Sketch& s, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
                      float* out, int64_t ldo) {
  const Kernels& k = kernels();
  parallel_rows(r0, r1, grain_rows(c1 - c0), [&](int64_t b, int64_t e) {
    k.dequant(s, b, e, c0, c1, out + (b - r0) * ldo, ldo);
  });
}

// The same into bf16 bit patterns, for tables already rounded to bf16 (`gemm_tables`): each block
// goes through a cache-sized fp32 scratch, and dropping the low half of each entry is exact.
void dequant_parallel(const Sketch& s, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
                      uint16_t* out, int64_t ldo) {
  const Kernels& k = kernels();
  const int64_t width = c1 - c0;
  parallel_rows(r0, r1, grain_rows(width), [&](int64_t b, int64_t e) {
    thread_local std::vector<uint32_t> scratch;
    scratch.resize((e - b) * width);
    k.dequant(s, b, e, c0, c1, reinterpret_cast<float*>(scratch.data()), width);
    for (int64_t r = b; r < e; ++r) {
      const uint32_t* in = scratch.data() + (r - b) * width;
      uint16_t* o = out + (r - r0) * ldo;
      for (int64_t c = 0; c < width; ++c) o[c] = static_cast<uint16_t>(in[c] >> 16);
    }
  });
}

// Ŵ[r0:r1, c0:c1] into `tile` (row stride ldo) in the tile's dtype: fp32, or bf16.
void dequant_tile(const Sketch& s, int64_t r0, int64_t r1, int64_t c0, int64_t c1, Tensor& tile,
                  int64_t ldo) {
  if (tile.scalar_type() == at::kBFloat16)
    dequant_parallel(s, r0, r1, c0, c1, static_cast<uint16_t*>(tile.data_ptr()), ldo);
  else
    dequant_parallel(s, r0, r1, c0, c1, tile.data_ptr<float>(), ldo);
}

// The GEMMs of the tiled paths run in bf16 for bf16 activations (torch's bf16 GEMM, fp32
// accumulation and one rounding of each output, as F.linear computes for them: under autocast this
// is what a dense layer gets) and in fp32 for every other dtype.
at::ScalarType gemm_dtype(const Tensor& activations) {
  return activations.scalar_type() == at::kBFloat16 ? at::kBFloat16 : at::kFloat;
}

// Activation rows (n, width) contiguous in the GEMM's dtype.
Tensor gemm_rows(const Tensor& t, int64_t width, at::ScalarType dtype) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()) && t.scalar_type() != at::kDouble,
              "sketchtune: CPU kernels take float32, bfloat16 or float16 activations");
  return t.reshape({-1, width}).to(dtype).contiguous();
}

// Rows [row0, row0 + count) of a contiguous fp32 or bf16 matrix as fp32: in place, or widened
// into a per-thread scratch (exact) that stays valid until this thread's next call.
const float* fp32_rows(const Tensor& matrix, int64_t row0, int64_t count) {
  const int64_t width = matrix.size(1);
  if (matrix.scalar_type() == at::kFloat) return matrix.data_ptr<float>() + row0 * width;
  thread_local std::vector<uint32_t> wide;
  wide.resize(count * width);
  const uint16_t* in = static_cast<const uint16_t*>(matrix.data_ptr()) + row0 * width;
  for (int64_t i = 0; i < count * width; ++i) wide[i] = uint32_t{in[i]} << 16;
  return reinterpret_cast<const float*>(wide.data());
}

// fp32 tables for dequantizing into a GEMM of `dtype`: for bf16, rounded to bf16 first, so a
// dequantized weight is exactly `values.to(bf16)` gathered (the reference's Ŵ for bf16 inputs).
Tensor gemm_tables(const Tensor& values, at::ScalarType dtype) {
  const Tensor v = dtype == at::kBFloat16 ? values.to(at::kBFloat16) : values;
  return v.to(at::kFloat).contiguous();
}

// x (n, d_in) with every body chunk's columns (see `body_chunk_start`) in the kernels' lane
// order: x itself where that order is natural, else a copy in `buffer` (reused between calls).
const float* lane_order(const Gemv& k, const Sketch& s, const float* x, int64_t n,
                        std::vector<float>& buffer) {
  const int64_t L = k.chunk[s.bits];
  const int* column = k.lane_column[s.bits];
  bool natural = true;
  for (int64_t lane = 0; lane < L; ++lane) natural = natural && column[lane] == lane;
  if (natural) return x;
  buffer.assign(x, x + n * s.d_in);
  const int64_t group = s.group();
  for (int64_t g = 0; g < s.gpr; ++g) {
    const int64_t end = (g + 1) * group;
    for (int64_t c = body_chunk_start(g * group, s.bits); c + L <= end; c += L)
      for (int64_t b = 0; b < n; ++b)
        for (int64_t lane = 0; lane < L; ++lane)
          buffer[b * s.d_in + c + lane] = x[b * s.d_in + c + column[lane]];
  }
  return buffer.data();
}

// y (n, d_out) = x (n, d_in) Ŵᵀ, n <= kGemvMaxRows, through the LUT GEMV.
void lut_gemv(const Sketch& s, const float* x, int64_t n, float* y) {
  const Gemv& k = s.values_bf16 ? kernels().gemv_bf16 : kernels().gemv;
  if (n == 0) return;
  thread_local std::vector<float> buffer;
  const float* xl = lane_order(k, s, x, n, buffer);
  parallel_rows(0, s.d_out, grain_rows(s.d_in * n), [&](int64_t r0, int64_t r1) {
    for (int64_t b = 0; b < n; b += kGemvRows) {
      const GemvArgs a{x + b * s.d_in, xl + b * s.d_in, y + b * s.d_out,
                       std::min<int64_t>(kGemvRows, n - b), s.d_out};
      k.run(s, a, r0, r1);
    }
  });
}

// y[:, tile] = x Ŵ[tile]ᵀ over row tiles: only one dequantized tile exists at a time.
void tiled_forward(const Sketch& s, const Tensor& x, Tensor& y) {
  const int64_t rows = tile_extent(s.d_in, s.d_out);
  Tensor w = at::empty({rows, s.d_in}, x.options());
  for (int64_t r0 = 0; r0 < s.d_out; r0 += rows) {
    const int64_t n = std::min(rows, s.d_out - r0);
    dequant_tile(s, r0, r0 + n, 0, s.d_in, w, s.d_in);
    Tensor out = y.narrow(1, r0, n);
    at::mm_out(out, x, w.narrow(0, 0, n).t());
  }
}

Tensor lut_linear_cpu(const Tensor& x, const Tensor& codes, const Tensor& values, int64_t bits) {
  const int64_t d_in = x.size(-1);
  auto sizes = x.sizes().vec();
  sizes.back() = codes.size(0);
  const int64_t n = d_in > 0 ? x.numel() / d_in : 0;
  const Tensor c = codes.contiguous();
  if (n > kGemvMaxRows) {
    const at::ScalarType dtype = gemm_dtype(x);
    const Tensor x2 = gemm_rows(x, d_in, dtype), v = gemm_tables(values, dtype);
    const Sketch s = sketch_of(c, v, bits, d_in);
    Tensor y = at::empty({n, s.d_out}, x2.options());
    tiled_forward(s, x2, y);
    return y.to(x.scalar_type()).view(sizes);
  }
  // The GEMV reads bf16 tables as they are (half the table bytes), and fp32 activations in
  // place: a decode step calls this some 200 times per token, so each tensor op saved counts.
  const Tensor v = values.scalar_type() == at::kBFloat16 ? values.contiguous()
                                                         : values.to(at::kFloat).contiguous();
  const Sketch s = sketch_of(c, v, bits, d_in);
  const bool in_place = x.scalar_type() == at::kFloat && x.is_contiguous();
  const Tensor x2 = in_place ? x : gemm_rows(x, d_in, at::kFloat);
  Tensor y = at::empty(sizes, x2.options());
  lut_gemv(s, x2.data_ptr<float>(), n, y.data_ptr<float>());
  return in_place ? y : y.to(x.scalar_type());
}

// y = x Wᵀ for a dense bf16 weight, fp32 arithmetic: small batches read W once through the
// kernels; larger ones run torch's bf16 GEMM (the rounding of x to bf16 is then torch's).
Tensor bf16_linear_cpu(const Tensor& x, const Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16,
              "sketchtune: bf16_linear takes a 2-D bfloat16 weight");
  const int64_t d_in = x.size(-1), d_out = weight.size(0);
  TORCH_CHECK(weight.size(1) == d_in, "sketchtune: weight of shape ", weight.sizes(),
              " does not fit inputs of width ", d_in);
  auto sizes = x.sizes().vec();
  sizes.back() = d_out;
  const Tensor x2 = gemm_rows(x, d_in, at::kFloat);
  const int64_t n = x2.size(0);
  if (n > kGemvMaxRows)  // prefill: fp32 GEMM on the widened weight (exact), as the GEMV computes
    return at::linear(x2, weight.to(at::kFloat)).to(x.scalar_type()).view(sizes);
  Tensor y = at::empty({n, d_out}, x2.options());
  if (n == 0) return y.to(x.scalar_type()).view(sizes);
  const Tensor w = weight.contiguous();
  const auto* wp = static_cast<const uint16_t*>(w.data_ptr());
  const Kernels& k = kernels();
  const float* xp = x2.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  parallel_rows(0, d_out, grain_rows(d_in * n), [&](int64_t r0, int64_t r1) {
    for (int64_t b = 0; b < n; b += kGemvRows) {
      const GemvArgs a{xp + b * d_in, nullptr, yp + b * d_out, std::min<int64_t>(kGemvRows, n - b),
                       d_out};
      k.bf16_gemv(wp, d_in, a, r0, r1);
    }
  });
  return y.to(x.scalar_type()).view(sizes);
}

// dX = dY Ŵ over column tiles of Ŵ.
Tensor lut_linear_input_grad_cpu(const Tensor& grad_out, const Tensor& codes,
                                 const Tensor& values, int64_t bits) {
  const int64_t d_in = codes.size(1) * 8 / bits;
  const at::ScalarType dtype = gemm_dtype(grad_out);
  const Tensor c = codes.contiguous(), v = gemm_tables(values, dtype);
  const Sketch s = sketch_of(c, v, bits, d_in);
  const Tensor g = gemm_rows(grad_out, s.d_out, dtype);
  Tensor dx = at::empty({g.size(0), d_in}, g.options());
  const int64_t cols = tile_extent(s.d_out, d_in);
  Tensor w = at::empty({s.d_out, cols}, g.options());
  for (int64_t c0 = 0; c0 < d_in; c0 += cols) {
    const int64_t n = std::min(cols, d_in - c0);
    Tensor tile = w.view(-1).narrow(0, 0, s.d_out * n).view({s.d_out, n});
    dequant_tile(s, 0, s.d_out, c0, c0 + n, tile, n);
    Tensor out = dx.narrow(1, c0, n);
    at::mm_out(out, g, tile);
  }
  auto sizes = grad_out.sizes().vec();
  sizes.back() = d_in;
  return dx.to(grad_out.scalar_type()).view(sizes);
}

// dvalues: dŴ = dYᵀ X one row tile at a time, each tile binned by code before the next. With bf16
// dY and X the tile is a bf16 GEMM's output, widened to fp32 block by block for the bins.
Tensor lut_linear_values_grad_cpu(const Tensor& grad_out, const Tensor& x, const Tensor& codes,
                                  const Tensor& values, int64_t bits) {
  const int64_t d_in = x.size(-1);
  const at::ScalarType dtype =
      grad_out.scalar_type() == x.scalar_type() ? gemm_dtype(x) : at::kFloat;
  const Tensor c = codes.contiguous(), v = values.to(at::kFloat).contiguous();
  const Sketch s = sketch_of(c, v, bits, d_in);
  const Tensor g = gemm_rows(grad_out, s.d_out, dtype), x2 = gemm_rows(x, d_in, dtype);
  Tensor grad = at::zeros(values.sizes(), g.options().dtype(at::kFloat));
  const int64_t rows = tile_extent(d_in, s.d_out);
  Tensor dw = at::empty({rows, d_in}, g.options());
  float* gp = grad.data_ptr<float>();
  for (int64_t r0 = 0; r0 < s.d_out; r0 += rows) {
    const int64_t n = std::min(rows, s.d_out - r0);
    Tensor tile = dw.narrow(0, 0, n);
    at::mm_out(tile, g.narrow(1, r0, n).t(), x2);
    parallel_rows(r0, r0 + n, grain_rows(d_in), [&](int64_t b, int64_t e) {
      bin_rows(s, fp32_rows(tile, b - r0, e - b), d_in, b, e, gp);
    });
  }
  return grad.to(values.scalar_type());
}

const c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t)>&
forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("sketchtune::lut_linear", "")
                             .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t)>();
  return op;
}

class LutLinearFunction : public torch::autograd::Function<LutLinearFunction> {
 public:
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x,
                        const Tensor& codes, const Tensor& values, int64_t bits) {
    ctx->save_for_backward({x, codes, values});
    ctx->saved_data["bits"] = bits;
    at::AutoDispatchBelowADInplaceOrView below;
    return forward_op().call(x, codes, values, bits);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &codes = saved[1], &values = saved[2];
    const int64_t bits = ctx->saved_data["bits"].toInt();
    static const auto input_grad =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("sketchtune::lut_linear_input_grad", "")
            .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t)>();
    static const auto values_grad =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("sketchtune::lut_linear_values_grad", "")
            .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t)>();
    Tensor dx, dvalues;
    if (ctx->needs_input_grad(0)) dx = input_grad.call(grads[0], codes, values, bits);
    if (ctx->needs_input_grad(2)) dvalues = values_grad.call(grads[0], x, codes, values, bits);
    return {dx, Tensor(), dvalues, Tensor()};
  }
};

Tensor lut_linear_autograd(const Tensor& x, const Tensor& codes, const Tensor& values,
                           int64_t bits) {
  if (!at::GradMode::is_enabled() || !(x.requires_grad() || values.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView below;  // inference: no graph to record
    return forward_op().call(x, codes, values, bits);
  }
  return LutLinearFunction::apply(x, codes, values, bits);
}

}  // namespace

void lut_gemv_row(const Tensor& codes, const Tensor& values, int64_t bits, const float* x,
                  float* y) {
  lut_gemv(sketch_of(codes, values, bits, codes.size(1) * 8 / bits), x, 1, y);
}

}  // namespace sketchtune

TORCH_LIBRARY_FRAGMENT(sketchtune, m) {
  m.def("lut_linear(Tensor x, Tensor codes, Tensor values, int bits) -> Tensor");
  m.def("lut_linear_input_grad(Tensor grad_out, Tensor codes, Tensor values, int bits) -> Tensor");
  m.def(
      "lut_linear_values_grad(Tensor grad_out, Tensor x, Tensor codes, Tensor values, int bits)"
      " -> Tensor");
  m.def("bf16_linear(Tensor x, Tensor weight) -> Tensor");
  m.def("cpu_isa(str request) -> str", &sketchtune::cpu_isa);
}

TORCH_LIBRARY_IMPL(sketchtune, CPU, m) {
  m.impl("lut_linear", &sketchtune::lut_linear_cpu);
  m.impl("lut_linear_input_grad", &sketchtune::lut_linear_input_grad_cpu);
  m.impl("lut_linear_values_grad", &sketchtune::lut_linear_values_grad_cpu);
  m.impl("bf16_linear", &sketchtune::bf16_linear_cpu);
}

TORCH_LIBRARY_IMPL(sketchtune, Autograd, m) {
  m.impl("lut_linear", &sketchtune::lut_linear_autograd);
}
