import pytest
import torch

from icprune.baselines import bn_scale, chip, fpgm, hrank, l1_norm, random_scores


def low_rank_maps(generator):
    """Tensor[2, 3, 6, 6]: channel c has rank c + 1 in every sample."""
    maps = torch.zeros(2, 3, 6, 6)
    for c in range(3):
        u = torch.randn(2, 6, c + 1, generator=generator)
        v = torch.randn(2, c + 1, 6, generator=generator)
        maps[:, c] = u @ v
    return maps


def test_hrank_is_the_mean_rank_of_each_map():
    maps = low_rank_maps(torch.Generator().manual_seed(0))
    assert hrank(maps).tolist() == [1.0, 2.0, 3.0]
    assert hrank(maps).dtype == torch.float64


def test_chip_matches_a_loop_over_samples_and_channels():
    generator = torch.Generator().manual_seed(1)
    maps = torch.randn(3, 4, 5, 5, generator=generator)
    expected = torch.zeros(4, dtype=torch.float64)
    for n in range(3):
        f = maps[n].reshape(4, -1)
        full = torch.linalg.matrix_norm(f, ord="nuc")
        for c in range(4):
            g = f.clone()
            g[c] = 0
            expected[c] += (full - torch.linalg.matrix_norm(g, ord="nuc")).item() / 3
    for chunk in (1, 2, 8):
        torch.testing.assert_close(
            chip(maps, samples_per_chunk=chunk), expected, rtol=1e-5, atol=1e-5
        )


def test_chip_ranks_a_duplicated_channel_below_an_independent_one():
    generator = torch.Generator().manual_seed(2)
    maps = torch.randn(4, 3, 4, 4, generator=generator)
    maps[:, 1] = maps[:, 0]  # channel 1 duplicates channel 0; channel 2 is independent
    scores = chip(maps)
    assert scores[2] > scores[0] and scores[2] > scores[1]


@pytest.mark.parametrize("scorer", [hrank, chip])
def test_bad_feature_maps_are_refused(scorer):
    with pytest.raises(ValueError, match="Tensor\\[N, C, H, W\\]"):
        scorer(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="empty"):
        scorer(torch.zeros(0, 2, 3, 3))
    with pytest.raises(TypeError, match="floating point"):
        scorer(torch.zeros(1, 2, 3, 3, dtype=torch.int64))
    bad = torch.zeros(1, 2, 3, 3)
    bad[0, 1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        scorer(bad)


def test_chip_chunk_size_is_checked():
    with pytest.raises(ValueError, match="samples_per_chunk"):
        chip(torch.zeros(1, 2, 3, 3), samples_per_chunk=0)
    with pytest.raises(TypeError, match="samples_per_chunk"):
        chip(torch.zeros(1, 2, 3, 3), samples_per_chunk=True)


def test_l1_norm_orders_filters_by_magnitude():
    weight = torch.ones(3, 2, 3, 3) * torch.tensor([3.0, -1.0, 2.0]).view(3, 1, 1, 1)
    scores = l1_norm(weight)
    assert scores.dtype == torch.float64
    assert scores.tolist() == [54.0, 18.0, 36.0]
    assert scores.argsort().tolist() == [1, 2, 0]


def test_bn_scale_is_the_absolute_gamma():
    assert bn_scale(torch.tensor([-3.0, 1.0, 0.5])).tolist() == [3.0, 1.0, 0.5]
    with pytest.raises(ValueError, match="Tensor\\[C\\]"):
        bn_scale(torch.ones(2, 2))


def test_fpgm_prunes_the_filter_nearest_the_others_first():
    # Three filters on a line at 0, 1 and 10: the one at 1 is nearest the geometric median.
    weight = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]]).view(3, 2, 1, 1)
    scores = fpgm(weight)
    torch.testing.assert_close(scores, torch.tensor([11.0, 10.0, 19.0], dtype=torch.float64))
    assert scores.argsort().tolist() == [1, 0, 2]


def test_random_scores_are_a_seeded_permutation():
    a = random_scores(10, seed=3)
    assert sorted(a.tolist()) == list(range(10)) and a.dtype == torch.float64
    assert torch.equal(a, random_scores(10, seed=3))
    assert not torch.equal(a, random_scores(10, seed=4))
    with pytest.raises(ValueError, match="num_channels"):
        random_scores(0)


@pytest.mark.parametrize("scorer", [l1_norm, bn_scale, fpgm])
def test_bad_weights_are_refused(scorer):
    with pytest.raises(ValueError, match="empty"):
        scorer(torch.zeros(0))
    with pytest.raises(TypeError, match="floating point"):
        scorer(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="NaN or Inf"):
        scorer(torch.tensor([1.0, float("inf")]))
