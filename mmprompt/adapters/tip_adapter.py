"""Tip-Adapter (Zhang et al., 2022): a training-free cache model of the few-shot training images.

Keys are the frozen image features of the K·C training images, each averaged (raw) over
``augment_epoch`` random views (resized crop of area ``crop_scale``, horizontal flip) and then
normalised; values are their one-hot labels. A normalised image feature ``f`` gets the extra logits

    α · exp(−β (1 − f Kᵀ)) L

on top of CLIP's ``logit_scale · cos`` logits, for the class set the cache was built on (the training
classes); other class sets (novel classes) get no cache logits. As in the official code
(github.com/gaopengcuhk/Tip-Adapter, ``utils.build_cache_model``, ``main.py``): 10 augmented views,
crop area (0.5, 1), mean of unnormalised features, affinity computed as ``exp(−(β − β·A))``, and, as an
option, the grid search of α and β on the validation set (``utils.search_hp``). Deviations: fp32
instead of fp16; CLIP's logits use the model's ``logit_scale.exp()`` (100 for OpenAI's weights, the
official literal 100); the views are drawn from the run's few-shot seed so every DDP rank builds the
same cache without a collective, leaving the run's own random stream untouched.

The cache is built once (`prepare`, at the start of fit, validation, test or predict) and stored in the
checkpoint; a restored cache is never rebuilt. No prompt tokens are added (λ = 0).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..classes import ClassSet
from ..methods import register_method
from .base import Adapter, BuildContext, PreparationContext

#: images per forward pass of the frozen image tower while building the cache or searching
ENCODE_BATCH = 64


@lru_cache(maxsize=64)
def class_digest(classnames: tuple[str, ...]) -> int:
    """A stable 63-bit digest of the class names: which class set a stored cache covers."""
    digest = hashlib.sha256("\n".join(classnames).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def encode_dataset(dataset: Any, context: PreparationContext, batch_size: int = ENCODE_BATCH) -> tuple[Tensor, Tensor]:
    """Raw frozen image features (N, D) and labels (N,) of ``dataset``, items read in index order (so the
    random views are drawn in a fixed order, with no DataLoader drawing seeds from the random stream)."""
    features, labels = [], []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[index] for index in range(start, min(start + batch_size, len(dataset)))]
        images = torch.stack([item["image"] for item in items]).to(context.device)
        features.append(context.frozen.encode_images(images, normalize=False).float())
        labels.append(torch.stack([torch.as_tensor(item["label"]) for item in items]))
    return torch.cat(features), torch.cat(labels).long().to(context.device)


def augmented_cache(context: PreparationContext, augment_epoch: int,
                    crop_scale: tuple[float, float]) -> tuple[Tensor, Tensor]:
    """Cache keys (N, D), normalised after averaging the raw features of ``augment_epoch`` random views of
    each training image, and one-hot values (N, C). The views are drawn from ``context.seed`` inside a
    forked random state: identical on every rank, and the run's own random stream is left as it was."""
    dataset = context.training_set(crop_scale)
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(context.seed)
        views = [encode_dataset(dataset, context) for _ in range(augment_epoch)]
    keys = F.normalize(torch.stack([features for features, _ in views]).mean(dim=0), dim=-1)
    return keys, F.one_hot(views[0][1], context.classes.num_classes).float()


def cache_logits(affinity: Tensor, values: Tensor, alpha: Tensor | float, beta: Tensor | float) -> Tensor:
    """``α · exp(−(β − β·A)) L`` in the official order of operations, from affinities ``A = f Kᵀ``."""
    return ((-1) * (beta - beta * affinity)).exp() @ values * alpha


def search_grid(scale: float, steps: int) -> list[float]:
    """The official grid: ``steps`` values from 0.1 upwards, ``scale`` itself excluded."""
    return [i * (scale - 0.1) / steps + 0.1 for i in range(steps)]


def search_alpha_beta(clip_logits: Tensor, affinity: Tensor, values: Tensor, labels: Tensor,
                      betas: Sequence[float], alphas: Sequence[float]) -> tuple[float, float]:
    """(α, β) of the best top-1 accuracy; β outer, α inner, and only a strictly better one replaces the
    best, so the first maximiser wins as in the official search."""
    best, best_alpha, best_beta = -1.0, alphas[0], betas[0]
    for beta in betas:
        unscaled = cache_logits(affinity, values, 1.0, beta)
        for alpha in alphas:
            accuracy = float(((clip_logits + unscaled * alpha).argmax(dim=-1) == labels).float().mean())
            if accuracy > best:
                best, best_alpha, best_beta = accuracy, alpha, beta
    return best_alpha, best_beta


