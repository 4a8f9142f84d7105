"""Consumer-side criteria (icprune.criteria): formulas against direct computations."""

import pytest
import torch
from torch import nn

from icprune import models
from icprune.calibrate import calibrate_inputs
from icprune.criteria import CRITERIA, greedy_order, group_scores
from icprune.structure import dependency_groups
from tests.structure.nets import ConvNeXtNet, ResNeXtNet
from tests.test_calibrate_inputs import chain


def test_wcondvar_is_the_output_error_left_after_least_squares_compensation():
    torch.manual_seed(0)
    model = chain()
    x = torch.randn(200, 3, 5, 5)
    groups = dependency_groups(model, x[:1])
    stats = calibrate_inputs(model, [x], backend="torch", progress=False)
    score = group_scores(model, groups, "wcondvar", stats, ridge=1e-12)["0"]
    with torch.no_grad():
        a = model[1](model[0](x)).double().permute(0, 2, 3, 1).reshape(-1, 6)
    a = a - a.mean(0)
    w = model[2].weight.detach().double()[:, :, 0, 0]
    for c in range(6):
        rest = [j for j in range(6) if j != c]
        coef = torch.linalg.lstsq(a[:, rest], a[:, c : c + 1]).solution
        resid = a[:, c : c + 1] - a[:, rest] @ coef
        expected = (resid.pow(2).mean() * w[:, c].pow(2).sum()).item()
        assert score[c].item() == pytest.approx(expected, rel=1e-6)


def _explained(cov, v, keep):
    a, b = cov[keep][:, keep], (cov @ v)[keep]
    return torch.trace(b.T @ torch.linalg.solve(a, b)).item()


@pytest.mark.parametrize("seed", range(4))
def test_greedy_steps_equal_brute_force(seed):
    torch.manual_seed(seed)
    cov = torch.randn(6, 40, dtype=torch.float64)
    cov = cov @ cov.T / 40
    v = torch.randn(6, 3, dtype=torch.float64)
    order = greedy_order([(cov, cov @ v, torch.arange(6))])
    assert sorted(order.tolist()) == list(range(6))
    alive = list(range(6))
    for step in range(5):  # each step removes the channel whose removal loses the least
        base = _explained(cov, v, alive)
        loss = {c: base - _explained(cov, v, [j for j in alive if j != c]) for c in alive}
        chosen = int((order == step).nonzero())
        assert loss[chosen] == pytest.approx(min(loss.values()), rel=1e-9, abs=1e-12)
        alive.remove(chosen)


def _reference_order(parts):
    """Backward elimination by explicit solves on the kept set (no downdates): the definition.

    Every part reads the group's channels at the same inputs ``idx``; its other inputs stay.
    """
    idx = parts[0][2].tolist()
    c = len(idx)

    def explained(alive):
        total = 0.0
        for a, b, _ in parts:
            rows = [i for i in range(a.shape[0]) if i not in idx] + [idx[j] for j in alive]
            aa, bb = a[rows][:, rows], b[rows]
            total += torch.trace(bb.T @ torch.linalg.solve(aa, bb)).item()
        return total

    alive, order = list(range(c)), torch.zeros(c, dtype=torch.float64)
    for step in range(c):
        base = explained(alive)
        _, ch = min((base - explained([j for j in alive if j != ch]), ch) for ch in alive)
        order[ch] = step
        alive.remove(ch)
    return order


@pytest.mark.parametrize("block", [1, 3, 64])
def test_deferred_downdates_give_the_order_of_explicit_solves_for_any_block(block):
    torch.manual_seed(5)
    parts = []
    for rows, r in ((11, 4), (11, 7)):  # two consumers; 2 extra inputs outside the group
        x = torch.randn(rows, 60, dtype=torch.float64)
        cov = x @ x.T / 60 + 1e-2 * torch.eye(rows, dtype=torch.float64)
        parts.append((cov, cov @ torch.randn(rows, r, dtype=torch.float64), torch.arange(9) + 1))
    expected = _reference_order(parts)
    assert torch.equal(greedy_order(parts, block=block), expected)


