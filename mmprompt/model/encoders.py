"""The one seam every method goes through: both CLIP towers run layer by layer over open_clip's
frozen submodules, taking per-layer *injections* from an adapter.

Layer 0 of the text tower puts learnable context at positions ``1..n`` (right after SOS); layer 0 of
the vision tower appends prompt tokens after the patches (after the positional embedding, before
``ln_pre``). A deep prompt for layer ``j >= 1`` replaces those slots before block ``j``; layers
without one keep whatever the slots hold. A bias for layer ``j`` is added to every token's update
after the attention and/or the MLP of block ``j``. A weight delta for layer ``j`` wraps one of block
``j``'s linear maps (q, k, v, out, fc, proj: `mmprompt.model.attention.Projection`): the frozen map's
output plus the delta's output for the same input, as PEFT wraps a layer. No CLIP code is copied
or patched.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Iterator, Literal, Mapping

import torch
from open_clip.transformer import ResidualAttentionBlock
from torch import Tensor, nn

from .attention import (
    NO_DELTAS, PROJECTIONS, AttendFn, AttentionSite, BlockDeltas, Tower, fused_attention, in_projection, merge_heads,
    project, project_qkv, split_heads,
)


@dataclass(frozen=True)
class BlockInjection:
    """What one block takes besides its input: biases on its updates and deltas on its linear maps."""

    attn_bias: Tensor | None = None
    mlp_bias: Tensor | None = None
    deltas: BlockDeltas = field(default_factory=dict)


NO_BLOCK_INJECTION = BlockInjection()


@dataclass
class Injection:
    """What an adapter hands one tower, keyed by layer index.

    ``prompts[0]`` is the layer-0 prompt, (n, d) shared or (G, n, d) per group (CoCoOp's
    per-image context); ``prompts[j]`` (n, d) replaces the prompt slots before block ``j``.
    ``attn_bias[j]`` / ``mlp_bias[j]`` (d,) are added to every token's update in block ``j``.
    ``deltas[j][p]`` is a module added to block ``j``'s linear map ``p`` (one of `PROJECTIONS`):
    ``p(h) + deltas[j][p](h)``, e.g. a low-rank update of the q projection.
    """

    prompts: dict[int, Tensor] = field(default_factory=dict)
    attn_bias: dict[int, Tensor] = field(default_factory=dict)
    mlp_bias: dict[int, Tensor] = field(default_factory=dict)
    deltas: dict[int, BlockDeltas] = field(default_factory=dict)

    def tensors(self) -> Iterator[Tensor]:
        """Every tensor the injection depends on, the deltas' parameters and buffers included."""
        for table in (self.prompts, self.attn_bias, self.mlp_bias):
            yield from table.values()
        for delta in self.delta_modules():
            yield from delta.parameters()
            yield from delta.buffers()

    def delta_modules(self) -> Iterator[nn.Module]:
        for block_deltas in self.deltas.values():
            yield from block_deltas.values()

    def block(self, layer: int) -> BlockInjection:
        """What block ``layer`` takes (prompts are handled between blocks, not inside them)."""
        return BlockInjection(self.attn_bias.get(layer), self.mlp_bias.get(layer), self.deltas.get(layer, NO_DELTAS))

    @property
    def requires_grad(self) -> bool:
        """True when the injection depends on trainable tensors (its features must be recomputed)."""
        return any(t.requires_grad for t in self.tensors())

    @property
    def stochastic(self) -> bool:
        """True when a delta is in training mode and may draw random numbers (LoRA's dropout): every
        sequence then runs its own copy of tokens it shares with others."""
        return any(delta.training for delta in self.delta_modules())

    @property
    def num_prompts(self) -> int:
        return self.prompts[0].shape[-2] if 0 in self.prompts else 0

    def check(self, tower: Tower, depth: int) -> None:
        """Reject injections the runner would silently misapply."""
        if self.prompts and 0 not in self.prompts:
            raise ValueError(f"{tower} injection has deep prompts at layers {sorted(self.prompts)} but none at layer 0")
        tables = (("prompts", self.prompts), ("attn_bias", self.attn_bias), ("mlp_bias", self.mlp_bias),
                  ("deltas", self.deltas))
        for table_name, table in tables:
            bad = [j for j in table if not 0 <= j < depth]
            if bad:
                raise ValueError(f"{tower} {table_name} at layers {bad}, but the {tower} tower has layers 0..{depth - 1}")
        sizes = {p.shape[-2] for p in self.prompts.values()}
        if len(sizes) > 1:
            raise ValueError(f"{tower} prompts have different token counts per layer: {sorted(sizes)}")
        for layer, block_deltas in self.deltas.items():
            check_block_deltas(block_deltas, tower, layer)


