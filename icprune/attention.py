"""Multi-head attention with fewer heads than its embedding dimension allows.

``nn.MultiheadAttention`` ties its ``embed_dim`` (the width of the residual stream it reads and
writes) to ``num_heads * head_dim``: it cannot hold ``h`` of its ``H`` heads with the same
``embed_dim``. :class:`PrunedMultiheadAttention` can: its query, key and value projections have
``h * head_dim`` rows (packed in ``in_proj_weight`` like ``nn.MultiheadAttention``'s), its
``out_proj`` reads ``h * head_dim`` features and writes ``embed_dim``. It has the state_dict
keys of a packed ``nn.MultiheadAttention`` (``in_proj_weight``, ``in_proj_bias``,
``out_proj.weight``, ``out_proj.bias``) and its forward semantics (arguments, batch layout,
masks, returned weights); :func:`icprune.apply` swaps it in for an attention whose heads a plan
prunes and :func:`icprune.load` rebuilds it.

Head ``i`` of an attention with ``H`` heads of ``head_dim = d`` is rows ``i*d ... (i+1)*d - 1``
of each of the query, key and value blocks of ``in_proj_weight`` (rows ``0, H*d, 2*H*d`` on),
the same entries of ``in_proj_bias`` and columns ``i*d ... (i+1)*d - 1`` of ``out_proj.weight``
(:func:`head_rows`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear


def head_rows(heads: int, head_dim: int, kept: Tensor) -> Tensor:
    """The ``in_proj_weight`` rows of the kept heads, in q, k, v order.

    Args:
        heads: the attention's number of heads H.
        head_dim: features per head d.
        kept: LongTensor[h] of kept head indices in [0, H), sorted.

    Returns:
        LongTensor[3 * h * d]: rows ``b*H*d + i*d + j`` for block b in (q, k, v), kept head i
        and j in [0, d).
    """
    kept = kept.to(torch.int64).cpu()
    within = (kept[:, None] * head_dim + torch.arange(head_dim)).flatten()
    return torch.cat([within + block * heads * head_dim for block in range(3)])


def head_columns(head_dim: int, kept: Tensor) -> Tensor:
    """The ``out_proj.weight`` columns of the kept heads (LongTensor[h * d], sorted)."""
    kept = kept.to(torch.int64).cpu()
    return (kept[:, None] * head_dim + torch.arange(head_dim)).flatten()


class PrunedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` (packed projections, no ``bias_k``/``bias_v``, no zero
    attention) with ``num_heads * head_dim`` independent of ``embed_dim``.

    Args:
        embed_dim: E, the feature size of query, key, value and output.
        num_heads: h, the heads kept (>= 1).
        head_dim: d, features per head (the softmax scale is ``1 / sqrt(d)``).
        dropout: dropout probability on the attention weights (training only).
        bias: the projections have biases.
        batch_first: inputs and output are ``(N, L, E)``; else ``(L, N, E)``.
        device, dtype: of the parameters.

    Parameters: ``in_proj_weight`` ``(3*h*d, E)``, ``in_proj_bias`` ``(3*h*d,)`` (or None),
    ``out_proj`` a ``Linear(h*d, E)`` (of ``nn.MultiheadAttention``'s class for it).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        dropout: float = 0.0,
        bias: bool = True,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("embed_dim", embed_dim),
            ("num_heads", num_heads),
            ("head_dim", head_dim),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"PrunedMultiheadAttention: {name} must be an int >= 1, got {value!r}"
                )
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.dropout, self.batch_first = float(dropout), bool(batch_first)
        inner = num_heads * head_dim
        factory = {"device": device, "dtype": dtype}
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim, **factory))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        # the class nn.MultiheadAttention's out_proj has, so that a rebuilt model is the same
        self.out_proj = NonDynamicallyQuantizableLinear(inner, embed_dim, bias=bias, **factory)
        nn.init.xavier_uniform_(self.in_proj_weight)

    @classmethod
    def keeping(cls, attention: nn.Module, kept: Tensor) -> PrunedMultiheadAttention:
        """The attention made of heads ``kept`` of ``attention`` (an ``nn.MultiheadAttention``
        with packed projections or a :class:`PrunedMultiheadAttention`).

        Its parameters are new tensors (the kept rows of ``in_proj_weight`` and
        ``in_proj_bias``, same dtype, device and ``requires_grad``); its ``out_proj`` *is*
        ``attention.out_proj`` (the same module, whose input columns the caller slices, as
        :func:`icprune.apply` does through the plan's ``out_proj`` input dependency).

        Args:
            attention: the attention to prune (not modified).
            kept: LongTensor[h] of kept head indices, sorted, in [0, heads).
        """
        heads = attention.num_heads
        dim = attention.head_dim
        rows = head_rows(heads, dim, kept).to(attention.in_proj_weight.device)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.embed_dim, new.num_heads, new.head_dim = attention.embed_dim, len(kept), dim
        new.dropout, new.batch_first = float(attention.dropout), bool(attention.batch_first)
        for attr in ("in_proj_weight", "in_proj_bias"):
            old = getattr(attention, attr)
            if old is None:
                new.register_parameter(attr, None)
            else:
                value = old.detach().index_select(0, rows).clone()
                setattr(new, attr, nn.Parameter(value, requires_grad=old.requires_grad))
        new.out_proj = attention.out_proj
        new.train(attention.training)
        return new

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"dropout={self.dropout}, batch_first={self.batch_first}"
        )

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Attention of ``query`` over ``key``/``value``, as ``nn.MultiheadAttention.forward``.

        Args:
            query: ``(N, L, E)`` (batch_first), ``(L, N, E)``, or unbatched ``(L, E)``.
            key, value: ``(N, S, E)``, ``(S, N, E)`` or ``(S, E)``, like ``query``.
            key_padding_mask: ``(N, S)`` or ``(S,)``; bool (True = ignore) or float (added).
            need_weights: also return the attention weights.
            attn_mask: ``(L, S)`` or ``(N * num_heads, L, S)`` (this module's ``num_heads``);
                bool (True = not allowed) or float (added).
            average_attn_weights: average the returned weights over the heads.
            is_causal: a hint that ``attn_mask`` is the causal mask (it must be given).

        Returns:
            ``(output, weights)``: output shaped like ``query``; weights ``(N, L, S)``
            (averaged) or ``(N, num_heads, L, S)`` (unbatched: without N), or None.

        Raises:
            RuntimeError: ``is_causal`` without ``attn_mask``.
        """
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "PrunedMultiheadAttention: is_causal=True needs attn_mask (the causal mask), "
                "as nn.MultiheadAttention"
            )
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        length, batch, _ = query.shape
        source = key.shape[0]
        heads, dim = self.num_heads, self.head_dim
        inner = heads * dim
        w, b = self.in_proj_weight, self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.split(inner)
        if query is key and key is value:
            q, k, v = F.linear(query, w, b).split(inner, dim=-1)
        else:
            wq, wk, wv = w.split(inner)
            q = F.linear(query, wq, bq)
            if key is value:
                k, v = F.linear(
                    key, torch.cat([wk, wv]), None if b is None else torch.cat([bk, bv])
                ).split(inner, dim=-1)
            else:
                k, v = F.linear(key, wk, bk), F.linear(value, wv, bv)
        # (L, N, h*d) -> (N, h, L, d)
        q = q.reshape(length, batch * heads, dim).transpose(0, 1).view(batch, heads, length, dim)
        k = k.reshape(source, batch * heads, dim).transpose(0, 1).view(batch, heads, source, dim)
        v = v.reshape(source, batch * heads, dim).transpose(0, 1).view(batch, heads, source, dim)
        mask = _additive_mask(attn_mask, key_padding_mask, batch, heads, length, source, q.dtype)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * math.sqrt(1.0 / dim)) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            weights = F.softmax(scores, dim=-1)
            attended = F.dropout(weights, p=dropout) if dropout > 0 else weights
            out = attended @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, mask, dropout)
        out = out.permute(2, 0, 1, 3).reshape(length * batch, inner)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias).view(length, batch, -1)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            out = out.squeeze(1)
            weights = weights.squeeze(0) if weights is not None else None
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def _additive_mask(
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    batch: int,
    heads: int,
    length: int,
    source: int,
    dtype: torch.dtype,
) -> Tensor | None:
    """``attn_mask`` and ``key_padding_mask`` merged into one float mask broadcastable to
    ``(N, h, L, S)`` (``-inf`` where a bool mask is True), or None."""
    merged = None
    if attn_mask is not None:
        mask = _as_float(attn_mask, dtype)
        if mask.dim() == 3:
            mask = mask.view(batch, heads, length, source)
        merged = mask
    if key_padding_mask is not None:
        pad = _as_float(key_padding_mask, dtype).view(batch, 1, 1, source)
        merged = pad if merged is None else merged + pad
    return merged


def _as_float(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            mask, float("-inf")
        )
    return mask.to(dtype)