def _reference_tiled_order(a, b, idx):
    """The tiled definition by explicit solves: channel c's loss is the sum over its tiles g of
    the energy lost by removing its input ``idx[c, g]`` alone; the chosen channel then loses
    every tile's input at once."""
    c, inputs = idx.shape[0], a.shape[0]

    def explained(rows):
        aa, bb = a[rows][:, rows], b[rows]
        return torch.trace(bb.T @ torch.linalg.solve(aa, bb)).item()

    kept, alive, order = list(range(inputs)), list(range(c)), torch.zeros(c, dtype=torch.float64)
    for step in range(c):
        base = explained(kept)
        loss = {
            ch: sum(base - explained([r for r in kept if r != int(row)]) for row in idx[ch])
            for ch in alive
        }
        _, ch = min((value, ch) for ch, value in loss.items())
        order[ch] = step
        alive.remove(ch)
        kept = [r for r in kept if r not in idx[ch].tolist()]
    return order


@pytest.mark.parametrize("block", [1, 2, 64])
def test_a_tiled_consumer_loses_a_channel_in_every_tile_at_once(block):
    """A grouped conv's groups pruned consistently: one consumer reads the group's 4 channels in
    3 tiles (inputs 4g + c) besides 1 input outside the group."""
    torch.manual_seed(7)
    x = torch.randn(13, 80, dtype=torch.float64)
    a = x @ x.T / 80 + 1e-2 * torch.eye(13, dtype=torch.float64)
    b = a @ torch.randn(13, 5, dtype=torch.float64)
    idx = torch.arange(4)[:, None] + torch.tensor([1, 5, 9])[None, :]
    expected = _reference_tiled_order(a, b, idx)
    assert torch.equal(greedy_order([(a, b, idx)], block=block), expected)


def test_greedy_reads_a_grouped_convs_consumer_once_with_all_its_tiles(monkeypatch):
    """ResNeXtNet's grouped conv output (4 groups of 8, SE-gated in block 2) is one group of 8
    channels in 4 tiles: each consumer enters greedy_order once, with LongTensor[8, 4] inputs,
    and the scores are those of the tiled definition."""
    from icprune import criteria

    torch.manual_seed(0)
    model = ResNeXtNet().eval()
    x = torch.randn(64, 3, 8, 8)
    groups = dependency_groups(model, x[:1])
    stats = calibrate_inputs(model, [x], backend="torch", progress=False)
    seen = []

    def spy(parts, **kw):
        parts = list(parts)
        seen.append([tuple(idx.shape) for _, _, idx in parts])
        return _reference_tiled_order(*parts[0]) if len(parts) == 1 else order(parts, **kw)

    order = criteria.greedy_order
    monkeypatch.setattr(criteria, "greedy_order", spy)
    scores = group_scores(model, groups, "greedy", stats)
    assert [(8, 4)] in seen  # block 1: conv1c alone reads the grouped conv's 4 tiles
    assert [(8, 4), (8, 4)] in seen  # block 2: se2's first conv and conv2c
    monkeypatch.setattr(criteria, "greedy_order", order)
    assert torch.equal(group_scores(model, groups, "greedy", stats)["conv1b"], scores["conv1b"])


def test_greedy_ties_go_to_the_lower_channel_index():
    eye = torch.eye(4, dtype=torch.float64)
    order = greedy_order([(eye, eye, torch.arange(4))])
    assert order.tolist() == [0.0, 1.0, 2.0, 3.0]


def test_wbn_is_consumer_energy_times_the_batchnorm_second_moment():
    torch.manual_seed(0)
    model = chain()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2.0), model[1].bias.uniform_(-1.0, 1.0)
    groups = dependency_groups(model, torch.zeros(1, 3, 5, 5))
    score = group_scores(model, groups, "wbn")["0"]
    bn = model[1]
    moment = bn.weight.detach().double() ** 2 + bn.bias.detach().double() ** 2
    energy = model[2].weight.detach().double().pow(2).sum((0, 2, 3))  # no BatchNorm after it
    torch.testing.assert_close(score, moment * energy)


