"""PromptSRC (Khattak et al., 2023): IVLP's deep prompts, regularised toward the frozen model and
averaged over epochs with Gaussian weights."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..methods import register_method
from .base import BuildContext, TrainingStep
from .ivlp import IVLP

#: the 60 ImageNet templates of CLIP's prompt-engineering notebook that PromptSRC's text teacher
#: averages on every dataset (a subset of open_clip's 80, in the order the official code sums them)
PROMPTSRC_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.",
    "the embroidered {}.", "a photo of a hard to see {}.", "a bright photo of a {}.", "a photo of a clean {}.",
    "a photo of a dirty {}.", "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.",
    "the plastic {}.", "a photo of the cool {}.", "a close-up photo of a {}.",
    "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.",
    "a sketch of the {}.", "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.",
)


def gaussian_epoch_weights(epochs: int, mean: float, std: float) -> list[float]:
    """Weights w_1..w_E of the per-epoch prompts: the normal density at e = 1..E, normalised to sum 1
    (the official formula; computed in log space so a mean far from 1..E can't underflow to 0/0)."""
    if std <= 0:
        raise ValueError(f"gpa_std must be > 0, got {std}")
    logs = [-0.5 * ((epoch - mean) / std) ** 2 for epoch in range(1, epochs + 1)]
    top = max(logs)
    densities = [math.exp(value - top) for value in logs]
    total = math.fsum(densities)
    return [density / total for density in densities]


def logit_distillation(logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KL(teacher ‖ student) of the softmaxes, summed over every (image, class) entry and divided by
    their number B·C (the official reduction, not per image), temperature 1."""
    divergence = F.kl_div(F.log_softmax(logits, dim=-1), F.log_softmax(teacher_logits, dim=-1),
                          reduction="sum", log_target=True)
    return divergence / logits.numel()


@register_method("promptsrc", order=65)
class PromptSRC(IVLP):
    """Self-regulating prompts: IVLP's independent deep prompts in both towers, plus

    * L1 distances of the normalised text features (all classes) to the frozen model's (the mean of
      its raw features over `PROMPTSRC_TEMPLATES`, normalised) and of the image features to the frozen
      image tower's on the same batch, weighted ``text_weight`` and ``image_weight``;
    * KL(zero-shot ‖ adapted) between the logits, as `logit_distillation`;
    * Gaussian prompt aggregation: after each epoch e (1-based) the prompts are added to a running
      sum with weight `gaussian_epoch_weights` (``gpa_mean``, ``gpa_std``, the run's max_epochs);
      after the last epoch the prompts become that sum. The sum is a buffer, so it is checkpointed
      and a resumed run aggregates exactly as an uninterrupted one.

    Args:
        n_ctx: text prompt tokens per layer (layer 0 from ``ctx_init``).
        n_ctx_vision: vision prompt tokens per layer.
        depth: prompted layers 0..depth-1 in both towers.
        ctx_init: phrase that initialises the layer-0 text context.
        text_weight: weight of the text L1 consistency (25 in the official config).
        image_weight: weight of the image L1 consistency (10).
        gpa_mean: mean epoch of the Gaussian over epochs 1..max_epochs (15 for 20 epochs).
        gpa_std: its standard deviation in epochs (1).
    """

    def __init__(self, n_ctx: int = 4, n_ctx_vision: int = 4, depth: int = 9, ctx_init: str | None = "a photo of a",
                 text_weight: float = 25.0, image_weight: float = 10.0, gpa_mean: float = 15.0,
                 gpa_std: float = 1.0) -> None:
        super().__init__(n_ctx, n_ctx_vision, depth, ctx_init)
        if gpa_std <= 0:
            raise ValueError(f"gpa_std must be > 0, got {gpa_std}")
        self.text_weight, self.image_weight = text_weight, image_weight
        self.gpa_mean, self.gpa_std = gpa_mean, gpa_std

    def build(self, context: BuildContext) -> None:
        super().build(context)
        self.register_buffer("gpa_sum", torch.zeros(sum(p.numel() for p in self.prompt_parameters())))

    def prompt_parameters(self) -> list[Tensor]:
        """The tensors Gaussian aggregation averages: every trainable prompt, in a fixed order."""
        return [p for p in self.parameters() if p.requires_grad]

    def regularizers(self, step: TrainingStep) -> dict[str, Tensor]:
        raw = step.frozen.text_features(step.classes, PROMPTSRC_TEMPLATES, normalize=False)
        teacher_text = F.normalize(raw.mean(dim=0), dim=-1)
        teacher_image = step.frozen_image_features
        teacher_logits = step.frozen.logit_scale * teacher_image @ teacher_text.t()
        return {"text_l1": self.text_weight * F.l1_loss(step.text_features, teacher_text),
                "image_l1": self.image_weight * F.l1_loss(step.image_features, teacher_image),
                "logit_kl": logit_distillation(step.logits, teacher_logits)}

    @torch.no_grad()
    def end_of_epoch(self, epoch: int, max_epochs: int) -> None:
        """Add this epoch's prompts to the weighted sum; after the last epoch, load the sum into the prompts.
        A run without a known number of epochs (max_epochs -1 or None) is not aggregated."""
        if not max_epochs or max_epochs < 1 or epoch >= max_epochs:
            return
        weight = gaussian_epoch_weights(max_epochs, self.gpa_mean, self.gpa_std)[epoch]
        current = torch.cat([p.detach().reshape(-1) for p in self.prompt_parameters()])
        if epoch == 0:
            self.gpa_sum.copy_(current * weight)
        else:
            self.gpa_sum.add_(current * weight)
        if epoch == max_epochs - 1:
            sizes = [p.numel() for p in self.prompt_parameters()]
            for parameter, values in zip(self.prompt_parameters(), self.gpa_sum.split(sizes)):
                parameter.copy_(values.view_as(parameter))
