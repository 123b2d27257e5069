"""The analysis callbacks and entry points inside real Lightning runs on the built-in synthetic data
and the tiny random-weight model: files, numbers, DDP, the interventions table and its CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L
import pytest
import torch
import yaml
from run_helpers import hard_deadline, mmprompt

from mmprompt.adapters import BiasTuning, MaPLe, ZeroShot
from mmprompt.analysis import (
    AttentionStatistics, InterventionTable, PromptAnalysis, RouteIntervention, evaluate_interventions,
    write_prompt_analysis,
)
from mmprompt.analysis.interventions import MODES
from mmprompt.analysis.overlays import reference_maps
from mmprompt.data import FewShotDataModule
from mmprompt.model.module import PromptCLIPModule
from mmprompt.run.cli import main

TRAINER = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
               enable_checkpointing=False, limit_test_batches=2)


def datamodule(root: Path, batch_size: int = 10) -> FewShotDataModule:
    return FewShotDataModule(dataset="synthetic", root=str(root), shots=1, image_size=64, eval_batch_size=batch_size)


def make_module(adapter, seed: int = 0) -> PromptCLIPModule:
    torch.manual_seed(seed)
    return PromptCLIPModule(adapter, model_name="mmprompt-tiny", pretrained=None)


def record(module, root: Path, folder, **callback_args) -> tuple[AttentionStatistics, dict]:
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
    module = make_module(BiasTuning(depth=2))
    callback = AttentionStatistics(output_dir=str(tmp_path), stages=["validate"], max_batches=1, print_summary=False)
    trainer = L.Trainer(callbacks=[callback], max_epochs=1, limit_train_batches=1, num_sanity_val_steps=1,
                        **TRAINER)
    trainer.fit(module, datamodule=datamodule(data_root, batch_size=10))
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["val_epoch000_attention_stats.json"]
    assert callback.summary["vision"]["images"] == [10] * 12  # one batch; the sanity check is not recorded
    assert torch.tensor(callback.summary["vision"]["prompt_mass"]).abs().max() == 0


@pytest.mark.slow
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
    bias = make_module(BiasTuning(depth=4, init_std=0.5))
    bias_table = evaluate_interventions(bias, datamodule(data_root), MODES, "vision", "all", kwargs)
    assert {round(row["test/all/acc"], 4) for row in bias_table.values()} == {round(bias_table["full"]["test/all/acc"], 4)}
    with pytest.raises(ValueError, match="unknown intervention mode 'bias'"):
        evaluate_interventions(bias, datamodule(data_root), ["bias"], trainer_kwargs=kwargs)
    with pytest.raises(ValueError, match="layers='0:20' is out of range: the text tower has layers 0..11"):
        evaluate_interventions(bias, datamodule(data_root), ["full"], "text", "0:20", kwargs)


def trained_run(module: PromptCLIPModule, root: Path, folder, seed: int) -> tuple:
    """A run folder as `mmprompt fit` leaves it: config.yaml and a checkpoint of a (perturbed) adapter."""
    with torch.no_grad():  # a trained adapter: only the checkpoint can bring these values back
        for p in module.adapter.parameters():
            p.add_(torch.randn_like(p))
    data = {"dataset": "synthetic", "root": str(root), "shots": 1, "eval_batch_size": 50}  # image_size: linked
    trainer = L.Trainer(**{**TRAINER, "limit_test_batches": 1})
    expected = trainer.test(module, datamodule=FewShotDataModule(**data, image_size=64), verbose=False)[0]
    (folder / "checkpoints").mkdir(parents=True)
    trainer.save_checkpoint(folder / "checkpoints" / "last.ckpt")
    config = {"model": {"adapter": module.adapter.config(), "model_name": "mmprompt-tiny", "pretrained": None},
              "data": data, "trainer": {"max_epochs": 1, "callbacks": [{"class_path": "mmprompt.analysis.AttentionStatistics"}]},
              "seed_everything": seed}  # the seed rebuilds the same random-weight backbone (not in checkpoints)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder / "config.yaml", expected


def test_interventions_alias_is_mmprompt_test_of_a_run_with_the_table(data_root, tmp_path, capsys):
    config, expected = trained_run(make_module(MaPLe(depth=2), seed=3), data_root, tmp_path / "run", seed=3)
    assert main(["interventions", "--config", str(config), "--modes", "full", "bias_only", "--branch", "vision",
                 "--layers", "1", "--trainer.accelerator", "cpu", "--trainer.limit_test_batches", "1"]) == 0
    rows = (tmp_path / "run" / "interventions.csv").read_text().splitlines()
    assert rows[0] == "mode,branch,layers,test/all/acc" and [r.split(",")[:3] for r in rows[1:]] == \
        [["full", "vision", "1"], ["bias_only", "vision", "1"]]
    assert float(rows[1].split(",")[3]) == pytest.approx(expected["test/all/acc"])
    assert "| bias_only |" in capsys.readouterr().out
    # in place: no new run folder, results.json or config, and the run's own callbacks (statistics) left out
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "checkpoints", "config.yaml", "interventions.csv", "interventions.md"]
    # the untrained adapter only when asked
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "config.yaml").write_text(config.read_text())
    assert main(["interventions", "--config", str(tmp_path / "copy" / "config.yaml"), "--modes", "full"]) == 2
    assert "--allow_no_checkpoint" in capsys.readouterr().err
    assert main(["interventions", "--config", str(tmp_path / "copy" / "config.yaml"), "--modes", "full",
                 "--trainer.limit_test_batches", "1", "--out_dir", str(tmp_path / "untrained"), "--allow_no_checkpoint"]) == 0
    untrained = (tmp_path / "untrained" / "interventions.csv").read_text().splitlines()[1].split(",")
    assert float(untrained[3]) != pytest.approx(expected["test/all/acc"])
    assert main(["interventions", "--config", str(config), "--modes", "bias"]) == 2  # one line, no usage dump
    assert "bias" in capsys.readouterr().err


def test_analysis_aliases_read_a_self_describing_checkpoint_alone(data_root, tmp_path, capsys):
    """No --config: the checkpoint's model and data options, the seed's default (1) for the backbone."""
    config, expected = trained_run(make_module(MaPLe(depth=2), seed=1), data_root, tmp_path / "run", seed=1)
    checkpoint = str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert main(["interventions", "--ckpt_path", checkpoint, "--modes", "full", "--trainer.limit_test_batches", "1"]) == 0
    full = (tmp_path / "run" / "interventions.csv").read_text().splitlines()[1].split(",")
    assert full[0] == "full" and float(full[3]) == pytest.approx(expected["test/all/acc"])
    assert main(["prompt-analysis", "--ckpt_path", checkpoint, "--k", "2", "--max_batches", "1",
                 "--trainer.limit_test_batches", "1"]) == 0
    words = (tmp_path / "run" / "prompt_words.csv").read_text().splitlines()
    assert words[0].startswith("layer,position,nearest,cosine") and len(words) == 1 + 2 * 2  # 2 layers x 2 tokens
    assert "vision_prompt_similarity:" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:  # the help of `mmprompt test`, with the alias's options
        main(["interventions", "--help"])
    assert exit_.value.code == 0 and "InterventionTable" in capsys.readouterr().out


def test_statistics_and_an_intervention_share_one_test_run(data_root, tmp_path):
    """The statistics probe only observes: under no_prompts in every vision layer it records the [cls]
    attention of the model without vision prompts, i.e. zero-shot CLIP's on the same backbone."""
    maple = make_module(MaPLe(depth=4))
    with torch.no_grad():
        for p in maple.adapter.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    zero_shot, _ = record(make_module(ZeroShot()), data_root, tmp_path / "zs", max_batches=1, print_summary=False)
    alone, _ = record(maple, data_root, tmp_path / "maple", max_batches=1, print_summary=False)
    statistics = AttentionStatistics(output_dir=str(tmp_path / "both"), max_batches=1, print_summary=False)
    intervention = RouteIntervention("no_prompts", "vision", "all")
    trainer = L.Trainer(callbacks=[statistics, intervention], **TRAINER)
    intervened = trainer.test(maple, datamodule=datamodule(data_root), verbose=False)[0]
    expected = L.Trainer(callbacks=[RouteIntervention("no_prompts", "vision", "all")], **TRAINER).test(
        maple, datamodule=datamodule(data_root), verbose=False)[0]
    assert intervened == pytest.approx(expected, abs=1e-6) and maple.attention_probe is None
    ratios = {name: torch.tensor(run.summary["vision"]["fg_ratio"]) for name, run in
              (("zs", zero_shot), ("maple", alone), ("both", statistics))}
    assert torch.allclose(ratios["both"], ratios["zs"], atol=1e-4)
    assert (ratios["maple"] - ratios["zs"]).abs().max() > 1e-3


