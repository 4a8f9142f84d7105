"""The ``icprune`` command: help, every error path with its exit code, and complete runs."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

import icprune
from icprune.cli import main
from icprune.cli.exit_codes import ExitCode
from icprune.models import resnet20

FAST = ["--latency-batch", "0", "--quiet"]


def run(capsys, *argv):
    """(exit code, stdout, stderr) of ``icprune argv``; argparse errors exit via SystemExit."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_python_dash_m_prints_help_with_every_command():
    done = subprocess.run(
        [sys.executable, "-m", "icprune", "--help"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0
    assert all(word in done.stdout for word in ("prune", "score", "demo", "exit codes"))


@pytest.mark.parametrize("command", ["prune", "score", "demo"])
def test_every_command_has_help(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0 and "--out" in out and "exit codes" in out


def test_missing_model_exits_3(capsys, tmp_path):
    code, _, err = run(capsys, "score", "resnet51", "--out", tmp_path / "s.json")
    assert code == ExitCode.MODEL and "icprune: error: unknown model 'resnet51'" in err
    assert not (tmp_path / "s.json").exists()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nowhere.models:build", "cannot import module 'nowhere.models'"),
        ("icprune.models:nothing", "has no 'nothing'"),
        ("icprune.models", "unknown model"),
        ("icprune.data:IMAGENET_MEAN", "is not callable"),
    ],
)
def test_bad_factory_path_exits_3(capsys, tmp_path, spec, message):
    code, _, err = run(capsys, "prune", spec, "--ratio", 0.5, "--out", tmp_path / "o")
    assert code == ExitCode.MODEL and message in err
    assert not (tmp_path / "o").exists()


def test_bad_weights_exit_3(capsys, tmp_path):
    code, _, err = run(
        capsys, "score", "resnet20", "--weights", tmp_path / "none.pt", "--out", tmp_path / "s.csv"
    )
    assert code == ExitCode.MODEL and "--weights: no such file" in err


def test_empty_data_folder_exits_4(capsys, tmp_path):
    (tmp_path / "images").mkdir()
    code, _, err = run(
        capsys,
        "prune",
        "resnet20",
        "--data",
        tmp_path / "images",
        "--ratio",
        0.3,
        "--out",
        tmp_path / "o",
    )
    assert code == ExitCode.DATA and "error: --data: no images in" in err
    assert not (tmp_path / "o").exists()


def test_unreadable_image_exits_4_naming_the_file(capsys, tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "cat.png").write_bytes(b"\x89PNG not an image")
    code, _, err = run(
        capsys, "score", "resnet20", "--data", tmp_path / "images", "--out", tmp_path / "s.json"
    )
    assert code == ExitCode.DATA and "cannot read image" in err and "cat.png" in err


@pytest.mark.parametrize(
    "target",
    [
        ["--flops-reduction", "1.5"],
        ["--flops-reduction", "0"],
        ["--ratio", "-0.1"],
        ["--params-reduction", "half"],
    ],
)
def test_target_out_of_range_exits_2(capsys, tmp_path, target):
    code, _, err = run(capsys, "prune", "resnet20", *target, "--out", tmp_path / "o")
    assert code == ExitCode.USAGE and "a number in (0, 1), got" in err


def test_missing_or_double_target_exits_2(capsys, tmp_path):
    code, _, err = run(capsys, "prune", "resnet20", "--out", tmp_path / "o")
    assert code == ExitCode.USAGE and "one of the arguments --flops-reduction" in err
    code, _, err = run(
        capsys, "prune", "resnet20", "--ratio", 0.2, "--flops-reduction", 0.2, "--out", "o"
    )
    assert code == ExitCode.USAGE and "not allowed with argument" in err


def test_existing_out_exits_5_unless_forced(capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    argv = ["prune", "resnet20", "--input-shape", "3,32,32", "--ratio", 0.3, "--out", out, *FAST]
    code, _, err = run(capsys, *argv)
    assert code == ExitCode.OUTPUT and "already exists; pass --force" in err
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    code, _, _ = run(capsys, *argv, "--force")
    assert code == ExitCode.OK and (out / "model.pt").exists()
    assert (out / "mine.txt").read_text() == "keep me"  # --force replaces only icprune's files
    scores = tmp_path / "s.json"
    scores.write_text("{}")
    code, _, err = run(capsys, "score", "resnet20", "--out", scores)
    assert code == ExitCode.OUTPUT and "already exists" in err and scores.read_text() == "{}"


def test_other_argument_errors_exit_2(capsys, tmp_path):
    code, _, err = run(capsys, "score", "resnet20", "--out", tmp_path / "s.txt")
    assert code == ExitCode.USAGE and ".json or .csv" in err
    code, _, err = run(
        capsys, "prune", "resnet20", "--source", "features", "--ratio", 0.2, "--out", tmp_path / "o"
    )
    assert code == ExitCode.USAGE and "--source features needs --data" in err
    code, _, err = run(
        capsys,
        "prune",
        "resnet20",
        "--ratio",
        0.2,
        "--ignore",
        "layer9.conv",
        "--out",
        tmp_path / "o",
    )
    assert code == ExitCode.USAGE and "no layer 'layer9.conv'" in err
    code, _, err = run(
        capsys, "prune", "icprune.models:resnet20", "--ratio", 0.2, "--out", tmp_path / "o"
    )
    assert code == ExitCode.USAGE and "pass --input-shape" in err
    code, _, err = run(
        capsys,
        "prune",
        "resnet20",
        "--ratio",
        0.2,
        "--input-shape",
        "3x32",
        "--out",
        tmp_path / "o",
    )
    assert code == ExitCode.USAGE and "expected C,H,W" in err
    assert not (tmp_path / "o").exists()


def test_finetuning_needs_labels_exits_4(capsys, tmp_path, photo_folder):
    code, _, err = run(
        capsys,
        "prune",
        "resnet20",
        "--data",
        photo_folder / "a",
        "--ratio",
        0.2,
        "--finetune-epochs",
        1,
        "--out",
        tmp_path / "o",
        *FAST,
    )
    assert code == ExitCode.DATA and "needs labels" in err
    assert not (tmp_path / "o").exists()


def test_unreachable_target_exits_1(capsys, tmp_path):
    code, _, err = run(
        capsys,
        "prune",
        "resnet20",
        "--input-shape",
        "3,32,32",
        "--flops-reduction",
        0.9,
        "--max-layer-ratio",
        0.5,
        "--out",
        tmp_path / "o",
        *FAST,
    )
    assert code == ExitCode.FAILURE and "icprune: error:" in err and "target" in err
    assert not (tmp_path / "o").exists()


def test_prune_writes_a_loadable_model_and_its_report_and_nothing_else(
    capsys, tmp_path, photo_folder, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # anything written outside --out would land here
    out = tmp_path / "run1"
    code, stdout, _ = run(
        capsys,
        "prune",
        "resnet20",
        "--data",
        photo_folder,
        "--val-data",
        photo_folder,
        "--flops-reduction",
        0.5,
        "--round-to",
        2,
        "--finetune-epochs",
        1,
        "--batch-size",
        4,
        "--latency-batch",
        2,
        "--out",
        out,
        "--quiet",
    )
    assert code == ExitCode.OK
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run1"]
    written = {p.name for p in out.iterdir()}
    assert {"model.pt", "plan.json", "scores.json", "report.json", "report.md"} <= written
    assert {"channels_kept.png", "capacity_vs_independence.png", "score_distributions.png"} <= (
        written
    )
    pruned = icprune.load(out / "model.pt", resnet20)
    plan = icprune.PruningPlan.from_json((out / "plan.json").read_text())
    assert 0.49 <= plan.flops_reduction <= 0.51
    macs, _ = icprune.count(pruned, torch.zeros(1, 3, 32, 32))
    assert macs == plan.macs[1]
    assert pruned(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    report = json.loads((out / "report.json").read_text())
    assert report["after"]["macs"] == plan.macs[1] and report["before"]["accuracy"] is not None
    assert "accuracy" in stdout and "MACs" in stdout


def test_prune_is_deterministic_and_data_free_without_data(capsys, tmp_path):
    argv = ["prune", "resnet20", "--input-shape", "3,32,32", "--params-reduction", 0.4, *FAST]
    for name in ("a", "b"):
        assert run(capsys, *argv, "--out", tmp_path / name)[0] == ExitCode.OK
    plans = [(tmp_path / n / "plan.json").read_text() for n in "ab"]
    assert plans[0] == plans[1]
    settings = json.loads((tmp_path / "a" / "scores.json").read_text())["settings"]
    assert settings["source"] == "weights"


def test_score_writes_json_and_csv_with_the_same_values(capsys, tmp_path):
    data = tmp_path / "x.pt"
    torch.save(torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)), data)
    for name in ("s.json", "s.csv"):
        code, stdout, _ = run(
            capsys, "score", "resnet20", "--data", data, "--out", tmp_path / name, "--quiet"
        )
        assert code == ExitCode.OK and "scored 21 layers, 784 channels" in stdout
    layers = json.loads((tmp_path / "s.json").read_text())["layers"]
    expected = icprune.score(resnet20_seeded(), [torch.load(data)], progress=False)
    assert list(layers) == list(expected)
    for name, values in layers.items():
        assert values["score"] == expected[name].score.tolist()
    rows = (tmp_path / "s.csv").read_text().splitlines()
    assert rows[0] == "layer,channel,capacity,independence,score"
    layer, channel, _, _, fused = rows[1].split(",")
    assert float(fused) == layers[layer]["score"][int(channel)]
    assert len(rows) == 1 + sum(len(v["score"]) for v in layers.values())


def resnet20_seeded():
    torch.manual_seed(0)  # what the command does for a zoo model without --weights
    return resnet20().eval()


def test_synthetic_data_warns(capsys, tmp_path):
    with pytest.warns(UserWarning, match="prefer data-free scoring"):
        code, _, _ = run(
            capsys,
            "score",
            "resnet20",
            "--data",
            "synthetic",
            "--max-samples",
            4,
            "--out",
            tmp_path / "s.json",
            "--quiet",
        )
    assert code == ExitCode.OK


def test_interrupted_prune_resumes_from_its_calibration_checkpoint(capsys, tmp_path, monkeypatch):
    import icprune.cli.commands as commands
    from icprune.sources import load_source

    data = tmp_path / "x.pt"
    torch.save(torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(1)), data)
    argv = [
        "prune",
        "resnet20",
        "--data",
        data,
        "--batch-size",
        4,
        "--checkpoint-every",
        2,
        "--ratio",
        0.4,
        *FAST,
    ]
    assert run(capsys, *argv, "--out", tmp_path / "whole")[0] == ExitCode.OK

    class Interrupting(list):
        """The batches, but iterating them stops with Ctrl-C at batch 5."""

        def __iter__(self):
            for i in range(len(self)):
                if i == 5:
                    raise KeyboardInterrupt
                yield self[i]

    def interrupted(*args, **kwargs):
        source = load_source(*args, **kwargs)
        return dataclasses.replace(source, batches=Interrupting(source.batches))

    monkeypatch.setattr(commands, "load_source", interrupted)
    code, _, err = run(capsys, *argv, "--out", tmp_path / "part")
    assert code == ExitCode.INTERRUPTED and "interrupted" in err
    assert sorted(p.name for p in (tmp_path / "part").iterdir()) == ["calibration.pt"]
    monkeypatch.undo()
    code, _, err = run(capsys, *argv, "--out", tmp_path / "part")
    assert code == ExitCode.OUTPUT  # an existing --out needs --resume (or --force)
    assert run(capsys, *argv, "--out", tmp_path / "part", "--resume")[0] == ExitCode.OK
    whole, resumed = tmp_path / "whole", tmp_path / "part"
    assert (whole / "plan.json").read_text() == (resumed / "plan.json").read_text()
    layers = [json.loads((d / "scores.json").read_text())["layers"] for d in (whole, resumed)]
    assert layers[0] == layers[1]


@pytest.mark.slow
def test_readme_run_prunes_resnet50_on_the_bundled_photographs(capsys, tmp_path):
    from icprune.data import sample_images_folder
    from icprune.models import resnet50

    out = tmp_path / "run1"
    code, stdout, _ = run(
        capsys,
        "prune",
        "resnet50",
        "--data",
        sample_images_folder(),
        "--flops-reduction",
        0.5,
        "--input-shape",
        "3,64,64",
        "--latency-batch",
        1,
        "--out",
        out,
        "--quiet",
    )  # the README's command, at 64x64 to keep the suite fast
    assert code == ExitCode.OK and "MACs" in stdout
    pruned = icprune.load(out / "model.pt", resnet50)
    report = json.loads((out / "report.json").read_text())
    assert 0.49 <= report["plan"]["flops_reduction"] <= 0.51
    assert icprune.count(pruned, torch.zeros(1, 3, 64, 64))[0] == report["after"]["macs"]
    assert len(report["layers"]) == 53 and report["after"]["latency_s"] > 0


def test_demo_command_runs_the_demo_with_its_options(capsys, tmp_path, monkeypatch):
    import icprune.demo

    calls = []
    monkeypatch.setattr(icprune.demo, "run_demo", lambda out, **kw: calls.append((out, kw)) or 0)
    assert run(capsys, "demo")[0] == ExitCode.OK
    assert run(capsys, "demo", "--out", tmp_path / "d", "--force", "--quiet")[0] == ExitCode.OK
    assert calls == [
        ("icprune-demo", {"force": False, "progress": True}),
        (str(tmp_path / "d"), {"force": True, "progress": False}),
    ]


def test_val_data_errors_name_the_option(capsys, tmp_path, photo_folder):
    argv = ["prune", "resnet20", "--ratio", 0.2, "--out", tmp_path / "o", *FAST]
    code, _, err = run(capsys, *argv, "--val-data", tmp_path / "missing")
    assert code == ExitCode.DATA and "error: --val-data: no such file or folder" in err
    code, _, err = run(capsys, *argv, "--val-data", photo_folder / "a")
    assert code == ExitCode.DATA and "--val-data" in err and "has no labels" in err
    assert not (tmp_path / "o").exists()
