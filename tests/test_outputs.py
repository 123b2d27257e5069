"""What users keep and share: shipped configs, predictions, self-describing checkpoints, exports."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import lightning as L
import open_clip
import pytest
import torch
import torch.nn.functional as F
import yaml
from run_helpers import mmprompt

from mmprompt.adapters import BiasTuning, CoupledBiasTuning, MaPLe, VPTDeep
from mmprompt.run.cli import cli_main, main
from mmprompt.run.commands import run_tool
from mmprompt.run.commands import TOOLS
from mmprompt.classes import ClassSet
from mmprompt.tools.export import export_adapter, export_open_clip, load_adapter
from mmprompt.model.encoders import EncoderOptions
from mmprompt.model.module import PromptCLIPModule
from mmprompt.run.argv import with_shipped_configs
from mmprompt.run.shipped import resolve_config, shipped_config_names

REPO = Path(__file__).resolve().parents[1]


def test_shipped_configs_resolve_by_name_and_paths_win(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert {"demo", "tiny", "methods/maple", "datasets/eurosat", "protocols/base2new"} <= set(shipped_config_names())
    assert resolve_config("demo") == str(REPO / "configs" / "demo.yaml")
    assert with_shipped_configs(["fit", "-c", "methods/maple", "--config=tiny"]) == [
        "fit", "-c", str(REPO / "configs" / "methods" / "maple.yaml"), "--config=" + str(REPO / "configs" / "tiny.yaml")]
    (tmp_path / "demo").write_text("model: {}\n")
    assert resolve_config("demo") == "demo"  # an existing path is never replaced
    assert resolve_config("model: {lr: 1}") == "model: {lr: 1}"  # inline YAML passes through


def test_demo_by_name_runs_from_another_directory_and_saves_absolute_paths(data_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(data_root)
    cli = cli_main(["fit", "--config", "demo", "--config", "tiny", "--data.root", "data", "--out_dir", "runs",
                    "--version", "v", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
                    "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "false",
                    "--trainer.callbacks", "[]"])
    assert type(cli.model.adapter).__name__ == "MaPLe" and cli.trainer.state.finished
    # "1" is one batch, as Lightning documents (jsonargparse alone would pass 1.0: every batch)
    assert cli.trainer.limit_test_batches == 1 and cli.trainer.num_test_batches == [1, 1]  # base, new
    saved = yaml.safe_load((tmp_path / "runs" / "demo" / "v" / "config.yaml").read_text())
    assert saved["data"]["root"] == str(tmp_path / "data")  # the saved config re-runs from any folder


@pytest.mark.slow
def test_wheel_ships_license_and_every_config(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("mmprompt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"mmprompt/configs/{name}.yaml" for name in shipped_config_names()}
    assert len(shipped) >= 30 and shipped <= names
    assert any(name.endswith("licenses/LICENSE") for name in names)
    assert "mmprompt/model_configs/mmprompt-tiny.json" in names


COMMON = ["--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]"]


@pytest.fixture(scope="module")
def trained_run(data_root, tmp_path_factory) -> Path:
    """A BiasTuning run (biases on attention and MLP, random init so they matter) with its checkpoint."""
    out = tmp_path_factory.mktemp("runs")
    cli_main(["fit", "--config", "demo", "--model.adapter", "mmprompt.adapters.BiasTuning",
              "--model.adapter.init_args.placement", "both", "--model.adapter.init_args.init_std", "0.5",
              "--data.dataset", "synthetic", "--data.root", str(data_root), "--out_dir", str(out), "--version", "trained",
              "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", *COMMON])
    return out / "demo" / "trained"


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_predict_writes_one_file_per_class_set_that_agrees_with_test(trained_run, tmp_path):
    checkpoint = str(trained_run / "checkpoints" / "last.ckpt")
    args = ["--config", str(trained_run / "config.yaml"), "--ckpt_path", checkpoint, "--out_dir", str(tmp_path),
            *COMMON]
    tested = cli_main(["test", *args, "--version", "tested"])
    alone = ["--ckpt_path", checkpoint, "--out_dir", str(tmp_path), "--name", "demo", *COMMON]
    predicted = cli_main(["predict", *alone, "--version", "predicted"])  # the checkpoint alone is enough
    run = tmp_path / "demo" / "predicted"
    assert sorted(p.name for p in run.glob("predictions_*.csv")) == ["predictions_base.csv", "predictions_new.csv"]
    for name, classes in zip(("base", "new"), predicted.datamodule.eval_classes("predict")):
        rows = read_csv(run / f"predictions_{name}.csv")
        dataset = predicted.datamodule.datasets["test"][0 if name == "base" else 1]
        assert [row["path"] for row in rows] == [item.path for item in dataset.items]  # every image once, in order
        assert all(row["label_name"] == classes.classnames[int(row["label"])] for row in rows)
        assert all(row["prediction"] == row["top1"] for row in rows)
        top = [[float(row[f"top{k}_prob"]) for k in range(1, 6)] for row in rows]
        assert all(probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-5 for probs in top)
        accuracy = 100.0 * sum(row["prediction"] == row["label_name"] for row in rows) / len(rows)
        assert accuracy == pytest.approx(tested.model.test_results[f"test/{name}/acc"], abs=1e-4)


@pytest.mark.slow
def test_predict_under_ddp_writes_each_image_once_like_one_process(trained_run, tmp_path):
    checkpoint = str(trained_run / "checkpoints" / "last.ckpt")
    args = ["predict", "--config", str(trained_run / "config.yaml"), "--ckpt_path", checkpoint, "--out_dir",
            str(tmp_path), *COMMON, "--data.eval_batch_size", "7"]
    cli_main([*args, "--version", "single"])  # the reference in this process; the DDP run as users start it
    ddp = mmprompt(*args, "--version", "ddp", "--trainer.strategy", "ddp", "--trainer.devices", "2", cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    for name in ("base", "new"):
        one = read_csv(tmp_path / "demo" / "single" / f"predictions_{name}.csv")
        two = read_csv(tmp_path / "demo" / "ddp" / f"predictions_{name}.csv")
        assert len(one) == 100 and [row["path"] for row in two] == [row["path"] for row in one]
        assert [row["prediction"] for row in two] == [row["prediction"] for row in one]
        assert max(abs(float(a["top1_prob"]) - float(b["top1_prob"])) for a, b in zip(one, two)) < 1e-4


def test_checkpoint_alone_is_enough_to_test_from_any_folder(trained_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["test", "--ckpt_path", str(trained_run / "checkpoints" / "last.ckpt"), "--out_dir", "elsewhere",
                    "--trainer.enable_progress_bar", "false"])
    assert cli.model.adapter.init_args == {"depth": 9, "layers": None, "branch": "both", "placement": "both",
                                           "init_std": 0.5}
    trained = json.loads((trained_run / "results.json").read_text())["metrics"]
    tested = json.loads((tmp_path / "elsewhere" / "BiasTuning-synthetic" / "version_0" / "results.json").read_text())
    assert tested["metrics"] == trained and tested["dataset"] == "synthetic"


def test_load_from_checkpoint_needs_no_argument_and_warns_about_nothing(trained_run):
    path = trained_run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    described = checkpoint["mmprompt"]
    assert described["adapter_config"] == {"class_path": "mmprompt.adapters.BiasTuning", "init_args": {
        "depth": 9, "layers": None, "branch": "both", "placement": "both", "init_std": 0.5}}
    assert (described["model_name"], described["pretrained"], described["version"]) == ("mmprompt-tiny", "synthetic-world", "0.1.0")
    assert [c["name"] for c in described["class_sets"]["test"]] == ["base", "new"]
    assert described["class_sets"]["test"][1]["classnames"][:2] == ["ring", "hexagon"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = PromptCLIPModule.load_from_checkpoint(path)
    assert not [w for w in caught if "key" in str(w.message).lower()], [str(w.message) for w in caught]
    assert type(module.adapter).__name__ == "BiasTuning" and module.adapter.places == ("attn", "mlp")
    for key, value in checkpoint["state_dict"].items():
        assert torch.equal(module.state_dict()[key], value)
    assert [c.name for c in module.class_sets("test")] == ["base", "new"]
    assert module.class_sets("predict")[1].classnames == tuple(described["class_sets"]["test"][1]["classnames"])


def _logits_of_plain_open_clip(model, tokenizer, images: torch.Tensor, classes) -> torch.Tensor:
    """What a plain open_clip user computes: cosine logits with the dataset's template."""
    with torch.no_grad():
        image = F.normalize(model.encode_image(images), dim=-1)
        text = F.normalize(model.encode_text(tokenizer([classes.template.format(c) for c in classes.classnames])), dim=-1)
        return model.logit_scale.exp() * image @ text.t()


