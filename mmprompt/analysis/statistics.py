"""[cls]→foreground statistics (docs/analysis.md §2) and the callback that records them.

Per layer and head: ``λ_cls`` (prompt mass of ``[cls]``), ``fg_share = Σ_{j∈FG} Ā_cls,j`` with Ā
renormalised over the patches, ``fg_ratio = fg_share / (|FG| / #patches)`` (1 = no preference), and
on the text side ``λ_EOT`` of the pooled token. Only the ``[cls]`` / EOT rows are decomposed (one
score row per sequence); the block output still comes from the fused kernel, so logits don't change.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch import Tensor

from ..data.masks import mask_to_patch_grid
from ..model.attention import AttentionSite, fused_attention
from ..tables import write_json_atomic
from .common import (
    ReduceFn, as_loader_list, first_items, has_prompts, markdown_table, run_folder, trainer_sum, write_table,
)

#: what the summary says of a method with no prompt tokens (LoRA, CLIP-Adapter, Tip-Adapter)
NO_PROMPTS_NOTE = "no prompt tokens: λ = 0 (λ_cls and λ_EOT are 0 by definition)"
from .decomposition import Decomposition, decompose_scores, row_scores

Stage = Literal["test", "validate"]
CLS_ROW = torch.tensor([0])


def patch_attention(parts: Decomposition, num_patches: int) -> Tensor:
    """Ā of the [cls] row restricted to the patches and renormalised: (N, H, #patches)."""
    patches = parts.free_attention[..., 0, 1:1 + num_patches]
    return patches / patches.sum(dim=-1, keepdim=True).clamp(min=1e-30)


def foreground_statistics(attention: Tensor, foreground: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """fg_share and fg_ratio (N, H) of patch attention (N, H, P) given foreground patches (N, P) bool,
    and which images count (N,): those with at least one foreground patch."""
    foreground = foreground.to(attention.device)
    share = (attention * foreground[:, None].to(attention.dtype)).sum(dim=-1)
    fraction = foreground.sum(dim=-1).to(attention.dtype) / foreground.shape[-1]
    valid = fraction > 0
    ratio = share / fraction.clamp(min=1e-30)[:, None]
    return share, ratio, valid


TEXT_FIELDS = ("eot_mass", "sequences")


@dataclass
class AttentionAccumulator:
    """Sums and counts per (layer, head), so ranks and batches combine by addition."""

    cls_mass: Tensor  # (Lv, Hv) Σ λ_cls over images
    images: Tensor  # (Lv,)
    fg_share: Tensor  # (Lv, Hv) Σ over masked images
    fg_ratio: Tensor  # (Lv, Hv)
    masked_images: Tensor  # (Lv,)
    eot_mass: Tensor  # (Lt, Ht) Σ λ_EOT over text sequences
    sequences: Tensor  # (Lt,)

    @classmethod
    def zeros(cls, spec, device: torch.device | str = "cpu") -> "AttentionAccumulator":
        vision = (spec.vision_layers, spec.vision_heads)
        text = (spec.text_layers, spec.text_heads)
        z = lambda *shape: torch.zeros(shape, dtype=torch.float64, device=device)  # noqa: E731
        return cls(z(*vision), z(vision[0]), z(*vision), z(*vision), z(vision[0]), z(*text), z(text[0]))

    def add_vision(self, layer: int, mass: Tensor, share: Tensor, ratio: Tensor, valid: Tensor) -> None:
        self.cls_mass[layer] += mass.double().sum(dim=0).to(self.cls_mass.device)
        self.images[layer] += mass.shape[0]
        valid = valid.to(share.device)
        self.fg_share[layer] += share[valid].double().sum(dim=0).to(self.cls_mass.device)
        self.fg_ratio[layer] += ratio[valid].double().sum(dim=0).to(self.cls_mass.device)
        self.masked_images[layer] += valid.sum().to(self.masked_images.device)

    def add_text(self, layer: int, mass: Tensor) -> None:
        self.eot_mass[layer] += mass.double().sum(dim=0).to(self.eot_mass.device)
        self.sequences[layer] += mass.shape[0]

    def reduced(self, reduce: ReduceFn, text: bool = True) -> "AttentionAccumulator":
        """A copy summed over ranks (``reduce`` is e.g. the strategy's all-reduce with op sum).

        ``text=False`` keeps this rank's text sums: when every rank encodes the same class prompts,
        summing would count each prompt once per rank.
        """
        def combined(name: str) -> Tensor:
            value = getattr(self, name).clone()
            return reduce(value) if text or name not in TEXT_FIELDS else value

        return AttentionAccumulator(**{f.name: combined(f.name) for f in fields(self)})

    def summary(self) -> dict:
        """Means per layer and head (NaN where nothing was counted) as plain lists."""
        def mean(total: Tensor, count: Tensor) -> list[list[float]]:
            return (total / count[:, None]).where(count[:, None] > 0, float("nan")).cpu().tolist()

        return {
            "vision": {
                "prompt_mass": mean(self.cls_mass, self.images),
                "fg_share": mean(self.fg_share, self.masked_images),
                "fg_ratio": mean(self.fg_ratio, self.masked_images),
                "images": self.images.cpu().tolist(),
                "masked_images": self.masked_images.cpu().tolist(),
            },
            "text": {"prompt_mass": mean(self.eot_mass, self.sequences), "sequences": self.sequences.cpu().tolist()},
        }


class StatisticsProbe:
    """An AttendFn that returns the fused output and adds the [cls]/EOT statistics to ``accumulator``.

    ``foreground`` (N, #patches) bool and ``has_mask`` (N,) describe the current batch; without them
    only λ is recorded for the vision tower.
    """

    def __init__(self, accumulator: AttentionAccumulator) -> None:
        self.accumulator = accumulator
        self.foreground: Tensor | None = None
        self.has_mask: Tensor | None = None

    def set_batch(self, foreground: Tensor | None, has_mask: Tensor | None) -> None:
        self.foreground, self.has_mask = foreground, has_mask

    def observe(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, site: AttentionSite) -> None:
        """Record one attention call; as an observer it can share a run with an intervention."""
        with torch.no_grad():
            if site.tower == "vision":
                self.record_vision(q, k, site)
            else:
                self.record_text(q, k, attn_mask, site)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, site: AttentionSite) -> Tensor:
        self.observe(q, k, v, attn_mask, site)
        return fused_attention(q, k, v, attn_mask, site)

    def record_vision(self, q: Tensor, k: Tensor, site: AttentionSite) -> None:
        parts = decompose_scores(row_scores(q, k, None, CLS_ROW), site.prompt_mask)
        mass = parts.prompt_mass[..., 0]
        if self.foreground is None:
            empty = torch.zeros_like(mass)
            self.accumulator.add_vision(site.layer, mass, empty, empty, torch.zeros(mass.shape[0], dtype=torch.bool))
            return
        share, ratio, valid = foreground_statistics(patch_attention(parts, site.num_patches), self.foreground)
        if self.has_mask is not None:
            valid = valid & self.has_mask.to(valid.device).bool()
        self.accumulator.add_vision(site.layer, mass, share, ratio, valid)

    def record_text(self, q: Tensor, k: Tensor, attn_mask: Tensor | None, site: AttentionSite) -> None:
        rows = site.eot_positions.view(-1, 1)
        parts = decompose_scores(row_scores(q, k, attn_mask, rows), site.prompt_mask)
        self.accumulator.add_text(site.layer, parts.prompt_mass[..., 0])


# ----------------------------------------------------------------------------- results


def layer_rows(summary: dict) -> list[dict]:
    """One row per (tower, layer, head) plus a head-mean row: the CSV layout."""
    rows = []
    for tower, metrics in (("vision", ("prompt_mass", "fg_share", "fg_ratio")), ("text", ("prompt_mass",))):
        table = summary[tower]
        for layer, per_head in enumerate(table["prompt_mass"]):
            for head in ["mean", *range(len(per_head))]:
                row = {"tower": tower, "layer": layer, "head": head}
                for metric in metrics:
                    values = table[metric][layer]
                    row[metric] = nan_mean(values) if head == "mean" else values[head]
                rows.append(row)
    return rows


def nan_mean(values: list[float]) -> float:
    finite = [value for value in values if not math.isnan(value)]
    return sum(finite) / len(finite) if finite else float("nan")


def layer_means(summary: dict, tower: str, metric: str) -> list[float]:
    """Head-mean per layer of one metric."""
    return [nan_mean(values) for values in summary[tower][metric]]


def summary_table(summary: dict) -> str:
    """The per-layer table the demo prints: mean fg_ratio, λ_cls and λ_EOT per layer."""
    ratio, cls_mass = layer_means(summary, "vision", "fg_ratio"), layer_means(summary, "vision", "prompt_mass")
    eot = layer_means(summary, "text", "prompt_mass")
    rows = [{"layer": layer, "fg_ratio": ratio[layer], "lambda_cls": cls_mass[layer],
             "lambda_eot": eot[layer] if layer < len(eot) else None} for layer in range(len(ratio))]
    table = markdown_table(rows)
    return table if summary.get("meta", {}).get("prompt_tokens", True) else f"{table}\n{NO_PROMPTS_NOTE}"


def load_summary(path: str | Path) -> dict:
    """A statistics JSON written by `AttentionStatistics` (the file, or the run folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "attention_stats.json"
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics {path} not found: point reference at attention_stats.json of a run")
    return json.loads(path.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- callback


class AttentionStatistics(L.Callback):
    """Record [cls]→foreground attention statistics, λ_cls and λ_EOT per layer and head.

    Writes ``attention_stats.{csv,json,png}`` (prefixed ``val_epochNNN_`` for validation) on rank 0
    and prints the per-layer summary. Off (not in the callbacks) it costs nothing: no probe is
    attached and the fused attention path runs. Its probe only observes, so with a
    `RouteIntervention` in the same run it records the intervened model.

    Args:
        max_batches: batches per dataloader to record; later batches run the fused path.
        stages: when to record: "test" and/or "validate" (the sanity check is skipped).
        output_dir: folder for the files; null: the run's log folder (``trainer.log_dir``).
        reference: ``attention_stats.json`` (or its run folder) of a reference model, e.g.
            zero-shot, drawn dashed in the plots.
        mask_threshold: foreground coverage a patch needs to count as foreground.
        overlay_images: also draw the [cls] attention of this many test images (0: none).
        overlay_layer: the layer drawn in the overlays, or "rollout" (attention rollout).
        print_summary: print the per-layer table at the end.
    """

    def __init__(self, max_batches: int = 10, stages: list[Stage] | None = None, output_dir: str | None = None,
                 reference: str | None = None, mask_threshold: float = 0.5, overlay_images: int = 0,
                 overlay_layer: int | Literal["rollout"] = "rollout", print_summary: bool = True) -> None:
        if max_batches < 1:
            raise ValueError(f"max_batches must be >= 1, got {max_batches}")
        self.stages = list(stages or ["test"])
        bad = [stage for stage in self.stages if stage not in ("test", "validate")]
        if bad:
            raise ValueError(f"stages entries must be 'test' or 'validate', got {bad}")
        if not 0 < mask_threshold <= 1:
            raise ValueError(f"mask_threshold must be in (0, 1], got {mask_threshold}")
        self.max_batches, self.output_dir, self.reference = max_batches, output_dir, reference
        self.mask_threshold, self.print_summary = mask_threshold, print_summary
        self.overlay_images, self.overlay_layer = overlay_images, overlay_layer
        self.probe: StatisticsProbe | None = None
        self.summary: dict | None = None  #: the last recorded statistics (rank 0 and others alike)
        self._attached_to = None  # the module the probe is attached to, between two batch hooks

    # -- lifecycle shared by test and validation ------------------------------------------------

    def _active(self, trainer: L.Trainer, stage: Stage) -> bool:
        return stage in self.stages and not trainer.sanity_checking

    def _start(self, trainer: L.Trainer, module, stage: Stage) -> None:
        if self._active(trainer, stage):
            self.probe = StatisticsProbe(AttentionAccumulator.zeros(module.spec, module.device))

    def _batch_start(self, trainer: L.Trainer, module, batch: dict, batch_idx: int, stage: Stage) -> None:
        if self.probe is None or not self._active(trainer, stage):
            return
        if batch_idx >= self.max_batches:
            self._detach()
            return
        if self._attached_to is None:
            module.attach_probe(self.probe)
            self._attached_to = module
        foreground = None
        if "mask" in batch:
            foreground = mask_to_patch_grid(batch["mask"], module.spec.patch_size, self.mask_threshold)
        self.probe.set_batch(foreground, batch.get("has_mask"))

    def _detach(self) -> None:
        if self._attached_to is not None:
            self._attached_to.detach_probe(self.probe)
            self._attached_to = None

    def _finish(self, trainer: L.Trainer, module, stage: Stage) -> None:
        if self.probe is None or not self._active(trainer, stage):
            return
        self._detach()
        shared_text = not module.adapter.conditions_text_on_image  # every rank encodes the same class prompts
        self.summary = self.probe.accumulator.reduced(trainer_sum(trainer), text=not shared_text).summary()
        self.summary["meta"] = {"adapter": type(module.adapter).__name__, "model_name": module.spec.model_name,
                                "stage": stage, "max_batches": self.max_batches,
                                "prompt_tokens": has_prompts(module.adapter, "both")}
        self.probe = None
        folder = run_folder(trainer, self.output_dir)  # a collective: every rank, before the rank-0 branch
        if trainer.is_global_zero:
            prefix = "" if stage == "test" else f"val_epoch{trainer.current_epoch:03d}_"
            self.write(folder, prefix)
            if stage == "test" and self.overlay_images:
                self.write_overlays(module, trainer, folder)

    def write(self, folder: Path, prefix: str = "") -> None:
        """CSV, JSON and plot of ``self.summary``; print the summary table."""
        from .plots import plot_layer_curves

        write_json_atomic(folder / f"{prefix}attention_stats.json", self.summary, indent=1)
        write_table(layer_rows(self.summary), folder / f"{prefix}attention_stats")
        reference = load_summary(self.reference) if self.reference else None
        plot_layer_curves(self.summary, folder / f"{prefix}attention_stats.png", reference)
        if self.print_summary:
            print(f"[cls]→foreground attention ({self.summary['meta']['adapter']}, {self.summary['meta']['stage']}):")
            print(summary_table(self.summary))

    def write_overlays(self, module, trainer: L.Trainer, folder: Path) -> None:
        """Overlays of the first ``overlay_images`` test images (the same ones for any number of ranks)."""
        from .overlays import overlay_from_callback

        loaders = as_loader_list(trainer.test_dataloaders)
        batch = first_items(loaders[0], self.overlay_images) if loaders else None
        overlay_from_callback(module, [batch] if batch else [], self.overlay_layer, folder, self.reference)

    # -- Lightning hooks --------------------------------------------------------------------------

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._start(trainer, pl_module, "test")

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._start(trainer, pl_module, "validate")

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch_start(trainer, pl_module, batch, batch_idx, "test")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch_start(trainer, pl_module, batch, batch_idx, "validate")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._finish(trainer, pl_module, "test")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._finish(trainer, pl_module, "validate")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._detach()
        self.probe = None
