"""Faults and bad input end in one clear paragraph (exit != 0, no traceback), and the package's own
files survive them: bad checkpoints and configs, truncated images of any mode, reused run folders,
corrupt caches, missing files, and files that honour the umask."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmprompt.data import FewShotDataModule, make_split
from mmprompt.data.catalog import Item, open_rgb, write_json_atomic
from mmprompt.data.dataset import ItemDataset
from mmprompt.data.fewshot import fingerprint, load_fewshot, sample_fewshot
from mmprompt.data.masks import nonzero_pixels
from mmprompt.data.synthetic import generate_synthetic
from mmprompt.data.transforms import build_transform
from mmprompt.files import UnreadableFile, current_umask
from mmprompt.run.cli import main
from mmprompt.run.guards import checkpoint_model_options, error_text, is_global_rank_zero, refuse_reused_run_dir

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")
ZERO_SHOT = str(REPO / "configs" / "methods" / "zero_shot.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]"]


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory) -> Path:
    """A finished tiny MaPLe run (1 epoch, 1 batch): its folder."""
    out = tmp_path_factory.mktemp("runs")
    assert main(["fit", "--config", DEMO, "--data.root", str(data_root), "--out_dir", str(out), "--version", "done",
                 "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
                 "--trainer.limit_test_batches", "1", *QUIET]) == 0
    return out / "demo" / "done"


def copy_tree(data_root: Path, target: Path) -> Path:
    shutil.copytree(data_root / "synthetic", target / "synthetic", ignore=shutil.ignore_patterns("split_fewshot"))
    return target


def assert_clear_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and "mmprompt: error:" in err, err[-2000:]
    message = err[err.index("mmprompt: error:"):]
    assert message.count("\n") == 1, message  # one paragraph, the last thing printed
    for needle in needles:
        assert needle in message, (needle, message)
    return message


# ---------------------------------------------------------------------- images of every mode

def pixels_of(path: Path) -> np.ndarray:
    return np.asarray(open_rgb(path)).astype(int)


MODE_CASES = {  # mode: (file suffix, (left, right) values written, expected RGB of left and right)
    "1": (".png", (0, 1), ((0, 0, 0), (255, 255, 255))),
    "L": (".png", (30, 200), ((30,) * 3, (200,) * 3)),
    "LA": (".png", ((30, 0), (200, 255)), ((30,) * 3, (200,) * 3)),
    "RGB": (".png", ((10, 20, 30), (200, 100, 0)), ((10, 20, 30), (200, 100, 0))),
    "RGBA": (".png", ((10, 20, 30, 0), (200, 100, 0, 255)), ((10, 20, 30), (200, 100, 0))),
    "CMYK": (".tif", ((0, 0, 0, 0), (255, 0, 0, 0)), ((255, 255, 255), (0, 255, 255))),
    "I;16": (".png", (0, 32896), ((0,) * 3, (128,) * 3)),  # 16-bit by bit depth: 65535 -> 255
    "I": (".tif", (0, 65535), ((0,) * 3, (255,) * 3)),  # 32-bit holding 16-bit data: /257
    "F": (".tif", (0.0, 0.5), ((0,) * 3, (128,) * 3)),  # float in [0, 1]: x255
}


@pytest.mark.parametrize("mode", [*MODE_CASES, "P"])
def test_every_pillow_mode_loads_as_rgb_with_its_values(mode, tmp_path):
    if mode == "P":  # a palette image: index 0 -> red, 1 -> blue
        img = Image.new("P", (4, 2), 0)
        img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
        img.paste(1, (2, 0, 4, 2))
        expected = ((255, 0, 0), (0, 0, 255))
        suffix = ".png"
    else:
        suffix, (left, right), expected = MODE_CASES[mode]
        img = Image.new(mode, (4, 2), left)
        img.paste(right, (2, 0, 4, 2))
    path = tmp_path / f"image{suffix}"
    img.save(path)
    assert Image.open(path).mode == mode
    rgb = pixels_of(path)
    assert rgb.shape == (2, 4, 3)
    assert (rgb[:, :2] == expected[0]).all() and (rgb[:, 2:] == expected[1]).all(), rgb[0]


def test_sixteen_bit_png_is_not_white_and_keeps_its_gradient(tmp_path):
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16).reshape(16, 16)
    Image.fromarray(ramp, "I;16").save(tmp_path / "ramp.png")
    rgb = pixels_of(tmp_path / "ramp.png")[..., 0].ravel()
    assert rgb.min() == 0 and rgb.max() == 255 and np.all(np.diff(rgb) >= 0)
    assert np.abs(rgb - np.arange(256)).max() <= 1  # 16-bit value v -> v / 257


@pytest.mark.parametrize("values,expected", [((0, 200), (0, 200)),  # 8-bit data in a 32-bit image
                                             ((-100, 100), (0, 255))])  # negative: stretched min..max
def test_int32_and_float_images_outside_the_usual_ranges(values, expected, tmp_path):
    for mode in ("I", "F"):
        img = Image.new(mode, (2, 1), values[0])
        img.putpixel((1, 0), values[1])
        img.save(tmp_path / f"{mode}.tif")
        assert pixels_of(tmp_path / f"{mode}.tif")[0, :, 0].tolist() == list(expected), mode


@pytest.mark.parametrize("mode,value", [("I;16", 1000), ("I", 70000), ("F", 0.4), ("L", 1), ("1", 1)])
def test_masks_of_any_depth_are_non_zero_where_set(mode, value):
    mask = Image.new(mode, (3, 1), 0)
    mask.putpixel((2, 0), value)
    assert nonzero_pixels(mask).tolist() == [[0.0, 0.0, 1.0]]


# ---------------------------------------------------------------------- truncated and missing images

def test_truncated_image_names_the_file_and_the_dataset(data_root, tmp_path, capsys):
    root = copy_tree(data_root, tmp_path / "data")
    first_test = json.loads((root / "synthetic" / "split_zhou_Synthetic.json").read_text())["test"][0][0]
    broken = root / "synthetic" / "images" / first_test
    broken.write_bytes(broken.read_bytes()[:200])
    dataset = ItemDataset(root / "synthetic" / "images", [Item(first_test, 0)], build_transform(False, 64),
                          dataset="synthetic")
    with pytest.raises(UnreadableFile, match=f"cannot read image {broken} \\(listed by dataset synthetic\\)"):
        dataset[0]
    for workers in ("0", "1"):  # a worker process's traceback is not shown either
        status = main(["test", "--config", DEMO, "--config", ZERO_SHOT, "--data.dataset", "synthetic", "--data.root",
                       str(root), "--out_dir", str(tmp_path / "runs"), "--data.eval_batch_size", "10", "--trainer.limit_test_batches", "1",
                       "--data.num_workers", workers, *QUIET])
        assert status == 2
        assert_clear_error(capsys, f"cannot read image {broken} (listed by dataset synthetic): image file is truncated")


def test_worker_tracebacks_are_cut_to_the_original_message():
    wrapped = UnreadableFile("Caught UnreadableFile in DataLoader worker process 0.\nOriginal Traceback (most recent "
                             "call last):\n  File \"x.py\", line 1, in f\n    g()\nmmprompt.files.UnreadableFile: "
                             "cannot read image /d/a.png: broken\n")
    assert error_text(wrapped) == "cannot read image /d/a.png: broken"
    assert error_text(ValueError("plain")) == "plain"


def test_missing_files_are_found_in_setup_before_training(data_root, tmp_path):
    root = copy_tree(data_root, tmp_path / "data")
    train = json.loads((root / "synthetic" / "split_zhou_Synthetic.json").read_text())["train"]
    for path, _, _ in train[:7]:
        (root / "synthetic" / "images" / path).unlink()
    datamodule = FewShotDataModule(dataset="synthetic", root=str(root), shots=-1, image_size=64)
    with pytest.raises(FileNotFoundError) as error:
        datamodule.setup("fit")
    message = str(error.value)
    assert message.startswith("dataset synthetic (training images): 7 image(s) listed in the split do not exist")
    assert str(root / "synthetic" / "images" / train[0][0]) in message and "... and 2 more" in message
    assert str(root / "synthetic" / "images" / train[5][0]) not in message  # the first five only


# ---------------------------------------------------------------------- checkpoints

def bad_checkpoints(trained: Path, folder: Path) -> dict[str, Path]:
    good = (trained / "checkpoints" / "last.ckpt").read_bytes()
    files = {"empty": b"", "truncated": good[: len(good) // 2], "text": b"model: not a checkpoint\n"}
    paths = {kind: folder / f"{kind}.ckpt" for kind in [*files, "tensor"]}
    for kind, data in files.items():
        paths[kind].write_bytes(data)
    torch.save(torch.zeros(3), paths["tensor"])
    return paths


def test_bad_checkpoint_files_are_clear_errors_in_every_stage(trained, data_root, tmp_path, capsys):
    paths = bad_checkpoints(trained, tmp_path)
    expected = {"empty": "is empty (0 bytes)", "truncated": "cannot be read as a checkpoint",
                "text": "cannot be read as a checkpoint", "tensor": "is not a Lightning checkpoint: it holds a Tensor"}
    common = ["--config", DEMO, "--data.root", str(data_root), "--out_dir", str(tmp_path / "runs"), *QUIET]
    for kind, path in paths.items():
        assert main(["test", *common, "--ckpt_path", str(path)]) == 2, kind
        assert_clear_error(capsys, f"--ckpt_path {path} {expected[kind]}")
    for stage in ("fit", "validate", "predict"):
        assert main([stage, *common, "--ckpt_path", str(paths["truncated"])]) == 2, stage
        assert_clear_error(capsys, f"--ckpt_path {paths['truncated']} cannot be read")


def test_truncated_last_checkpoint_is_a_clear_error_on_resume(trained, data_root, tmp_path, capsys):
    run = tmp_path / "runs" / "demo" / "killed"
    (run / "checkpoints").mkdir(parents=True)
    good = (trained / "checkpoints" / "last.ckpt").read_bytes()
    (run / "checkpoints" / "last.ckpt").write_bytes(good[:1000])
    assert main(["fit", "--config", DEMO, "--data.root", str(data_root), "--out_dir", str(tmp_path / "runs"),
                 "--version", "killed", "--ckpt_path", "last", *QUIET]) == 2
    assert_clear_error(capsys, str(run / "checkpoints" / "last.ckpt"), "cannot be read as a checkpoint")


def test_ckpt_path_refuses_another_backbone_naming_both(trained, data_root, tmp_path, capsys):
    status = main(["test", "--config", DEMO, "--model.model_name", "mmprompt-tiny-wide", "--data.root", str(data_root),
                   "--out_dir", str(tmp_path), "--ckpt_path", str(trained / "checkpoints" / "last.ckpt"), *QUIET])
    assert status == 2
    assert_clear_error(capsys, "--model.model_name 'mmprompt-tiny-wide' but the checkpoint was trained with "
                               "'mmprompt-tiny'")
    assert not list(tmp_path.glob("**/results.json"))


def test_checkpoint_fills_only_the_options_left_at_their_defaults(caplog):
    defaults = {"model_name": "ViT-B-16-quickgelu", "lr": 0.0035, "attention": "fused"}
    saved = {"model_name": "mmprompt-tiny", "lr": 0.05, "attention": "fused", "_instantiator": "x"}
    given = {"model_name": "ViT-B-16-quickgelu", "lr": 0.01, "attention": "fused"}
    with caplog.at_level(logging.WARNING, logger="mmprompt.run.guards"):
        updates = checkpoint_model_options(given, saved, defaults, "a.ckpt")
    assert updates == {"model_name": "mmprompt-tiny", "attention": "fused"}  # lr: the explicit 0.01 stays
    assert "--model.lr 0.01 overrides 0.05 stored in a.ckpt" in caplog.text
    with pytest.raises(ValueError, match="force_quick_gelu True but the checkpoint was trained with False"):
        checkpoint_model_options({"force_quick_gelu": True}, {"force_quick_gelu": False},
                                 {"force_quick_gelu": False}, "a.ckpt")


def test_checkpoint_speed_options_compare_as_plain_data(caplog):
    """The parsed config holds a Namespace, the default an EncoderOptions, the checkpoint a dict."""
    from jsonargparse import Namespace

    from mmprompt.model.encoders import EncoderOptions
    from mmprompt.model.module import PromptCLIPModule
    from mmprompt.run.guards import init_defaults

    saved = {"speed": EncoderOptions(text_chunk_size=250).as_dict()}
    defaults = init_defaults(PromptCLIPModule)
    with caplog.at_level(logging.WARNING, logger="mmprompt.run.guards"):
        assert checkpoint_model_options({"speed": Namespace(**saved["speed"])}, saved, defaults, "a.ckpt") == saved
        assert checkpoint_model_options({"speed": defaults["speed"]}, saved, defaults, "a.ckpt") == saved
        assert not caplog.text
        explicit = Namespace(**EncoderOptions(attention="explicit").as_dict())
        assert checkpoint_model_options({"speed": explicit}, saved, defaults, "a.ckpt") == {}
    assert "--model.speed {'attention': 'explicit'" in caplog.text


# ---------------------------------------------------------------------- configs

def test_yaml_syntax_error_names_the_file_and_line(data_root, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  lr: [0.1\n  warmup_epochs: 1\n")
    assert main(["fit", "--config", DEMO, "--config", str(bad), "--data.root", str(data_root)]) == 2
    assert_clear_error(capsys, f"--config {bad}: YAML syntax error at line 3, column 16")
    assert main(["fit", f"--config={bad}"]) == 2
    assert_clear_error(capsys, f"--config {bad}: YAML syntax error")


# ---------------------------------------------------------------------- run folders

def test_reusing_the_version_of_a_finished_run_is_refused(trained, data_root, capsys):
    before = {p.name: p.read_bytes() for p in trained.iterdir() if p.is_file()}
    checkpoints = sorted(p.name for p in (trained / "checkpoints").iterdir())
    common = ["--config", DEMO, "--data.root", str(data_root), "--out_dir", str(trained.parent.parent),
              "--version", "done", *QUIET]
    for stage in ("fit", "test"):
        assert main([stage, *common, "--trainer.max_epochs", "1"]) == 2
        assert_clear_error(capsys, f"{trained} already holds a finished run", "--ckpt_path last")
    assert {p.name: p.read_bytes() for p in trained.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == checkpoints  # no last-v1.ckpt


def test_which_folders_may_be_reused(tmp_path, monkeypatch):
    (tmp_path / "config.yaml").write_text("x")  # killed before its first checkpoint: may start over
    refuse_reused_run_dir(tmp_path, "fit", None)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    with pytest.raises(ValueError, match="already holds a resumable run"):
        refuse_reused_run_dir(tmp_path, "fit", None)
    refuse_reused_run_dir(tmp_path, "fit", "last")  # resuming (what `mmprompt sweep` does)
    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    assert is_global_rank_zero()
    monkeypatch.setenv("LOCAL_RANK", "1")  # a DDP worker re-entering the CLI: rank 0 already checked
    assert not is_global_rank_zero()


# ---------------------------------------------------------------------- tools

def test_check_data_on_a_mistyped_root_only_checks(tmp_path, capsys):
    typo = tmp_path / "dta"
    assert main(["check-data", "--dataset", "synthetic", "--root", str(typo)]) == 1
    out = capsys.readouterr().out
    assert f"PROBLEM {typo / 'synthetic'}: folder not found" in out and "check-data only checks" in out
    assert not typo.exists()


def test_interventions_without_a_checkpoint_is_an_error_unless_asked(trained, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    shutil.copy(trained / "config.yaml", config)
    assert main(["interventions", "--config", str(config)]) == 2
    assert_clear_error(capsys, str(tmp_path / "checkpoints" / "last.ckpt"), "--allow_no_checkpoint")
    assert main(["prompt-analysis", "--config", str(config)]) == 2
    assert_clear_error(capsys, "--allow_no_checkpoint")
    config.write_text("model:\n  adapter: {class_path: x\n")
    assert main(["interventions", "--config", str(config), "--allow_no_checkpoint"]) == 2
    assert_clear_error(capsys, f"--config {config}: YAML syntax error at line 3")


# ---------------------------------------------------------------------- caches

@pytest.mark.parametrize("content", [b"", b'{"version": 1, "train": [["a.png", 0', b"[1, 2]",
                                     b'{"version": 1, "source": "%s", "train": 3, "val": []}'])
def test_corrupt_fewshot_cache_is_redrawn_atomically(content, data_root, tmp_path):
    datamodule = FewShotDataModule(dataset="synthetic", root=str(data_root), shots=2, image_size=64)
    catalog = datamodule.catalog
    path = tmp_path / "split_fewshot" / "shot_2-seed_1.json"
    path.parent.mkdir()
    path.write_bytes(content.replace(b"%s", fingerprint(catalog).encode()))
    with pytest.warns(UserWarning, match=f"few-shot cache {path} is corrupt"):
        subset = load_fewshot(catalog, 2, 1, path)
    assert subset == sample_fewshot(catalog, 2, 1)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rewritten cache is read back silently
        assert load_fewshot(catalog, 2, 1, path) == subset


# ---------------------------------------------------------------------- file modes

def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)])
def test_written_files_honour_the_umask(umask, file_mode, dir_mode, tmp_path):
    old = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "results.json", {"a": 1})
        target = generate_synthetic(tmp_path / "data")
        make_split(target / "images", tmp_path / "split.json")
        datamodule = FewShotDataModule(dataset="synthetic", root=str(tmp_path / "data"), shots=1, image_size=64)
        datamodule.prepare_data()
    finally:
        os.umask(old)
    cache = next((target / "split_fewshot").glob("*.json"))
    for path in (tmp_path / "results.json", tmp_path / "split.json", cache, target / "split_zhou_Synthetic.json",
                 next((target / "images" / "circle").iterdir())):
        assert mode_of(path) == file_mode, (path, oct(mode_of(path)))
    for folder in (target, target / "images", target / "split_fewshot"):
        assert mode_of(folder) == dir_mode, (folder, oct(mode_of(folder)))


def test_a_finished_run_folder_has_the_modes_of_the_umask(trained):
    for name in ("results.json", "config.yaml", "metrics.csv", "checkpoints/last.ckpt"):
        assert mode_of(trained / name) == 0o666 & ~current_umask(), name
