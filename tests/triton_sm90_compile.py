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

TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64"}


def compile_kernel(fn, *, pointers: dict, constexprs: dict, floats=(), num_warps=4, num_stages=3, arch=90,
                   smem_limit=99 * 1024, divisible_by_16=()):
    """Compile `fn` to a cubin. pointers: arg name -> element dtype; constexprs: name -> value;
    floats: scalar args passed as fp32; every other argument is an i32 scalar. Stride arguments
    of 1 are given as constants, and `divisible_by_16` int arguments marked so, as Triton's
    launcher specialises ints equal to 1 and multiples of 16."""
    signature, constants, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in pointers:
            signature[name] = "*" + TRITON_DTYPE[pointers[name]]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch's allocations are 16-byte aligned
        elif name in constexprs:
            signature[name] = "constexpr"
            constants[(i,)] = constexprs[name]
        elif name in floats:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name in divisible_by_16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx = compiled.asm["ptx"]
    if compiled.metadata.shared > smem_limit:
        raise ValueError(f"needs {compiled.metadata.shared} bytes of shared memory, over {smem_limit}")
    return {"shared_bytes": compiled.metadata.shared, "wgmma": ptx.count("wgmma.mma_async"), "cp_async": ptx.count("cp.async"),
            "mma": ptx.count("mma.sync"), "cubin_bytes": len(compiled.asm["cubin"])}


# Channels are the contiguous axis of NHWC activations and of the channels_last weights; with
# channel counts that are multiples of 16 (all of ResNet-50's but the stem's 3) every other
# stride is one too, which is what lets loads vectorise and pipeline.
NHWC_UNIT_STRIDES = dict(sxc=1, swc=1, src=1, soc=1)
NHWC_DIVISIBLE = ("sxn", "sxh", "sxw", "swo", "swh", "sww", "srn", "srh", "srw", "son", "soh", "sow", "C_IN_G",
                  "C_OUT_G", "out_c_offset")


# The epilogue as a model runs it: conv bias and BatchNorm (gamma, beta, running statistics), the
# per-channel tensors in the model's dtype.
BN_FLAGS = dict(HAS_BIAS=True, HAS_BN=True, HAS_GAMMA=True, HAS_BETA=True)


