"""What a new user hits next: nothing clobbered, nothing silently wrong, no traceback, no vague message.

Each test is one case of a sweep of bad inputs and faults tried as a new user would; each failed on
main 3638b92 (the docstring says what happened there). Runs are the tiny demo model in-process with
one batch per stage. Tests run as root, which ignores permission bits, so a read-only folder is
simulated by making ``os.mkdir`` raise EROFS, and a full disk by making the checkpoint writer raise
ENOSPC. Names new in the package are imported inside the tests, so on main each test fails on its own.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_fakes import make_class_folders
from mmprompt.data import FewShotDataModule, make_split
from mmprompt.model import checkpoint_io
from mmprompt.run.cli import main

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]"]
ONE_BATCH = ["--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
             "--trainer.limit_test_batches", "1"]


def fit_args(data_root: Path, out: Path, *more: str) -> list[str]:
    return ["fit", "--config", DEMO, "--data.root", str(data_root), "--out_dir", str(out), "--compare_zero_shot", "false",
            *ONE_BATCH, *QUIET, *more]


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory) -> Path:
    """A finished tiny MaPLe run (1 epoch, 1 batch): its folder. Tests that change it work on a copy."""
    out = tmp_path_factory.mktemp("runs")
    assert main(fit_args(data_root, out, "--version", "done", "--trainer.max_epochs", "1")) == 0
    return out / "demo" / "done"


def copy_run(run: Path, out: Path) -> Path:
    """The run folder copied (moved, as far as the run can tell) to ``out/demo/<same version>``."""
    target = out / "demo" / run.name
    shutil.copytree(run, target)
    return target


def assert_clear_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and "mmprompt: error:" in err, err[-2000:]
    message = err[err.index("mmprompt: error:"):]
    assert "usage:" not in err, err[-2000:]
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def custom_tree(root: Path, counts: dict[str, int]) -> Path:
    """A class-per-folder tree with its split file; returns the split file."""
    images = make_class_folders(root / "images", counts)
    make_split(images)
    return images / "split.json"


def rewrite_split(path: Path, change) -> None:
    split = json.loads(path.read_text())
    change(split)
    path.write_text(json.dumps(split))


def checkpoint_epoch(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["epoch"]


def metrics_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------------- (a) data lost

def test_export_refuses_a_non_empty_folder_unless_overwrite(trained, tmp_path, capsys):
    """main: a second export into a folder overwrote its adapter and left the earlier open_clip model (exit 0)."""
    out = tmp_path / "export"
    ckpt = str(trained / "checkpoints" / "last.ckpt")
    assert main(["export", "--ckpt_path", ckpt, "--out_dir", str(out)]) == 0
    (out / "open_clip_model.pt").write_bytes(b"an earlier bias export")
    before = (out / "adapter.safetensors").read_bytes()
    assert main(["export", "--ckpt_path", ckpt, "--out_dir", str(out)]) == 2
    assert_clear_error(capsys, f"--out_dir {out} is not empty", "--overwrite")
    assert (out / "open_clip_model.pt").read_bytes() == b"an earlier bias export"
    assert main(["export", "--ckpt_path", ckpt, "--out_dir", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter.safetensors", "adapter_config.json"]  # MaPLe can't fold
    assert (out / "adapter.safetensors").read_bytes() == before


def test_exported_adapter_honours_the_umask(trained, tmp_path):
    """main: adapter.safetensors was written 0600 while adapter_config.json honoured the umask."""
    out = tmp_path / "export"
    old = os.umask(0o002)
    try:
        assert main(["export", "--ckpt_path", str(trained / "checkpoints" / "last.ckpt"), "--out_dir", str(out)]) == 0
    finally:
        os.umask(old)
    for name in ("adapter.safetensors", "adapter_config.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o664, name


def test_make_split_keeps_an_existing_split_file_unless_overwrite(tmp_path, capsys):
    """main: make-split replaced an existing split file with another draw (exit 0)."""
    images = make_class_folders(tmp_path / "images", {"cat": 6, "dog": 6})
    split = tmp_path / "split.json"
    assert main(["make-split", str(images), "--split_file", str(split), "--seed", "1"]) == 0
    first = split.read_text()
    assert main(["make-split", str(images), "--split_file", str(split), "--seed", "2"]) == 2
    assert_clear_error(capsys, f"split file {split} already exists", "--overwrite")
    assert split.read_text() == first
    assert main(["make-split", str(images), "--split_file", str(split), "--seed", "2", "--overwrite"]) == 0
    assert split.read_text() != first


def test_make_split_gives_every_class_a_training_and_a_test_image(tmp_path, capsys):
    """main: with one image per class the 50% train share rounded to none: an empty train split.
    Now every class gets one training and one test image; a class with one image is an error."""
    split = make_split(make_class_folders(tmp_path / "two", {"cat": 2, "dog": 2}), tmp_path / "two.json")
    assert {name: len(rows) for name, rows in split.items()} == {"train": 2, "val": 0, "test": 2}
    images = make_class_folders(tmp_path / "one", {"cat": 1, "dog": 1})
    assert main(["make-split", str(images)]) == 2
    assert_clear_error(capsys, "hold fewer than 2 images: cat (1), dog (1)", "one image to train on and one to test")
    assert not (images / "split.json").exists()


# ---------------------------------------------------------------------- (b) silently wrong

def test_resuming_a_moved_run_keeps_last_ckpt_the_newest(trained, data_root, tmp_path):
    """main: in a moved folder Lightning wrote last-v1.ckpt and left last.ckpt at the old epoch."""
    run = copy_run(trained, tmp_path)
    assert main(fit_args(data_root, tmp_path, "--version", run.name, "--ckpt_path", "last", "--trainer.max_epochs", "2",
                         "--test_after_fit", "false")) == 0
    assert sorted(p.name for p in (run / "checkpoints").glob("last*")) == ["last.ckpt"]
    assert checkpoint_epoch(run / "checkpoints" / "last.ckpt") == 1  # the second epoch (0-based)


def test_a_second_process_on_a_run_folder_is_refused(trained, data_root, tmp_path, capsys):
    """main: two `fit --ckpt_path last` on one version both ran into the folder (duplicated metrics)."""
    from mmprompt.run.folder import RunLock

    run = copy_run(trained, tmp_path)
    lock = RunLock(run).acquire()  # another live process (a lock on another open file conflicts, even in-process)
    try:
        assert main(fit_args(data_root, tmp_path, "--version", run.name, "--ckpt_path", "last",
                             "--trainer.max_epochs", "2")) == 2
    finally:
        lock.release()
    assert_clear_error(capsys, f"run folder {run} is in use by mmprompt process {os.getpid()}", "another --version")
    assert checkpoint_epoch(run / "checkpoints" / "last.ckpt") == 0


@pytest.mark.slow
def test_a_killed_process_leaves_no_stuck_lock(tmp_path):
    """The kernel drops a flock when its process dies: the lock file left behind blocks nothing."""
    from mmprompt.run.folder import LOCK_FILE, RunLock

    holder = subprocess.Popen([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); from mmprompt."
                               "run.folder import RunLock; lock = RunLock(sys.argv[2]).acquire(); print('held', flush=True); "
                               "import time; time.sleep(60)", str(REPO), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=f"in use by mmprompt process {holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert (tmp_path / LOCK_FILE).is_file()
    RunLock(tmp_path).acquire().release()


def test_test_with_ckpt_path_last_and_no_checkpoint_is_refused(data_root, tmp_path, capsys):
    """main: it tested the untrained adapter and wrote results.json (a warning only)."""
    assert main(["test", "--config", DEMO, "--data.root", str(data_root), "--out_dir", str(tmp_path), "--version", "new",
                 "--ckpt_path", "last", *ONE_BATCH, *QUIET]) == 2
    assert_clear_error(capsys, f"{tmp_path / 'demo' / 'new' / 'checkpoints' / 'last.ckpt'} does not exist",
                       "untrained adapter")
    assert not list(tmp_path.glob("**/results.json"))


def test_sigterm_during_fit_saves_a_checkpoint_and_exits_non_zero(data_root, tmp_path, capsys):
    """main: SIGTERM during fit exited 0 with no checkpoint of the steps since the last epoch."""
    callbacks = '[{class_path: run_helpers.SigtermAtStep, init_args: {step: 2}}]'
    args = [*fit_args(data_root, tmp_path, "--version", "v", "--trainer.limit_train_batches", "3",
                      "--trainer.max_epochs", "2", "--trainer.log_every_n_steps", "1"), "--trainer.callbacks", callbacks]
    assert main(args) == 143  # 128 + SIGTERM, as a shell reports a process it ended
    run = tmp_path / "demo" / "v"
    message = assert_clear_error(capsys, f"stopped by SIGTERM; saved {run / 'checkpoints' / 'last.ckpt'}",
                                 "--ckpt_path last")
    assert "\n" not in message.strip()
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 2 and not (run / "results.json").exists()
    assert main(fit_args(data_root, tmp_path, "--version", "v", "--ckpt_path", "last", "--trainer.max_epochs", "2",
                         "--trainer.limit_train_batches", "3", "--test_after_fit", "false")) == 0
    assert checkpoint_epoch(run / "checkpoints" / "last.ckpt") == 1


def test_a_class_without_test_images_is_refused(tmp_path, capsys):
    """main: `test` reported test/new/acc 100.00 for a class with no test images."""
    split = custom_tree(tmp_path, {"cat": 4, "dog": 4, "fox": 4, "owl": 4})
    rewrite_split(split, lambda s: s.update(test=[row for row in s["test"] if row[2] != "owl"]))
    assert main(["test", "--config", DEMO, "--data.dataset", "custom", "--data.split_file", str(split),
                 "--out_dir", str(tmp_path / "runs"), *ONE_BATCH, *QUIET]) == 2
    assert_clear_error(capsys, "test/owl: class has no test images")


@pytest.mark.parametrize("fault,expected", [
    ("overlap", "listed in both train and test"),
    ("duplicate", "listed 2 times in train"),
    ("empty_train", "the train split lists no images"),
    ("no_test_split", "no test split"),
])
def test_fit_refuses_what_check_data_refuses(fault, expected, tmp_path):
    """main: fit trained on overlapping or duplicated splits (check-data refuses them), and an empty
    train split ended in `num_samples=0`; a missing test split was found only after training."""
    split = custom_tree(tmp_path, {"cat": 4, "dog": 4})
    change = {"overlap": lambda s: s["train"].append(s["test"][0]),
              "duplicate": lambda s: s["train"].append(s["train"][0]),
              "empty_train": lambda s: s.update(train=[]),
              "no_test_split": lambda s: s.pop("test")}[fault]
    rewrite_split(split, change)
    datamodule = FewShotDataModule("custom", split_file=str(split), shots=2, image_size=64)
    with pytest.raises(ValueError, match=expected):
        datamodule.setup("fit")


def test_missing_test_images_are_found_before_training(tmp_path):
    """main: fit trained, then failed on a missing test image."""
    split = custom_tree(tmp_path, {"cat": 4, "dog": 4})
    first_test = json.loads(split.read_text())["test"][0][0]
    (split.parent / first_test).unlink()
    datamodule = FewShotDataModule("custom", split_file=str(split), shots=2, image_size=64)
    with pytest.raises(FileNotFoundError, match="test images.*1 image"):
        datamodule.setup("fit")


def test_a_failed_resume_keeps_the_finished_runs_rows_and_names_the_full_disk(trained, data_root, tmp_path, capsys,
                                                                               monkeypatch):
    """main: ENOSPC in the checkpoint writer was a traceback naming neither disk nor path, and the
    failed resume had dropped the finished run's test row from metrics.csv."""
    run = copy_run(trained, tmp_path)
    test_rows = [row for row in metrics_rows(run) if row.get("test/hm")]
    assert test_rows

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_io.torch, "save", disk_full)
    assert main(fit_args(data_root, tmp_path, "--version", run.name, "--ckpt_path", "last",
                         "--trainer.max_epochs", "2")) == 2
    assert_clear_error(capsys, f"cannot write checkpoint {run / 'checkpoints'}", "the disk is full",
                       f"MB free) holds {run / 'checkpoints'}", "the filesystem mounted at /")
    assert [row for row in metrics_rows(run) if row.get("test/hm")] == test_rows
    assert checkpoint_epoch(run / "checkpoints" / "last.ckpt") == 0 and not list(run.glob("checkpoints/.*partial"))