def test_wbn_takes_a_layernorm_like_a_batchnorm_and_passes_layer_scale():
    torch.manual_seed(0)
    model = ConvNeXtNet().eval()
    groups = dependency_groups(model, torch.zeros(1, 3, 16, 16))
    stream = next(g for g in groups if "block1.layer_scale" in {d.module for d in g.dependencies})
    before = group_scores(model, [stream], "wbn")["stem"]
    with torch.no_grad():  # channel 3's LayerNorm gain feeds block1.fc1: only its score grows
        model.block1.norm.weight[3] *= 2.0
    after = group_scores(model, [stream], "wbn")["stem"]
    assert after[3] > before[3]
    others = [c for c in range(8) if c != 3]
    torch.testing.assert_close(after[others], before[others])


@pytest.mark.parametrize("criterion", CRITERIA)
def test_every_criterion_scores_every_group_of_a_resnet(criterion):
    torch.manual_seed(0)
    model = models.resnet20().eval()
    x = torch.randn(4, 3, 32, 32)
    groups = dependency_groups(model, x[:1])
    stats = calibrate_inputs(model, [x], progress=False)
    scores = group_scores(model, groups, criterion, stats)
    for group in groups:
        vectors = [scores[layer] for layer in group.layers]
        assert all(torch.equal(v, vectors[0]) for v in vectors)  # one vector per group
        assert vectors[0].shape == (group.channels,) and torch.isfinite(vectors[0]).all()


def test_a_group_read_only_flattened_falls_back_to_wbn():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(1), nn.Linear(4 * 6 * 6, 3)
    ).eval()
    x = torch.randn(3, 1, 8, 8)
    groups = dependency_groups(model, x[:1])
    stats = {}  # the linear layer reads the group flattened: no input statistics exist
    torch.testing.assert_close(
        group_scores(model, groups, "greedy", stats)["0"], group_scores(model, groups, "wbn")["0"]
    )


def test_bad_arguments_are_clear_errors():
    model = chain()
    groups = dependency_groups(model, torch.zeros(1, 3, 5, 5))
    with pytest.raises(ValueError, match="criterion must be one of"):
        group_scores(model, groups, "entropy")
    with pytest.raises(ValueError, match="needs the statistics"):
        group_scores(model, groups, "greedy")
    with pytest.raises(ValueError, match="ridge"):
        group_scores(model, groups, "wbn", ridge=0.0)


@pytest.mark.parametrize("criterion", ["greedy", "wcondvar", "wvar", "wE2"])
def test_heads_are_scored_by_their_share_of_the_output_projection(criterion):
    from icprune.consumers import moments
    from tests.structure.nets import SwinNet, ViTNet

    torch.manual_seed(0)
    for net, side, attention in (
        (ViTNet, 16, "block2.self_attention"),
        (SwinNet, 24, "block2.attn"),
    ):
        model = net().eval()
        data = [torch.randn(3, 3, side, side) for _ in range(2)]
        stats = calibrate_inputs(model, data, progress=False)
        groups = dependency_groups(model, data[0][:1])
        scores = group_scores(model, groups, criterion, stats)
        projection = model.get_submodule(attention).get_submodule(
            "out_proj" if net is ViTNet else "proj"
        )
        _, second, _ = moments(stats[f"{attention}.{'out_proj' if net is ViTNet else 'proj'}"])
        w = projection.weight.detach().double()
        d = w.shape[1] // 4
        want = torch.stack(
            [
                torch.trace(
                    w[:, h * d : (h + 1) * d]
                    @ second[h * d : (h + 1) * d, h * d : (h + 1) * d]
                    @ w[:, h * d : (h + 1) * d].T
                )
                for h in range(4)
            ]
        )
        torch.testing.assert_close(scores[attention], want)
