"""[cls] attention maps over the patch grid — one layer's, or attention rollout — and overlays that put
two (or more) models side by side on the same test images."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor

from ..model.attention import AttentionSite, attention_scores, fused_attention
from ..model.encoders import encode_image

log = logging.getLogger(__name__)

LayerChoice = int | Literal["rollout"]
MAPS_FILE = "attention_maps.pt"


class AttentionMatrixRecorder:
    """An AttendFn keeping each vision layer's head-mean attention (N, L, L); output from the fused path."""

    def __init__(self) -> None:
        self.matrices: dict[int, Tensor] = {}
        self.prompt_positions: tuple[int, ...] = ()
        self.num_patches = 0

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, site: AttentionSite) -> Tensor:
        if site.tower == "vision":
            self.matrices[site.layer] = attention_scores(q, k, attn_mask).softmax(dim=-1).mean(dim=1).detach()
            self.prompt_positions, self.num_patches = site.prompt_positions, site.num_patches
        return fused_attention(q, k, v, attn_mask, site)


def attention_rollout(matrices: list[Tensor], prompt_positions: tuple[int, ...] = (),
                      fresh_prompt_layers: frozenset[int] = frozenset()) -> Tensor:
    """Abnar & Zuidema's rollout ``R = Π_l (½A_l + ½I)`` (rows renormalised), (N, L, L).

    Deep prompts replace the prompt slots before their layer, so at those layers the prompt rows
    of R restart from themselves: a fresh prompt carries no information from the image.
    """
    n, length, _ = matrices[0].shape
    eye = torch.eye(length, dtype=matrices[0].dtype, device=matrices[0].device)
    rollout = eye.expand(n, length, length).clone()
    prompts = list(prompt_positions)
    for layer, attention in enumerate(matrices):
        if layer in fresh_prompt_layers and prompts:
            rollout[:, prompts] = eye[prompts]
        mixed = 0.5 * attention + 0.5 * eye
        rollout = (mixed / mixed.sum(dim=-1, keepdim=True)) @ rollout
    return rollout


def cls_patch_map(matrix: Tensor, num_patches: int) -> Tensor:
    """The [cls] row over the patches, renormalised, as a square grid (N, g, g)."""
    row = matrix[:, 0, 1:1 + num_patches]
    row = row / row.sum(dim=-1, keepdim=True).clamp(min=1e-30)
    side = math.isqrt(num_patches)
    return row.reshape(-1, side, side)


@torch.no_grad()
def attention_maps(module, images: Tensor, layer: LayerChoice = "rollout") -> Tensor:
    """[cls] attention of ``module`` over the patch grid of ``images``: (N, g, g)."""
    recorder = AttentionMatrixRecorder()
    injection = module.adapter.vision_injection()
    encode_image(module.clip, images.to(module.device), injection, recorder)
    depth = len(recorder.matrices)
    if layer == "rollout":
        fresh = frozenset(j for j in injection.prompts if j > 0)
        matrix = attention_rollout([recorder.matrices[j] for j in range(depth)], recorder.prompt_positions, fresh)
    elif isinstance(layer, int) and 0 <= layer < depth:
        matrix = recorder.matrices[layer]
    else:
        raise ValueError(f"overlay_layer={layer!r} must be 'rollout' or a vision layer 0..{depth - 1}")
    return cls_patch_map(matrix, recorder.num_patches).cpu()


def compare_attention_overlays(modules: dict, images: Tensor, path: str | Path, layer: LayerChoice = "rollout",
                               masks: Tensor | None = None) -> Path:
    """Side-by-side [cls] attention of several models ({name: module}) on the same images, as a PNG."""
    from .plots import plot_attention_overlays

    maps = {name: attention_maps(module, images, layer) for name, module in modules.items()}
    return plot_attention_overlays(images, maps, Path(path), masks, title=f"[cls] attention ({layer_label(layer)})")


def layer_label(layer: LayerChoice) -> str:
    return "rollout" if layer == "rollout" else f"layer {layer}"


def overlay_from_callback(module, batches: list[dict[str, Tensor]], layer: LayerChoice, folder: Path,
                          reference: str | None) -> Path | None:
    """The callback's overlay: this model's maps saved to ``attention_maps.pt`` and drawn next to the
    reference run's maps when that run saved the same images."""
    from .plots import plot_attention_overlays

    if not batches:
        return None
    images = torch.cat([b["image"] for b in batches])
    masks = torch.cat([b["mask"] for b in batches]) if all("mask" in b for b in batches) else None
    name = type(module.adapter).__name__
    maps = {name: attention_maps(module, images, layer)}
    torch.save({"images": images, "masks": masks, "maps": maps[name], "name": name, "layer": layer},
               folder / MAPS_FILE)
    if reference:
        other = reference_maps(Path(reference), images)
        if other is not None:
            maps = {f"{other['name']} (reference)": other["maps"], **maps}
    return plot_attention_overlays(images, maps, folder / "attention_overlay.png", masks,
                                   title=f"[cls] attention ({layer_label(layer)})")


def reference_maps(reference: Path, images: Tensor) -> dict | None:
    """The reference run's saved maps, if it saved the same images (else a warning and None)."""
    path = (reference if reference.is_dir() else reference.parent) / MAPS_FILE
    if not path.is_file():
        log.warning("no %s next to the reference %s: overlay shows this model only", MAPS_FILE, reference)
        return None
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if saved["images"].shape != images.shape or not torch.allclose(saved["images"], images):
        log.warning("reference %s saved other images than this run: overlay shows this model only", path)
        return None
    return saved


def overlay_file_name(index: int, path: str) -> str:
    """``<index>-<stem>.png``: the index is the CSV row's, so two images with one name never collide."""
    return f"{index:05d}-{Path(path).stem}.png"


class ImageOverlayWriter(L.Callback):
    """One PNG per predicted image (``mmprompt predict --images ... --overlay true``): the image and
    the model's [cls] attention over it, titled with the top-1 class. Each rank draws its own images
    (no collective).

    Args:
        out_dir: the folder of the PNG files.
        layer: "rollout" (attention rollout over every layer) or one vision layer's index.
    """

    def __init__(self, out_dir: str | Path, layer: LayerChoice = "rollout") -> None:
        self.out_dir, self.layer = Path(out_dir), layer

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        from .plots import plot_attention_overlays

        self.out_dir.mkdir(parents=True, exist_ok=True)
        loaders = trainer.predict_dataloaders
        items = (loaders[dataloader_idx] if isinstance(loaders, (list, tuple)) else loaders).dataset.items
        classnames = pl_module.class_sets("predict")[dataloader_idx].classnames
        maps = attention_maps(pl_module, batch["image"], self.layer)
        name = type(pl_module.adapter).__name__
        for row, index in enumerate(batch["index"].tolist()):
            best = float(outputs["probability"][row].max())
            title = f"{Path(items[index].path).name}: {classnames[int(outputs['prediction'][row])]} ({best:.2f})"
            plot_attention_overlays(batch["image"][row:row + 1], {name: maps[row:row + 1]},
                                    self.out_dir / overlay_file_name(index, items[index].path), title=title)