def test_torchs_failed_write_is_named_as_a_full_disk(tmp_path, monkeypatch):
    """torch's zip writer reports a full disk as a RuntimeError ("file write failed")."""
    def write_failed(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0 file write failed")

    monkeypatch.setattr(checkpoint_io.torch, "save", write_failed)
    monkeypatch.setattr(checkpoint_io.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 0))
    with pytest.raises(OSError, match="cannot write checkpoint .*last.ckpt: the disk is full"):
        checkpoint_io.AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, tmp_path / "last.ckpt")


# ---------------------------------------------------------------------- (c) tracebacks

def test_a_read_only_out_dir_is_a_clear_error(data_root, tmp_path, capsys, monkeypatch):
    """main: a traceback. Root ignores permission bits, so mkdir is made to fail as on a read-only mount."""
    real_mkdir = os.mkdir
    out = tmp_path / "read-only"

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(out)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only)
    assert main(fit_args(data_root, out)) == 2
    assert_clear_error(capsys, f"cannot write the run folder (--out_dir {out})", "Read-only file system",
                       "choose a writable folder")


def test_an_out_dir_under_a_file_is_a_clear_error(data_root, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(fit_args(data_root, tmp_path / "file" / "runs")) == 2
    assert_clear_error(capsys, f"--out_dir {tmp_path / 'file' / 'runs'}", "not a folder")


def test_report_out_dir_naming_a_file(trained, tmp_path, capsys):
    """main: a traceback from mkdir."""
    (tmp_path / "report.txt").write_text("x")
    assert main(["report", str(trained), "--out_dir", str(tmp_path / "report.txt"), "--quiet"]) == 2
    assert_clear_error(capsys, f"--out_dir {tmp_path / 'report.txt'} is a file")


def test_data_root_naming_a_file(tmp_path, capsys):
    """main: a traceback (FileExistsError from generating the dataset under it)."""
    (tmp_path / "data.txt").write_text("x")
    assert main(fit_args(tmp_path / "data.txt", tmp_path / "runs")) == 2
    assert_clear_error(capsys, f"--data.root {tmp_path / 'data.txt'} is a file", "one folder per dataset")


def test_gpu_accelerator_without_a_gpu(data_root, tmp_path, capsys, monkeypatch):
    """main: a MisconfigurationException traceback. The GPU is hidden, so this runs on GPU machines too."""
    from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator

    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: False))
    monkeypatch.setattr(MPSAccelerator, "is_available", staticmethod(lambda: False))
    assert main([*fit_args(data_root, tmp_path), "--trainer.accelerator", "gpu"]) == 2
    assert_clear_error(capsys, "--trainer.accelerator", "use --trainer.accelerator cpu")