def _randomised(adapter, model_name: str = "mmprompt-tiny") -> PromptCLIPModule:
    torch.manual_seed(0)
    module = PromptCLIPModule(adapter, model_name=model_name, pretrained=None)
    with torch.no_grad():
        for parameter in module.adapter.parameters():
            parameter.normal_(0, 0.3)
    module.set_class_sets(test=[ClassSet("all", ("cat", "dog", "ship"))])
    return module.eval()


@pytest.mark.parametrize("adapter", [BiasTuning(placement="both"), BiasTuning(layers=[0, 2], branch="vision",
                         placement="mlp"), CoupledBiasTuning(depth=3, placement="both")], ids=["both", "vision-mlp",
                         "coupled"])
def test_bias_methods_fold_into_a_plain_open_clip_checkpoint_with_equal_logits(adapter, tmp_path):
    module = _randomised(adapter)
    path = export_open_clip(module, tmp_path)
    plain = open_clip.create_model("mmprompt-tiny", pretrained=str(path)).eval()
    images, classes = torch.randn(4, 3, 64, 64), module.class_sets("test")[0]
    with torch.no_grad():
        expected = module(images, classes)
    got = _logits_of_plain_open_clip(plain, open_clip.get_tokenizer("mmprompt-tiny"), images, classes)
    untouched = _logits_of_plain_open_clip(module.clip, module.tokenizer, images, classes)
    assert (expected - untouched).abs().max() > 1e-2  # the biases matter ...
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)  # ... and the folded weights reproduce them


