"""Run a whole protocol (methods × datasets × seeds [× shots]) and resume it after an interruption.

``mmprompt sweep --protocol base2new --methods maple bias --datasets eurosat dtd --seeds 1 2 3
--out_dir runs/base2new --devices 0 1 2 3``

The plan is deterministic: every run has a fixed folder ``<out_dir>/<name>/<version>/`` (name
``<Adapter>-<dataset>``, version ``seed<k>``, or ``<K>shots-seed<k>`` for the few-shot protocol), so
re-running the same command finds what is already there:

* ``results.json`` present: the run finished, it is skipped;
* ``checkpoints/last.ckpt`` present but no results: the run was interrupted, it resumes with
  ``--ckpt_path last``;
* otherwise the run starts from scratch.

Cross-dataset and domain generalisation train once per method and seed on the source (ImageNet) and
then ``mmprompt test`` that run's ``checkpoints/last.ckpt`` on each target. Zero-shot runs are
``mmprompt test`` runs without a checkpoint, planned for the first seed only (nothing in them depends
on the seed). Everything after ``--`` is appended to every command, so it overrides the configs.

``--preset claims`` runs the series of sweeps in ``configs/presets/claims.yaml`` (`mmprompt.tools.sweep_preset`).
``--dry_run`` prints the plan, ``--print_commands`` prints only the commands still to run (one per
line, for a cluster scheduler), otherwise the commands run one after another, or with ``--devices 0 1
2 3`` in parallel, one per GPU (``CUDA_VISIBLE_DEVICES``), or with ``--launcher slurm`` as one SLURM job
array through submitit (`mmprompt.tools.sweep_cluster`), and ``mmprompt report`` summarises ``out_dir`` at
the end.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..data.registry import BASE2NEW, PROTOCOLS, protocol_datasets, transfer_source
from ..methods import label_of, method_names
from ..results import RESULTS_FILE
from ..run.shipped import default_configs_dir
from . import report
from .report import SOURCE_DATASET
from ..data.registry import BASE2NEW, PROTOCOLS, protocol_datasets
from ..methods import label_of, method_names
from ..results import LAST_CKPT, RESULTS_FILE
from ..run.shipped import default_configs_dir

#: default datasets (targets, for transfer protocols) per protocol: the dataset specs' membership
PROTOCOL_DATASETS: dict[str, tuple[str, ...]] = {protocol: protocol_datasets(protocol) for protocol in PROTOCOLS}
PROTOCOL_SHOTS: dict[str, tuple[int, ...]] = {"fewshot": (1, 2, 4, 8, 16)}
DEFAULT_SHOTS = (16,)
DEFAULT_SEEDS = (1, 2, 3)
ZERO_SHOT = "zero_shot"

#: runs one command (argv list) on a device (None: as configured) and returns its exit status; tests inject a fake
Runner = Callable[[list[str], str | None], int]


@dataclass(frozen=True)
class SweepConfig:
    """What a sweep covers; ``protocol`` names ``configs/protocols/<protocol>.yaml``, ``label`` the results."""

    protocol: str
    methods: tuple[str, ...]
    datasets: tuple[str, ...]
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    shots: tuple[int, ...] = DEFAULT_SHOTS
    out_dir: Path = Path("runs")
    configs: Path = Path("configs")
    label: str = ""  # --protocol value written to results.json; defaults to protocol
    source: str = SOURCE_DATASET
    extra: tuple[str, ...] = ()
    executable: str = "mmprompt"

    @property
    def results_label(self) -> str:
        return self.label or self.protocol

    @property
    def transfer(self) -> bool:
        """Train on the source once, test on every target (cross-dataset, domain generalisation)."""
        return report.is_transfer(self.protocol)

    @property
    def shots_in_version(self) -> bool:
        """Few-shot folders need K in their version, or runs with different K would share a folder."""
        return self.protocol.startswith("fewshot") or len(self.shots) > 1


@dataclass(frozen=True)
class PlannedRun:
    """One ``mmprompt fit``/``test`` invocation and the folder it owns."""

    subcommand: str  # "fit" or "test"
    method: str  # config stem
    dataset: str  # config stem (the target for transfer tests)
    seed: int
    shots: int
    name: str
    version: str
    out_dir: Path
    trained_by: PlannedRun | None = None  # the fit whose last.ckpt this test evaluates

    @property
    def run_dir(self) -> Path:
        return self.out_dir / self.name / self.version

    @property
    def finished(self) -> bool:
        return (self.run_dir / RESULTS_FILE).is_file()

    @property
    def interrupted(self) -> bool:
        """A fit that saved a checkpoint but never wrote results: resume it instead of restarting."""
        return self.subcommand == "fit" and not self.finished and (self.run_dir / LAST_CKPT).is_file()


def is_config_path(method: str) -> bool:
    """``budgets/bias_1152`` names ``<configs>/budgets/bias_1152.yaml`` (a variant), ``bias`` a registered method."""
    return "/" in method


def method_label(method: str) -> str:
    """Adapter class name used in run names (``maple`` -> ``MaPLe``), as the CLI's default name; a
    method the registry doesn't know, or a variant's config path, keeps its config stem."""
    return Path(method).name if is_config_path(method) else label_of(method)


def make_run(config: SweepConfig, method: str, dataset: str, seed: int, shots: int,
             trained_by: PlannedRun | None = None) -> PlannedRun:
    """The deterministic folder of one run: ``<out_dir>/<Adapter>-<dataset>/[<K>shots-]seed<k>``."""
    version = f"{shots}shots-seed{seed}" if config.shots_in_version else f"seed{seed}"
    subcommand = "fit" if method != ZERO_SHOT and trained_by is None else "test"
    return PlannedRun(subcommand, method, dataset, seed, shots, f"{method_label(method)}-{dataset}", version,
                      config.out_dir, trained_by)


def method_seeds(config: SweepConfig, method: str) -> tuple[int, ...]:
    """Zero-shot CLIP has nothing seeded, so one seed suffices."""
    return config.seeds[:1] if method == ZERO_SHOT else config.seeds


def plan_sweep(config: SweepConfig) -> list[PlannedRun]:
    """All runs in execution order (a transfer fit always precedes the tests of its checkpoint)."""
    runs: list[PlannedRun] = []
    for method in config.methods:
        for shots in config.shots:
            for seed in method_seeds(config, method):
                if config.transfer:
                    train = make_run(config, method, config.source, seed, shots)
                    trained_by = None if method == ZERO_SHOT else train
                    runs.append(train)
                    runs += [make_run(config, method, d, seed, shots, trained_by) for d in config.datasets]
                else:
                    runs += [make_run(config, method, d, seed, shots) for d in config.datasets]
    return runs


def config_files(config: SweepConfig, run: PlannedRun) -> list[Path]:
    method = run.method if is_config_path(run.method) else f"methods/{run.method}"
    return [config.configs / "protocols" / f"{config.protocol}.yaml",
            config.configs / f"{method}.yaml",
            config.configs / "datasets" / f"{run.dataset}.yaml"]


def build_command(config: SweepConfig, run: PlannedRun) -> list[str]:
    """The one place that spells a run as ``mmprompt fit|test`` arguments (extra overrides last, so they win)."""
    command = [config.executable, run.subcommand]
    for path in config_files(config, run):
        command += ["--config", str(path)]
    command += ["--seed_everything", str(run.seed), "--data.seed", str(run.seed), "--data.shots", str(run.shots),
                "--name", run.name, "--version", run.version, "--out_dir", str(run.out_dir),
                "--protocol", config.results_label]
    if run.trained_by is not None:
        command += ["--ckpt_path", str(run.trained_by.run_dir / LAST_CKPT)]
    elif run.interrupted:
        command += ["--ckpt_path", "last"]
    return command + list(config.extra)


def missing_configs(config: SweepConfig, runs: Sequence[PlannedRun]) -> list[Path]:
    needed = dict.fromkeys(path for run in runs for path in config_files(config, run))
    return [path for path in needed if not path.is_file()]


def run_state(run: PlannedRun) -> str:
    """``done``, ``resume``, ``waiting`` (its training checkpoint is not finished yet) or ``new``."""
    if run.finished:
        return "done"
    if run.interrupted:
        return "resume"
    if run.trained_by is not None and not run.trained_by.finished:
        return "waiting"
    return "new"


def dry_run_lines(config: SweepConfig, runs: Sequence[PlannedRun]) -> list[str]:
    """The plan as it would execute: finished runs as comments, every other run's command in order."""
    return [f"# skip (finished): {run.run_dir}" if run_state(run) == "done" else shlex.join(build_command(config, run))
            for run in runs]


