"""KgCoOp and PromptSRC: logits and training loss equal to the official formulas computed by hand from
open_clip's own modules (fp32), Gaussian prompt aggregation (weights, a fit, an exact resume), and both
methods through the command line under 2-process DDP with export and the analysis callback."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from run_helpers import CrashAtEpoch, mmprompt
from torch import Tensor
from torch.utils.data import DataLoader

from mmprompt.adapters import KgCoOp, PromptSRC
from mmprompt.adapters.promptsrc import PROMPTSRC_TEMPLATES, gaussian_epoch_weights
from mmprompt.classes import ClassSet
from mmprompt.methods import label_of
from mmprompt.model.module import PromptCLIPModule
from mmprompt.run.cli import cli_main, main
from mmprompt.tools.export import load_adapter

TINY = "mmprompt-tiny"
REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
ATOL = 1e-5
#: a template that differs from the prompt "a photo of a {}.", so KgCoOp's regulariser is not 0 at init
PETS = ClassSet("all", ("dog", "cat", "big red car", "oak tree"), "a photo of a {}, a type of pet.")


def tiny_module(adapter, seed: int = 0) -> PromptCLIPModule:
    """The adapter on the tiny CLIP pretrained on the captioned world, its text context moved off its init."""
    torch.manual_seed(seed)
    module = PromptCLIPModule(adapter, model_name=TINY, pretrained="synthetic-world")
    with torch.no_grad():
        adapter.text.context.add_(0.05 * torch.randn_like(adapter.text.context))
    module.set_class_sets(train=PETS)
    module.setup("fit")
    return module


def training_step_of(module: PromptCLIPModule, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The module's own training step, with what it logs captured instead of sent to a trainer."""
    logged: dict[str, Tensor] = {}
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value.detach()))
    loss = module.training_step({"image": images, "label": labels}, 0)
    return loss, logged


def scalar(value: Tensor) -> float:
    return float(value.detach())


def batch(size: int = 3, seed: int = 1, pixels: int = 64) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 3, pixels, pixels, generator=generator), torch.arange(size) % len(PETS.classnames)


# ----------------------------------------------------------------------------- references, by hand


def reference_text(clip, tokens: Tensor, context: Tensor, deep: list[Tensor]) -> Tensor:
    """The official prompt learners' text encoder: token embeddings with positions 1..n replaced by the
    context, + positional embedding; before block i (1 <= i <= len(deep)) positions 1..n replaced by
    deep[i-1]; ln_final; the EOT row; @ text_projection."""
    n, count = context.shape[0], len(tokens)
    embedded = clip.token_embedding(tokens)
    x = torch.cat([embedded[:, :1], context.expand(count, -1, -1), embedded[:, 1 + n:]], dim=1)
    x = x + clip.positional_embedding
    for index, block in enumerate(clip.transformer.resblocks):
        if 1 <= index <= len(deep):
            x = torch.cat([x[:, :1], deep[index - 1].expand(count, -1, -1), x[:, 1 + n:]], dim=1)
        x = block(x, attn_mask=clip.attn_mask)
    x = clip.ln_final(x)
    return x[torch.arange(count), tokens.argmax(dim=-1)] @ clip.text_projection


def reference_image(clip, images: Tensor, prompts: list[Tensor]) -> Tensor:
    """PromptSRC's vision encoder: prompts[0] appended after the position-embedded patches (before ln_pre),
    the last n tokens replaced by prompts[i] before block i >= 1, ln_post of [cls], @ proj."""
    visual, count = clip.visual, len(images)
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(count, 1, -1), x], dim=1) + visual.positional_embedding
    n = prompts[0].shape[0] if prompts else 0
    if prompts:
        x = torch.cat([x, prompts[0].expand(count, -1, -1)], dim=1)
    x = visual.ln_pre(x)
    for index, block in enumerate(visual.transformer.resblocks):
        if 1 <= index < len(prompts):
            x = torch.cat([x[:, :-n], prompts[index].expand(count, -1, -1)], dim=1)
        x = block(x)
    return visual.ln_post(x[:, 0]) @ visual.proj


def prompt_tokens(module: PromptCLIPModule, classes: ClassSet) -> Tensor:
    return module.tokenizer([f"a photo of a {name}." for name in classes.classnames])


