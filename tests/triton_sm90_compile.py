"""Compile fastbone's Triton kernels for a real GPU target (sm_90 by default) without a GPU.

Triton's interpreter runs kernels on the CPU but checks none of what the GPU compiler
does (layouts, dot shapes, dtype rules), so CI also compiles each kernel, with the
block configs the GPU launcher picks, down to a cubin. Run in a process where
TRITON_INTERPRET=0 (the test runner does that); prints one JSON line per kernel.
"""
import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import fastbone  # noqa: E402,F401
from fastbone.kernels import INTERPRETED  # noqa: E402

TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def compile_kernel(fn, *, pointers: dict, constexprs: dict, floats=(), num_warps=4, num_stages=3, arch=90):
    """Compile `fn` to a cubin. pointers: arg name -> element dtype; constexprs: name -> value;
    floats: scalar args passed as fp32; every other argument is an i32 scalar."""
    signature, constants = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in pointers:
            signature[name] = "*" + TRITON_DTYPE[pointers[name]]
        elif name in constexprs:
            signature[name] = "constexpr"
            constants[(i,)] = constexprs[name]
        elif name in floats:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    compiled = triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx = compiled.asm["ptx"]
    if compiled.metadata.shared > 99 * 1024:
        raise ValueError(f"needs {compiled.metadata.shared} bytes of shared memory; sm_86/sm_89 have 99 KiB")
    return {"shared_bytes": compiled.metadata.shared, "wgmma": ptx.count("wgmma.mma_async"),
            "mma": ptx.count("mma.sync"), "cubin_bytes": len(compiled.asm["cubin"])}


def conv_cases():
    from fastbone.kernels import conv as kc
    from fastbone.ops.activation import ACTIVATIONS

    # (M, C_out, C_in, kernel): ResNet-50 layers at batch 32 (stem, 3x3, 1x1) and a grouped one.
    problems = [(32 * 112 * 112, 64, 3, 7), (32 * 56 * 56, 64, 64, 3), (32 * 14 * 14, 1024, 256, 1), (4096, 24, 24, 3)]
    cases = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for m, c_out, c_in, k in problems:
            acts = ACTIVATIONS.values() if (dtype == torch.float16 and k == 3 and c_in == 64) else [1]
            for act in acts:
                cfg = kc._block_config(m, c_out, c_in, k * k, torch.finfo(dtype).bits // 8)
                launch = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
                precision = "tf32" if dtype == torch.float32 else "ieee"
                cases.append((f"conv {dtype} M={m} Cout={c_out} Cin={c_in} k={k} act={act}", kc._conv_bias_act_kernel,
                              dict(pointers=dict(x_ptr=dtype, w_ptr=dtype, bias_ptr=torch.float32, res_ptr=dtype,
                                                 out_ptr=dtype),
                                   constexprs=dict(KH=k, KW=k, ACT=act, HAS_RES=True, INPUT_PRECISION=precision, **cfg),
                                   floats=("slope",), **launch)))
    return cases


def pool_cases():
    from fastbone.kernels import pool as kp

    cases = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        block_p, block_c = kp._tile(32 * 56 * 56, 64)
        for mode in (kp.MAX, kp.AVG, kp.ADAPTIVE_AVG):
            cases.append((f"pool {dtype} mode={mode}", kp._window_pool_kernel,
                          dict(pointers=dict(x_ptr=dtype, out_ptr=dtype),
                               constexprs=dict(KH=3, KW=3, MODE=mode, COUNT_INCLUDE_PAD=mode == kp.AVG,
                                               BLOCK_P=block_p, BLOCK_C=block_c), num_warps=kp._NUM_WARPS)))
        block_hw, block_c = kp._tile(7 * 7, 2048)
        cases.append((f"global pool {dtype}", kp._global_avg_pool_kernel,
                      dict(pointers=dict(x_ptr=dtype, out_ptr=dtype),
                           constexprs=dict(BLOCK_HW=block_hw, BLOCK_C=block_c), num_warps=kp._NUM_WARPS)))
    return cases


def main(arch: int) -> int:
    assert not INTERPRETED, "run with TRITON_INTERPRET=0"
    failures = 0
    for name, fn, kwargs in conv_cases() + pool_cases():
        try:
            info = compile_kernel(fn, arch=arch, **kwargs)
            print(json.dumps({"kernel": name, "ok": True, **info}), flush=True)
        except Exception as e:  # report every failing kernel, not just the first
            failures += 1
            print(json.dumps({"kernel": name, "ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
