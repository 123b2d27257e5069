"""`mmprompt sweep --launcher slurm|local`: one submitit job array, each job a training run with the tests
of its checkpoint; skip/resume decided when a job starts. ``--launcher local`` is submitit's local
executor: the same array and jobs as on SLURM, as processes here."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from test_sweep import FakeRunner, cross_dataset_argv, option, workdir  # noqa: F401 (workdir is a fixture)

from mmprompt.run.commands import main as mmprompt_main
from mmprompt.tools import sweep
from mmprompt.tools.sweep_cluster import SweepJob, job_groups

REPO = Path(__file__).resolve().parents[1]
#: the job processes unpickle `LoggingRunner` by importing this file: keep its imports light (no torch)
LOCAL = ["--launcher", "local", "--timeout_min", "5", "--gpus_per_node", "0", "--no_report"]


def names(runs) -> list[str]:
    return [f"{run.name}/{run.version}" for run in runs]


def test_a_training_run_shares_its_job_with_the_tests_of_its_checkpoint(workdir):
    config, _ = sweep.parse_config(cross_dataset_argv("--seeds", "1", "2"))
    groups = job_groups(sweep.plan_sweep(config))
    assert [names(group) for group in groups] == [
        ["MaPLe-imagenet/seed1", "MaPLe-caltech101/seed1", "MaPLe-eurosat/seed1"],
        ["MaPLe-imagenet/seed2", "MaPLe-caltech101/seed2", "MaPLe-eurosat/seed2"],
        ["ZeroShot-imagenet/seed1"], ["ZeroShot-caltech101/seed1"], ["ZeroShot-eurosat/seed1"],  # nothing to wait for
    ]


def test_a_job_skips_finished_runs_resumes_interrupted_ones_and_blocks_tests_of_a_failed_fit(workdir):
    config, _ = sweep.parse_config(cross_dataset_argv())
    maple = job_groups(sweep.plan_sweep(config))[0]
    interrupted = maple[0].run_dir / "checkpoints" / "last.ckpt"
    interrupted.parent.mkdir(parents=True)
    interrupted.write_text("")
    (maple[1].run_dir).mkdir(parents=True)
    (maple[1].run_dir / "results.json").write_text("{}")
    runner = FakeRunner()
    summary = SweepJob(config, maple, runner)()
    assert runner.run_names == ["MaPLe-imagenet/seed1", "MaPLe-eurosat/seed1"]  # caltech101 had finished
    assert option(runner.commands[0], "--ckpt_path") == "last" and runner.commands[1][1] == "test"
    assert {k: len(v) for k, v in summary.outcomes.items()} == {"skipped": 1, "resumed": 1, "ran": 1}
    failing = FakeRunner(fail=("MaPLe-imagenet",))
    for run in (maple[0], maple[2]):
        (run.run_dir / "results.json").unlink()
    assert SweepJob(config, maple, failing)().outcomes.keys() == {"failed", "blocked", "skipped"}


class LoggingRunner(FakeRunner):
    """FakeRunner that also appends ``start|end <name>`` to ``order.log`` (it runs in the job processes)."""

    def __call__(self, command: list[str], device: str | None = None) -> int:
        with open("order.log", "a") as log:
            log.write(f"start {option(command, '--name')}\n")
        time.sleep(0.2)
        status = super().__call__(command, device)
        with open("order.log", "a") as log:
            log.write(f"end {option(command, '--name')}\n")
        return status


@pytest.mark.slow
def test_local_launcher_runs_the_job_array_with_tests_after_their_training_and_skips_on_resubmit(
        workdir, monkeypatch, capsys):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), str(REPO / "tests")]))  # the jobs import this file
    assert sweep.main(cross_dataset_argv(*LOCAL), runner=LoggingRunner()) == 0
    out = capsys.readouterr().out
    assert "submitted 4 jobs (local)" in out and "sweep: 6 ran" in out
    log = Path("order.log").read_text().split("\n")
    for target in ("MaPLe-caltech101", "MaPLe-eurosat"):
        assert log.index("end MaPLe-imagenet") < log.index(f"start {target}")
    assert len(list(Path("runs/cross_dataset").glob("*/seed1/results.json"))) == 6
    assert sweep.main(cross_dataset_argv(*LOCAL), runner=LoggingRunner()) == 0
    assert "every run has finished; nothing to submit" in capsys.readouterr().out


def test_slurm_launcher_without_sbatch_and_bad_options_are_clear_errors(workdir, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(workdir))  # no sbatch here
    assert mmprompt_main(["sweep", *cross_dataset_argv("--launcher", "slurm")]) == 2
    assert "mmprompt: error: --launcher slurm: sbatch is not on this machine's PATH" in capsys.readouterr().err
    assert mmprompt_main(["sweep", *cross_dataset_argv("--launcher", "local", "--slurm", "accont=x")]) == 2
    assert "mmprompt: error: --slurm: Unknown argument 'accont' for executor 'slurm'" in capsys.readouterr().err
    assert mmprompt_main(["sweep", *cross_dataset_argv("--launcher", "local", "--devices", "0", "1")]) == 2
    assert "--devices and --launcher exclude each other" in capsys.readouterr().err


@pytest.mark.slow
def test_local_launcher_runs_real_mmprompt_runs_into_a_report(data_root, tmp_path):
    """A job runs `mmprompt test` as a user's sweep does (zero-shot tiny CLIP on the synthetic shapes; the
    order of fits and tests is checked above with a stand-in runner)."""
    from run_helpers import mmprompt

    argv = ["sweep", "--protocol", "base2new", "--methods", "zero_shot", "--datasets", "synthetic",
            "--seeds", "1", "--out_dir", str(tmp_path / "runs"), "--configs", str(REPO / "configs"), *LOCAL[:-1],
            "--", "--config", "tiny", "--data.root", str(data_root), "--data.shots", "2",
            "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"]
    first = mmprompt(*argv, cwd=tmp_path, timeout=240)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert "submitted 1 jobs (local)" in first.stdout and "sweep: 1 ran" in first.stdout
    (result,) = tmp_path.glob("runs/*/seed1/results.json")
    assert json.loads(result.read_text())["method"] == "ZeroShot"
    written = [line.split("wrote ", 1)[1] for line in first.stderr.splitlines() if line.startswith("wrote ")]
    assert written and all(Path(path).is_file() for path in written)  # the report at the end


@pytest.mark.slow
def test_slurm_launcher_submits_one_job_array_with_the_resources_asked(workdir, monkeypatch, capsys):
    """Stand-ins for ``sbatch`` and ``srun`` (first on PATH): the submission file is one array over the 4 jobs."""
    bin_dir = workdir / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\ncp "$1" "$SBATCH_COPY"\necho "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit looks for it; the jobs never run here
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_COPY", str(workdir / "submitted.sh"))
    argv = cross_dataset_argv("--launcher", "slurm", "--partition", "gpu", "--gpus_per_node", "2",
                              "--timeout_min", "90", "--array_parallelism", "3", "--slurm", "account=proj")
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    assert "submitted 4 jobs (slurm)" in out and all(f"4242_{i}:" in out for i in range(4))
    script = (workdir / "submitted.sh").read_text()
    for flag in ("--array=0-3%3", "--partition=gpu", "--gpus-per-node=2", "--time=90", "--account=proj"):
        assert f"#SBATCH {flag}" in script, flag