def frozen_text(module: PromptCLIPModule, templates: tuple[str, ...], classes: ClassSet) -> Tensor:
    """open_clip's text features (T, C, D) of every template and class, unnormalised (one call)."""
    texts = [template.format(name) for template in templates for name in classes.classnames]
    return module.clip.encode_text(module.tokenizer(texts)).unflatten(0, (len(templates), -1))


def test_hand_references_equal_open_clip_without_prompts():
    """The hand-rolled encoders are open_clip's own when the context is "a photo of a" and nothing is deep."""
    module = tiny_module(KgCoOp())
    clip, tokens = module.clip, prompt_tokens(module, PETS)
    images, _ = batch()
    with torch.no_grad():
        words = clip.token_embedding(module.tokenizer(["a photo of a"]))[0, 1:5]
        torch.testing.assert_close(reference_text(clip, tokens, words, []), clip.encode_text(tokens), atol=1e-6, rtol=0)
        torch.testing.assert_close(reference_image(clip, images, []), clip.encode_image(images), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- KgCoOp


def kgcoop_reference(module: PromptCLIPModule, images: Tensor, labels: Tensor) -> tuple[Tensor, dict, Tensor]:
    """htyao89/KgCoOp trainers/kgcoop.py in fp32: logits, the regulariser W * (1 - mean cos), the loss."""
    clip, adapter = module.clip, module.adapter
    text = F.normalize(reference_text(clip, prompt_tokens(module, PETS), adapter.text.context, []), dim=-1)
    frozen = F.normalize(frozen_text(module, (PETS.template,), PETS)[0], dim=-1)
    logits = clip.logit_scale.exp() * F.normalize(clip.encode_image(images), dim=-1) @ text.t()
    score = 1 - F.cosine_similarity(text, frozen, dim=1, eps=1e-7).mean()
    return logits, {"kg_text": 8.0 * score}, F.cross_entropy(logits, labels) + 8.0 * score


def test_kgcoop_is_coop_from_a_photo_of_a_and_its_distance_is_0_when_the_template_is_the_prompt():
    module = tiny_module(KgCoOp())
    assert module.adapter.prompt_texts(PETS) == [[f"a photo of a {name}." for name in PETS.classnames]]
    assert module.adapter.fold_refusal() and "prompt tokens" in module.adapter.fold_refusal()
    same = ClassSet("all", PETS.classnames, "a photo of a {}.")
    module.adapter.text.context.data = module.clip.token_embedding(module.tokenizer(["a photo of a"]))[0, 1:5]
    module.set_class_sets(train=same)
    _, logged = training_step_of(module, *batch())
    assert abs(logged["train/kg_text"]) < 1e-5  # the prompt is the template itself: no distance


# ----------------------------------------------------------------------------- PromptSRC


def promptsrc_reference(module: PromptCLIPModule, images: Tensor, labels: Tensor) -> tuple[Tensor, dict, Tensor]:
    """muzairkhattak/PromptSRC trainers/promptsrc.py in fp32: logits, the three terms, the loss."""
    clip, adapter = module.clip, module.adapter
    deep_text = list(adapter.text.deep)
    vision = list(adapter.vision.prompts)
    text = F.normalize(reference_text(clip, prompt_tokens(module, PETS), adapter.text.context, deep_text), dim=-1)
    image = F.normalize(reference_image(clip, images, vision), dim=-1)
    scale = clip.logit_scale.exp()
    logits = scale * image @ text.t()
    with torch.no_grad():
        fixed = F.normalize(frozen_text(module, PROMPTSRC_TEMPLATES, PETS).mean(dim=0), dim=-1)  # raw mean, normalised
        zero_shot_image = F.normalize(clip.encode_image(images), dim=-1)
        zero_shot_logits = scale * zero_shot_image @ fixed.t()
    terms = {
        "text_l1": F.l1_loss(text, fixed, reduction="mean") * 25,
        "image_l1": F.l1_loss(image, zero_shot_image, reduction="mean") * 10,
        "logit_kl": F.kl_div(F.log_softmax(logits / 1, dim=1), F.log_softmax(zero_shot_logits / 1, dim=1),
                             reduction="sum", log_target=True) * (1 * 1) / logits.numel(),
    }
    loss = F.cross_entropy(logits, labels) + (terms["logit_kl"] + terms["text_l1"] + terms["image_l1"])
    return logits, terms, loss


@pytest.mark.parametrize("make_adapter, reference", [(KgCoOp, kgcoop_reference), (PromptSRC, promptsrc_reference)],
                         ids=["kgcoop", "promptsrc"])
def test_logits_loss_terms_and_gradients_equal_the_official_formulas(make_adapter, reference):
    module = tiny_module(make_adapter())
    images, labels = batch()
    loss, logged = training_step_of(module, images, labels)
    expected_logits, expected_terms, expected_loss = reference(module, images, labels)
    with torch.no_grad():
        logits = module(images, PETS)
    assert (logits - expected_logits).abs().max() < ATOL
    for name, term in expected_terms.items():
        assert abs(logged[f"train/{name}"] - scalar(term)) < ATOL, name
        assert scalar(term) > 1e-4, name  # each term is really exercised
    assert abs(scalar(loss) - scalar(expected_loss)) < ATOL
    parameters = [p for p in module.adapter.parameters() if p.requires_grad]
    for got, expected in zip(torch.autograd.grad(loss, parameters), torch.autograd.grad(expected_loss, parameters)):
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)