def check_block_deltas(deltas: BlockDeltas, tower: Tower, layer: int) -> None:
    """Each delta names a projection the runner wraps and is a module (so its tensors can be found)."""
    for name, delta in deltas.items():
        if name not in PROJECTIONS:
            raise ValueError(f"{tower} deltas at layer {layer} name projection {name!r}; expected one of "
                             f"{', '.join(PROJECTIONS)}")
        if not isinstance(delta, nn.Module):
            raise TypeError(f"{tower} delta {name!r} at layer {layer} is a {type(delta).__name__}; expected an "
                            "nn.Module mapping the projection's input to an addition to its output")


NO_INJECTION = Injection()


@dataclass(frozen=True)
class EncoderOptions:
    """How the encoders run: each option buys speed or memory and none changes a result
    (tests/test_perf.py checks every one against the plain computation). In YAML they sit under
    ``model.speed``, e.g. ``speed: {text_chunk_size: 250}``; the defaults are the fast path.

    Args:
        attention: "fused" (scaled_dot_product_attention) or "explicit" (softmax written out).
        text_chunk_size: classes per text-tower pass (bounds memory for 1000 classes); null: all.
        truncate_text: run the text tower only up to the longest prompt's EOT.
        bucket_text: encode prompts in groups of similar length, each cut to its own longest EOT
            (needs ``truncate_text``). Off by default: the extra, smaller passes measured slower on
            a busy 2-core CPU (docs/performance.md).
        prune_last_layer: run each tower's last block for the pooled token only.
        share_text_prefix: run the prompt tokens every class shares (SOS, learned context, "of a")
            once per pass instead of once per class; the causal mask makes this exact.
        cache_text_features: compute text features once per evaluation (and once per run when the
            text side is frozen); false recomputes them for every batch, as the research code does.

    Bucketing, pruning and the shared prefix are off while an attention probe is set or with
    ``attention="explicit"`` (`shortcuts`): probes expect one full pass per layer.
    """

    attention: Literal["fused", "explicit"] = "fused"
    text_chunk_size: int | None = None
    truncate_text: bool = True
    bucket_text: bool = False
    prune_last_layer: bool = True
    share_text_prefix: bool = True
    cache_text_features: bool = True

    def __post_init__(self) -> None:
        if self.attention not in ("fused", "explicit"):
            raise ValueError(f"speed.attention must be 'fused' or 'explicit', got {self.attention!r}")
        if self.text_chunk_size is not None and self.text_chunk_size < 1:
            raise ValueError(f"speed.text_chunk_size must be a positive number of classes or null, "
                             f"got {self.text_chunk_size}")

    @classmethod
    def parse(cls, value: "EncoderOptions | Mapping[str, Any] | None") -> "EncoderOptions":
        """Options from themselves, a mapping (Python callers, saved hyper-parameters) or None (defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"speed must be an EncoderOptions or a mapping of its options, got {type(value).__name__}")
        known = [option.name for option in fields(cls)]
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"unknown speed option(s) {', '.join(map(repr, unknown))}; "
                             f"expected some of {', '.join(known)}")
        return cls(**value)

    def as_dict(self) -> dict[str, Any]:
        """Plain types, as checkpoints store them (they load with ``torch.load(weights_only=True)``)."""
        return asdict(self)

    def shortcuts(self, probed: bool) -> "EncoderOptions":
        """The options in effect: with a probe set, or explicit attention, no shortcut changes the call pattern."""
        plain = not probed and self.attention == "fused"
        return replace(self, bucket_text=plain and self.truncate_text and self.bucket_text,
                       prune_last_layer=plain and self.prune_last_layer,
                       share_text_prefix=plain and self.share_text_prefix)


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
    injected: BlockInjection = NO_BLOCK_INJECTION,
    query_rows: Tensor | None = None,
    prefix: KeysValues | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """open_clip's block forward with attention done by ``attend`` and ``injected``'s biases and
    weight deltas; returns the new hidden states and the keys and values of ``x``'s own tokens.

    ``query_rows`` (N,) keeps one row per sequence (the pooled token): keys and values still come
    from the whole sequence, but only that row is updated, and (N, 1, width) is returned. Exact for
    the last block, whose other rows are never read. ``prefix`` holds keys and values of tokens that precede ``x`` (a prompt prefix shared by every
    class): they are attended to but not recomputed; ``attn_mask`` then spans prefix + ``x``.
    """
    attn, deltas = block.attn, injected.deltas
    n = x.shape[0]
    h = block.ln_1(x)
    if query_rows is not None:  # q, out-projection and MLP for one row per sequence
        batch = torch.arange(n, device=x.device)
        x, h_query = x[batch, query_rows].unsqueeze(1), h[batch, query_rows].unsqueeze(1)
        q = split_heads(in_projection(attn, h_query, "q", deltas)[0], attn.num_heads)
        k, v = (split_heads(part, attn.num_heads) for part in in_projection(attn, h, "kv", deltas))
        if attn_mask is not None:
            attn_mask = attn_mask[query_rows].view(n, 1, 1, attn_mask.shape[-1])
    else:
        q, k, v = project_qkv(attn, h, deltas)
    keys, values = k, v
    if prefix is not None:
        keys = torch.cat([prefix[0].expand(n, -1, -1, -1), k], dim=2)
        values = torch.cat([prefix[1].expand(n, -1, -1, -1), v], dim=2)
    out = project(merge_heads(attend(q, keys, values, attn_mask, site)), attn.out_proj, deltas.get("out"))
    return _finish_block(block, x, out, injected), k, v


def _finish_block(block: ResidualAttentionBlock, x: Tensor, out: Tensor, injected: BlockInjection) -> Tensor:
    """Residual updates after the attention output ``out``: layer scale, biases, MLP (with its deltas)."""
    update = block.ls_1(out)
    if injected.attn_bias is not None:
        update = update + injected.attn_bias
    x = x + update
    update = block.ls_2(_mlp(block.mlp, block.ln_2(x), injected.deltas))
    if injected.mlp_bias is not None:
        update = update + injected.mlp_bias
    return x + update


def _mlp(mlp: nn.Module, h: Tensor, deltas: BlockDeltas) -> Tensor:
    """open_clip's ``c_fc → act → c_proj``, with the deltas of "fc" and "proj" (the module itself without)."""
    if "fc" not in deltas and "proj" not in deltas:
        return mlp(h)
    return project(mlp.gelu(project(h, mlp.c_fc, deltas.get("fc"))), mlp.c_proj, deltas.get("proj"))


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
        x = run_block(block, x, attn_mask, attend, make_site(index), injection.block(index),
                      query_rows=last_rows if index == last else None)[0]
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
        injected, site = injection.block(index), make_site(index)
        prefix, keys, values = run_block(block, prefix, prefix_mask, attend, site, injected)
        rows = last_rows - prefix_length if index == last and last_rows is not None else None
        x = run_block(block, x, rest_mask, attend, site, injected, query_rows=rows, prefix=(keys, values))[0]
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
    shareable = share_prefix and groups == 1 and not injection.stochastic
    prefix_length = shared_prefix_length(prompts.token_ids, eot) if shareable else 0
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
    every prompt shares (SOS, context, "of a") once for all classes (not while a delta may draw
    random numbers: `Injection.stochastic`). All are exact; leave them off when ``attend`` records
    or changes attention and expects the plain call pattern.
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