# ---------------------------------------------------------------------- (d) vague

def pretraining_checkpoint(path: Path) -> Path:
    """What `mmprompt pretrain` saves: a whole CLIP's state dict, no adapter in its hyper-parameters."""
    torch.save({"state_dict": {"clip.logit_scale": torch.zeros(())}, "epoch": 0, "global_step": 1,
                "hyper_parameters": {"model_name": "mmprompt-tiny", "lr": 0.002}}, path)
    return path


def test_ckpt_path_naming_no_adapter_checkpoint(trained, tmp_path, capsys):
    """main: a folder, a missing file and a pretraining checkpoint all said only "the following
    arguments are required: model.adapter", after the usage dump."""
    pretrained = pretraining_checkpoint(tmp_path / "pretrain.ckpt")
    cases = {str(trained): (f"--ckpt_path {trained} is a folder", f"here: {trained / 'checkpoints' / 'last.ckpt'}"),
             str(tmp_path / "nope.ckpt"): (f"--ckpt_path {tmp_path / 'nope.ckpt'}: no such file",),
             str(pretrained): ("is a checkpoint of `mmprompt pretrain`", "--model.pretrained")}
    for ckpt_path, needles in cases.items():
        assert main(["test", "--ckpt_path", ckpt_path, "--out_dir", str(tmp_path / "runs")]) == 2, ckpt_path
        assert_clear_error(capsys, *needles)


