"""Compile fastbone's Triton kernels for a real GPU target (sm_90 by default) without a GPU.

Triton's interpreter runs kernels on the CPU but checks none of what the GPU compiler
does (layouts, dot shapes, dtype rules), so CI also compiles each kernel, with the
block configs the GPU launcher picks, down to a cubin, and reads ptxas's resource report:
every kernel must compile with 0 bytes of register spills, fit the shared-memory limit of
the cards it is meant for, and fit the register file at its thread count.

Two sets of cases: hand-written ones (below: chosen problems, every activation, the 64-bit index
variants, every autotuner tile on a generic shape) and the ones the models produce
(`model_cases`): every registered model's forward, traced on fake CUDA tensors, with each Triton
launch recorded (not run), specialised as Triton's launcher would specialise it, at every config
the autotuner keeps after pruning and at the fixed config (FASTBONE_TRITON_AUTOTUNE=0).

Run in a process where TRITON_INTERPRET=0 (the test runner does that); prints one JSON line per
kernel; exits 1 if any kernel fails to compile or is unhealthy.
"""
import contextlib
import io
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import ptxas_report  # noqa: E402
import triton_launches  # noqa: E402  (bench/: the models' launches, recorded on fake tensors)

TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64"}
REGISTER_FILE = 65536  # 32-bit registers per block on every CUDA GPU since sm_50
H100_SMEM = 227 * 1024  # the largest opt-in shared memory per block on sm_90
FIXED_SMEM = 99 * 1024  # sm_86 / sm_89 (the fixed configs must run on those too)


def _ptxas_log_of(compile_fn):
    """Run compile_fn() with Triton's ptxas log on; (its result, the log or None on a cache hit)."""
    from triton import knobs

    old = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            compiled = compile_fn()
    finally:
        knobs.nvidia.dump_ptxas_log = old
    text = captured.getvalue()
    return compiled, (text if "Compiling entry function" in text else None)


def _resource_usage(compile_fn):
    """(compiled kernel, ptxas's report on it). Triton does not keep ptxas's log (its metadata has no
    spill count until a GPU loads the cubin), so the log is captured as it compiles; the parsed
    report is kept next to Triton's cache entry, and a cache hit with no report recompiles."""
    from triton import knobs

    compiled, log = _ptxas_log_of(compile_fn)
    store = os.path.join(knobs.cache.dir, "fastbone-ptxas", f"{compiled.hash}.json")
    if log is None and os.path.isfile(store):
        with open(store) as f:
            return compiled, json.load(f)
    if log is None:
        old = knobs.compilation.always_compile
        knobs.compilation.always_compile = True
        try:
            compiled, log = _ptxas_log_of(compile_fn)
        finally:
            knobs.compilation.always_compile = old
    if log is None:
        raise RuntimeError("Triton printed no ptxas log (TRITON_DUMP_PTXAS_LOG): cannot read register spills")
    functions = ptxas_report.parse(log)
    entries = [v for v in functions.values() if v.get("entry")]
    if len(entries) != 1:
        raise RuntimeError(f"expected one entry function in ptxas's log, found {len(entries)}:\n{log[-2000:]}")
    # Spills of a called (non-inlined) device function count against the kernel too.
    usage = dict(entries[0], spill_stores=sum(v.get("spill_stores", 0) for v in functions.values()),
                 spill_loads=sum(v.get("spill_loads", 0) for v in functions.values()))
    os.makedirs(os.path.dirname(store), exist_ok=True)
    with open(store + f".{os.getpid()}.tmp", "w") as f:
        json.dump(usage, f)
    os.replace(store + f".{os.getpid()}.tmp", store)
    return compiled, usage


