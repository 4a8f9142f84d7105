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
    assert {"channels_kept.png", "score_distributions.png"} <= written
    assert "capacity_vs_independence.png" not in written  # the default criterion has neither
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
    assert settings["criterion"] == "wbn" and settings["repaired"] is False


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
    from icprune.cli.data_specs import load_data_spec

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
        "--criterion",
        "icii",
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
        data = load_data_spec(*args, **kwargs)
        return dataclasses.replace(data, batches=Interrupting(data.batches))

    monkeypatch.setattr(commands, "load_data_spec", interrupted)
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
    import icprune.cli.demo

    calls = []
    monkeypatch.setattr(
        icprune.cli.demo, "run_demo", lambda out, **kw: calls.append((out, kw)) or 0
    )
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


# --- hostile input: every bad input a clear message, its exit code, nothing lost ---

SMALL = ["--input-shape", "3,16,16", *FAST]


def labelled_file(path, targets, n=8, size=16):
    inputs = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    torch.save({"inputs": inputs, "targets": torch.tensor(targets)}, path)
    return path


def factory_module(tmp_path, monkeypatch, name, source):
    """A user's model module ``name`` in ``tmp_path``, importable as the command imports it."""
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)


def test_force_and_success_delete_only_the_checkpoint_this_run_wrote(capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    mine = {"calibration_imagenet.pt": "my stats", "calibration.rank1.pt": "mine too"}
    for name, text in mine.items():
        (out / name).write_text(text)
    data = tmp_path / "x.pt"
    torch.save(torch.randn(8, 3, 16, 16), data)
    argv = ["prune", "resnet20", "--data", data, "--batch-size", 4, "--ratio", 0.3, *FAST]
    code, _, _ = run(capsys, *argv, "--out", out, "--force")
    assert code == ExitCode.OK and not (out / "calibration.pt").exists()
    assert {name: (out / name).read_text() for name in mine} == mine
    assert not (out / ".icprune.lock").exists()


def test_results_are_written_before_latency_and_a_failed_timing_loses_nothing(
    capsys, tmp_path, monkeypatch
):
    import icprune.cli.commands as commands

    def out_of_memory(models, batch):
        assert (tmp_path / "o" / "model.pt").is_file()  # the results are already written
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 9 TB")

    monkeypatch.setattr(commands, "latency", out_of_memory)
    argv = ["prune", "resnet20", "--ratio", 0.3, "--input-shape", "3,16,16", "--quiet"]
    code, _, err = run(capsys, *argv, "--latency-batch", 1024, "--out", tmp_path / "o")
    assert code == ExitCode.OK and "latency not measured (--latency-batch 1024" in err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert (
        report["after"]["latency_s"] is None
        and "can't allocate" in (report["settings"]["latency_error"])
    )
    assert icprune.load(tmp_path / "o" / "model.pt", resnet20) is not None
    code, _, err = run(capsys, *argv, "--latency-batch", 100000, "--out", tmp_path / "p")
    assert code == ExitCode.USAGE and "--latency-batch: must be an integer in [0, 1024]" in err


def test_empty_weights_file_exits_3(capsys, tmp_path):
    (tmp_path / "w.pt").write_bytes(b"")
    code, _, err = run(
        capsys, "score", "resnet20", "--weights", tmp_path / "w.pt", "--out", tmp_path / "s.json"
    )
    assert code == ExitCode.MODEL and "cannot be read" in err and "the file is empty" in err


def test_labels_outside_the_models_classes_exit_4_before_any_work(
    capsys, tmp_path, monkeypatch, photo_folder
):
    import icprune.cli.commands as commands

    monkeypatch.setattr(commands, "score", lambda *a, **k: pytest.fail("scored bad labels"))
    bad = labelled_file(tmp_path / "bad.pt", [0, 1, 2, 3, 4, 5, 6, 99])
    argv = ["prune", "resnet20", "--ratio", 0.3, "--batch-size", 4, *FAST]
    code, _, err = run(
        capsys, *argv, "--data", bad, "--finetune-epochs", 1, "--out", tmp_path / "a"
    )
    assert code == ExitCode.DATA and f"--data {str(bad)!r}: label 99" in err and "[0, 10)" in err
    negative = labelled_file(tmp_path / "neg.pt", [0, -1, 2, 3, 4, 5, 6, 7])
    code, _, err = run(capsys, *argv, "--val-data", negative, "--out", tmp_path / "b")
    assert code == ExitCode.DATA and "--val-data" in err and "label -1" in err
    folder = ["--val-data", photo_folder, "--num-classes", 1, "--input-shape", "3,16,16"]
    code, _, err = run(
        capsys, "prune", "resnet20", "--ratio", 0.3, *folder, "--out", tmp_path / "c"
    )
    assert code == ExitCode.DATA and "2 class folders" in err and "has 1 outputs" in err
    assert not any((tmp_path / n).exists() for n in "abc")


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("raise ZeroDivisionError('at import')\n", "raised ZeroDivisionError: at import"),
        ("def build(:\n", r"raised SyntaxError: .*bad_import\.py, line 1"),
    ],
)
def test_a_factory_module_that_fails_to_import_exits_3(
    capsys, tmp_path, monkeypatch, source, message
):
    factory_module(tmp_path, monkeypatch, "bad_import", source)
    code, _, err = run(capsys, "prune", "bad_import:build", "--ratio", 0.3, "--out", "o")
    assert code == ExitCode.MODEL and "model 'bad_import:build': importing module" in err
    assert __import__("re").search(message, err) and "Traceback" not in err
    assert not (tmp_path / "o").exists()


