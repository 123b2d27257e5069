"""The LightningModule: a frozen open_clip CLIP plus one adapter, trained on cosine logits."""

from __future__ import annotations

import functools
import logging
import random
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Mapping, NamedTuple, Protocol, Sequence, runtime_checkable

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics.classification import MulticlassAccuracy

from .. import __version__
from ..adapters.base import Adapter, BuildContext, PreparationContext, TrainingStep, check_fold_declaration
from ..classes import ClassSet, ProvidesClassSets, ProvidesTrainingSet
from ..results import percent_accuracies
from .attention import AttendFn, fused_attention, softmax_attention
from .backbone import BackboneSpec, freeze, get_tokenizer, load_clip, shape_mismatches, shapes_of
from .encoders import (
    NO_INJECTION, EncoderOptions, TokenizedPrompts, check_supported_blocks, encode_image, encode_text, tokenize_prompts,
)
from .schedule import warmup_cosine_factor

log = logging.getLogger(__name__)
# The frozen backbone stays in eval mode on purpose (see `PromptCLIPModule.train`).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")  # Lightning internals

ADAPTER_PREFIX = "adapter."
EVAL_STAGES = ("validate", "test")  # evaluated during fit; predict reads the test classes
METRIC_PREFIX = {"validate": "val", "test": "test"}


def rng_snapshot() -> dict[str, Any]:
    """Python, NumPy and torch RNG states in types ``torch.load(weights_only=True)`` accepts."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, keys.tolist(), position, has_gauss, cached),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng(states: dict[str, Any]) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def class_set_record(classes: ClassSet) -> dict[str, Any]:
    """A ClassSet as plain types ``torch.load(weights_only=True)`` accepts."""
    return {"name": classes.name, "classnames": list(classes.classnames), "template": classes.template,
            "ensemble_templates": list(classes.ensemble_templates)}


def class_set_from_record(record: dict[str, Any]) -> ClassSet:
    return ClassSet(record["name"], tuple(record["classnames"]), record["template"],
                    tuple(record["ensemble_templates"]))


def word_embedder(clip: torch.nn.Module, tokenizer: Callable[[list[str]], Tensor]) -> Callable[[str], Tensor]:
    """``embed_words(phrase)``: the frozen token embeddings (k, width) of a phrase without SOS/EOT,
    what `BuildContext` gives adapters to start their context from words ("a photo of a")."""

    @torch.no_grad()
    def embed_words(text: str) -> Tensor:
        ids = tokenizer([text])[0]
        eot = int(ids.argmax())
        return clip.token_embedding(ids[1:eot].to(clip.token_embedding.weight.device))

    return embed_words


def build_adapter(config: dict[str, Any]) -> Adapter:
    """An adapter from its ``{class_path, init_args}`` (what checkpoints and exports store)."""
    import importlib

    module_name, _, class_name = config["class_path"].rpartition(".")
    adapter_class = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(adapter_class, type) and issubclass(adapter_class, Adapter)):
        raise ValueError(f"adapter class_path {config['class_path']!r} is not an mmprompt Adapter")
    return adapter_class(**(config.get("init_args") or {}))


@dataclass
class TextCaches:
    """A module's text-side caches: tokenized prompts per (class set, device), text features per class set."""

    prompts: dict[tuple[ClassSet, torch.device], tuple[TokenizedPrompts, int]] = field(default_factory=dict)
    features: dict[ClassSet, Tensor] = field(default_factory=dict)


@runtime_checkable
class ObservingProbe(Protocol):
    """A probe that only records: ``observe`` sees an attention call and changes nothing, so it can
    share a run with a probe that does change the output (e.g. statistics under an intervention)."""

    def observe(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, site: Any) -> None: ...


def stacked_attend(probes: Sequence[AttendFn], base: AttendFn) -> AttendFn:
    """Several attached probes as one AttendFn: every `ObservingProbe` observes each call, and the
    output comes from the most recently attached other probe, else from ``base``."""
    observers = [probe for probe in probes if isinstance(probe, ObservingProbe)]
    producers = [probe for probe in probes if not isinstance(probe, ObservingProbe)]
    output = producers[-1] if producers else base

    def attend(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, site: Any) -> Tensor:
        for observer in observers:
            observer.observe(q, k, v, attn_mask, site)
        return output(q, k, v, attn_mask, site)

    return attend


