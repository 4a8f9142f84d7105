"""GPU benchmark of the Triton statistics kernels against their rooflines, measured in one run.

Run by ``bench/gpu.sh`` on a lent GPU (or ``--dry-run`` on the CPU under TRITON_INTERPRET=1, tiny
shapes, to prove the script end to end). Everything is measured side by side in this process:

1. Ceilings: copy bandwidth (``y.copy_(x)``, bytes read + written per second) and the matrix
   rate of ``torch.matmul`` in TF32 and in float16 on square matrices.
2. Kernel table at ResNet-50 shapes (batch 64 on a GPU), per dtype and memory layout: the
   statistics pass (one read: histograms, extremes, sums) in GB/s of input read and as a share
   of the copy bandwidth; the per-channel ``torch.histc`` loop (the naive baseline); the Gram
   kernel against its TF32 roofline ``max(bytes / copy bandwidth, M*C*(C+1) / TF32 rate)`` and
   against torch's ``A @ A.T`` (float32, and TF32) and ``torch.cdist``.
3. ResNet-50 calibration overhead (every prunable layer, read_at='bn'): a forward with
   ``calibrate(backend='triton')`` over a plain forward, paired medians, for float32 NCHW and
   float16 channels_last; plus "kernels only" (hooks call the kernels, no ChannelStats
   bookkeeping) to show where the rest goes.
4. Targets, each computed from the measurements above: statistics pass >= 85 % of copy
   bandwidth, Gram within 1.5x of its TF32 roofline, calibration <= 1.05x a forward, statistics
   pass >= 20x the histc loop.
5. ``--sweep``: statistics-pass and Gram block sizes on two shapes (to tune default_config).
6. ``--sass``: registers, spills and tensor-core instructions of the kernels compiled for
   sm_90 (works without a GPU: Triton ships ptxas and cuobjdump).

Run: ``python -m bench.gpu_kernels [--dry-run] [--sweep] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

#: (C, H, W) of ResNet-50 feature maps at 224 x 224 (as bench/channel_stats.py).
SHAPES = [(64, 112, 112), (256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]
DRY_SHAPES = [(20, 3, 3)]
BINS = 64
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: Targets of issue 15 (checked against measurements, never assumed).
HIST_SHARE = 0.85
GRAM_ROOF = 1.5
CALIB_OVERHEAD = 1.05
HISTC_SPEEDUP = 20.0


def device_name() -> str:
    """``cpu``, or the short GPU name (e.g. ``h200``), as bench/channel_stats.py names files."""
    if not torch.cuda.is_available():
        return "cpu"
    words = torch.cuda.get_device_name().lower().replace("nvidia", "").split()
    return next((w for w in words if any(ch.isdigit() for ch in w)), words[0])


def timed(fn: Callable[[], object], repeat: int, warmup: int = 1) -> float:
    """Median seconds of ``repeat`` calls of ``fn`` after ``warmup`` calls (CUDA events on a
    GPU, wall clock on the CPU)."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / 1e3)
    return statistics.median(times)


def ceilings(device: torch.device, dry: bool, repeat: int) -> dict[str, float]:
    """Measured copy bandwidth (bytes/s, read + write) and matmul rates (FLOP/s)."""
    numel = 2**16 if dry else 2**28  # 1 GiB of float32 on a GPU
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    copy_s = timed(lambda dst=dst, src=src: dst.copy_(src), repeat)
    del src, dst
    side = 128 if dry else 8192
    out = {"copy": 2 * numel * 4 / copy_s, "copy_bytes": numel * 4, "side": side}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        a = torch.randn(side, side, device=device)
        out["tf32"] = 2 * side**3 / timed(lambda: a @ a, repeat)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    half = torch.float32 if dry else torch.float16  # CPU matmul in fp16 is not a ceiling
    a = torch.randn(side, side, device=device, dtype=half)
    out["fp16"] = 2 * side**3 / timed(lambda: a @ a, repeat)
    return out


