import json
import math
from dataclasses import replace

import pytest
import torch
from PIL import Image
from torch import nn

import icprune
from icprune import LayerScores, ModelSummary, write_report
from icprune.report import PLOTS

FILES = {"report.json", "report.md", *PLOTS}


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


@pytest.fixture(scope="module")
def run():
    """A weights-scored plan of a 3-conv CNN in which the first conv ("0") is ignored."""
    model = small_cnn()
    example = torch.randn(1, 3, 16, 16)
    scores = icprune.score(model, source="weights", progress=False)
    plan = icprune.plan(model, scores, example_inputs=example, ratio=0.4, ignored_layers=["0"])
    before = ModelSummary(plan.macs[0], plan.params[0], accuracy=0.9, latency_s=2e-3)
    after = ModelSummary(plan.macs[1], plan.params[1], accuracy=0.85, latency_s=1.5e-3)
    return plan, scores, before, after


def write(out, run, **kwargs):
    plan, scores, before, after = run
    options = {
        "plan": plan,
        "scores": scores,
        "before": before,
        "after": after,
        "settings": {"model": "small_cnn", "flops_reduction": 0.4, "ignore": ["0"]},
        "timings": {"score": 0.5, "plan": 0.25},
        **kwargs,
    }
    return write_report(out, **options)


def test_report_writes_exactly_its_files_and_a_json_that_round_trips(tmp_path, run):
    report = write(tmp_path, run, title="small CNN")
    assert {p.name for p in tmp_path.iterdir()} == FILES
    assert json.loads((tmp_path / "report.json").read_text()) == report
    plan = run[0]
    assert report["title"] == "small CNN"
    assert report["versions"] == {"icprune": icprune.__version__, "torch": torch.__version__}
    assert report["settings"]["ignore"] == ["0"]
    assert report["before"] == run[2].to_dict()
    assert report["plan"]["macs"] == list(plan.macs)
    assert report["plan"]["flops_reduction"] == pytest.approx(plan.flops_reduction)
    assert report["plan"]["params_reduction"] == pytest.approx(plan.params_reduction)
    assert report["change"]["macs_ratio"] == pytest.approx(plan.macs[1] / plan.macs[0])
    assert report["change"]["speedup"] == pytest.approx(2e-3 / 1.5e-3)
    assert report["change"]["accuracy_change"] == pytest.approx(-0.05)
    assert report["timings"] == {"score": 0.5, "plan": 0.25}
    assert report["plots"] == list(PLOTS)


def test_layer_rows_follow_the_plan_and_the_scores(tmp_path, run):
    plan, scores = run[0], run[1]
    rows = {row["layer"]: row for row in write(tmp_path, run)["layers"]}
    assert list(rows) == list(scores)
    keep = plan.keep
    for name, row in rows.items():
        s = scores[name]
        assert row["channels"] == s.score.numel()
        assert row["capacity_mean"] == pytest.approx(float(s.capacity.mean()))
        assert row["independence_mean"] == pytest.approx(float(s.independence.mean()))
        assert row["score_mean"] == pytest.approx(float(s.score.mean()), abs=1e-12)
        if name in keep:
            assert row["kept_indices"] == keep[name].tolist()
    # "0" was ignored by the plan: it keeps all its channels.
    assert row_is_whole(rows["0"]) and rows["0"]["score_mean_pruned"] is None
    assert any(row["pruned_share"] > 0 for row in rows.values())
    pruned = next(row for row in rows.values() if row["pruned_share"] > 0)
    assert pruned["kept"] == len(pruned["kept_indices"])
    assert pruned["score_mean_kept"] > pruned["score_mean_pruned"]


def row_is_whole(row):
    return row["kept"] == row["channels"] and row["kept_indices"] == list(range(row["channels"]))


