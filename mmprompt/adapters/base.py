"""The adapter contract: what a method may change in a frozen CLIP, each through one hook.

An adapter is constructed from its hyper-parameters alone (that is what YAML ``init_args`` hold)
and sized later by `build`, once the backbone is known: widths and depths always come from the
model. Removing the adapter gives the original CLIP back; nothing in open_clip is rewritten.

Every hook has a do-nothing default, so a method overrides only what it changes:

=============================  ==================================================================
hook                           what it is for (a method that uses it)
=============================  ==================================================================
`text_injection`,              per-layer prompts, biases and weight deltas inside the towers
`vision_injection`             (CoOp, MaPLe, VPT, bias tuning, LoRA)
`prompt_texts`                 the text prompts per class (templates, learned-context placeholders)
`transform_image_features`,    a map of the pooled features before they are normalised
`transform_text_features`      (feature adapters: CLIP-Adapter)
`extra_logits`                 logits added to the cosine logits (cache models: Tip-Adapter)
`allocate`, `prepare`          size data-dependent tensors before the optimizer, DDP and a
                               checkpoint see them; then one pass over the few-shot training set
                               before training or evaluation (a cache model's keys and values)
`regularizers`                 named loss terms added to the cross-entropy; they may ask for the
                               frozen model's own features (KgCoOp, PromptSRC)
`end_of_epoch`                 a step after each training epoch (weight averaging over epochs)
`prepare_to_load`              resize data-dependent tensors to a checkpoint's before loading
=============================  ==================================================================

and two capabilities are *declared*, never guessed from what an adapter injects, and checked once
when the module is built (`mmprompt.model.module.PromptCLIPModule`):

* `trains_text`: the text features depend on trainable tensors, so they are recomputed at every
  training step; False lets the module encode the class prompts once per run.
* `fold_refusal`: None when the method is learned biases only and export may fold it into
  open_clip's own weights; otherwise the reason it can't be.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Protocol, Sequence

from torch import Tensor, nn
from torch.utils.data import Dataset

from ..classes import ClassSet
from ..model.backbone import BackboneSpec
from ..model.encoders import Injection


@dataclass(frozen=True)
class BuildContext:
    """What `Adapter.build` may read: the backbone's sizes and its frozen word embeddings."""

    spec: BackboneSpec
    embed_words: Callable[[str], Tensor]  # token embeddings (k, text_width) of a phrase, no SOS/EOT


class FrozenCLIP(Protocol):
    """The frozen model's own outputs (no adapter, no attention probe, no gradient): the anchors that
    regularisers pull an adapted model toward and the features cache models are built from."""

    @property
    def logit_scale(self) -> Tensor:
        """CLIP's ``logit_scale.exp()`` (100 for OpenAI's weights)."""
        ...

    def text_features(self, classes: ClassSet, templates: Sequence[str] | None = None,
                      normalize: bool = True) -> Tensor:
        """Zero-shot text features (T, C, D), one row per template (default: the class set's own template,
        T = 1), normalised unless ``normalize`` is False (PromptSRC averages the raw ones); computed once
        per class set and template list."""
        ...

    def encode_images(self, images: Tensor, normalize: bool = True) -> Tensor:
        """The frozen image tower's pooled features (B, D) of ``images``."""
        ...


@dataclass
class TrainingStep:
    """What `Adapter.regularizers` sees of one training step. Features are the adapted model's,
    normalised; ``logits`` include `Adapter.extra_logits`. The frozen image features of the batch are
    computed only when a regulariser reads `frozen_image_features`, once per step."""

    images: Tensor
    labels: Tensor
    classes: ClassSet
    image_features: Tensor  # (B, D)
    text_features: Tensor  # (C, D), or (B, C, D) when the text depends on the image
    logits: Tensor  # (B, C)
    frozen: FrozenCLIP
    epoch: int
    _frozen_images: Tensor | None = field(default=None, repr=False)

    @property
    def frozen_image_features(self) -> Tensor:
        """Normalised features (B, D) of this batch from the frozen image tower."""
        if self._frozen_images is None:
            self._frozen_images = self.frozen.encode_images(self.images)
        return self._frozen_images