def test_export_of_a_pretraining_checkpoint(tmp_path, capsys):
    """main: advised `mmprompt test --config RUN/config.yaml` to re-save it, which cannot work."""
    pretrained = pretraining_checkpoint(tmp_path / "pretrain.ckpt")
    assert main(["export", "--ckpt_path", str(pretrained), "--out_dir", str(tmp_path / "export")]) == 2
    message = assert_clear_error(capsys, "is a checkpoint of `mmprompt pretrain`",
                                 f"--model.pretrained {tmp_path.parent / 'open_clip_weights.pt'}")
    assert "mmprompt test" not in message and not (tmp_path / "export").exists()


def test_export_of_a_checkpoint_that_describes_no_adapter(tmp_path, capsys):
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 0.1}}, foreign)
    assert main(["export", "--ckpt_path", str(foreign), "--out_dir", str(tmp_path / "export")]) == 2
    assert_clear_error(capsys, f"--ckpt_path {foreign} does not describe an adapter",
                       "expected a checkpoint written by `mmprompt fit`")
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("content,expected", [(b"", "{config} is empty"), (b"- a\n- b\n", "{config} holds a list"),
                                              (b"model:\n  lr: 0.1 \xff\n", "{config}: not UTF-8 text (byte 0xff at offset 17)")])