def test_promptsrc_has_60_distinct_templates_all_from_open_clip():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    assert len(set(PROMPTSRC_TEMPLATES)) == 60
    assert PROMPTSRC_TEMPLATES[0] == "a photo of a {}." and PROMPTSRC_TEMPLATES[-1] == "itap of the {}."
    assert set(PROMPTSRC_TEMPLATES) <= {template("{}") for template in OPENAI_IMAGENET_TEMPLATES}


# ----------------------------------------------------------------------------- Gaussian prompt aggregation


def official_gaussian_weights(epochs: int, mean: float, std: float) -> np.ndarray:
    """The official numpy formula: the normal density at 1..N, divided by its sum."""
    x = np.arange(1, epochs + 1, dtype=np.float64)
    density = 1 / (std * np.sqrt(2 * np.pi)) * np.exp(-0.5 * ((x - mean) / std) ** 2)
    return density / density.sum()


def test_gaussian_weights_are_the_official_ones():
    weights = gaussian_epoch_weights(20, 15.0, 1.0)
    np.testing.assert_allclose(weights, official_gaussian_weights(20, 15.0, 1.0), rtol=1e-12, atol=1e-300)
    published = {10: 1.48672e-6, 11: 1.33830e-4, 12: 4.43185e-3, 13: 0.0539910, 14: 0.241971, 15: 0.398942,
                 16: 0.241971, 20: 1.48672e-6}
    for epoch, value in published.items():
        assert math.isclose(weights[epoch - 1], value, rel_tol=1e-5), epoch
    np.testing.assert_allclose(gaussian_epoch_weights(5, 30.0, 30.0), official_gaussian_weights(5, 30.0, 30.0),
                               rtol=1e-12)
    assert math.isclose(sum(gaussian_epoch_weights(3, 1000.0, 1.0)), 1.0)  # no 0/0 far from the run
    assert gaussian_epoch_weights(1, 15.0, 1.0) == [1.0]


class PromptSnapshots(L.Callback):
    """The prompts after each epoch's last step, before the module's end-of-epoch hook aggregates them."""

    def __init__(self) -> None:
        self.epochs: list[Tensor] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epochs.append(prompt_vector(pl_module))


def prompt_vector(module: PromptCLIPModule) -> Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in module.adapter.prompt_parameters()])


class AggregationOnly(PromptSRC):
    """PromptSRC trained on cross-entropy alone: the aggregation does not depend on the loss, and the
    60-template teacher would cost each of the three short fits below seconds."""

    def regularizers(self, step) -> dict[str, Tensor]:
        return {}


def aggregation_module() -> PromptCLIPModule:
    torch.manual_seed(0)
    module = PromptCLIPModule(AggregationOnly(depth=3, gpa_mean=2.0, gpa_std=1.0), model_name="mmprompt-tiny-wide",
                              pretrained=None, lr=0.05, warmup_epochs=0)  # 4 layers: the cheapest model
    module.set_class_sets(train=PETS)
    return module


def loader() -> DataLoader:
    images, labels = batch(4, seed=2, pixels=32)
    items = [{"image": image, "label": label} for image, label in zip(images, labels)]
    return DataLoader(items, batch_size=2, shuffle=False)


def fit(module: PromptCLIPModule, folder: Path, callbacks: list, ckpt_path: str | None = None) -> None:
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks, default_root_dir=folder)
    trainer.fit(module, train_dataloaders=loader(), ckpt_path=ckpt_path)


