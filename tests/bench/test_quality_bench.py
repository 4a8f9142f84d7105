import pytest
import torch
from torch import nn

import icprune
from bench.quality import criteria, models, pipeline, prototypes, results
from bench.quality.diagnosis import group_vector, spearman
from bench.quality.run import CHOICE_PIPELINE, QUICK, choose, main, run


@pytest.mark.parametrize("arch", models.ARCHS)
def test_every_net_maps_digits_to_logits_and_every_conv_is_in_a_group(arch):
    torch.manual_seed(0)
    model = models.build(arch).eval()
    assert model(models.example_input(2)).shape == (2, 10)
    groups = icprune.dependency_groups(model, models.example_input())
    grouped = {layer for g in groups for layer in g.layers}
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert convs == grouped  # every conv's channels can be pruned
    assert models.KINDS[arch] in ("plain", "residual", "inverted residual", "concat")


def test_splits_share_no_net_and_cover_every_kind_twice():
    assert not set(models.SELECTION_NETS) & set(models.CONFIRMATION_NETS)
    for nets in (models.SELECTION_NETS, models.CONFIRMATION_NETS):
        assert sorted(models.KINDS[a] for a in nets) == sorted(set(models.KINDS.values()))


def _chain(c_mid=6, k=1, relu=False):
    """conv(3->c_mid) - BN - [ReLU] - conv(c_mid->4, k x k, zero padding) - head."""
    layers = [nn.Conv2d(3, c_mid, 1, bias=False), nn.BatchNorm2d(c_mid)]
    if relu:
        layers.append(nn.ReLU())
    layers += [nn.Conv2d(c_mid, 4, k, padding=k // 2, bias=True), nn.AdaptiveAvgPool2d(1),
               nn.Flatten(1), nn.Linear(4, 2)]  # fmt: skip
    return nn.Sequential(*layers).eval()


def test_input_stats_are_those_of_the_consumer_input():
    torch.manual_seed(0)
    model = _chain(relu=True)
    x = torch.randn(8, 3, 5, 5)
    got = prototypes.input_stats(model, [x[:5], x[5:]], ["3"])
    seen = torch.relu(model[1](model[0](x))).double().permute(1, 0, 2, 3).reshape(6, -1)
    torch.testing.assert_close(got.stats["3"].gram, seen @ seen.T)
    assert got.spatial["3"] == (5, 5)
    assert got.follower == {"0": "1"}


def _plan_dropping(model, layer, channel, example):
    c = dict(model.named_modules())[layer].out_channels
    scores = {layer: torch.arange(c, 0, -1, dtype=torch.float64)}
    scores[layer][channel] = -1.0
    return icprune.plan(model, scores, example_inputs=example, ratio=1 / c, global_ranking=False)


def test_least_squares_repair_is_exact_for_a_1x1_consumer_of_a_redundant_channel():
    torch.manual_seed(0)
    model = _chain()
    with torch.no_grad():  # channel 5 = channel 0 + 2 * channel 1 (BN is affine per channel)
        bn = model[1]
        bn.running_mean.zero_(), bn.running_var.fill_(1.0 - bn.eps)
        bn.weight.fill_(1.0), bn.bias.zero_()
        model[0].weight[5] = model[0].weight[0] + 2 * model[0].weight[1]
    x = torch.randn(64, 3, 5, 5)
    stats = prototypes.input_stats(model, [x], ["2"])
    plan = _plan_dropping(model, "0", 5, x[:1])
    pruned = prototypes.pruned_copy(model, plan)
    assert pruned[2].in_channels == 5
    assert not torch.allclose(pruned(x), model(x), atol=1e-3)
    prototypes.repair(model, pruned, plan, stats, ridge=1e-12)
    torch.testing.assert_close(pruned(x), model(x), atol=1e-4, rtol=1e-4)


def test_bias_compensation_keeps_the_mean_output_under_zero_padding():
    torch.manual_seed(0)
    model = _chain(k=3, relu=True)
    x = torch.randn(256, 3, 1, 1).expand(-1, -1, 5, 5).contiguous()  # constant maps
    stats = prototypes.input_stats(model, [x], ["3"])
    plan = _plan_dropping(model, "0", 2, x[:1])
    pruned = prototypes.pruned_copy(model, plan)
    prototypes.repair(model, pruned, plan, stats, lstsq=False)
    with torch.no_grad():
        before = model[3](model[2](model[1](model[0](x)))).mean((0, 2, 3))
        after = pruned[3](pruned[2](pruned[1](pruned[0](x)))).mean((0, 2, 3))
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_wcondvar_is_the_output_error_left_after_least_squares_compensation():
    torch.manual_seed(0)
    model = _chain()
    x = torch.randn(200, 3, 5, 5)
    groups = icprune.dependency_groups(model, x[:1])
    inputs = prototypes.input_stats(model, [x], prototypes.consumers_of(groups))
    score = prototypes.group_scores(model, groups, "wcondvar", inputs, ridge=1e-12)["0"]
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


def test_greedy_removes_first_the_channel_whose_loss_is_smallest():
    torch.manual_seed(1)
    cov = torch.randn(5, 40, dtype=torch.float64)
    cov = cov @ cov.T / 40
    v = torch.randn(5, 3, dtype=torch.float64)
    order = prototypes.greedy_order([(cov, cov @ v, torch.arange(5))])
    assert sorted(order.tolist()) == [0, 1, 2, 3, 4]

    def explained(keep):
        a, b = cov[keep][:, keep], (cov @ v)[keep]
        return torch.trace(b.T @ torch.linalg.solve(a, b)).item()

    full = explained(list(range(5)))
    losses = [full - explained([j for j in range(5) if j != c]) for c in range(5)]
    assert order.argmin().item() == min(range(5), key=losses.__getitem__)
    second = int((order == 1).nonzero())
    first = int(order.argmin())
    rest = [c for c in range(5) if c != first]
    base = explained(rest)
    step2 = {c: base - explained([j for j in rest if j != c]) for c in rest}
    assert second == min(step2, key=step2.get)


def test_same_counts_for_every_criterion():
    torch.manual_seed(0)
    model = models.build("resnet").eval()
    ex = models.example_input()
    ctx = criteria.Context(model, icprune.dependency_groups(model, ex), [torch.randn(16, 1, 16,
                           16)], seed=0)  # fmt: skip
    counts = []
    for name in ("L1", "random", "wcondvar", "wbn"):
        plan = pipeline.make_plan(ctx, criteria.registry()[name][0](ctx), 0.5, ex)
        assert plan.flops_reduction >= 0.5
        counts.append([len(k) for k in plan.kept])
    assert all(c == counts[0] for c in counts)


def test_group_vector_and_spearman():
    g = icprune.Group(3, (icprune.Dependency("a", "output"), icprune.Dependency("b", "output")))
    v = group_vector(g, {"a": torch.tensor([0.0, 1.0, 2.0]), "b": torch.tensor([4.0, 2.0, 0.0])})
    torch.testing.assert_close(v, torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64))
    up = torch.tensor([1.0, 2.0, 3.0])
    assert spearman(up, 10 * up) == pytest.approx(1.0)
    assert spearman(up, up.flip(0)) == pytest.approx(-1.0)


