"""Multi-head and Swin window attention with fewer heads than their embedding dimension allows.

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

:class:`PrunedWindowAttention` is the same for Swin's shifted-window attention (torchvision's
``ShiftedWindowAttention`` and ``ShiftedWindowAttentionV2``, whose function takes ``head_dim``
to be ``C // num_heads``).
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
                _take(new, attr, old, 0, rows)
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
        context, weights, (length, batch, batched) = multihead_context(
            self, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal=is_causal
        )
        out = F.linear(context, self.out_proj.weight, self.out_proj.bias).view(length, batch, -1)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            out = out.squeeze(1)
            weights = weights.squeeze(0) if weights is not None else None
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def multihead_context(
    attention: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor | None, tuple[int, int, bool]]:
    """What a multi-head attention's ``out_proj`` reads: every head's attention output.

    Args:
        attention: an ``nn.MultiheadAttention`` with packed projections or a
            :class:`PrunedMultiheadAttention` (its ``in_proj_weight``, ``in_proj_bias``,
            ``num_heads``, ``head_dim``, ``batch_first``, ``dropout`` and ``training`` are read).
        query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
            is_causal: the arguments of its forward (``average_attn_weights`` plays no part).

    Returns:
        ``(context, weights, (L, N, batched))``: context Tensor[L * N, h * d] (rows in
        ``(L, N)`` order, head i's features at ``i*d ... (i+1)*d - 1``); the weights
        ``(N, h, L, S)`` before averaging, or None unless ``need_weights``.

    Raises:
        RuntimeError: ``is_causal`` without ``attn_mask``.
    """
    if is_causal and attn_mask is None:
        raise RuntimeError(
            f"{type(attention).__name__}: is_causal=True needs attn_mask (the causal mask), "
            f"as nn.MultiheadAttention"
        )
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif attention.batch_first:
        same = query is key, key is value
        query = query.transpose(0, 1)
        key = query if same[0] else key.transpose(0, 1)
        value = key if same[1] else value.transpose(0, 1)
    length, batch, _ = query.shape
    source = key.shape[0]
    heads, dim = attention.num_heads, attention.head_dim
    inner = heads * dim
    w, b = attention.in_proj_weight, attention.in_proj_bias
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
    dropout = attention.dropout if attention.training else 0.0
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
    return out.permute(2, 0, 1, 3).reshape(length * batch, inner), weights, (length, batch, batched)


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


class PrunedWindowAttention(nn.Module):
    """Shifted-window attention (torchvision's ``ShiftedWindowAttention`` and, with
    ``cosine=True``, ``ShiftedWindowAttentionV2``, Swin's attention over ``(B, H, W, C)``
    channels-last maps) with ``num_heads * head_dim`` independent of the map's C channels.

    It computes what torchvision's modules compute - the map padded to whole windows, shifted
    cyclically by ``shift_size`` (unless a window covers the padded map), each window's tokens
    attending to each other with a relative position bias per head (V1: a learned table; V2:
    ``16 * sigmoid(cpb_mlp(relative_coords_table))``, and cosine attention scaled by
    ``exp(min(logit_scale, log 100))`` with the key bias zeroed), shifted windows masked
    (``-100``) between regions that were not adjacent, projected back by ``proj`` - with the
    same state_dict keys. torchvision is not imported: icprune recognises its modules by class
    (:func:`icprune.structure.layers.is_attention`).

    Args:
        dim: C, the channels of the map read and written.
        window_size, shift_size: ``[wh, ww]`` and ``[sh, sw]``.
        num_heads: h, the heads kept (>= 1); head_dim: d, features per head.
        qkv_bias, proj_bias: the projections have biases.
        attention_dropout, dropout: dropout on the attention weights and on the output
            (training only).
        cosine: V2's cosine attention and continuous position bias.

    Parameters: ``qkv`` ``Linear(C, 3*h*d)``, ``proj`` ``Linear(h*d, C)``; V1
    ``relative_position_bias_table`` ``((2wh-1)*(2ww-1), h)``; V2 ``logit_scale`` ``(h, 1, 1)``
    and ``cpb_mlp`` (``Linear(2, 512)``, ReLU, ``Linear(512, h, bias=False)``). Buffers:
    ``relative_position_index`` ``(wh*ww*wh*ww,)`` and (V2) ``relative_coords_table``
    ``(1, 2wh-1, 2ww-1, 2)``.
    """

    def __init__(
        self,
        dim: int,
        window_size: list[int],
        shift_size: list[int],
        num_heads: int,
        head_dim: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        attention_dropout: float = 0.0,
        dropout: float = 0.0,
        cosine: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("num_heads", num_heads), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"PrunedWindowAttention: {name} must be an int >= 1, got {value!r}"
                )
        if len(window_size) != 2 or len(shift_size) != 2:
            raise ValueError(
                "PrunedWindowAttention: window_size and shift_size must be of length 2"
            )
        self.window_size, self.shift_size = list(window_size), list(shift_size)
        self.num_heads, self.head_dim, self.cosine = num_heads, head_dim, bool(cosine)
        self.attention_dropout, self.dropout = attention_dropout, dropout
        wh, ww = self.window_size
        inner = num_heads * head_dim
        if cosine:
            self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
            self.register_buffer("relative_coords_table", _relative_coords_table(wh, ww))
        else:
            table = torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads)
            self.relative_position_bias_table = nn.Parameter(nn.init.trunc_normal_(table, std=0.02))
        self.register_buffer("relative_position_index", _relative_position_index(wh, ww))
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim, bias=proj_bias)
        if cosine:
            self.cpb_mlp = nn.Sequential(
                nn.Linear(2, 512), nn.ReLU(inplace=True), nn.Linear(512, num_heads, bias=False)
            )

    @classmethod
    def keeping(cls, attention: nn.Module, kept: Tensor) -> PrunedWindowAttention:
        """The window attention made of heads ``kept`` of ``attention`` (torchvision's
        ``ShiftedWindowAttention(V2)`` or a :class:`PrunedWindowAttention`): new ``qkv`` rows
        (:func:`head_rows`), position bias table columns (V1) or ``cpb_mlp`` output rows and
        ``logit_scale`` entries (V2) of the kept heads; its ``proj`` *is* ``attention.proj``
        (the caller slices its input columns, as :func:`icprune.apply` does through the plan).
        ``attention`` is not modified."""
        heads, qkv = attention.num_heads, attention.qkv
        dim = qkv.out_features // (3 * heads)
        cosine = hasattr(attention, "logit_scale")
        new = cls(
            qkv.in_features, attention.window_size, attention.shift_size, len(kept), dim,
            qkv_bias=qkv.bias is not None, proj_bias=attention.proj.bias is not None,
            attention_dropout=attention.attention_dropout, dropout=attention.dropout,
            cosine=cosine,
        )  # fmt: skip
        new = new.to(device=qkv.weight.device, dtype=qkv.weight.dtype)
        kept = kept.to(torch.int64).cpu()
        rows = head_rows(heads, dim, kept).to(qkv.weight.device)
        heads_at = kept.to(qkv.weight.device)
        with torch.no_grad():
            _copy_rows(new.qkv, qkv, rows)
            new.relative_position_index.copy_(attention.relative_position_index)
            if cosine:
                new.relative_coords_table.copy_(attention.relative_coords_table)
                _take(new, "logit_scale", attention.logit_scale, 0, heads_at)
                new.cpb_mlp[0] = attention.cpb_mlp[0]
                _copy_rows(new.cpb_mlp[2], attention.cpb_mlp[2], heads_at)
            else:
                table = attention.relative_position_bias_table
                _take(new, "relative_position_bias_table", table, 1, heads_at)
        new.proj = attention.proj
        new.train(attention.training)
        return new

    def extra_repr(self) -> str:
        return (
            f"window_size={self.window_size}, shift_size={self.shift_size}, "
            f"num_heads={self.num_heads}, head_dim={self.head_dim}, cosine={self.cosine}"
        )

    def get_relative_position_bias(self) -> Tensor:
        """Tensor ``(1, h, wh*ww, wh*ww)``: each head's bias between the tokens of a window
        (torchvision's method of the same name)."""
        n = self.window_size[0] * self.window_size[1]
        if self.cosine:
            table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        else:
            table = self.relative_position_bias_table
        bias = table[self.relative_position_index].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        return 16 * torch.sigmoid(bias) if self.cosine else bias

    def forward(self, x: Tensor) -> Tensor:
        """Window attention of ``x`` ``(B, H, W, C)``; returns ``(B, H, W, C)``."""
        batch, height, width, channels = x.shape
        context, (full_h, full_w, sh, sw) = window_context(self, x)
        out = F.linear(context, self.proj.weight, self.proj.bias)
        out = F.dropout(out, p=self.dropout, training=self.training)
        wh, ww = self.window_size
        out = out.view(batch, full_h // wh, full_w // ww, wh, ww, channels)
        out = out.permute(0, 1, 3, 2, 4, 5).reshape(batch, full_h, full_w, channels)
        if sh or sw:
            out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
        return out[:, :height, :width, :].contiguous()


def window_context(attention: nn.Module, x: Tensor) -> tuple[Tensor, tuple[int, int, int, int]]:
    """What a window attention's ``proj`` reads: every head's attention output in every window.

    Args:
        attention: torchvision's ``ShiftedWindowAttention(V2)`` or a
            :class:`PrunedWindowAttention` (its ``qkv``, ``num_heads``, ``window_size``,
            ``shift_size``, ``get_relative_position_bias()``, ``attention_dropout``, V2's
            ``logit_scale`` and ``training`` are read).
        x: its input ``(B, H, W, C)``.

    Returns:
        ``(context, (H', W', sh, sw))``: context Tensor[B * windows, wh*ww, h*d] (windows of
        the padded, shifted map in row-major order; head i's features at ``i*d ...
        (i+1)*d - 1``), the padded map's size and the shift used.
    """
    batch, height, width, channels = x.shape
    wh, ww = attention.window_size
    pad_h, pad_w = -height % wh, -width % ww
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    full_h, full_w = height + pad_h, width + pad_w
    sh = 0 if wh >= full_h else attention.shift_size[0]
    sw = 0 if ww >= full_w else attention.shift_size[1]
    if sh or sw:
        x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
    windows = (full_h // wh) * (full_w // ww)
    n = wh * ww
    tokens = _windows(x, wh, ww).reshape(batch * windows, n, channels)
    heads = attention.num_heads
    dim = attention.qkv.out_features // (3 * heads)
    cosine = getattr(attention, "logit_scale", None) is not None
    bias = attention.qkv.bias
    if cosine and bias is not None:  # V2 has no key bias
        inner = heads * dim
        bias = torch.cat(
            [bias[:inner], torch.zeros_like(bias[inner : 2 * inner]), bias[2 * inner :]]
        )
    qkv = F.linear(tokens, attention.qkv.weight, bias)
    qkv = qkv.reshape(batch * windows, n, 3, heads, dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if cosine:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(attention.logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * dim**-0.5) @ k.transpose(-2, -1)
    attn = attn + attention.get_relative_position_bias()
    if sh or sw:
        mask = _shift_mask(full_h, full_w, wh, ww, sh, sw, x.device, attn.dtype)
        attn = attn.view(batch, windows, heads, n, n) + mask[None, :, None]
        attn = attn.view(-1, heads, n, n)
    attn = F.softmax(attn, dim=-1)
    attn = F.dropout(attn, p=attention.attention_dropout, training=attention.training)
    context = (attn @ v).transpose(1, 2).reshape(batch * windows, n, heads * dim)
    return context, (full_h, full_w, sh, sw)


def _windows(x: Tensor, wh: int, ww: int) -> Tensor:
    """``(B, H, W, C)`` -> ``(B, H/wh * W/ww, wh*ww, C)``, windows in row-major order."""
    batch, height, width, channels = x.shape
    x = x.view(batch, height // wh, wh, width // ww, ww, channels).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, -1, wh * ww, channels)


def _shift_mask(
    height: int, width: int, wh: int, ww: int, sh: int, sw: int, device, dtype
) -> Tensor:
    """``(windows, n, n)``: -100 between tokens of a shifted window that come from different
    regions of the unshifted map (three bands per axis: ``[0, H-wh)``, ``[H-wh, H-sh)``,
    ``[H-sh, H)``), else 0."""
    rows = torch.zeros(height, dtype=torch.int64, device=device)
    rows[height - wh :] += 1
    rows[height - sh :] += 1
    cols = torch.zeros(width, dtype=torch.int64, device=device)
    cols[width - ww :] += 1
    cols[width - sw :] += 1
    region = (rows[:, None] * 3 + cols[None, :])[None, :, :, None]
    region = _windows(region, wh, ww)[0, :, :, 0]  # windows, n
    differ = region[:, None, :] != region[:, :, None]
    return torch.zeros(differ.shape, dtype=dtype, device=device).masked_fill_(differ, -100.0)


def _relative_position_index(wh: int, ww: int) -> Tensor:
    """LongTensor ``(wh*ww*wh*ww,)``: the bias table row of every token pair of a window."""
    rows = torch.arange(wh).repeat_interleave(ww)
    cols = torch.arange(ww).repeat(wh)
    dr = rows[:, None] - rows[None, :] + wh - 1
    dc = cols[:, None] - cols[None, :] + ww - 1
    return (dr * (2 * ww - 1) + dc).flatten()


def _relative_coords_table(wh: int, ww: int) -> Tensor:
    """``(1, 2wh-1, 2ww-1, 2)``: V2's log-spaced relative coordinates in [-1, 1]."""
    dh = torch.arange(-(wh - 1), wh, dtype=torch.float32) / max(wh - 1, 1) * 8
    dw = torch.arange(-(ww - 1), ww, dtype=torch.float32) / max(ww - 1, 1) * 8
    table = torch.stack(torch.meshgrid(dh, dw, indexing="ij"), dim=-1).unsqueeze(0)
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / 3.0


def _copy_rows(new: nn.Linear, old: nn.Linear, rows: Tensor) -> None:
    """Give ``new`` the rows ``rows`` of ``old``'s weight and bias (same requires_grad)."""
    _take(new, "weight", old.weight, 0, rows)
    if old.bias is not None:
        _take(new, "bias", old.bias, 0, rows)
    new.out_features = len(rows)


def _take(module: nn.Module, name: str, old: Tensor, axis: int, kept: Tensor) -> None:
    """Set parameter ``name`` of ``module`` to ``old``'s entries ``kept`` along ``axis``."""
    value = old.detach().index_select(axis, kept).clone()
    setattr(module, name, nn.Parameter(value, requires_grad=old.requires_grad))