def test_after_the_last_epoch_the_prompts_are_the_gaussian_average_and_resume_is_exact(tmp_path):
    module, snapshots = aggregation_module(), PromptSnapshots()
    fit(module, tmp_path / "whole", [snapshots, ModelCheckpoint(dirpath=tmp_path / "whole", save_last=True)])
    weights = official_gaussian_weights(3, 2.0, 1.0)
    expected = sum(float(w) * epoch for w, epoch in zip(weights, snapshots.epochs))
    assert len(snapshots.epochs) == 3 and (snapshots.epochs[2] - snapshots.epochs[0]).abs().max() > 1e-3
    torch.testing.assert_close(prompt_vector(module), expected, atol=1e-7, rtol=0)
    assert (prompt_vector(module) - snapshots.epochs[2]).abs().max() > 1e-4  # averaged, not the last epoch's
    saved = torch.load(tmp_path / "whole" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    torch.testing.assert_close(saved["adapter.gpa_sum"], expected, atol=1e-7, rtol=0)

    crashed = aggregation_module()
    with pytest.raises(SystemError, match="simulated crash"):
        fit(crashed, tmp_path / "cut", [CrashAtEpoch(2), ModelCheckpoint(dirpath=tmp_path / "cut", save_last=True)])
    resumed = aggregation_module()
    fit(resumed, tmp_path / "cut", [ModelCheckpoint(dirpath=tmp_path / "cut", save_last=True)],
        ckpt_path=str(tmp_path / "cut" / "last.ckpt"))
    torch.testing.assert_close(prompt_vector(resumed), prompt_vector(module), atol=1e-7, rtol=0)


# ----------------------------------------------------------------------------- command line, 2 processes


def logged_columns(run: Path) -> set[str]:
    with open(next(run.rglob("metrics.csv")), newline="") as file:
        rows = list(csv.DictReader(file))
    return {key for row in rows for key, value in row.items() if value not in ("", None)}


@pytest.mark.slow
@pytest.mark.parametrize("method, terms", [("kgcoop", {"kg_text"}), ("promptsrc", {"text_l1", "image_l1", "logit_kl"})])
def test_method_fits_tests_and_exports_under_two_process_ddp(method, terms, data_root, tmp_path, capsys):
    """The demo (tiny CLIP, world shapes, its attention-statistics callback) with the method's own config,
    one short epoch on 2 processes; the loss terms reach metrics.csv; `mmprompt test` of the checkpoint on one
    process gives the fit's results; export keeps the adapter form only, and it loads."""
    result = mmprompt("fit", "--config", str(CONFIGS / "demo.yaml"), "--config", str(CONFIGS / "methods" / f"{method}.yaml"),
                      "--data.root", str(data_root), "--out_dir", str(tmp_path), "--version", "ddp",
                      "--data.shots", "2", "--data.batch_size", "4", "--trainer.max_epochs", "1",
                      "--trainer.log_every_n_steps", "1", "--model.lr", "0.05",
                      "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                      "--trainer.enable_progress_bar", "false", cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    run = tmp_path / "demo" / "ddp"
    assert {f"train/{term}" for term in terms} <= logged_columns(run)
    results = json.loads((run / "results.json").read_text())["metrics"]
    assert {"test/base/acc", "test/new/acc", "test/hm"} <= set(results)
    statistics = json.loads((run / "attention_stats.json").read_text())
    assert max(max(row) for row in statistics["text"]["prompt_mass"]) > 0  # λ_EOT: the prompts are attended
    vision_mass = max(max(row) for row in statistics["vision"]["prompt_mass"])
    assert vision_mass > 0 if method == "promptsrc" else vision_mass == 0  # KgCoOp has no vision prompts
    checkpoint = str(run / "checkpoints" / "last.ckpt")
    cli_main(["test", "--config", str(run / "config.yaml"), "--ckpt_path", checkpoint, "--version", "single",
              "--trainer.devices", "1", "--trainer.strategy", "auto", "--trainer.enable_progress_bar", "false"])
    assert json.loads((tmp_path / "demo" / "single" / "results.json").read_text())["metrics"] == results
    capsys.readouterr()
    assert main(["export", "--ckpt_path", checkpoint, "--out_dir", str(tmp_path / "export")]) == 0
    assert "no open_clip export" in (printed := capsys.readouterr().out) and "prompt tokens" in printed
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    assert type(load_adapter(tmp_path / "export").adapter).__name__ == label_of(method)
