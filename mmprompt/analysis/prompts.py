"""What the learned prompts look like: nearest vocabulary words of text prompts, and whether vision
prompts (and their keys) resemble foreground or background patch tokens."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Iterable

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.masks import mask_to_patch_grid
from ..model.attention import NO_DELTAS, BlockDeltas, in_projection
from ..model.encoders import encode_image
from .common import batch_to, markdown_table, run_folder, text_prompts_of, unsharded_batches, vision_prompts_of, write_table

log = logging.getLogger(__name__)
TEXT_PROMPT_MODELS = "(CoOp, CoCoOp, TextDeep, IVLP, MaPLe)"
VISION_PROMPT_MODELS = "(VPTDeep, IVLP, MaPLe)"


def no_text_prompts(adapter) -> str:
    return f"{type(adapter).__name__} has no text prompts: nearest words need a text-prompt model {TEXT_PROMPT_MODELS}"


def no_vision_prompts(adapter) -> str:
    return (f"{type(adapter).__name__} has no vision prompts: the prompt/patch similarity needs a vision-prompt "
            f"model {VISION_PROMPT_MODELS}")


def learned_text_prompts(module) -> dict[int, Tensor]:
    """{layer: (n, d)} learned text prompts; for image-conditioned context (CoCoOp) the shared part."""
    prompts = text_prompts_of(module.adapter)
    if not prompts:
        raise ValueError(no_text_prompts(module.adapter))
    return prompts


def decode_token(tokenizer, token_id: int) -> str:
    """A BPE token as text: the tokenizer's own byte-level decoding (emoji and accents intact)."""
    return tokenizer.decode([int(token_id)]).strip()


@torch.no_grad()
def nearest_words(module, k: int = 5) -> list[dict]:
    """Per layer and prompt position: the ``k`` vocabulary tokens with the highest cosine to the prompt.

    Only layer 0 lives in the token-embedding space; deeper prompts are compared all the same
    (with the caveat, in the docs, that their neighbours are weaker evidence).
    """
    vocabulary = F.normalize(module.clip.token_embedding.weight.float(), dim=-1)
    rows = []
    for layer, prompt in sorted(learned_text_prompts(module).items()):
        similarity = F.normalize(prompt.detach().float().to(vocabulary.device), dim=-1) @ vocabulary.t()
        values, ids = similarity.topk(k, dim=-1)
        for position in range(prompt.shape[0]):
            words = [decode_token(module.tokenizer, i) for i in ids[position].tolist()]
            rows.append({"layer": layer, "position": position, "nearest": words[0],
                         "cosine": float(values[position, 0]),
                         "neighbours": ", ".join(f"{w} ({v:.2f})" for w, v in zip(words, values[position].tolist()))})
    return rows


@dataclass
class PromptPatchSimilarity:
    """Forward hooks on each vision block's ``ln_1``: the hidden states entering the block (after the
    prompt slots were filled) and their keys (``ln_1`` then the k-projection, with its delta if any)."""

    num_patches: int
    foreground: Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.bool))
    sums: dict[tuple[int, str], float] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)

    def hook(self, layer: int, attn: torch.nn.MultiheadAttention, deltas: BlockDeltas = NO_DELTAS):
        def record(_module, inputs, output) -> None:
            (keys,) = in_projection(attn, output, "k", deltas)
            self.add(layer, "hidden", inputs[0])
            self.add(layer, "key", keys)
            self.counts[layer] = self.counts.get(layer, 0) + int(self.valid().sum())

        return record

    def valid(self) -> Tensor:
        fg = self.foreground
        return fg.any(dim=-1) & (~fg).any(dim=-1)

    def add(self, layer: int, kind: str, tokens: Tensor) -> None:
        patches = F.normalize(tokens[:, 1:1 + self.num_patches].float(), dim=-1)
        prompts = F.normalize(tokens[:, 1 + self.num_patches:].float(), dim=-1)
        cosine = (prompts @ patches.transpose(1, 2)).mean(dim=1)  # (N, P): mean over prompt tokens
        fg, valid = self.foreground.to(cosine.device).float(), self.valid().to(cosine.device)
        for region, weights in (("fg", fg), ("bg", 1 - fg)):
            per_image = (cosine * weights).sum(dim=-1) / weights.sum(dim=-1).clamp(min=1)
            key = (layer, f"{kind}_{region}")
            self.sums[key] = self.sums.get(key, 0.0) + float(per_image[valid].sum())