@dataclass(frozen=True)
class PreparationContext:
    """What `Adapter.prepare` sees: the few-shot training set, its classes and the frozen model.

    ``training_set(crop_scale)`` builds the training images with the training transform (random
    resized crop with that area range, default the datamodule's, and a horizontal flip); items are
    dicts with ``image`` and ``label`` (relabelled to ``classes``). ``seed`` is the run's few-shot
    seed: draw augmentations from it so every DDP rank builds the same tensors without a collective.
    ``validation_set()``, when the datamodule has one, gives the few-shot validation images with the
    evaluation transform (a hyper-parameter search); ``stage`` is the Lightning stage that asks
    ("fit", "validate", "test" or "predict").
    """

    classes: ClassSet
    training_set: Callable[..., Dataset]
    frozen: FrozenCLIP
    device: Any
    seed: int = 1
    validation_set: Callable[[], Dataset] | None = None
    stage: str = "fit"


class RecordsInitArgs(type):
    """Metaclass that keeps the arguments an adapter was constructed with (its YAML ``init_args``).

    That is what makes a checkpoint self-describing: the adapter can be rebuilt from the checkpoint
    alone, whether it was made by the CLI or in Python.
    """

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        adapter = super().__call__(*args, **kwargs)
        bound = inspect.signature(cls.__init__).bind(None, *args, **kwargs)
        bound.apply_defaults()
        adapter.init_args = {name: value for name, value in list(bound.arguments.items())[1:]}
        return adapter


def class_path_of(cls: type) -> str:
    """The shortest importable path of ``cls`` (``mmprompt.adapters.MaPLe`` rather than its module)."""
    package = cls.__module__.rsplit(".", 1)[0]
    if getattr(importlib.import_module(package), cls.__qualname__, None) is cls:
        return f"{package}.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


