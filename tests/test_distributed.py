"""Several processes (CPU, gloo): no hang, every evaluation image counted once, one run folder, the
recipe's global batch. Every multi-process run goes through ``run_helpers`` with a hard timeout that
kills the DDP workers too, so a deadlock fails the test in minutes instead of blocking CI."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from run_helpers import child_pids, hard_deadline, mmprompt, torchrun

from mmprompt.data import FewShotDataModule
from mmprompt.data.distributed import per_device_batch, unrepeated_sampler
from mmprompt.run.cli import claim_run_dir, cli_main
from mmprompt.run.launch import slurm_version

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
DEMO = str(CONFIGS / "demo.yaml")
ANALYSIS_CONFIGS = sorted((CONFIGS / "analysis").glob("attention*.yaml"))  # statistics + overlays
PRIME_TEST_SET = 13
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def ddp(devices: int) -> list[str]:
    return ["--trainer.accelerator", "cpu", "--trainer.devices", str(devices), "--trainer.strategy", "ddp"]


def ok(result) -> None:
    assert result.returncode == 0, result.stderr[-4000:]


def results_of(run: Path) -> dict[str, float]:
    return json.loads((run / "results.json").read_text())["metrics"]


def statistics_of(run: Path) -> dict:
    summary = json.loads((run / "attention_stats.json").read_text())
    summary.pop("meta")
    return summary


def assert_same_statistics(one: dict, other: dict) -> None:
    """Counts equal exactly; means equal to float32 precision (the batches group the images differently)."""
    for tower in ("vision", "text"):
        assert one[tower]["images" if tower == "vision" else "sequences"] == \
            other[tower]["images" if tower == "vision" else "sequences"]
        for key, values in one[tower].items():
            assert torch.allclose(torch.tensor(other[tower][key], dtype=torch.float64),
                                  torch.tensor(values, dtype=torch.float64), rtol=1e-5, atol=1e-7, equal_nan=True), key


# ----------------------------------------------------------------------------- units (one process)


def test_global_batch_divides_over_processes_or_is_refused():
    assert [per_device_batch(4, n) for n in (1, 2, 4)] == [4, 2, 1]
    with pytest.raises(ValueError, match=r"data.batch_size=4 is the global batch .* 3 processes .* \[1, 2, 4\]"):
        per_device_batch(4, 3)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_unrepeated_shards_cover_every_index_once(world_size):
    dataset = list(range(PRIME_TEST_SET))
    if world_size == 1:
        assert unrepeated_sampler(dataset, 1, 0, "test") is None
        return
    shards = [list(unrepeated_sampler(dataset, world_size, rank, "test")) for rank in range(world_size)]
    assert sorted(i for shard in shards for i in shard) == dataset
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_eval_set_smaller_than_the_world_is_refused():
    with pytest.raises(ValueError, match="the test set has 2 images, fewer than the 3 processes"):
        unrepeated_sampler([0, 1], 3, 0, "test")


class FakeTrainer:
    def __init__(self, world_size: int, global_rank: int) -> None:
        self.world_size, self.global_rank = world_size, global_rank


def test_datamodule_loaders_split_the_global_batch_and_shard_evaluation(data_root):
    from torch.utils.data import DistributedSampler

    module = FewShotDataModule(dataset="synthetic", root=str(data_root), image_size=64, shots=4, batch_size=4,
                               eval_batch_size=7, subsample="base")
    module.setup("fit")
    module.setup("test")
    assert module.train_dataloader().batch_size == 4
    assert type(module.test_dataloader()[0].sampler).__name__ == "SequentialSampler"
    module.trainer = FakeTrainer(2, 1)
    assert module.train_dataloader().batch_size == 2  # 2 processes x 2 = the recipe's 4
    test_loader = module.test_dataloader()[0]
    # a DistributedSampler already: Lightning does not swap in its padding one
    assert isinstance(test_loader.sampler, DistributedSampler) and test_loader.batch_size == 7
    assert list(test_loader.sampler) == list(range(1, 100, 2))  # rank 1 of 2 over the 100 base test images
    module.trainer = FakeTrainer(3, 0)
    with pytest.raises(ValueError, match="data.batch_size=4 is the global batch"):
        module.train_dataloader()


def test_protocol_configs_keep_the_paper_batch_as_global_batch():
    """The documented semantics: the protocol files set the recipe's global batch, devices stay free."""
    for protocol in sorted((CONFIGS / "protocols").glob("*.yaml")):
        text = protocol.read_text()
        assert "batch_size: 4" in text, protocol
        assert "devices:" not in text, protocol


