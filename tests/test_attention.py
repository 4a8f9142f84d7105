"""PrunedMultiheadAttention: nn.MultiheadAttention's forward with fewer heads."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from icprune.attention import (
    PrunedMultiheadAttention,
    PrunedWindowAttention,
    head_columns,
    head_rows,
)


def _mha(batch_first: bool, bias: bool = True) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(12, 4, bias=bias, batch_first=batch_first).eval()
    with torch.no_grad():
        for p in mha.parameters():
            p.normal_()
    return mha


def _head_masked(mha: nn.MultiheadAttention, kept: torch.Tensor) -> nn.MultiheadAttention:
    """The reference: the same attention with the other heads' value rows zeroed (their
    outputs are then exactly 0 before out_proj)."""
    ref = _mha(mha.batch_first, mha.in_proj_bias is not None)
    ref.load_state_dict(mha.state_dict())
    gone = torch.ones(mha.num_heads, dtype=torch.bool)
    gone[kept] = False
    d, e = mha.head_dim, mha.embed_dim
    with torch.no_grad():
        for h in gone.nonzero().flatten().tolist():
            ref.in_proj_weight[2 * e + h * d : 2 * e + (h + 1) * d] = 0
            if ref.in_proj_bias is not None:
                ref.in_proj_bias[2 * e + h * d : 2 * e + (h + 1) * d] = 0
    return ref


def test_head_rows_and_columns():
    kept = torch.tensor([0, 2])
    assert head_rows(3, 2, kept).tolist() == [0, 1, 4, 5, 6, 7, 10, 11, 12, 13, 16, 17]
    assert head_columns(2, kept).tolist() == [0, 1, 4, 5]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_all_heads_kept_computes_what_multihead_attention_computes(batch_first, need_weights, bias):
    mha = _mha(batch_first, bias)
    pruned = PrunedMultiheadAttention.keeping(mha, torch.arange(4))
    x = torch.randn(2, 5, 12) if batch_first else torch.randn(5, 2, 12)
    with torch.no_grad():
        want, want_w = mha(x, x, x, need_weights=need_weights)
        got, got_w = pruned(x, x, x, need_weights=need_weights)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if need_weights:
        torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)
    else:
        assert got_w is None and want_w is None
    assert list(pruned.state_dict()) == list(mha.state_dict())


@pytest.mark.parametrize("batch_first", [True, False])
def test_fewer_heads_equal_the_head_masked_attention(batch_first):
    mha = _mha(batch_first)
    kept = torch.tensor([1, 3])
    pruned = PrunedMultiheadAttention.keeping(mha, kept)
    out_cols = head_columns(mha.head_dim, kept)
    with torch.no_grad():
        pruned.out_proj = nn.Linear(6, 12)
        pruned.out_proj.weight.copy_(mha.out_proj.weight[:, out_cols])
        pruned.out_proj.bias.copy_(mha.out_proj.bias)
    assert (pruned.num_heads, pruned.head_dim, pruned.embed_dim) == (2, 3, 12)
    assert pruned.in_proj_weight.shape == (18, 12) and pruned.in_proj_bias.shape == (18,)
    ref = _head_masked(mha, kept)
    q = torch.randn(2, 5, 12) if batch_first else torch.randn(5, 2, 12)
    kv = torch.randn(2, 7, 12) if batch_first else torch.randn(7, 2, 12)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, -2:] = True
    with torch.no_grad():
        for args in ((q, q, q), (q, kv, kv), (q, kv, kv.flip(0))):
            for kwargs in ({}, {"key_padding_mask": pad}) if args[1] is kv else ({},):
                want = ref(*args, need_weights=False, **kwargs)[0]
                got = pruned(*args, need_weights=False, **kwargs)[0]
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # the weights of the kept heads are those of the original's same heads
        _, all_w = mha(q, q, q, average_attn_weights=False)
        _, kept_w = pruned(q, q, q, average_attn_weights=False)
        torch.testing.assert_close(kept_w, all_w[:, kept], rtol=1e-5, atol=1e-6)


def test_masks_unbatched_inputs_and_causal_hint():
    mha = _mha(True)
    pruned = PrunedMultiheadAttention.keeping(mha, torch.arange(4))
    x = torch.randn(5, 12)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    bool_mask = torch.ones(5, 5, dtype=torch.bool).triu(1)
    with torch.no_grad():
        for mask in (causal, bool_mask):
            want, want_w = mha(x, x, x, attn_mask=mask)
            got, got_w = pruned(x, x, x, attn_mask=mask)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)
        want = mha(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)[0]
        got = pruned(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)[0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="is_causal=True needs attn_mask"):
        pruned(x, x, x, is_causal=True)


def test_constructor_checks_and_shapes():
    module = PrunedMultiheadAttention(16, 3, 4, bias=False, batch_first=True)
    assert module.in_proj_weight.shape == (36, 16) and module.in_proj_bias is None
    assert module.out_proj.weight.shape == (16, 12) and module.out_proj.bias is None
    assert module(torch.randn(2, 5, 16), *[torch.randn(2, 5, 16)] * 2)[0].shape == (2, 5, 16)
    with pytest.raises(ValueError, match="num_heads must be an int >= 1"):
        PrunedMultiheadAttention(16, 0, 4)


@pytest.mark.parametrize("cosine", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("shift", [0, 2])
@pytest.mark.parametrize("side", [8, 6], ids=["whole-windows", "padded"])
def test_window_attention_with_fewer_heads_equals_the_head_masked_one(cosine, shift, side):
    torch.manual_seed(0)
    full = PrunedWindowAttention(16, [4, 4], [shift, shift], 4, 4, cosine=cosine).eval()
    with torch.no_grad():
        for p in full.parameters():
            p.normal_()
    kept = torch.tensor([0, 3])
    pruned = PrunedWindowAttention.keeping(full, kept)
    assert pruned.proj is full.proj  # its input columns are the applier's to slice
    pruned.proj = nn.Linear(8, 16)
    ref = PrunedWindowAttention(16, [4, 4], [shift, shift], 4, 4, cosine=cosine).eval()
    ref.load_state_dict(full.state_dict())
    with torch.no_grad():
        pruned.proj.weight.copy_(full.proj.weight[:, head_columns(4, kept)])
        pruned.proj.bias.copy_(full.proj.bias)
        ref.qkv.weight[32 + 4 : 32 + 12] = 0  # heads 1 and 2: value rows
        ref.qkv.bias[32 + 4 : 32 + 12] = 0
        x = torch.randn(2, side, side, 16)
        torch.testing.assert_close(pruned(x), ref(x), rtol=1e-5, atol=1e-5)
    assert list(pruned.state_dict()) == list(full.state_dict())


def test_window_attention_position_tables_are_swins():
    module = PrunedWindowAttention(8, [2, 3], [0, 0], 2, 4, cosine=True)
    # token (a, b) to (c, d): row (a - c + 1) * 5 + (b - d + 2) of the (3 * 5)-row table
    index = module.relative_position_index.view(6, 6)
    assert index[0, 0] == 1 * 5 + 2 and index[0, 5] == (0 - 1 + 1) * 5 + (0 - 2 + 2)
    assert index[5, 0] == (1 + 1) * 5 + (2 + 2)
    table = module.relative_coords_table
    assert table.shape == (1, 3, 5, 2) and torch.equal(table[0, 1, 2], torch.zeros(2))
    assert torch.allclose(table[0, 2, 4], torch.full((2,), math.log2(9) / 3))  # the corner
