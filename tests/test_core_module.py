"""The LightningModule: schedule, evaluation caching, adapter-only checkpoints, precision."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from mmprompt.adapters import BiasTuning, CoCoOp, CoOp, MaPLe, VPTDeep
from mmprompt.data import FewShotDataModule
from mmprompt.classes import ClassSet
from mmprompt.model import encoders
from mmprompt.model.module import PromptCLIPModule
from mmprompt.results import harmonic_mean
from mmprompt.model.schedule import warmup_cosine_factor

TINY = "mmprompt-tiny"


def test_lr_schedule_matches_maple_recipe():
    lrs = [0.0035 * warmup_cosine_factor(epoch, 0.0035, 1, 1e-5, 5) for epoch in range(5)]
    assert [round(lr, 6) for lr in lrs] == [0.00001, 0.0035, 0.003166, 0.002291, 0.001209]


def test_configured_optimizer_holds_only_adapter_parameters_and_follows_the_schedule():
    module = PromptCLIPModule(MaPLe(depth=3), model_name=TINY, pretrained=None)
    module.trainer = L.Trainer(max_epochs=5, logger=False, enable_checkpointing=False)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "epoch"
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["momentum"] == 0.9 and optimizer.defaults["weight_decay"] == 5e-4
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in module.adapter.parameters()}
    seen = []
    for _ in range(5):
        seen.append(round(optimizer.param_groups[0]["lr"], 6))
        scheduler.step()
    assert seen == [0.00001, 0.0035, 0.003166, 0.002291, 0.001209]


def test_harmonic_mean():
    assert harmonic_mean(94.07, 73.23) == pytest.approx(82.35, abs=0.01)
    assert harmonic_mean(0.0, 0.0) == 0.0


def _datamodule(root, **overrides) -> FewShotDataModule:
    settings = dict(dataset="synthetic", root=str(root), image_size=64, shots=4, subsample="base",
                    batch_size=4, eval_batch_size=10)
    settings.update(overrides)
    return FewShotDataModule(**settings)


def _trainer(tmp_path, **overrides) -> L.Trainer:
    settings = dict(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                    default_root_dir=str(tmp_path), accelerator="cpu", limit_train_batches=3, limit_val_batches=1,
                    num_sanity_val_steps=0)
    settings.update(overrides)
    return L.Trainer(**settings)


def _count_text_passes(monkeypatch) -> list[int]:
    calls = []
    original = encoders.encode_text

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr("mmprompt.model.module.encode_text", counting)
    return calls


@pytest.mark.parametrize("adapter, per_batch", [(MaPLe(depth=3), False), (CoCoOp(), True)], ids=["maple", "cocoop"])
def test_text_features_are_computed_once_per_evaluation(tmp_path, data_root, monkeypatch, adapter, per_batch):
    module = PromptCLIPModule(adapter, model_name=TINY, pretrained=None)
    datamodule = _datamodule(data_root)
    calls = _count_text_passes(monkeypatch)
    trainer = _trainer(tmp_path, limit_test_batches=3)
    trainer.test(module, datamodule=datamodule, verbose=False)
    test_batches = sum(min(3, len(loader)) for loader in trainer.test_dataloaders)
    assert len(calls) == (test_batches if per_batch else 2)  # one pass per class set: base and new
    assert set(module.test_results) == {"test/base/acc", "test/new/acc", "test/hm"}
    assert module.test_results["test/hm"] == pytest.approx(
        harmonic_mean(module.test_results["test/base/acc"], module.test_results["test/new/acc"]))


def test_frozen_text_side_is_encoded_once_per_training_run(tmp_path, data_root, monkeypatch):
    module = PromptCLIPModule(VPTDeep(n_ctx=2, depth=3), model_name=TINY, pretrained=None)
    calls = _count_text_passes(monkeypatch)
    _trainer(tmp_path, limit_val_batches=0).fit(module, datamodule=_datamodule(data_root))
    assert len(calls) == 1


def test_checkpoint_holds_only_adapter_tensors_and_round_trips(tmp_path, data_root):
    torch.manual_seed(0)
    module = PromptCLIPModule(MaPLe(depth=3), model_name=TINY, pretrained=None, lr=0.05, warmup_epochs=0)
    datamodule = _datamodule(data_root)
    trainer = _trainer(tmp_path)
    trainer.fit(module, datamodule=datamodule)
    path = tmp_path / "adapter.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["state_dict"] and all(key.startswith("adapter.") for key in checkpoint["state_dict"])
    assert sum(v.numel() for v in checkpoint["state_dict"].values()) == module.adapter.num_trainable_parameters()
    assert checkpoint["mmprompt"]["adapter"] == "mmprompt.adapters.maple.MaPLe"

    torch.manual_seed(0)  # same random backbone, fresh adapter
    restored = PromptCLIPModule(MaPLe(depth=3), model_name=TINY, pretrained=None)
    images = torch.randn(2, 3, 64, 64)
    classes = datamodule.train_classes
    before = restored(images, classes)
    trainer = _trainer(tmp_path)
    trainer.test(restored, datamodule=datamodule, ckpt_path=str(path), verbose=False)
    with torch.no_grad():
        module.eval(), restored.eval()
        assert not torch.allclose(before, restored(images, classes))
        assert torch.equal(restored(images, classes), module(images, classes))


def test_loading_another_adapters_checkpoint_says_what_differs(tmp_path, data_root):
    module = PromptCLIPModule(MaPLe(depth=3), model_name=TINY, pretrained=None)
    trainer = _trainer(tmp_path)
    trainer.fit(module, datamodule=_datamodule(data_root))
    path = tmp_path / "maple.ckpt"
    trainer.save_checkpoint(path)
    other = PromptCLIPModule(BiasTuning(depth=3), model_name=TINY, pretrained=None)
    with pytest.raises(ValueError, match=r"adapter: checkpoint 'mmprompt.adapters.maple.MaPLe', this model "
                                         r"'mmprompt.adapters.bias.BiasTuning'"):
        _trainer(tmp_path).test(other, datamodule=_datamodule(data_root), ckpt_path=str(path))
    deeper = PromptCLIPModule(MaPLe(depth=4), model_name=TINY, pretrained=None)
    with pytest.raises(ValueError, match="adapter tensor shapes differ"):
        _trainer(tmp_path).test(deeper, datamodule=_datamodule(data_root), ckpt_path=str(path))
    other_backbone = PromptCLIPModule(MaPLe(depth=3), model_name="mmprompt-tiny-wide", pretrained=None)
    with pytest.raises(ValueError, match=r"model_name: checkpoint 'mmprompt-tiny', this model 'mmprompt-tiny-wide'"):
        other_backbone.on_load_checkpoint(torch.load(path, weights_only=False))
    partial = {key: value for key, value in deeper.state_dict().items() if key != "adapter.text.deep"}
    with pytest.raises(ValueError, match=r"1 missing adapter tensors \(first: \['adapter.text.deep'\]\)"):
        deeper.load_state_dict(partial)


def test_novel_classes_are_set_at_test_time_without_retraining():
    module = PromptCLIPModule(CoOp(n_ctx=4), model_name=TINY, pretrained=None)
    base = ClassSet("base", ("circle", "square"), "a photo of a {}.")
    novel = ClassSet("new", ("star", "heart", "moon"), "a photo of a {}.")
    module.set_class_sets(train=base, test=[base, novel])
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert module(images, novel).shape == (2, 3)
        assert module(images, base).shape == (2, 2)


def test_bf16_mixed_precision_trains(tmp_path, data_root):
    module = PromptCLIPModule(MaPLe(depth=3), model_name=TINY, pretrained=None, warmup_epochs=0, lr=0.05)
    before = module.adapter.text.context.detach().clone()
    trainer = _trainer(tmp_path, precision="bf16-mixed", limit_val_batches=0)
    trainer.fit(module, datamodule=_datamodule(data_root))
    loss = trainer.callback_metrics["train/loss"]
    assert math.isfinite(float(loss))
    assert module.adapter.text.context.dtype == torch.float32
    assert not torch.equal(module.adapter.text.context.detach(), before)


def test_image_size_mismatch_is_reported(tmp_path, data_root):
    module = PromptCLIPModule(BiasTuning(depth=2), model_name=TINY, pretrained=None)
    with pytest.raises(ValueError, match=r"data.image_size=224 but model 'mmprompt-tiny' takes 64px"):
        _trainer(tmp_path).test(module, datamodule=_datamodule(data_root, image_size=224))


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    from mmprompt.model.checkpoint_io import AtomicCheckpointIO

    io, path = AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"adapter.x": torch.ones(3)}}, path)
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["adapter.x"], torch.ones(3))

    def killed_mid_write(obj, handle):
        handle.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"adapter.x": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["adapter.x"], torch.ones(3))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_predict_returns_probabilities_over_each_test_class_set(tmp_path, data_root):
    module = PromptCLIPModule(MaPLe(depth=3), model_name=TINY, pretrained=None)
    outputs = _trainer(tmp_path, limit_predict_batches=1).predict(module, datamodule=_datamodule(data_root))
    base, novel = outputs  # one list of batches per test dataloader: base and new classes
    assert base[0]["probability"].shape == (10, 5) and novel[0]["probability"].shape == (10, 5)
    assert torch.allclose(base[0]["probability"].sum(-1), torch.ones(10))
    assert torch.equal(base[0]["prediction"], base[0]["probability"].argmax(-1))


def test_train_val_and_test_accuracies_share_one_unit_percent(tmp_path, data_root, monkeypatch):
    monkeypatch.setattr("torchmetrics.classification.MulticlassAccuracy.compute", lambda self: torch.tensor(0.25))
    module = PromptCLIPModule(BiasTuning(depth=2), model_name=TINY, pretrained=None)
    trainer = _trainer(tmp_path, limit_test_batches=1)
    trainer.fit(module, datamodule=_datamodule(data_root))
    assert float(trainer.logged_metrics["train/acc"]) == pytest.approx(25.0)
    assert float(trainer.logged_metrics["val/base/acc"]) == pytest.approx(25.0)
    trainer.test(module, datamodule=_datamodule(data_root), verbose=False)
    assert module.test_results["test/base/acc"] == pytest.approx(25.0)
