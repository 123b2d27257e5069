"""`mmprompt report` on hand-written results.json files: every expected number is computed by hand here."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from mmprompt.tools import report


def write_result(root: Path, protocol: str, method: str, dataset: str, seed: int, metrics: dict,
                 shots: int = 16) -> Path:
    """A run folder as the CLI leaves it after the test stage."""
    folder = root / protocol / f"{method}-{dataset}" / f"{shots}shots-seed{seed}"
    folder.mkdir(parents=True)
    path = folder / "results.json"
    path.write_text(json.dumps({
        "name": f"{method}-{dataset}", "version": f"seed{seed}", "protocol": protocol, "method": method,
        "dataset": dataset, "seed": seed, "shots": shots, "subsample": "base", "model_name": "ViT-B-16-quickgelu",
        "stage": "test", "metrics": metrics,
    }))
    return path


def base_new(base: float, new: float) -> dict:
    return {"test/base/acc": base, "test/new/acc": new, "test/hm": 2 * base * new / (base + new)}


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def row(records: list[dict[str, str]], **match: str) -> dict[str, str]:
    found = [r for r in records if all(r[k] == v for k, v in match.items())]
    assert len(found) == 1, (match, found)
    return found[0]


def run_report(tmp_path: Path, *extra: str) -> Path:
    out = tmp_path / "out"
    assert report.main([str(tmp_path / "runs"), "--out_dir", str(out), "--quiet", *extra]) == 0
    return out


def test_base_new_seed_statistics_and_hm_of_means(tmp_path):
    for seed, (b, n) in zip((1, 2, 3), [(80, 70), (82, 72), (84, 74)]):
        write_result(tmp_path / "runs", "base2new", "MaPLe", "eurosat", seed, base_new(b, n))
    out = run_report(tmp_path)
    record = row(read_csv(out / "base2new_base2new.csv"), source="ours", dataset="eurosat")
    # means 82 and 72, sample std sqrt(((-2)^2 + 0 + 2^2) / 2) = 2
    assert float(record["base_mean"]) == pytest.approx(82.0)
    assert float(record["base_std"]) == pytest.approx(2.0)
    assert float(record["new_mean"]) == pytest.approx(72.0)
    assert float(record["new_std"]) == pytest.approx(2.0)
    # HM of the means: 2·82·72 / 154 = 76.6753
    assert float(record["hm"]) == pytest.approx(11808 / 154, abs=1e-4)
    # per-seed HMs 11200/150, 11808/154, 12432/158 -> their mean
    per_seed = [11200 / 150, 11808 / 154, 12432 / 158]
    assert float(record["hm_seed_mean"]) == pytest.approx(sum(per_seed) / 3, abs=1e-4)
    assert record["seeds"] == "1,2,3" and record["n"] == "3"
    markdown = (out / "report.md").read_text()
    assert "| MaPLe | eurosat | 1,2,3 | 82.00 ± 2.00 | 72.00 ± 2.00 | 76.68 |" in markdown


def test_population_std_option(tmp_path):
    for seed, b in zip((1, 2, 3), (80, 82, 84)):
        write_result(tmp_path / "runs", "base2new", "MaPLe", "dtd", seed, base_new(b, 50))
    out = run_report(tmp_path, "--std", "population")
    record = row(read_csv(out / "base2new_base2new.csv"), source="ours", dataset="dtd")
    assert float(record["base_std"]) == pytest.approx(math.sqrt(8 / 3), abs=1e-4)  # sqrt((4 + 0 + 4) / 3)
    assert float(record["new_std"]) == 0.0


def test_single_seed_has_no_sample_std(tmp_path):
    write_result(tmp_path / "runs", "base2new", "MaPLe", "dtd", 1, base_new(70, 60))
    out = run_report(tmp_path)
    record = row(read_csv(out / "base2new_base2new.csv"), source="ours", dataset="dtd")
    assert record["base_std"] == "" and record["base_mean"] == "70.0000"
    assert "| MaPLe | dtd | 1 | 70.00 | 60.00 |" in (out / "report.md").read_text()


def test_average_row_is_hm_of_averages_not_average_of_hms(tmp_path):
    # dataset A: B 90, N 10 -> HM 18; dataset B: B 10, N 90 -> HM 18. Mean of HMs 18, HM of means (50, 50) = 50.
    write_result(tmp_path / "runs", "base2new", "BiasTuning", "eurosat", 1, base_new(90, 10))
    write_result(tmp_path / "runs", "base2new", "BiasTuning", "dtd", 1, base_new(10, 90))
    out = run_report(tmp_path)
    records = read_csv(out / "base2new_base2new.csv")
    average = row(records, source="ours", dataset="average")
    assert float(average["base_mean"]) == pytest.approx(50.0)
    assert float(average["hm"]) == pytest.approx(50.0)
    assert average["n"] == "2" and average["n_of"] == "datasets"
    markdown = (out / "report.md").read_text()
    assert "| BiasTuning | average of 2 |  | 50.00 | 50.00 | 50.00 |" in markdown
    assert "average over 2 of the 11 datasets" in markdown


def test_published_rows_marked_and_placed(tmp_path):
    write_result(tmp_path / "runs", "base2new", "MaPLe", "dtd", 1, base_new(80, 60))
    out = run_report(tmp_path)
    markdown = (out / "report.md").read_text()
    assert "| MaPLe (published) | average of 11 |  | 82.28 | 75.14 | 78.55 |  |" in markdown
    assert "| CLIP zero-shot (published) | average of 11 |  | 69.34 | 74.22 | 71.70 |  |" in markdown
    assert "94.07" not in markdown  # the EuroSAT reference only appears next to EuroSAT runs
    published = [r for r in read_csv(out / "base2new_base2new.csv") if r["source"] == "published"]
    assert {r["method"] for r in published} == {"CLIP zero-shot", "CoOp", "CoCoOp", "KgCoOp", "MaPLe", "PromptSRC"}

    write_result(tmp_path / "runs", "base2new", "MaPLe", "EuroSAT", 1, base_new(90, 70))
    markdown = (run_report(tmp_path) / "report.md").read_text()
    ours = markdown.index("| MaPLe | eurosat |")
    assert markdown.index("| MaPLe (published) | eurosat |  | 94.07 | 73.23 | 82.35 |") > ours


def test_dataset_spellings_are_one_dataset(tmp_path):
    write_result(tmp_path / "runs", "base2new", "MaPLe", "EuroSAT", 1, base_new(80, 70))
    write_result(tmp_path / "runs", "base2new", "MaPLe", "eurosat", 2, base_new(84, 74))
    record = row(read_csv(run_report(tmp_path) / "base2new_base2new.csv"), source="ours", dataset="eurosat")
    assert record["seeds"] == "1,2" and float(record["base_mean"]) == pytest.approx(82.0)


def test_registry_aliases_are_one_dataset_in_the_papers_order(tmp_path):
    """Names come from the dataset registry: aliases and spellings map to its key, in its order."""
    for seed, name in enumerate(("pets", "OxfordPets", "oxford-pets"), start=1):
        write_result(tmp_path / "runs", "fewshot", "CoOp", name, seed, {"test/all/acc": 60 + 2 * seed})
    for name in ("DescribableTextures", "ImageNet", "imagenet-adversarial", "animals"):
        write_result(tmp_path / "runs", "fewshot", "CoOp", name, 1, {"test/all/acc": 50})
    out = run_report(tmp_path)
    records = read_csv(out / "fewshot_fewshot.csv")
    assert [r["dataset"] for r in records if r["dataset"] != "average"] == [
        "imagenet", "oxford_pets", "dtd", "imagenet_a", "animals"]  # papers' order, then unknown names
    assert float(row(records, dataset="oxford_pets")["acc_mean"]) == pytest.approx(64.0)  # 62, 64, 66
    assert row(records, dataset="oxford_pets")["n"] == "3"


def test_methods_are_ordered_by_the_registry(tmp_path):
    for method in ("NewMethod", "CoupledBiasTuning", "MaPLe", "ZeroShot", "CoOp"):
        write_result(tmp_path / "runs", "base2new", method, "dtd", 1, base_new(80, 60))
    markdown = (run_report(tmp_path) / "report.md").read_text()
    first_table = markdown.split("\n## ")[1]  # the interval and paired tables follow in the same order
    rows = [line.split(" | ")[0][2:] for line in first_table.splitlines() if line.startswith("| ") and "| dtd |" in line]
    assert rows == ["ZeroShot", "CoOp", "MaPLe", "CoupledBiasTuning", "NewMethod"]


def test_fewshot_table_columns_per_shots_and_average(tmp_path):
    for seed, acc in ((1, 60), (2, 64)):
        write_result(tmp_path / "runs", "fewshot", "CoOp", "dtd", seed, {"test/all/acc": acc}, shots=1)
        write_result(tmp_path / "runs", "fewshot", "CoOp", "dtd", seed, {"test/all/acc": acc + 10}, shots=16)
        write_result(tmp_path / "runs", "fewshot", "CoOp", "eurosat", seed, {"test/all/acc": acc + 20}, shots=16)
    out = run_report(tmp_path)
    markdown = (out / "report.md").read_text()
    assert "| method | dataset | K=1 | K=16 |" in markdown
    # dtd K=1: 60, 64 -> 62 ± 2.83 (sqrt(8)); eurosat has no K=1 run
    assert "| CoOp | dtd | 62.00 ± 2.83 | 72.00 ± 2.83 |" in markdown
    assert "| CoOp | eurosat | – | 82.00 ± 2.83 |" in markdown
    # averages: K=1 only dtd (62, flagged as 1 dataset), K=16 (72 + 82) / 2 = 77
    assert "| CoOp | average of 2 | 62.00 (1 datasets) | 77.00 |" in markdown
    records = read_csv(out / "fewshot_fewshot.csv")
    assert float(row(records, dataset="average", shots="16")["acc_mean"]) == pytest.approx(77.0)


def test_transfer_table_source_first_and_excluded_from_average(tmp_path):
    for dataset, acc in (("imagenet", 70), ("caltech101", 90), ("imagenet_a", 50)):
        write_result(tmp_path / "runs", "cross_dataset", "MaPLe", dataset, 1, {"test/all/acc": acc})
    out = run_report(tmp_path)
    markdown = (out / "report.md").read_text()
    assert "| method | imagenet (source) | caltech101 | imagenet_a | average of 2 targets |" in markdown
    assert "| MaPLe | 70.00 | 90.00 | 50.00 | 70.00 |" in markdown  # (90 + 50) / 2, ImageNet left out
    assert float(row(read_csv(out / "cross_dataset_transfer.csv"), dataset="average_targets")["acc_mean"]) == 70.0


def test_markdown_printed_and_format_option(tmp_path, capsys):
    write_result(tmp_path / "runs", "base2new", "MaPLe", "dtd", 1, base_new(80, 60))
    out = tmp_path / "only_csv"
    assert report.main([str(tmp_path / "runs"), "--out_dir", str(out), "--format", "csv"]) == 0
    assert "| MaPLe | dtd |" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["base2new_base2new.csv", "base2new_intervals.csv"]


def test_default_out_is_report_folder_inside_first_folder(tmp_path):
    write_result(tmp_path / "runs", "base2new", "MaPLe", "dtd", 1, base_new(80, 60))
    assert report.main([str(tmp_path / "runs"), "--quiet"]) == 0
    assert (tmp_path / "runs" / "report" / "report.md").is_file()


@pytest.mark.parametrize("content, problem", [
    ("{not json", "Expecting property name"),
    (json.dumps({"protocol": "base2new", "method": "MaPLe", "dataset": "dtd", "seed": 1}), "missing field 'metrics'"),
    (json.dumps({"protocol": "base2new", "method": "MaPLe", "dataset": "dtd", "seed": 1,
                 "metrics": {"test/base/acc": 80}}), "neither test/base/acc"),
    (json.dumps({"protocol": "base2new", "method": "MaPLe", "dataset": "dtd", "seed": "1",
                 "metrics": {"test/all/acc": 80}}), "field 'seed' should be int"),
    (json.dumps({"protocol": "base2new", "method": "MaPLe", "dataset": "dtd", "seed": 1,
                 "metrics": {"test/all/acc": 0.8e3}}), "not a percentage"),
])
def test_invalid_results_stop_the_report_naming_the_file(tmp_path, capsys, content, problem):
    good = write_result(tmp_path / "runs", "base2new", "MaPLe", "dtd", 2, base_new(80, 60))
    bad = good.parent.parent / "broken" / "results.json"
    bad.parent.mkdir()
    bad.write_text(content)
    assert report.main([str(tmp_path / "runs"), "--out_dir", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and problem in err
    assert not (tmp_path / "out").exists()


def test_skip_invalid_lists_the_skipped_files(tmp_path, capsys):
    good = write_result(tmp_path / "runs", "base2new", "MaPLe", "dtd", 1, base_new(80, 60))
    bad = good.parent.parent / "broken" / "results.json"
    bad.parent.mkdir()
    bad.write_text("")
    out = run_report(tmp_path, "--skip_invalid")
    assert f"warning: skipped {bad}" in capsys.readouterr().err
    markdown = (out / "report.md").read_text()
    assert "## Skipped results (invalid)" in markdown and str(bad) in markdown
    assert "| MaPLe | dtd | 1 | 80.00 |" in markdown


def test_two_files_for_the_same_run_are_an_error(tmp_path, capsys):
    first = write_result(tmp_path / "runs" / "a", "base2new", "MaPLe", "dtd", 1, base_new(80, 60))
    second = write_result(tmp_path / "runs" / "b", "base2new", "MaPLe", "dtd", 1, base_new(81, 61))
    assert report.main([str(tmp_path / "runs"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(first) in err and str(second) in err


def test_overlapping_folders_count_each_file_once(tmp_path):
    write_result(tmp_path / "runs", "base2new", "MaPLe", "dtd", 1, base_new(80, 60))
    runs, problems = report.load_results([tmp_path / "runs", tmp_path / "runs" / "base2new"])
    assert len(runs) == 1 and problems == []


def test_no_results_is_an_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 2
    assert "no valid results.json" in capsys.readouterr().err


def write_backbone_result(root: Path, dataset: str, seed: int, metrics: dict, model_name: str,
                          pretrained: str | None) -> Path:
    path = write_result(root / model_name, "base2new", "MaPLe", dataset, seed, metrics)
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "model_name": model_name, "pretrained": pretrained}))
    return path


def test_backbones_get_their_own_tables_and_published_rows_only_join_vit_b16(tmp_path):
    write_backbone_result(tmp_path / "runs", "eurosat", 1, base_new(90, 70), "ViT-B-16-quickgelu", "openai")
    write_backbone_result(tmp_path / "runs", "eurosat", 1, base_new(40, 30), "mmprompt-tiny", None)
    write_backbone_result(tmp_path / "runs", "eurosat", 1, base_new(60, 50), "ViT-B-16", None)  # random weights
    out = run_report(tmp_path)
    markdown = (out / "report.md").read_text()
    for backbone in ("ViT-B-16-quickgelu", "mmprompt-tiny", "ViT-B-16"):
        assert f"## base2new: base-to-novel (accuracy %), backbone {backbone}\n" in markdown
    assert markdown.count("(published)") == 7  # 6 averages + MaPLe on EuroSAT, in the ViT-B/16 OpenAI table only
    tiny = read_csv(out / "base2new_base2new_mmprompt-tiny.csv")
    assert {r["source"] for r in tiny} == {"ours"} and {r["backbone"] for r in tiny} == {"mmprompt-tiny"}
    assert float(row(tiny, dataset="eurosat")["base_mean"]) == 40.0
    vit = read_csv(out / "base2new_base2new_ViT-B-16-quickgelu.csv")
    assert float(row(vit, source="published", dataset="eurosat")["base_mean"]) == 94.07
    assert {r["source"] for r in read_csv(out / "base2new_base2new_ViT-B-16.csv")} == {"ours"}


def test_two_named_custom_datasets_are_two_rows(tmp_path):
    write_result(tmp_path / "runs", "base2new", "MaPLe", "animals", 1, base_new(80, 60))
    write_result(tmp_path / "runs", "base2new", "MaPLe", "plants", 1, base_new(70, 50))
    records = read_csv(run_report(tmp_path) / "base2new_base2new.csv")
    assert float(row(records, source="ours", dataset="animals")["base_mean"]) == 80.0
    assert float(row(records, source="ours", dataset="plants")["base_mean"]) == 70.0


def test_the_one_table_writer_keeps_columns_cells_and_files(tmp_path):
    """`mmprompt.tables` writes every table: report, analysis and predictions share it."""
    from mmprompt.tables import csv_text, markdown_table, write_json_atomic, write_table

    records = [{"layer": 0, "ratio": 0.123456, "mode": "a|b"}, {"layer": 1, "extra": None}]
    assert csv_text(records) == "layer,ratio,mode,extra\r\n0,0.123456,a|b,\r\n1,,,\r\n"
    assert markdown_table(records) == ("| layer | ratio | mode | extra |\n|---|---|---|---|\n"
                                       "| 0 | 0.1235 | a\\|b |  |\n| 1 |  |  |  |\n")
    csv_path, md_path = write_table(records, tmp_path / "deep" / "stats")
    assert csv_path.read_bytes().decode() == csv_text(records) and md_path.read_text() == markdown_table(records)
    write_json_atomic(tmp_path / "r.json", {"a": [1, 2]}, indent=1)
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": [1, 2]}
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["deep", "r.json", "stats.csv", "stats.md"]  # no temporaries