class Outputs(NamedTuple):
    """One forward pass: normalised image (B, D) and text (C, D) or (B, C, D) features, and the logits (B, C)."""

    image: Tensor
    text: Tensor
    logits: Tensor


class FrozenReference:
    """`mmprompt.adapters.base.FrozenCLIP` for one module: its CLIP with no adapter, no probe and no
    gradient, on the module's speed options. Text features are kept per class set and templates."""

    def __init__(self, module: "PromptCLIPModule") -> None:
        self.module = module
        #: (classes, templates, device, normalised) -> features
        self._text: dict[tuple[ClassSet, tuple[str, ...], torch.device, bool], Tensor] = {}

    @property
    def logit_scale(self) -> Tensor:
        return self.module.clip.logit_scale.exp().float().detach()

    @torch.no_grad()
    def text_features(self, classes: ClassSet, templates: Sequence[str] | None = None,
                      normalize: bool = True) -> Tensor:
        module = self.module
        templates = tuple(templates) if templates is not None else (classes.template,)
        raw = (classes, templates, module.clip.token_embedding.weight.device, False)
        if raw not in self._text:
            texts = [template.format(name) for template in templates for name in classes.classnames]
            prompts = tokenize_prompts(module.clip, module.tokenizer, texts, truncate=module.speed.truncate_text)
            options = module.speed.shortcuts(probed=False)
            features = encode_text(module.clip, prompts, NO_INJECTION, module._plain_attend, options.text_chunk_size,
                                   bucket_by_length=options.bucket_text, pooled_only=options.prune_last_layer,
                                   share_prefix=options.share_text_prefix)
            self._text[raw] = features.float().unflatten(0, (len(templates), -1))
        key = raw[:3] + (normalize,)
        if key not in self._text:
            self._text[key] = F.normalize(self._text[raw], dim=-1)
        return self._text[key]

    @torch.no_grad()
    def encode_images(self, images: Tensor, normalize: bool = True) -> Tensor:
        module = self.module
        features = encode_image(module.clip, images, NO_INJECTION, module._plain_attend,
                                pooled_only=module.speed.shortcuts(probed=False).prune_last_layer).float()
        return F.normalize(features, dim=-1) if normalize else features

    def clear(self) -> None:
        self._text.clear()


