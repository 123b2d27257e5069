"""``mmprompt sweep --preset claims``: several sweeps and the report that reads them, as one resumable command.

A preset is a YAML file (``configs/presets/<name>.yaml``, or any path) holding what every sweep shares
(``protocol``, ``out_dir``, ``seeds``, ``overrides``) and a list of ``sweeps``, each with its own
``label`` (the protocol label in results.json, so methods of one adapter class at different budgets
get separate tables), ``methods``, ``datasets`` and ``overrides``; ``report`` holds the arguments
``mmprompt report`` gets after the output folder. In override strings ``{configs}`` is the configs
folder. The sweeps run one after another into the same ``out_dir``; finished runs are skipped, so the
same command resumes. The sweeps run in the preset's order, each with all its seeds, so a preset
ordered by priority and stopped early leaves complete cells (every seed) for the report to use.

``--sweeps``, ``--datasets`` and ``--seeds`` cut a preset down (a quick check, or the test of the
preset); everything after ``--`` is appended to every run's command, after the preset's overrides.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from ..run.shipped import default_configs_dir
from . import report
from .sweep import (
    Runner, SweepConfig, SweepSummary, execute, missing_configs, plan_sweep, dry_run_lines, split_extra,
    subprocess_runner,
)


class PresetError(ValueError):
    """A preset file that can't be run; the message names the file and the field."""


@dataclass(frozen=True)
class PresetSweep:
    """One sweep of a preset."""

    label: str
    methods: tuple[str, ...]
    datasets: tuple[str, ...]
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Preset:
    """A named series of sweeps sharing protocol, output folder, seeds and overrides."""

    path: Path
    protocol: str
    out_dir: Path
    seeds: tuple[int, ...]
    overrides: tuple[str, ...]
    sweeps: tuple[PresetSweep, ...]
    report: tuple[str, ...] = ()


def preset_path(name: str, configs: Path) -> Path:
    """``claims`` -> ``<configs>/presets/claims.yaml``; a path to a YAML file is itself."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else configs / "presets" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (configs / "presets").glob("*.yaml"))
        raise PresetError(f"--preset {name}: no such preset file {path} "
                          f"(shipped presets: {', '.join(known) or 'none'})")
    return path


def _strings(data: dict[str, Any], name: str, where: str, required: bool = True) -> tuple[str, ...]:
    value = data.get(name)
    if value is None and not required:
        return ()
    if not isinstance(value, list) or not value and required or not all(isinstance(v, (str, int)) for v in value):
        raise PresetError(f"{where}: {name!r} should be a non-empty list of strings, got {value!r}")
    return tuple(str(v) for v in value)


def read_preset(path: Path) -> Preset:
    """Parse and check a preset file; every problem names the file and the field."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("sweeps"), list) or not data["sweeps"]:
        raise PresetError(f"{path}: expected a mapping with a non-empty 'sweeps' list")
    sweeps = []
    for index, item in enumerate(data["sweeps"]):
        where = f"{path}: sweeps[{index}]"
        if not isinstance(item, dict) or not isinstance(item.get("label"), str):
            raise PresetError(f"{where}: expected a mapping with a 'label' string")
        sweeps.append(PresetSweep(item["label"], _strings(item, "methods", where), _strings(item, "datasets", where),
                                  _strings(item, "overrides", where, required=False)))
    seeds = tuple(int(s) for s in _strings(data, "seeds", str(path)))
    return Preset(path, str(data.get("protocol", "base2new")), Path(str(data.get("out_dir", f"runs/{path.stem}"))),
                  seeds, _strings(data, "overrides", str(path), required=False), tuple(sweeps),
                  _strings(data, "report", str(path), required=False))