def test_prompt_methods_export_the_adapter_form_only_and_it_loads_in_one_call(tmp_path):
    module = _randomised(MaPLe(depth=3))
    with pytest.raises(ValueError, match="prompt tokens"):
        export_open_clip(module, tmp_path)
    files = export_adapter(module, tmp_path)
    assert sorted(p.name for p in files) == ["adapter.safetensors", "adapter_config.json"]
    users_clip = open_clip.create_model("mmprompt-tiny", pretrained=None)
    users_clip.load_state_dict(module.clip.state_dict())  # the user's own copy of the backbone
    loaded = load_adapter(tmp_path, users_clip)
    images, classes = torch.randn(3, 3, 64, 64), module.class_sets("test")[0]
    assert loaded.class_sets("test")[0] == classes
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, classes), module(images, classes))


def test_export_command_from_a_checkpoint_alone(trained_run, tmp_path, capsys):
    assert main(["export", "--ckpt_path", str(trained_run / "checkpoints" / "last.ckpt"), "--out_dir", str(tmp_path)]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"adapter.safetensors", "adapter_config.json", "open_clip_model.pt"}
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["adapter_config"]["class_path"] == "mmprompt.adapters.BiasTuning" and config["version"] == "0.1.0"
    loaded = load_adapter(tmp_path)  # no clip given: built from the exported model_name / pretrained
    assert type(loaded.adapter).__name__ == "BiasTuning" and loaded.adapter.places == ("attn", "mlp")
    assert main(["export", "--ckpt_path", str(tmp_path / "missing.ckpt")]) == 2
    assert "missing.ckpt" in capsys.readouterr().err


def test_checkpoints_load_from_python_with_their_speed_options(tmp_path):
    torch.manual_seed(0)
    speed = EncoderOptions(attention="explicit", text_chunk_size=5)
    trained = PromptCLIPModule(VPTDeep(n_ctx=2, depth=3), model_name="mmprompt-tiny", pretrained="synthetic-world",
                               speed=speed)
    with torch.no_grad():
        for parameter in trained.adapter.parameters():
            parameter.normal_(0, 0.3)
    trained.set_class_sets(test=[ClassSet("all", ("cat", "dog", "ship"))])
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(trained)
    trainer.save_checkpoint(tmp_path / "current.ckpt")
    module = PromptCLIPModule.load_from_checkpoint(tmp_path / "current.ckpt").eval()
    assert module.adapter.init_args["n_ctx"] == 2 and module.adapter.vision.depth == 3
    assert module.speed == speed and module.hparams.speed == speed.as_dict()
    fused = PromptCLIPModule.load_from_checkpoint(tmp_path / "current.ckpt", speed=EncoderOptions().as_dict()).eval()
    images, classes = torch.randn(4, 3, 64, 64), module.class_sets("test")[0]
    with torch.no_grad():
        logits = module(images, classes)
        assert torch.equal(logits, trained.eval()(images, classes))
        torch.testing.assert_close(fused(images, classes), logits, atol=2e-5, rtol=0)  # explicit vs fused: 3e-6


