"""Per-phase timers for one rank: CUDA events on GPUs, ``perf_counter`` on CPU ranks.

A method wraps each part of its work in ``with tm("compute"):`` / ``tm("comm")`` / ``tm("merge")``.
The timer also switches the byte counters' phase, so bytes and time are split the same way.
On GPUs the events are only recorded (no host synchronisation on the hot path); :meth:`collect`
synchronises once at the end of an iteration and returns seconds per phase.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch

PHASES = ("compute", "comm", "merge")


class PhaseTimer:
    def __init__(self, device: torch.device, counters=None):
        self.cuda = device.type == "cuda"
        self.counters = counters
        self._spans: list[tuple[str, object, object]] = []

    @contextlib.contextmanager
    def __call__(self, phase: str):
        ctx = self.counters.phase(phase) if self.counters is not None else contextlib.nullcontext()
        with ctx:
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                yield
                b.record()
            else:
                a = time.perf_counter()
                yield
                b = time.perf_counter()
        self._spans.append((phase, a, b))

    def collect(self) -> dict[str, float]:
        """Seconds per phase since the last collect (synchronises the device once)."""
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[str, float] = defaultdict(float)
        for phase, a, b in self._spans:
            out[phase] += (a.elapsed_time(b) / 1e3) if self.cuda else (b - a)
        self._spans.clear()
        return dict(out)


class NullTimer:
    """A timer that records nothing (for callers that do not time phases)."""

    @contextlib.contextmanager
    def __call__(self, phase: str):
        yield

    def collect(self) -> dict[str, float]:
        return {}


def timed_runs(fn, device: torch.device, repeats: int, warmup: int = 1) -> tuple[object, list[float]]:
    """(last result, wall seconds of each of ``repeats`` calls of fn()) after ``warmup`` calls; the
    device is synchronised before and after each timed call (whole-call timing, host included)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    ts, out = [], None
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return out, ts
