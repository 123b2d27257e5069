"""The benchmark script runs end to end on the tiny config (a smoke test: nothing is timed)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("mmprompt_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_bench_runs_on_the_tiny_config_and_writes_json(tmp_path, capsys):
    bench = _load_bench()
    out = tmp_path / "bench.json"
    rows = bench.main([
        "--model", "mmprompt-tiny", "--adapters", "maple,zero-shot", "--train-classes", "12", "--train-iters", "2",
        "--eval-classes", "30", "--eval-batch", "3", "--eval-batches", "2", "--precision", "fp32",
        "--json", str(out), "--csv", str(tmp_path / "bench.csv"),
    ])
    assert [row["adapter"] for row in rows] == ["maple", "zero-shot"]
    for row in rows:
        for key in ("train12_fast_img_s", "train12_naive_img_s", "eval_fast_img_s", "eval_naive_img_s",
                    "image_tower_img_s"):
            assert math.isfinite(row[key]) and row[key] > 0, key  # images over measured seconds
        # the ratios are the rates' ratios: the table's "eval ×" compares the two paths on the same images
        assert row["eval_speedup"] == pytest.approx(row["eval_fast_img_s"] / row["eval_naive_img_s"], rel=1e-6)
        assert math.isfinite(row["recording_overhead"]) and row["recording_overhead"] > -1  # recorded time > 0
    assert "| maple |" in capsys.readouterr().out
    assert json.loads(out.read_text())["machine"]["torch"]
    assert "adapter" in (tmp_path / "bench.csv").read_text().splitlines()[0]


def test_meter_sees_a_large_allocation():
    sys.path.insert(0, str(BENCH.parent))
    import torch
    from measure import Meter

    meter = Meter(torch.device("cpu"))
    try:
        with meter.measure("alloc"):
            block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
            meter.wait_for_sample()
            del block
    finally:
        meter.close()
    assert meter.peak_mib("alloc") > 48
