"""Benchmark of channel slicing: the fused C++ gather against torch's two-step index_select.

For every conv and linear weight of ResNet-50 (torchvision layout), a random half of the output
channels and a random half of the input channels are kept (sorted indices, seeded), and
``W[out_idx][:, in_idx]`` is built by

- ``slice_channels`` (icprune._C: one pass, no intermediate) and
- ``slice_channels_ref`` (torch: ``index_select`` on dim 0, then on dim 1).

The two are timed layer by layer, interleaved (alternating which goes first), and the median of
each layer's times is summed over the network. Results are checked bit-identical first.

Run: ``python bench/slicing.py [--repeat R] [--keep F] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from icprune.extension import HAVE_EXT
from icprune.models import resnet50
from icprune.slicing import slice_channels, slice_channels_ref


def layer_weights(keep: float) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(name, weight, out_idx, in_idx) for every conv/linear layer of a seeded ResNet-50."""
    torch.manual_seed(0)
    model = resnet50()
    generator = torch.Generator().manual_seed(0)
    items = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            w = module.weight.detach()
            picks = []
            for size in w.shape[:2]:
                n = max(1, round(size * keep))
                picks.append(torch.randperm(size, generator=generator)[:n].sort().values)
            items.append((name, w, *picks))
    return items


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not HAVE_EXT:
        raise SystemExit("icprune._C is not built: nothing to compare")
    items = layer_weights(args.keep)
    for name, w, o, i in items:
        if not torch.equal(slice_channels(w, o, i), slice_channels_ref(w, o, i)):
            raise SystemExit(f"{name}: fused and torch slices differ")
    fused = {name: [] for name, *_ in items}
    ref = {name: [] for name, *_ in items}
    for rep in range(args.repeat):
        for name, w, o, i in items:
            pair = [(fused, slice_channels), (ref, slice_channels_ref)]
            for store, fn in pair if rep % 2 == 0 else pair[::-1]:
                store[name].append(timed(fn, w, o, i))
    fused_s = sum(statistics.median(t) for t in fused.values())
    ref_s = sum(statistics.median(t) for t in ref.values())
    mb = sum(w.numel() * w.element_size() for _, w, *_ in items) / 1e6
    lines = [
        f"# Channel slicing on {platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}",
        "",
        f"ResNet-50, all {len(items)} conv/linear weights ({mb:.0f} MB fp32), keeping "
        f"{args.keep:.0%} of output and input channels (random, seeded); sum over layers of the "
        f"median of {args.repeat} interleaved runs.",
        "",
        "| torch index_select x2 ms | fused C++ slice_channels ms | speed-up (torch / fused) |",
        "|---|---|---|",
        f"| {ref_s * 1e3:.2f} | {fused_s * 1e3:.2f} | {ref_s / fused_s:.2f}x |",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
