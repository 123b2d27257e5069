"""What users keep and share: shipped configs, predictions, self-describing checkpoints, exports."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mmprompt.cli import cli_main
from mmprompt.data import FewShotDataModule
from mmprompt.shipped import resolve_config, shipped_config_names, with_shipped_configs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    FewShotDataModule(dataset="synthetic", root=str(root), image_size=64).prepare_data()
    return root


def test_shipped_configs_resolve_by_name_and_paths_win(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert {"demo", "tiny", "methods/maple", "datasets/eurosat", "protocols/base2new"} <= set(shipped_config_names())
    assert resolve_config("demo") == str(REPO / "configs" / "demo.yaml")
    assert with_shipped_configs(["fit", "-c", "methods/maple", "--config=tiny"]) == [
        "fit", "-c", str(REPO / "configs" / "methods" / "maple.yaml"), "--config=" + str(REPO / "configs" / "tiny.yaml")]
    (tmp_path / "demo").write_text("model: {}\n")
    assert resolve_config("demo") == "demo"  # an existing path is never replaced
    assert resolve_config("model: {lr: 1}") == "model: {lr: 1}"  # inline YAML passes through


def test_demo_by_name_runs_from_another_directory(data_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = cli_main(["fit", "--config", "demo", "--config", "tiny", "--data.root", str(data_root), "--out_dir",
                    str(tmp_path / "runs"), "--trainer.fast_dev_run", "1", "--trainer.enable_progress_bar", "false",
                    "--trainer.callbacks", "[]"])
    assert type(cli.model.adapter).__name__ == "MaPLe" and cli.trainer.state.finished


def test_wheel_ships_license_and_every_config(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("mmprompt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"mmprompt/configs/{name}.yaml" for name in shipped_config_names()}
    assert len(shipped) >= 30 and shipped <= names
    assert any(name.endswith("licenses/LICENSE") for name in names)
    assert "mmprompt/model_configs/mmprompt-tiny.json" in names