def pending_commands(config: SweepConfig, runs: Sequence[PlannedRun]) -> tuple[list[str], int]:
    """Commands that can start now (new or resumed) and how many tests wait for a training run."""
    states = [run_state(run) for run in runs]
    lines = [shlex.join(build_command(config, run)) for run, s in zip(runs, states) if s in ("new", "resume")]
    return lines, states.count("waiting")


@dataclass
class SweepSummary:
    """What happened to each planned run (outcome -> run folders)."""

    outcomes: dict[str, list[Path]] = field(default_factory=dict)

    def add(self, outcome: str, run: PlannedRun) -> None:
        self.outcomes.setdefault(outcome, []).append(run.run_dir)

    @property
    def ok(self) -> bool:
        return not self.outcomes.get("failed") and not self.outcomes.get("blocked")

    def text(self) -> str:
        counts = Counter({k: len(v) for k, v in self.outcomes.items()})
        lines = ["sweep: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))]
        lines += [f"  {k}: {p}" for k in ("failed", "blocked") for p in self.outcomes.get(k, [])]
        return "\n".join(lines)


class Scheduler:
    """Runs planned runs on a set of device slots, in plan order: a run starts when a slot is free and,
    for a test of a checkpoint, once its training run has finished. One slot is the sequential sweep."""

    def __init__(self, config: SweepConfig, runs: Sequence[PlannedRun], runner: Runner,
                 devices: Sequence[str | None], keep_going: bool, log: Callable[[str], None]) -> None:
        self.config, self.runner, self.keep_going, self.log = config, runner, keep_going, log
        self.queue: list[tuple[int, PlannedRun]] = list(enumerate(runs, start=1))
        self.total, self.free = len(runs), list(devices)
        self.running: dict[Future, tuple[PlannedRun, str, str | None]] = {}
        self.summary, self.stopped = SweepSummary(), False

    def pending(self, run: PlannedRun) -> bool:
        return any(queued is run for _, queued in self.queue) or any(r is run for r, _, _ in self.running.values())

    def start_ready(self, pool: ThreadPoolExecutor) -> None:
        """Start (or settle) queued runs in order while slots are free; keep tests whose training is pending."""
        if self.stopped:
            self.queue.clear()
        for item in list(self.queue):
            index, run = item
            state = run_state(run)
            if (state == "waiting" and self.pending(run.trained_by)) or (state in ("new", "resume") and not self.free):
                continue
            self.queue.remove(item)
            if state == "done":
                self.summary.add("skipped", run)
            elif state == "waiting":
                self.log(f"blocked (no finished training run {run.trained_by.run_dir}): {run.run_dir}")
                self.summary.add("blocked", run)
            else:
                device = self.free.pop(0)
                command = build_command(self.config, run)
                pinned = "" if device is None else f"CUDA_VISIBLE_DEVICES={device} "
                self.log(f"[{index}/{self.total}] {pinned}{shlex.join(command)}")
                self.running[pool.submit(self.runner, command, device)] = (run, state, device)

    def finish(self, future: Future) -> None:
        """Count a finished command; a zero exit without results.json is a failure too."""
        run, state, device = self.running.pop(future)
        self.free.append(device)
        status = future.result()
        if status == 0 and run.finished:
            self.summary.add("resumed" if state == "resume" else "ran", run)
            return
        reason = f"exit status {status}" if status else f"exited 0 without {RESULTS_FILE}"
        self.log(f"failed ({reason}): {run.run_dir}")
        self.summary.add("failed", run)
        self.stopped = self.stopped or not self.keep_going

    def run(self) -> SweepSummary:
        with ThreadPoolExecutor(max_workers=len(self.free)) as pool:
            self.start_ready(pool)
            while self.running:
                done, _ = wait(self.running, return_when=FIRST_COMPLETED)
                for future in done:
                    self.finish(future)
                self.start_ready(pool)
        return self.summary


def execute(config: SweepConfig, runs: Sequence[PlannedRun], runner: Runner, keep_going: bool = False,
            log: Callable[[str], None] = print, devices: Sequence[str] = ()) -> SweepSummary:
    """Run every unfinished run, one at a time, or one per device in parallel (``devices``).

    Stops starting runs at the first failure unless ``keep_going``; tests of a failed training run are ``blocked``.
    """
    slots: Sequence[str | None] = list(devices) or [None]
    return Scheduler(config, runs, runner, slots, keep_going, log).run()


def subprocess_runner(command: list[str], device: str | None = None) -> int:
    """Run a command with the terminal attached (pinned to one GPU with ``CUDA_VISIBLE_DEVICES`` when
    ``device`` is given); ``mmprompt`` resolves to this environment's script."""
    local = Path(sys.executable).with_name("mmprompt")
    argv = [str(local), *command[1:]] if command[0] == "mmprompt" and local.is_file() else command
    env = None if device is None else {**os.environ, "CUDA_VISIBLE_DEVICES": device}
    return subprocess.run(argv, check=False, env=env).returncode


def split_extra(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Sweep options before ``--``, pass-through CLI overrides after it."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    at = argv.index("--")
    return argv[:at], argv[at + 1:]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmprompt sweep", usage="mmprompt sweep --protocol P --methods M [M ...] [options] [-- CLI overrides]\n"
              "       mmprompt sweep --preset NAME [--sweeps L ...] [--datasets D ...] [--seeds S ...] [-- overrides]",
        description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocol", required=True, help="configs/protocols/<protocol>.yaml (base2new, fewshot, "
                        "cross_dataset, domain_generalization or your own)")
    parser.add_argument("--methods", nargs="+", required=True,
                        help=f"configs/methods/<method>.yaml stems: {', '.join(method_names())} or your own; "
                        "a path such as budgets/bias_1152 names configs/budgets/bias_1152.yaml")
    parser.add_argument("--datasets", nargs="+", help="dataset config stems (targets for transfer protocols); "
                        "default: the protocol's standard list")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS))
    parser.add_argument("--shots", nargs="+", type=int, help="K values; default 1 2 4 8 16 for fewshot, else 16")
    parser.add_argument("--out_dir", type=Path, help="default runs/<label>")
    parser.add_argument("--configs", type=Path, default=default_configs_dir(),
                        help="folder holding protocols/ methods/ datasets/ (default: ./configs, else the shipped ones)")
    parser.add_argument("--label", default="", help="protocol label in results.json (default: --protocol)")
    parser.add_argument("--source", default=SOURCE_DATASET, help="training dataset of transfer protocols")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry_run", action="store_true", help="print the plan without running anything")
    mode.add_argument("--print_commands", action="store_true", help="print only the commands that can start now")
    parser.add_argument("--devices", nargs="+", default=[], metavar="GPU",
                        help="run independent runs in parallel, one per GPU (each pinned with CUDA_VISIBLE_DEVICES), "
                        "e.g. --devices 0 1 2 3; default: one run at a time on what the configs choose")
    parser.add_argument("--keep_going", action="store_true", help="continue after a failed run (default: stop)")
    parser.add_argument("--no_report", action="store_true", help="skip `mmprompt report` at the end")
    from .sweep_cluster import add_launcher_arguments  # submitit, no torch

    add_launcher_arguments(parser)
    return parser


