"""Criteria of other methods, as baselines for icprune's scores.

Every function returns one score per output channel of one layer, ``Tensor[C]`` float64,
higher = keep, like :func:`icprune.score`.

Feature-map criteria take one layer's feature maps ``Tensor[N, C, H, W]`` (one calibration
batch). They are written as well as torch allows (batched, no Python loop per map) so that speed
comparisons against them are fair.

- :func:`hrank`: HRank (Lin et al., CVPR 2020), the mean matrix rank of each channel's H x W map.
- :func:`chip`: CHIP (Sui et al., NeurIPS 2021), the mean drop in the nuclear norm of the
  C x HW feature matrix when the channel's row is zeroed.

Data-free criteria take a layer's weight ``Tensor[C, ...]`` (C output channels first), or a
BatchNorm's scale, or only the channel count:

- :func:`l1_norm`: L1 norm of each filter (Li et al., ICLR 2017).
- :func:`bn_scale`: ``|gamma|`` of the BatchNorm after the layer (network slimming, Liu et al.,
  ICCV 2017).
- :func:`fpgm`: FPGM (He et al., CVPR 2019), the summed Euclidean distance of each filter to the
  other filters of its layer; filters near the geometric median are redundant.
- :func:`random_scores`: a seeded random order, the floor any criterion must beat.
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


def _check_weight(weight: torch.Tensor, name: str) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() < 1:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight)
        raise ValueError(
            f"{name}: weight must be a Tensor[C, ...] (C output channels first), got {shape}"
        )
    if weight.numel() == 0:
        raise ValueError(f"{name}: weight is empty (shape {tuple(weight.shape)})")
    if not weight.is_floating_point():
        raise TypeError(f"{name}: weight must be floating point, got {weight.dtype}")
    if not torch.isfinite(weight).all():
        raise ValueError(f"{name}: weight contains NaN or Inf; check the model")


def l1_norm(weight: torch.Tensor) -> torch.Tensor:
    """L1 norm of each filter.

    Args:
        weight: Tensor[C, ...] float, a layer's weight with the C output channels first (conv
            ``(C, C_in/groups, *kernel)``, linear ``(C, C_in)``).

    Returns:
        Tensor[C] float64, ``sum |weight[c]|`` in weight units; higher = keep.
    """
    _check_weight(weight, "l1_norm")
    return weight.detach().double().reshape(weight.shape[0], -1).abs().sum(1)


def bn_scale(gamma: torch.Tensor) -> torch.Tensor:
    """BatchNorm scale criterion.

    Args:
        gamma: Tensor[C] float, the ``weight`` of the BatchNorm that normalises the layer's C
            output channels.

    Returns:
        Tensor[C] float64, ``|gamma|`` (dimensionless); higher = keep.
    """
    _check_weight(gamma, "bn_scale")
    if gamma.dim() != 1:
        raise ValueError(f"bn_scale: gamma must be a Tensor[C], got shape {tuple(gamma.shape)}")
    return gamma.detach().double().abs()


def fpgm(weight: torch.Tensor) -> torch.Tensor:
    """FPGM score: summed Euclidean distance of each filter to the other filters of the layer.

    A filter close to the others (near their geometric median) is replaceable by them and is
    pruned first. Up to the factor ``C - 1`` this is icprune's ``independence="distance"`` on
    weights; it is computed here directly with ``torch.cdist`` in float64.

    Args:
        weight: Tensor[C, ...] float, a layer's weight with the C output channels first.

    Returns:
        Tensor[C] float64, ``sum_j ||w_c - w_j||_2`` in weight units; higher = keep.
    """
    _check_weight(weight, "fpgm")
    flat = weight.detach().double().reshape(weight.shape[0], -1)
    return torch.cdist(flat, flat).sum(1)


def random_scores(num_channels: int, seed: int = 0) -> torch.Tensor:
    """Random scores: a seeded random order of the channels.

    Args:
        num_channels: C (>= 1).
        seed: seed of the order; the same seed gives the same scores.

    Returns:
        Tensor[C] float64, a random permutation of ``0 .. C-1``; higher = keep.
    """
    if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
        raise ValueError(f"random_scores: num_channels must be an int >= 1, got {num_channels!r}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_channels, generator=generator).double()
