"""`mmprompt sweep` planning, skip/resume and commands, with a fake runner instead of training."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest

from mmprompt.tools import sweep

COMMON = "--seed_everything {s} --data.seed {s} --data.shots 16"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A checkout-like folder with the config files a sweep needs; commands use paths relative to it."""
    monkeypatch.chdir(tmp_path)
    for kind, stems in {"protocols": ["base2new", "fewshot", "cross_dataset"],
                        "methods": ["maple", "bias", "zero_shot"],
                        "datasets": ["eurosat", "dtd", "imagenet", "caltech101"]}.items():
        (tmp_path / "configs" / kind).mkdir(parents=True)
        for stem in stems:
            (tmp_path / "configs" / kind / f"{stem}.yaml").write_text("{}\n")
    return tmp_path


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


class FakeRunner:
    """Records commands; writes results.json like a finished run unless told to fail."""

    def __init__(self, fail: tuple[str, ...] = (), status: int = 1, write_results: bool = True):
        self.commands: list[list[str]] = []
        self.fail, self.status, self.write_results = fail, status, write_results

    def __call__(self, command: list[str], device: str | None = None) -> int:
        self.commands.append(command)
        run_dir = Path(option(command, "--out_dir")) / option(command, "--name") / option(command, "--version")
        if option(command, "--name") in self.fail:
            return self.status
        run_dir.mkdir(parents=True, exist_ok=True)
        if self.write_results:
            (run_dir / "results.json").write_text(json.dumps({
                "protocol": option(command, "--protocol"), "method": option(command, "--name").split("-")[0],
                "dataset": option(command, "--name").split("-")[1], "seed": int(option(command, "--data.seed")),
                "shots": 16, "metrics": {"test/base/acc": 80.0, "test/new/acc": 70.0}}))
        return 0

    @property
    def run_names(self) -> list[str]:
        return [f"{option(c, '--name')}/{option(c, '--version')}" for c in self.commands]


def base2new(workdir: Path, *extra: str) -> list[str]:
    return ["--protocol", "base2new", "--methods", "maple", "bias", "--datasets", "eurosat", "dtd",
            "--seeds", "1", "2", "--out_dir", "runs/b2n", *extra]


def test_plan_is_deterministic_with_fixed_names_and_versions(workdir):
    config, _ = sweep.parse_config(base2new(workdir))
    first, second = sweep.plan_sweep(config), sweep.plan_sweep(config)
    assert first == second
    assert [f"{r.name}/{r.version}" for r in first] == [
        "MaPLe-eurosat/seed1", "MaPLe-dtd/seed1", "MaPLe-eurosat/seed2", "MaPLe-dtd/seed2",
        "BiasTuning-eurosat/seed1", "BiasTuning-dtd/seed1", "BiasTuning-eurosat/seed2", "BiasTuning-dtd/seed2",
    ]
    assert {r.subcommand for r in first} == {"fit"}
    assert first[0].run_dir == Path("runs/b2n/MaPLe-eurosat/seed1")


def test_dry_run_prints_exact_commands_with_overrides_last(workdir, capsys):
    argv = ["--protocol", "base2new", "--methods", "maple", "zero_shot", "--datasets", "eurosat", "--seeds", "1", "2",
            "--out_dir", "runs/b2n", "--dry_run", "--", "--trainer.devices", "4", "--trainer.strategy", "ddp"]
    assert sweep.main(argv, runner=FakeRunner()) == 0
    head = "--config configs/protocols/base2new.yaml --config configs/methods/{m}.yaml --config configs/datasets/eurosat.yaml"
    tail = "--out_dir runs/b2n --protocol base2new --trainer.devices 4 --trainer.strategy ddp"
    assert capsys.readouterr().out.splitlines() == [
        f"mmprompt fit {head.format(m='maple')} {COMMON.format(s=1)} --name MaPLe-eurosat --version seed1 {tail}",
        f"mmprompt fit {head.format(m='maple')} {COMMON.format(s=2)} --name MaPLe-eurosat --version seed2 {tail}",
        # zero-shot: a test run, first seed only
        f"mmprompt test {head.format(m='zero_shot')} {COMMON.format(s=1)} --name ZeroShot-eurosat --version seed1 {tail}",
    ]


def finished_and_killed_runs(workdir: Path) -> None:
    """A finished run (MaPLe-eurosat seed 1: results.json) and a killed one (BiasTuning-dtd seed 2: last.ckpt)."""
    done = workdir / "runs/b2n/MaPLe-eurosat/seed1"
    done.mkdir(parents=True)
    (done / "results.json").write_text("{}")
    killed = workdir / "runs/b2n/BiasTuning-dtd/seed2/checkpoints"
    killed.mkdir(parents=True)
    (killed / "last.ckpt").write_bytes(b"")


