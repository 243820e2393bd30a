"""Compile the kernels for a GPU architecture on any machine, GPU or not, and report resources.

The interpreter only runs the kernels' Python semantics; this runs Triton's real compiler down to
a cubin (with the ptxas that ships with triton), at the launchers' default tiles, so codegen
errors and register spills show up without a GPU. Run it in a process without TRITON_INTERPRET.

    python -m sketchtune.kernels.triton.aot [--arch 90] [--bits 2 3 4] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import inspect
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import gemm, gemv, input_grad, values_grad
from .launch import dot_dtype

KERNELS = ("gemv", "gemm", "input_grad", "values_grad")
_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _defaults(launcher) -> dict:
    """The keyword defaults of a launcher: its tile sizes, warps and stages."""
    return {
        name: p.default
        for name, p in inspect.signature(launcher).parameters.items()
        if p.kind is p.KEYWORD_ONLY
    }


def launch_configs(kernel: str, bits: int, dtype: torch.dtype) -> list[tuple]:
    """(jitted kernel, pointer types, constexprs, num_warps, num_stages) as the launcher picks
    them for Llama-sized layers: 1 and 8 rows for the GEMV, >= 128 rows for the others."""
    act = "*" + _TYPES[dtype]
    dot = {"DOT_DTYPE": dot_dtype(dtype, torch.device("cuda")), "PRECISION": "tf32"}
    if kernel == "gemv":
        pointers = {"x_ptr": act, "codes_ptr": "*u8", "values_ptr": "*fp32", "y_ptr": act}
        warps = _defaults(gemv.lut_gemv)["num_warps"]
        configs = []
        for rows, atomic in ((1, False), (8, True)):
            block_n, block_k, _ = gemv.gemv_config(rows, 4096, 4096, torch.device("cpu"))
            consts = dict(BITS=bits, BLOCK_M=rows, BLOCK_N=block_n, BLOCK_K=block_k,
                          ATOMIC=atomic)
            configs.append((gemv._lut_gemv_kernel, pointers, consts, warps, 3))
        return configs
    if kernel == "values_grad":
        d = _defaults(values_grad.lut_values_grad)
        pointers = {"dy_ptr": act, "x_ptr": act, "codes_ptr": "*u8", "out_ptr": "*fp32"}
        consts = dict(BITS=bits, BLOCK_R=d["block_r"], BLOCK_C=d["block_c"],
                      BLOCK_T=d["block_t"], **dot)
        return [(values_grad._lut_values_grad_kernel, pointers, consts, d["num_warps"],
                 d["num_stages"])]
    if kernel == "gemm":
        d = _defaults(gemm.lut_gemm)
        jitted, out_width = gemm._lut_gemm_kernel, d["block_n"]
        pointers = {"x_ptr": act, "codes_ptr": "*u8", "values_ptr": "*fp32", "y_ptr": act}
    else:
        d = _defaults(input_grad.lut_input_grad)
        jitted, out_width = input_grad._lut_input_grad_kernel, d["block_k"]
        pointers = {"dy_ptr": act, "codes_ptr": "*u8", "values_ptr": "*fp32", "dx_ptr": act}
    consts = dict(BITS=bits, BLOCK_M=128, BLOCK_N=d["block_n"], BLOCK_K=d["block_k"],
                  GROUP_M=d["group_m"], **dot)
    warps = d["num_warps"] or (8 if 128 * out_width >= 128 * 128 else 4)  # as the launcher
    return [(jitted, pointers, consts, warps, d["num_stages"])]


def compile_kernel(jitted, pointers: dict, consts: dict, arch: int, num_warps: int,
                   num_stages: int) -> dict:
    """Compile one kernel for sm_`arch`; its registers and spill bytes per thread (cuobjdump)."""
    signature = {
        name: "constexpr" if name in consts else pointers.get(name, "i32")
        for name in jitted.arg_names
    }
    compiled = triton.compile(
        ASTSource(jitted, signature, constexprs=consts),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    report = {"kernel": jitted.__name__, "registers": None, "spill_bytes": None,
              "shared_bytes": compiled.metadata.shared}
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if cuobjdump.exists():
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(compiled.asm["cubin"])
            cubin.flush()
            usage = subprocess.run([str(cuobjdump), "-res-usage", cubin.name],
                                   capture_output=True, text=True, check=True).stdout
        fields = dict(f.split(":") for f in usage.split() if f.count(":") == 1)
        report["registers"], report["spill_bytes"] = int(fields["REG"]), int(fields["STACK"])
    return report


def check(arch: int = 90, bits: tuple[int, ...] = (2, 3, 4),
          dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,),
          kernels: tuple[str, ...] = KERNELS) -> list[dict]:
    """Compile every (kernel, bits, dtype) at its default launch configurations."""
    reports = []
    for kernel in kernels:
        for b in bits:
            for dtype in dtypes:
                for jitted, pointers, consts, warps, stages in launch_configs(kernel, b, dtype):
                    report = compile_kernel(jitted, pointers, consts, arch, warps, stages)
                    report.update(bits=b, dtype=str(dtype).removeprefix("torch."),
                                  constexprs={k: str(v) for k, v in consts.items()},
                                  num_warps=warps)
                    reports.append(report)
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--dtype", nargs="+", default=["bfloat16"],
                        choices=[str(d).removeprefix("torch.") for d in _TYPES])
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS)
    args = parser.parse_args()
    dtypes = tuple(getattr(torch, name) for name in args.dtype)
    spilled = False
    for r in check(args.arch, tuple(args.bits), dtypes, tuple(args.kernels)):
        spilled |= bool(r["spill_bytes"])
        print(f"{r['kernel']:24s} bits {r['bits']} {r['dtype']:8s} warps {r['num_warps']} "
              f"registers {r['registers']} spills {r['spill_bytes']} shared {r['shared_bytes']}  "
              f"{r['constexprs']}")
    sys.exit(1 if spilled else 0)


if __name__ == "__main__":
    main()
