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


class SegmentClock:
    """Splits a span of work into labelled segments that tile it: :meth:`switch` ends the running
    segment and starts one with a new label; ``with clock(label):`` runs a nested segment and then
    resumes the enclosing label. CUDA events on GPUs (recorded only; :meth:`collect` synchronises
    once), ``perf_counter`` on CPU. The segments' seconds sum to the span's, by construction.

    Used by the model-level projection to split a host's prefill into the APB paper's per-block
    parts (qkv, scoring, attention, o_proj, ffn, others) through hooks on the model.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.label: str | None = None
        self._marks: list[tuple[str | None, object]] = []

    def _now(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def switch(self, label: str | None) -> None:
        """End the running segment; the next one carries ``label`` (None: stop timing)."""
        self._marks.append((self.label, self._now()))
        self.label = label

    @contextlib.contextmanager
    def __call__(self, label: str):
        outer = self.label
        self.switch(label)
        try:
            yield
        finally:
            self.switch(outer)

    def collect(self) -> dict[str, float]:
        """Seconds per label since the clock started (or the last collect); resets the clock."""
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[str, float] = defaultdict(float)
        for (_, a), (label, b) in zip(self._marks, self._marks[1:]):
            if label is not None:
                out[label] += (a.elapsed_time(b) / 1e3) if self.cuda else (b - a)
        self._marks.clear()
        self.label = None
        return dict(out)