NAN_MODEL = """
import torch
from icprune.models import resnet20

def build():
    model = resnet20()
    with torch.no_grad():
        model.layer1[0].conv1.weight[0] = float("nan")
    return model.eval()
"""


def test_a_failed_calibration_leaves_no_folder_and_names_the_nan_policy_flag(
    capsys, tmp_path, monkeypatch
):
    factory_module(tmp_path, monkeypatch, "nan_model", NAN_MODEL)
    torch.save(torch.randn(8, 3, 16, 16), tmp_path / "x.pt")
    argv = ["prune", "nan_model:build", "--data", "x.pt", "--ratio", 0.3, "--out", "o", *FAST]
    code, _, err = run(capsys, *argv)
    assert code == ExitCode.FAILURE and "non-finite" in err
    assert "--nan-policy zero" in err and "nan_policy" not in err
    assert not (tmp_path / "o").exists()  # the same command can simply be rerun
    code, _, _ = run(capsys, *argv, "--nan-policy", "zero")
    assert code == ExitCode.OK
    scores = json.loads((tmp_path / "o" / "scores.json").read_text())
    assert scores["settings"]["nan_policy"] == "zero"


class Interrupting(list):
    """Batches whose calibration is stopped by Ctrl-C when batch ``at`` is fetched."""

    at = 0

    def __getitem__(self, i):
        if i == self.at:
            raise KeyboardInterrupt
        return super().__getitem__(i)


@pytest.mark.parametrize("at", [1, 5])
def test_ctrl_c_leaves_no_empty_folder_and_suggests_resume(capsys, tmp_path, monkeypatch, at):
    import icprune.cli.commands as commands
    from icprune.cli.data_specs import load_data_spec

    data = tmp_path / "x.pt"
    torch.save(torch.randn(24, 3, 16, 16, generator=torch.Generator().manual_seed(1)), data)
    argv = ["prune", "resnet20", "--data", data, "--batch-size", 4, "--checkpoint-every", 2]
    argv += ["--ratio", 0.3, "--criterion", "icii", "--out", tmp_path / "o", *FAST]

    def interrupted(*args, **kwargs):
        data = load_data_spec(*args, **kwargs)
        batches = Interrupting(data.batches)
        batches.at = at
        return dataclasses.replace(data, batches=batches)

    monkeypatch.setattr(commands, "load_data_spec", interrupted)
    code, _, err = run(capsys, *argv)
    assert code == ExitCode.INTERRUPTED and "interrupted" in err
    if at == 1:  # before the first checkpoint: nothing to keep, and no folder in the way
        assert not (tmp_path / "o").exists() and "--resume" not in err
    else:
        assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["calibration.pt"]
        assert "rerun the command with --resume" in err and "--force to start over" in err
    monkeypatch.undo()
    code, _, err = run(capsys, *argv)
    if at == 5:
        assert code == ExitCode.OUTPUT and "pass --resume to continue it" in err
        code, _, _ = run(capsys, *argv, "--resume")
    assert code == ExitCode.OK and not (tmp_path / "o" / "calibration.pt").exists()


def test_a_truncated_jpeg_exits_4_before_any_work(capsys, tmp_path, monkeypatch, photo_folder):
    import shutil

    import icprune.cli.commands as commands

    monkeypatch.setattr(commands, "score", lambda *a, **k: pytest.fail("calibrated"))
    images = tmp_path / "images"
    shutil.copytree(photo_folder, images)
    whole = (images / "b" / "img4.jpg").read_bytes()
    (images / "b" / "img4.jpg").write_bytes(whole[: int(len(whole) * 0.9)])
    code, _, err = run(
        capsys, "score", "resnet20", "--data", images, "--out", tmp_path / "s.json", "--quiet"
    )
    assert code == ExitCode.DATA and "img4.jpg" in err and "truncated" in err