def test_custom_datasets_are_named_in_run_folders_and_results(data_root, tmp_path):
    from mmprompt.data.custom import make_split

    images = data_root / "synthetic" / "images"
    split = tmp_path / "animals" / "split.json"
    split.parent.mkdir()
    make_split(images, output=split)
    custom = ["--data.dataset", "custom", "--data.split_file", str(split), "--data.image_dir", str(images)]
    common = ["test", "--config", "methods/zero_shot", "--config", "tiny", *custom, "--data.root", str(data_root),
              "--out_dir", str(tmp_path / "runs"), "--trainer.limit_test_batches", "1", *COMMON]
    cli_main(common)
    cli_main([*common, "--data.name", "pets_v2"])
    for label in ("animals", "pets_v2"):  # default: the split file's folder; or data.name
        results = json.loads((tmp_path / "runs" / f"ZeroShot-{label}" / "version_0" / "results.json").read_text())
        assert results["dataset"] == label and results["model_name"] == "mmprompt-tiny"
        assert results["pretrained"] == "synthetic-world" and 0 <= results["metrics"]["test/all/acc"] <= 100


def test_a_user_logger_adds_to_csv_and_tensorboard_and_config_stays_in_the_run_folder(data_root, tmp_path):
    own = tmp_path / "my_logger"
    logger = f"{{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {{save_dir: {own}, name: mine}}}}"
    cli = cli_main(["fit", "--config", "demo", "--data.root", str(data_root), "--out_dir", str(tmp_path / "runs"),
                    "--version", "v", "--trainer.logger", logger, "--trainer.max_epochs", "1",
                    "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
                    "--trainer.limit_test_batches", "1", *COMMON])
    run = tmp_path / "runs" / "demo" / "v"
    assert len(cli.trainer.loggers) == 3 and cli.trainer.log_dir == str(run)
    assert {"config.yaml", "metrics.csv", "results.json"} <= {p.name for p in run.iterdir()}
    assert list(run.glob("events.out.tfevents.*"))
    ours, theirs = read_csv(run / "metrics.csv"), read_csv(next(own.rglob("metrics.csv")))
    assert [r["train/acc"] for r in ours if r.get("train/acc")] == [r["train/acc"] for r in theirs if r.get("train/acc")]
    assert all(0 <= float(r["train/acc"]) <= 100 for r in ours if r.get("train/acc"))


def option_groups(help_text: str) -> list[list[str]]:
    """The option strings of each argument in an argparse help text, canonical spelling first."""
    groups = []
    for line in help_text.splitlines():
        match = re.match(r"^\s{2}(--?\w[^\s,]*(?: [A-Z_\[\].]+)*(?:, --?\w[^\s,]*(?: [A-Z_\[\].]+)*)*)", line)
        if match:
            groups.append([part.split(" ")[0] for part in match.group(1).split(", ")])
    return groups


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_every_tool_spells_flags_like_lightning_once(tool, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_tool(tool, ["--help"])
    assert exit_info.value.code == 0
    groups = [g for g in option_groups(capsys.readouterr().out) if g[0] not in ("-h", "--help")]
    assert groups, f"{tool}: no options parsed from its help"
    canonical = [group[0] for group in groups if group[0].startswith("--")]
    assert all("-" not in option[2:] for option in canonical), canonical  # underscores, as in --trainer.max_epochs
    assert not {"--out", "--output", "--output_dir"} & set(canonical)  # output folders are --out_dir everywhere
    assert all(len(group) == 1 for group in groups), groups  # one spelling per option


def test_sweep_finds_the_shipped_configs_outside_a_checkout(tmp_path, monkeypatch, capsys):
    from mmprompt.tools import sweep

    monkeypatch.chdir(tmp_path)  # no ./configs here: a pip-installed user's folder
    assert sweep.main(["--protocol", "base2new", "--methods", "maple", "--datasets", "eurosat", "--seeds", "1",
                       "--dry_run"]) == 0
    command = capsys.readouterr().out.splitlines()[0]
    assert f"--config {REPO / 'configs' / 'methods' / 'maple.yaml'}" in command


def test_checkpoint_config_goes_first_so_user_options_win(trained_run, tmp_path):
    from mmprompt.files import UnreadableFile
    from mmprompt.run.config import config_from_checkpoint

    checkpoint = str(trained_run / "checkpoints" / "last.ckpt")
    config = config_from_checkpoint(checkpoint)
    assert config["model"]["adapter"]["class_path"] == "mmprompt.adapters.BiasTuning"
    assert "image_size" not in config["data"] and config["data"]["root"].startswith("/")
    cli = cli_main(["test", "--ckpt_path", checkpoint, "--model.speed.attention", "explicit", "--out_dir",
                    str(tmp_path / "runs"), "--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "false"])
    assert type(cli.model.adapter).__name__ == "BiasTuning" and cli.model.speed.attention == "explicit"
    assert cli.config.test.data.root == config["data"]["root"]
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UnreadableFile, match="garbage.ckpt cannot be read as a checkpoint"):
        config_from_checkpoint(garbage)  # one clear error naming the file (tests/test_faults.py covers the CLI)
