"""The claims preset (configs/presets/claims.yaml) and its matched budgets (configs/budgets/): the budgets
are what they say, the preset plans what the docs ran, a bad preset is refused by name, and a cut-down
version runs end to end, resumes, and writes the claims table and figures."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mmprompt.tools import sweep
from mmprompt.tools.methods_table import count_parameters, variant_rows
from mmprompt.tools.sweep_preset import PresetError, cut_down, preset_path, read_preset

from run_helpers import mmprompt

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESET = CONFIGS / "presets" / "claims.yaml"


def test_every_budget_variant_has_exactly_its_budget_on_the_tiny_clip():
    rows = variant_rows(CONFIGS / "budgets")
    counts = count_parameters(rows, "mmprompt-tiny")
    assert len(counts) == 15
    for name, count in counts.items():
        assert count == int(re.fullmatch(r".+_(\d+)", name).group(1)), name
    budgets = {int(name.rsplit("_", 1)[1]) for name in counts}
    assert budgets == {384, 1152, 3072, 4224, 12672, 38016}
    for family in ("bias", "ivlp", "vpt_deep"):  # three equal budgets each, and two more pairs above them
        assert {n for n in counts if n.rsplit("_", 1)[0] == family} == {f"{family}_{b}" for b in (384, 1152, 3072)}
    for family in ("maple", "coupled_bias"):
        assert {n for n in counts if n.rsplit("_", 1)[0] == family} == {f"{family}_{b}" for b in (4224, 12672, 38016)}


def test_the_preset_plans_the_documented_run(capsys):
    preset = read_preset(preset_path("claims", CONFIGS))
    assert preset.seeds == (1, 2, 3, 4, 5) and preset.report == ("--figures", "--claims")
    datasets = {d for s in preset.sweeps for d in s.datasets}
    assert datasets == {"world_shapes", "world_textures", "world_fine", "world_limited", "world_sketch", "world_clutter"}
    assert sweep.main(["--preset", "claims", "--configs", str(CONFIGS), "--dry_run"]) == 0
    commands = capsys.readouterr().out.splitlines()
    # 6 zero-shot runs (seed 1 only), 2 + 1 methods on 6 datasets and 12 more variants on world_limited, × 5 seeds
    assert len(commands) == 6 + (6 * 3 + 12) * 5 == 156
    assert all("--protocol budget" in line and "tiny.yaml" in line for line in commands)
    assert sum("InterventionTable" in line for line in commands) == 6 * 5  # every MaPLe run writes its routes


def test_cut_down_keeps_the_chosen_labels_and_datasets():
    preset = read_preset(PRESET)
    chosen = cut_down(preset, ["budget38016"], ["world_limited"])
    assert {s.label for s in chosen} == {"budget38016"} and all(s.datasets == ("world_limited",) for s in chosen)
    assert {m for s in chosen for m in s.methods} == {"budgets/maple_38016", "budgets/coupled_bias_38016"}
    with pytest.raises(PresetError, match=r"--sweeps: unknown labels \['budget7'\]"):
        cut_down(preset, ["budget7"], [])


@pytest.mark.parametrize("text,message", [
    ("protocol: base2new\n", "expected a mapping with a non-empty 'sweeps' list"),
    ("seeds: [1]\nsweeps: [{label: a, methods: [bias], datasets: []}]\n", r"sweeps\[0\]: 'datasets' should be a non-empty list"),
    ("sweeps: [{label: a, methods: [bias], datasets: [dtd]}]\n", r"'seeds' should be a non-empty list"),
])
def test_a_bad_preset_is_refused_naming_the_file_and_field(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(PresetError, match=message):
        read_preset(path)


def test_an_unknown_preset_lists_the_shipped_ones(capsys):
    assert sweep.main(["--preset", "claimz", "--configs", str(CONFIGS)]) == 2
    assert "--preset claimz: no such preset file" in capsys.readouterr().err
    with pytest.raises(PresetError, match="shipped presets: claims"):
        preset_path("claimz", CONFIGS)


QUICK = ["--", "--trainer.max_epochs", "1", "--data.shots", "2", "--data.eval_batch_size", "50",
         "--trainer.limit_test_batches", "1"]


@pytest.mark.slow
def test_a_cut_down_preset_runs_end_to_end_and_resumes(tmp_path):
    """MaPLe and coupled bias tuning at 38,016 parameters on world_limited, 2 seeds, 1 epoch: 4 runs, then
    the report with intervals, claims and figures; the same command again runs nothing."""
    args = ["sweep", "--preset", "claims", "--configs", str(CONFIGS), "--sweeps", "budget38016",
            "--datasets", "world_limited", "--seeds", "1", "2", "--out_dir", "runs", "--devices", "0", "1", *QUICK]
    first = mmprompt(*args, cwd=tmp_path, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "sweep: 2 ran" in first.stdout
    report = tmp_path / "runs" / "report"
    claims = (report / "claims.md").read_text()
    assert "route 2 carries the gain: MaPLe bias_only − attention_only (HM)" in claims
    assert "coupled bias tuning − MaPLe at 38,016 parameters (HM)" in claims
    assert {p.name for p in report.glob("*.png")} == {"accuracy_per_dataset.png", "fg_ratio_per_layer.png"}
    assert "budget38016: paired differences" in (report / "report.md").read_text()
    again = mmprompt(*args, cwd=tmp_path, timeout=300)
    assert again.returncode == 0 and "sweep: 2 skipped" in again.stdout and "ran" not in again.stdout.split("report")[0]
