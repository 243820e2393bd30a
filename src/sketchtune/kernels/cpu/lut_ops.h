// What ops.cpp offers the other torch-facing files (decode_layer.cpp).
#pragma once

#include <ATen/ATen.h>

namespace sketchtune {

// y (d_out) = x (d_in) Ŵᵀ for one fp32 row through the LUT GEMV (the kernels in use, rows spread
// over torch's intra-op threads). codes (d_out, d_in * bits / 8) uint8 and values (d_out, gpr,
// 2**bits) fp32 or bf16, both contiguous.
void lut_gemv_row(const at::Tensor& codes, const at::Tensor& values, int64_t bits, const float* x,
                  float* y);

}  // namespace sketchtune