def compile_specialized(fn, *, signature: dict, constants: dict, attrs: dict, num_warps=4, num_stages=3, arch=90,
                        smem_limit=FIXED_SMEM, options=None):
    """Compile `fn` to a cubin as Triton's launcher would for this (signature, constants, attrs) and
    check its health. Returns the record's fields; `problems` lists what is wrong (empty: healthy)."""
    options = dict(options or {}, num_warps=num_warps, num_stages=num_stages)
    target = GPUTarget("cuda", arch, 32)
    compiled, usage = _resource_usage(
        lambda: triton.compile(ASTSource(fn, signature, constants, attrs), target=target, options=options))
    ptx = compiled.asm["ptx"]
    threads = num_warps * 32
    shared = compiled.metadata.shared
    problems = []
    if shared > smem_limit:
        problems.append(f"needs {shared} bytes of shared memory, over {smem_limit}")
    spilled = ptxas_report.spill_bytes(usage)
    if spilled:
        problems.append(f"spills registers: {usage['spill_stores']} bytes of spill stores, "
                        f"{usage['spill_loads']} bytes of spill loads ({usage.get('stack_bytes', 0)} bytes stack frame)")
    if usage.get("registers", 0) * threads > REGISTER_FILE:
        problems.append(f"{usage['registers']} registers x {threads} threads exceed the register file")
    return {"shared_bytes": shared, "smem_limit": smem_limit, "registers": usage.get("registers"),
            "spill_stores": usage.get("spill_stores", 0), "spill_loads": usage.get("spill_loads", 0),
            "stack_bytes": usage.get("stack_bytes", 0), "num_warps": num_warps, "num_stages": num_stages,
            "wgmma": ptx.count("wgmma.mma_async"), "cp_async": ptx.count("cp.async"), "mma": ptx.count("mma.sync"),
            "cubin_bytes": len(compiled.asm["cubin"]), "problems": problems}


def compile_kernel(fn, *, arch=90, **kwargs):
    """compile_specialized on a hand-written case (hand_spec's arguments)."""
    return compile_specialized(fn, arch=arch, **hand_spec(fn, **kwargs))


# Channels are the contiguous axis of NHWC activations and of the channels_last weights; with
# channel counts that are multiples of 16 (all of ResNet-50's but the stem's 3) every other
# stride is one too, which is what lets loads vectorise and pipeline.
NHWC_UNIT_STRIDES = dict(sxc=1, swc=1, src=1, soc=1)
NHWC_DIVISIBLE = ("sxn", "sxh", "sxw", "swo", "swh", "sww", "srn", "srh", "srw", "son", "soh", "sow", "C_IN_G",
                  "C_OUT_G", "out_c_offset")


