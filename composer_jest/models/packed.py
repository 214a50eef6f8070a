"""Packed transformer calls: several groups of sequences through one call of an open_clip ``Transformer``.

A multi-group encode -- the length buckets of a batch of captions, the two resolutions of a multi-resolution
batch -- used to run the transformer once per group. Every op of a block except attention is per token (layer
norms, the QKV / output / MLP matmuls, layer scale), so the groups' tokens can be laid end to end,
``[1, P, w]`` with ``P = Σ_g n_g L_g``, and run through each of those ops **once**; only attention runs per
group, on a view of the packed QKV buffer, ``[n_g, L_g, 3, h, d]`` (scaled dot-product attention; causal for
text). Same FLOPs as one call per group, but one set of matmul kernel launches instead of one per group (and,
where FSDP wraps the blocks themselves, one parameter all-gather per block instead of one per group).

How the layout reaches attention without reaching past the block's own ``forward`` (FSDP's hooks live there):
each qualifying block's ``nn.MultiheadAttention`` becomes a :class:`SegmentedAttention` (same parameters and
state-dict keys), and the packed call passes a zero-element ``attn_mask`` as its marker -- open_clip's block
forwards it untouched -- while the group layout sits on the transformer's :class:`PackedLayout` (one per
transformer, shared by every wrapper of it). The layout is kept until the next packed call, so an
activation-checkpointed block recomputes with it in the backward. The one case this cannot tell apart: two packed
calls through the *same* transformer before one backward under *reentrant* checkpointing, both with the same total
length (non-reentrant checkpointing, the default of open_clip and of PyTorch, raises on a mismatch itself).

Example:
    >>> import open_clip, torch
    >>> clip = open_clip.create_model('jest-tiny')
    >>> packing = install(clip.visual.transformer)
    >>> width = clip.visual.transformer.width
    >>> tokens = [torch.randn(3, 5, width), torch.randn(2, 17, width)]  # two groups of sequences
    >>> out = run(clip.visual.transformer, packing, tokens, causal=False)
    >>> [tuple(o.shape[:2]) for o in out]
    [(3, 5), (2, 17)]
    >>> torch.allclose(out[1], clip.visual.transformer(tokens[1]), atol=1e-5)
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

__all__ = ['PackedLayout', 'SegmentedAttention', 'install', 'run']


class PackedLayout:
    """The group layout of a transformer's last packed call: ``groups`` = ``[(n_g, L_g)]``, ``causal``."""

    def __init__(self) -> None:
        self.groups: tuple[tuple[int, int], ...] = ()
        self.causal = False
        # the packed call's attn_mask: open_clip's block calls ``attn_mask.to(dtype)`` and passes it on
        self.marker = torch.empty(0)

    def positions(self) -> int:
        """``P = Σ_g n_g L_g``, the packed length."""
        return sum(n * length for n, length in self.groups)


class SegmentedAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` that, given the packed marker as ``attn_mask``, attends within each group only.

    Any other call is ``nn.MultiheadAttention.forward`` unchanged. Installed by :func:`install` (which checks
    the module is batch-first self-attention with one QKV projection, no extra key/value bias and no dropout).
    """

    layout: PackedLayout

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if attn_mask is None or attn_mask.numel() != 0:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        layout = self.layout
        packed = query[0]  # [P, w]
        if query.shape[0] != 1 or packed.shape[0] != layout.positions():
            raise RuntimeError(f'packed attention got {tuple(query.shape)} tokens for a layout of {layout.positions()} '
                               f'positions {layout.groups}: a packed call must go through '
                               'composer_jest.models.packed.run')
        width, heads = self.embed_dim, self.num_heads
        qkv = F.linear(packed, self.in_proj_weight, self.in_proj_bias)  # [P, 3w], one matmul for every group
        out = qkv.new_empty(packed.shape[0], width)
        start = 0
        for n, length in layout.groups:
            # group g's QKV as [3, n, heads, L, d]: a view of the packed buffer, no copy
            q, k, v = qkv[start:start + n * length].view(n, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=layout.causal)  # [n, heads, L, d]
            out[start:start + n * length].view(n, length, heads, width // heads).copy_(o.transpose(1, 2))
            start += n * length
        return F.linear(out, self.out_proj.weight, self.out_proj.bias)[None], None


def _qualifies(block: nn.Module) -> bool:
    attn = getattr(block, 'attn', None)
    # exact types: a subclass (a user's attention, an FSDP2-sharded module) keeps its own forward
    return (type(block) is ResidualAttentionBlock and not hasattr(block, 'ln_1_kv')
            and type(attn) in (nn.MultiheadAttention, SegmentedAttention) and attn.batch_first
            and attn._qkv_same_embed_dim
            and attn.bias_k is None and not attn.add_zero_attn and attn.dropout == 0)


def install(transformer: nn.Module) -> Optional[PackedLayout]:
    """Make an open_clip ``Transformer`` accept packed calls; its layout, or ``None`` if it does not qualify.

    It qualifies when it is batch-first and every block is open_clip's plain ``ResidualAttentionBlock``
    (``CustomResidualAttentionBlock``, cross-attention and timm towers run their usual per-group calls). The
    attention modules change class only: parameters, buffers and state-dict keys stay as they are. Installing
    twice (two wrappers of one model) returns the layout already installed.
    """
    blocks = getattr(transformer, 'resblocks', None)
    if not getattr(transformer, 'batch_first', False) or not blocks or not all(_qualifies(b) for b in blocks):
        return None
    installed = {id(getattr(b.attn, 'layout', None)) for b in blocks}
    if isinstance(blocks[0].attn, SegmentedAttention) and len(installed) == 1:
        return blocks[0].attn.layout
    layout = PackedLayout()
    for block in blocks:
        block.attn.__class__ = SegmentedAttention
        block.attn.layout = layout
    return layout


def run(transformer: nn.Module, layout: PackedLayout, groups: Sequence[torch.Tensor], causal: bool
        ) -> list[torch.Tensor]:
    """``[transformer(x_g) for x_g in groups]`` in one packed call (``x_g``: ``[n_g, L_g, w]``).

    ``causal``: each sequence attends to its own earlier positions only (open_clip's text mask); else to all of
    its own positions. Never across sequences or groups.
    """
    layout.groups = tuple((x.shape[0], x.shape[1]) for x in groups)
    layout.causal = causal
    packed = torch.cat([x.reshape(-1, x.shape[-1]) for x in groups])[None]  # [1, P, w]
    out = transformer(packed, attn_mask=layout.marker)[0]
    return [part.view(x.shape) for part, x in zip(out.split([x.shape[0] * x.shape[1] for x in groups]), groups)]
