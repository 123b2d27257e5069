"""What the learned prompts look like: nearest vocabulary words of text prompts, and whether vision
prompts (and their keys) resemble foreground or background patch tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from itertools import chain
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..attention import NO_DELTAS, BlockDeltas, in_projection
from ..encoders import encode_image
from .common import batch_to, markdown_table, write_table
from ..data.masks import mask_to_patch_grid


def learned_text_prompts(module) -> dict[int, Tensor]:
    """{layer: (n, d)} learned text prompts; for image-conditioned context (CoCoOp) the shared part."""
    adapter = module.adapter
    try:
        prompts = adapter.text_injection().prompts
    except ValueError:  # CoCoOp: text_injection needs image features; its TextPromptStack is the learned part
        prompts = adapter.text.layer_prompts()
    if not prompts:
        raise ValueError(f"{type(adapter).__name__} has no text prompts: nearest words need a text-prompt model "
                         "(CoOp, CoCoOp, TextDeep, IVLP, MaPLe)")
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
        raise ValueError(f"{type(module.adapter).__name__} has no vision prompts: the prompt/patch similarity "
                         "needs a vision-prompt model (VPTDeep, IVLP, MaPLe)")
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
    """Both tables, for whichever prompts the model has, as CSV + Markdown under ``output_dir``."""
    folder = Path(output_dir)
    tables: dict[str, list[dict]] = {}
    errors = []
    try:
        tables["prompt_words"] = nearest_words(module, k)
    except ValueError as err:
        errors.append(str(err))
    if batches is not None:
        try:
            tables["vision_prompt_similarity"] = vision_prompt_similarity(module, batches, max_batches)
        except ValueError as err:
            errors.append(str(err))
    if not tables:
        raise ValueError("; ".join(errors) or "no batches given for the vision-prompt analysis")
    for name, rows in tables.items():
        write_table(rows, folder / name)
    return tables


def main(argv: Sequence[str] | None = None) -> int:
    """``mmprompt prompt-analysis --config RUN/config.yaml``: both tables for a trained run."""
    import argparse

    from .interventions import add_allow_no_checkpoint, default_checkpoint, load_run

    parser = argparse.ArgumentParser(prog="mmprompt prompt-analysis", description=main.__doc__)
    parser.add_argument("--config", required=True, help="config.yaml of a run folder")
    parser.add_argument("--ckpt_path", default=None,
                        help="checkpoint with the trained adapter (default: checkpoints/last.ckpt next to the config)")
    add_allow_no_checkpoint(parser)
    parser.add_argument("--k", type=int, default=5, help="nearest vocabulary words per prompt token")
    parser.add_argument("--max_batches", type=int, default=10, help="test batches for the vision-prompt similarity")
    parser.add_argument("--out_dir", "--output_dir", dest="output_dir", default=None, help="folder for the tables (default: the config's folder)")
    args = parser.parse_args(argv)
    module, datamodule = load_run(args.config, args.ckpt_path or default_checkpoint(args.config, args.allow_no_checkpoint))
    datamodule.prepare_data()
    datamodule.setup("test")
    loaders = datamodule.test_dataloader()
    batches = chain.from_iterable(loaders) if isinstance(loaders, list) else loaders  # lazily: max_batches
    tables = write_prompt_analysis(module.eval(), batches, args.output_dir or Path(args.config).parent, args.k,
                                   args.max_batches)
    for name, rows in tables.items():
        print(f"{name}:\n{markdown_table(rows)}\n")
    return 0