@torch.no_grad()
def vision_prompt_similarity(module, batches: Iterable[dict], max_batches: int = 10,
                             mask_threshold: float = 0.5) -> list[dict]:
    """Per vision layer: mean cosine of the prompt tokens to foreground and to background patches,
    for hidden states and keys, over images with a mask holding both regions."""
    injection = module.adapter.vision_injection()
    if not injection.prompts:
        raise ValueError(no_vision_prompts(module.adapter))
    blocks = module.clip.visual.transformer.resblocks
    tracker = PromptPatchSimilarity(module.spec.num_patches)
    handles = [block.ln_1.register_forward_hook(tracker.hook(j, block.attn, injection.block(j).deltas))
               for j, block in enumerate(blocks)]
    try:
        for index, batch in enumerate(batches):
            if index >= max_batches:
                break
            batch = batch_to(batch, module.device)
            if "mask" not in batch:
                raise ValueError("the prompt/patch similarity needs foreground masks: batches without 'mask' "
                                 "(set data.with_masks: true and use a dataset with masks)")
            foreground = mask_to_patch_grid(batch["mask"], module.spec.patch_size, mask_threshold)
            tracker.foreground = foreground & batch["has_mask"].bool()[:, None]
            encode_image(module.clip, batch["image"], injection)
    finally:
        for handle in handles:
            handle.remove()
    rows = []
    for layer in range(len(blocks)):
        count = max(tracker.counts.get(layer, 0), 1)
        row = {"layer": layer, "injected": layer in injection.prompts, "images": tracker.counts.get(layer, 0)}
        for kind in ("hidden", "key"):
            fg, bg = (tracker.sums.get((layer, f"{kind}_{r}"), 0.0) / count for r in ("fg", "bg"))
            row.update({f"{kind}_fg": fg, f"{kind}_bg": bg, f"{kind}_fg_minus_bg": fg - bg})
        rows.append(row)
    return rows


def write_prompt_analysis(module, batches: Iterable[dict] | None, output_dir: str | Path, k: int = 5,
                          max_batches: int = 10) -> dict[str, list[dict]]:
    """Both tables, for whichever prompts the model has, as CSV + Markdown under ``output_dir``.

    ``prompt_words`` needs text prompts; ``vision_prompt_similarity`` vision prompts and batches
    with masks (without masks it is left out, with a warning). A model with neither is an error.
    """
    adapter = module.adapter
    text, vision = bool(text_prompts_of(adapter)), bool(vision_prompts_of(adapter))
    if not (text or vision):
        raise ValueError(f"{no_text_prompts(adapter)}; {no_vision_prompts(adapter)}")
    tables: dict[str, list[dict]] = {}
    if text:
        tables["prompt_words"] = nearest_words(module, k)
    batches = iter(batches if batches is not None and vision else ())
    first = next(batches, None)
    if vision and first is not None and "mask" in first:
        tables["vision_prompt_similarity"] = vision_prompt_similarity(module, chain([first], batches), max_batches)
    elif vision:
        log.warning("vision_prompt_similarity left out: it needs test batches with foreground masks "
                    "(data.with_masks: true and a dataset with masks)")
    if not tables:
        raise ValueError(no_text_prompts(adapter) + "; the vision-prompt table needs batches with masks")
    for name, rows in tables.items():
        write_table(rows, Path(output_dir) / name)
    return tables


class PromptAnalysis(L.Callback):
    """After the test, what the learned prompts look like: ``prompt_words.{csv,md}`` (nearest
    vocabulary words of the text prompts) and ``vision_prompt_similarity.{csv,md}`` (vision prompts
    vs foreground/background patch tokens), written on rank 0. What ``mmprompt prompt-analysis``
    adds to ``mmprompt test``.

    Args:
        k: nearest vocabulary words per prompt token.
        max_batches: test batches (the first ones, in order, for any number of processes) for the
            vision-prompt similarity.
        output_dir: folder for the tables; null: the run's log folder (``trainer.log_dir``).
        print_tables: print the Markdown tables at the end.
    """

    def __init__(self, k: int = 5, max_batches: int = 10, output_dir: str | None = None,
                 print_tables: bool = True) -> None:
        if k < 1 or max_batches < 1:
            raise ValueError(f"k and max_batches must be >= 1, got k={k}, max_batches={max_batches}")
        self.k, self.max_batches, self.output_dir, self.print_tables = k, max_batches, output_dir, print_tables
        self.tables: dict[str, list[dict]] = {}

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Refuse a model without prompts on every rank, before the test (not on rank 0 alone, later)."""
        adapter = pl_module.adapter
        if not (text_prompts_of(adapter) or vision_prompts_of(adapter)):
            raise ValueError(f"{no_text_prompts(adapter)}; {no_vision_prompts(adapter)}")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = run_folder(trainer, self.output_dir)  # a collective: every rank, before the rank-0 branch
        if not trainer.is_global_zero:
            return
        self.tables = write_prompt_analysis(pl_module, unsharded_batches(trainer.test_dataloaders), folder, self.k,
                                            self.max_batches)
        if self.print_tables:
            for name, rows in self.tables.items():
                print(f"{name}:\n{markdown_table(rows)}\n")
