"""One run folder for every rank when a launcher (torchrun, SLURM's srun) starts each rank itself.

Lightning's own DDP launcher starts the workers from rank 0, which hands its folder down in an
environment variable. torchrun and srun start all ranks at once, so no rank can inherit anything:

* torchrun: rank 0 claims the next free ``version_N`` and publishes it in the launcher's key-value
  store (the TCP store torchrun's agent serves at ``MASTER_ADDR:MASTER_PORT``); the other ranks wait
  for it there.
* srun with several tasks: every task derives the same version from the job, ``slurm<job>.<step>``.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Callable

STORE_KEY = "mmprompt/run_dir"
STORE_TIMEOUT = timedelta(minutes=5)


def launched_by_torchrun() -> bool:
    """torchrun (torch.distributed.run) started this process as one of several ranks."""
    return "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def slurm_version() -> str | None:
    """``slurm<job>.<step>`` when srun started several tasks of one command, else None."""
    job, tasks = os.environ.get("SLURM_JOB_ID"), int(os.environ.get("SLURM_NTASKS", "1") or 1)
    if job is None or tasks < 2 or launched_by_torchrun():
        return None
    return f"slurm{job}.{os.environ.get('SLURM_STEP_ID', '0')}"


def launcher_store():
    """A client of the store torchrun's agent serves; refuses launch setups without one."""
    from torch.distributed import TCPStore

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        raise ValueError(
            "torchrun started this run without its agent store (TORCHELASTIC_USE_AGENT_STORE is not True), "
            "so the ranks cannot agree on a run folder: pass the same --version to every rank"
        )
    return TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                    timeout=STORE_TIMEOUT)


def agree_with_rank_zero(claim: Callable[[], Path]) -> Path:
    """Rank 0 runs ``claim`` and publishes the folder; every other rank returns rank 0's folder."""
    store = launcher_store()
    key = f"{STORE_KEY}/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if int(os.environ.get("RANK", "0")) == 0:
        run_dir = claim()
        store.set(key, str(run_dir))
        return run_dir
    return Path(store.get(key).decode())