def test_a_read_only_out_exits_5_before_any_work(capsys, tmp_path, monkeypatch):
    import os

    import icprune.cli.commands as commands

    out = tmp_path / "run"
    out.mkdir()
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(out)) and args and args[0] & os.O_CREAT:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    monkeypatch.setattr(commands, "build_model", lambda *a: pytest.fail("loaded the model"))
    argv = ["prune", "resnet20", "--ratio", 0.3, *SMALL, "--out", out, "--force"]
    code, _, err = run(capsys, *argv)
    assert code == ExitCode.OUTPUT and "cannot write in folder" in err and "Permission" in err


def test_a_second_run_into_a_locked_out_exits_5_and_leaves_it_alone(capsys, tmp_path):
    import fcntl
    import os

    out = tmp_path / "run"
    out.mkdir()
    (out / "plan.json").write_text("the other run's")
    fd = os.open(out / ".icprune.lock", os.O_RDWR | os.O_CREAT)
    os.write(fd, b"pid 1 on elsewhere")
    fcntl.flock(fd, fcntl.LOCK_EX)  # the other run, still working
    try:
        code, _, err = run(
            capsys, "prune", "resnet20", "--ratio", 0.3, *SMALL, "--out", out, "--force"
        )
    finally:
        os.close(fd)
    assert code == ExitCode.OUTPUT and "in use by another icprune run (pid 1 on elsewhere)" in err
    assert (out / "plan.json").read_text() == "the other run's"
    code, _, _ = run(capsys, "prune", "resnet20", "--ratio", 0.3, *SMALL, "--out", out, "--force")
    assert code == ExitCode.OK and not (out / ".icprune.lock").exists()  # a lock left by a dead run


def test_a_failed_write_exits_5_and_keeps_the_previous_run_whole(capsys, tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    out = tmp_path / "run"
    argv = ["prune", "resnet20", *SMALL, "--out", out]
    assert run(capsys, *argv, "--ratio", 0.4)[0] == ExitCode.OK
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = Path.write_text

    def disk_full(self, *args, **kwargs):
        if "scores.json" in self.name:
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", disk_full)
    code, _, err = run(capsys, *argv, "--ratio", 0.3, "--force")
    assert code == ExitCode.OUTPUT and "No space left on device" in err
    assert f"cannot write {str(out / 'scores.json')!r}" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # not a byte changed

    def torch_save_fails(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")

    monkeypatch.setattr("icprune.serialization.torch.save", torch_save_fails)
    code, _, err = run(capsys, *argv, "--ratio", 0.3, "--force")
    assert code == ExitCode.OUTPUT and "cannot write" in err and "model.pt" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_messages_name_cli_flags_and_never_invite_an_unsafe_load(capsys, tmp_path):
    code, _, err = run(
        capsys, "prune", "resnet20", "--ratio", 0.99, *SMALL, "--out", tmp_path / "o"
    )
    assert code == ExitCode.FAILURE and "--max-layer-ratio 0.9" in err and "--min-channels 1" in err
    assert "max_layer_ratio" not in err and "min_channels" not in err
    code, _, err = run(
        capsys, "prune", "resnet20", "--ratio", 0.5, "--round-to", 1000, *SMALL, "--out", "o"
    )
    assert code == ExitCode.FAILURE and "--ratio 0.5 cannot be met: no channel" in err
    assert "--round-to rounds every group" in err and "round_to" not in err
    torch.save(resnet20(), tmp_path / "whole.pt")
    torch.save(torch.randn(4, 3, 16, 16).to_sparse(), tmp_path / "sparse.pt")
    cases = [
        (["--weights", tmp_path / "whole.pt"], ExitCode.MODEL, "object of class"),
        (["--data", tmp_path / "sparse.pt"], ExitCode.DATA, "sparse_coo tensor"),
        (["--data", tmp_path / "whole.pt"], ExitCode.DATA, "object of class"),
        (["--ignore", ""], ExitCode.USAGE, "--ignore: an empty layer name"),
        (["--input-shape", "1,16,16"], ExitCode.USAGE, "first layer 'conv1' takes 3 channels"),
    ]
    for extra, expected, message in cases:
        code, _, err = run(
            capsys, "prune", "resnet20", "--ratio", 0.3, *extra, "--out", tmp_path / "p", *FAST
        )
        assert code == expected and message in err, (extra, err)
        assert "weights_only=False" not in err and "Traceback" not in err
    assert not (tmp_path / "p").exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--seed", "99999999999999999999999"], "--seed: must be an integer in [-2**63, 2**64)"),
        (["--lam", "1e308"], "--lam: must be a number in [0, 1e+06]"),
        (["--device", "meta"], "--device 'meta': expected auto, cpu, cuda or cuda:N"),
        (["--out", ""], "--out is empty"),
        (["--resume", "--force"], "pass one of them"),
        (["--resume"], "--resume continues an interrupted feature-map calibration"),
        (["--min-channels", "0"], "--min-channels: must be an integer >= 1"),
        (["--nan-policy", "explode"], "--nan-policy: invalid choice: 'explode'"),
    ],
)
def test_out_of_range_options_exit_2(capsys, tmp_path, extra, message):
    argv = ["prune", "resnet20", "--ratio", 0.3, "--out", tmp_path / "o", *SMALL, *extra]
    code, _, err = run(capsys, *argv)
    assert code == ExitCode.USAGE and message in err
    assert not (tmp_path / "o").exists()