def test_finished_runs_skipped_and_interrupted_runs_resumed(workdir):
    finished_and_killed_runs(workdir)
    runner = FakeRunner()
    assert sweep.main(base2new(workdir, "--no_report"), runner=runner) == 0
    assert "MaPLe-eurosat/seed1" not in runner.run_names and len(runner.commands) == 7
    resumed = [c for c in runner.commands if "--ckpt_path" in c]
    assert [f"{option(c, '--name')}/{option(c, '--version')}" for c in resumed] == ["BiasTuning-dtd/seed2"]
    assert resumed[0][-2:] == ["--ckpt_path", "last"]
    # a second pass finds everything finished and runs nothing
    again = FakeRunner()
    assert sweep.main(base2new(workdir, "--no_report"), runner=again) == 0
    assert again.commands == []


def test_dry_run_marks_finished_runs(workdir, capsys):
    done = workdir / "runs/b2n/MaPLe-dtd/seed2"
    done.mkdir(parents=True)
    (done / "results.json").write_text("{}")
    assert sweep.main(base2new(workdir, "--dry_run")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[3] == "# skip (finished): runs/b2n/MaPLe-dtd/seed2"
    assert len(lines) == 8 and sum(line.startswith("mmprompt fit ") for line in lines) == 7


def test_failure_stops_by_default_and_keep_going_continues(workdir):
    runner = FakeRunner(fail=("MaPLe-eurosat",))
    assert sweep.main(base2new(workdir, "--no_report"), runner=runner) == 1
    assert runner.run_names == ["MaPLe-eurosat/seed1"]
    runner = FakeRunner(fail=("MaPLe-eurosat",))
    assert sweep.main(base2new(workdir, "--no_report", "--keep_going"), runner=runner) == 1
    assert len(runner.commands) == 8  # both MaPLe-eurosat seeds fail, everything else runs


def test_exit_zero_without_results_is_a_failure(workdir, capsys):
    runner = FakeRunner(write_results=False)
    assert sweep.main(base2new(workdir, "--no_report"), runner=runner) == 1
    assert len(runner.commands) == 1
    assert "exited 0 without results.json" in capsys.readouterr().out


def cross_dataset_argv(*extra: str) -> list[str]:
    return ["--protocol", "cross_dataset", "--methods", "maple", "zero_shot", "--datasets", "caltech101", "eurosat",
            "--seeds", "1", *extra]


def test_cross_dataset_trains_on_imagenet_then_tests_its_checkpoint(workdir):
    runner = FakeRunner()
    assert sweep.main(cross_dataset_argv("--no_report"), runner=runner) == 0
    assert [c[1] for c in runner.commands] == ["fit", "test", "test", "test", "test", "test"]
    assert runner.run_names == ["MaPLe-imagenet/seed1", "MaPLe-caltech101/seed1", "MaPLe-eurosat/seed1",
                                "ZeroShot-imagenet/seed1", "ZeroShot-caltech101/seed1", "ZeroShot-eurosat/seed1"]
    ckpt = str(Path("runs/cross_dataset/MaPLe-imagenet/seed1/checkpoints/last.ckpt"))
    assert [option(c, "--ckpt_path") for c in runner.commands[1:3]] == [ckpt, ckpt]
    assert all("--ckpt_path" not in c for c in runner.commands[3:])  # zero-shot tests need no checkpoint
    assert "configs/datasets/caltech101.yaml" in runner.commands[1]


def test_failed_training_blocks_its_tests(workdir, capsys):
    runner = FakeRunner(fail=("MaPLe-imagenet",))
    assert sweep.main(cross_dataset_argv("--no_report", "--keep_going"), runner=runner) == 1
    assert runner.run_names == ["MaPLe-imagenet/seed1", "ZeroShot-imagenet/seed1", "ZeroShot-caltech101/seed1",
                                "ZeroShot-eurosat/seed1"]
    assert "2 blocked" in capsys.readouterr().out


def test_print_commands_holds_back_tests_until_training_finished(workdir, capsys):
    assert sweep.main(cross_dataset_argv("--methods", "maple", "--print_commands")) == 0
    captured = capsys.readouterr()
    assert [line.split()[1] for line in captured.out.splitlines()] == ["fit"]
    assert "2 test runs wait" in captured.err
    done = workdir / "runs/cross_dataset/MaPLe-imagenet/seed1"
    done.mkdir(parents=True)
    (done / "results.json").write_text("{}")
    assert sweep.main(cross_dataset_argv("--methods", "maple", "--print_commands")) == 0
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines()] == ["test", "test"]


def test_fewshot_versions_carry_shots(workdir):
    config, _ = sweep.parse_config(["--protocol", "fewshot", "--methods", "bias", "--datasets", "dtd", "--seeds", "3"])
    runs = sweep.plan_sweep(config)
    assert [r.version for r in runs] == [f"{k}shots-seed3" for k in (1, 2, 4, 8, 16)]
    assert [option(sweep.build_command(config, r), "--data.shots") for r in runs] == ["1", "2", "4", "8", "16"]
    assert config.out_dir == Path("runs/fewshot")


