"""The Triton kernels against kernels/reference.py: every kernel, bits/gpr setting and path.

With CUDA they run on the GPU; without, on CPU tensors under the Triton interpreter, with small
tiles (the interpreter runs each tile op in numpy). The same tests, unchanged, cover both.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("triton")

from sketchtune import kernels  # noqa: E402
from sketchtune.format import FormatError, check_shape, dequantize, pack_codes  # noqa: E402
from sketchtune.kernels import cpu, reference  # noqa: E402
from sketchtune.kernels import triton as gpu  # noqa: E402
from sketchtune.layers import SketchLinear  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SETTINGS = list(itertools.product((2, 3, 4), (1, 2, 4, 8)))
SMALL = dict(block_m=16, block_n=16, block_k=16)  # tiles for tiny shapes
SMALL_VALUES = dict(block_r=16, block_c=16, block_t=16)


def import_kernels() -> dict:
    """The kernel modules, decorated for DEVICE: on CPU under the Triton interpreter.

    @triton.jit reads TRITON_INTERPRET when it decorates, so the variable is set around the
    imports, and modules that something imported earlier without it are decorated again (in
    dependency order). The kernels use no triton-internal jitted helpers, so it does not matter
    whether triton itself was imported before.
    """
    names = ("tiles", "gemv", "gemm", "input_grad", "values_grad", "ops")
    if DEVICE.type == "cuda":
        return {n: importlib.import_module(f"sketchtune.kernels.triton.{n}") for n in names}
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        modules = {}
        for name in names:
            full = f"sketchtune.kernels.triton.{name}"
            was_loaded = full in sys.modules
            modules[name] = importlib.import_module(full)
            if was_loaded:
                modules[name] = importlib.reload(modules[name])
        return modules
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


K = import_kernels()


def sketch(d_out, d_in, bits, gpr, seed=0):
    """Unpacked codes, packed codes and tables on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (d_out, d_in), generator=g, dtype=torch.uint8)
    values = torch.randn(d_out, gpr, 1 << bits, generator=g)
    return codes.to(DEVICE), pack_codes(codes, bits).to(DEVICE), values.to(DEVICE)