def test_empty_specs_and_mismatched_shapes_exit_4(capsys, tmp_path):
    torch.save(torch.randn(4, 3, 16, 16), tmp_path / "x.pt")
    cases = [
        (["--data", ""], "the data spec is empty"),
        (["--data", tmp_path / "x.pt", "--input-shape", "3,32,32"], "but --input-shape says"),
        (["--data", tmp_path / "x.pt", "--val-data", tmp_path / "x.pt"], "--val-data"),
    ]
    for extra, message in cases:
        code, _, err = run(capsys, "prune", "resnet20", "--ratio", 0.3, *extra, "--out", "o", *FAST)
        assert code == ExitCode.DATA and message in err, err


def test_resume_needs_a_sound_checkpoint_of_the_same_run(capsys, tmp_path):
    data = tmp_path / "x.pt"
    torch.save(torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(2)), data)
    argv = ["prune", "resnet20", "--data", data, "--batch-size", 4, "--ratio", 0.3, *FAST]
    argv += ["--criterion", "icii"]  # the criterion whose calibration is checkpointed
    code, _, err = run(capsys, *argv, "--resume", "--out", tmp_path / "none")
    assert code == ExitCode.OUTPUT and "there is no" in err and "--out does not exist" in err
    done = tmp_path / "done"
    assert run(capsys, *argv, "--out", done)[0] == ExitCode.OK
    code, _, err = run(capsys, *argv, "--resume", "--out", done)
    assert code == ExitCode.OUTPUT and "the run finished" in err
    (done / "calibration.pt").write_bytes(b"PK\x03\x04 truncated")
    code, _, err = run(capsys, *argv, "--resume", "--out", done)
    assert code == ExitCode.OUTPUT and "not a complete torch.save file" in err
    assert "rerun with --force to start calibration over" in err
    torch.save(torch.nn.Linear(1, 1), done / "calibration.pt")
    code, _, err = run(capsys, *argv, "--resume", "--out", done)
    assert code == ExitCode.OUTPUT and "object of class" in err and "weights_only=False" not in err


def test_resume_with_another_model_is_refused_in_cli_words(capsys, tmp_path, monkeypatch):
    import icprune.cli.commands as commands
    from icprune.cli.data_specs import load_data_spec

    data = tmp_path / "x.pt"
    torch.save(torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(3)), data)
    argv = ["prune", "resnet20", "--data", data, "--batch-size", 4, "--checkpoint-every", 1]
    argv += ["--ratio", 0.3, "--criterion", "icii", "--out", tmp_path / "o", *FAST]

    def interrupted(*args, **kwargs):
        data = load_data_spec(*args, **kwargs)
        batches = Interrupting(data.batches)
        batches.at = 3
        return dataclasses.replace(data, batches=batches)

    monkeypatch.setattr(commands, "load_data_spec", interrupted)
    assert run(capsys, *argv)[0] == ExitCode.INTERRUPTED
    monkeypatch.undo()
    for extra, message in ((["--seed", 7], "model"), (["--nan-policy", "zero"], "--nan-policy")):
        code, _, err = run(capsys, *argv, "--resume", *extra)
        assert code == ExitCode.OUTPUT and "--resume: checkpoint" in err and message in err
        assert "with --force to start calibration over" in err and "nan_policy" not in err
    assert run(capsys, *argv, "--resume", "--ratio", 0.2)[0] == ExitCode.OK  # pruning may change