def test_a_planned_layer_without_scores_is_listed_with_its_channels(tmp_path, run):
    plan, scores = run[0], run[1]
    partial = {k: v for k, v in scores.items() if k != "3"}
    rows = {row["layer"]: row for row in write(tmp_path, run, scores=partial)["layers"]}
    assert list(rows)[-1] == "3"
    assert rows["3"]["kept_indices"] == plan.keep["3"].tolist()
    assert rows["3"]["capacity_mean"] is None and rows["3"]["score_mean"] is None
    assert "| `3` | 16 |" in (tmp_path / "report.md").read_text()


def test_markdown_shows_the_before_after_table_layers_and_plots(tmp_path, run):
    write(tmp_path, run, title="small CNN")
    md = (tmp_path / "report.md").read_text()
    plan = run[0]
    assert md.startswith("# small CNN\n")
    assert "| | before | after | after / before |" in md
    assert "| top-1 accuracy | 90.00 % | 85.00 % | -5.00 pp |" in md
    assert f"| MACs | {plan.macs[0] / 1e3:.3g} k |" in md
    assert "| latency | 2 ms | 1.5 ms | 0.750 (1.33x faster) |" in md
    assert "| flops_reduction | 0.4 |" in md and '| ignore | ["0"] |' in md
    assert "| score | 0.500 |" in md
    assert "| `0` | 8 | 8 | 0.0 % |" in md
    for name, caption in PLOTS.items():
        assert f"![{caption}]({name})" in md
    assert "-0.000" not in md


def test_a_slowdown_reads_slower_not_faster(tmp_path, run):
    plan = run[0]
    before = ModelSummary(plan.macs[0], plan.params[0], latency_s=1.0e-3)
    after = ModelSummary(plan.macs[1], plan.params[1], latency_s=1.12e-3)
    report = write(tmp_path, run, before=before, after=after)
    md = (tmp_path / "report.md").read_text()
    assert "| latency | 1 ms | 1.12 ms | 1.120 (1.12x slower) |" in md and "faster" not in md
    assert "(1.12x slower)" in icprune.report.comparison_table(report)
    same = write(tmp_path, run, before=before, after=replace(after, latency_s=1.001e-3))
    assert "(same speed)" in icprune.report.comparison_table(same)


def test_layer_rows_compare_kept_and_pruned_channels(tmp_path, run):
    scores = run[1]
    rows = {row["layer"]: row for row in write(tmp_path, run)["layers"]}
    for name, row in rows.items():
        s, mask = scores[name], torch.zeros(row["channels"], dtype=torch.bool)
        mask[row["kept_indices"]] = True
        for part in ("capacity", "independence"):
            values = getattr(s, part)
            assert row[f"{part}_mean_kept"] == pytest.approx(float(values[mask].mean()))
            if row["kept"] < row["channels"]:
                assert row[f"{part}_mean_pruned"] == pytest.approx(float(values[~mask].mean()))
            else:
                assert row[f"{part}_mean_pruned"] is None and row["score_margin"] is None
        if row["kept"] < row["channels"]:
            margin = float(s.score[mask].min() - s.score[~mask].max())
            assert row["score_margin"] == pytest.approx(margin)
    md = (tmp_path / "report.md").read_text()
    assert "mean score" not in md  # always 0 under z-score normalisation: not shown
    assert "| capacity kept | capacity pruned |" in md and "| margin |" in md
    pruned = next(r for r in rows.values() if r["pruned_share"] > 0)
    assert f"| {pruned['score_margin']:.3f} |" in md


def test_report_files_are_written_atomically(tmp_path, run, monkeypatch):
    write(tmp_path, run)
    before = {name: (tmp_path / name).read_bytes() for name in FILES}
    from icprune.report import plots

    def full(path, *args, **kwargs):
        with open(path, "wb") as half:
            half.write(b"\x89PNG half")  # the disk fills up mid-file
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plots, "score_distributions", full)
    with pytest.raises(OSError, match="No space"):
        write(tmp_path, run, title="another run")
    assert {p.name for p in tmp_path.iterdir()} == FILES  # no temporary file is left
    assert (tmp_path / "score_distributions.png").read_bytes() == before["score_distributions.png"]


