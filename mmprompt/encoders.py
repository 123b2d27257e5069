"""The one seam every method goes through: both CLIP towers run layer by layer over open_clip's
frozen submodules, taking per-layer *injections* from an adapter.

Layer 0 of the text tower puts learnable context at positions ``1..n`` (right after SOS); layer 0 of
the vision tower appends prompt tokens after the patches (after the positional embedding, before
``ln_pre``). A deep prompt for layer ``j >= 1`` replaces those slots before block ``j``; layers
without one keep whatever the slots hold. A bias for layer ``j`` is added to every token's update
after the attention and/or the MLP of block ``j``. No CLIP code is copied or patched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import Tensor, nn

from .attention import AttendFn, AttentionSite, Tower, fused_attention, merge_heads, project_qkv


@dataclass
class Injection:
    """What an adapter hands one tower, keyed by layer index.

    ``prompts[0]`` is the layer-0 prompt, (n, d) shared or (G, n, d) per group (CoCoOp's
    per-image context); ``prompts[j]`` (n, d) replaces the prompt slots before block ``j``.
    ``attn_bias[j]`` / ``mlp_bias[j]`` (d,) are added to every token's update in block ``j``.
    """

    prompts: dict[int, Tensor] = field(default_factory=dict)
    attn_bias: dict[int, Tensor] = field(default_factory=dict)
    mlp_bias: dict[int, Tensor] = field(default_factory=dict)

    def tensors(self) -> Iterator[Tensor]:
        for table in (self.prompts, self.attn_bias, self.mlp_bias):
            yield from table.values()

    @property
    def requires_grad(self) -> bool:
        """True when the injection depends on trainable tensors (its features must be recomputed)."""
        return any(t.requires_grad for t in self.tensors())

    @property
    def num_prompts(self) -> int:
        return self.prompts[0].shape[-2] if 0 in self.prompts else 0

    def check(self, tower: Tower, depth: int) -> None:
        """Reject injections the runner would silently misapply."""
        if self.prompts and 0 not in self.prompts:
            raise ValueError(f"{tower} injection has deep prompts at layers {sorted(self.prompts)} but none at layer 0")
        for table_name, table in (("prompts", self.prompts), ("attn_bias", self.attn_bias), ("mlp_bias", self.mlp_bias)):
            bad = [j for j in table if not 0 <= j < depth]
            if bad:
                raise ValueError(f"{tower} {table_name} at layers {bad}, but the {tower} tower has layers 0..{depth - 1}")
        sizes = {p.shape[-2] for p in self.prompts.values()}
        if len(sizes) > 1:
            raise ValueError(f"{tower} prompts have different token counts per layer: {sorted(sizes)}")


NO_INJECTION = Injection()


def check_supported_blocks(blocks: nn.ModuleList, tower: Tower) -> None:
    """The runner computes attention from packed in-projection weights; refuse other block types."""
    for index, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        if (
            not isinstance(block, ResidualAttentionBlock)
            or not isinstance(attn, nn.MultiheadAttention)
            or not attn._qkv_same_embed_dim
            or not attn.batch_first
            or hasattr(block, "ln_1_kv")
        ):
            raise NotImplementedError(
                f"{tower} block {index} is a {type(block).__name__} with {type(attn).__name__}; mmprompt supports "
                "open_clip ResidualAttentionBlocks with a batch-first nn.MultiheadAttention (open_clip<3.4 ViTs)"
            )


KeysValues = tuple[Tensor, Tensor]  # per-head keys and values (N or 1, heads, P, head_dim)


def run_block(
    block: ResidualAttentionBlock,
    x: Tensor,
    attn_mask: Tensor | None,
    attend: AttendFn,
    site: AttentionSite,
    attn_bias: Tensor | None = None,
    mlp_bias: Tensor | None = None,
    query_rows: Tensor | None = None,
    prefix: KeysValues | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """open_clip's block forward with attention done by ``attend`` and optional additive biases;
    returns the new hidden states and the keys and values of ``x``'s own tokens.

    ``query_rows`` (N,) keeps one row per sequence (the pooled token): keys and values still come
    from the whole sequence, but only that row is updated, and (N, 1, width) is returned. Exact for
    the last block, whose other rows are never read. ``prefix`` holds keys and values of tokens that precede ``x`` (a prompt prefix shared by every
    class): they are attended to but not recomputed; ``attn_mask`` then spans prefix + ``x``.
    """
    attn = block.attn
    n, length, width = x.shape
    heads = attn.num_heads
    weight, bias = attn.in_proj_weight, attn.in_proj_bias
    h = block.ln_1(x)
    if query_rows is not None:  # q, out-projection and MLP for one row per sequence
        batch = torch.arange(n, device=x.device)
        x, h_query = x[batch, query_rows].unsqueeze(1), h[batch, query_rows].unsqueeze(1)
        q = F.linear(h_query, weight[:width], bias[:width] if bias is not None else None)
        q = q.view(n, 1, heads, width // heads).transpose(1, 2)
        kv = F.linear(h, weight[width:], bias[width:] if bias is not None else None)
        k, v = kv.view(n, length, 2, heads, width // heads).permute(2, 0, 3, 1, 4)
        if attn_mask is not None:
            attn_mask = attn_mask[query_rows].view(n, 1, 1, attn_mask.shape[-1])
    else:
        q, k, v = project_qkv(attn, h)
    keys, values = k, v
    if prefix is not None:
        keys = torch.cat([prefix[0].expand(n, -1, -1, -1), k], dim=2)
        values = torch.cat([prefix[1].expand(n, -1, -1, -1), v], dim=2)
    out = F.linear(merge_heads(attend(q, keys, values, attn_mask, site)), attn.out_proj.weight, attn.out_proj.bias)
    return _finish_block(block, x, out, attn_bias, mlp_bias), k, v


def _finish_block(block: ResidualAttentionBlock, x: Tensor, out: Tensor, attn_bias: Tensor | None,
                  mlp_bias: Tensor | None) -> Tensor:
    """Residual updates after the attention output ``out``: layer scale, biases, MLP."""
    update = block.ls_1(out)
    if attn_bias is not None:
        update = update + attn_bias
    x = x + update
    update = block.ls_2(block.mlp(block.ln_2(x)))
    if mlp_bias is not None:
        update = update + mlp_bias
    return x + update


def _replace_slots(x: Tensor, prompt: Tensor, start: int) -> Tensor:
    """Put ``prompt`` (n, d) into positions ``start..start+n-1`` of every sequence, out of place."""
    n = prompt.shape[-2]
    prompt = prompt.to(x.dtype).expand(x.shape[0], n, x.shape[-1])
    return torch.cat([x[:, :start], prompt, x[:, start + n:]], dim=1)


def _run_blocks(
    blocks: nn.ModuleList,
    x: Tensor,
    attn_mask: Tensor | None,
    injection: Injection,
    attend: AttendFn,
    make_site,
    prompt_start: int,
    last_rows: Tensor | None = None,
) -> Tensor:
    """All blocks; with ``last_rows`` the last block updates only those rows (see `run_block`)."""
    last = len(blocks) - 1
    for index, block in enumerate(blocks):
        if index > 0 and index in injection.prompts:
            x = _replace_slots(x, injection.prompts[index], prompt_start)
        x = run_block(
            block, x, attn_mask, attend, make_site(index),
            injection.attn_bias.get(index), injection.mlp_bias.get(index),
            query_rows=last_rows if index == last else None,
        )[0]
    return x


# ----------------------------------------------------------------------------- vision


def image_tokens(visual: nn.Module, images: Tensor) -> Tensor:
    """[cls, patches] with positional embeddings, as open_clip's ``_embeds`` before ``ln_pre``."""
    x = visual.conv1(images.to(visual.conv1.weight.dtype))
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    return torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)


