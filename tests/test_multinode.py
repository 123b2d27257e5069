"""One run as 2 nodes x 1 process, started as users start it (a torchrun agent per node, c10d rendezvous):
it finishes in one run folder, and testing its checkpoint on 2 nodes gives one process's metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from run_helpers import torchrun_nodes

from mmprompt.run.cli import cli_main

TWO_NODES = ["--trainer.num_nodes", "2", "--trainer.devices", "1", "--trainer.strategy", "ddp",
             "--trainer.accelerator", "cpu"]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.callbacks", "[]", "--compare_zero_shot", "false"]


@pytest.mark.slow
def test_two_nodes_fit_into_one_run_folder_and_test_like_one_process(data_root, tmp_path):
    common = ["--config", "demo", "--config", "tiny", "--data.dataset", "synthetic", "--data.root", str(data_root),
              "--out_dir", str(tmp_path / "runs"), "--data.eval_batch_size", "50", *QUIET]
    fitted = torchrun_nodes("fit", *common, "--data.shots", "2", "--trainer.max_epochs", "1", "--test_after_fit",
                            "false", *TWO_NODES, nodes=2, cwd=tmp_path)
    assert all(node.returncode == 0 for node in fitted), "\n".join(node.stderr[-3000:] for node in fitted)
    assert [p.name for p in (tmp_path / "runs" / "demo").iterdir()] == ["version_0"], "one run folder for both nodes"
    checkpoint = tmp_path / "runs" / "demo" / "version_0" / "checkpoints" / "last.ckpt"
    tested = torchrun_nodes("test", *common, "--ckpt_path", str(checkpoint), "--version", "two_nodes", *TWO_NODES,
                            nodes=2, cwd=tmp_path)
    assert all(node.returncode == 0 for node in tested), "\n".join(node.stderr[-3000:] for node in tested)
    one = cli_main(["test", *common, "--ckpt_path", str(checkpoint), "--version", "one_process"]).model.test_results
    two = json.loads((tmp_path / "runs" / "demo" / "two_nodes" / "results.json").read_text())["metrics"]
    assert set(two) == set(one) == {"test/base/acc", "test/new/acc", "test/hm"}
    assert all(abs(two[name] - one[name]) < 1e-6 for name in one), (two, one)
