"""``make demo``: score a zoo model on bundled real images and print what it found.

Runs on embedded defaults with no downloads: ResNet-18 (torchvision layout, seeded random
weights - load a torchvision checkpoint with ``load_state_dict`` to score a trained one) on 32
crops of scikit-learn's sample photographs. For every prunable layer it prints the mean
information capacity and independence of its channels, from feature maps and from weights,
the channels each would prune first, and how much the two choices agree.

Run: ``python -m icprune.demo``.
"""

from __future__ import annotations

import time

import torch

from icprune.calibrate import calibrate
from icprune.counting import count
from icprune.data import sample_images
from icprune.models import resnet18
from icprune.scoring import LayerScores, layer_scores, score

#: Share of each layer's channels compared between the feature and weight rankings.
PRUNE_SHARE = 0.25
#: Independence shown (and fused into the rankings): correlation-based, in [0, 1] for both
#: sources, so the feature and weight columns compare; icprune's default is "distance".
INDEPENDENCE = "correlation"


def lowest(scores: LayerScores, share: float = PRUNE_SHARE) -> torch.Tensor:
    """Indices (Tensor[k] int64, ascending score, ties by index) of the ``share`` lowest-scoring
    channels, at least one."""
    k = max(1, int(share * scores.score.numel()))
    order = torch.sort(scores.score, stable=True).indices
    return order[:k]


def main() -> None:
    """Score ResNet-18 on sample images from feature maps and from weights; print a table."""
    torch.manual_seed(0)
    model = resnet18()
    images = sample_images(count=32, size=224, seed=0)
    batches = list(images.split(8))
    macs, params = count(model, images[:1])
    print(
        f"ResNet-18 (seeded random weights), {params / 1e6:.2f} M parameters, "
        f"{macs / 1e9:.2f} GMACs per 224x224 image; data: {len(images)} crops of "
        f"scikit-learn's sample photographs, batches of {len(batches[0])}"
    )
    start = time.perf_counter()
    stats = calibrate(model, batches)
    calib_s = time.perf_counter() - start
    features = {
        name: layer_scores(layer, independence=INDEPENDENCE) for name, layer in stats.items()
    }
    start = time.perf_counter()
    weights = score(model, source="weights", independence=INDEPENDENCE)
    weights_s = time.perf_counter() - start

    header = (
        f"{'layer':<24}{'C':>5}  {'read at':<11}{'IC feat':>8}{'II feat':>8}{'IC wts':>8}"
        f"{'II wts':>8}  {'overlap':>7}  prune first (features)"
    )
    print("\nIC: capacity, histogram entropy in nats; II: independence, 1 - mean |corr|.")
    print(f"overlap: share of the {PRUNE_SHARE:.0%} lowest-scoring channels both sources pick.\n")
    print(header)
    print("-" * len(header))
    overlaps = []
    for name, feat in features.items():
        wts = weights[name]
        low_f, low_w = lowest(feat), lowest(wts)
        overlap = len(set(low_f.tolist()) & set(low_w.tolist())) / len(low_f)
        overlaps.append(overlap)
        first = ", ".join(str(i) for i in low_f[:4].tolist())
        print(
            f"{name:<24}{feat.score.numel():>5}  {stats[name].read_at:<11}"
            f"{feat.capacity.mean():>8.3f}{feat.independence.mean():>8.3f}"
            f"{wts.capacity.mean():>8.3f}{wts.independence.mean():>8.3f}  {overlap:>7.0%}  {first}"
        )
    channels = sum(f.score.numel() for f in features.values())
    samples = sum(layer.count * layer.num_channels for layer in stats.values())
    print(
        f"\nscored {len(features)} layers, {channels} channels: feature maps "
        f"({samples / 1e6:.0f} M values) in {calib_s:.2f} s, weights in {weights_s:.2f} s; "
        f"mean overlap of the two choices {sum(overlaps) / len(overlaps):.0%} "
        f"(chance: {PRUNE_SHARE:.0%})"
    )


if __name__ == "__main__":
    main()
