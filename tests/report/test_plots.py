import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from icprune.report import plots


def layers(n, seed=0):
    """n layers of 1..64 channels: names, capacities, independences, kept masks, scores."""
    rng = np.random.default_rng(seed)
    sizes = [1 + (7 * i) % 64 for i in range(n)]
    names = [f"stage{i // 4}.block{i % 4}.conv" for i in range(n)]
    cap = [rng.uniform(2, 4, c) for c in sizes]
    ind = [rng.uniform(0, 1, c) for c in sizes]
    kept = [rng.uniform(size=c) < 0.6 for c in sizes]
    kept[0][:] = True  # a layer that keeps everything
    return names, sizes, cap, ind, kept


def size_of(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
        return image.size


def test_each_plot_writes_a_png_that_grows_with_the_layers(tmp_path):
    heights = {}
    for n in (3, 50):
        names, sizes, cap, ind, kept = layers(n)
        files = {
            "channels_kept": tmp_path / f"kept{n}.png",
            "capacity_vs_independence": tmp_path / f"scatter{n}.png",
            "score_distributions": tmp_path / f"scores{n}.png",
        }
        plots.channels_kept(files["channels_kept"], names, sizes, [int(k.sum()) for k in kept])
        plots.capacity_vs_independence(files["capacity_vs_independence"], names, cap, ind, kept)
        plots.score_distributions(files["score_distributions"], names, cap, kept)
        for kind, path in files.items():
            width, height = size_of(path)
            assert 250 <= width <= 2000 and 200 <= height <= 5000, (kind, n, width, height)
            heights[kind, n] = height
    for kind in ("channels_kept", "capacity_vs_independence", "score_distributions"):
        # 50 layers get at least 10 px of height each: labels do not overlap.
        assert heights[kind, 50] > heights[kind, 3] + 10 * 47 / (6 if "capacity" in kind else 1)


def test_mismatched_or_empty_columns_are_rejected(tmp_path):
    names, sizes = layers(3)[:2]
    with pytest.raises(ValueError, match="3 layer names but 2 values"):
        plots.channels_kept(tmp_path / "a.png", names, sizes[:2], sizes)
    with pytest.raises(ValueError, match="no layers"):
        plots.score_distributions(tmp_path / "b.png", [], [], [])
    assert not list(tmp_path.iterdir())


def test_plotting_leaves_pyplot_and_global_state_alone(tmp_path):
    code = (
        "import sys, matplotlib\n"
        "rc = matplotlib.rcParams.copy()\n"
        "from icprune.report import plots\n"
        f"plots.channels_kept({str(tmp_path / 'k.png')!r}, ['a', 'b'], [4, 8], [2, 8])\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
        "assert matplotlib.rcParams.copy() == rc\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert size_of(tmp_path / "k.png")[0] > 0