def bn_pointers(dtype):
    return {name: dtype for name in ("bias_ptr", "gamma_ptr", "beta_ptr", "mean_ptr", "var_ptr")}


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
                cases.append((f"conv {dtype} M={m} Cout={c_out} Cin={c_in} k={k} act={act}", kc._conv_bn_act_kernel,
                              dict(pointers=dict(x_ptr=dtype, w_ptr=dtype, res_ptr=dtype, out_ptr=dtype,
                                                 **bn_pointers(dtype)),
                                   constexprs=dict(KH=k, KW=k, ACT=act, HAS_RES=True, INPUT_PRECISION=precision,
                                                   **BN_FLAGS, **NHWC_UNIT_STRIDES, **cfg, INDEX64=False),
                                   floats=("eps", "slope"), divisible_by_16=NHWC_DIVISIBLE if c_in % 16 == 0 else (),
                                   **launch)))
    # The 64-bit index variant (tensors past 2^31 elements, N*OH*OW past 2^31): both K loops.
    for dtype in (torch.float32, torch.float16):
        for m, c_out, c_in, k in problems[:2]:
            cfg = kc._block_config(m, c_out, c_in, k * k, torch.finfo(dtype).bits // 8)
            launch = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
            cases.append((f"int64-index conv {dtype} Cout={c_out} Cin={c_in} k={k}", kc._conv_bn_act_kernel,
                          dict(pointers=dict(x_ptr=dtype, w_ptr=dtype, res_ptr=dtype, out_ptr=dtype,
                                             **bn_pointers(dtype)),
                               constexprs=dict(KH=k, KW=k, ACT=1, HAS_RES=True,
                                               INPUT_PRECISION="tf32" if dtype == torch.float32 else "ieee",
                                               **BN_FLAGS, **NHWC_UNIT_STRIDES, **cfg, INDEX64=True),
                               floats=("eps", "slope"), **launch)))
    # Every autotuner tile, on a shape none of them is pruned for; the autotuner skips tiles that
    # do not fit a smaller card, so the bound here is the H100's 227 KiB.
    for dtype in (torch.float32, torch.float16):
        for bm, bn, bk, warps, stages in kc.GPU_TILES:
            cases.append((f"conv autotune tile {dtype} {bm}x{bn}x{bk} w{warps} s{stages}", kc._conv_bn_act_kernel,
                          dict(pointers=dict(x_ptr=dtype, w_ptr=dtype, res_ptr=dtype, out_ptr=dtype,
                                             **bn_pointers(dtype)),
                               constexprs=dict(KH=3, KW=3, ACT=1, HAS_RES=False, FLAT_K=False, **NHWC_UNIT_STRIDES,
                                               **BN_FLAGS,
                                               INPUT_PRECISION="tf32" if dtype == torch.float32 else "ieee",
                                               BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, INDEX64=False),
                               floats=("eps", "slope"), num_warps=warps, num_stages=stages, smem_limit=227 * 1024,
                               divisible_by_16=NHWC_DIVISIBLE)))
    return cases


def pool_cases():
    from fastbone.kernels import pool as kp

    cases = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        block_p, block_c = kp._tile(32 * 56 * 56, 64)
        for mode in (kp.MAX, kp.AVG, kp.ADAPTIVE_AVG):
            for index64 in (False, True):
                cases.append((f"pool {dtype} mode={mode}" + " int64-index" * index64, kp._window_pool_kernel,
                              dict(pointers=dict(x_ptr=dtype, out_ptr=dtype),
                                   constexprs=dict(KH=3, KW=3, MODE=mode, COUNT_INCLUDE_PAD=mode == kp.AVG,
                                                   BLOCK_P=block_p, BLOCK_C=block_c, INDEX64=index64),
                                   num_warps=kp._NUM_WARPS)))
        block_hw, block_c = kp._tile(7 * 7, 2048)
        for index64 in (False, True):
            cases.append((f"global pool {dtype}" + " int64-index" * index64, kp._global_avg_pool_kernel,
                          dict(pointers=dict(x_ptr=dtype, out_ptr=dtype),
                               constexprs=dict(BLOCK_HW=block_hw, BLOCK_C=block_c, INDEX64=index64),
                               num_warps=kp._NUM_WARPS)))
    return cases


def depthwise_cases():
    """The depthwise kernel and the fused separable kernel at MobileNetV2 sizes (batch 32): the
    fixed GPU configs in every dtype, every autotuner tile in float16."""
    from fastbone.kernels import depthwise as kd
    from fastbone.ops.activation import ACTIVATIONS

    nhwc = dict(sxc=1, src=1, soc=1)
    divisible = ("sxn", "sxh", "sxw", "srn", "srh", "srw", "son", "soh", "sow", "out_c_offset")
    cases = []

    def dw_case(name, dtype, c, k, act, cfg, launch):
        cases.append((name, kd._depthwise_kernel,
                      dict(pointers=dict(x_ptr=dtype, w_ptr=dtype, res_ptr=dtype, out_ptr=dtype, **bn_pointers(dtype)),
                           constexprs=dict(KH=k, KW=k, MULT=1, ACT=act, HAS_RES=True, sww=1, **nhwc, **BN_FLAGS, **cfg),
                           floats=("eps", "slope"),
                           divisible_by_16=divisible + ("C_OUT",) if c % 16 == 0 else divisible,
                           **launch)))

    def sep_case(name, dtype, c_dw, c_out, k, groups, dw_act, pw_act, cfg, launch, order=False):
        flags = {f"{side}_{flag}": v for side in ("DW", "PW") for flag, v in BN_FLAGS.items()}
        pointers = dict(x_ptr=dtype, dw_w_ptr=dtype, pw_w_ptr=dtype, res_ptr=dtype, out_ptr=dtype,
                        order_ptr=torch.int64 if order else dtype,
                        **{f"{side}_{n}": dtype for side in ("dw", "pw") for n in bn_pointers(dtype)})
        precision = "tf32" if dtype == torch.float32 else "ieee"
        cases.append((name, kd._separable_kernel,
                      dict(pointers=pointers,
                           constexprs=dict(KH=k, KW=k, MULT=1, DW_ACT=dw_act, PW_ACT=pw_act, HAS_ORDER=order,
                                           HAS_RES=True, INPUT_PRECISION=precision, sdw=1, spc=1, **nhwc, **flags,
                                           **cfg),
                           floats=("dw_eps", "dw_slope", "pw_eps", "pw_slope"),
                           divisible_by_16=divisible + ("C_DW", "K_G", "C_OUT_G", "spo") if c_dw % 16 == 0 and
                           c_out % 16 == 0 and groups == 1 else divisible, **launch)))

    relu6 = ACTIVATIONS["relu6"]
    # MobileNetV2: (M, channels, k); (M, C_dw, C_out, k, groups) for the depthwise -> project block.
    dw_problems = [(32 * 112 * 112, 32, 3), (32 * 28 * 28, 144, 3), (32 * 7 * 7, 960, 3), (32 * 14 * 14, 672, 5)]
    sep_problems = [(32 * 112 * 112, 32, 16, 3, 1), (32 * 28 * 28, 144, 24, 3, 1), (32 * 7 * 7, 960, 320, 3, 1),
                    (32 * 28 * 28, 240, 240, 3, 3), (32 * 14 * 14, 192, 64, 7, 1)]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for m, c, k in dw_problems:
            cfg = kd.depthwise_block_config(m, c)
            launch = dict(num_warps=cfg.pop("num_warps"))
            dw_case(f"depthwise {dtype} M={m} C={c} k={k}", dtype, c, k, relu6, cfg, launch)
        for m, c_dw, c_out, k, groups in sep_problems:
            acts = ACTIVATIONS.values() if (dtype == torch.float16 and c_dw == 144) else [0]
            for act in acts:
                cfg = kd.separable_block_config(m, c_out // groups, c_dw // groups, torch.finfo(dtype).bits // 8,
                                                k * k)
                launch = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
                sep_case(f"separable {dtype} M={m} Cdw={c_dw} Cout={c_out} k={k} g={groups} act={act}", dtype, c_dw,
                         c_out, k, groups, relu6 if act == 0 else act, act, cfg, launch, order=groups > 1)
    for bp, bc, warps in kd.DEPTHWISE_GPU_TILES:
        dw_case(f"depthwise autotune tile float16 {bp}x{bc} w{warps}", torch.float16, 144, 3, relu6,
                dict(BLOCK_P=bp, BLOCK_C=bc), dict(num_warps=warps))
    for bm, bn, bk, warps, stages in kd.SEPARABLE_GPU_TILES:
        sep_case(f"separable autotune tile float16 {bm}x{bn}x{bk} w{warps} s{stages}", torch.float16, 960, 320, 3, 1,
                 relu6, 0, dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), dict(num_warps=warps, num_stages=stages,
                                                                          smem_limit=227 * 1024))
    return cases


def main(arch: int) -> int:
    assert not INTERPRETED, "run with TRITON_INTERPRET=0"
    failures = 0
    for name, fn, kwargs in conv_cases() + pool_cases() + depthwise_cases():
        try:
            info = compile_kernel(fn, arch=arch, **kwargs)
            print(json.dumps({"kernel": name, "ok": True, **info}), flush=True)
        except Exception as e:  # report every failing kernel, not just the first
            failures += 1
            print(json.dumps({"kernel": name, "ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