@pytest.mark.slow
def test_table_and_prompt_analysis_under_ddp_equal_one_process(data_root, tmp_path):
    """Every rank evaluates its shard per mode and the counts are summed; the prompt tables come from
    the first test batches whatever the number of processes; rank 0 writes."""
    def callbacks(folder):
        return [InterventionTable(["full", "no_prompts", "mean_bias"], "vision", "0:2", output_dir=str(folder),
                                  print_table=False),
                PromptAnalysis(k=2, max_batches=1, output_dir=str(folder), print_tables=False)]

    L.Trainer(callbacks=callbacks(tmp_path / "single"), **{**TRAINER, "limit_test_batches": 4}).test(
        make_module(MaPLe(depth=2)), datamodule=datamodule(data_root), verbose=False)  # the first 40 images
    trainer = L.Trainer(callbacks=callbacks(tmp_path / "ddp"), strategy="ddp_spawn", **{**TRAINER, "devices": 2})
    with hard_deadline():  # 2 batches of 10 per rank: the same 40 images
        trainer.test(make_module(MaPLe(depth=2)), datamodule=datamodule(data_root), verbose=False)
    for name in ("interventions", "prompt_words", "vision_prompt_similarity"):
        single, ddp = ((tmp_path / run / f"{name}.csv").read_text().splitlines() for run in ("single", "ddp"))
        assert len(single) > 1 and single[0] == ddp[0], name
        for one, other in zip(single[1:], ddp[1:]):
            assert [cell if not is_number(cell) else pytest.approx(float(cell), abs=1e-4) for cell in one.split(",")] \
                == [cell if not is_number(cell) else float(cell) for cell in other.split(",")], name


@pytest.mark.slow
def test_interventions_alias_under_ddp_writes_what_one_process_writes(data_root, tmp_path):
    """DDP workers re-run the alias's command line: they build the same test, and rank 0 alone writes."""
    config, _ = trained_run(make_module(MaPLe(depth=2), seed=3), data_root, tmp_path / "run", seed=3)
    common = ["interventions", "--config", str(config), "--modes", "full", "mean_bias", "--layers", "0:2",
              "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]
    assert main([*common, "--trainer.limit_test_batches", "2", "--out_dir", str(tmp_path / "single")]) == 0
    ddp = mmprompt(*common, "--trainer.limit_test_batches", "1", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                   "--out_dir", str(tmp_path / "ddp"), cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    single, parallel = ((tmp_path / run / "interventions.csv").read_text().splitlines() for run in ("single", "ddp"))
    assert single == parallel  # eval batch 50: one batch on each of 2 ranks = the first two in one process


def is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


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
