"""The analysis callbacks and entry points inside real Lightning runs on the built-in synthetic data
and the tiny random-weight model: files, numbers, DDP, the interventions table and its CLI."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L
import pytest
import torch
import yaml
from run_helpers import hard_deadline

from mmprompt.adapters import BiasTuning, MaPLe, ZeroShot
from mmprompt.analysis import AttentionStatistics, evaluate_interventions, main, write_prompt_analysis
from mmprompt.analysis.interventions import MODES
from mmprompt.analysis.overlays import reference_maps
from mmprompt.data import FewShotDataModule
from mmprompt.module import PromptCLIPModule

TRAINER = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
               enable_checkpointing=False, limit_test_batches=2)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("data")
    FewShotDataModule(dataset="synthetic", root=str(root), shots=1, image_size=64).prepare_data()
    return str(root)


def datamodule(root: str, batch_size: int = 10) -> FewShotDataModule:
    return FewShotDataModule(dataset="synthetic", root=root, shots=1, image_size=64, eval_batch_size=batch_size)


def make_module(adapter, seed: int = 0) -> PromptCLIPModule:
    torch.manual_seed(seed)
    return PromptCLIPModule(adapter, model_name="mmprompt-tiny", pretrained=None)


def record(module, root: str, folder, **callback_args) -> tuple[AttentionStatistics, dict]:
    callback = AttentionStatistics(output_dir=str(folder), **callback_args)
    trainer = L.Trainer(callbacks=[callback], **TRAINER)
    results = trainer.test(module, datamodule=datamodule(root), verbose=False)
    return callback, results[0]


def test_statistics_callback_writes_tables_plots_and_overlays(data_root, tmp_path, capsys):
    zero_shot, _ = record(make_module(ZeroShot()), data_root, tmp_path / "zs", max_batches=1, overlay_images=3)
    module = make_module(MaPLe(depth=4))
    plain = L.Trainer(**TRAINER).test(module, datamodule=datamodule(data_root), verbose=False)[0]
    callback, recorded = record(module, data_root, tmp_path / "maple", max_batches=1, overlay_images=3,
                                reference=str(tmp_path / "zs"))
    assert recorded == pytest.approx(plain, abs=1e-6)  # recording changes no prediction
    assert module.attention_probe is None
    for name in ("attention_stats.csv", "attention_stats.md", "attention_stats.json", "attention_stats.png",
                 "attention_overlay.png", "attention_maps.pt"):
        assert (tmp_path / "maple" / name).stat().st_size > 0, name
    summary = json.loads((tmp_path / "maple" / "attention_stats.json").read_text())
    assert summary == callback.summary | {"meta": summary["meta"]}
    assert summary["vision"]["images"] == [10] * 12  # max_batches=1 of the 2 test batches of 10
    assert summary["vision"]["masked_images"][0] == 10
    ratios = torch.tensor(summary["vision"]["fg_ratio"])
    assert ratios.shape == (12, 2) and torch.isfinite(ratios).all() and (ratios > 0).all()
    assert (torch.tensor(summary["vision"]["prompt_mass"]) > 0).all()
    assert (torch.tensor(zero_shot.summary["vision"]["prompt_mass"]) == 0).all()
    assert (torch.tensor(summary["text"]["prompt_mass"])[1:] > 0).all()
    maps = torch.load(tmp_path / "maple" / "attention_maps.pt", weights_only=False)
    assert reference_maps(tmp_path / "zs", maps["images"])["name"] == "ZeroShot"  # same images: drawn side by side
    assert maps["maps"].shape == (3, 8, 8) and torch.allclose(maps["maps"].sum((1, 2)), torch.ones(3))
    out = capsys.readouterr().out
    assert "| layer | fg_ratio | lambda_cls | lambda_eot |" in out and "MaPLe" in out
    rows = (tmp_path / "maple" / "attention_stats.csv").read_text().splitlines()
    assert rows[0] == "tower,layer,head,prompt_mass,fg_share,fg_ratio" and len(rows) == 1 + 2 * 12 * 3


def test_statistics_during_validation_are_per_epoch(data_root, tmp_path):
    module = make_module(BiasTuning(layers=2))
    callback = AttentionStatistics(output_dir=str(tmp_path), stages=["validate"], max_batches=1, print_summary=False)
    trainer = L.Trainer(callbacks=[callback], max_epochs=1, limit_train_batches=1, num_sanity_val_steps=1,
                        **TRAINER)
    trainer.fit(module, datamodule=datamodule(data_root, batch_size=10))
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["val_epoch000_attention_stats.json"]
    assert callback.summary["vision"]["images"] == [10] * 12  # one batch; the sanity check is not recorded
    assert torch.tensor(callback.summary["vision"]["prompt_mass"]).abs().max() == 0


def test_ddp_recording_equals_single_process(data_root, tmp_path):
    """The first 40 test images: 4 batches of 10 in one process, 2 per rank (interleaved shards) in two."""
    callback = AttentionStatistics(output_dir=str(tmp_path / "single"), max_batches=100, print_summary=False)
    L.Trainer(callbacks=[callback], **{**TRAINER, "limit_test_batches": 4}).test(
        make_module(MaPLe(depth=2)), datamodule=datamodule(data_root), verbose=False)
    single = callback.summary
    callback = AttentionStatistics(output_dir=str(tmp_path / "ddp"), max_batches=100, print_summary=False)
    trainer = L.Trainer(callbacks=[callback], strategy="ddp_spawn", **{**TRAINER, "devices": 2})
    with hard_deadline():
        trainer.test(make_module(MaPLe(depth=2)), datamodule=datamodule(data_root), verbose=False)
    ddp = json.loads((tmp_path / "ddp" / "attention_stats.json").read_text())
    assert ddp["vision"]["images"] == single["vision"]["images"] == [40] * 12
    # every rank encodes the same 10 class prompts: counted once, as in one process, not once per rank
    assert ddp["text"]["sequences"] == single["text"]["sequences"] == [10] * 12
    for tower, metric in (("vision", "fg_ratio"), ("vision", "fg_share"), ("vision", "prompt_mass"),
                          ("text", "prompt_mass")):
        assert torch.allclose(torch.tensor(ddp[tower][metric]), torch.tensor(single[tower][metric]),
                              atol=1e-5), (tower, metric)


def test_interventions_table_on_a_prompt_and_a_bias_model(data_root, tmp_path):
    kwargs = {**TRAINER, "limit_test_batches": 1}
    maple = make_module(MaPLe(depth=4))
    with torch.no_grad():
        for p in maple.adapter.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    baseline = L.Trainer(**kwargs).test(maple, datamodule=datamodule(data_root), verbose=False)[0]
    table = evaluate_interventions(maple, datamodule(data_root), MODES, "both", "0:4", kwargs, tmp_path)
    assert list(table) == list(MODES)
    assert table["full"]["test/all/acc"] == pytest.approx(baseline["test/all/acc"])
    assert (tmp_path / "interventions.csv").read_text().startswith("mode,branch,layers,test/all/acc")
    assert "| mean_bias | both | 0:4 |" in (tmp_path / "interventions.md").read_text()
    bias = make_module(BiasTuning(layers=4, init_std=0.5))
    bias_table = evaluate_interventions(bias, datamodule(data_root), MODES, "vision", "all", kwargs)
    assert {round(row["test/all/acc"], 4) for row in bias_table.values()} == {round(bias_table["full"]["test/all/acc"], 4)}
    with pytest.raises(ValueError, match="unknown intervention mode 'bias'"):
        evaluate_interventions(bias, datamodule(data_root), ["bias"], trainer_kwargs=kwargs)
    with pytest.raises(ValueError, match="layers='0:20' is out of range: the text tower has layers 0..11"):
        evaluate_interventions(bias, datamodule(data_root), ["full"], "text", "0:20", kwargs)


def test_interventions_main_reads_a_run_config_and_checkpoint(data_root, tmp_path, capsys):
    module = make_module(MaPLe(depth=2), seed=3)
    with torch.no_grad():  # a trained adapter: only the checkpoint can bring these values back
        for p in module.adapter.parameters():
            p.add_(torch.randn_like(p))
    checkpoint = tmp_path / "last.ckpt"
    torch.save({"state_dict": module.state_dict(), "mmprompt": module.adapter_identity()}, checkpoint)
    config = {
        "model": {"adapter": {"class_path": "mmprompt.adapters.MaPLe", "init_args": {"depth": 2}},
                  "model_name": "mmprompt-tiny", "pretrained": None},
        "data": {"dataset": "synthetic", "root": data_root, "shots": 1, "eval_batch_size": 50},  # image_size: linked
        "trainer": {"max_epochs": 1},
        "seed_everything": 3,  # rebuilds the same random-weight backbone (checkpoints hold the adapter only)
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    table = main(["--config", str(tmp_path / "config.yaml"), "--ckpt_path", str(checkpoint), "--modes", "full",
                  "bias_only", "--branch", "vision", "--layers", "1", "--accelerator", "cpu",
                  "--limit_test_batches", "1"])
    expected = L.Trainer(**{**TRAINER, "limit_test_batches": 1}).test(
        module, datamodule=FewShotDataModule(**config["data"], image_size=64), verbose=False)[0]
    assert table["full"]["test/all/acc"] == pytest.approx(expected["test/all/acc"])
    with pytest.raises(FileNotFoundError, match="--allow_no_checkpoint"):  # the untrained adapter only when asked
        main(["--config", str(tmp_path / "config.yaml"), "--modes", "full"])
    untrained = main(["--config", str(tmp_path / "config.yaml"), "--modes", "full", "--accelerator", "cpu",
                      "--limit_test_batches", "1", "--output_dir", str(tmp_path / "untrained"), "--allow_no_checkpoint"])
    assert untrained["full"]["test/all/acc"] != pytest.approx(expected["test/all/acc"])
    assert "| bias_only |" in capsys.readouterr().out
    assert (tmp_path / "interventions.md").is_file()
    with pytest.raises(SystemExit):
        main(["--config", str(tmp_path / "config.yaml"), "--modes", "bias"])


def test_prompt_analysis_tables(data_root, tmp_path):
    module = make_module(MaPLe(depth=3))
    dm = datamodule(data_root, batch_size=10)
    dm.setup("test")
    tables = write_prompt_analysis(module, dm.test_dataloader(), tmp_path, k=3, max_batches=1)
    assert tables["prompt_words"][0]["nearest"] == "a" and tables["prompt_words"][1]["nearest"] == "photo"
    assert [row["injected"] for row in tables["vision_prompt_similarity"][:4]] == [True, True, True, False]
    assert tables["vision_prompt_similarity"][0]["images"] == 10
    assert (tmp_path / "prompt_words.md").read_text().startswith("| layer | position | nearest | cosine |")
    assert (tmp_path / "vision_prompt_similarity.csv").is_file()
    with pytest.raises(ValueError, match="ZeroShot has no text prompts.*ZeroShot has no vision prompts"):
        write_prompt_analysis(make_module(ZeroShot()), dm.test_dataloader(), tmp_path)