def qualified_name(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


class PromptCLIPModule(L.LightningModule):
    """Frozen CLIP + an adapter. Only the adapter trains, sits in the optimizer and is checkpointed.

    Args:
        adapter: the method, e.g. ``{class_path: mmprompt.adapters.MaPLe}``.
        model_name: an open_clip architecture, e.g. "ViT-B-16-quickgelu" or the tiny "mmprompt-tiny".
        pretrained: an open_clip tag ("openai"), a local checkpoint file, or null for random weights.
        force_quick_gelu: build with QuickGELU even when neither the name nor the weights ask for it.
        optimizer: any optimizer (class_path/init_args); null means SGD(lr, momentum, weight_decay).
        lr: base learning rate of the default SGD.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        warmup_epochs: epochs at the constant ``warmup_lr`` before the cosine starts.
        warmup_lr: learning rate during warm-up.
        cosine_epochs: the cosine's T_max in epochs; null means trainer.max_epochs.
        cosine_interval: "epoch" steps the warm-up and cosine once per epoch (Dassl); "step" once per
            optimiser step over the same epochs (PyTorch's CosineAnnealingLR stepped per iteration).
        speed: how the encoders run (`mmprompt.model.encoders.EncoderOptions`: attention kernel, text
            chunks, truncation, pruning, shared prefix, caching); every option is exact. In YAML
            ``speed: {text_chunk_size: 250}``; a dict works in Python too.
    """

    strict_loading = False  # the checkpoint holds only adapter tensors; load_state_dict checks them

    def __init__(
        self,
        adapter: Adapter,
        model_name: str = "ViT-B-16-quickgelu",
        pretrained: str | None = "openai",
        force_quick_gelu: bool = False,
        optimizer: OptimizerCallable | None = None,
        lr: float = 0.0035,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        warmup_epochs: int = 1,
        warmup_lr: float = 1e-5,
        cosine_epochs: int | None = None,
        cosine_interval: Literal["epoch", "step"] = "epoch",
        speed: EncoderOptions = EncoderOptions(),
    ) -> None:
        super().__init__()
        if isinstance(adapter, Mapping):  # its {class_path, init_args}: what load_from_checkpoint passes
            adapter = build_adapter(adapter)
        #: the encoders' speed options; swap the whole object (`dataclasses.replace`) to change one
        self.speed = EncoderOptions.parse(speed)
        speed = self.speed.as_dict()  # saved as plain types: checkpoints load with weights_only=True
        self.save_hyperparameters(ignore=["adapter", "optimizer"])
        self.clip = load_clip(model_name, pretrained, force_quick_gelu)
        self.tokenizer = get_tokenizer(model_name)
        self.spec = BackboneSpec.from_clip(self.clip, model_name)
        self.adapter = adapter
        adapter.build(BuildContext(self.spec, word_embedder(self.clip, self.tokenizer)))
        check_supported_blocks(self.clip.transformer.resblocks, "text")
        check_supported_blocks(self.clip.visual.transformer.resblocks, "vision")
        #: the frozen model's own features, for regularisers and cache models (`Adapter.regularizers`)
        self.frozen = FrozenReference(self)
        self.optimizer_factory = optimizer
        self._probes: list[AttendFn] = []  # attached by `probed` / `attach_probe`, in order
        self._class_sets: dict[str, list[ClassSet]] = {}
        self._prompt_cache: dict[tuple[ClassSet, torch.device], tuple[TokenizedPrompts, int]] = {}
        self._text_cache: dict[ClassSet, Tensor] = {}
        self.metrics = torch.nn.ModuleDict()
        check_fold_declaration(adapter)
        self._check_text_declaration()
        log.info("%s on %s: %s trainable parameters", type(adapter).__name__, model_name,
                 f"{adapter.num_trainable_parameters():,}")

    # ------------------------------------------------------------------ backbone plumbing

    def use_clip(self, clip: torch.nn.Module) -> None:
        """Swap in another open_clip model of the same architecture (e.g. the user's own), frozen."""
        spec = BackboneSpec.from_clip(clip, self.spec.model_name)
        if spec != self.spec:
            raise ValueError(f"the given CLIP does not match {self.spec.model_name!r}: {spec} != {self.spec}")
        self.clip = freeze(clip)
        self._prompt_cache.clear()
        self._text_cache.clear()
        self.frozen.clear()

    def _check_text_declaration(self) -> None:
        """An adapter that declares a frozen text side (`Adapter.trains_text` False) must really have one:
        otherwise its cached text features would be detached and its text-side tensors never trained.
        Checked once, by autograd on one class, with the random state left as it was."""
        if self.adapter.trains_text() or not any(p.requires_grad for p in self.adapter.parameters()):
            return
        classes = ClassSet("declaration check", ("thing",), ensemble_templates=("a photo of a {}.",))
        image = torch.zeros(1, self.spec.embed_dim) if self.adapter.conditions_text_on_image else None
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            depends = self.encode_classes(classes, image).requires_grad
        self._prompt_cache.clear()
        if depends:
            raise TypeError(f"{type(self.adapter).__name__}.trains_text() is False, but its text features depend on "
                            "trainable tensors: return True (they are then recomputed at every training step)")

    @contextmanager
    def running_with(self, speed: EncoderOptions | dict[str, Any], caches: TextCaches | None = None,
                     ) -> Iterator[TextCaches]:
        """Run under other speed options with text caches of their own (``caches``, which the caller may keep
        from one call to the next, or fresh ones); the module's own options and caches come back on
        leaving. How the benchmark compares paths on one module without rebuilding it."""
        caches = TextCaches() if caches is None else caches
        saved = self.speed, self._prompt_cache, self._text_cache
        self.speed, self._prompt_cache, self._text_cache = EncoderOptions.parse(speed), caches.prompts, caches.features
        try:
            yield caches
        finally:
            self.speed, self._prompt_cache, self._text_cache = saved

    def train(self, mode: bool = True) -> "PromptCLIPModule":
        """Keep the frozen backbone in eval mode whatever Lightning asks of the module."""
        super().train(mode)
        self.clip.eval()
        return self

    # ------------------------------------------------------------------ attention probes (analysis)

    @contextmanager
    def probed(self, probe: AttendFn) -> Iterator[AttendFn]:
        """``with module.probed(probe): ...`` routes every attention call through ``probe``.

        Probes nest: an inner one is stacked on the outer (see `attach_probe`). On leaving, even by an
        exception, the probe is detached and the text features computed through it are dropped.
        """
        self.attach_probe(probe)
        try:
            yield probe
        finally:
            self.detach_probe(probe)

    def attach_probe(self, probe: AttendFn) -> None:
        """Attach ``probe`` until `detach_probe` (for callbacks that span two Lightning hooks).

        With several attached, the probes that only observe (`ObservingProbe`) all see every call
        and the latest other probe gives the output. Cached text features are dropped, so the text
        tower runs through the probe too.
        """
        self._probes.append(probe)
        self._text_cache.clear()

    def detach_probe(self, probe: AttendFn) -> None:
        """Detach a probe attached earlier (in any order) and drop text features computed through it."""
        if not any(attached is probe for attached in self._probes):
            raise ValueError(f"detach_probe: {probe!r} is not attached to this module")
        self._probes = [attached for attached in self._probes if attached is not probe]
        self._text_cache.clear()

    @property
    def attention_probe(self) -> AttendFn | None:
        """The attached probes as one AttendFn (the probe itself when there is one); None without any."""
        if not self._probes:
            return None
        if len(self._probes) == 1:
            return self._probes[0]
        return stacked_attend(self._probes, self._plain_attend)

    @property
    def _plain_attend(self) -> AttendFn:
        return fused_attention if self.speed.attention == "fused" else softmax_attention

    @property
    def attend(self) -> AttendFn:
        probe = self.attention_probe
        return probe if probe is not None else self._plain_attend

    @property
    def _shortcuts(self) -> EncoderOptions:
        """The speed options in effect: a probe needs the plain call pattern (`EncoderOptions.shortcuts`)."""
        return self.speed.shortcuts(probed=self.attention_probe is not None)

    # ------------------------------------------------------------------ class sets

    def set_class_sets(self, train: ClassSet | None = None, validate: list[ClassSet] | None = None,
                       test: list[ClassSet] | None = None) -> None:
        """Choose the classes per stage by hand (without a datamodule), e.g. novel classes at test."""
        for stage, value in (("fit", [train] if train else None), ("validate", validate), ("test", test),
                             ("predict", test)):
            if value is not None:
                self._class_sets[stage] = list(value)
        self._text_cache.clear()

    def class_sets(self, stage: str) -> list[ClassSet]:
        if stage not in self._class_sets:
            raise RuntimeError(
                f"no classes for stage {stage!r}: use a datamodule that provides class sets "
                "(mmprompt.data.FewShotDataModule) or call set_class_sets()"
            )
        return self._class_sets[stage]

    def setup(self, stage: str) -> None:
        stage = str(getattr(stage, "value", stage))  # Lightning passes a TrainerFn enum: "TrainerFn.TESTING" in f-strings
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if isinstance(datamodule, ProvidesClassSets):
            self._check_image_size(datamodule)
            if stage == "fit":
                self._class_sets["fit"] = [datamodule.train_classes]
            for eval_stage in EVAL_STAGES if stage == "fit" else (stage,):
                self._class_sets[eval_stage] = datamodule.eval_classes(eval_stage)
        for metric_stage, sets in self._class_sets.items():
            for index, classes in enumerate(sets):
                name = self._metric_key(metric_stage, index)
                if name not in self.metrics or self.metrics[name].num_classes != classes.num_classes:
                    self.metrics[name] = MulticlassAccuracy(num_classes=classes.num_classes, average="micro")
        self._text_cache.clear()
        context = self._preparation_context(stage)
        if context is not None:  # shapes before a checkpoint loads and the optimizer and DDP take the parameters
            self.adapter.allocate(context)
        if stage == "fit":
            self._check_something_to_train_under_ddp()

    def _check_something_to_train_under_ddp(self) -> None:
        """DDP refuses a model with no trainable parameter (its own error names no way out): say what to run."""
        if self._trainer is None or self.trainer.world_size <= 1:
            return
        if not any(p.requires_grad and p.numel() for p in self.adapter.parameters()):
            raise ValueError(f"{type(self.adapter).__name__} has nothing to train and DDP refuses such a model: run "
                             "`mmprompt test` with the same options instead (it prepares the adapter, e.g. builds "
                             "a cache, when the test starts), on one process or several")

    def _check_image_size(self, datamodule: Any) -> None:
        size = getattr(datamodule, "image_size", None)
        if size is not None and size != self.spec.image_size:
            raise ValueError(
                f"data.image_size={size} but model {self.spec.model_name!r} takes {self.spec.image_size}px images; "
                f"set data.image_size: {self.spec.image_size}"
            )

    def _metric_key(self, stage: str, index: int) -> str:
        return f"{stage}_{index}"

    # ------------------------------------------------------------------ features

    def prompts_for(self, classes: ClassSet) -> tuple[TokenizedPrompts, int]:
        """Tokenized and embedded prompts of ``classes`` (templates × classes), cached per class set."""
        device = self.clip.token_embedding.weight.device
        key = (classes, device)
        if key not in self._prompt_cache:
            texts = self.adapter.prompt_texts(classes)
            flat = [text for template_row in texts for text in template_row]
            self._prompt_cache[key] = (
                tokenize_prompts(self.clip, self.tokenizer, flat, truncate=self.speed.truncate_text), len(texts)
            )
        return self._prompt_cache[key]

    def encode_classes(self, classes: ClassSet, image_features: Tensor | None = None) -> Tensor:
        """Normalised text features (C, D), or (B, C, D) for image-conditioned adapters."""
        prompts, num_templates = self.prompts_for(classes)
        options = self._shortcuts
        features = encode_text(self.clip, prompts, self.adapter.text_injection(image_features), self.attend,
                               options.text_chunk_size, bucket_by_length=options.bucket_text,
                               pooled_only=options.prune_last_layer, share_prefix=options.share_text_prefix)
        features = F.normalize(self.adapter.transform_text_features(features, classes).float(), dim=-1)
        if num_templates > 1:  # template ensemble: mean of normalised features, renormalised
            features = F.normalize(features.unflatten(-2, (num_templates, -1)).mean(dim=-3), dim=-1)
        return features

    def text_features(self, classes: ClassSet, image_features: Tensor | None = None) -> Tensor:
        """Text features, reused while they can't change: in evaluation, or when the text side is frozen."""
        if self.adapter.conditions_text_on_image:
            return self.encode_classes(classes, image_features)
        frozen = not torch.is_grad_enabled() or not self.adapter.trains_text()
        if not (self.speed.cache_text_features and frozen):
            return self.encode_classes(classes)
        if classes not in self._text_cache:
            self._text_cache[classes] = self.encode_classes(classes).detach()
        return self._text_cache[classes]

    def image_features(self, images: Tensor) -> Tensor:
        features = encode_image(self.clip, images, self.adapter.vision_injection(), self.attend,
                                pooled_only=self._shortcuts.prune_last_layer)
        return F.normalize(self.adapter.transform_image_features(features).float(), dim=-1)

    def outputs(self, images: Tensor, classes: ClassSet) -> Outputs:
        """Features and logits of one batch: CLIP's ``logit_scale.exp()`` times the cosine of image and text
        features, plus the adapter's `extra_logits`."""
        image = self.image_features(images)
        text = self.text_features(classes, image)
        scale = self.clip.logit_scale.exp().float()
        logits = scale * (torch.einsum("bd,bcd->bc", image, text) if text.dim() == 3 else image @ text.t())
        if getattr(self.clip, "logit_bias", None) is not None:
            logits = logits + self.clip.logit_bias
        extra = self.adapter.extra_logits(image, classes)
        return Outputs(image, text, logits if extra is None else logits + extra)

    def forward(self, images: Tensor, classes: ClassSet) -> Tensor:
        """Logits (B, C) of ``images`` over ``classes`` (see `outputs`)."""
        return self.outputs(images, classes).logits

    # ------------------------------------------------------------------ steps

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        classes = self.class_sets("fit")[0]
        images, labels = batch["image"], batch["label"]
        outputs = self.outputs(images, classes)
        loss = F.cross_entropy(outputs.logits, labels)
        terms = self.adapter.regularizers(TrainingStep(images, labels, classes, outputs.image, outputs.text,
                                                       outputs.logits, self.frozen, self.current_epoch))
        for name, term in terms.items():
            self.log(f"train/{name}", term, batch_size=len(labels))
            loss = loss + term
        self.metrics[self._metric_key("fit", 0)].update(outputs.logits.detach(), labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        return loss if loss.requires_grad else None  # nothing to train (Tip-Adapter): no backward, no step

    def on_train_epoch_end(self) -> None:
        """``train/acc`` in percent, like ``val/*`` and ``test/*`` (synced across ranks by torchmetrics);
        then the adapter's end-of-epoch step."""
        metric = self.metrics[self._metric_key("fit", 0)]
        if metric.update_called:
            self.log("train/acc", 100.0 * float(metric.compute()), prog_bar=True)
            metric.reset()
        self.adapter.end_of_epoch(self.current_epoch, self.trainer.max_epochs)

    def _eval_step(self, stage: str, batch: dict[str, Tensor], dataloader_idx: int) -> Tensor:
        classes = self.class_sets(stage)[dataloader_idx]
        logits = self(batch["image"], classes)
        self.metrics[self._metric_key(stage, dataloader_idx)].update(logits, batch["label"])
        return logits

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self._eval_step("validate", batch, dataloader_idx)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self._eval_step("test", batch, dataloader_idx)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        logits = self(batch["image"], self.class_sets("predict")[dataloader_idx])
        return {"prediction": logits.argmax(dim=-1), "probability": logits.softmax(dim=-1), "index": batch["index"]}

    def on_validation_epoch_start(self) -> None:
        self._prepare_adapter("validate")
        self._text_cache.clear()

    def on_test_epoch_start(self) -> None:
        self._prepare_adapter("test")
        self._text_cache.clear()

    def on_predict_epoch_start(self) -> None:
        self._prepare_adapter("predict")
        self._text_cache.clear()

    def on_fit_start(self) -> None:
        self._prepare_adapter("fit")

    def _prepare_adapter(self, stage: str) -> None:
        """`Adapter.prepare` with the datamodule's few-shot training set, when the datamodule has one."""
        context = self._preparation_context(stage)
        if context is not None:
            self.adapter.prepare(context)

    def _preparation_context(self, stage: str) -> PreparationContext | None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if not isinstance(datamodule, ProvidesTrainingSet):
            return None
        return PreparationContext(datamodule.train_classes, datamodule.training_set, self.frozen, self.device,
                                  seed=int(getattr(datamodule, "seed", 1)), validation_set=datamodule.validation_set,
                                  stage=stage)

    def _log_eval_accuracies(self, stage: str) -> dict[str, float]:
        """Compute (synced across ranks), log and reset each class set's accuracy; add HM for base/new."""
        fractions: dict[str, float] = {}
        for index, classes in enumerate(self.class_sets(stage)):
            metric = self.metrics[self._metric_key(stage, index)]
            if not self._updated_on_any_rank(metric.update_called):
                continue
            fractions[classes.name] = float(metric.compute())
            metric.reset()
        results = percent_accuracies(METRIC_PREFIX[stage], fractions)
        for name, value in results.items():
            self.log(name, value, prog_bar=stage == "validate", add_dataloader_idx=False)
        return results

    def _updated_on_any_rank(self, updated: bool) -> bool:
        """Whether any process saw a batch: a rank with an empty shard must still join the metric's sync."""
        if self._trainer is None or self.trainer.world_size <= 1:
            return updated
        return bool(self.trainer.strategy.reduce(torch.tensor(float(updated), device=self.device), reduce_op="sum") > 0)

    def on_validation_epoch_end(self) -> None:
        self._log_eval_accuracies("validate")

    def on_test_epoch_end(self) -> None:
        #: the last test's accuracies in percent, e.g. {"test/base/acc": 81.2, "test/hm": 77.0}
        self.test_results = self._log_eval_accuracies("test")

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self) -> dict[str, Any] | None:
        parameters = [p for p in self.adapter.parameters() if p.requires_grad]
        if not parameters:
            log.warning("%s has no trainable parameters: nothing to optimise", type(self.adapter).__name__)
            return None
        if self.optimizer_factory is not None:
            optimizer = self.optimizer_factory(parameters)
        else:
            optimizer = torch.optim.SGD(parameters, lr=self.hparams.lr, momentum=self.hparams.momentum,
                                        weight_decay=self.hparams.weight_decay)
        cosine_epochs = self.hparams.cosine_epochs or self.trainer.max_epochs
        if not cosine_epochs or cosine_epochs < 1:
            raise ValueError("set trainer.max_epochs or model.cosine_epochs: the cosine schedule runs per epoch")
        interval = self.hparams.get("cosine_interval", "epoch")
        per = self._steps_per_epoch() if interval == "step" else 1
        factor = functools.partial(
            warmup_cosine_factor, base_lr=optimizer.param_groups[0]["lr"], warmup_epochs=self.hparams.warmup_epochs * per,
            warmup_lr=self.hparams.warmup_lr, cosine_epochs=cosine_epochs * per,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": LambdaLR(optimizer, factor), "interval": interval}}

    def _steps_per_epoch(self) -> int:
        """Optimiser steps per epoch, for a per-step schedule (the trainer's estimate over max_epochs)."""
        epochs = self.trainer.max_epochs
        if not epochs or epochs < 1:
            raise ValueError('cosine_interval "step" needs trainer.max_epochs >= 1')
        return max(1, int(self.trainer.estimated_stepping_batches) // epochs)

    # ------------------------------------------------------------------ adapter-only checkpoints

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Only the adapter's tensors: the frozen backbone is rebuilt from its name and weights."""
        state = super().state_dict(*args, **kwargs)
        keep = kwargs.get("prefix", "") + ADAPTER_PREFIX
        for key in [key for key in state if not key.startswith(keep)]:
            del state[key]
        return state

    def adapter_shapes(self) -> dict[str, tuple[int, ...]]:
        return shapes_of(self.state_dict())

    def load_state_dict(self, state_dict: dict[str, Tensor], strict: bool = True, assign: bool = False):
        """Load adapter tensors; every adapter key must be present with its shape, and no other adapter's."""
        self._prepare_adapter_to_load(state_dict)
        given = shapes_of({key: value for key, value in state_dict.items() if key.startswith(ADAPTER_PREFIX)})
        problems = shape_mismatches(self.adapter_shapes(), given, noun="adapter tensors", limit=5)
        if problems:
            raise ValueError(
                f"adapter state does not match {type(self.adapter).__name__} on {self.spec.model_name}: "
                + "; ".join(problems)
            )
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        # the frozen backbone is never in the checkpoint: report only adapter keys (none, after the check above)
        return type(result)([k for k in result.missing_keys if k.startswith(ADAPTER_PREFIX)], result.unexpected_keys)

    def _prepare_adapter_to_load(self, state_dict: dict[str, Tensor]) -> None:
        self.adapter.prepare_to_load({key[len(ADAPTER_PREFIX):]: value for key, value in state_dict.items()
                                      if key.startswith(ADAPTER_PREFIX)})

    def adapter_identity(self) -> dict[str, Any]:
        return {"adapter": qualified_name(self.adapter), "model_name": self.spec.model_name,
                "shapes": {key: list(shape) for key, shape in self.adapter_shapes().items()}}

    def describe(self) -> dict[str, Any]:
        """What a checkpoint needs to rebuild and use this model alone: adapter, backbone, classes, version."""
        return {**self.adapter_identity(), "adapter_config": self.adapter.config(),
                "pretrained": self.hparams.pretrained, "force_quick_gelu": self.hparams.force_quick_gelu,
                "class_sets": {stage: [class_set_record(c) for c in sets] for stage, sets in self._class_sets.items()},
                "version": __version__}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mmprompt"] = self.describe()
        hparams = checkpoint.setdefault("hyper_parameters", dict(self.hparams))
        hparams["adapter"] = self.adapter.config()  # so load_from_checkpoint(path) needs no other argument
        # Lightning does not save RNG states; with them a resumed run draws the same batches and crops
        checkpoint["rng_states"] = rng_snapshot()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "rng_states" in checkpoint:
            restore_rng(checkpoint["rng_states"])
        self._prepare_adapter_to_load(checkpoint.get("state_dict") or {})
        saved = checkpoint.get("mmprompt")
        if saved is None:
            return  # not written by mmprompt: load_state_dict still checks every adapter key
        for stage, records in saved.get("class_sets", {}).items():
            self._class_sets.setdefault(stage, [class_set_from_record(record) for record in records])
        if "test" in self._class_sets:
            self._class_sets.setdefault("predict", self._class_sets["test"])  # predict reads the test classes
        ours = self.adapter_identity()
        differences = [f"{field}: checkpoint {saved.get(field)!r}, this model {ours[field]!r}"
                       for field in ("adapter", "model_name") if saved.get(field) != ours[field]]
        if differences or saved.get("shapes") != ours["shapes"]:
            if not differences:
                differences.append("adapter tensor shapes differ (other hyper-parameters such as n_ctx or depth)")
            raise ValueError("checkpoint does not match the model: " + "; ".join(differences))
