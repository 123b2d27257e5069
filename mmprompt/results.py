"""What a finished run reports, shared by the module that logs it, the CLI that writes it and the
tools that read it (``mmprompt report``, ``mmprompt sweep``): torch-free, so both sides import it."""

from __future__ import annotations

#: the file every run that finished its test stage writes into its run folder (see docs/protocols.md)
RESULTS_FILE = "results.json"


def harmonic_mean(base: float, new: float) -> float:
    """HM = 2·B·N / (B + N), the base-to-novel summary (the module logs test/hm with this too)."""
    return 2 * base * new / (base + new) if base + new > 0 else 0.0