def test_sweep_ends_with_the_report(workdir, capsys):
    assert sweep.main(base2new(workdir), runner=FakeRunner()) == 0
    assert "| MaPLe | eurosat | 1,2 | 80.00 ± 0.00 |" in capsys.readouterr().out
    assert (workdir / "runs/b2n/report/report.md").is_file()


def test_missing_configs_listed_before_anything_runs(workdir, capsys):
    runner = FakeRunner()
    assert sweep.main(["--protocol", "base2new", "--methods", "MaPLe", "--datasets", "dtd"], runner=runner) == 2
    assert "configs/methods/MaPLe.yaml" in capsys.readouterr().err
    assert runner.commands == []


class SlowRunner(FakeRunner):
    """A FakeRunner whose runs take a while, recording which device each ran on and how many overlapped.
    With ``meet=2`` the first two runs wait for each other: a sweep that ran them one after the other
    would fail at the barrier instead of merely being slower."""

    def __init__(self, meet: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.lock, self.active, self.most_at_once = threading.Lock(), set(), 0
        self.devices: dict[str, str | None] = {}
        self.started: list[str] = []  # in start order (run_names is in finishing order)
        self.meeting = threading.Barrier(meet, timeout=30) if meet else None

    def __call__(self, command: list[str], device: str | None = None) -> int:
        name = f"{option(command, '--name')}/{option(command, '--version')}"
        with self.lock:
            assert device not in self.active, f"two runs on device {device} at once"
            self.active.add(device)
            self.most_at_once = max(self.most_at_once, len(self.active))
            self.devices[name] = device
            self.started.append(name)
            meets = self.meeting is not None and len(self.started) <= self.meeting.parties
        if meets:
            self.meeting.wait()  # raises BrokenBarrierError if the others never start
        time.sleep(0.2)
        with self.lock:
            self.active.discard(device)
        return super().__call__(command, device)


def test_devices_run_independent_runs_in_parallel_one_per_device_with_skip_and_resume(workdir, capsys):
    finished_and_killed_runs(workdir)
    runner = SlowRunner(meet=2)  # two runs at once, on two devices: one at a time would break the barrier
    assert sweep.main(base2new(workdir, "--no_report", "--devices", "0", "1"), runner=runner) == 0
    assert runner.most_at_once == 2 and set(runner.devices.values()) == {"0", "1"}
    assert len(runner.commands) == 7 and "MaPLe-eurosat/seed1" not in runner.run_names
    resumed = [c for c in runner.commands if "--ckpt_path" in c]
    assert [f"{option(c, '--name')}/{option(c, '--version')}" for c in resumed] == ["BiasTuning-dtd/seed2"]
    assert "CUDA_VISIBLE_DEVICES=0 mmprompt fit" in capsys.readouterr().out
    again = SlowRunner()
    assert sweep.main(base2new(workdir, "--no_report", "--devices", "0", "1"), runner=again) == 0
    assert again.commands == []


def test_parallel_transfer_tests_wait_for_their_training_run(workdir):
    runner = SlowRunner()
    assert sweep.main(cross_dataset_argv("--no_report", "--devices", "0", "1"), runner=runner) == 0
    started, finished = runner.started, runner.run_names
    assert len(started) == len(finished) == 6
    # the zero-shot runs need no checkpoint and use the second device while MaPLe trains
    assert set(started[:2]) == {"MaPLe-imagenet/seed1", "ZeroShot-imagenet/seed1"}
    for target in ("MaPLe-caltech101/seed1", "MaPLe-eurosat/seed1"):  # the transfer tests wait for the checkpoint
        assert started.index(target) > finished.index("MaPLe-imagenet/seed1")


def test_parallel_failure_stops_new_runs_and_blocks_tests(workdir, capsys):
    runner = SlowRunner(fail=("MaPLe-imagenet",))
    assert sweep.main(cross_dataset_argv("--no_report", "--devices", "0", "1", "--keep_going"), runner=runner) == 1
    assert "MaPLe-caltech101/seed1" not in runner.run_names and len(runner.commands) == 4
    assert "2 blocked" in capsys.readouterr().out
    runner = SlowRunner(fail=("MaPLe-eurosat",))
    assert sweep.main(base2new(workdir, "--no_report", "--devices", "0", "1"), runner=runner) == 1
    assert len(runner.commands) == 2  # the two that were running when the first failed; nothing new started


@pytest.mark.slow
def test_subprocess_runner_pins_the_device():
    code = "import os, sys; sys.exit(int(os.environ['CUDA_VISIBLE_DEVICES']))"
    assert sweep.subprocess_runner([sys.executable, "-c", code], "3") == 3