def test_unknown_accuracy_and_latency_read_na(tmp_path, run):
    plan = run[0]
    bare = ModelSummary(plan.macs[0], plan.params[0])
    report = write(tmp_path, run, before=bare, after=replace(bare, macs=plan.macs[1]), timings=None)
    assert report["change"]["speedup"] is None and report["change"]["accuracy_change"] is None
    assert report["timings"] == {}
    md = (tmp_path / "report.md").read_text()
    assert "| top-1 accuracy | n/a | n/a | n/a |" in md and "## Timings" not in md


def test_plots_are_valid_png_images(tmp_path, run):
    write(tmp_path, run)
    for name in PLOTS:
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG"
            width, height = image.size
            image.verify()
        assert 300 <= width <= 3000 and 250 <= height <= 6000, (name, image.size)


def test_same_inputs_give_byte_identical_files(tmp_path, run):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    write(first, run)
    write(second, run)
    for name in FILES:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_model_summary_validates_and_converts():
    assert ModelSummary(10, 2, 0.5).to_dict() == {
        "macs": 10,
        "params": 2,
        "accuracy": 0.5,
        "latency_s": None,
    }
    for kwargs, match in [
        ({"macs": -1, "params": 1}, "macs"),
        ({"macs": 1.5, "params": 1}, "macs"),
        ({"macs": 1, "params": True}, "params"),
        ({"macs": 1, "params": 1, "accuracy": 1.5}, "accuracy"),
        ({"macs": 1, "params": 1, "accuracy": math.nan}, "accuracy"),
        ({"macs": 1, "params": 1, "latency_s": 0.0}, "latency_s"),
    ]:
        with pytest.raises(ValueError, match=match):
            ModelSummary(**kwargs)


def test_bad_arguments_are_rejected(tmp_path, run):
    plan, scores = run[0], run[1]
    with pytest.raises(FileNotFoundError, match="not an existing directory"):
        write(tmp_path / "missing", run)
    with pytest.raises(TypeError, match="PruningPlan"):
        write(tmp_path, run, plan=plan.to_json())
    with pytest.raises(TypeError, match="ModelSummary"):
        write(tmp_path, run, before={"macs": 1, "params": 1})
    with pytest.raises(ValueError, match="one non-empty line"):
        write(tmp_path, run, title="two\nlines")
    with pytest.raises(TypeError, match="JSON values"):
        write(tmp_path, run, settings={"lam": torch.tensor(1.0)})
    with pytest.raises(TypeError, match="JSON values"):
        write(tmp_path, run, settings={"lam": math.nan})
    with pytest.raises(ValueError, match="timings"):
        write(tmp_path, run, timings={"score": -1.0})
    with pytest.raises(ValueError, match="scores is empty"):
        write(tmp_path, run, scores={})
    with pytest.raises(TypeError, match="LayerScores"):
        write(tmp_path, run, scores={"3": scores["3"].score})
    short = LayerScores(
        *(t[:4] for t in (scores["3"].capacity, scores["3"].independence, scores["3"].score))
    )
    with pytest.raises(
        ValueError, match=r"scores\['3'\] has 4 channels but the plan's layer has 16"
    ):
        write(tmp_path, run, scores={**scores, "3": short})
    nan = replace(scores["3"], independence=torch.full((16,), math.nan, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"scores\['3'\] holds NaN"):
        write(tmp_path, run, scores={**scores, "3": nan})
    ragged = replace(scores["3"], capacity=scores["3"].capacity[:3])
    with pytest.raises(ValueError, match="all must be Tensor"):
        write(tmp_path, run, scores={**scores, "3": ragged})
    assert not list(tmp_path.iterdir())  # nothing written by a rejected call
