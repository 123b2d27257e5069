"""``mmprompt sweep --launcher slurm``: a sweep's runs as one SLURM job array, through submitit.

Each job of the array runs one *group* of the plan with the sweep's own scheduler, one run after
the other: a training run together with the tests of its checkpoint (transfer protocols), or a single
run. So a test still starts only after its training run finished, with no dependency between array
jobs. A job decides what to do when it starts, not when it was submitted: finished runs are skipped
and interrupted ones resume with ``--ckpt_path last``; a job SLURM preempts or times out is requeued
by submitit (`SweepJob` is checkpointable) and, started again, resumes from its runs' last checkpoints. Submitting again skips
groups whose runs all finished.

``--launcher local`` sends the same job array to submitit's local executor (processes on this
machine): what the tests run, and a way to try a cluster setup before using the cluster.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any, Sequence

import submitit

from .sweep import PlannedRun, Runner, SweepConfig, SweepSummary, execute, run_state, subprocess_runner

LAUNCHERS = {"slurm": "slurm", "local": "local"}  # --launcher -> submitit's cluster name
LOG_FOLDER = "submitit"


def job_groups(runs: Sequence[PlannedRun]) -> list[list[PlannedRun]]:
    """The runs that share a job, in plan order: a training run with the tests of its checkpoint,
    every other run alone."""
    groups: dict[PlannedRun, list[PlannedRun]] = {}
    for run in runs:
        groups.setdefault(run.trained_by or run, []).append(run)
    return list(groups.values())


class SweepJob(submitit.helpers.Checkpointable):
    """One array job: the group's runs through the sweep's scheduler (skip, resume, tests after their
    training run), going on after a failure so the group's other runs still run. Requeued as it is
    when SLURM preempts it or its time runs out (`submitit.helpers.Checkpointable`)."""

    def __init__(self, config: SweepConfig, runs: Sequence[PlannedRun], runner: Runner = subprocess_runner) -> None:
        self.config, self.runs, self.runner = config, list(runs), runner

    def __call__(self) -> SweepSummary:
        return execute(self.config, self.runs, self.runner, keep_going=True)


def add_launcher_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``--launcher`` (each run's resources; any other sbatch option with ``--slurm``)."""
    group = parser.add_argument_group("cluster (--launcher slurm|local: one job array through submitit)")
    group.add_argument("--launcher", choices=sorted(LAUNCHERS), default=None,
                       help="slurm: submit the runs as one SLURM job array; local: the same array as processes on "
                       "this machine (submitit's local executor). Default: run here, as --devices says")
    group.add_argument("--timeout_min", type=int, default=24 * 60, help="time limit of each job in minutes")
    group.add_argument("--gpus_per_node", type=int, default=1, help="GPUs per job (its runs use them all)")
    group.add_argument("--cpus_per_task", type=int, default=8, help="CPU cores per job (data loading workers)")
    group.add_argument("--mem_gb", type=float, default=None, help="memory per job; default: the partition's")
    group.add_argument("--partition", default=None, help="SLURM partition")
    group.add_argument("--array_parallelism", type=int, default=None,
                       help="at most this many jobs of the array at once; default: all")
    group.add_argument("--slurm", nargs="+", default=[], metavar="KEY=VALUE",
                       help="any other submitit SLURM parameter, e.g. account=abc qos=high constraint=a100")
    group.add_argument("--wait", action="store_true",
                       help="wait for the jobs, then print the summary and the report (always with --launcher local)")


def slurm_options(pairs: Sequence[str]) -> dict[str, str]:
    """``--slurm key=value ...`` as submitit's ``slurm_<key>`` parameters."""
    options = {}
    for pair in pairs:
        key, has_value, value = pair.partition("=")
        if not has_value or not key:
            raise ValueError(f"--slurm {pair}: expected KEY=VALUE, e.g. account=abc")
        options[f"slurm_{key}"] = value
    return options


def make_executor(args: argparse.Namespace, folder: Path, name: str) -> submitit.AutoExecutor:
    """submitit's executor for ``--launcher`` with each job's resources."""
    if args.launcher == "slurm" and shutil.which("sbatch") is None:
        raise ValueError("--launcher slurm: sbatch is not on this machine's PATH; submit from a SLURM login node "
                         "(or try the job array here with --launcher local)")
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=LAUNCHERS[args.launcher])
    try:
        executor.update_parameters(name=name, timeout_min=args.timeout_min, gpus_per_node=args.gpus_per_node,
                                   cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb,
                                   slurm_partition=args.partition, slurm_array_parallelism=args.array_parallelism,
                                   **slurm_options(args.slurm))
    except NameError as err:  # submitit's error for an unknown parameter
        raise ValueError(f"--slurm: {str(err).splitlines()[0]}") from None
    return executor


def submit(config: SweepConfig, runs: Sequence[PlannedRun], executor: Any,
           runner: Runner = subprocess_runner) -> list[tuple[Any, list[PlannedRun]]]:
    """One array job per group that still has a run to do; nothing when every run finished."""
    groups = [group for group in job_groups(runs) if any(run_state(run) != "done" for run in group)]
    if not groups:
        return []
    with executor.batch():
        jobs = [executor.submit(SweepJob(config, group, runner)) for group in groups]
    return list(zip(jobs, groups))


def collect(jobs: Sequence[tuple[Any, list[PlannedRun]]], runs: Sequence[PlannedRun]) -> SweepSummary:
    """Wait for the jobs and merge what each did; a job that died counts its unfinished runs as failed."""
    submitted = {id(run) for _, group in jobs for run in group}
    summary = SweepSummary()
    for run in runs:
        if id(run) not in submitted:
            summary.add("skipped", run)
    for job, group in jobs:
        try:
            outcomes = job.result().outcomes
        except submitit.core.utils.UncompletedJobError as err:
            print(f"job {job.job_id} died: {str(err).splitlines()[0]} (log: {job.paths.stderr})")
            outcomes = {"failed": [run.run_dir for run in group if not run.finished]}
        for outcome, folders in outcomes.items():
            summary.outcomes.setdefault(outcome, []).extend(folders)
    return summary


def run_on_cluster(config: SweepConfig, runs: Sequence[PlannedRun], args: argparse.Namespace,
                   runner: Runner | None = None) -> SweepSummary | None:
    """Submit the job array; with ``--wait`` (always for ``local``) the summary of what the jobs did, else None.
    ``runner`` (picklable) replaces each job's `subprocess_runner` (tests)."""
    executor = make_executor(args, config.out_dir / LOG_FOLDER, f"mmprompt-{config.results_label}")
    jobs = submit(config, runs, executor, runner or subprocess_runner)
    if not jobs:
        print("sweep: every run has finished; nothing to submit")
        return SweepSummary({"skipped": [run.run_dir for run in runs]})
    print(f"submitted {len(jobs)} jobs ({args.launcher}), logs in {config.out_dir / LOG_FOLDER}:")
    for job, group in jobs:
        print(f"  {job.job_id}: " + ", ".join(str(run.run_dir) for run in group))
    if args.launcher == "slurm" and not args.wait:
        print("run the same command again to resubmit what is not finished (finished runs are skipped, "
              "interrupted ones resume); `mmprompt report` gathers the results")
        return None
    return collect(jobs, runs)
