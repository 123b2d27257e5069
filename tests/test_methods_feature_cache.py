"""CLIP-Adapter, Tip-Adapter and Tip-Adapter-F: equal to the official formulas (computed here by hand
from open_clip's own ``encode_image``/``encode_text``, fp32), the cache built from the same random views
as a hand computation, stored in and restored from checkpoints and exports, and run through the CLI
(training-free test, fit, resume, 2-process DDP with identical caches on every rank)."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from run_helpers import mmprompt

from mmprompt.adapters import CLIPAdapter, TipAdapter, TipAdapterF
from mmprompt.adapters.base import PreparationContext
from mmprompt.adapters.tip_adapter import class_digest, search_alpha_beta, search_grid
from mmprompt.analysis import AttentionAccumulator, StatisticsProbe
from mmprompt.analysis.statistics import summary_table
from mmprompt.data import FewShotDataModule
from mmprompt.classes import ClassSet
from mmprompt.tools.export import export_adapter, export_open_clip, load_adapter
from mmprompt.model.module import PromptCLIPModule

TINY = "mmprompt-tiny"
REPO = Path(__file__).resolve().parents[1]
METHODS = REPO / "configs" / "methods"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
SHOTS, VIEWS = 2, 2  # a small cache: 10 synthetic classes x 2 shots, 2 random views each
OFFICIAL_SCALE = 100.0  # the official code's literal CLIP logit scale
#: end to end: logits of magnitude up to ~20 agree to 1e-5 absolute plus 1e-5 relative (fp32, mmprompt's
#: encoder path against open_clip's own); the adapters' arithmetic on the same features to 1e-6
CLOSE = dict(atol=1e-5, rtol=1e-5)
CACHE_OPTIONS = ["--model.adapter.init_args.augment_epoch", "2"]


def tiny_module(adapter, seed: int = 0) -> PromptCLIPModule:
    """``adapter`` on the tiny CLIP with CLIP's logit scale set to OpenAI's (exp = 100, as the official code)."""
    torch.manual_seed(seed)
    module = PromptCLIPModule(adapter, model_name=TINY, pretrained=None)
    with torch.no_grad():
        module.clip.logit_scale.fill_(math.log(OFFICIAL_SCALE))
    return module.eval()


@pytest.fixture(scope="module")
def datamodule(data_root) -> FewShotDataModule:
    """The synthetic dataset, SHOTS per class."""
    data = FewShotDataModule(dataset="synthetic", root=str(data_root), image_size=64, shots=SHOTS, batch_size=6,
                             eval_batch_size=20)
    data.prepare_data()
    return data


@pytest.fixture(scope="module")
def built(datamodule) -> tuple[PromptCLIPModule, torch.Tensor, torch.Tensor, int]:
    """A Tip-Adapter module with its cache built, the hand-computed keys and values, and how much the run's
    random state moved while the cache was built (nothing)."""
    module = tiny_module(TipAdapter(augment_epoch=VIEWS))
    state = torch.get_rng_state()
    module.adapter.prepare(context_of(module, datamodule))
    moved = int(not torch.equal(torch.get_rng_state(), state))
    keys, values = hand_cache(module.clip, datamodule, datamodule.seed, VIEWS)
    return module, keys, values, moved


def with_cache(adapter, built) -> PromptCLIPModule:
    """``adapter`` on the same tiny CLIP as ``built`` (same seed), its cache loaded from the built one."""
    module = tiny_module(adapter)
    own = module.state_dict()  # α, β and the search flag stay this adapter's
    module.load_state_dict({key: value if key.split(".")[1].startswith("cache") else own[key]
                            for key, value in built[0].state_dict().items()})
    return module


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {"image": torch.randn(5, 3, 64, 64, generator=generator), "label": torch.tensor([0, 2, 1, 1, 0])}


def context_of(module: PromptCLIPModule, data: FewShotDataModule, stage: str = "test") -> PreparationContext:
    return PreparationContext(data.train_classes, data.training_set, module.frozen, module.device, seed=data.seed,
                              validation_set=data.validation_set, stage=stage)


def hand_text(clip, tokenizer, classes: ClassSet) -> torch.Tensor:
    """Official ``clip_classifier`` with one template: normalised text features, (C, D)."""
    with torch.no_grad():
        return F.normalize(clip.encode_text(tokenizer([classes.template.format(c) for c in classes.classnames])), dim=-1)


def hand_cache(clip, data: FewShotDataModule, seed: int, views: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Official ``build_cache_model``: per view, every training image once in order, features raw; keys the
    normalised mean over views, values one-hot. Same random draws: CPU generator seeded with ``seed``."""
    dataset = data.training_set((0.5, 1.0))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.random.default_generator.manual_seed(seed)
        features = [torch.cat([clip.encode_image(dataset[i]["image"][None]) for i in range(len(dataset))])
                    for _ in range(views)]
    labels = torch.stack([dataset[i]["label"] for i in range(len(dataset))])
    keys = torch.stack(features, 0).mean(0)
    return keys / keys.norm(dim=-1, keepdim=True), F.one_hot(labels).float()