def nhwc_divisible(c_in: int, c_out: int) -> tuple:
    """The conv's int arguments Triton's launcher marks divisible by 16 for contiguous NHWC tensors: x's and the
    weight's strides with C_in a multiple of 16, the output's and the residual's with C_out one."""
    ins = ("sxn", "sxh", "sxw", "swo", "swh", "sww", "C_IN_G") if c_in % 16 == 0 else ()
    outs = ("srn", "srh", "srw", "son", "soh", "sow", "C_OUT_G", "out_c_offset") if c_out % 16 == 0 else ()
    return ins + outs


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
                # The fixed config as the launcher asks for it: a residual, rows vectorisable where the
                # channel counts are multiples of 16 (kernels/conv.py: rows_vectorizable).
                cfg = dict(kc._block_config(m, c_out, c_in, k * k, torch.finfo(dtype).bits // 8, False, 1, False, True,
                                            c_in % 16 == 0, c_out % 16 == 0, False))
                launch = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
                precision = "tf32" if dtype == torch.float32 else "ieee"
                cases.append((f"conv {dtype} M={m} Cout={c_out} Cin={c_in} k={k} act={act}", kc._conv_bn_act_kernel,
                              dict(pointers=dict(x_ptr=dtype, w_ptr=dtype, res_ptr=dtype, out_ptr=dtype, scale_ptr=torch.float32,
                                                 **bn_pointers(dtype)),
                                   constexprs=dict(KH=k, KW=k, ACT=act, HAS_RES=True, INPUT_PRECISION=precision,
                                                   HAS_IN_SCALE=False,  # scaled: EfficientNet's model cases
                                                   **BN_FLAGS, **NHWC_UNIT_STRIDES, **cfg, INDEX64=False),
                                   floats=("eps", "slope"), divisible_by_16=nhwc_divisible(c_in, c_out),
                                   **launch)))
    # The max pool in the epilogue (VGG's and DarkNet's conv closing a stage: 2x2 / 2): both K loops.
    for dtype in (torch.float32, torch.float16):
        for m, c_out, c_in, k in ((32 * 56 * 56, 128, 128, 3), (32 * 112 * 112, 32, 3, 3)):
            cfg = dict(kc._block_config(m, c_out, c_in, k * k, torch.finfo(dtype).bits // 8, False, 1, False, False,
                                        c_in % 16 == 0, c_out % 16 == 0, False))
            launch = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
            cases.append((f"pooled conv {dtype} M={m} Cout={c_out} Cin={c_in} k={k}", kc._conv_bn_act_kernel,
                          dict(pointers=dict(x_ptr=dtype, w_ptr=dtype, res_ptr=dtype, out_ptr=dtype,
                                             scale_ptr=torch.float32, **bn_pointers(dtype)),
                               constexprs=dict(KH=k, KW=k, ACT=1, HAS_RES=False, HAS_IN_SCALE=False, POOL=2,
                                               INPUT_PRECISION="tf32" if dtype == torch.float32 else "ieee",
                                               **BN_FLAGS, **NHWC_UNIT_STRIDES, **cfg, INDEX64=False),
                               floats=("eps", "slope"), divisible_by_16=nhwc_divisible(c_in, c_out),
                               **launch)))
    # The 64-bit index variant (tensors past 2^31 elements, N*OH*OW past 2^31): both K loops.
    for dtype in (torch.float32, torch.float16):
        for m, c_out, c_in, k in problems[:2]:
            cfg = dict(kc._block_config(m, c_out, c_in, k * k, torch.finfo(dtype).bits // 8, False, 1, False, True,
                                        c_in % 16 == 0, c_out % 16 == 0, True))
            launch = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
            cases.append((f"int64-index conv {dtype} Cout={c_out} Cin={c_in} k={k}", kc._conv_bn_act_kernel,
                          dict(pointers=dict(x_ptr=dtype, w_ptr=dtype, res_ptr=dtype, out_ptr=dtype, scale_ptr=torch.float32,
                                             **bn_pointers(dtype)),
                               constexprs=dict(KH=k, KW=k, ACT=1, HAS_RES=True, HAS_IN_SCALE=False,
                                               INPUT_PRECISION="tf32" if dtype == torch.float32 else "ieee",
                                               **BN_FLAGS, **NHWC_UNIT_STRIDES, **cfg, INDEX64=True),
                               floats=("eps", "slope"), divisible_by_16=nhwc_divisible(c_in, c_out), **launch)))
    # Every autotuner tile its pruning keeps for a wide layer (all of them in float16; in float32 the register
    # budget, kernels/conv.py: tile_fits_registers, drops the 128 x 128 ones); the autotuner skips tiles that
    # do not fit a smaller card, so the bound here is the H100's 227 KiB.
    for dtype in (torch.float32, torch.float16):
        kept = kc._prune_tiles([triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=w, num_stages=st)
                                for bm, bn, bk, w, st in kc.GPU_TILES],
                               dict(C_OUT_G=256, C_IN_G=256, x_ptr=torch.empty((), dtype=dtype)), KH=3, KW=3,
                               FLAT_K=False)
        for bm, bn, bk, warps, stages in [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps,
                                           c.num_stages) for c in kept]:
            cases.append((f"conv autotune tile {dtype} {bm}x{bn}x{bk} w{warps} s{stages}", kc._conv_bn_act_kernel,
                          dict(pointers=dict(x_ptr=dtype, w_ptr=dtype, res_ptr=dtype, out_ptr=dtype, scale_ptr=torch.float32,
                                             **bn_pointers(dtype)),
                               constexprs=dict(KH=3, KW=3, ACT=1, HAS_RES=False, FLAT_K=False, HAS_IN_SCALE=False,
                                               **NHWC_UNIT_STRIDES,
                                               **BN_FLAGS,
                                               INPUT_PRECISION="tf32" if dtype == torch.float32 else "ieee",
                                               BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, INDEX64=False),
                               floats=("eps", "slope"), num_warps=warps, num_stages=stages, smem_limit=H100_SMEM,
                               divisible_by_16=NHWC_DIVISIBLE)))
    # Pool-then-conv (IN_POOL: the Inception pool branch, GoogLeNet's 3x3 max pool -> 1x1 at 28x28,
    # Inception-ResNet-v2 Mixed_5b's 3x3 avg pool -> 1x1 at 35x35, batch 32): the fixed config.
    # Horizontal fusion (SEGMENTS=3: GoogLeNet inception3a's three 1x1s reading one input, batch 32):
    # the fixed config for the widest segment, and every autotuner tile.
    for dtype in (torch.float32, torch.float16):
        precision = "tf32" if dtype == torch.float32 else "ieee"
        for mode, m, c_out, c_in in ((1, 32 * 28 * 28, 32, 192), (2, 32 * 35 * 35, 64, 192)):
            cfg = dict(kc._block_config(m, c_out, c_in, 1, torch.finfo(dtype).bits // 8, False, 3))
            launch = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
            cases.append((f"input-pooled conv {dtype} pool={'max' if mode == 1 else 'avg'}3 M={m} Cout={c_out} "
                          f"Cin={c_in} k=1", kc._conv_bn_act_kernel,
                          dict(pointers=dict(x_ptr=dtype, w_ptr=dtype, res_ptr=dtype, out_ptr=dtype,
                                             scale_ptr=torch.float32, **bn_pointers(dtype)),
                               constexprs=dict(KH=1, KW=1, ACT=1, HAS_RES=False, HAS_IN_SCALE=False,
                                               INPUT_PRECISION=precision, IN_POOL=mode, IN_POOL_K=3,
                                               **BN_FLAGS, **NHWC_UNIT_STRIDES, **cfg, INDEX64=False),
                               floats=("eps", "slope"), divisible_by_16=NHWC_DIVISIBLE, **launch)))
        # Channel maps in the load and the store (HAS_IN_MAP / HAS_OUT_MAP: ShuffleNet v1 g=3's grouped 1x1s
        # 240 -> 60 at 28x28 and 480 -> 120 at 14x14, batch 32, with the residual on): the fixed config. C_OUT_G
        # (20, 40) and the output's pixel stride (60, 120) are not multiples of 16.
        for m, c_out, c_in, groups in ((32 * 28 * 28, 60, 240, 3), (32 * 14 * 14, 120, 480, 3)):
            cfg = dict(kc._block_config(m, c_out // groups, c_in // groups, 1, torch.finfo(dtype).bits // 8, False,
                                        1, True))
            launch = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
            cases.append((f"channel-mapped conv {dtype} M={m} Cout={c_out} Cin={c_in} groups={groups} k=1",
                          kc._conv_bn_act_kernel,
                          dict(pointers=dict(x_ptr=dtype, w_ptr=dtype, res_ptr=dtype, out_ptr=dtype,
                                             scale_ptr=torch.float32, in_map_ptr=torch.int64, out_map_ptr=torch.int64,
                                             **bn_pointers(dtype)),
                               constexprs=dict(KH=1, KW=1, ACT=1, HAS_RES=True, HAS_IN_SCALE=False,
                                               INPUT_PRECISION=precision, HAS_IN_MAP=True, HAS_OUT_MAP=True,
                                               **BN_FLAGS, **NHWC_UNIT_STRIDES, **cfg, INDEX64=False),
                               floats=("eps", "slope"),
                               divisible_by_16=tuple(a for a in NHWC_DIVISIBLE if a not in ("sow", "srw", "C_OUT_G")),
                               **launch)))
        m, c_outs, c_in = 32 * 28 * 28, (64, 96, 16), 192
        cfg = dict(kc._block_config(m, max(c_outs), c_in, 1, torch.finfo(dtype).bits // 8))
        fixed = (cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K"), cfg.pop("num_warps"), cfg.pop("num_stages"))
        # The autotuner's tiles as its pruning keeps them for this launch.
        kept = kc._prune_tiles([triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=w, num_stages=st)
                                for bm, bn, bk, w, st in kc.GPU_TILES],
                               dict(C_OUT_G=c_outs[0], C_IN_G=c_in, x_ptr=torch.empty((), dtype=dtype)),
                               KH=1, KW=1, FLAT_K=False, SEGMENTS=3, c_out_1=c_outs[1], c_out_2=c_outs[2])
        tuned = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) for c in kept]
        for tile in [fixed] + [t for t in tuned if t != fixed]:
            bm, bn, bk, warps, stages = tile
            more = {f"{name}{i}_ptr": dtype for i in (1, 2) for name in ("w", "out", "bias", "gamma", "beta", "mean",
                                                                        "var")}
            cases.append((f"multi conv {dtype} SEGMENTS=3 M={m} Cout={'+'.join(map(str, c_outs))} Cin={c_in} k=1 "
                          f"{'fixed ' if tile == fixed else 'autotune tile '}{bm}x{bn}x{bk} w{warps} s{stages}",
                          kc._conv_bn_act_kernel,
                          dict(pointers=dict(x_ptr=dtype, w_ptr=dtype, res_ptr=dtype, out_ptr=dtype,
                                             scale_ptr=torch.float32, **bn_pointers(dtype), **more),
                               constexprs=dict(KH=1, KW=1, ACT=1, HAS_RES=False, HAS_IN_SCALE=False,
                                               INPUT_PRECISION=precision, SEGMENTS=3, **BN_FLAGS, **NHWC_UNIT_STRIDES,
                                               swc1=1, soc1=1, swc2=1, soc2=1, **cfg, BLOCK_M=bm, BLOCK_N=bn,
                                               BLOCK_K=bk, INDEX64=False),
                               floats=("eps", "slope", "eps1", "eps2"),
                               divisible_by_16=NHWC_DIVISIBLE + tuple(f"{s}{i}" for i in (1, 2) for s in (
                                   "swo", "swh", "sww", "son", "soh", "sow")) + ("c_out_1", "c_out_2"),
                               num_warps=warps, num_stages=stages,
                               smem_limit=FIXED_SMEM if tile == fixed else H100_SMEM)))
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
        cfg = dict(dict(POOL=False, TILE_W=1), **cfg)  # POOL: the squeeze-excitation partial sums' epilogue
        cases.append((name, kd._depthwise_kernel,
                      dict(pointers=dict(x_ptr=dtype, w_ptr=dtype, res_ptr=dtype, out_ptr=dtype, sums_ptr=torch.float32,
                                         **bn_pointers(dtype)),
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
            cfg = dict(kd.depthwise_block_config(m, c))
            launch = dict(num_warps=cfg.pop("num_warps"))
            dw_case(f"depthwise {dtype} M={m} C={c} k={k}", dtype, c, k, relu6, cfg, launch)
        for m, c_dw, c_out, k, groups in sep_problems:
            acts = ACTIVATIONS.values() if (dtype == torch.float16 and c_dw == 144) else [0]
            for act in acts:
                cfg = dict(kd.separable_block_config(m, c_out // groups, c_dw // groups,
                                                     torch.finfo(dtype).bits // 8, k * k, groups > 1))
                launch = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
                sep_case(f"separable {dtype} M={m} Cdw={c_dw} Cout={c_out} k={k} g={groups} act={act}", dtype, c_dw,
                         c_out, k, groups, relu6 if act == 0 else act, act, cfg, launch, order=groups > 1)
    for bp, bc, warps in kd.DEPTHWISE_GPU_TILES:
        dw_case(f"depthwise autotune tile float16 {bp}x{bc} w{warps}", torch.float16, 144, 3, relu6,
                dict(BLOCK_P=bp, BLOCK_C=bc), dict(num_warps=warps))
    # The pooled variant (EfficientNet's depthwise + SE partial sums, SiLU): its pixel tile for 3x3 and
    # 5x5 kernels at every channel block the autotuner keeps, and the fixed config, in every dtype.
    silu = ACTIVATIONS["silu"]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for k in (3, 5):
            th, tw = kd.depthwise_pool_tile(56, 56, 240, k * k)
            fixed = dict(kd.depthwise_pool_block_config(th * tw, 240, k * k))
            configs = {(fixed["BLOCK_C"], fixed["num_warps"]), *(
                (c.kwargs["BLOCK_C"], c.num_warps) for c in kd._prune_depthwise_pool(
                    [triton.Config(dict(BLOCK_C=bc), num_warps=w) for bc, w in kd.DEPTHWISE_POOL_GPU_TILES],
                    dict(C_OUT=240), KH=k, KW=k, BLOCK_P=th * tw))}
            for bc, warps in sorted(configs):
                dw_case(f"depthwise se-pool {dtype} k={k} {th}x{tw}x{bc} w{warps}", dtype, 240, k, silu,
                        dict(BLOCK_P=th * tw, BLOCK_C=bc, POOL=True, TILE_W=tw), dict(num_warps=warps))
    for bm, bn, bk, warps, stages in kd.SEPARABLE_GPU_TILES:
        sep_case(f"separable autotune tile float16 {bm}x{bn}x{bk} w{warps} s{stages}", torch.float16, 960, 320, 3, 1,
                 relu6, 0, dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), dict(num_warps=warps, num_stages=stages,
                                                                          smem_limit=H100_SMEM))
    return cases


def fire_cases():
    """The Fire expand kernel (expand1x1 + expand3x3 from one read) at SqueezeNet 1.1's Fire shapes
    (batch 32): the fixed GPU config in every dtype (every activation in float16), the 64-bit index
    variant, and every autotuner tile in float16 and float32 on a shape none of them is pruned for."""
    from fastbone.kernels import fire as kf
    from fastbone.ops.activation import ACTIVATIONS

    # NHWC input and output, weights as a channels_last model holds them (the 3x3's channels innermost).
    unit = dict(sxc=1, s1c=1, s3c=1, soc=1)
    divisible = ("sxn", "sxh", "sxw", "s1o", "s3o", "s3h", "s3w", "son", "soh", "sow", "S", "E1", "E3",
                 "out_c_offset")
    cases = []

    def case(name, dtype, s, e, act, cfg, launch, index64=False):
        precision = "tf32" if dtype == torch.float32 else "ieee"
        cases.append((name, kf._fire_expand_kernel,
                      dict(pointers=dict(x_ptr=dtype, w1_ptr=dtype, b1_ptr=dtype, w3_ptr=dtype, b3_ptr=dtype,
                                         out_ptr=dtype),
                           constexprs=dict(HAS_B1=True, HAS_B3=True, ACT=act, INPUT_PRECISION=precision, **unit,
                                           **cfg, INDEX64=index64),
                           floats=("slope",), divisible_by_16=divisible if s % 16 == 0 and e % 16 == 0 else (),
                           **launch)))

    def fixed(m, s, e):
        cfg = dict(kf.fire_block_config(m, e, s))
        return cfg, dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))

    # (M, squeeze channels S, expand channels E1 = E3): fire2/3, fire4/5, fire6/7, fire8/9 at 224.
    problems = [(32 * 55 * 55, 16, 64), (32 * 27 * 27, 32, 128), (32 * 13 * 13, 48, 192), (32 * 13 * 13, 64, 256)]
    relu = ACTIVATIONS["relu"]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for m, s, e in problems:
            acts = ACTIVATIONS.values() if (dtype == torch.float16 and s == 32) else [relu]
            for act in acts:
                fire_cfg, launch = fixed(m, s, e)
                case(f"fire {dtype} M={m} S={s} E={e} act={act}", dtype, s, e, act, fire_cfg, launch)
    for dtype in (torch.float32, torch.float16):
        m, s, e = problems[0]
        fire_cfg, launch = fixed(m, s, e)
        case(f"int64-index fire {dtype} S={s} E={e}", dtype, s, e, relu, fire_cfg, launch, index64=True)
    for dtype in (torch.float32, torch.float16):
        for bm, bn, bk, warps, stages in kf.FIRE_GPU_TILES:
            case(f"fire autotune tile {dtype} {bm}x{bn}x{bk} w{warps} s{stages}", dtype, 64, 256, relu,
                 dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8),
                 dict(num_warps=warps, num_stages=stages, smem_limit=H100_SMEM))
    return cases


# --- the configs the models reach ------------------------------------------------------------

MODEL_BATCHES = (1, 64)
MODEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Constexprs that change only epilogue arithmetic (activation, BatchNorm / bias flags, with a DW_ / PW_
# prefix in the separable kernel) or the kernel window's index arithmetic: launches that differ in
# these alone share one compile (the one with the largest window). Tile, warps, stages, dtypes, the
# K-loop shape (FLAT_K, MULT, HAS_ORDER), the residual load and 64-bit indexing all stay distinct.
EPILOGUE_ONLY = ("ACT", "HAS_BIAS", "HAS_BN", "HAS_GAMMA", "HAS_BETA", "KH", "KW")


SPATIAL_ARGS = {"N", "H", "W", "OH", "OW", "M", "P", "TILES", "TILES_W", "pooled_h", "pooled_w", "stride_h", "stride_w", "pad_h", "pad_w",
                "dil_h", "dil_w"}


def structure_key(fn, spec: dict) -> tuple:
    declared = {p.name for p in fn.params if p.is_constexpr}
    flags = []
    for path, value in spec["constants"].items():
        name = fn.arg_names[path[0]]
        if name in declared and name.removeprefix("DW_").removeprefix("PW_") not in EPILOGUE_ONLY:
            flags.append((name, repr(value)))
    pointers = tuple(sorted({t for t in spec["signature"].values() if t.startswith("*")}))
    # Which strides and channel counts the launcher specialised as multiples of 16: an unaligned launch
    # (channel counts such as mobilenetv1_125's 40 and 80) gets scalar loads and other registers than an
    # aligned one. Image sizes and conv geometry (SPATIAL_ARGS) only mask rows: not part of the key.
    divisible = tuple(sorted(name for name in (fn.arg_names[path[0]] for path, attrs in spec["attrs"].items()
                                               if any(a[0] == "tt.divisibility" for a in attrs))
                             if spec["signature"].get(name, "").startswith("i") and name not in SPATIAL_ARGS))
    return fn.__name__, pointers, tuple(sorted(flags)), spec["num_warps"], spec["num_stages"], divisible


def _window(fn, spec: dict) -> int:
    named = {fn.arg_names[path[0]]: v for path, v in spec["constants"].items()}
    return int(named.get("KH", 1)) * int(named.get("KW", 1))


def model_cases(arch: int, models=None) -> list:
    """One case per distinct compile (structure_key) among the Triton launches every registered model
    makes (bench/triton_launches.py), at MODEL_DTYPES x MODEL_BATCHES: each at every config the
    autotuner keeps after its pruning, and at the fixed config. Shared memory: the fixed configs must
    fit sm_86 / sm_89 (99 KiB), the autotuner's candidates the H100."""
    from triton.compiler import make_backend
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    binders = {}
    # Triton's _pack_args walks every argument's nesting (seconds over the models' ~10^4 launch-configs);
    # launches with the same specialisation and constexprs pack alike, so each is packed once.
    packed: dict[tuple, tuple] = {}
    chosen: dict[tuple, tuple] = {}
    launches = triton_launches.record_model_launches(models or fastbone.list_models(), MODEL_DTYPES, MODEL_BATCHES)
    for kernel, args, kwargs, origin in launches:
        smem_limit = H100_SMEM if isinstance(kernel, Autotuner) else FIXED_SMEM
        for fn, kw in triton_launches.expand_autotuned(kernel, args, kwargs):
            # Tensors passed by keyword (the conv's segment 1 / 2 tensors) are pointers too.
            kw = dict(zip(kw, triton_launches.as_pointers(kw.values())))
            # Triton's own specialisation of these arguments (what JITFunction.run computes at launch).
            if fn not in binders:
                binders[fn] = create_function_from_signature(fn.signature, fn.params, backend)
            bound, specialization, options = binders[fn](*triton_launches.as_pointers(args), **kw)
            pack_key = (fn, repr(specialization), repr([bound[p.name] for p in fn.params if p.is_constexpr]),
                        repr(options))
            if pack_key not in packed:
                packed[pack_key] = fn._pack_args(backend, kw, bound, specialization, options)
            options, signature, constants, attrs = packed[pack_key]
            spec = dict(signature=signature, constants=constants, attrs=attrs, num_warps=options.num_warps,
                        num_stages=options.num_stages, smem_limit=smem_limit)
            key = structure_key(fn, spec)
            if key in chosen:
                old_fn, old_spec, old_origin = chosen[key]
                spec["smem_limit"] = old_spec["smem_limit"] = min(smem_limit, old_spec["smem_limit"])
                if _window(fn, spec) <= _window(old_fn, old_spec):
                    continue
            chosen[key] = (fn, spec, origin)
    return [(f"{case_name(fn, spec)} ({origin})", fn, spec) for fn, spec, origin in chosen.values()]


def case_name(fn, spec: dict) -> str:
    """A model case's name, without where it came from: what KNOWN spill lists in the test match."""
    name, pointers, flags, warps, stages, divisible = structure_key(fn, spec)
    order = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_P", "BLOCK_C", "BLOCK_HW")
    named = dict(flags)
    blocks = "x".join(named[k] for k in order if k in named)
    rest = " ".join(f"{k}={v}" for k, v in flags if not k.startswith("BLOCK"))
    dtype = spec["signature"][fn.arg_names[0]].lstrip("*")
    return f"model {name.strip('_')} {dtype} {blocks} w{warps} s{stages} {rest} div16={len(divisible)}"


def hand_spec(fn, *, pointers: dict, constexprs: dict, floats=(), num_warps=4, num_stages=3,
              smem_limit=FIXED_SMEM, divisible_by_16=()) -> dict:
    """compile_specialized's arguments for a hand-written case. pointers: arg name -> element dtype;
    constexprs: name -> value; floats: scalar args passed as fp32; every other argument is an i32
    scalar. Stride arguments of 1 are given as constants, and `divisible_by_16` int arguments marked
    so, as Triton's launcher specialises ints equal to 1 and multiples of 16; pointers are 16-byte
    aligned (torch's allocations are)."""
    import inspect

    # A constexpr the case does not name takes its declared default (flags added later, e.g. the conv's
    # RES_AFTER_ACT and POOL, keep their "off" meaning), as a launch that does not pass it would.
    declared = inspect.signature(fn.fn).parameters
    defaults = {name: p.default for name, p in declared.items() if p.default is not inspect.Parameter.empty
                and ("constexpr" in str(p.annotation))}
    # An argument that defaults to None (the conv's segment 1 / 2 arguments) and that the case does not name
    # (an int scalar the case uses is named in divisible_by_16) is a None constant, as in a launch that
    # does not pass it.
    defaults.update({name: None for name, p in declared.items() if p.default is None and name not in divisible_by_16})
    constexprs = {**{k: v for k, v in defaults.items() if k not in pointers and k not in floats}, **constexprs}
    signature, constants, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in pointers:
            signature[name] = "*" + TRITON_DTYPE[pointers[name]]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in constexprs:
            signature[name] = "constexpr"
            constants[(i,)] = constexprs[name]
        elif name in floats:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name in divisible_by_16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return dict(signature=signature, constants=constants, attrs=attrs, num_warps=num_warps, num_stages=num_stages,
                smem_limit=smem_limit)


def all_cases(arch: int, with_models: bool = True) -> list:
    """The hand-written cases, then the models' cases whose compile no hand-written case already makes."""
    import time

    cases = [(name, fn, hand_spec(fn, **kwargs)) for name, fn, kwargs in conv_cases() + pool_cases() +
             depthwise_cases() + fire_cases()]
    if with_models:
        start = time.monotonic()
        covered = {structure_key(fn, spec) for _, fn, spec in cases}
        found = model_cases(arch)
        extra = [c for c in found if structure_key(c[1], c[2]) not in covered]
        print(f"model configs: {len(found)} distinct compiles from {len(fastbone.list_models())} models, "
              f"{len(found) - len(extra)} already among the hand-written cases ({time.monotonic() - start:.0f} s)",
              file=sys.stderr, flush=True)
        cases += extra
    return cases


def main(arch: int, with_models: bool = True) -> int:
    assert not INTERPRETED, "run with TRITON_INTERPRET=0"
    failures = 0
    cases = all_cases(arch, with_models)
    compiled_fns = {id(fn) for _, fn, _ in cases}
    for qualname, fn in triton_launches.jit_kernels().items():
        if id(fn) not in compiled_fns:  # a kernel no model launches and no hand-written case covers
            failures += 1
            print(json.dumps({"kernel": f"coverage {qualname}", "case": f"coverage {qualname}", "ok": False,
                              "problems": [],
                              "error": f"{qualname} has no compile case: no model launches it and "
                                       "tests/triton_sm90_compile.py has no hand-written case for it"}), flush=True)
    for name, fn, spec in cases:
        case = name.split(" (", 1)[0] if name.startswith("model ") else name  # a model case without its origin
        try:
            info = compile_specialized(fn, arch=arch, **spec)
            failures += bool(info["problems"])
            print(json.dumps({"kernel": name, "case": case, "ok": not info["problems"], **info}), flush=True)
        except Exception as e:  # report every failing kernel, not just the first
            failures += 1
            print(json.dumps({"kernel": name, "case": case, "ok": False, "problems": [],
                              "error": f"{type(e).__name__}: {e}"[:2000]}), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    arch_arg = [a for a in sys.argv[1:] if not a.startswith("--")]
    sys.exit(main(int(arch_arg[0]) if arch_arg else 90, with_models="--hand-only" not in sys.argv))
