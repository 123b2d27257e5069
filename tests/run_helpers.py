"""Callbacks that tests load by class_path (the tests folder is on sys.path under pytest), and the
one way tests start the CLI in a subprocess: with a hard timeout that also kills its DDP workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import lightning as L
import torch

REPO = Path(__file__).resolve().parents[1]
#: a multi-process test that hangs fails after this long instead of blocking CI
HARD_TIMEOUT_S = 120


class CrashAtEpoch(L.Callback):
    """Simulates a killed job: fails as epoch ``epoch`` starts, after the previous epoch's checkpoint."""

    def __init__(self, epoch: int = 1) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise SystemError(f"simulated crash at the start of epoch {self.epoch}")


class PredictionRecorder(L.Callback):
    """Saves what this rank predicted per dataset index (test and predict) to ``<output_dir>/<stage>_rank<r>.pt``,
    with no collective, so a test can check that the ranks together saw every image exactly once."""

    def __init__(self, output_dir: str) -> None:
        self.output_dir = Path(output_dir)
        self.seen: dict[str, list[tuple[int, int, int]]] = {}

    def _add(self, stage: str, indices: torch.Tensor, predictions: torch.Tensor, dataloader_idx: int) -> None:
        rows = zip(indices.tolist(), predictions.tolist())
        self.seen.setdefault(stage, []).extend((dataloader_idx, index, label) for index, label in rows)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._add("test", batch["index"], outputs.argmax(dim=-1), dataloader_idx)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._add("predict", outputs["index"], outputs["prediction"], dataloader_idx)

    def _save(self, trainer, stage: str) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        torch.save(self.seen.get(stage, []), self.output_dir / f"{stage}_rank{trainer.global_rank}.pt")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._save(trainer, "test")

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        self._save(trainer, "predict")


def run_with_hard_timeout(argv: list[str], cwd: Path, timeout: float = HARD_TIMEOUT_S,
                          env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``subprocess.run`` in its own session; on timeout the whole session (DDP workers too) is killed
    and the test fails with the output so far."""
    with subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
            raise AssertionError(f"{' '.join(argv)} did not finish in {timeout} s (hang?)\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(argv, process.returncode, out, err)


@contextmanager
def hard_deadline(seconds: int = HARD_TIMEOUT_S) -> Iterator[None]:
    """For multi-process work inside the test process (``ddp_spawn``): after ``seconds`` kill this
    process's children and fail, instead of waiting forever on a hung collective (Linux, main thread)."""
    def expire(signum, frame) -> None:
        for pid in child_pids(os.getpid()):
            os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"multi-process run did not finish in {seconds} s (hang?)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def child_pids(parent: int) -> list[int]:
    """Direct children of ``parent``, read from /proc."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            after_name = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(after_name[1]) == parent:
            children.append(int(stat.parent.name))
    return children


class ProcessInFastTest(AssertionError):
    """A test outside the ``slow`` mark started a process (tests/conftest.py refuses it)."""


def torch_threads() -> int:
    """This test process's share of the cores: the pytest-xdist workers split them (one each at least),
    at most 2. Threads beyond the cores make every OpenMP region spin against the other workers."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, min(2, (os.cpu_count() or 1) // workers))


def cli_env() -> dict[str, str]:
    """This checkout first on the path (not an installed copy), tests folder for test callbacks, offline;
    under pytest-xdist the worker's share of the cores (a DDP job splits it between its ranks)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    env.pop("MMPROMPT_RUN_DIR", None)
    if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
        env.setdefault("OMP_NUM_THREADS", str(torch_threads()))
    return env


def mmprompt(*args: str, cwd: Path, timeout: float = HARD_TIMEOUT_S) -> subprocess.CompletedProcess:
    """``python -m mmprompt ARGS`` with a hard timeout."""
    return run_with_hard_timeout([sys.executable, "-m", "mmprompt", *args], cwd, timeout, cli_env())


def torchrun(*args: str, nproc: int, cwd: Path, timeout: float = HARD_TIMEOUT_S) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node N -m mmprompt ARGS`` with a hard timeout."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), "-m", "mmprompt", *args]
    return run_with_hard_timeout(argv, cwd, timeout, cli_env())


def torchrun_nodes(*args: str, nodes: int, cwd: Path, timeout: float = HARD_TIMEOUT_S) -> list[subprocess.CompletedProcess]:
    """One ``torchrun --nnodes N --node_rank i --nproc_per_node 1`` agent per node, all on this machine
    and meeting at a c10d rendezvous on 127.0.0.1, as users start a multi-node job; each agent (and its
    workers) in its own session, all killed when one exceeds the shared ``timeout``."""
    endpoint = f"127.0.0.1:{free_port()}"
    processes = []
    for node in range(nodes):
        argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--node_rank", str(node),
                "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "-m", "mmprompt", *args]
        processes.append(subprocess.Popen(argv, cwd=cwd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, start_new_session=True))
    results = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    except subprocess.TimeoutExpired:
        for process in processes:
            os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError(f"{nodes} torchrun agents did not finish in {timeout} s (hang?)") from None
    return results


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SigtermAtStep(L.Callback):
    """Sends this process SIGTERM after training step ``step``, as a scheduler ending a job does."""

    def __init__(self, step: int = 2) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
