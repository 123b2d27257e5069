"""The command line: every shipped config runs, the demo learns, resume gives the same metrics (DDP: test_distributed.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from data_fakes import FAKES, make_fake

from mmprompt.data import get_spec
from mmprompt.methods import methods
from mmprompt.model.checkpoint_io import AtomicCheckpointIO
from mmprompt.run.cli import cli_main, main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
METHODS = [CONFIGS / info.config for info in methods()]  # = configs/methods/*.yaml (tests/test_registries.py)
DATASETS = sorted((CONFIGS / "datasets").glob("*.yaml"))
PROTOCOLS = sorted((CONFIGS / "protocols").glob("*.yaml"))
ANALYSES = sorted((CONFIGS / "analysis").glob("*.yaml"))
TINY = str(CONFIGS / "tiny.yaml")
#: the file each analysis config's callback writes into the run folder
ANALYSIS_OUTPUT = {"attention": "attention_stats.json", "interventions": "interventions.csv",
                   "prompts": "prompt_words.csv"}


def quick_args(root: Path, out: Path) -> list[str]:
    return ["--config", TINY, "--data.root", str(root), "--out_dir", str(out), "--trainer.fast_dev_run", "1",
            "--trainer.enable_progress_bar", "false", "--data.eval_batch_size", "10"]


def yaml_value(path: Path, key: str) -> str:
    return next(line.split(":", 1)[1].strip() for line in path.read_text().splitlines() if line.strip().startswith(key))


def test_version_and_help(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == "mmprompt 0.1.0"
    assert main(["--help"]) == 0
    assert "check-data" in capsys.readouterr().out


@pytest.mark.parametrize("method", METHODS, ids=lambda p: p.stem)
def test_every_method_config_runs_one_batch(method, data_root, tmp_path):
    subcommand = "test" if method.stem == "zero_shot" else "fit"
    cli = cli_main([subcommand, "--config", str(CONFIGS / "protocols" / "base2new.yaml"), "--config", str(method),
                    "--config", str(CONFIGS / "datasets" / "synthetic.yaml"), *quick_args(data_root, tmp_path)])
    assert type(cli.model.adapter).__name__ == yaml_value(method, "class_path").rsplit(".", 1)[-1]
    assert cli.trainer.state.finished
    assert set(cli.model.test_results) == {"test/base/acc", "test/new/acc", "test/hm"}


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=lambda p: p.stem)
def test_every_protocol_config_runs_one_batch(protocol, data_root, tmp_path):
    cli = cli_main(["fit", "--config", str(protocol), "--config", str(CONFIGS / "methods" / "bias.yaml"),
                    "--config", str(CONFIGS / "datasets" / "synthetic.yaml"), *quick_args(data_root, tmp_path)])
    assert cli.trainer.state.finished and cli.model.test_results
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def is_generated(config: Path) -> bool:
    return get_spec(yaml_value(config, "dataset")).generate is not None


@pytest.mark.parametrize("dataset", [p for p in DATASETS if is_generated(p)], ids=lambda p: p.stem)
def test_every_generated_dataset_config_runs_one_batch(dataset, data_root, tmp_path):
    cli = cli_main(["test", "--config", str(CONFIGS / "methods" / "zero_shot.yaml"), "--config", str(dataset),
                    *quick_args(data_root, tmp_path)])
    assert set(cli.model.test_results) == {"test/all/acc"}
    assert cli.datamodule.spec.name == yaml_value(dataset, "dataset")


@pytest.mark.parametrize("dataset", [p for p in DATASETS if not is_generated(p)], ids=lambda p: p.stem)
def test_every_dataset_config_runs_one_batch_on_a_fake_tree(dataset, tmp_path):
    name = get_spec(yaml_value(dataset, "dataset")).name
    make_fake(name, tmp_path / "data")
    if name == "ImageNetSketch":
        make_fake("ImageNet", tmp_path / "data")  # Sketch reads ImageNet's classnames.txt
    cli = cli_main(["test", "--config", str(CONFIGS / "methods" / "zero_shot.yaml"), "--config", str(dataset),
                    *quick_args(tmp_path / "data", tmp_path / "runs")])
    fake = make_fake(name, tmp_path / "d2")
    assert len(cli.datamodule.eval_classes("test")[0].classnames) == len(fake.classnames)
    assert len(cli.trainer.test_dataloaders.dataset) == fake.sizes["test"]
    tested = min(10, fake.sizes["test"])  # fast_dev_run: the first batch of 10
    correct = cli.model.test_results["test/all/acc"] * tested / 100  # a count of the images tested, not a padded one
    assert correct == pytest.approx(round(correct), abs=1e-4) and 0 <= round(correct) <= tested


def test_every_fake_dataset_has_a_config():
    configured = {get_spec(yaml_value(p, "dataset")).name for p in DATASETS}
    assert set(FAKES) <= configured


@pytest.mark.parametrize("analysis", ANALYSES, ids=lambda p: p.stem)
def test_every_analysis_config_runs_inside_mmprompt_test(analysis, data_root, tmp_path):
    cli = cli_main(["test", "--config", str(CONFIGS / "demo.yaml"), "--config", str(analysis),
                    *quick_args(data_root, tmp_path)])
    shipped = yaml.safe_load(analysis.read_text())["trainer"]["callbacks"]
    assert [type(c).__name__ for c in cli.trainer.callbacks if type(c).__module__.startswith("mmprompt.analysis")] \
        == [callback["class_path"].rsplit(".", 1)[-1] for callback in shipped]
    written = list(tmp_path.rglob(ANALYSIS_OUTPUT[analysis.stem]))
    assert len(written) == 1 and written[0].stat().st_size > 0


def test_every_shipped_config_is_loaded_by_a_test():
    """A config no test loads can rot unseen: each one runs above, or in tests/test_pretrain.py."""
    pretrain = {CONFIGS / "pretrain" / "world.yaml", CONFIGS / "pretrain" / "world_quick.yaml"}  # RECIPE, QUICK
    claims = {*(CONFIGS / "budgets").glob("*.yaml"), CONFIGS / "presets" / "claims.yaml"}  # tests/test_claims_preset.py
    loaded = {*METHODS, *DATASETS, *PROTOCOLS, *ANALYSES, CONFIGS / "demo.yaml", CONFIGS / "tiny.yaml", *pretrain, *claims}
    assert sorted(set(CONFIGS.rglob("*.yaml")) - loaded) == []


def test_adapter_layers_option_takes_a_list_of_layer_indices(data_root, tmp_path):
    """One vocabulary: depth = layers 0..depth-1, layers = 0-based indices, n_ctx = prompt tokens."""
    base = ["fit", "--config", str(CONFIGS / "demo.yaml"), "--data.root", str(data_root), "--out_dir", str(tmp_path),
            "--trainer.fast_dev_run", "1", "--trainer.enable_progress_bar", "false"]
    cli = cli_main([*base, "--config", str(CONFIGS / "methods" / "bias.yaml"), "--model.adapter.init_args.layers",
                    "[2]"])  # a list of one layer is a list
    assert cli.model.adapter.layer_indices == {"text": [2], "vision": [2]}


def _fit(root: Path, out: Path, version: str, *extra: str) -> dict:
    cli_main(["fit", "--config", str(CONFIGS / "demo.yaml"), "--data.root", str(root), "--out_dir", str(out),
              "--version", version, "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3",
              "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]", *extra])
    return json.loads((out / "demo" / version / "results.json").read_text())


def test_killed_run_resumes_with_ckpt_path_last_to_the_same_metrics(data_root, tmp_path):
    uninterrupted = _fit(data_root, tmp_path, "full")
    crash = ["--trainer.callbacks+=run_helpers.CrashAtEpoch", "--trainer.callbacks.init_args.epoch", "1"]
    with pytest.raises(SystemError, match="simulated crash"):
        _fit(data_root, tmp_path, "killed", *crash)
    run = tmp_path / "demo" / "killed"
    assert (run / "checkpoints" / "last.ckpt").is_file() and not (run / "results.json").exists()
    resumed = _fit(data_root, tmp_path, "killed", "--ckpt_path", "last")
    assert resumed["metrics"] == uninterrupted["metrics"]
    # metrics.csv keeps epoch 0 from before the crash: row for row the uninterrupted run's file
    logged = [(run / "metrics.csv").read_text() for run in (tmp_path / "demo" / "full", run)]
    assert ",0," in logged[1] and logged[1] == logged[0]


def test_runs_never_share_a_folder_and_keep_their_config(data_root, tmp_path):
    for _ in range(2):
        cli_main(["fit", "--config", str(CONFIGS / "demo.yaml"), "--data.root", str(data_root), "--out_dir",
                  str(tmp_path), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
                  "--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "false",
                  "--trainer.callbacks", "[]"])
    runs = sorted(p.name for p in (tmp_path / "demo").iterdir())
    assert runs == ["version_0", "version_1"]
    for run in runs:
        folder = tmp_path / "demo" / run
        assert {"config.yaml", "metrics.csv", "results.json"} <= {p.name for p in folder.iterdir()}
        assert "MaPLe" in (folder / "config.yaml").read_text()
        assert list((folder / "checkpoints").glob("last.ckpt"))


def test_bad_input_gives_clear_errors(data_root, tmp_path, capsys):
    base = ["fit", "--config", str(CONFIGS / "demo.yaml"), "--data.root", str(data_root), "--out_dir", str(tmp_path),
            "--trainer.fast_dev_run", "1", "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]"]
    assert main(base + ["--model.adapter", "mmprompt.adapters.NoSuchAdapter"]) == 2  # option errors: no usage dump
    error = capsys.readouterr().err
    assert error.startswith("mmprompt: error:") and "NoSuchAdapter" in error and "usage:" not in error
    assert main(base + ["--model.no_such_option", "1"]) == 2
    assert "no_such_option" in capsys.readouterr().err
    assert main(base + ["--data.dataset", "imagenett"]) == 2
    error = capsys.readouterr().err
    assert "mmprompt: error:" in error and "imagenett" in error and "OxfordPets" in error
    assert main(base + ["--data.root", str(tmp_path / "missing"), "--data.dataset", "EuroSAT"]) == 2
    assert "missing" in capsys.readouterr().err


def test_checkpoint_from_another_adapter_is_a_clear_error(data_root, tmp_path, capsys):
    _fit(data_root, tmp_path, "maple", "--trainer.max_epochs", "1")
    checkpoint = tmp_path / "demo" / "maple" / "checkpoints" / "last.ckpt"
    status = main(["test", "--config", str(CONFIGS / "demo.yaml"), "--config", str(CONFIGS / "methods" / "bias.yaml"),
                   "--model.adapter.init_args.depth", "9", "--data.root", str(data_root), "--out_dir", str(tmp_path),
                   "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]", "--ckpt_path", str(checkpoint)])
    assert status == 2
    assert "checkpoint does not match the model: adapter: checkpoint 'mmprompt.adapters.maple.MaPLe'" in \
        capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs_end_to_end_and_beats_chance(data_root, tmp_path, capsys):
    """The README's first command, in this process (one process: nothing to hang on; ~1-2 min of training)."""
    assert main(["fit", "--config", str(CONFIGS / "demo.yaml"), "--data.root", str(data_root),
                 "--out_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"]) == 0
    printed = capsys.readouterr().out
    assert "fg_ratio" in printed and "test/base/acc" in printed
    results = json.loads((tmp_path / "demo" / "version_0" / "results.json").read_text())
    chance = 100 / 5  # 10 synthetic classes: 5 base
    assert results["metrics"]["test/base/acc"] > 1.5 * chance
    assert (tmp_path / "demo" / "version_0" / "attention_stats.png").is_file()


