"""bench/gpu.sh, the prepared script for a lent GPU, runs end to end on the CPU (--dry-run:
TRITON_INTERPRET=1, tiny shapes) and writes its report with targets computed from what it
measured - so that the one run on a GPU cannot fail on a typo."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]


def test_gpu_script_dry_run_writes_the_report(tmp_path):
    env = dict(os.environ, OUT_DIR=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    log = tmp_path / "dryrun-cpu-gpu_kernels.log"
    details = proc.stdout + proc.stderr + (log.read_text() if log.exists() else "")
    assert proc.returncode == 0, details
    report = (tmp_path / "dryrun-cpu-gpu_kernels.md").read_text()
    for section in ("## 1. Ceilings", "## 2. Kernels", "## 3. ResNet-50 calibration",
                    "## 4. Targets", "## 5. Block-size sweep"):  # fmt: skip
        assert section in report, section
    # Every kernel row of every dtype and layout is there, and each target has a verdict that
    # was computed (a tiny CPU run cannot pass the GPU targets: all must say FAIL here).
    for dtype in ("fp32", "fp16", "bf16"):
        for layout in ("nchw", "channels_last"):
            assert re.search(rf"\| 20x3x3 \| {dtype} \| {layout} \|", report), (dtype, layout)
    targets = report.split("## 4. Targets")[1].split("## 5.")[0]
    assert targets.count("**FAIL**") == 4 and "**pass**" not in targets
    tests = (tmp_path / "dryrun-cpu-gpu_tests.md").read_text()
    assert "exit status 0" in tests and "passed" in tests and "needs a CUDA device" in tests
