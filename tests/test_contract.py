"""The adapter contract: each hook changes what its docstring says and nothing else, the declared
capabilities are checked when the module is built, and a method written outside the package (with a
loss term and a feature transform) trains through ``mmprompt fit`` with no edit to a core file."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from run_helpers import REPO, cli_env, run_with_hard_timeout
from torch import Tensor, nn

from mmprompt.adapters import Adapter, BuildContext, CoOp, ZeroShot
from mmprompt.adapters.base import PreparationContext, TrainingStep
from mmprompt.classes import ClassSet
from mmprompt.data import FewShotDataModule
from mmprompt.model.encoders import Injection
from mmprompt.model.module import PromptCLIPModule

TINY = "mmprompt-tiny"
CLASSES = ClassSet("all", ("dog", "cat", "big red car", "oak tree"), "a photo of a {}.")


@pytest.fixture(scope="module")
def images() -> Tensor:
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def tiny(adapter: Adapter) -> PromptCLIPModule:
    torch.manual_seed(0)
    module = PromptCLIPModule(adapter, model_name=TINY, pretrained=None)
    module.set_class_sets(train=CLASSES, test=[CLASSES])
    module.setup("fit")  # the metrics a training step updates
    return module


def open_clip_features(module: PromptCLIPModule, images: Tensor, classes: ClassSet) -> tuple[Tensor, Tensor]:
    """Raw pooled features from open_clip's own forward (no adapter)."""
    texts = [classes.template.format(name) for name in classes.classnames]
    with torch.no_grad():
        return module.clip.encode_image(images), module.clip.encode_text(module.tokenizer(texts))


class Residual(Adapter):
    """A feature adapter: ``f + W f`` on the pooled image features, W trainable."""

    def build(self, context: BuildContext) -> None:
        self.map = nn.Linear(context.spec.embed_dim, context.spec.embed_dim, bias=False)
        nn.init.normal_(self.map.weight, std=0.1)

    def trains_text(self) -> bool:
        return False

    def transform_image_features(self, features: Tensor) -> Tensor:
        return features + self.map(features)


class ResidualWithLogits(Residual):
    """Adds a fixed per-class logit offset, and pulls the image features toward the frozen ones."""

    def build(self, context: BuildContext) -> None:
        super().build(context)
        self.register_buffer("offset", torch.arange(len(CLASSES.classnames), dtype=torch.float32))

    def extra_logits(self, image_features: Tensor, classes: ClassSet) -> Tensor | None:
        return self.offset.expand(len(image_features), -1) if classes == CLASSES else None

    def regularizers(self, step: TrainingStep) -> dict[str, Tensor]:
        return {"pull": 3.0 * (step.image_features - step.frozen_image_features).abs().mean()}


# ------------------------------------------------------------------------- hooks


def test_feature_transform_and_extra_logits_equal_the_hand_computation(images):
    module = tiny(ResidualWithLogits()).eval()
    image, text = open_clip_features(module, images, CLASSES)
    with torch.no_grad():
        adapted = F.normalize(image + module.adapter.map(image), dim=-1)
        expected = module.clip.logit_scale.exp() * adapted @ F.normalize(text, dim=-1).t() + torch.arange(4.0)
        logits = module(images, CLASSES)
    assert (logits - expected).abs().max() < 1e-4
    other = ClassSet("new", ("ship", "house"))  # no offset for classes the adapter has nothing for
    with torch.no_grad():
        image_only = module(images, other)
        _, other_text = open_clip_features(module, images, other)
    expected_other = module.clip.logit_scale.exp() * adapted @ F.normalize(other_text, dim=-1).t()
    assert (image_only - expected_other).abs().max() < 1e-4