def hand_tip_logits(clip, images, text, keys, values, alpha, beta) -> torch.Tensor:
    """Official Tip-Adapter logits: ``100 f W + α exp(−(β − β f Kᵀ)) L``."""
    with torch.no_grad():
        features = clip.encode_image(images)
    features = features / features.norm(dim=-1, keepdim=True)
    affinity = features @ keys.t()
    return OFFICIAL_SCALE * features @ text.t() + ((-1) * (beta - beta * affinity)).exp() @ values * alpha


def attached_trainer(module: PromptCLIPModule, classes: ClassSet) -> PromptCLIPModule:
    """A module that can run `training_step` outside `fit` (with no trainer, logging only warns)."""
    module.set_class_sets(train=classes, test=[classes])
    module.setup("fit")  # the metrics of the class sets
    return module


# ----------------------------------------------------------------------------- CLIP-Adapter


def test_clip_adapter_logits_and_loss_equal_the_official_formula(batch, classes):
    module = tiny_module(CLIPAdapter())
    clip, tokenizer = module.clip, module.tokenizer
    w1, w2 = module.adapter.fc[0].weight, module.adapter.fc[2].weight
    assert w1.shape == (16, 64) and w2.shape == (64, 16) and module.adapter.num_trainable_parameters() == 2 * 16 * 64
    with torch.no_grad():
        raw = clip.encode_image(batch["image"])
        adapted = F.relu(F.relu(raw @ w1.t()) @ w2.t())
        assert adapted.min() >= 0  # ReLU after both linear maps
        mixed = 0.2 * adapted + 0.8 * raw
        assert (module.adapter.transform_image_features(raw) - mixed).abs().max() < 1e-6
        expected = clip.logit_scale.exp() * F.normalize(mixed, dim=-1) @ hand_text(clip, tokenizer, classes).t()
        logits = module(batch["image"], classes)
    assert torch.allclose(logits, expected, **CLOSE)
    loss = attached_trainer(module.train(), classes).training_step(batch, 0)
    assert abs(loss.item() - F.cross_entropy(expected, batch["label"]).item()) < 1e-5
    loss.backward()
    assert w1.grad is not None and all(p.grad is None for p in clip.parameters())


def test_clip_adapter_with_a_zero_output_layer_is_zero_shot(batch, classes):
    module = tiny_module(CLIPAdapter())
    with torch.no_grad():
        module.adapter.fc[2].weight.zero_()
        zero_shot = module.clip.logit_scale.exp() * F.normalize(module.clip.encode_image(batch["image"]), dim=-1) \
            @ hand_text(module.clip, module.tokenizer, classes).t()
        assert torch.allclose(module(batch["image"], classes), zero_shot, **CLOSE)  # normalising removes the 0.8


# ----------------------------------------------------------------------------- Tip-Adapter cache


def test_cache_equals_the_hand_computation_with_the_same_views_and_leaves_the_rng_alone(datamodule, built):
    module, keys, values, moved = built
    assert not moved, "building the cache must not move the run's random stream"
    adapter = module.adapter
    assert adapter.cache_keys.shape == (datamodule.train_classes.num_classes * SHOTS, 64) and torch.equal(adapter.cache_values, values)
    assert (adapter.cache_keys - keys).abs().max() < 1e-6
    assert int(adapter.cache_classes) == class_digest(datamodule.train_classes.classnames)
    before = adapter.cache_keys.clone()
    module.adapter.prepare(context_of(module, datamodule, "validate"))  # a second call keeps the cache
    assert torch.equal(adapter.cache_keys, before)