@register_method("tip_adapter", order=120)
class TipAdapter(Adapter):
    """Tip-Adapter (training-free).

    Args:
        alpha: weight of the cache logits (official init_alpha: 1.17 to 10 per dataset).
        beta: sharpness of the affinity (official init_beta: 1).
        augment_epoch: random views of each training image averaged into its key.
        crop_scale: area range of the views' random resized crop.
        search: search α and β on the validation set (the official grid), once.
        search_scale: upper ends (excluded) of the β and α grids.
        search_step: points of the β and α grids.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, augment_epoch: int = 10,
                 crop_scale: tuple[float, float] = (0.5, 1.0), search: bool = False,
                 search_scale: tuple[float, float] = (7.0, 3.0), search_step: tuple[int, int] = (200, 20)) -> None:
        super().__init__()
        if augment_epoch < 1:
            raise ValueError(f"augment_epoch must be >= 1, got {augment_epoch}")
        if min(search_step) < 1:
            raise ValueError(f"search_step entries must be >= 1, got {list(search_step)}")
        self.augment_epoch, self.crop_scale = augment_epoch, tuple(crop_scale)
        self.search, self.search_scale, self.search_step = search, tuple(search_scale), tuple(search_step)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.register_buffer("beta", torch.tensor(float(beta)))

    def build(self, context: BuildContext) -> None:
        self.embed_dim = context.spec.embed_dim
        self.register_buffer("cache_values", torch.zeros(0, 0))
        self.register_buffer("cache_classes", torch.tensor(0, dtype=torch.long))  # `class_digest`
        self.register_buffer("cache_built", torch.tensor(False))
        self.register_buffer("searched", torch.tensor(False))  # α and β hold the search's result
        self._set_keys(torch.zeros(0, self.embed_dim))

    # -- the cache as tensors ----------------------------------------------------------------

    def _set_keys(self, keys: Tensor) -> None:
        """Keys are a buffer here (nothing trains); Tip-Adapter-F makes them a parameter."""
        self.register_buffer("cache_keys", keys)

    def _resize(self, entries: int, classes: int) -> None:
        if tuple(self.cache_keys.shape) != (entries, self.embed_dim):
            self._set_keys(torch.zeros(entries, self.embed_dim, device=self.cache_keys.device))
        if tuple(self.cache_values.shape) != (entries, classes):
            self.cache_values = torch.zeros(entries, classes, device=self.cache_values.device)

    def allocate(self, context: PreparationContext) -> None:
        if not bool(self.cache_built):
            self._resize(len(context.training_set(self.crop_scale)), context.classes.num_classes)

    def prepare_to_load(self, state: dict[str, Tensor]) -> None:
        if "cache_keys" in state and "cache_values" in state:
            self._resize(state["cache_keys"].shape[0], state["cache_values"].shape[1])

    @torch.no_grad()
    def prepare(self, context: PreparationContext) -> None:
        """Build the cache once (a restored one is kept); then the α/β search, when asked for."""
        if not bool(self.cache_built):
            keys, values = augmented_cache(context, self.augment_epoch, self.crop_scale)
            self._resize(*values.shape)
            self.cache_keys.copy_(keys)
            self.cache_values.copy_(values)
            self.cache_classes.fill_(class_digest(context.classes.classnames))
            self.cache_built.fill_(True)
        if self.search and not bool(self.searched) and self.searches_at(context.stage):
            if context.validation_set is None:
                raise ValueError(f"{type(self).__name__}(search=True) needs a datamodule with a validation_set()")
            self.search_on_validation(context)

    def searches_at(self, stage: str) -> bool:
        """Tip-Adapter searches once, right after building its cache, whatever the stage."""
        return True

    def covers(self, classes: ClassSet) -> bool:
        return bool(self.cache_built) and int(self.cache_classes) == class_digest(classes.classnames)

    def affinity(self, image_features: Tensor) -> Tensor:
        """``A = f Kᵀ`` (B, N): cosines of the normalised features to the cache keys."""
        return image_features @ self.cache_keys.to(image_features.dtype).t()

    def extra_logits(self, image_features: Tensor, classes: ClassSet) -> Tensor | None:
        if not self.covers(classes):
            return None
        values = self.cache_values.to(image_features.dtype)
        return cache_logits(self.affinity(image_features), values, self.alpha, self.beta)

    @torch.no_grad()
    def search_on_validation(self, context: PreparationContext) -> None:
        """The official α/β grid search on the validation set; the best values replace α and β."""
        features, labels = encode_dataset(context.validation_set(), context)
        features = F.normalize(features, dim=-1)
        text = context.frozen.text_features(context.classes)[0].to(features.device)
        clip_logits = context.frozen.logit_scale.to(features.device) * features @ text.t()
        betas, alphas = (search_grid(scale, steps) for scale, steps in zip(self.search_scale, self.search_step))
        alpha, beta = search_alpha_beta(clip_logits, self.affinity(features), self.cache_values, labels, betas, alphas)
        self.alpha.fill_(alpha)
        self.beta.fill_(beta)
        self.searched.fill_(True)

    # -- capabilities ------------------------------------------------------------------------

    def trains_text(self) -> bool:
        return False

    def fold_refusal(self) -> str | None:
        return (f"{type(self).__name__} adds logits from a cache of training-image features, which no CLIP weight "
                "can hold; only the adapter form exists (--format adapter)")
