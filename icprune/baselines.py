"""Feature-map criteria of other methods, as baselines for icprune's scores.

Each function takes one layer's feature maps ``Tensor[N, C, H, W]`` (one calibration batch) and
returns ``Tensor[C]`` float64, higher = keep, like :func:`icprune.score`. They are written as
well as torch allows (batched, no Python loop per map) so that speed comparisons against them
are fair.

- :func:`hrank`: HRank (Lin et al., CVPR 2020), the mean matrix rank of each channel's H x W map.
- :func:`chip`: CHIP (Sui et al., NeurIPS 2021), the mean drop in the nuclear norm of the
  C x HW feature matrix when the channel's row is zeroed.
"""

from __future__ import annotations

import torch


def _check_maps(features: torch.Tensor, name: str) -> None:
    if not isinstance(features, torch.Tensor) or features.dim() != 4:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features)
        raise ValueError(f"{name}: features must be a Tensor[N, C, H, W], got {shape}")
    if features.numel() == 0:
        raise ValueError(f"{name}: features are empty (shape {tuple(features.shape)})")
    if not features.is_floating_point():
        raise TypeError(f"{name}: features must be floating point, got {features.dtype}")
    if not torch.isfinite(features).all():
        raise ValueError(f"{name}: features contain NaN or Inf; check the model and its input")


def hrank(features: torch.Tensor) -> torch.Tensor:
    """HRank score: mean rank of each channel's feature map over the batch.

    Args:
        features: Tensor[N, C, H, W], any floating dtype (computed in float32).

    Returns:
        Tensor[C] float64, the average of ``matrix_rank(features[n, c])`` over n (a count of
        singular values above torch's default tolerance), higher = keep.
    """
    _check_maps(features, "hrank")
    ranks = torch.linalg.matrix_rank(features.float())  # (N, C), one SVD per map, batched
    return ranks.double().mean(0)


def chip(features: torch.Tensor, samples_per_chunk: int = 8) -> torch.Tensor:
    """CHIP score: channel independence by nuclear norm.

    For each sample n, with ``F`` = ``features[n]`` reshaped to C x HW, the score of channel c is
    ``||F||_* - ||F with row c set to 0||_*``, averaged over the batch. That is N * (C + 1)
    singular value decompositions of C x HW matrices, batched ``samples_per_chunk`` samples at
    a time (memory grows as ``samples_per_chunk * C * C * H * W``).

    Args:
        features: Tensor[N, C, H, W], any floating dtype (computed in float32).
        samples_per_chunk: samples decomposed per batched call (>= 1).

    Returns:
        Tensor[C] float64, the mean nuclear-norm drop, in feature-map units; higher = keep.
    """
    _check_maps(features, "chip")
    if isinstance(samples_per_chunk, bool) or not isinstance(samples_per_chunk, int):
        raise TypeError(f"chip: samples_per_chunk must be an int, got {samples_per_chunk!r}")
    if samples_per_chunk < 1:
        raise ValueError(f"chip: samples_per_chunk must be >= 1, got {samples_per_chunk}")
    n, c = features.shape[:2]
    maps = features.float().reshape(n, c, -1)  # (N, C, HW)
    keep = 1.0 - torch.eye(c, dtype=maps.dtype, device=maps.device)  # row c zeroed in copy c
    total = torch.zeros(c, dtype=torch.float64, device=maps.device)
    for chunk in maps.split(samples_per_chunk):
        full = torch.linalg.svdvals(chunk).sum(-1)  # (n,)
        removed = torch.linalg.svdvals(chunk[:, None] * keep[None, :, :, None]).sum(-1)
        total += (full[:, None] - removed).double().sum(0)  # (C,)
    return total / n
