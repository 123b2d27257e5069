"""Self-attention computed from a frozen block's own weights.

open_clip's blocks call ``nn.MultiheadAttention`` with ``need_weights=False``, so attention can be
neither recorded nor changed from outside. The encoders project q/k/v from the block's weights and
hand them to an *attend* function: the fused kernel by default, or an explicit softmax that an
analysis probe can record and intervene in.

Every linear map of a block goes through `project` / `in_projection`, which add an optional
*weight delta*: a module mapping the frozen map's input to an addition to its output (LoRA's
``scale · x Aᵀ Bᵀ``). That is how a method changes a block's weights without touching them, and
why every path (fused, explicit, pruned, shared prefix, analysis) sees the same change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Mapping, Protocol, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Tower = Literal["text", "vision"]
TOWERS: tuple[Tower, ...] = get_args(Tower)
#: the ``branch`` option of the adapters and analyses that act on one tower or both
Branch = Literal["text", "vision", "both"]


def towers_of(branch: str) -> tuple[Tower, ...]:
    """The towers a ``branch`` option names; any other value is refused."""
    if branch == "both":
        return TOWERS
    if branch in TOWERS:
        return (branch,)  # type: ignore[return-value]
    raise ValueError(f"branch must be 'text', 'vision' or 'both', got {branch!r}")


#: the linear maps of a block a weight delta may wrap: the rows of the packed in-projection that make
#: q, k and v, the attention out-projection, and the MLP's ``c_fc`` and ``c_proj``
Projection = Literal["q", "k", "v", "out", "fc", "proj"]
PROJECTIONS: tuple[str, ...] = get_args(Projection)
QKV = "qkv"
#: one block's weight deltas by projection; each maps the frozen map's input (..., d_in) to an
#: addition to its output (..., d_out). Modules, so that their tensors are visible (`Injection`).
BlockDeltas = Mapping[str, nn.Module]
NO_DELTAS: BlockDeltas = {}


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


def with_delta(output: Tensor, x: Tensor, delta: nn.Module | None) -> Tensor:
    """``output`` of a frozen linear map of ``x``, plus what ``delta`` adds to it (if any)."""
    return output if delta is None else output + delta(x).to(output.dtype)


def project(x: Tensor, linear: nn.Linear, delta: nn.Module | None = None) -> Tensor:
    """A frozen ``nn.Linear`` (out-projection, MLP) applied to ``x``, with its weight delta."""
    return with_delta(F.linear(x, linear.weight, linear.bias), x, delta)


def in_projection(attn: nn.MultiheadAttention, x: Tensor, parts: str = QKV,
                  deltas: BlockDeltas = NO_DELTAS) -> tuple[Tensor, ...]:
    """``parts`` ("qkv", "q", "kv", "k", ...) of x's in-projection, each (N, L, width), with their deltas.

    The one q/k/v projection of the package: one matmul over the rows of the packed
    ``in_proj_weight`` that ``parts`` needs, then each part's delta added.
    """
    if parts not in (QKV[i:j] for i in range(3) for j in range(i + 1, 4)):
        raise ValueError(f"parts must be a contiguous run of 'qkv' (e.g. 'q', 'kv'), got {parts!r}")
    width = attn.embed_dim
    rows = slice(QKV.index(parts[0]) * width, (QKV.index(parts[-1]) + 1) * width)
    bias = attn.in_proj_bias[rows] if attn.in_proj_bias is not None else None
    packed = F.linear(x, attn.in_proj_weight[rows], bias)
    return tuple(with_delta(out, x, deltas.get(part)) for part, out in zip(parts, packed.split(width, dim=-1)))


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(N, L, width) → (N, heads, L, head_dim)."""
    n, length, width = x.shape
    return x.view(n, length, heads, width // heads).transpose(1, 2)


def project_qkv(attn: nn.MultiheadAttention, x: Tensor, deltas: BlockDeltas = NO_DELTAS) -> tuple[Tensor, ...]:
    """q, k, v of shape (N, heads, L, head_dim) from a MultiheadAttention's packed in-projection."""
    return tuple(split_heads(part, attn.num_heads) for part in in_projection(attn, x, QKV, deltas))


def merge_heads(out: Tensor) -> Tensor:
    """(N, heads, L, head_dim) → (N, L, width)."""
    n, heads, length, head_dim = out.shape
    return out.transpose(1, 2).reshape(n, length, heads * head_dim)