class Adapter(nn.Module, metaclass=RecordsInitArgs):
    """Base class: every hook does nothing, so zero-shot CLIP is this class unchanged.

    Subclasses create their tensors in `build` and override the hooks they need (module docstring).
    """

    #: the constructor's arguments (set by the metaclass), e.g. {"n_ctx": 2, "depth": 9, ...}
    init_args: dict[str, Any]

    #: True when text features depend on the image (CoCoOp): they can't be cached per evaluation.
    conditions_text_on_image: ClassVar[bool] = False

    def build(self, context: BuildContext) -> None:
        """Create the trainable tensors, sized from ``context.spec``. Called once."""

    def prompt_texts(self, classes: ClassSet) -> list[list[str]]:
        """Text prompts as (templates × classes); the default is the dataset's own template."""
        return [[classes.template.format(name) for name in classes.classnames]]

    def text_injection(self, image_features: Tensor | None = None) -> Injection:
        """Per-layer text injections; ``image_features`` (B, embed_dim), normalised, if conditioned."""
        return Injection()

    def vision_injection(self) -> Injection:
        """Per-layer vision injections."""
        return Injection()

    # -- capabilities, declared (checked when the module is built) ------------------------------

    def trains_text(self) -> bool:
        """Whether the text features depend on trainable tensors (then they are recomputed per step).

        The default, True, is always correct but encodes every class at every step; a method whose
        text side is frozen returns False and the module checks that once, by autograd.
        """
        return True

    def fold_refusal(self) -> str | None:
        """None when export may fold this method into open_clip's weights (learned biases only); else
        the reason it can't, which `mmprompt export` prints."""
        return (f"{type(self).__name__} is not declared foldable (only learned biases fold into CLIP's weights); "
                "only the adapter form exists (--format adapter)")

    # -- features and logits --------------------------------------------------------------------

    def transform_image_features(self, features: Tensor) -> Tensor:
        """A map of the pooled image features (B, D) before they are normalised (feature adapters)."""
        return features

    def transform_text_features(self, features: Tensor, classes: ClassSet) -> Tensor:
        """A map of the pooled text features (T·C, D) or (B, T·C, D) before they are normalised."""
        return features

    def extra_logits(self, image_features: Tensor, classes: ClassSet) -> Tensor | None:
        """Logits (B, C) added to CLIP's cosine logits for ``classes``, from the normalised image
        features; None adds nothing (e.g. a cache model asked about classes it has no cache for)."""
        return None

    # -- training -------------------------------------------------------------------------------

    def allocate(self, context: PreparationContext) -> None:
        """Create data-dependent tensors (a cache sized by the training set) at their final shapes, cheaply,
        before a checkpoint loads into them and before the optimizer and DDP take the parameters (the
        module's ``setup``, model still on the CPU); `prepare` fills them in place."""

    def prepare(self, context: PreparationContext) -> None:
        """Called before training, evaluation or prediction starts (on every rank, after the model is on
        its device). Keep what a restored checkpoint brought: a second call must not redo the work."""

    def regularizers(self, step: TrainingStep) -> dict[str, Tensor]:
        """Named loss terms added to the cross-entropy (each logged as ``train/<name>``)."""
        return {}

    def end_of_epoch(self, epoch: int, max_epochs: int) -> None:
        """After training epoch ``epoch`` (0-based) of ``max_epochs``, e.g. to average weights over epochs."""

    def prepare_to_load(self, state: dict[str, Tensor]) -> None:
        """Give data-dependent tensors (a cache sized by the training set) the shapes of ``state``, the
        adapter's part of a checkpoint (keys without the ``adapter.`` prefix), before it is loaded."""

    def config(self) -> dict[str, Any]:
        """``{class_path, init_args}``: the YAML that rebuilds this adapter (before `build`)."""
        return {"class_path": class_path_of(type(self)), "init_args": dict(self.init_args)}

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def parameter_formula(self) -> str | None:
        """The trainable-parameter count as a formula when it depends on the training set (after `build`,
        e.g. ``"K·C·512"``), which the methods table shows instead of a number; None: the count is fixed."""
        return None


#: the hooks a foldable method may not override: folding keeps only what the towers' biases do
FEATURE_HOOKS = ("transform_image_features", "transform_text_features", "extra_logits")


def check_fold_declaration(adapter: Adapter) -> None:
    """A method declared foldable (`Adapter.fold_refusal` None) must be input-independent biases only:
    no prompts, weight deltas, image-conditioned text or feature/logit hooks, which folding would drop."""
    if adapter.fold_refusal() is not None:
        return
    name = type(adapter).__name__
    found = [hook for hook in FEATURE_HOOKS if getattr(type(adapter), hook) is not getattr(Adapter, hook)]
    if adapter.conditions_text_on_image:
        found.append("text conditioned on the image")
    else:
        injections = (adapter.text_injection(), adapter.vision_injection())
        found += [kind for kind in ("prompts", "deltas") if any(getattr(i, kind) for i in injections)]
    if found:
        raise TypeError(f"{name}.fold_refusal() is None (foldable), but {name} has {', '.join(found)}, which "
                        "folding into CLIP's biases would drop: return the reason it can't be folded instead")


def check_depth(depth: int, available: int, tower: str, option: str = "depth") -> None:
    if not 1 <= depth <= available:
        raise ValueError(f"{option}={depth} is out of range: the {tower} tower has {available} layers (1..{available})")


def select_layers(depth: int, layers: list[int] | None, available: int, tower: str) -> list[int]:
    """``layers`` (0-based indices) when given, else the first ``depth`` layers 0..depth-1, checked against the tower."""
    if layers is None:
        check_depth(depth, available, tower)
        return list(range(depth))
    chosen = sorted(set(layers))
    if not chosen or chosen[0] < 0 or chosen[-1] >= available:
        raise ValueError(f"layers={layers} must be a non-empty subset of 0..{available - 1} for the {tower} tower")
    return chosen
