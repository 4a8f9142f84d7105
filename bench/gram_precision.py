"""Error of the GPU Gram precisions against float64, emulated on the CPU (no GPU needed).

The Triton kernel (kernels/channel_stats.py) computes a batch's Gram matrix ``A @ A.T`` on
tensor cores; this bench emulates its number formats in torch on the CPU, on real feature maps
(ResNet-50 at its default ``read_at="bn"`` points, fed crops of scikit-learn's sample
photographs), and measures what each choice does to the Gram matrix and to the scores built
from it, against the float64 reference:

- ``ieee``: float32 products and float32 accumulation over one split (what "ieee" and torch's
  float32 ``A @ A.T`` do), float64 across splits;
- ``tf32``: inputs rounded to TF32 (10 mantissa bits, round to nearest even, as the kernel does
  in-kernel), exact products, float32 accumulation;
- ``3xtf32``: each input split into TF32 ``hi + lo``; ``hi*hi + hi*lo + lo*hi``;
- ``fp16`` / ``bf16``: the maps cast to 16 bits first (what a half-precision model feeds the
  kernel); their products are exact, so this is the error of the data, not of the kernel.

Table 2 models the tensor cores' accumulation as truncating (rounding toward zero) after each
k-step of 8 products instead of rounding to nearest - a pessimistic model - for several chunk
lengths: the bias grows linearly with the steps, which is what bounds ``GRAM_CHUNK``.

Metrics: max |G - G64| / max |G64|; max |corr - corr64|; max relative error of the distance
matrix over pairs with D >= 1e-3 max D; Kendall's tau between the fused scores (distance and
correlation independence) and whether the lower half of channels (a 50 % prune) is the same set.

Run: ``python -m bench.gram_precision [--out FILE]`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from scipy.stats import kendalltau

from bench.channel_stats import feature_maps
from icprune.models import resnet50
from icprune.scoring import layer_scores
from icprune.stats.channel_stats import ChannelStats
from icprune.stats.packed import pack_upper

#: Layers reported: one per stage, early wide maps to late narrow ones.
LAYERS = ("conv1", "layer1.0.conv3", "layer2.0.conv3", "layer3.0.conv3", "layer4.0.conv3")
SPLIT = 8192  # samples per float32 accumulation (a float32 sum; chunks of GRAM_CHUNK inside)


def photos(batch: int, side: int = 224) -> torch.Tensor:
    """Tensor[batch, 3, side, side]: normalised crops of scikit-learn's sample photographs."""
    from sklearn.datasets import load_sample_images

    images = load_sample_images().images
    crops = []
    for i in range(batch):
        img = images[i % len(images)]
        y, x = (37 * i) % (img.shape[0] - side), (53 * i) % (img.shape[1] - side)
        crops.append(torch.from_numpy(img[y : y + side, x : x + side].copy()))
    x = torch.stack(crops).permute(0, 3, 1, 2).float() / 255
    return (x - 0.45) / 0.225


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 -> nearest TF32 value (round to nearest even), as kernels/channel_stats does."""
    bits = x.contiguous().view(torch.int32)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & -8192
    return bits.view(torch.float32)


def split_gram(rows: torch.Tensor, fmt: str, split: int = SPLIT) -> torch.Tensor:
    """Tensor[C, C] float64 Gram of the float32 Tensor[M, C] ``rows`` in format ``fmt``, with
    float32 accumulation over ``split`` rows and float64 across splits."""
    total = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64)
    for part in rows.split(split):
        if fmt == "tf32":
            t = round_tf32(part)
            g = t.T @ t
        elif fmt == "3xtf32":
            hi = round_tf32(part)
            lo = round_tf32(part - hi)
            g = lo.T @ hi + hi.T @ lo + hi.T @ hi
        else:  # ieee, and 16-bit data (widened exactly)
            g = part.T @ part
        total += g.double()
    return total


def truncating_gram(rows: torch.Tensor, fmt: str, split: int, k_step: int = 8) -> torch.Tensor:
    """Like :func:`split_gram`, but each k_step of products is added to the float32
    accumulator with rounding toward zero (a model of tensor-core accumulation)."""
    total = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64)
    for part in rows.split(split):
        acc = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float32)
        for step in part.split(k_step):
            if fmt == "3xtf32":
                hi = round_tf32(step)
                lo = round_tf32(step - hi)
                exact = lo.double().T @ hi.double() + hi.double().T @ lo.double()
                exact += hi.double().T @ hi.double()
            else:
                t = round_tf32(step)
                exact = t.double().T @ t.double()
            want = acc.double() + exact
            near = want.float()
            # Round toward zero: step back where rounding to nearest went away from zero.
            away = near.double().abs() > want.abs()
            acc = torch.where(away, torch.nextafter(near, torch.zeros_like(near)), near)
        total += acc.double()
    return total


def with_gram(stats: ChannelStats, gram: torch.Tensor) -> ChannelStats:
    """A copy of ``stats`` whose Gram matrix is ``gram`` (its upper triangle, packed)."""
    copy = ChannelStats.from_state_dict(stats.state_dict(), backend="torch")
    copy.gram_packed = pack_upper(gram.double()).contiguous()
    copy.gram_packed_lo = torch.zeros_like(copy.gram_packed)
    return copy


def metrics(ref: ChannelStats, got: ChannelStats) -> list[str]:
    """Table cells comparing ``got`` to ``ref`` (see the module docstring)."""
    g_err = float((got.gram - ref.gram).abs().max() / ref.gram.abs().max())
    c_err = float((got.correlation() - ref.correlation()).abs().max())
    d_ref, d_got = ref.distance(), got.distance()
    far = d_ref >= 1e-3 * float(d_ref.max())
    d_err = float(((d_got - d_ref).abs() / d_ref.clamp(min=1e-300))[far].max())
    cells = [f"{g_err:.1e}", f"{c_err:.1e}", f"{d_err:.1e}"]
    for independence in ("distance", "correlation"):
        a = layer_scores(ref, independence=independence).score.numpy()
        b = layer_scores(got, independence=independence).score.numpy()
        tau = kendalltau(a, b).statistic
        half = len(a) // 2
        same = set(np.argsort(a, kind="stable")[:half]) == set(np.argsort(b, kind="stable")[:half])
        cells += [f"{tau:.5f}", "yes" if same else "**no**"]
    return cells


def main() -> None:
    """Print (and optionally write) the two tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="images (224 x 224)")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables here")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = resnet50().eval()
    images = photos(args.batch)
    maps = {k: v for k, v in feature_maps(model, images).items() if k in LAYERS}
    head = (
        "| layer | C | M | format | max dG / max G | max d corr | max rel dD | tau (distance) | "
        "same 50 % (distance) | tau (correlation) | same 50 % (correlation) |"
    )
    lines = [
        f"# Gram precision vs float64 (ResNet-50, random init, {args.batch} photo crops, "
        "read_at='bn'; CPU emulation)",
        "",
        "Generated by `python -m bench.gram_precision`.",
        "",
        "## 1. Formats (round-to-nearest float32 accumulation over "
        f"{SPLIT} samples, float64 across)",
        "",
        head,
        "|" + "---|" * 11,
    ]
    for name in LAYERS:
        x = maps[name]
        rows = x.transpose(0, 1).reshape(x.shape[1], -1).T.contiguous().float()  # (M, C)
        ref = ChannelStats(x.shape[1], backend="torch")
        ref.update(x)  # the float64 reference of these maps
        for fmt in ("ieee", "tf32", "3xtf32", "fp16", "bf16"):
            if fmt in ("fp16", "bf16"):  # the kernel's error on 16-bit data, and the data's
                cast = x.to(torch.float16 if fmt == "fp16" else torch.bfloat16)
                data_ref = ChannelStats(x.shape[1], backend="torch")
                data_ref.update(cast)
                wide = cast.transpose(0, 1).reshape(x.shape[1], -1).T.float()
                cells = metrics(data_ref, with_gram(data_ref, split_gram(wide, "ieee")))
                data = metrics(ref, data_ref)
                fmt = (
                    f"{fmt} (vs float64 of the 16-bit data; the cast itself: {data[0]}, {data[1]})"
                )
            else:
                cells = metrics(ref, with_gram(ref, split_gram(rows, fmt)))
            lines.append(
                f"| {name} | {x.shape[1]} | {rows.shape[0]} | {fmt} | " + " | ".join(cells) + " |"
            )
        print(lines[-1], flush=True)
    lines += [
        "",
        "## 2. Truncating (tensor-core) accumulation: max dG / max G by chunk length",
        "",
        "| layer | format | chunk 1024 | chunk 2048 | chunk 8192 | chunk 65536 | "
        "round-to-nearest, 65536 |",
        "|---|---|---|---|---|---|---|",
    ]
    name = "layer1.0.conv3"
    x = maps[name]
    rows = x.transpose(0, 1).reshape(x.shape[1], -1).T.contiguous().float()[:65536, :64]
    want = rows.double().T @ rows.double()
    for fmt in ("tf32", "3xtf32"):
        cells = []
        for split in (1024, 2048, 8192, 65536):
            got = truncating_gram(rows, fmt, split)
            cells.append(f"{float((got - want).abs().max() / want.abs().max()):.1e}")
        near = split_gram(rows, fmt, 65536)
        cells.append(f"{float((near - want).abs().max() / want.abs().max()):.1e}")
        lines.append(f"| {name} (64 channels, 65536 samples) | {fmt} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
