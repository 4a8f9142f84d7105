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