def parse_config(argv: Sequence[str]) -> tuple[SweepConfig, argparse.Namespace]:
    options, extra = split_extra(argv)
    args = build_parser().parse_args(options)
    label = args.label or args.protocol
    config = SweepConfig(
        protocol=args.protocol, methods=tuple(args.methods),
        datasets=tuple(args.datasets or PROTOCOL_DATASETS.get(args.protocol, PROTOCOL_DATASETS[BASE2NEW])),
        seeds=tuple(args.seeds), shots=tuple(args.shots or PROTOCOL_SHOTS.get(args.protocol, DEFAULT_SHOTS)),
        out_dir=args.out_dir or Path("runs") / label, configs=args.configs, label=args.label, source=args.source,
        extra=tuple(extra))
    return config, args


def run_sweep(config: SweepConfig, runs: Sequence[PlannedRun], args: argparse.Namespace,
              runner: Runner | None) -> SweepSummary | None:
    """Here (one run at a time, or one per ``--devices`` GPU), or as a job array (``--launcher``)."""
    if args.launcher is None:
        return execute(config, runs, runner or subprocess_runner, keep_going=args.keep_going, devices=args.devices)
    if args.devices:
        raise ValueError("--devices and --launcher exclude each other: a cluster job uses the GPUs it is given "
                         "(--gpus_per_node)")
    from .sweep_cluster import run_on_cluster

    return run_on_cluster(config, runs, args, runner)


