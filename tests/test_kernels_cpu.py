"""The C++ CPU kernels against kernels/reference.py: every ISA, bits/gpr setting and path."""

import itertools
import os
import subprocess
import sys
import warnings

import pytest
import torch

from sketchtune import kernels
from sketchtune.errors import SketchtuneError
from sketchtune.format import FormatError, check_shape, pack_codes
from sketchtune.kernels import cpu, reference
from sketchtune.layers import SketchLinear

if not cpu.available():
    pytest.skip("the CPU extension could not be built here", allow_module_level=True)

ops = torch.ops.sketchtune
ROWS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16, 17)
SETTINGS = list(itertools.product((2, 3, 4), (1, 2, 4, 8)))


ISAS = kernels.runnable_cpu_isas()


@pytest.fixture(params=ISAS)
def isa(request):
    with kernels.compute_path(request.param):
        yield request.param


def sketch(d_out, d_in, bits, gpr, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (d_out, d_in), generator=g, dtype=torch.uint8)
    values = torch.randn(d_out, gpr, 1 << bits, generator=g)
    return codes, pack_codes(codes, bits), values


def group_sizes(bits, gpr):
    """Group lengths around the SIMD chunk sizes (8, 16), odd ones included where they pack."""
    out = []
    for size in (3, 5, 8, 16, 19, 24, 40, 72, 136, 144):
        try:
            check_shape(size * gpr, bits, gpr)
            out.append(size)
        except FormatError:
            pass
    return out


def assert_matches_reference(codes, packed, values, bits, x, atol=2e-4):
    grad = torch.randn(*x.shape[:-1], codes.shape[0])
    y = ops.lut_linear(x, packed, values, bits)
    torch.testing.assert_close(
        y, reference.lut_linear_forward(x, codes, values), rtol=1e-4, atol=atol
    )
    dx = ops.lut_linear_input_grad(grad, packed, values, bits)
    torch.testing.assert_close(
        dx, reference.lut_linear_input_grad(grad, codes, values), rtol=1e-4, atol=atol
    )
    dv = ops.lut_linear_values_grad(grad, x, packed, values, bits)
    torch.testing.assert_close(
        dv, reference.lut_linear_values_grad(grad, x, codes, values), rtol=1e-4, atol=atol
    )


@pytest.mark.parametrize("bits,gpr", SETTINGS)
def test_every_kernel_matches_reference(isa, bits, gpr):
    # Rows 1..16 take the LUT GEMV (in passes of 4), 17 the tiled dequantize + GEMM.
    for i, size in enumerate(group_sizes(bits, gpr)):
        d_out = (7, 13, 1, 33)[i % 4]
        codes, packed, values = sketch(d_out, size * gpr, bits, gpr, seed=i)
        for n in ROWS[i % 3 :: 3]:
            x = torch.randn(n, size * gpr)
            assert_matches_reference(codes, packed, values, bits, x)