@pytest.mark.parametrize("args, expected", [
    (["--trainer.limit_test_batches", "1"], ["limit_test_batches"]),
    (["--trainer.limit_val_batches=1", "--trainer.limit_train_batches", "0.5"], ["limit_val_batches"]),
    (["--trainer.limit_test_batches", "1.0"], []),  # a float is a fraction: 1.0 is every batch
    (["--config", "trainer: {limit_predict_batches: 1, limit_test_batches: 1.0}"], ["limit_predict_batches"]),
    (["--config", "trainer: {limit_test_batches: 1}", "--trainer.limit_test_batches", "3"], []),  # the last one wins
    (["--trainer.limit_test_batches", "2", "--config=trainer: {limit_test_batches: 1}"], ["limit_test_batches"]),
])
def test_a_batch_limit_of_1_means_one_batch(args, expected):
    from mmprompt.run.cli import one_batch_limits

    assert one_batch_limits(["test", *args]) == expected


@pytest.mark.slow
def test_own_class_per_folder_data_trains_end_to_end_and_masks_feed_the_statistics(data_root, tmp_path):
    """Bring your own dataset: folders -> make-split -> fit + test with the tiny backbone."""
    import shutil

    images, masks = tmp_path / "mydata" / "shapes", tmp_path / "mydata" / "masks"
    for source, target in ((data_root / "synthetic" / "images", images), (data_root / "synthetic" / "masks", masks)):
        shutil.copytree(source, target)
    split = tmp_path / "mydata" / "split.json"
    assert main(["make-split", str(images), "--split_file", str(split), "--seed", "1"]) == 0
    assert main(["check-data", "--dataset", "custom", "--split_file", str(split), "--image_dir", str(images),
                 "--mask_dir", str(masks)]) == 0
    config = tmp_path / "shapes.yaml"
    config.write_text(f"data:\n  dataset: custom\n  split_file: {split}\n  image_dir: {images}\n"
                      f"  mask_dir: {masks}\n  template: 'a drawing of a {{}}.'\n  subsample: all\n")
    statistics = ("[{class_path: mmprompt.analysis.AttentionStatistics, init_args: {max_batches: 2, "
                  "print_summary: false}}]")
    cli = cli_main(["fit", "--config", str(CONFIGS / "demo.yaml"), "--config", str(config), "--out_dir",
                    str(tmp_path / "runs"), "--name", "shapes", "--trainer.enable_progress_bar", "false",
                    "--trainer.callbacks", statistics])
    results = json.loads((tmp_path / "runs" / "shapes" / "version_0" / "results.json").read_text())
    assert results["dataset"] == "mydata"  # the split file's folder: two custom datasets never share a label
    assert results["metrics"]["test/all/acc"] > 1.5 * 100 / 10  # 10 classes
    assert cli.datamodule.train_classes.template == "a drawing of a {}."
    summary = json.loads((tmp_path / "runs" / "shapes" / "version_0" / "attention_stats.json").read_text())
    ratios = [value for layer in summary["vision"]["fg_ratio"] for value in layer]
    assert ratios and all(value == value and value > 0 for value in ratios)  # recorded against the masks


