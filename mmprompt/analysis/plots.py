"""Matplotlib (Agg) figures: per-layer curves of the attention statistics, attention overlays."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

#: (tower, metric, axis title)
CURVES = (
    ("vision", "fg_ratio", "[cls] fg_ratio (1 = no preference)"),
    ("vision", "prompt_mass", "[cls] prompt mass λ_cls"),
    ("text", "prompt_mass", "EOT prompt mass λ_EOT"),
)


def plot_layer_curves(summary: dict, path: Path, reference: dict | None = None) -> Path:
    """One panel per statistic, head-mean per layer; ``reference`` (e.g. zero-shot) dashed."""
    from .statistics import layer_means

    figure, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.4))
    for axis, (tower, metric, title) in zip(axes, CURVES):
        runs = [(summary, "-")] + ([(reference, "--")] if reference else [])
        for run, style in runs:
            values = layer_means(run, tower, metric)
            axis.plot(range(len(values)), values, style, marker="o", markersize=3, label=run["meta"]["adapter"])
        if metric == "fg_ratio":
            axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_title(title, fontsize=9)
        axis.set_xlabel(f"{tower} layer")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def displayable(image: Tensor) -> Tensor:
    """(3, H, W) normalised image → (H, W, 3) in [0, 1], min-max per image (any normalisation)."""
    image = image.detach().float().cpu()
    low, high = image.min(), image.max()
    return ((image - low) / (high - low).clamp(min=1e-8)).permute(1, 2, 0)


def plot_attention_overlays(images: Tensor, maps: dict[str, Tensor], path: Path, masks: Tensor | None = None,
                            title: str = "") -> Path:
    """A grid: one row per image, the image (with its mask outline) then one overlay per model.

    ``maps`` holds (N, gh, gw) attention per model name; each map is upsampled to the image.
    """
    n = images.shape[0]
    columns = 1 + len(maps)
    figure, axes = plt.subplots(n, columns, figsize=(2.2 * columns, 2.2 * n), squeeze=False)
    size = images.shape[-2:]
    for row in range(n):
        picture = displayable(images[row])
        axes[row][0].imshow(picture)
        if masks is not None:
            axes[row][0].contour(masks[row].cpu().float(), levels=[0.5], colors="yellow", linewidths=0.8)
        for column, (name, model_maps) in enumerate(maps.items(), start=1):
            heat = torch.nn.functional.interpolate(model_maps[row][None, None].float(), size=size, mode="nearest")[0, 0]
            axes[row][column].imshow(picture)
            axes[row][column].imshow(heat.cpu(), cmap="jet", alpha=0.5)
            if row == 0:
                axes[row][column].set_title(name, fontsize=9)
        for axis in axes[row]:
            axis.axis("off")
    if title:
        figure.suptitle(title, fontsize=10)
    # leave a fixed band above the grid for the title, so it never covers the column names
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.3 / figure.get_figheight()) if title else None)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