@pytest.mark.parametrize("method", [TipAdapter, TipAdapterF])
def test_tip_logits_and_loss_equal_the_official_formula(method, datamodule, built, batch):
    classes = datamodule.train_classes
    module = with_cache(method(alpha=1.7, beta=5.5, augment_epoch=VIEWS), built)
    keys, values = built[1:3]
    if method is TipAdapterF:  # trained keys are used as they are, not renormalised
        with torch.no_grad():
            module.adapter.cache_keys.add_(0.05 * torch.randn_like(keys))
        keys = module.adapter.cache_keys.detach().clone()
    expected = hand_tip_logits(module.clip, batch["image"], hand_text(module.clip, module.tokenizer, classes), keys,
                               values, 1.7, 5.5)
    with torch.no_grad():
        logits = module(batch["image"], classes)
        features = F.normalize(module.clip.encode_image(batch["image"]), dim=-1)
        cache = module.adapter.extra_logits(features, classes)
    assert (cache - ((-1) * (5.5 - 5.5 * features @ keys.t())).exp() @ values * 1.7).abs().max() < 1e-5
    assert torch.allclose(logits, expected, **CLOSE)
    assert abs(F.cross_entropy(logits, batch["label"]).item() - F.cross_entropy(expected, batch["label"]).item()) < 1e-5
    loss = attached_trainer(module, classes).training_step(batch, 0)
    if method is TipAdapter:
        assert loss is None  # nothing trains: no backward, no optimiser step
    else:
        assert loss.requires_grad and abs(loss.item() - F.cross_entropy(expected, batch["label"]).item()) < 1e-5


def test_tip_adapter_f_trains_only_the_keys_with_the_official_adamw_step(datamodule, built, batch):
    """One step of AdamW(lr 1e-3, eps 1e-4, weight decay 0.01) on the keys, by hand."""
    classes = datamodule.train_classes
    module = with_cache(TipAdapterF(), built)
    keys = module.adapter.cache_keys.detach().clone().requires_grad_(True)
    text = hand_text(module.clip, module.tokenizer, classes)
    values = module.adapter.cache_values
    with torch.no_grad():
        features = F.normalize(module.clip.encode_image(batch["image"]), dim=-1)
    logits = OFFICIAL_SCALE * features @ text.t() + ((-1) * (1.0 - 1.0 * features @ keys.t())).exp() @ values * 1.0
    F.cross_entropy(logits, batch["label"]).backward()
    expected = torch.optim.AdamW([keys], lr=1e-3, eps=1e-4, weight_decay=0.01)
    expected.step()
    parameters = [p for p in module.adapter.parameters() if p.requires_grad]
    assert parameters == [module.adapter.cache_keys]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, eps=1e-4, weight_decay=0.01)
    attached_trainer(module.train(), classes).training_step(batch, 0).backward()
    optimizer.step()
    assert (module.adapter.cache_keys - keys).abs().max() < 1e-6


def test_novel_classes_get_no_cache_logits(datamodule, built):
    module = built[0]
    novel = ClassSet("new", ("violin", "kettle", "zebra"), "a photo of a {}.")
    assert module.adapter.extra_logits(torch.zeros(2, 64), novel) is None
    assert module.adapter.extra_logits(torch.zeros(2, 64), datamodule.train_classes).shape == (2, 10)


def test_search_grid_and_first_maximiser_follow_the_official_search():
    betas, alphas = search_grid(7, 200), search_grid(3, 20)
    assert len(betas) == 200 and betas[0] == 0.1 and abs(betas[1] - 0.1345) < 1e-12 and abs(betas[-1] - 6.9655) < 1e-12
    assert len(alphas) == 20 and abs(alphas[-1] - 2.855) < 1e-12
    clip_logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    affinity = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])  # the cache points to the other class
    values = torch.eye(2)
    labels = torch.tensor([1, 0, 0])
    alpha, beta = search_alpha_beta(clip_logits, affinity, values, labels, [0.5, 1.0], [0.1, 2.0, 3.0])
    # 2/3 correct at (β 0.5, α 3), (β 1, α 2) and (β 1, α 3): β outer and a strict > keep the first
    assert (alpha, beta) == (3.0, 0.5)