def feature_map(shape, batch: int, dtype: torch.dtype, layout: str, device) -> torch.Tensor:
    """Post-ReLU-like Tensor[N, C, H, W] (half zeros, per-channel scales) in ``layout``."""
    c, h, w = shape
    gen = torch.Generator(device=device).manual_seed(c)
    x = torch.randn(batch, c, h, w, device=device, generator=gen)
    x = (x * torch.logspace(-1, 1, c, device=device).view(1, c, 1, 1)).clamp(min=0).to(dtype)
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x


def histc_loop(x: torch.Tensor) -> torch.Tensor:
    """The naive baseline: one ``torch.histc`` per channel over its own range (two host reads
    of the extremes per channel)."""
    return torch.stack(
        [
            torch.histc(x[:, c].float(), BINS, float(x[:, c].min()), float(x[:, c].max()))
            for c in range(x.shape[1])
        ]
    )


def kernel_rows(args, ceil, device) -> list[dict]:
    """One measurement dict per (shape, dtype, layout)."""
    from icprune.kernels.channel_stats import channel_stats

    shapes = DRY_SHAPES if args.dry_run else SHAPES
    rows = []
    for shape in shapes:
        base = feature_map(shape, args.batch, torch.float32, "nchw", device)
        histc_s = timed(lambda base=base: histc_loop(base), 1)
        del base
        for dname, dtype in DTYPES.items():
            for layout in ("nchw", "channels_last"):
                x = feature_map(shape, args.batch, dtype, layout, device)
                x3 = x.reshape(x.shape[0], x.shape[1], -1)
                nbytes = x.numel() * x.element_size()
                c, m = x.shape[1], x.numel() // x.shape[1]
                stats_s = timed(lambda x3=x3: channel_stats(x3, BINS, gram=False), args.repeat)
                full_s = timed(lambda x3=x3: channel_stats(x3, BINS), args.repeat)
                gram_s = max(full_s - stats_s, 1e-9)
                samples = x.movedim(1, -1).reshape(-1, c)  # (M, C): a copy for NCHW

                def torch_gram(samples=samples, x=x, c=c):
                    return x.movedim(1, -1).reshape(-1, c).T @ x.movedim(1, -1).reshape(-1, c)

                flag = torch.backends.cuda.matmul.allow_tf32
                mm_s = timed(torch_gram, args.repeat)
                torch.backends.cuda.matmul.allow_tf32 = True
                mm_tf32_s = timed(torch_gram, args.repeat)
                torch.backends.cuda.matmul.allow_tf32 = flag
                wide = samples.T.float()  # cdist has no 16-bit kernels everywhere

                cdist_s = timed(lambda wide=wide: torch.cdist(wide, wide), 1)
                roof = max(nbytes / ceil["copy"], m * c * (c + 1) / ceil["tf32"])
                rows.append(
                    {
                        "shape": "x".join(map(str, shape)),
                        "dtype": dname,
                        "layout": layout,
                        "MB": nbytes / 1e6,
                        "stats_gbs": nbytes / stats_s / 1e9,
                        "stats_share": nbytes / stats_s / ceil["copy"],
                        "histc_x": histc_s / stats_s,
                        "gram_s": gram_s,
                        "gram_roof_s": roof,
                        "gram_vs_roof": gram_s / roof,
                        "gram_tflops": m * c * (c + 1) / gram_s / 1e12,
                        "mm_x": mm_s / gram_s,
                        "mm_tf32_x": mm_tf32_s / gram_s,
                        "cdist_x": cdist_s / gram_s,
                        "full_ms": full_s * 1e3,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
                del x, x3, samples, wide
    return rows


def calibration_rows(args, device) -> list[dict]:
    """ResNet-50 calibration overhead (backend='triton') over a plain forward, paired."""
    from icprune.kernels.channel_stats import channel_stats

    from icprune.calibrate import calibrate
    from icprune.models import resnet50
    from icprune.structure.graph import prunable_layers, read_points

    side = 32 if args.dry_run else 224
    batch = 1 if args.dry_run else args.batch
    rows = []
    for name, dtype, layout in (
        ("fp32 NCHW", torch.float32, torch.contiguous_format),
        ("fp16 channels_last", torch.float16, torch.channels_last),
    ):
        torch.manual_seed(0)
        model = resnet50().eval().to(device=device, dtype=dtype, memory_format=layout)
        images = torch.randn(batch, 3, side, side, device=device, dtype=dtype)
        images = images.contiguous(memory_format=layout)
        layers = list(prunable_layers(model))[: 1 if args.dry_run else None]
        points = read_points(model, prunable_layers(model, layers), "bn")
        modules = dict(model.named_modules())

        def plain(model=model, images=images):
            with torch.no_grad():
                model(images)

        def calib(model=model, images=images, layers=layers):
            calibrate(model, [images], layers=layers, backend="triton", progress=False)

        def kernels_only(model=model, images=images, points=points, modules=modules):
            def hook(_m, _i, out, point):
                act = out if point.activation is None else point.activation(out)
                channel_stats(act.reshape(act.shape[0], act.shape[1], -1), BINS)

            handles = [
                modules[p.module].register_forward_hook(lambda m, i, o, p=p: hook(m, i, o, p))
                for p in points.values()
            ]
            try:
                plain()
            finally:
                for h in handles:
                    h.remove()

        pairs = []
        for _ in range(1 if args.dry_run else args.repeat):
            p = timed(plain, 1)
            pairs.append((p, timed(calib, 1), timed(kernels_only, 1)))
        rows.append(
            {
                "model": f"ResNet-50 {name}, batch {batch}, {side}x{side}, {len(layers)} layers",
                "forward_ms": statistics.median(p for p, _, _ in pairs) * 1e3,
                "calibrate_x": statistics.median(c / p for p, c, _ in pairs),
                "kernels_x": statistics.median(k / p for p, _, k in pairs),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        del model, images
    return rows


def sweep_rows(args, device) -> list[str]:
    """Markdown rows: statistics pass GB/s and Gram time per block configuration."""
    from icprune.kernels import channel_stats as kernels

    shape_list = DRY_SHAPES[:1] if args.dry_run else [(256, 56, 56), (2048, 7, 7)]
    out = ["| shape | dtype | layout | config | stats GB/s | Gram ms |", "|" + "---|" * 6]
    for shape in shape_list:
        for dname, layout in (("fp16", "channels_last"), ("fp32", "nchw")):
            x = feature_map(shape, args.batch, DTYPES[dname], layout, device)
            x3 = x.reshape(x.shape[0], x.shape[1], -1)
            base = kernels.default_config(x3, BINS)
            nbytes = x.numel() * x.element_size()
            cands = set()
            for block_c in (1, 4, 8, 16, 32):
                for tile in (1024, 2048, 4096):
                    for flat in (False, True):
                        if block_c * 64 > 4096 or (flat and block_c == 1):
                            continue
                        cands.add(base._replace(block_c=block_c, block_m=tile // block_c,
                                                flat_histogram=flat))  # fmt: skip
            for cfg in sorted(cands)[: 2 if args.dry_run else None]:
                try:
                    s = timed(
                        functools.partial(kernels.channel_stats, x3, BINS, False, config=cfg), 3
                    )
                    cell = f"{nbytes / s / 1e9:.3g}"
                except Exception as exc:  # a config that does not compile is a finding too
                    cell = f"fails: {type(exc).__name__}"
                desc = f"block_m={cfg.block_m} block_c={cfg.block_c} flat={cfg.flat_histogram}"
                out.append(f"| {'x'.join(map(str, shape))} | {dname} | {layout} | {desc} | "
                           f"{cell} | |")  # fmt: skip
            grams = ((64, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2), (128, 32, 8, 4))
            for block_g, block_k, warps, stages in grams[: 1 if args.dry_run else None]:
                cfg = base._replace(
                    block_g=block_g, block_k=block_k, gram_warps=warps, gram_stages=stages
                )
                try:
                    full = timed(functools.partial(kernels.channel_stats, x3, BINS, config=cfg), 3)
                    part = timed(
                        functools.partial(kernels.channel_stats, x3, BINS, False, config=cfg), 3
                    )
                    cell = f"{(full - part) * 1e3:.3f}"
                except Exception as exc:
                    cell = f"fails: {type(exc).__name__}"
                desc = f"block_g={block_g} block_k={block_k} warps={warps} stages={stages}"
                out.append(f"| {'x'.join(map(str, shape))} | {dname} | {layout} | {desc} | | "
                           f"{cell} |")  # fmt: skip
            print(out[-1], file=sys.stderr, flush=True)
    return out


def sass_report() -> list[dict]:
    """Compile the kernels for sm_90 in a subprocess without TRITON_INTERPRET (no GPU needed)
    and report registers, spill stores and key instructions per kernel and configuration."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_sass"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=Path(__file__).resolve().parent.parent,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"compiling the kernels for sm_90 failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ok(flag: bool) -> str:
    return "**pass**" if flag else "**FAIL**"


def render(args, ceil, rows, calib, sweep, sass) -> str:
    """The results as markdown."""
    import triton

    what = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.machine()
    lines = [
        f"# Triton statistics kernels on {device_name()} ({what}){' - DRY RUN' * args.dry_run}",
        "",
        f"torch {torch.__version__}, Triton {triton.__version__}, batch {args.batch}, medians of "
        f"{args.repeat}; generated by `python -m bench.gpu_kernels` (bench/gpu.sh). "
        f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}.",
        "",
        "## 1. Ceilings measured in this run",
        "",
        f"- copy (`y.copy_(x)` of {ceil['copy_bytes'] / 2**20:.0f} MiB float32, bytes read + "
        f"written): {ceil['copy'] / 1e9:.4g} GB/s",
        f"- TF32 matmul ({ceil['side']:.0f}^3): {ceil['tf32'] / 1e12:.4g} TFLOP/s; float16 "
        f"matmul: {ceil['fp16'] / 1e12:.4g} TFLOP/s",
        "",
        "## 2. Kernels at ResNet-50 feature-map shapes",
        "",
        "stats pass: one read (histograms of 64 bins, extremes, sums), GB/s of input and share "
        "of the copy bandwidth; x histc: the per-channel `torch.histc` loop (float32 NCHW, same "
        "shape) over the stats pass; Gram: kernel time over its TF32 roofline "
        "max(bytes / copy, M*C*(C+1) / TF32 rate), and torch's time over ours for `A @ A.T` "
        "(float32 default, TF32; both include the (M, C) view or copy) and `torch.cdist` (on a "
        "float32 (C, M) copy).",
        "",
        "| C x H x W | dtype | layout | MB | stats GB/s | % copy | x histc | Gram ms | roof ms | "
        "Gram / roof | Gram TFLOP/s | torch mm / ours | torch mm TF32 / ours | cdist / ours |",
        "|" + "---|" * 14,
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {r['layout']} | {r['MB']:.3g} | "
            f"{r['stats_gbs']:.3g} | {100 * r['stats_share']:.3g} % | {r['histc_x']:.3g}x | "
            f"{r['gram_s'] * 1e3:.3g} | {r['gram_roof_s'] * 1e3:.3g} | {r['gram_vs_roof']:.3g}x | "
            f"{r['gram_tflops']:.3g} | {r['mm_x']:.3g}x | {r['mm_tf32_x']:.3g}x | "
            f"{r['cdist_x']:.3g}x |"
        )
    lines += [
        "",
        "## 3. ResNet-50 calibration overhead (every prunable layer, read_at='bn')",
        "",
        "| model | forward ms | calibrate / forward | forward + kernels only / forward |",
        "|---|---|---|---|",
    ]
    for c in calib:
        lines.append(
            f"| {c['model']} | {c['forward_ms']:.2f} | {c['calibrate_x']:.3f}x | "
            f"{c['kernels_x']:.3f}x |"
        )
    worst_share = min(rows, key=lambda r: r["stats_share"])
    worst_roof = max(rows, key=lambda r: r["gram_vs_roof"])
    worst_histc = min(rows, key=lambda r: r["histc_x"])
    worst_cal = max(calib, key=lambda c: c["calibrate_x"])

    def where(r):
        return f"{r['shape']} {r['dtype']} {r['layout']}"

    lines += [
        "",
        "## 4. Targets (computed from the measurements above; worst case shown)",
        "",
        "| target | measured (worst) | where | result |",
        "|---|---|---|---|",
        f"| stats pass >= {100 * HIST_SHARE:.0f} % of copy bandwidth | "
        f"{100 * worst_share['stats_share']:.3g} % | {where(worst_share)} | "
        f"{ok(worst_share['stats_share'] >= HIST_SHARE)} |",
        f"| Gram within {GRAM_ROOF}x of its TF32 roofline | {worst_roof['gram_vs_roof']:.2f}x | "
        f"{where(worst_roof)} | {ok(worst_roof['gram_vs_roof'] <= GRAM_ROOF)} |",
        f"| calibration <= {CALIB_OVERHEAD}x forward | {worst_cal['calibrate_x']:.3f}x | "
        f"{worst_cal['model']} | {ok(worst_cal['calibrate_x'] <= CALIB_OVERHEAD)} |",
        f"| stats pass >= {HISTC_SPEEDUP:.0f}x the per-channel histc loop | "
        f"{worst_histc['histc_x']:.3g}x | {where(worst_histc)} | "
        f"{ok(worst_histc['histc_x'] >= HISTC_SPEEDUP)} |",
        "",
        f"Rows passing each target: stats share {sum(r['stats_share'] >= HIST_SHARE for r in rows)}"
        f"/{len(rows)}, Gram roof {sum(r['gram_vs_roof'] <= GRAM_ROOF for r in rows)}/{len(rows)}, "
        f"histc {sum(r['histc_x'] >= HISTC_SPEEDUP for r in rows)}/{len(rows)}.",
    ]
    if sweep:
        lines += ["", "## 5. Block-size sweep", "", *sweep]
    if sass:
        lines += [
            "",
            "## 6. Kernels compiled for sm_90 (static)",
            "",
            "| kernel | dtype | layout | config | registers | stack B | spill stores | HGMMA | "
            "VOTE | ATOMS |",
            "|" + "---|" * 10,
        ]
        lines += [
            f"| {s['kernel']} | {s['dtype']} | {s['layout']} | {s['config']} | {s['regs']} | "
            f"{s['stack']} | {s['STL']} | {s['HGMMA']} | {s['VOTE']} | {s['ATOMS']} |"
            for s in sass
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, measure, print and write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, interpreter, tiny shapes")
    parser.add_argument("--batch", type=int, default=None, help="N (default 64; dry run 2)")
    parser.add_argument("--repeat", type=int, default=None, help="timed repeats (default 10)")
    parser.add_argument("--sweep", action="store_true", help="also sweep block sizes")
    parser.add_argument(
        "--sweep-only", action="store_true", help="only the sweep, as markdown on stdout"
    )
    parser.add_argument("--sass", action="store_true", help="also compile for sm_90, report")
    parser.add_argument("--sass-only", action="store_true", help="only the sm_90 report, JSON")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown here")
    args = parser.parse_args(argv)
    if args.sass_only:
        print(json.dumps(sass_report()))
        return
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--dry-run needs TRITON_INTERPRET=1 set before Python starts")
    elif not torch.cuda.is_available():
        raise SystemExit("bench.gpu_kernels needs a CUDA device (or --dry-run on the CPU)")
    args.batch = args.batch or (2 if args.dry_run else 64)
    args.repeat = args.repeat or (1 if args.dry_run else 10)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.sweep_only:
        print("\n".join(["", "## 5. Block-size sweep", "", *sweep_rows(args, device)]))
        return
    ceil = ceilings(device, args.dry_run, args.repeat)
    print(json.dumps({k: f"{v:.3g}" for k, v in ceil.items()}), flush=True)
    rows = kernel_rows(args, ceil, device)
    calib = calibration_rows(args, device)
    sweep = sweep_rows(args, device) if args.sweep else []
    sass = sass_report() if args.sass else []
    text = render(args, ceil, rows, calib, sweep, sass)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