def test_srun_tasks_derive_one_version(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setenv("MMPROMPT_RUN_DIR", "")  # claim_run_dir sets it; monkeypatch restores it
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_STEP_ID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert slurm_version() is None  # one task: the ordinary next free version_N
    monkeypatch.setenv("SLURM_NTASKS", "2")
    folders = {claim_run_dir(str(tmp_path), "demo", None) for _ in range(2)}
    assert folders == {tmp_path / "demo" / "slurm4242.3"}


def test_torchrun_without_an_agent_store_asks_for_a_version(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    with pytest.raises(ValueError, match="pass the same --version to every rank"):
        claim_run_dir(str(tmp_path), "demo", None)


# ----------------------------------------------------------------------------- several processes


@pytest.mark.slow
def test_shipped_demo_config_under_ddp_matches_one_process(data_root, tmp_path):
    """configs/demo.yaml exactly as shipped (its AttentionStatistics callback included), fit and test."""
    # eval batches of 150: the callback's 2 recorded batches per process then cover all 300 images of each
    # test set on one process and on two, so both see the same images (max_batches counts per process)
    common = ["--config", DEMO, "--data.root", str(data_root), "--out_dir", str(tmp_path), "--data.eval_batch_size",
              "150", *QUIET]
    ok(mmprompt("fit", *common, "--version", "ddp_fit", *ddp(2), "--data.shots", "4", "--trainer.max_epochs", "1",
                cwd=tmp_path))
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["ddp_fit"], "one run folder for both ranks"
    fitted = tmp_path / "demo" / "ddp_fit"
    assert {"results.json", "attention_stats.json", "attention_stats.png"} <= {p.name for p in fitted.iterdir()}
    checkpoint = fitted / "checkpoints" / "last.ckpt"
    # 24 training images (6 base classes x 4 shots), global batch 16: 2 steps on 2 processes, as on one
    assert torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"] == 2
    tested = ["test", *common, "--ckpt_path", str(checkpoint)]
    cli_main([*tested, "--version", "single", "--trainer.devices", "1"])  # the reference, in this process
    ok(mmprompt(*tested, "--version", "ddp", *ddp(2), cwd=tmp_path))
    single, parallel = tmp_path / "demo" / "single", tmp_path / "demo" / "ddp"
    assert results_of(parallel) == results_of(single) and results_of(single)["test/base/acc"] > 0
    assert_same_statistics(statistics_of(single), statistics_of(parallel))
    assert statistics_of(single)["vision"]["images"][0] == 600  # base + new loaders, 300 images each, each once


@pytest.mark.slow
@pytest.mark.parametrize("analysis", ANALYSIS_CONFIGS, ids=lambda p: p.stem)
def test_shipped_analysis_config_with_reference_and_route_intervention_under_ddp(analysis, data_root, tmp_path):
    """An analysis config as shipped (statistics + overlays) fit under DDP; a DDP test of that checkpoint
    with the first run as reference; a DDP test with a mean-bias RouteIntervention (two passes, summed β)."""
    common = ["--data.root", str(data_root), "--out_dir", str(tmp_path), *QUIET, *ddp(2)]
    analysed = ["--config", DEMO, "--config", str(analysis), *common]
    ok(mmprompt("fit", *analysed, "--version", "reference", "--data.shots", "2", "--trainer.max_epochs", "1",
                "--trainer.limit_val_batches", "1", cwd=tmp_path))
    reference = tmp_path / "demo" / "reference"
    checkpoint = str(reference / "checkpoints" / "last.ckpt")
    assert {"attention_overlay.png", "attention_maps.pt", "results.json"} <= {p.name for p in reference.iterdir()}
    tested = mmprompt("test", *analysed, "--version", "compared", "--ckpt_path", checkpoint,
                      "--trainer.callbacks.init_args.reference", str(reference), cwd=tmp_path)
    ok(tested)
    # the overlay images are the first test images for any number of ranks, so the reference's maps match
    assert "overlay shows this model only" not in tested.stderr
    compared = tmp_path / "demo" / "compared"
    maps = torch.load(compared / "attention_maps.pt", map_location="cpu", weights_only=False)
    saved = torch.load(reference / "attention_maps.pt", map_location="cpu", weights_only=False)
    assert maps["images"].shape[0] == 8 and torch.equal(maps["images"], saved["images"])
    assert results_of(compared) == results_of(reference)  # same checkpoint, same test set
    intervention = "[{class_path: mmprompt.analysis.RouteIntervention, init_args: {mode: mean_bias}}]"
    ok(mmprompt("test", "--config", DEMO, *common, "--version", "intervened", "--ckpt_path", checkpoint,
                "--trainer.callbacks", intervention, cwd=tmp_path))
    intervened = results_of(tmp_path / "demo" / "intervened")
    assert set(intervened) == {"test/base/acc", "test/new/acc", "test/hm"}
    assert all(0 <= value <= 100 for value in intervened.values())


def custom_prime_split(data_root: Path, folder: Path) -> Path:
    """A dataset config whose test split has 13 (a prime number of) synthetic images."""
    split = json.loads((data_root / "synthetic" / "split_zhou_Synthetic.json").read_text())
    split["test"] = split["test"][::15][:PRIME_TEST_SET]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "split.json").write_text(json.dumps(split))
    config = folder / "prime.yaml"
    config.write_text(
        f"data:\n  dataset: custom\n  split_file: {folder / 'split.json'}\n  image_dir: {data_root / 'synthetic/images'}\n"
        f"  mask_dir: {data_root / 'synthetic/masks'}\n  subsample: all\n  eval_batch_size: 2\n")
    return config


def recorded(folder: Path, stage: str) -> dict[tuple[int, int], int]:
    """Union of the ranks' (dataloader, index) -> prediction; fails on an image seen twice."""
    merged: dict[tuple[int, int], int] = {}
    for path in sorted(folder.glob(f"{stage}_rank*.pt")):
        for loader, index, label in torch.load(path):
            assert (loader, index) not in merged, f"image {index} evaluated twice"
            merged[(loader, index)] = label
    return merged


@pytest.mark.slow
def test_world_sizes_1_2_3_give_identical_metrics_statistics_and_predictions(data_root, tmp_path):
    config = custom_prime_split(data_root, tmp_path / "prime")
    callbacks = ("[{class_path: mmprompt.analysis.AttentionStatistics, init_args: {max_batches: 100, "
                 "print_summary: false}}, {class_path: run_helpers.PredictionRecorder, init_args: {output_dir: %s}}]")

    def args(world: int, stage: str = "test") -> list[str]:
        return [stage, "--config", DEMO, "--config", str(config), "--out_dir", str(tmp_path), "--version",
                f"{stage}{world}", *QUIET, "--trainer.callbacks", callbacks % (tmp_path / "demo" / f"{stage}{world}")]

    cli_main([*args(1), "--trainer.devices", "1"])
    for world in (2, 3):
        ok(mmprompt(*args(world), *ddp(world), cwd=tmp_path))
    runs = {world: tmp_path / "demo" / f"test{world}" for world in (1, 2, 3)}
    for world in (2, 3):
        assert results_of(runs[world]) == results_of(runs[1])
        assert_same_statistics(statistics_of(runs[1]), statistics_of(runs[world]))
        assert recorded(runs[world], "test") == recorded(runs[1], "test")
        assert len(list(runs[world].glob("test_rank*.pt"))) == world
    assert statistics_of(runs[1])["vision"]["images"][0] == PRIME_TEST_SET
    assert sorted(index for _, index in recorded(runs[1], "test")) == list(range(PRIME_TEST_SET))
    accuracy = results_of(runs[1])["test/all/acc"]
    assert round(accuracy * PRIME_TEST_SET / 100, 6).is_integer()  # a count out of 13, not out of a padded 14 or 15
    ok(mmprompt(*args(3, "predict"), *ddp(3), cwd=tmp_path))
    assert len(list((tmp_path / "demo" / "predict3").glob("predict_rank*.pt"))) == 3
    assert recorded(tmp_path / "demo" / "predict3", "predict") == recorded(runs[1], "test")


@pytest.mark.slow
def test_torchrun_ranks_agree_on_one_run_folder_without_version(data_root, tmp_path):
    (tmp_path / "demo" / "version_0").mkdir(parents=True)  # taken: a rank guessing on its own could pick either
    result = torchrun("fit", "--config", DEMO, "--data.root", str(data_root), "--out_dir", str(tmp_path), *QUIET,
                      *ddp(2), "--data.shots", "2", "--trainer.max_epochs", "1", nproc=2, cwd=tmp_path)
    ok(result)
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["version_0", "version_1"]
    run = tmp_path / "demo" / "version_1"
    assert {"results.json", "config.yaml", "attention_stats.json"} <= {p.name for p in run.iterdir()}
    assert (run / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_sweep_runs_two_jobs_in_parallel_one_per_device(data_root, tmp_path):
    sweep = ["sweep", "--protocol", "base2new", "--methods", "bias", "zero_shot", "--datasets", "synthetic",
             "--seeds", "1", "--out_dir", str(tmp_path / "runs"), "--configs", str(CONFIGS), "--devices", "0", "1",
             "--no_report", "--", "--config", str(CONFIGS / "tiny.yaml"), "--data.root", str(data_root),
             "--data.shots", "2", "--trainer.max_epochs", "1", *QUIET]
    first = mmprompt(*sweep, cwd=tmp_path)
    ok(first)
    assert "CUDA_VISIBLE_DEVICES=0" in first.stdout and "CUDA_VISIBLE_DEVICES=1" in first.stdout
    assert "sweep: 2 ran" in first.stdout
    for name in ("BiasTuning-synthetic", "ZeroShot-synthetic"):
        assert (tmp_path / "runs" / name / "seed1" / "results.json").is_file()
    again = mmprompt(*sweep, cwd=tmp_path)
    ok(again)
    assert "sweep: 2 skipped" in again.stdout


@pytest.mark.slow
def test_hard_deadline_kills_children_and_fails_instead_of_hanging():
    child = subprocess.Popen(["sleep", "60"])
    started = time.perf_counter()
    with pytest.raises(AssertionError, match="did not finish in 1 s"), hard_deadline(1):
        child.wait()
    assert time.perf_counter() - started < 10 and child.wait(timeout=5) == -9
    assert child.pid not in child_pids(os.getpid())