def pool_image(visual: nn.Module, x: Tensor, num_patches: int) -> Tensor:
    """open_clip's pooling and projection; average pooling covers the patches, never the prompts."""
    if visual.attn_pool is not None:
        raise NotImplementedError("vision towers with an attentional pooler are not supported")
    if visual.pool_type == "tok":
        pool = lambda t: t[:, 0]  # noqa: E731
    elif visual.pool_type == "avg":
        pool = lambda t: t[:, 1:1 + num_patches].mean(dim=1)  # noqa: E731
    else:
        raise NotImplementedError(f"vision pool_type {visual.pool_type!r} is not supported")
    pooled = visual.ln_post(pool(x)) if visual.final_ln_after_pool else pool(visual.ln_post(x))
    return pooled @ visual.proj if visual.proj is not None else pooled


def encode_image(
    clip: nn.Module,
    images: Tensor,
    injection: Injection = NO_INJECTION,
    attend: AttendFn = fused_attention,
    pooled_only: bool = False,
) -> Tensor:
    """Image features (N, embed_dim), unnormalised, with ``injection`` applied.

    ``pooled_only`` runs the last block for the [cls] row only (exact with token pooling; ignored
    with average pooling); leave it off when ``attend`` must see every row of the last layer.
    """
    visual = clip.visual
    blocks = visual.transformer.resblocks
    injection.check("vision", len(blocks))
    x = image_tokens(visual, images)
    num_patches = x.shape[1] - 1
    n = injection.num_prompts
    if n:
        x = torch.cat([x, injection.prompts[0].to(x.dtype).expand(x.shape[0], n, -1)], dim=1)
    x = visual.ln_pre(x)
    prompt_positions = tuple(range(1 + num_patches, 1 + num_patches + n))

    def make_site(layer: int) -> AttentionSite:
        return AttentionSite("vision", layer, x.shape[1], prompt_positions, num_patches=num_patches)

    last_rows = None
    if pooled_only and visual.pool_type == "tok":
        last_rows = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    x = _run_blocks(blocks, x, None, injection, attend, make_site, 1 + num_patches, last_rows)
    return pool_image(visual, x, num_patches)


