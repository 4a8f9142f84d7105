"""Every Triton kernel compiles for sm_90 (Hopper) - checked without a GPU, since Triton ships
ptxas: a GPU-only compile error would otherwise first show on a lent GPU. The Gram kernel must
use the tensor cores (wgmma: HGMMA in the SASS)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


@pytest.mark.skipif(
    not CUOBJDUMP.exists(),
    reason="this Triton build ships no NVIDIA toolchain (ptxas/cuobjdump)",
)
def test_kernels_compile_for_sm90_and_the_gram_uses_tensor_cores():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_sass"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    kernels = {row["kernel"] for row in rows}
    assert kernels == {"_stats_pass", "_stats_finish", "_gram", "_gram_finish"}
    gram = [row for row in rows if row["kernel"] == "_gram"]
    assert len(gram) == 12 and all(row["HGMMA"] > 0 for row in gram), gram