def test_regularizers_add_to_the_cross_entropy_and_frozen_image_features_are_computed_only_when_asked(
        images, monkeypatch):
    labels = torch.tensor([0, 2, 3])
    batch = {"image": images, "label": labels}
    calls: list[int] = []
    module = tiny(ResidualWithLogits())
    encode = module.frozen.encode_images
    monkeypatch.setattr(module.frozen, "encode_images", lambda x, normalize=True: calls.append(1) or encode(x, normalize))
    loss = module.training_step(batch, 0)
    image, text = open_clip_features(module, images, CLASSES)
    adapted = F.normalize(image + module.adapter.map(image), dim=-1)
    logits = module.clip.logit_scale.exp() * adapted @ F.normalize(text, dim=-1).t() + torch.arange(4.0)
    expected = F.cross_entropy(logits, labels) + 3.0 * (adapted - F.normalize(image, dim=-1)).abs().mean()
    assert abs(loss.item() - expected.item()) < 1e-5 and len(calls) == 1
    assert module.adapter.map.weight.requires_grad and loss.requires_grad
    plain = tiny(Residual())
    monkeypatch.setattr(plain.frozen, "encode_images", lambda *a, **k: calls.append(1))
    plain.training_step(batch, 0)
    assert len(calls) == 1  # no regulariser asked: the frozen image tower did not run


def test_frozen_text_features_are_per_template_normalised_and_computed_once(monkeypatch):
    module = tiny(ZeroShot())
    templates = ("a photo of a {}.", "art of the {}.")
    features = module.frozen.text_features(CLASSES, templates)
    assert features.shape == (2, 4, module.spec.embed_dim)
    for row, template in zip(features, templates):
        texts = [template.format(name) for name in CLASSES.classnames]
        with torch.no_grad():
            expected = F.normalize(module.clip.encode_text(module.tokenizer(texts)), dim=-1)
        assert (row - expected).abs().max() < 1e-5
    single = module.frozen.text_features(CLASSES)  # default: the class set's own template
    assert (single[0] - features[0]).abs().max() < 1e-5  # (shorter truncation: float-close, not equal)
    monkeypatch.setattr("mmprompt.model.module.encode_text", lambda *a, **k: pytest.fail("encoded twice"))
    assert module.frozen.text_features(CLASSES, list(templates)) is features


class Recorder(Residual):
    """Records what `prepare` saw and when `end_of_epoch` ran."""

    def build(self, context: BuildContext) -> None:
        super().build(context)
        self.prepared: list[tuple[int, ClassSet, int]] = []
        self.epochs: list[tuple[int, int]] = []

    def prepare(self, context: PreparationContext) -> None:
        data = context.training_set(crop_scale=(0.5, 1.0))
        self.prepared.append((len(data), context.classes, context.seed))

    def end_of_epoch(self, epoch: int, max_epochs: int) -> None:
        self.epochs.append((epoch, max_epochs))


def test_prepare_sees_the_few_shot_training_set_and_end_of_epoch_runs_after_each_epoch(tmp_path):
    datamodule = FewShotDataModule(dataset="synthetic", root=str(tmp_path / "data"), image_size=64, shots=2,
                                   seed=3, subsample="base", batch_size=4, eval_batch_size=10)
    module = PromptCLIPModule(Recorder(), model_name=TINY, pretrained=None, warmup_epochs=0)
    trainer = L.Trainer(max_epochs=2, limit_train_batches=1, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=datamodule)
    classes = datamodule.train_classes
    assert module.adapter.prepared[0] == (2 * classes.num_classes, classes, 3)
    assert module.adapter.epochs == [(0, 2), (1, 2)]


# ------------------------------------------------------------------------- declared capabilities


class LiesAboutItsText(CoOp):
    def trains_text(self) -> bool:
        return False


class LiesAboutFolding(CoOp):
    def fold_refusal(self) -> str | None:
        return None


class FoldableWithATransform(Residual):
    def fold_refusal(self) -> str | None:
        return None


class DeclaresTrainableText(Residual):
    """The same tensors as `Residual`, declared the safe way, so the module runs no check."""

    def trains_text(self) -> bool:
        return True


