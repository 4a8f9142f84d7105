"""Where commands run: devices, and torchrun processes sharing the calibration exactly."""

import json
import os
import subprocess
import sys

import pytest
import torch

from icprune.cli.exit_codes import CommandError, ExitCode
from icprune.cli.launch import Launch, start


def test_a_single_process_runs_on_the_requested_device(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    launch = start("cpu")
    assert launch == Launch(0, 1, torch.device("cpu")) and not launch.distributed
    launch.barrier()  # a no-op without a process group
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert start("auto").device.type == expected


def test_unknown_or_missing_devices_are_usage_errors(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(CommandError, match="expected auto, cpu, cuda or cuda:N") as bad:
        start("tpu7")
    assert bad.value.code == ExitCode.USAGE
    if not torch.cuda.is_available():
        with pytest.raises(CommandError, match="no CUDA device is available; use --device cpu"):
            start("cuda")


def _icprune(*argv, launcher=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same GEMM rounding in every process
    return subprocess.run(
        [sys.executable, *launcher, "-m", "icprune", *map(str, argv)],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        check=False,
    )


@pytest.mark.slow
def test_torchrun_processes_give_the_single_process_plan_and_scores_exactly(tmp_path):
    data = tmp_path / "x.pt"
    torch.save(torch.randn(20, 3, 32, 32, generator=torch.Generator().manual_seed(0)), data)
    common = ["resnet20", "--data", data, "--batch-size", 4, "--quiet", "--device", "cpu"]
    common += ["--criterion", "icii"]  # the criterion whose statistics processes combine
    prune = ["prune", *common, "--ratio", 0.4, "--latency-batch", 0]
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    runs = {
        "single": _icprune(*prune, "--out", tmp_path / "single"),
        "multi": _icprune(*prune, "--out", tmp_path / "multi", launcher=torchrun),
        "score": _icprune("score", *common, "--out", tmp_path / "s.json", launcher=torchrun),
    }
    for name, done in runs.items():
        assert done.returncode == 0, f"{name}: {done.stderr[-2000:]}"
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert (single / "plan.json").read_text() == (multi / "plan.json").read_text()
    layers = {
        name: json.loads(path.read_text())["layers"]
        for name, path in [
            ("single", single / "scores.json"),
            ("multi", multi / "scores.json"),
            ("score", tmp_path / "s.json"),
        ]
    }
    assert layers["single"] == layers["multi"] == layers["score"]
    assert not list(multi.glob("calibration*.pt"))  # the rank checkpoints are gone
    assert runs["multi"].stdout.count("wrote") == 1  # only process 0 writes and reports


@pytest.mark.slow
def test_torchrun_fine_tunes_in_every_process_and_process_0_writes(tmp_path):
    """Under torchrun with --finetune-epochs every process fine-tunes (DDP: a process that
    stopped early would leave process 0 waiting until the timeout); 26 samples in batches of 4
    give 6 full batches, 3 rounds of 2, and the short last batch is left out. (That the steps
    equal one process's on the global batches is tests/recovery/test_finetune_distributed.py.)"""
    data = tmp_path / "lab.pt"
    gen = torch.Generator().manual_seed(0)
    inputs, targets = torch.randn(26, 3, 32, 32, generator=gen), torch.randint(0, 10, (26,))
    torch.save({"inputs": inputs, "targets": targets}, data)
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    argv = ["prune", "resnet20", "--data", data, "--batch-size", 4, "--quiet", "--device", "cpu"]
    argv += ["--criterion", "icii"]  # the criterion whose statistics processes combine
    argv += ["--ratio", 0.4, "--latency-batch", 0, "--finetune-epochs", 1, "--lr", 0.05]
    done = _icprune(*argv, "--out", tmp_path / "multi", launcher=torchrun)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("wrote") == 1
    report = json.loads((tmp_path / "multi" / "report.json").read_text())
    assert "finetune_s" in json.dumps(report)
    # One process alone makes the same plan (the test above) but takes 7 steps of one batch,
    # where the two processes take 3 steps of two batches: the fine-tuned weights differ.
    single = _icprune(*argv, "--out", tmp_path / "single")
    assert single.returncode == 0, single.stderr[-2000:]
    weights = [
        torch.load(tmp_path / run / "model.pt", weights_only=True)["state_dict"]
        for run in ("single", "multi")
    ]
    assert weights[0].keys() == weights[1].keys()
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