# ----------------------------------------------------------------------------- text


@dataclass
class TokenizedPrompts:
    """Class prompts tokenized once, cut after the longest EOT, with frozen token embeddings.

    The causal mask means the EOT feature depends only on tokens up to EOT, so dropping the
    padding after the longest prompt is exact and saves most of the text tower's work.
    """

    token_ids: Tensor  # (C, L) long
    embeddings: Tensor  # (C, L, width), frozen
    eot_positions: Tensor  # (C,) long

    def __len__(self) -> int:
        return self.token_ids.shape[0]

    def chunk(self, start: int, stop: int) -> "TokenizedPrompts":
        ids = self.token_ids[start:stop]
        eot = self.eot_positions[start:stop]
        length = int(eot.max()) + 1
        return TokenizedPrompts(ids[:, :length], self.embeddings[start:stop, :length], eot)

    def select(self, index: Tensor) -> "TokenizedPrompts":
        """The prompts at ``index``, cut after their own longest EOT."""
        eot = self.eot_positions[index]
        length = int(eot.max()) + 1
        return TokenizedPrompts(self.token_ids[index, :length], self.embeddings[index, :length], eot)


def length_buckets(eot_positions: Tensor, chunk_size: int | None = None, min_size: int = 16) -> list[Tensor]:
    """Prompt indices grouped by length (sorted by EOT), so each group runs with little padding.

    A bucket closes once it holds ``min_size`` prompts and the length changes (few small passes),
    or when it reaches ``chunk_size`` (bounded memory). Every index appears exactly once.
    """
    order = torch.argsort(eot_positions.cpu(), stable=True)
    lengths = eot_positions.cpu()[order].tolist()
    limit = chunk_size or len(lengths)
    buckets, start = [], 0
    for position in range(1, len(lengths) + 1):
        size = position - start
        if position == len(lengths) or size >= limit or (size >= min_size and lengths[position] != lengths[position - 1]):
            buckets.append(order[start:position].to(eot_positions.device))
            start = position
    return buckets


@torch.no_grad()
def tokenize_prompts(clip: nn.Module, tokenizer, texts: list[str], truncate: bool = True) -> TokenizedPrompts:
    """Tokenize and embed ``texts`` with the frozen token embedding (EOT is the largest token id)."""
    token_ids = tokenizer(texts).to(clip.token_embedding.weight.device)
    eot = token_ids.argmax(dim=-1)
    if truncate:
        token_ids = token_ids[:, : int(eot.max()) + 1]
    return TokenizedPrompts(token_ids, clip.token_embedding(token_ids), eot)


def shared_prefix_length(token_ids: Tensor, eot_positions: Tensor) -> int:
    """How many leading tokens every prompt has in common (SOS, context, "of a"), before any EOT."""
    differs = (token_ids != token_ids[:1]).any(dim=0).nonzero()
    common = int(differs[0]) if len(differs) else token_ids.shape[1]
    return min(common, int(eot_positions.min()))


def _run_blocks_shared_prefix(
    blocks: nn.ModuleList,
    x: Tensor,
    attn_mask: Tensor,
    injection: Injection,
    attend: AttendFn,
    make_site,
    prefix_length: int,
    last_rows: Tensor | None,
) -> Tensor:
    """All blocks with the first ``prefix_length`` tokens run once instead of once per class.

    Under the causal mask those tokens see only each other, and they (prompt slots included) are
    the same for every class, so one pass gives every class's prefix; the per-class rest attends to
    its keys and values. Returns the hidden states of the rest (or of ``last_rows`` in the last block).
    """
    prefix, x = x[:1, :prefix_length], x[:, prefix_length:]
    prefix_mask, rest_mask = attn_mask[:prefix_length, :prefix_length], attn_mask[prefix_length:]
    last = len(blocks) - 1
    for index, block in enumerate(blocks):
        if index > 0 and index in injection.prompts:
            prefix = _replace_slots(prefix, injection.prompts[index], start=1)
        biases = injection.attn_bias.get(index), injection.mlp_bias.get(index)
        site = make_site(index)
        prefix, keys, values = run_block(block, prefix, prefix_mask, attend, site, *biases)
        rows = last_rows - prefix_length if index == last and last_rows is not None else None
        x = run_block(block, x, rest_mask, attend, site, *biases, query_rows=rows, prefix=(keys, values))[0]
    return x


