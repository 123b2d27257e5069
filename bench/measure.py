"""Timing and peak-memory helpers for the benchmarks (CPU by default, CUDA when present).

Peak memory on CUDA is ``torch.cuda.max_memory_allocated`` above what was allocated when the call
started. On CPU torch has no allocator statistics, so a thread samples the process RSS from
``/proc/self/statm`` every 10 ms (often enough for peaks that last a
forward pass; rarer polling would cost the tiny config's Python-bound steps time); before each measured call ``malloc_trim(0)`` hands freed
heap pages back to the OS, so the RSS at the start is the live memory and the peak above it is
what the call needed (activations, workspaces, allocator slack).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

MIB = 2**20
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _libc_trim() -> Callable[[], None]:
    """glibc's malloc_trim(0), or a no-op where it does not exist (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError, TypeError):
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]
    return lambda: trim(0)


release_freed_memory = _libc_trim()


def current_rss() -> int:
    """Resident bytes of this process (Linux); 0 where /proc is missing."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * PAGE_SIZE
    except OSError:
        return 0


class RssSampler:
    """Keeps the highest RSS seen since the last `reset`, polled by a daemon thread."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.peak = current_rss()
        self.polls = 0
        self._polled = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss())
            with self._polled:
                self.polls += 1
                self._polled.notify_all()
            time.sleep(self.interval_s)

    def wait_for_poll(self, timeout_s: float = 10.0) -> None:
        """Return once the thread has read the RSS after this call (the read in flight may predate it, so
        two polls): what is allocated now is then in `peak`, with no guess at how long to sleep."""
        with self._polled:
            target = self.polls + 2
            if not self._polled.wait_for(lambda: self.polls >= target, timeout_s):
                raise TimeoutError(f"the RSS sampler did not poll within {timeout_s} s")

    def reset(self) -> int:
        self.peak = current_rss()
        return self.peak

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Sample:
    """One measured call: wall seconds and peak extra memory in bytes."""

    seconds: float
    peak_bytes: int


@dataclass
class Meter:
    """Measures calls on one device; keeps the samples per label."""

    device: torch.device
    samples: dict[str, list[Sample]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._sampler = RssSampler() if self.device.type == "cpu" else None

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def measure(self, label: str, keep: bool = True) -> Iterator[None]:
        """Time the block and record its peak memory under ``label`` (``keep=False``: warm-up)."""
        self.synchronize()
        if self._sampler is not None:
            release_freed_memory()
            base = self._sampler.reset()
        else:
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        yield
        self.synchronize()
        seconds = time.perf_counter() - start
        peak = self._sampler.peak if self._sampler is not None else torch.cuda.max_memory_allocated(self.device)
        if keep:
            self.samples.setdefault(label, []).append(Sample(seconds, max(0, peak - base)))

    def wait_for_sample(self) -> None:
        """Until the memory now in use is counted in the running measurement's peak (CUDA: at once)."""
        if self._sampler is not None:
            self._sampler.wait_for_poll()

    def seconds(self, label: str) -> list[float]:
        return [sample.seconds for sample in self.samples.get(label, [])]

    def median_seconds(self, label: str) -> float:
        values = self.seconds(label)
        return statistics.median(values) if values else float("nan")

    def peak_mib(self, *labels: str) -> float:
        peaks = [sample.peak_bytes for label in labels for sample in self.samples.get(label, [])]
        return max(peaks) / MIB if peaks else float("nan")

    def close(self) -> None:
        if self._sampler is not None:
            self._sampler.close()
