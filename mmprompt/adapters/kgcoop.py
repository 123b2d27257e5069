"""KgCoOp (Yao et al., 2023): CoOp's context, kept close to the frozen model's text features."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..methods import register_method
from .base import TrainingStep
from .components import TextPromptAdapter


def knowledge_distance(text_features: Tensor, frozen_text_features: Tensor) -> Tensor:
    """``1 - mean_c cos(w_c, w_c^clip)`` over the classes: the official code's regulariser (half the
    paper's mean squared distance of unit vectors, ``||a - b||² = 2 - 2 cos``)."""
    return 1.0 - F.cosine_similarity(text_features, frozen_text_features, dim=-1, eps=1e-7).mean()


@register_method("kgcoop", order=25)
class KgCoOp(TextPromptAdapter):
    """Knowledge-guided context optimisation.

    The prompt reads "<ctx_init> <class>." and its first ``n_ctx`` tokens learn, as in CoOp; the loss
    adds ``weight * (1 - mean cos)`` between each class's text feature and the frozen model's feature
    of the dataset's own hand-written template (``classes.template``, e.g. "a photo of a {}, a type
    of pet." on Oxford Pets).

    Args:
        n_ctx: learnable context tokens (the official code: the 4 tokens of "a photo of a").
        ctx_init: phrase whose word embeddings start the context.
        weight: weight of the text regulariser (λ; 8.0 in the official base-to-novel runs).
        template: the frozen model's template, e.g. "a photo of a {}, a type of texture." (the official
            one for DTD, whose dataset template here is CoOp's "{} texture."); None: the dataset's.
    """

    def __init__(self, n_ctx: int = 4, ctx_init: str | None = "a photo of a", weight: float = 8.0,
                 template: str | None = None) -> None:
        super().__init__(n_ctx, depth=1, ctx_init=ctx_init)
        self.weight, self.template = weight, template

    def regularizers(self, step: TrainingStep) -> dict[str, Tensor]:
        templates = None if self.template is None else [self.template]
        frozen = step.frozen.text_features(step.classes, templates)[0]
        return {"kg_text": self.weight * knowledge_distance(step.text_features, frozen)}
