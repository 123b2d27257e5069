"""What a finished run reports, shared by the module that logs it, the CLI that writes it and the
tools that read it (``mmprompt report``, ``mmprompt sweep``): torch-free, so both sides import it."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

#: the file every run that finished its test stage writes into its run folder (see docs/protocols.md)
RESULTS_FILE = "results.json"
#: a run's newest checkpoint, relative to its run folder (what ``--ckpt_path last`` resumes)
LAST_CKPT = Path("checkpoints") / "last.ckpt"


def harmonic_mean(base: float, new: float) -> float:
    """HM = 2·B·N / (B + N), the base-to-novel summary (the module logs test/hm with this too)."""
    return 2 * base * new / (base + new) if base + new > 0 else 0.0


def percent_accuracies(prefix: str, fractions: Mapping[str, float]) -> dict[str, float]:
    """``{"<prefix>/<class set>/acc": %}`` from each class set's fraction of correct predictions, plus
    ``<prefix>/hm`` (`harmonic_mean`) when base and new were both evaluated: what the module logs
    (``val/...``, ``test/...``) and what the interventions table reports per mode."""
    results = {f"{prefix}/{name}/acc": 100.0 * fraction for name, fraction in fractions.items()}
    if f"{prefix}/base/acc" in results and f"{prefix}/new/acc" in results:
        results[f"{prefix}/hm"] = harmonic_mean(results[f"{prefix}/base/acc"], results[f"{prefix}/new/acc"])
    return results