def _encode_text_chunk(clip: nn.Module, prompts: TokenizedPrompts, injection: Injection, attend: AttendFn,
                       pooled_only: bool = False, share_prefix: bool = False) -> Tensor:
    cast_dtype = clip.transformer.get_cast_dtype()
    x = prompts.embeddings.to(cast_dtype)
    num_classes, length, width = x.shape
    n = injection.num_prompts
    eot = prompts.eot_positions
    groups = 1
    if n:
        if n >= int(eot.min()):
            raise ValueError(f"text prompts of {n} tokens do not fit before EOT at position {int(eot.min())}")
        context = injection.prompts[0].to(cast_dtype)
        if context.dim() == 3:  # one context per group (e.g. per image): every class once per group
            groups = context.shape[0]
            x = x.unsqueeze(0).expand(groups, -1, -1, -1)
            context = context.unsqueeze(1).expand(groups, num_classes, n, width)
            x = torch.cat([x[:, :, :1], context, x[:, :, 1 + n:]], dim=2).reshape(groups * num_classes, length, width)
            eot = eot.repeat(groups)
        else:
            x = _replace_slots(x, context, start=1)
    x = x + clip.positional_embedding[:length].to(cast_dtype)
    attn_mask = clip.attn_mask[:length, :length] if clip.attn_mask is not None else None
    prompt_positions = tuple(range(1, 1 + n))

    def make_site(layer: int) -> AttentionSite:
        return AttentionSite("text", layer, length, prompt_positions, eot_positions=eot)

    blocks = clip.transformer.resblocks
    last_rows = eot if pooled_only else None
    prefix_length = shared_prefix_length(prompts.token_ids, eot) if share_prefix and groups == 1 else 0
    if attn_mask is not None and num_classes > 1 and prefix_length > max(n, 1):
        x = _run_blocks_shared_prefix(blocks, x, attn_mask, injection, attend, make_site, prefix_length, last_rows)
    else:
        prefix_length = 0
        x = _run_blocks(blocks, x, attn_mask, injection, attend, make_site, 1, last_rows)
    x = clip.ln_final(x)
    pooled = x[:, 0] if pooled_only else x[torch.arange(x.shape[0], device=x.device), eot - prefix_length]
    if isinstance(clip.text_projection, nn.Linear):
        pooled = clip.text_projection(pooled)
    elif clip.text_projection is not None:
        pooled = pooled @ clip.text_projection
    return pooled.reshape(groups, num_classes, -1) if groups > 1 else pooled


def encode_text(
    clip: nn.Module,
    prompts: TokenizedPrompts,
    injection: Injection = NO_INJECTION,
    attend: AttendFn = fused_attention,
    chunk_size: int | None = None,
    bucket_by_length: bool = False,
    pooled_only: bool = False,
    share_prefix: bool = False,
) -> Tensor:
    """Text features (C, embed_dim), or (G, C, embed_dim) for per-group context; unnormalised.

    ``chunk_size`` bounds memory by encoding that many classes per pass (each chunk is cut to its
    own longest prompt); the result equals the single pass. ``bucket_by_length`` groups prompts
    of similar length (`length_buckets`) so short class names don't pay for the longest one;
    ``pooled_only`` runs the last block for the EOT rows only; ``share_prefix`` runs the tokens
    every prompt shares (SOS, context, "of a") once for all classes. All are exact; leave them off
    when ``attend`` records or changes attention and expects the plain call pattern.
    """
    injection.check("text", len(clip.transformer.resblocks))
    if bucket_by_length:
        buckets = length_buckets(prompts.eot_positions, chunk_size)
        parts = [_encode_text_chunk(clip, prompts.select(index), injection, attend, pooled_only, share_prefix) for index in buckets]
        restore = torch.argsort(torch.cat(buckets))
        return torch.cat(parts, dim=-2).index_select(-2, restore)
    if not chunk_size or chunk_size >= len(prompts):
        return _encode_text_chunk(clip, prompts, injection, attend, pooled_only, share_prefix)
    parts = [
        _encode_text_chunk(clip, prompts.chunk(start, start + chunk_size), injection, attend, pooled_only,
                           share_prefix)
        for start in range(0, len(prompts), chunk_size)
    ]
    return torch.cat(parts, dim=-2)
