"""Zero-shot CLIP: nothing learns; the dataset's hand-crafted template, or a template ensemble."""

from __future__ import annotations

from ..classes import ClassSet
from ..methods import register_method
from .base import Adapter


@register_method("zero_shot", order=0)
class ZeroShot(Adapter):
    """Zero-shot CLIP.

    Args:
        ensemble: average the text features of the dataset's ensemble templates (CLIP's 80
            ImageNet templates by default) instead of using its single template.
    """

    def __init__(self, ensemble: bool = False) -> None:
        super().__init__()
        self.ensemble = ensemble

    def trains_text(self) -> bool:
        return False

    def fold_refusal(self) -> str | None:
        return None  # nothing to fold: the export is CLIP itself

    def prompt_texts(self, classes: ClassSet) -> list[list[str]]:
        if not self.ensemble:
            return super().prompt_texts(classes)
        if not classes.ensemble_templates:
            raise ValueError(f"ensemble=True but class set {classes.name!r} has no ensemble templates")
        return [[template.format(name) for name in classes.classnames] for template in classes.ensemble_templates]