def test_an_empty_existing_out_needs_no_force_and_a_broken_link_is_named(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, _ = run(
        capsys, "prune", "resnet20", "--ratio", 0.3, *SMALL, "--out", tmp_path / "empty"
    )
    assert code == ExitCode.OK
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    code, _, err = run(
        capsys, "prune", "resnet20", "--ratio", 0.3, *SMALL, "--out", tmp_path / "link"
    )
    assert code == ExitCode.OUTPUT and "is a broken symbolic link" in err


def test_score_leaves_a_file_another_run_wrote_meanwhile(capsys, tmp_path, monkeypatch):
    import icprune.cli.commands as commands

    out = tmp_path / "s.json"
    real = commands.score

    def and_another_run_finishes(*args, **kwargs):
        scores = real(*args, **kwargs)
        out.write_text("the other run's")
        return scores

    monkeypatch.setattr(commands, "score", and_another_run_finishes)
    code, _, err = run(capsys, "score", "resnet20", "--out", out, "--quiet")
    assert code == ExitCode.OUTPUT and "was created by someone else" in err
    assert out.read_text() == "the other run's" and sorted(tmp_path.iterdir()) == [out]
    assert run(capsys, "score", "resnet20", "--out", out, "--quiet", "--force")[0] == ExitCode.OK
    assert json.loads(out.read_text())["settings"]["criterion"] == "wbn"


def test_a_diverged_fine_tuning_is_an_error_not_a_result(capsys, tmp_path, monkeypatch):
    import icprune.cli.commands as commands

    data = labelled_file(tmp_path / "lab.pt", [0, 1, 2, 3, 4, 5, 6, 7])
    argv = ["prune", "resnet20", "--data", data, "--batch-size", 4, "--ratio", 0.3, *FAST]
    argv += ["--criterion", "icii"]  # its calibration checkpoint is what --resume continues
    code, _, err = run(capsys, *argv, "--finetune-epochs", 1, "--lr", 1e30, "--out", tmp_path / "o")
    assert code == ExitCode.FAILURE and "the loss is nan" in err  # caught by finetune itself
    assert "lower --lr (given: 1e+30)" in err and " lr " not in err and "train_data" not in err
    assert "--resume" in err and not (tmp_path / "o" / "model.pt").exists()

    def diverged(model, *args, **kwargs):  # a loss that stayed finite, weights that did not
        with torch.no_grad():
            model.fc.weight.fill_(3e38)
        return model

    monkeypatch.setattr(commands, "finetune", diverged)
    code, _, err = run(capsys, *argv, "--finetune-epochs", 1, "--lr", 10, "--out", tmp_path / "p")
    assert code == ExitCode.FAILURE and "fine-tuning diverged" in err and "lower --lr" in err
    assert not (tmp_path / "p" / "model.pt").exists()


def test_repair_and_bn_recalibration_can_be_skipped_and_little_data_is_warned_about(
    capsys, tmp_path
):
    data = tmp_path / "x.pt"
    torch.save(torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)), data)
    argv = ["prune", "resnet20", "--data", data, "--ratio", 0.3, *FAST]
    code, _, err = run(capsys, *argv, "--out", tmp_path / "default")
    assert code == ExitCode.OK
    assert "icprune: warning: BatchNorm re-estimation: re-estimating" in err
    assert "--no-bn-recalibration" in err and "Traceback" not in err
    code, _, err = run(capsys, *argv, "--no-repair", "--no-bn-recalibration", "--out",
                       tmp_path / "bare")  # fmt: skip
    assert code == ExitCode.OK and "warning" not in err
    settings = json.loads((tmp_path / "bare" / "scores.json").read_text())["settings"]
    assert settings["repaired"] is False and settings["no_bn_recalibration"] is True
    model = resnet20_seeded()
    plan = icprune.PruningPlan.from_json((tmp_path / "bare" / "plan.json").read_text())
    unrepaired = icprune.apply(model, plan)
    bare = icprune.load(tmp_path / "bare" / "model.pt", resnet20)
    pairs = zip(bare.state_dict().values(), unrepaired.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--criterion", "greedy"], "--criterion greedy scores from what each layer reads"),
        (["--criterion", "wbn", "--source", "weights"], "--source chooses"),
        (["--data", "synthetic", "--resume"], "--resume continues an interrupted"),
    ],
)
def test_criterion_usage_errors_exit_2(capsys, tmp_path, extra, message):
    argv = ["prune", "resnet20", "--input-shape", "3,32,32", "--ratio", 0.3, *extra, *FAST]
    code, _, err = run(capsys, *argv, "--out", tmp_path / "run")
    assert code == ExitCode.USAGE and message in err