def test_prompt_analysis_command_writes_both_tables(data_root, tmp_path, capsys):
    _fit(data_root, tmp_path, "analysed", "--trainer.max_epochs", "1")
    config = tmp_path / "demo" / "analysed" / "config.yaml"
    assert main(["prompt-analysis", "--config", str(config), "--max_batches", "1"]) == 0
    words = (tmp_path / "demo" / "analysed" / "prompt_words.csv").read_text().splitlines()
    assert len(words) == 1 + 9 * 2  # header + MaPLe's 9 layers x 2 context tokens
    assert (tmp_path / "demo" / "analysed" / "vision_prompt_similarity.md").is_file()
    assert "vision_prompt_similarity:" in capsys.readouterr().out


def test_compare_zero_shot_reports_zero_shot_clip_on_the_same_backbone_and_classes(data_root, tmp_path, capsys,
                                                                                   monkeypatch):
    import lightning as L

    from mmprompt.adapters import ZeroShot
    from mmprompt.model.encoders import EncoderOptions
    from mmprompt.model.module import PromptCLIPModule

    tested = []  # (adapter, speed) of each model tested: the baseline runs with the run's speed options
    test_epoch_start = PromptCLIPModule.on_test_epoch_start
    monkeypatch.setattr(PromptCLIPModule, "on_test_epoch_start", lambda module: (
        tested.append((type(module.adapter).__name__, module.speed)), test_epoch_start(module)))
    cli = cli_main(["fit", "--config", str(CONFIGS / "demo.yaml"), "--data.root", str(data_root), "--out_dir",
                    str(tmp_path), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
                    "--trainer.enable_progress_bar", "false", "--compare_zero_shot", "true",
                    "--model.speed.cache_text_features", "false"])  # exact, like every speed option
    speed = EncoderOptions(cache_text_features=False)
    assert cli.model.speed == speed and tested == [("ZeroShot", speed), ("MaPLe", speed)]
    results = json.loads((tmp_path / "demo" / "version_0" / "results.json").read_text())
    assert set(results["zero_shot_metrics"]) == set(results["metrics"]) == {"test/base/acc", "test/new/acc", "test/hm"}
    zero_shot = PromptCLIPModule(ZeroShot(), model_name="mmprompt-tiny", pretrained=None)
    zero_shot.use_clip(cli.model.clip)
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).test(zero_shot, datamodule=cli.datamodule)
    assert zero_shot.test_results == pytest.approx(results["zero_shot_metrics"], abs=1e-4)
    printed = capsys.readouterr().out
    assert "zero-shot" in printed and "MaPLe" in printed
    # the run's own files describe the tuned model only: one test row set in metrics.csv, its statistics
    metrics = (tmp_path / "demo" / "version_0" / "metrics.csv").read_text().splitlines()
    assert sum(1 for line in metrics[1:] if line.split(",")[metrics[0].split(",").index("test/base/acc")]) == 1