def test_choose_takes_the_best_candidate_of_the_selection_split_only():
    res = results.Results()
    for name, sel, conf in (("wcondvar", 0.8, 0.1), ("greedy", 0.7, 0.9), ("wbn", 0.6, 0.9)):
        pipe = CHOICE_PIPELINE["data-free" if name == "wbn" else "data"]
        for split, acc in (("selection", sel), ("confirmation", conf)):
            res.rows.append(results.Row(split, "vgg", "plain", 0, name, 0.5, pipe, acc, 0.5))
    assert choose(res) == {"data": "wcondvar", "data-free": "wbn"}


def test_quick_mode_runs_end_to_end(tmp_path):
    threads = torch.get_num_threads()
    res = main(["--quick", "--out", str(tmp_path), "--no-progress", "--rows",
                str(tmp_path / "rows.json")])  # fmt: skip
    assert torch.get_num_threads() == threads
    text = (tmp_path / "quality.md").read_text()
    assert "## Verdict (confirmation split)" in text and "| L1 |" in text
    assert "## Diagnosis" in text
    assert (tmp_path / "quality.png").stat().st_size > 10_000
    assert {r.split for r in res.rows} == {"selection", "confirmation"}
    assert set(res.chosen) == {"data", "data-free"}
    confirmed = {r.criterion for r in res.rows if r.split == "confirmation"}
    assert set(res.chosen.values()) <= confirmed
    assert all(r.reduction >= r.target for r in res.rows)
    again = results.Results.load(tmp_path / "rows.json")
    assert again.rows == res.rows
    # --reuse takes the selection rows and diagnosis as they are and measures the confirmation
    reused = run(QUICK, reuse=again, progress=False)
    assert [r for r in reused.rows if r.split == "selection"] == [
        r for r in res.rows if r.split == "selection"
    ]
    assert reused.chosen == res.chosen and reused.diagnosis == res.diagnosis
    assert {r.split for r in reused.rows} == {"selection", "confirmation"}
    # the hand-written section survives a rerun
    marked = text.replace("<!-- hand-written: end -->", "kept words\n<!-- hand-written: end -->")
    (tmp_path / "quality.md").write_text(marked)
    from bench.quality import report

    report.write(res, tmp_path, tmp_path / "t.md", "cmd")
    assert "kept words" in (tmp_path / "quality.md").read_text()
