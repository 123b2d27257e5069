"""Intervals, paired differences, the claims table and the figures of `mmprompt report`, on hand-made
numbers: every expected value is worked out here."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from mmprompt.tools import report
from mmprompt.tools.report_stats import (
    bootstrap_accuracy, bootstrap_hm, marked, paired_difference, t_interval, t_quantile, verdict, welch_difference,
)


def hm(base: float, new: float) -> float:
    return 2 * base * new / (base + new)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("df,expected", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423),
                                         (1e6, 1.9600)])
def test_t_quantiles_match_the_table(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-4)


def test_t_interval_of_one_to_five():
    # mean 3, s = sqrt(2.5), half width t(0.975, 4) · s / sqrt(5) = 2.7764 · 0.70711 = 1.9633
    interval = t_interval([1, 2, 3, 4, 5])
    assert (interval.mean, interval.n) == (3, 5)
    assert interval.low == pytest.approx(3 - 1.96324, abs=1e-4) and interval.high == pytest.approx(4.96324, abs=1e-4)
    assert not interval.inside_noise and interval.text() == "3.0 [1.0, 5.0]"
    single = t_interval([7.0])
    assert single.mean == 7.0 and not single.defined and single.inside_noise and single.text() == "7.0"


def test_paired_difference_by_hand():
    # per-seed differences 2, 1, 5: mean 8/3, s = sqrt(13/3) = 2.0817, half width 4.3027 · 2.0817 / sqrt(3) = 5.1715
    difference = paired_difference({1: 50, 2: 52, 3: 55}, {1: 48, 2: 51, 3: 50})
    assert difference.mean == pytest.approx(8 / 3)
    assert difference.low == pytest.approx(8 / 3 - 5.1715, abs=1e-3)
    assert difference.high == pytest.approx(8 / 3 + 5.1715, abs=1e-3)
    assert difference.inside_noise and verdict(difference) == "inside the noise" and marked(difference).startswith("≈ ")
    # only common seeds pair; a plain number is a seed-independent side (zero-shot)
    assert paired_difference({1: 3, 2: 5, 9: 100}, {1: 1, 2: 2}).mean == pytest.approx(2.5)
    against_constant = paired_difference({1: 50, 2: 52, 3: 54}, 40.0)
    assert against_constant.mean == pytest.approx(12.0) and verdict(against_constant) == "holds"
    assert verdict(paired_difference(40.0, {1: 50, 2: 52, 3: 54})) == "does not hold"
    with pytest.raises(ValueError, match="no common seeds"):
        paired_difference({1: 1.0}, {2: 1.0})


def test_paired_is_narrower_than_comparing_the_two_intervals():
    """A shared few-shot draw moves both methods: pairing removes it."""
    a = {1: 40.0, 2: 50.0, 3: 60.0, 4: 45.0, 5: 55.0}
    b = {seed: value - 2.0 + 0.1 * seed for seed, value in a.items()}
    difference = paired_difference(a, b)
    assert verdict(difference) == "holds"
    assert difference.half_width < 0.1 * t_interval(list(a.values())).half_width


def test_bootstrap_over_test_images_is_reproducible_and_about_binomial():
    first, again = bootstrap_accuracy(50.0, 180, seed=3), bootstrap_accuracy(50.0, 180, seed=3)
    assert first == again and first.kind == "bootstrap over test images" and first.n == 180
    assert first.low < 50.0 < first.high
    # the binomial half width 1.96 · sqrt(0.25 / 180) = 7.30 points
    assert first.half_width == pytest.approx(7.30, abs=0.8)
    with pytest.raises(ValueError, match="n_images >= 1"):
        bootstrap_accuracy(50.0, 0)


def test_welch_difference_by_hand():
    # a = 1,2,3 (var 1), b = 4,5,7 (var 7/3); se² = 1/3 + 7/9 = 10/9; df = (10/9)² / ((1/3)²/2 + (7/9)²/2) = 3.4483
    difference = welch_difference([1, 2, 3], [4, 5, 7])
    half = t_quantile(0.975, (10 / 9) ** 2 / ((1 / 3) ** 2 / 2 + (7 / 9) ** 2 / 2)) * math.sqrt(10 / 9)
    assert difference.mean == pytest.approx(-10 / 3)
    assert difference.high == pytest.approx(-10 / 3 + half) and difference.low == pytest.approx(-10 / 3 - half)


# -- mmprompt report end to end ------------------------------------------------------------------------

def write_run(root: Path, label: str, variant: str, method: str, dataset: str, seed: int, base: float, new: float,
              folder_extra: dict[str, str] | None = None) -> Path:
    folder = root / f"{variant}-{dataset}" / f"seed{seed}"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({
        "name": f"{variant}-{dataset}", "version": f"seed{seed}", "protocol": label, "method": method,
        "dataset": dataset, "seed": seed, "shots": 16, "model_name": "mmprompt-tiny", "pretrained": "synthetic-world",
        "metrics": {"test/base/acc": base, "test/new/acc": new, "test/hm": hm(base, new)}}))
    for name, text in (folder_extra or {}).items():
        (folder / name).write_text(text)
    return folder


def test_report_writes_intervals_and_paired_differences(tmp_path):
    runs = tmp_path / "runs"
    for seed, (b1, b2) in zip((1, 2, 3), [(50, 48), (52, 51), (55, 50)]):
        write_run(runs, "budget1152", "bias_1152", "BiasTuning", "world_limited", seed, b1, 40)
        write_run(runs, "budget1152", "vpt_deep_1152", "VPTDeep", "world_limited", seed, b2, 40)
    write_run(runs, "budget1152", "ZeroShot", "ZeroShot", "world_limited", 1, 45, 30)
    out = tmp_path / "out"
    assert report.main([str(runs), "--out_dir", str(out), "--quiet"]) == 0
    intervals = {r["method"]: r for r in read_csv(out / "budget1152_intervals.csv")}
    assert float(intervals["BiasTuning"]["base_mean"]) == pytest.approx(157 / 3, abs=1e-4)
    assert intervals["BiasTuning"]["interval"] == "t over seeds"
    assert intervals["ZeroShot"]["base_low"] == ""  # no config.yaml next to it: no image count, no bootstrap
    paired = {(r["a"], r["b"]): r for r in read_csv(out / "budget1152_paired.csv")}
    by_hand = paired[("BiasTuning", "VPTDeep")]  # A is later in the registry's order: bias tuning − VPT-deep
    assert float(by_hand["base_diff"]) == pytest.approx(8 / 3, abs=1e-4)  # the CSV keeps 4 decimals
    assert float(by_hand["base_low"]) == pytest.approx(8 / 3 - 5.1715, abs=1e-3)
    assert by_hand["base_inside_noise"] == "True" and float(by_hand["novel_diff"]) == 0 and by_hand["seeds"] == "1,2,3"
    against_zero_shot = paired[("BiasTuning", "ZeroShot")]  # one zero-shot run pairs with every seed
    assert float(against_zero_shot["base_diff"]) == pytest.approx(157 / 3 - 45, abs=1e-4)
    markdown = (out / "report.md").read_text()
    assert "paired differences" in markdown and "≈" in markdown
    write_run(runs, "budget1152", "ivlp_1152", "IVLP", "world_limited", 2, 50, 40)  # one seed in common with bias
    assert report.main([str(runs), "--out_dir", str(out), "--quiet"]) == 0
    paired = {(r["a"], r["b"]): r for r in read_csv(out / "budget1152_paired.csv")}
    assert paired[("BiasTuning", "IVLP")]["seeds"] == "2" and paired[("BiasTuning", "IVLP")]["base_low"] == ""


def test_a_single_run_gets_a_bootstrap_over_its_test_images(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data" / "world-limited"
    data.mkdir(parents=True)
    test = [[f"x{i}.png", i % 12, "c"] for i in range(360)]  # 30 images of each of 12 classes: 180 base, 180 novel
    (data / "split_zhou_WorldLimited.json").write_text(json.dumps({"train": [], "val": [], "test": test}))
    config = "data:\n  dataset: world-limited\n  root: data\n"
    write_run(tmp_path / "runs", "b", "bias_1152", "BiasTuning", "world_limited", 1, 50.0, 40.0, {"config.yaml": config})
    assert report.main(["runs", "--out_dir", "out", "--quiet"]) == 0
    (record,) = read_csv(tmp_path / "out" / "b_intervals.csv")
    expected = bootstrap_accuracy(50.0, 180)
    assert record["interval"] == "bootstrap over test images"
    assert float(record["base_low"]) == pytest.approx(expected.low, abs=1e-4)
    assert float(record["base_high"]) == pytest.approx(expected.high, abs=1e-4)
    hm_interval = bootstrap_hm(50.0, 180, 40.0, 180)
    assert float(record["HM_mean"]) == pytest.approx(hm(50, 40), abs=1e-4) and hm_interval.low < hm(50, 40) < hm_interval.high
    assert float(record["HM_low"]) == pytest.approx(hm_interval.low, abs=1e-4)


def test_a_bad_level_is_refused_naming_the_option(tmp_path, capsys):
    write_run(tmp_path / "runs", "b", "bias_1152", "BiasTuning", "world_limited", 1, 50.0, 40.0)
    assert report.main([str(tmp_path / "runs"), "--level", "95", "--quiet"]) == 2
    assert "--level 95.0: expected a confidence level in [0.5, 1), e.g. 0.95" in capsys.readouterr().err


def interventions_csv(full: float, no_prompts: float, attention_only: float, bias_only: float, mean_bias: float) -> str:
    rows = ["mode,branch,layers,test/base/acc,test/new/acc,test/hm"]
    for mode, value in [("full", full), ("no_prompts", no_prompts), ("attention_only", attention_only),
                        ("bias_only", bias_only), ("mean_bias", mean_bias)]:
        rows.append(f"{mode},both,all,{value},{value},{value}")
    return "\n".join(rows) + "\n"


def stats_json(fg_ratio: float) -> str:
    return json.dumps({"vision": {"fg_ratio": [[fg_ratio, fg_ratio]] * 12}, "text": {}, "meta": {}})


def test_claims_table_and_figures_from_run_folders(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "budget1152", "ZeroShot", "ZeroShot", "world_limited", 1, 40, 40, {"attention_stats.json": stats_json(3.0)})
    write_run(runs, "budget1152", "ZeroShot", "ZeroShot", "world_shapes", 1, 40, 40, {"attention_stats.json": stats_json(3.0)})
    for seed in (1, 2, 3):
        for dataset, margin in (("world_limited", 6 + seed), ("world_shapes", seed - 2)):
            write_run(runs, "budget1152", "bias_1152", "BiasTuning", dataset, seed, 50 + margin, 50 + margin,
                      {"attention_stats.json": stats_json(2.0)})
            write_run(runs, "budget1152", "vpt_deep_1152", "VPTDeep", dataset, seed, 50, 50,
                      {"attention_stats.json": stats_json(2.5 + 0.01 * seed)})
            write_run(runs, "budget38016", "maple_38016", "MaPLe", dataset, seed, 50, 50, {
                "attention_stats.json": stats_json(3.5 + 0.1 * seed),
                "interventions.csv": interventions_csv(50, 40, 41 + seed, 49 + seed, 49 + seed)})
        # another MaPLe budget without interventions.csv must not hide the one with it
        write_run(runs, "budget4224", "maple_4224", "MaPLe", "world_limited", seed, 45, 45)
    out = tmp_path / "out"
    assert report.main([str(runs), "--out_dir", str(out), "--quiet", "--claims", "--figures"]) == 0
    claims = {(r["claim"].split(":")[0].split(" (")[0], r["dataset"]): r for r in read_csv(out / "claims.csv")}
    route2 = claims[("route 2 carries the gain", "world_limited")]
    assert (route2["verdict"], float(route2["difference"])) == ("holds", 8.0)  # bias_only − attention_only = 8 on every seed
    gain = claims[("few-shot learning fixes something", "world_limited")]  # the last variant on both: vpt_deep_1152
    assert float(gain["difference"]) == pytest.approx(10.0) and gain["verdict"] == "holds"  # 50 − 40 on every seed
    beta = claims[("β is input-independent", "world_shapes")]
    assert (beta["verdict"], float(beta["difference"])) == ("inside the noise", 0.0)
    route1 = {r["claim"]: r for r in read_csv(out / "claims.csv") if r["dataset"] == "world_limited"}
    maple = route1["route 1: MaPLe − zero-shot fg_ratio, vision layers 8-11"]
    assert maple["verdict"] == "holds" and float(maple["difference"]) == pytest.approx(0.7)  # 3.7 − 3.0 ± 0.25
    vpt = route1["route 1: VPT-deep − zero-shot fg_ratio, vision layers 0-3"]
    assert vpt["verdict"] == "does not hold" and float(vpt["difference"]) == pytest.approx(-0.48)  # 2.52 − 3.0
    budget = claims[("bias tuning − VPT-deep at 1,152 parameters", "world_limited")]
    assert budget["verdict"] == "holds" and float(budget["difference"]) == pytest.approx(8.0)
    margin = next(r for r in read_csv(out / "claims.csv") if r["claim"].startswith("the margin"))
    assert margin["dataset"] == "world_shapes" and float(margin["difference"]) == pytest.approx(8.0)  # 8 − 0
    assert margin["verdict"] == "holds"
    assert {p.name for p in out.glob("*.png")} == {"accuracy_per_dataset.png", "fg_ratio_per_layer.png",
                                                   "accuracy_vs_budget.png"}  # world_limited: 3 budgets
    assert "| claim | world_limited | world_shapes |" in (out / "claims.md").read_text()