def test_config_files_that_are_no_mapping_are_named(content, expected, tmp_path, capsys):
    """main: these errors did not name the file (a UnicodeDecodeError message, or jsonargparse's)."""
    config = tmp_path / "bad.yaml"
    config.write_bytes(content)
    assert main(["fit", "--config", DEMO, "--config", str(config)]) == 2
    assert_clear_error(capsys, "--config " + expected.format(config=config))


def test_option_errors_are_one_line_and_help_keeps_the_usage(capsys):
    """main: ~80 lines of usage before the one line that matters."""
    assert main(["fit", "--config", DEMO, "--trainer.max_epochz", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmprompt: error:") and err.count("\n") == 1 and "max_epochz" in err, err
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--help"])
    assert exit_.value.code == 0 and "usage:" in capsys.readouterr().out


# ---------------------------------------------------------------------- (e) the tiny CLIP's world

def test_fit_warns_when_the_tiny_clip_meets_real_images(tmp_path):
    """main: the tiny CLIP trained on a folder of photos ended near chance with no hint why."""
    split = custom_tree(tmp_path, {"cat": 2, "dog": 2, "fox": 2, "owl": 2})
    args = fit_args(tmp_path, tmp_path / "runs", "--data.dataset", "custom", "--data.split_file", str(split),
                    "--trainer.max_epochs", "1", "--test_after_fit", "false")
    with pytest.warns(UserWarning, match="bundled tiny CLIP: it knows only the generated captioned world") as caught:
        assert main(args) == 0
    assert sum("tiny CLIP" in str(w.message) for w in caught) == 1


def test_no_tiny_clip_warning_inside_its_world_or_for_a_real_clip():
    """world-shapes and the synthetic sets are the tiny CLIP's world; a real CLIP may meet anything."""
    from mmprompt.run.guards import outside_tiny_world

    assert outside_tiny_world(True, True, "world-shapes", "synthetic-world") is None
    assert outside_tiny_world(False, False, "custom", "openai") is None
    assert "not dataset custom" in outside_tiny_world(True, False, "custom", "synthetic-world")


def test_a_full_disk_in_any_json_writer_names_the_file(tmp_path, monkeypatch):
    """A failed ``write`` carries no file name (``[Errno 28] No space left on device``): the writer adds it."""
    from mmprompt import files
    from mmprompt.tables import write_json_atomic

    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, fd, mode):
            self.handle = real_fdopen(fd, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "fdopen", FullDisk)
    with pytest.raises(OSError, match=f"cannot write {tmp_path / 'results.json'}: the disk is full"):
        write_json_atomic(tmp_path / "results.json", {"a": 1})
    assert not list(tmp_path.iterdir())  # no temporary file left


def test_a_broken_test_image_after_training_says_how_to_test_the_saved_model(tmp_path, capsys):
    """A truncated test image is found when it is read (checking every image's contents before training
    would decode the whole test set); main ended on the file's error alone, as if training were lost."""
    split = custom_tree(tmp_path, {"cat": 4, "dog": 4, "fox": 4, "owl": 4})
    broken = split.parent / json.loads(split.read_text())["test"][0][0]
    broken.write_bytes(broken.read_bytes()[:60])
    args = fit_args(tmp_path, tmp_path / "runs", "--data.dataset", "custom", "--data.split_file", str(split),
                    "--version", "v", "--trainer.max_epochs", "1", "--trainer.limit_test_batches", "2")
    assert main(args) == 2
    run = tmp_path / "runs" / "demo" / "v"
    assert_clear_error(capsys, f"cannot read image {broken}", f"training finished and is saved in {run / 'checkpoints' / 'last.ckpt'}",
                       f"`mmprompt test --config {run / 'config.yaml'} --ckpt_path {run / 'checkpoints' / 'last.ckpt'}`")
    assert (run / "checkpoints" / "last.ckpt").is_file()
