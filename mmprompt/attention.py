"""Self-attention computed from a frozen block's own weights.

open_clip's blocks call ``nn.MultiheadAttention`` with ``need_weights=False``, so attention can be
neither recorded nor changed from outside. The encoders project q/k/v from the block's weights and
hand them to an *attend* function: the fused kernel by default, or an explicit softmax that an
analysis probe can record and intervene in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Tower = Literal["text", "vision"]


@dataclass(frozen=True)
class AttentionSite:
    """Where an attention call happens and which tokens are which.

    ``prompt_positions`` index the learnable prompt tokens in the sequence (empty for none);
    vision sequences are ``[cls, patches..., prompts...]``; for text ``eot_positions`` holds the
    pooled token of every sequence in the batch.
    """

    tower: Tower
    layer: int
    seq_len: int
    prompt_positions: tuple[int, ...] = ()
    num_patches: int = 0
    eot_positions: Tensor | None = None

    @property
    def prompt_mask(self) -> Tensor:
        """(L,) bool: True at prompt-token positions."""
        mask = torch.zeros(self.seq_len, dtype=torch.bool)
        mask[list(self.prompt_positions)] = True
        return mask


class AttendFn(Protocol):
    """Maps per-head q, k, v of shape (N, heads, L, head_dim) to the per-head output."""

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, site: AttentionSite) -> Tensor: ...


def fused_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, site: AttentionSite) -> Tensor:
    """The fast path: PyTorch's fused scaled-dot-product attention."""
    if attn_mask is not None:
        attn_mask = attn_mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def attention_scores(q: Tensor, k: Tensor, attn_mask: Tensor | None) -> Tensor:
    """Scaled dot-product scores (N, heads, L, L), the additive mask applied."""
    scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)
    if attn_mask is not None:
        scores = scores + attn_mask.to(scores.dtype)
    return scores


def softmax_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, site: AttentionSite) -> Tensor:
    """The explicit path: the softmax written out, numerically equal to `fused_attention`."""
    return attention_scores(q, k, attn_mask).softmax(dim=-1) @ v


def project_qkv(attn: nn.MultiheadAttention, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v of shape (N, heads, L, head_dim) from a MultiheadAttention's packed in-projection."""
    n, length, width = x.shape
    heads = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    qkv = qkv.view(n, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def merge_heads(out: Tensor) -> Tensor:
    """(N, heads, L, head_dim) → (N, L, width)."""
    n, heads, length, head_dim = out.shape
    return out.transpose(1, 2).reshape(n, length, heads * head_dim)
