"""The block-parallel CPU Gram matrix: the same bits on any number of workers, float32 accuracy
against the float64 reference, and statistics that do not depend on torch's thread count."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from icprune.stats import gram

#: docs/method.md: the float32 Gram of the fast backends is within 1e-5 of max|G| of the float64
#: reference.
GRAM_RTOL = 1e-5


def _reference(x3: torch.Tensor) -> np.ndarray:
    samples = x3.transpose(0, 1).reshape(x3.shape[1], -1).double()
    return (samples @ samples.T).numpy()


def _upper(g: np.ndarray) -> np.ndarray:
    return g[np.triu_indices(g.shape[0])]


def _layout(layout: str, n: int, c: int, side: int, seed: int = 0) -> torch.Tensor:
    """Tensor[N, C, S] of the given memory layout: channels_last rows read in place, NCHW long
    planes (one product per image) or short planes (copied runs of images)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, side, side, generator=gen).relu_() - 0.2
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.reshape(n, c, -1)


def _check_blocks(x3: torch.Tensor, workers=(2, 3, 8)) -> None:
    c = x3.shape[1]
    assert len(gram.block_edges(c)) > 2  # the product is really cut into blocks
    one, two_e = gram.gram_syrk(x3, float(x3.abs().max()), workers=1)
    assert two_e == 0
    for w in workers:
        many, _ = gram.gram_syrk(x3, float(x3.abs().max()), workers=w)
        assert np.array_equal(_upper(one), _upper(many)), f"{w} workers"
    ref = _reference(x3)
    err = np.abs(_upper(one) - _upper(ref)).max()
    assert err <= GRAM_RTOL * np.abs(ref).max()


@pytest.mark.parametrize(
    "layout, n, c, side",
    [
        ("channels_last", 3, 300, 9),  # 300 = 2 x 128 + 44: three block columns, the last odd
        ("short_planes", 5, 301, 7),  # copied to (C, k*S) runs of images
    ],
)
def test_blocks_on_any_number_of_workers_give_the_bits_of_one(layout, n, c, side):
    x3 = _layout(layout, n, c, side)
    if layout == "short_planes":
        assert x3.shape[2] < gram.PLANE_MIN_VALUES * c
    _check_blocks(x3)


def test_blocks_of_long_nchw_planes_accumulate_in_image_order(monkeypatch):
    # Long planes need S >= 32 C: with 16-channel blocks a small C has several block columns.
    monkeypatch.setattr(gram, "GRAM_BLOCK", 16)
    x3 = _layout("nchw", 3, 37, 35)  # 37 = 2 x 16 + 5; 1225 values per plane >= 32 * 37
    assert x3.shape[2] >= gram.PLANE_MIN_VALUES * 37
    assert gram.block_edges(37) == [0, 16, 32, 37]
    _check_blocks(x3)


def test_several_copied_runs_accumulate_per_block(monkeypatch):
    monkeypatch.setattr(gram, "COPY_VALUES", 2000)  # one image per run: five runs, in order
    _check_blocks(_layout("short_planes", 5, 300, 2))


def test_long_channels_last_runs_are_cut_for_the_blas_sizes(monkeypatch):
    monkeypatch.setattr(gram, "MAX_SAMPLES", 100)  # 3 x 81 rows: runs of 100, 100 and 43
    _check_blocks(_layout("channels_last", 3, 300, 9))


def test_wide_layers_get_wider_blocks_and_small_ones_one_call():
    assert gram.block_edges(100) == [0, 100]
    assert gram.block_edges(256) == [0, 128, 256]
    edges = gram.block_edges(2048)
    assert edges == list(range(0, 2049, 512))
    assert len(gram.block_edges(2047)) - 1 <= gram.GRAM_BLOCK_COLUMNS


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 4),
    c=st.integers(1, 60),
    side=st.sampled_from([1, 3, 8, 14]),
    layout=st.sampled_from(["channels_last", "nchw"]),
    workers=st.integers(2, 5),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_one_worker_and_the_reference(n, c, side, layout, workers, dtype, seed):
    x3 = _layout(layout, n, c, side, seed).to(dtype)
    old = gram.GRAM_BLOCK
    gram.GRAM_BLOCK = 8  # several blocks even for small C
    try:
        one, _ = gram.gram_syrk(x3, float(x3.abs().max()), workers=1)
        many, _ = gram.gram_syrk(x3, float(x3.abs().max()), workers=workers)
    finally:
        gram.GRAM_BLOCK = old
    assert one.dtype == (np.float64 if dtype == torch.float64 else np.float32)
    assert np.array_equal(_upper(one), _upper(many))
    ref = _reference(x3)
    rtol = 1e-12 if dtype == torch.float64 else GRAM_RTOL
    assert np.abs(_upper(one) - _upper(ref)).max() <= rtol * max(np.abs(ref).max(), 1e-30)


def test_blas_threads_are_restored_after_a_product():
    from threadpoolctl import threadpool_info, threadpool_limits

    with threadpool_limits(2, user_api="blas"):
        before = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
        gram.gram_syrk(_layout("channels_last", 2, 300, 5), 1.0, workers=2)
        after = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
    assert before == after


def test_long_planes_without_a_row_stride_are_copied_to_the_bits_of_contiguous_ones():
    # stride 0 along the channels (an expanded tensor): each (C, S) plane is copied first.
    plane = torch.randn(2, 1, 40, 40, generator=torch.Generator().manual_seed(3))
    x3 = plane.expand(2, 3, 40, 40).reshape(2, 3, -1)
    assert x3.stride(1) == 0 and x3.shape[2] >= gram.PLANE_MIN_VALUES * 3
    got, _ = gram.gram_syrk(x3, float(x3.abs().max()))
    want, _ = gram.gram_syrk(x3.contiguous(), float(x3.abs().max()))
    assert np.array_equal(_upper(got), _upper(want))