def randn(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


def input_size(bits, gpr):
    """33..64 columns (three 16-wide tiles), in groups of odd size where the format allows."""
    for size in [*range(1, 65, 2), *range(2, 65, 2)]:
        try:
            check_shape(size * gpr, bits, gpr)
        except FormatError:
            continue
        if 33 <= size * gpr <= 64:
            return size * gpr
    raise AssertionError("no packable size")


def close(actual, expected, atol=1e-4):
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("bits,gpr", SETTINGS)
def test_every_kernel_matches_reference(bits, gpr):
    d_in = input_size(bits, gpr)
    codes, packed, values = sketch(13, d_in, bits, gpr, seed=bits * 10 + gpr)
    for rows, split_k in ((1, 1), (5, 2), (8, 3)):  # GEMV, with and without split-K partial sums
        x = randn(rows, d_in, seed=rows)
        y = K["gemv"].lut_gemv(x, packed, values, bits, block_n=8, block_k=16, split_k=split_k)
        close(y, reference.lut_linear_forward(x, codes, values))
    x, grad = randn(19, d_in, seed=1), randn(19, 13, seed=2)
    close(K["gemm"].lut_gemm(x, packed, values, bits, **SMALL),
          reference.lut_linear_forward(x, codes, values))
    close(K["input_grad"].lut_input_grad(grad, packed, values, bits, **SMALL),
          reference.lut_linear_input_grad(grad, codes, values))
    close(K["values_grad"].lut_values_grad(grad, x, packed, values, bits, **SMALL_VALUES),
          reference.lut_linear_values_grad(grad, x, codes, values), atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits,gpr", [(4, 4), (3, 2), (2, 8)])
def test_half_precision_activations(dtype, bits, gpr):
    codes, packed, values = sketch(13, 32 * gpr, bits, gpr, seed=7)
    weight = dequantize(codes, values)
    for rows in (2, 21):  # GEMV and GEMM
        x = randn(rows, 32 * gpr, seed=rows, dtype=dtype)
        y = K["ops"].lut_linear_forward(x, packed, values, bits)
        assert y.dtype == dtype
        # fp32 accumulation; the GEMM rounds Ŵ to the activation dtype: error ~ 2^-8 Σ|x||w|.
        bound = 8e-3 * (x.float().abs() @ weight.abs().T) + 1e-5
        assert ((y.float() - x.float() @ weight.T).abs() <= bound).all()
    grad = randn(21, 13, seed=3, dtype=dtype)
    dx = K["input_grad"].lut_input_grad(grad, packed, values, bits, **SMALL)
    assert dx.dtype == dtype
    bound = 8e-3 * (grad.float().abs() @ weight.abs()) + 1e-5
    assert ((dx.float() - grad.float() @ weight).abs() <= bound).all()
    dv = K["values_grad"].lut_values_grad(grad, x, packed, values, bits, **SMALL_VALUES)
    assert dv.dtype == torch.float32  # products of half-precision inputs are exact in fp32
    close(dv, reference.lut_linear_values_grad(grad, x, codes, values), atol=1e-3)


def test_op_functions_take_any_leading_shape_default_tiles_and_empty_batches():
    codes, packed, values = sketch(24, 96, 4, 4, seed=3)
    ops = K["ops"]
    for shape in [(2, 3, 96), (2, 17, 96), (0, 96)]:
        x, grad = randn(*shape, seed=4), randn(*shape[:-1], 24, seed=5)
        y = ops.lut_linear_forward(x, packed, values, 4)
        assert y.shape == (*shape[:-1], 24)
        close(y, reference.lut_linear_forward(x, codes, values))
        close(K["input_grad"].lut_input_grad(grad, packed, values, 4),
              reference.lut_linear_input_grad(grad, codes, values))
        close(K["values_grad"].lut_values_grad(grad, x, packed, values, 4),
              reference.lut_linear_values_grad(grad, x, codes, values), atol=1e-3)


def test_bad_arguments_are_clear_errors():
    _, packed, values = sketch(4, 32, 4, 1)
    with pytest.raises(ValueError, match="do not hold"):
        K["ops"].lut_linear_forward(randn(2, 24), packed, values, 4)
    with pytest.raises(ValueError, match="bits must be"):
        K["ops"].lut_linear_forward(randn(2, 32), packed, values, 5)
    with pytest.raises(ValueError, match="activations"):
        K["ops"].lut_linear_forward(randn(2, 32).double(), packed, values, 4)
    with pytest.raises(ValueError, match="power of two"):
        K["gemm"].lut_gemm(randn(20, 32), packed, values, 4, block_k=24)
    with pytest.raises(ValueError, match="at most 8 rows"):
        K["gemv"].lut_gemv(randn(9, 32), packed, values, 4)


def test_autograd_function_matches_reference(monkeypatch):
    # The path taken when the C++ extension (which defines the ops) cannot be built.
    monkeypatch.setattr(K["ops"], "register", lambda: False)
    codes, packed, values = sketch(20, 48, 3, 2, seed=11)
    x = randn(2, 9, 48, seed=12).requires_grad_(True)
    v = values.clone().requires_grad_(True)
    y = gpu.lut_linear(x, packed, v, 3)
    assert type(y.grad_fn).__name__ == "LutLinearFunctionBackward"
    y.pow(2).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    v_ref = values.clone().requires_grad_(True)
    kernels.lut_linear(x_ref, codes, v_ref).pow(2).sum().backward()
    close(x.grad, x_ref.grad)
    close(v.grad, v_ref.grad, atol=1e-3)


def test_dispatcher_sends_fast_gpu_tensors_to_triton(monkeypatch):
    layer = SketchLinear(48, 12, bits=4, gpr=4, bias=True, device=DEVICE)
    _, packed, values = sketch(12, 48, 4, 4, seed=13)
    layer.codes.copy_(packed)
    with torch.no_grad():
        layer.values.copy_(values)
        layer.bias.normal_()
    x = randn(3, 48, seed=14)
    with kernels.compute_path("reference"):
        expected = layer(x)
    assert not kernels._fast_gpu(x.cpu(), packed.cpu(), values.cpu())
    if DEVICE.type == "cpu":  # pretend the CPU tensors are CUDA ones; no C++ op for them
        monkeypatch.setattr(kernels, "_fast_cpu", lambda *a: False)
        monkeypatch.setattr(kernels, "_fast_gpu", lambda *a: True)
        monkeypatch.setattr(K["ops"], "register", lambda: False)
    assert kernels._fast_gpu(x, layer.codes, layer.values)
    y = layer(x)
    name = y.grad_fn.next_functions[0][0].name()  # bias add <- the kernel's node
    assert "CppNode" in name or "LutLinearFunction" in name
    close(y, expected)


def test_without_triton_the_reference_path_runs_silently(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton -> ModuleNotFoundError
    monkeypatch.setattr(gpu, "_available", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not gpu.available()
    codes, packed, values = sketch(6, 16, 4, 2)
    x = randn(2, 16)
    assert not kernels._fast_gpu(x, packed, values)
    close(kernels.lut_linear(x, packed, values, 4), reference.lut_linear_forward(x, codes, values))


def test_launchers_are_the_cuda_kernels_of_the_ops():
    if not cpu.available():
        pytest.skip("the C++ extension, which defines the ops, could not be built here")
    assert K["ops"].register()
    for name in ("lut_linear", "lut_linear_input_grad", "lut_linear_values_grad"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sketchtune::{name}", "CUDA")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the tests above compiled for this GPU")
def test_kernels_compile_for_a_gpu_without_register_spills():
    # The interpreter runs Python semantics only: compile for sm_90 with Triton's real compiler
    # (in a process without TRITON_INTERPRET), every unpacking path and every kernel.
    from triton.compiler import ASTSource

    if "constexprs" not in inspect.signature(ASTSource).parameters:
        pytest.skip("this triton's ASTSource predates the constexprs argument")
    script = (
        "import json, torch\n"
        "from sketchtune.kernels.triton import aot\n"
        "bf16 = (torch.bfloat16,)\n"
        "r = aot.check(90, (2, 3, 4), bf16, ('gemv',))\n"
        "r += aot.check(90, (4,), bf16, ('gemm', 'input_grad', 'values_grad'))\n"
        "print(json.dumps(r))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = json.loads(done.stdout.splitlines()[-1])
    assert len(reports) == 9
    assert all(r["spill_bytes"] in (0, None) for r in reports), reports


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_on_cuda_trains_through_the_op(dtype):
    codes, packed, values = sketch(40, 64, 4, 4, seed=15)
    layer = SketchLinear(64, 40, bits=4, gpr=4, device=DEVICE)
    layer.codes.copy_(packed)
    with torch.no_grad():
        layer.values.copy_(values)
    for rows in (1, 33):
        x = randn(rows, 64, seed=rows, dtype=dtype).requires_grad_(True)
        y = layer(x)
        if cpu.available():
            assert "CppNode" in y.grad_fn.name()
        y.float().pow(2).sum().backward()
        grad = 2 * y.detach()
        close(layer.values.grad, reference.lut_linear_values_grad(grad, x, codes, values),
              atol=1e-2 if dtype == torch.bfloat16 else 1e-3)
        layer.values.grad = None
