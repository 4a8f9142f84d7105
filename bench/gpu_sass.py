"""The Triton kernels compiled for sm_90 (Hopper) without a GPU: registers, spills, key
instructions, as one JSON list on stdout.

Triton ships ptxas and cuobjdump, so this runs on any machine with Triton installed; it must
run with TRITON_INTERPRET unset (``bench.gpu_kernels --sass`` starts it so). Used by the GPU
bench report and by tests/kernels/test_channel_stats_compile.py (a GPU-only compile error
would otherwise surface only on a lent GPU).

Run: ``python -m bench.gpu_sass``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile

import torch
import triton
from icprune.kernels import channel_stats as stats_kernels
from icprune.kernels import gram as gram_kernels
from icprune.kernels.common import FLAG_BIAS, row_mode
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
POINTERS = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
INTS = ("C", "S", "M", "P", "NB", "SPLIT_M", "CHUNK", "SPLITS", "stride_n", "stride_c", "stride_s")


def build(
    fn, types: dict[str, str], consts: dict[str, object], warps: int, stages: int = 3, ints=None
):
    """Compile jit function ``fn`` for sm_90; returns registers, stack and instruction counts.

    ``ints``: values of integer arguments, specialised as the JIT does at a launch: 1 becomes a
    constant, multiples of 16 are marked divisible by 16 (as are all pointers)."""
    consts = dict(consts)
    divisible = [a for a, t in types.items() if t.startswith("*")]
    for name, value in (ints or {}).items():
        if value == 1:
            consts[name] = 1
        elif value % 16 == 0:
            divisible.append(name)
    signature = {a: types.get(a, "i32" if a in INTS else "constexpr") for a in fn.arg_names}
    names = list(fn.arg_names)
    src = ASTSource(
        fn=fn,
        signature=signature,
        constexprs={(names.index(k),): v for k, v in consts.items()},
        attrs={(names.index(a),): [["tt.divisibility", 16]] for a in divisible},
    )
    out = triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages}
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(out.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True
        ).stdout
        sass = subprocess.run([CUOBJDUMP, "--dump-sass", f.name], capture_output=True, text=True)
    counts = {op: len(re.findall(rf"\b{op}\b", sass.stdout)) for op in ("STL", "HGMMA", "VOTE")}
    counts["ATOMS"] = len(re.findall(r"\bATOMS\.", sass.stdout))
    return {
        "regs": int(re.search(r"REG:(\d+)", usage).group(1)),
        "stack": int(re.search(r"STACK:(\d+)", usage).group(1)),
        **counts,
    }


def report() -> list[dict]:
    """Default configurations at a ResNet-50 layer1 shape (64 x 256 x 56 x 56), per dtype and
    layout, specialised as a launch on that tensor would be."""
    layout_consts = {
        "BINS": 64,
        "BINS_P2": 64,
        "BIN_BITS": 6,
        "K_MIN": stats_kernels.K_MIN,
        "INDEX_BITS": stats_kernels.INDEX_BITS,
        "STEPS": stats_kernels.LAYOUT_STEPS,
    }
    parts = {
        "hist_ptr": "*i32",
        "k_ptr": "*i32",
        "off_ptr": "*i64",
        "lo_ptr": "*fp32",
        "hi_ptr": "*fp32",
        "sum_ptr": "*fp64",
        "bad_ptr": "*i32",
    }
    rows = []
    for dtype, pointer in POINTERS.items():
        for layout in ("nchw", "channels_last"):
            x = torch.empty(64, 256, 3136, dtype=dtype)
            if layout == "channels_last":
                x = x.transpose(1, 2).contiguous().transpose(1, 2)
            cfg = stats_kernels.default_config(x, 64)
            n, c, hw = x.shape
            ints = dict(zip(("stride_n", "stride_c", "stride_s"), x.stride(), strict=True))
            ints.update(C=c, S=hw, M=n * hw)
            consts = dict(layout_consts, BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c)
            consts.update(FLAT=cfg.flat_histogram, WIDE=False)
            consts["ROW_MODE"] = row_mode(x, cfg.block_m)
            types = dict(parts, x_ptr=pointer)
            kernel = stats_kernels.JIT_KERNELS["stats_pass"]
            r = build(kernel, types, consts, cfg.stats_warps, ints=ints)
            config = f"block_m={cfg.block_m} block_c={cfg.block_c} flat={cfg.flat_histogram}"
            where = {"dtype": str(dtype), "layout": layout}
            rows.append(dict(kernel="_stats_pass", config=config, **where, **r))
            for block_g in (64, 128):
                types = {"x_ptr": pointer, "flags_ptr": "*i64", "part_ptr": "*fp32"}
                consts = dict(PRECISION=2, SCALED=dtype != torch.float16, FLAG_BIAS=FLAG_BIAS)
                consts.update(SCALE_BITS=gram_kernels.GRAM_SCALE_BITS, BLOCK_G=block_g)
                consts.update(BLOCK_K=cfg.block_k, WIDE=False, WIDEN=False)
                consts["ROW_MODE"] = row_mode(x, cfg.block_k)
                warps = 4 if block_g == 64 else 8
                kernel = gram_kernels.JIT_KERNELS["gram"]
                r = build(kernel, types, consts, warps, cfg.gram_stages, ints=ints)
                config = f"block_g={block_g} block_k={cfg.block_k} 3xtf32"
                rows.append(dict(kernel="_gram", config=config, **where, **r))
    outs = {"counts_ptr": "*i64", "exp_ptr": "*i64", "boff_ptr": "*i64", "min_ptr": "*fp64"}
    outs.update(max_ptr="*fp64", sums_ptr="*fp64", flags_ptr="*i64")
    consts = dict(layout_consts, P_P2=256, BLOCK_F=16, FLAG_BIAS=FLAG_BIAS)
    r = build(stats_kernels.JIT_KERNELS["stats_finish"], dict(parts, **outs), consts, 4)
    rows.append(dict(kernel="_stats_finish", dtype="-", layout="-", config="P=256 block_f=16", **r))
    types = {"part_ptr": "*fp32", "flags_ptr": "*i64", "out_ptr": "*fp64"}
    consts = dict(SCALED=True, FLAG_BIAS=FLAG_BIAS, SCALE_BITS=gram_kernels.GRAM_SCALE_BITS)
    consts.update(BLOCK_G=128, ROWS=1, BLOCK_S=64)
    r = build(gram_kernels.JIT_KERNELS["gram_finish"], types, consts, 4)
    rows.append(dict(kernel="_gram_finish", dtype="-", layout="-", config="block_g=128", **r))
    return rows


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("bench.gpu_sass compiles for the GPU: unset TRITON_INTERPRET")
    print(json.dumps(report()))