def main(argv: list[str] | None = None, runner: Runner | None = None) -> int:
    """``mmprompt sweep``: 0 when every run finished, 1 on failed/blocked runs, 2 on bad inputs, 130 on Ctrl-C."""
    argv = sys.argv[1:] if argv is None else argv
    if any(arg == "--preset" or arg.startswith("--preset=") for arg in split_extra(argv)[0]):
        from . import sweep_preset  # several sweeps and their report (configs/presets/*.yaml)

        return sweep_preset.main(argv, runner)
    config, args = parse_config(argv)
    runs = plan_sweep(config)
    missing = missing_configs(config, runs)
    if missing:
        print("mmprompt sweep: missing config files:\n  " + "\n  ".join(map(str, missing)), file=sys.stderr)
        return 2
    if args.dry_run:
        print("\n".join(dry_run_lines(config, runs)))
        return 0
    if args.print_commands:
        lines, waiting = pending_commands(config, runs)
        print("\n".join(lines))
        if waiting:
            print(f"# {waiting} test runs wait for their training runs; print again once those finish",
                  file=sys.stderr)
        return 0
    try:
        summary = run_sweep(config, runs, args, runner)
    except KeyboardInterrupt:
        print("mmprompt sweep: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    if summary is None:
        return 0  # submitted to SLURM without --wait
    print(summary.text())
    status = 0 if summary.ok else 1
    if not args.no_report and any(run.finished for run in runs):
        status = max(status, report.main([str(config.out_dir)]))
    return status


if __name__ == "__main__":
    sys.exit(main())