def test_search_on_the_validation_set_sets_alpha_and_beta_once(datamodule):
    module = tiny_module(TipAdapter(augment_epoch=1, search=True, search_step=(5, 4)))
    module.adapter.prepare(context_of(module, datamodule, "fit"))
    adapter = module.adapter
    assert bool(adapter.searched)
    assert float(adapter.beta) in [pytest.approx(b) for b in search_grid(7, 5)]
    assert float(adapter.alpha) in [pytest.approx(a) for a in search_grid(3, 4)]
    f_module = tiny_module(TipAdapterF(augment_epoch=1, search=True, search_step=(5, 4)))
    f_module.adapter.prepare(context_of(f_module, datamodule, "fit"))
    assert not bool(f_module.adapter.searched)  # -F searches after training: at test
    f_module.adapter.prepare(context_of(f_module, datamodule, "test"))
    assert bool(f_module.adapter.searched)


# ----------------------------------------------------------------------------- storage, export, analysis


@pytest.mark.parametrize("method", [TipAdapter, TipAdapterF])
def test_cache_round_trips_through_export_and_refuses_to_fold(method, datamodule, built, batch, tmp_path):
    module = with_cache(method(), built)
    module.set_class_sets(test=[datamodule.train_classes])
    export_adapter(module, tmp_path)
    loaded = load_adapter(tmp_path, clip=module.clip)
    assert torch.equal(loaded.adapter.cache_keys, module.adapter.cache_keys)
    with torch.no_grad():
        assert torch.equal(loaded(batch["image"], datamodule.train_classes), module(batch["image"], datamodule.train_classes))
    with pytest.raises(ValueError, match=f"{method.__name__} adds logits from a cache .*--format adapter"):
        export_open_clip(module, tmp_path)


def test_a_loaded_cache_is_kept_by_prepare(datamodule, built, tmp_path):
    export_adapter(built[0], tmp_path)
    loaded = load_adapter(tmp_path, clip=built[0].clip)
    loaded.adapter.prepare(context_of(loaded, datamodule))  # no rebuild: the views would be drawn again
    assert torch.equal(loaded.adapter.cache_keys, built[0].adapter.cache_keys) and bool(loaded.adapter.cache_built)


def test_the_per_step_cosine_runs_over_every_optimiser_step(datamodule, tmp_path):
    """``cosine_interval: step`` (Tip-Adapter-F's per-iteration CosineAnnealingLR): 2 epochs of 2 steps
    give T_max = 4 steps, so the learning rate reaches 0 after the last step."""
    torch.manual_seed(0)
    optimizer = partial(torch.optim.AdamW, lr=1e-3, eps=1e-4, weight_decay=0.01)
    module = PromptCLIPModule(CLIPAdapter(), model_name=TINY, pretrained=None, optimizer=optimizer, warmup_epochs=0,
                              cosine_interval="step")
    trainer = L.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=0, logger=False, accelerator="cpu",
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=datamodule)
    assert trainer.lr_scheduler_configs[0].interval == "step"
    assert trainer.global_step == 4 and trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_clip_adapter_refuses_to_fold(tmp_path):
    with pytest.raises(ValueError, match="CLIPAdapter adds an MLP .*--format adapter"):
        export_open_clip(tiny_module(CLIPAdapter()), tmp_path)


@pytest.mark.parametrize("method", [CLIPAdapter, TipAdapter])
def test_statistics_say_there_are_no_prompt_tokens(method, datamodule, built, batch):
    module = built[0] if method is TipAdapter else tiny_module(method())
    recorder = StatisticsProbe(AttentionAccumulator.zeros(module.spec))
    recorder.set_batch(None, None)
    with torch.no_grad(), module.probed(recorder):
        module(batch["image"], datamodule.train_classes)
    summary = recorder.accumulator.summary()
    assert torch.tensor(summary["vision"]["prompt_mass"]).abs().max() == 0  # λ = 0
    assert torch.tensor(summary["text"]["prompt_mass"]).abs().max() == 0
    summary["meta"] = {"adapter": method.__name__, "prompt_tokens": False}
    assert "no prompt tokens: λ = 0" in summary_table(summary)


# ----------------------------------------------------------------------------- the CLI


def results_of(run: Path) -> dict[str, float]:
    return json.loads((run / "results.json").read_text())["metrics"]