def cut_down(preset: Preset, labels: Sequence[str], datasets: Sequence[str]) -> tuple[PresetSweep, ...]:
    """The preset's sweeps restricted to ``labels`` and ``datasets`` (empty: all); unknown names are errors."""
    known = {s.label for s in preset.sweeps}
    if set(labels) - known:
        raise PresetError(f"--sweeps: unknown labels {sorted(set(labels) - known)}; {preset.path} has {sorted(known)}")
    chosen = [s for s in preset.sweeps if not labels or s.label in labels]
    if datasets:
        chosen = [PresetSweep(s.label, s.methods, tuple(d for d in s.datasets if d in datasets), s.overrides)
                  for s in chosen]
    return tuple(s for s in chosen if s.datasets)


def sweep_configs(preset: Preset, sweeps: Sequence[PresetSweep], configs: Path, out_dir: Path,
                  seeds: Sequence[int], extra: Sequence[str]) -> list[SweepConfig]:
    """One `SweepConfig` per preset sweep: shared overrides, then the sweep's, then the command line's."""
    def expand(items: Sequence[str]) -> tuple[str, ...]:
        return tuple(item.replace("{configs}", str(configs)) for item in items)

    return [SweepConfig(protocol=preset.protocol, methods=s.methods, datasets=s.datasets, seeds=tuple(seeds),
                        out_dir=out_dir, configs=configs, label=s.label,
                        extra=expand(preset.overrides) + expand(s.overrides) + tuple(extra))
            for s in sweeps]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmprompt sweep --preset", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", required=True, help="configs/presets/<name>.yaml stem (e.g. claims) or a YAML path")
    parser.add_argument("--configs", type=Path, default=default_configs_dir(),
                        help="folder holding presets/ protocols/ methods/ datasets/ budgets/")
    parser.add_argument("--out_dir", type=Path, help="default: the preset's out_dir")
    parser.add_argument("--seeds", nargs="+", type=int, help="default: the preset's seeds")
    parser.add_argument("--sweeps", nargs="+", default=[], metavar="LABEL", help="run only these sweeps of the preset")
    parser.add_argument("--datasets", nargs="+", default=[], help="run only these datasets of each sweep")
    parser.add_argument("--devices", nargs="+", default=[], help="run this many runs at a time (see mmprompt sweep)")
    parser.add_argument("--dry_run", action="store_true", help="print the plan without running anything")
    parser.add_argument("--keep_going", action="store_true", help="continue after a failed run")
    parser.add_argument("--no_report", action="store_true", help="skip `mmprompt report` at the end")
    return parser


def main(argv: Sequence[str], runner: Runner | None = None) -> int:
    """Run the preset's sweeps in order, then ``mmprompt report <out_dir> <preset report args>``."""
    options, extra = split_extra(argv)
    args = build_parser().parse_args(options)
    try:
        preset = read_preset(preset_path(args.preset, args.configs))
        sweeps = cut_down(preset, args.sweeps, args.datasets)
    except PresetError as err:
        print(f"mmprompt sweep: {err}", file=sys.stderr)
        return 2
    out_dir = args.out_dir or preset.out_dir
    configs = sweep_configs(preset, sweeps, args.configs, out_dir, args.seeds or preset.seeds, extra)
    plans = [(config, plan_sweep(config)) for config in configs]
    missing = [path for config, runs in plans for path in missing_configs(config, runs)]
    if missing:
        listed = "\n  ".join(map(str, dict.fromkeys(missing)))
        print(f"mmprompt sweep: missing config files:\n  {listed}", file=sys.stderr)
        return 2
    if args.dry_run:
        print("\n".join(line for config, runs in plans for line in dry_run_lines(config, runs)))
        return 0
    status = 0
    for index, (config, runs) in enumerate(plans, start=1):
        print(f"mmprompt sweep --preset {args.preset}: sweep {index}/{len(plans)}, {config.label}, "
              f"{' '.join(config.datasets)} ({len(runs)} runs)", flush=True)
        summary: SweepSummary = execute(config, runs, runner or subprocess_runner, keep_going=args.keep_going,
                                        devices=args.devices)
        print(summary.text(), flush=True)
        if not summary.ok:
            status = 1
            if not args.keep_going:
                return status
    if not args.no_report:
        status = max(status, report.main([str(out_dir), *preset.report]))
    return status