@pytest.mark.parametrize("bits,gpr", SETTINGS)
def test_bf16_tables_match_the_reference_on_their_fp32_values(isa, bits, gpr):
    # bf16 values (as stored on disk): the GEMV reads them directly, the tiled path widens them.
    # 1280 columns: whole 64- and 128-code chunks inside later groups too.
    for i, size in enumerate([*group_sizes(bits, gpr), 1280 // gpr]):
        d_out = (7, 13, 1, 33)[i % 4]
        codes, packed, values = sketch(d_out, size * gpr, bits, gpr, seed=i)
        values = values.bfloat16()
        for n in ROWS[i % 3 :: 3]:
            x = torch.randn(n, size * gpr)
            torch.testing.assert_close(
                ops.lut_linear(x, packed, values, bits),
                reference.lut_linear_forward(x, codes, values.float()),
                rtol=1e-4, atol=2e-4,
            )


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_multi_tile_shapes_and_leading_dims(bits):
    # About 1.1M weights: more than one dequantized tile in every direction.
    codes, packed, values = sketch(1100, 1032 if bits == 3 else 1028, bits, 4, seed=bits)
    x = torch.randn(2, 17, codes.shape[1])
    assert_matches_reference(codes, packed, values, bits, x, atol=1e-3)
    assert_matches_reference(codes, packed, values, bits, x[:1, :3], atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits,gpr", [(4, 4), (3, 2), (2, 8)])
@pytest.mark.parametrize("n", [1, 6, 40])
def test_half_precision_activations(dtype, bits, gpr, n):
    codes, packed, values = sketch(24, 48 * gpr, bits, gpr, seed=n)
    x = torch.randn(n, 48 * gpr).to(dtype)
    grad = torch.randn(n, 24).to(dtype)
    # fp32 accumulation throughout. The GEMV (n <= 16) reads the fp32 tables; the tiled GEMMs run
    # in bf16 for bf16 inputs, on the tables rounded to bf16, and in fp32 for fp16 inputs.
    gemm_tables = values.bfloat16().float() if dtype == torch.bfloat16 else values
    forward_tables = values if n <= 16 else gemm_tables
    y = ops.lut_linear(x, packed, values, bits)
    assert y.dtype == dtype
    torch.testing.assert_close(
        y.float(), reference.lut_linear_forward(x.float(), codes, forward_tables),
        rtol=1e-2, atol=2e-2,
    )
    dx = ops.lut_linear_input_grad(grad, packed, values, bits)
    assert dx.dtype == dtype
    expected = reference.lut_linear_input_grad(grad.float(), codes, gemm_tables)
    torch.testing.assert_close(dx.float(), expected, rtol=1e-2, atol=2e-2)
    dv = ops.lut_linear_values_grad(grad, x, packed, values, bits)
    assert dv.dtype == torch.float32
    rounding = torch.bfloat16 if dtype == torch.bfloat16 else None
    torch.testing.assert_close(
        dv, reference.lut_linear_values_grad(grad, x, codes, values, rounding),
        rtol=1e-4, atol=1e-3,
    )


def test_bf16_values_grad_rounds_the_weight_gradient_once():
    # bf16 dY and X: dŴ comes out of a bf16 GEMM, rounded to bf16 before the bins; binned
    # without that rounding it differs by about that rounding.
    codes, packed, values = sketch(64, 256, 4, 4, seed=3)
    x, grad = torch.randn(40, 256).bfloat16(), torch.randn(40, 64).bfloat16()
    dv = ops.lut_linear_values_grad(grad, x, packed, values, 4)
    rounded = reference.lut_linear_values_grad(grad, x, codes, values, torch.bfloat16)
    unrounded = reference.lut_linear_values_grad(grad, x, codes, values)
    torch.testing.assert_close(dv, rounded, rtol=1e-4, atol=1e-3)
    assert (rounded - unrounded).abs().max() > 1e-3


@pytest.mark.parametrize("bits,gpr", [(4, 2), (3, 1), (2, 4)])
def test_autograd_through_the_op_matches_reference(bits, gpr):
    codes, packed, values = sketch(20, 40 * gpr, bits, gpr, seed=11)
    for shape in [(3, 40 * gpr), (2, 7, 40 * gpr)]:
        x = torch.randn(shape, requires_grad=True)
        v = values.clone().requires_grad_(True)
        y = kernels.lut_linear(x, packed, v, bits)
        y.pow(2).sum().backward()
        x_ref = x.detach().clone().requires_grad_(True)
        v_ref = values.clone().requires_grad_(True)
        reference_y = kernels.lut_linear(x_ref, codes, v_ref)
        reference_y.pow(2).sum().backward()
        assert y.grad_fn.name().startswith("torch::autograd::CppNode")
        torch.testing.assert_close(y, reference_y, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(v.grad, v_ref.grad, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("d_in", [1, 7, 8, 33, 64, 579])
def test_bf16_linear_matches_fp32_arithmetic_on_the_bf16_weight(isa, d_in):
    g = torch.Generator().manual_seed(d_in)
    for d_out, n in ((1, 1), (5, 2), (70, 3), (33, 4), (9, 5), (40, 8)):  # 2n rows <= 16
        weight = torch.randn(d_out, d_in, generator=g).bfloat16()
        x = torch.randn(2, n, d_in, generator=g)
        torch.testing.assert_close(
            ops.bf16_linear(x, weight), x @ weight.float().T, rtol=1e-4, atol=1e-4
        )
    # past 16 rows: torch's fp32 GEMM on the widened weight, the same arithmetic
    weight, x = torch.randn(6, d_in).bfloat16(), torch.randn(17, d_in)
    torch.testing.assert_close(
        ops.bf16_linear(x, weight), x @ weight.float().T, rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("tables", [torch.float32, torch.bfloat16])
def test_gemv_reads_strided_and_batched_activations(tables):
    # The GEMV reads contiguous fp32 rows in place; any other layout goes through a copy.
    codes, packed, values = sketch(40, 96, 4, 4, seed=5)
    values = values.to(tables)
    for x in (torch.randn(96, 5).T, torch.randn(1, 1, 96), torch.randn(3, 2, 96)[:, 1]):
        torch.testing.assert_close(
            ops.lut_linear(x, packed, values, 4),
            reference.lut_linear_forward(x, codes, values.float()),
            rtol=1e-4, atol=2e-4,
        )


def test_empty_batch():
    codes, packed, values = sketch(12, 64, 4, 4)
    x = torch.randn(0, 64)
    assert_matches_reference(codes, packed, values, 4, x)


def test_values_only_and_input_only_gradients():
    codes, packed, values = sketch(12, 64, 4, 4)
    v = values.clone().requires_grad_(True)
    kernels.lut_linear(torch.randn(5, 64), packed, v, 4).sum().backward()
    assert v.grad is not None and v.grad.shape == values.shape
    x = torch.randn(5, 64, requires_grad=True)
    kernels.lut_linear(x, packed, values, 4).sum().backward()
    torch.testing.assert_close(
        x.grad, reference.lut_linear_input_grad(torch.ones(5, 12), codes, values)
    )


def test_torch_compile_sees_one_op_with_its_backward():
    codes, packed, values = sketch(16, 32, 4, 2)
    x = torch.randn(3, 32, requires_grad=True)
    v = values.clone().requires_grad_(True)
    compiled = torch.compile(
        lambda a, b: ops.lut_linear(a, packed, b, 4).sum(), backend="aot_eager", fullgraph=True
    )
    compiled(x, v).backward()
    expected_x = x.grad.clone()
    x.grad = None
    ops.lut_linear(x, packed, v.detach(), 4).sum().backward()
    torch.testing.assert_close(expected_x, x.grad)
    torch.testing.assert_close(
        v.grad, reference.lut_linear_values_grad(torch.ones(3, 16), x, codes, values)
    )


def test_layer_uses_the_fast_op_and_agrees_with_the_reference_path():
    codes, packed, values = sketch(24, 96, 3, 4, seed=5)
    layer = SketchLinear(96, 24, bits=3, gpr=4, bias=True)
    layer.codes.copy_(packed)
    with torch.no_grad():
        layer.values.copy_(values)
        layer.bias.normal_()
    x = torch.randn(2, 5, 96)
    y = layer(x)
    assert "CppNode" in y.grad_fn.next_functions[0][0].name()  # bias add <- the C++ op
    with kernels.compute_path("reference"):
        expected = layer(x)
    assert "CppNode" not in expected.grad_fn.next_functions[0][0].name()
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)


def test_failed_build_warns_once_and_falls_back(monkeypatch):
    from torch.utils import cpp_extension

    def fail(**kwargs):
        raise RuntimeError("no compiler\nlong log")

    monkeypatch.setattr(cpu, "_loaded", None)
    monkeypatch.setattr(cpp_extension, "load", fail)
    codes, packed, values = sketch(4, 16, 4, 1)
    with pytest.warns(RuntimeWarning, match="no compiler"):
        y = kernels.lut_linear(torch.randn(2, 16), packed, values, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels.lut_linear(torch.randn(2, 16), packed, values, 4)
    assert y.grad_fn is None or "CppNode" not in y.grad_fn.name()


def test_bad_arguments_are_clear_errors():
    _, packed, values = sketch(4, 16, 4, 1)
    with pytest.raises(RuntimeError, match="do not hold"):
        ops.lut_linear(torch.randn(2, 24), packed, values, 4)
    with pytest.raises(RuntimeError, match="bits must be"):
        ops.lut_linear(torch.randn(2, 16), packed, values, 5)
    with pytest.raises(SketchtuneError, match="compute path 'neon'"):
        kernels.set_compute_path("neon")


def test_compute_path_switches_and_restores():
    x = torch.randn(3, 16)
    _, packed, values = sketch(8, 16, 4, 2)
    fast = kernels.lut_linear(x, packed, values, 4)
    with kernels.compute_path("reference"):
        assert kernels.current_path() == "reference"
        with kernels.compute_path("scalar"):
            assert kernels.current_path() == "scalar"
        assert kernels.current_path() == "reference"
        reference = kernels.lut_linear(x, packed, values, 4)
    assert kernels.current_path() == cpu.isa("best")
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)


def test_environment_starts_on_the_reference_path_without_building():
    script = ("import sketchtune.kernels as k; from sketchtune.kernels import cpu; "
              "print(k.current_path(), cpu._loaded)")
    env = {**os.environ, "SKETCHTUNE_KERNELS": "reference"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["reference", "None"]


def test_autocast_casts_activations_as_for_a_dense_layer():
    codes, packed, values = sketch(32, 64, 4, 2, seed=5)
    x = torch.randn(3, 20, 64, requires_grad=True)
    v = values.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = kernels.lut_linear(x, packed, v, 4)
        dense = torch.nn.functional.linear(x, torch.randn(32, 64))
    assert y.dtype == dense.dtype == torch.bfloat16
    torch.testing.assert_close(y, ops.lut_linear(x.detach().bfloat16(), packed, values, 4))
    y.float().sum().backward()
    grad = torch.ones(3, 20, 32, dtype=torch.bfloat16)
    expected = reference.lut_linear_values_grad(grad, x.detach().bfloat16(), codes, values,
                                                torch.bfloat16)
    torch.testing.assert_close(v.grad, expected, rtol=1e-4, atol=1e-3)
    assert x.grad.dtype == torch.float32