def cli(command: str, method: str, data_root: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [command, "--config", str(REPO / "configs" / "tiny.yaml"), "--config", str(METHODS / f"{method}.yaml"),
            "--model.pretrained", "null", "--data.dataset", "synthetic", "--data.root", str(data_root),
            "--data.shots", str(SHOTS), "--data.batch_size", "6", "--out_dir",
            str(tmp_path), "--name", method, *QUIET, *(CACHE_OPTIONS if method.startswith("tip") else []), *extra]


@pytest.mark.slow
def test_training_free_tip_adapter_through_test_and_fit_and_under_ddp(data_root, tmp_path):
    """`mmprompt test` builds the cache at test start; `mmprompt fit` runs no epoch and tests the same; two
    processes build identical caches (the same test metrics as one process); a 2-process fit, which DDP
    refuses for a model with nothing to train, says to run `mmprompt test`."""
    ok(mmprompt(*cli("test", "tip_adapter", data_root, tmp_path, "--version", "tested"), cwd=tmp_path))
    ok(mmprompt(*cli("fit", "tip_adapter", data_root, tmp_path, "--version", "fitted"), cwd=tmp_path))
    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--version", "ddp"]
    ok(mmprompt(*cli("test", "tip_adapter", data_root, tmp_path, *ddp), cwd=tmp_path))
    runs = tmp_path / "tip_adapter"
    tested = results_of(runs / "tested")
    assert results_of(runs / "fitted") == tested == results_of(runs / "ddp")
    assert 0 < tested["test/all/acc"] <= 100
    refused = mmprompt(*cli("fit", "tip_adapter", data_root, tmp_path, *ddp[:-1], "ddp_fit"), cwd=tmp_path)
    assert refused.returncode != 0 and "TipAdapter has nothing to train" in refused.stderr
    assert "run `mmprompt test` with the same options" in refused.stderr


@pytest.mark.slow
def test_tip_adapter_f_fits_resumes_and_runs_under_ddp(data_root, tmp_path):
    """Fit one epoch (per-step cosine), resume to two from last.ckpt with the cache restored exactly, and a
    2-process fit with the statistics callback (λ = 0 said in its output)."""
    fit = cli("fit", "tip_adapter_f", data_root, tmp_path, "--trainer.max_epochs", "1", "--version", "first")
    ok(mmprompt(*fit, cwd=tmp_path))
    first = tmp_path / "tip_adapter_f" / "first" / "checkpoints" / "last.ckpt"
    saved = torch.load(first, map_location="cpu", weights_only=False)
    assert saved["state_dict"]["adapter.cache_keys"].shape == (10 * SHOTS, 64)
    assert bool(saved["state_dict"]["adapter.cache_built"])
    resumed = cli("fit", "tip_adapter_f", data_root, tmp_path, "--trainer.max_epochs", "2", "--version", "first",
                  "--ckpt_path", "last")
    ok(mmprompt(*resumed, cwd=tmp_path))
    after = torch.load(first, map_location="cpu", weights_only=False)
    assert after["epoch"] == 1 and torch.equal(after["state_dict"]["adapter.cache_values"],
                                               saved["state_dict"]["adapter.cache_values"])
    statistics = "[{class_path: mmprompt.analysis.AttentionStatistics, init_args: {max_batches: 1}}]"
    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--version", "ddp", "--trainer.max_epochs", "1",
           "--trainer.callbacks", statistics]
    result = mmprompt(*cli("fit", "tip_adapter_f", data_root, tmp_path, *ddp), cwd=tmp_path)
    ok(result)
    assert "no prompt tokens: λ = 0" in result.stdout
    assert 0 < results_of(tmp_path / "tip_adapter_f" / "ddp")["test/all/acc"] <= 100


@pytest.mark.slow
def test_clip_adapter_fits_under_ddp_and_exports(data_root, tmp_path):
    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--version", "ddp", "--trainer.max_epochs", "1"]
    ok(mmprompt(*cli("fit", "clip_adapter", data_root, tmp_path, *ddp), cwd=tmp_path))
    checkpoint = tmp_path / "clip_adapter" / "ddp" / "checkpoints" / "last.ckpt"
    ok(mmprompt("export", "--ckpt_path", str(checkpoint), "--out_dir", str(tmp_path / "export"), cwd=tmp_path))
    assert (tmp_path / "export" / "adapter.safetensors").is_file()


def ok(result) -> None:
    assert result.returncode == 0, result.stderr[-4000:]