def test_a_frozen_text_declaration_is_checked_by_autograd_when_the_module_is_built():
    with pytest.raises(TypeError, match=r"LiesAboutItsText.trains_text\(\) is False, but its text features depend"):
        tiny(LiesAboutItsText(n_ctx=2))
    draws = []
    for adapter in (Residual(), DeclaresTrainableText()):  # checked vs not checked
        torch.manual_seed(5)
        module = PromptCLIPModule(adapter, model_name=TINY, pretrained=None)
        draws.append(torch.rand(3))
    assert torch.equal(*draws)  # the check leaves the random stream as it was
    assert module.text_features(CLASSES) is not None


def test_a_foldable_declaration_is_checked_against_what_the_adapter_does():
    with pytest.raises(TypeError, match=r"LiesAboutFolding.fold_refusal\(\) is None .* has prompts"):
        tiny(LiesAboutFolding(n_ctx=2))
    with pytest.raises(TypeError, match="has transform_image_features"):
        tiny(FoldableWithATransform())


def test_export_refuses_to_fold_with_the_methods_own_reason(tmp_path):
    from mmprompt.tools.export import export_open_clip

    with pytest.raises(ValueError, match="Residual is not declared foldable"):
        export_open_clip(tiny(Residual()), tmp_path)


# ------------------------------------------------------------------------- a method from outside the package

TOY_METHOD = '''
"""A toy method outside the package: a residual feature adapter with an L1 pull to the frozen features."""
import torch
from torch import nn

from mmprompt.adapters.base import Adapter
from mmprompt.methods import register_method


@register_method("toy_residual")
class ToyResidual(Adapter):
    def __init__(self, weight: float = 2.0) -> None:
        super().__init__()
        self.weight = weight

    def build(self, context):
        self.map = nn.Linear(context.spec.embed_dim, context.spec.embed_dim, bias=False)
        nn.init.zeros_(self.map.weight)

    def trains_text(self):
        return False

    def transform_image_features(self, features):
        return features + self.map(features)

    def regularizers(self, step):
        return {"pull": self.weight * (step.image_features - step.frozen_image_features).abs().mean()}
'''

TOY_CONFIG = '''
# A toy residual feature adapter (written outside the package).
model:
  adapter:
    class_path: toy_method.ToyResidual
    init_args:
      weight: 2.0
  warmup_epochs: 0
  lr: 0.5
'''


@pytest.mark.slow
def test_a_method_written_outside_the_package_trains_through_mmprompt_fit(tmp_path):
    folder = tmp_path / "my_methods"
    folder.mkdir()
    (folder / "toy_method.py").write_text(textwrap.dedent(TOY_METHOD))
    (folder / "toy.yaml").write_text(TOY_CONFIG)
    env = cli_env()
    env["PYTHONPATH"] = f"{folder}:{env['PYTHONPATH']}"  # the user's own folder of methods
    result = run_with_hard_timeout([sys.executable, "-m", "mmprompt", "fit", "--config", str(REPO / "configs" / "protocols" / "base2new.yaml"),
                      "--config", str(REPO / "configs" / "datasets" / "synthetic.yaml"),
                      "--config", str(REPO / "configs" / "tiny.yaml"), "--config", str(folder / "toy.yaml"),
                      "--model.pretrained", "null", "--data.root", str(tmp_path / "data"),
                      "--out_dir", str(tmp_path / "runs"), "--name", "toy", "--trainer.max_epochs", "2",
                      "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1",
                      "--trainer.enable_progress_bar", "false"], cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "toy" / "version_0"
    results = json.loads((run / "results.json").read_text())
    assert set(results["metrics"]) >= {"test/base/acc", "test/new/acc", "test/hm"}
    header, *rows = (run / "metrics.csv").read_text().splitlines()
    pull = header.split(",").index("train/pull")
    values = [float(row.split(",")[pull]) for row in rows if row.split(",")[pull]]
    assert values and values[0] < 1e-6 < max(values)  # zero-initialised map: the pull starts at 0 and moves
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert list(checkpoint["state_dict"]) == ["adapter.map.weight"]
