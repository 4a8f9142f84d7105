import json

import pytest

import icprune
from icprune.cli.demo import DemoConfig, Shuffled, run_demo
from icprune.cli.exit_codes import CommandError
from icprune.models import resnet20

QUICK = DemoConfig(
    max_train=512,
    train_epochs=3,
    batch=64,
    finetune_epochs=1,
    calib_images=128,
    latency_batch=16,
    latency_rounds=2,
)


def test_demo_prints_before_and_after_and_writes_its_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert run_demo(out, progress=False, config=QUICK) == 0
    printed = capsys.readouterr().out
    for word in ("accuracy", "MACs", "parameters", "latency"):
        assert word in printed
    report = json.loads((out / "report.json").read_text())
    assert 0.45 <= report["plan"]["flops_reduction"] <= 0.55
    assert report["after"]["macs"] < report["before"]["macs"]
    assert report["before"]["accuracy"] > 0.3  # 3 epochs on 512 digits: far above chance
    assert report["after"]["latency_s"] > 0
    for name in (
        "report.md",
        "channels_kept.png",
        "score_distributions.png",
        "plan.json",
        "scores.json",
    ):
        assert (out / name).is_file()
    assert not (out / "capacity_vs_independence.png").exists()  # icii's plot; the default is greedy
    pruned = icprune.load(out / "model.pt", lambda: resnet20(in_channels=1))
    assert (
        icprune.count(pruned, __import__("torch").zeros(1, 1, 16, 16))[0]
        == (report["after"]["macs"])
    )
    with pytest.raises(CommandError, match="already exists"):
        run_demo(out, progress=False, config=QUICK)


def test_shuffled_batches_cover_the_data_in_a_new_order_each_pass():
    import torch

    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    batches = Shuffled(x, y, batch=4, seed=0)
    assert len(batches) == 3
    first = torch.cat([b[1] for b in batches])
    second = torch.cat([b[1] for b in batches])
    assert sorted(first.tolist()) == list(range(10)) == sorted(second.tolist())
    assert not torch.equal(first, second)


def test_a_failed_demo_leaves_no_folder_behind(tmp_path, monkeypatch):
    import icprune.cli.demo

    def interrupted(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(icprune.cli.demo, "digits", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_demo(tmp_path / "demo", progress=False, config=QUICK)
    assert list(tmp_path.iterdir()) == []  # rerunning `icprune demo` just works
