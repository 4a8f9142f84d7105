import pytest
import torch
from torch import nn

import icprune
from bench.quality import criteria, models, pipeline, results
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
    res = main(["--quick", "--no-cache", "--out", str(tmp_path), "--no-progress", "--rows",
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


def test_bench_and_package_agree_on_the_defaults_and_the_repair():
    from bench.quality import defaults
    from icprune.config import ScoringConfig
    from icprune.scoring import resolved_criterion

    torch.manual_seed(0)
    model = models.build("resnet").eval()
    ex = models.example_input()
    calib = [torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(i)) for i in (1, 2)]
    ctx = criteria.Context(model, icprune.dependency_groups(model, ex), calib, seed=0)
    assert resolved_criterion(ScoringConfig(), calib, None) == defaults.DATA_DEFAULT
    assert resolved_criterion(ScoringConfig(), None, None) == defaults.DATA_FREE_DEFAULT
    package = {
        "greedy": icprune.score(model, calib, backend="torch", progress=False),
        "wbn": icprune.score(model, example_inputs=ex),
    }
    for name, scores in package.items():
        bench = criteria.registry()[name][0](ctx)
        assert set(bench) == set(scores)
        assert all(torch.equal(bench[k], scores[k].score) for k in bench)
    plan = pipeline.make_plan(ctx, criteria.registry()["greedy"][0](ctx), 0.5, ex)
    repaired = pipeline.recover(ctx, plan, icprune.apply(model, plan), pipeline.PIPELINES["repair"])
    stats = icprune.calibrate(model, calib, read_at="input", backend="torch", progress=False)
    by_package = icprune.apply(model, plan, stats=stats)
    x = torch.cat(calib)
    with torch.no_grad():
        assert torch.equal(repaired(x), by_package(x))
