"""Measurement of a case on every rank: its timed loop (:func:`time_case`), the summary of a
case's times (:func:`time_summary`; over ranks and phases: :func:`summarize`) and a rank's peak
memory (:func:`peak_memory`)."""

from __future__ import annotations

import resource
import time

import numpy as np
import torch

from hpcattn.timing import PHASES, PhaseTimer


def peak_memory(device: torch.device) -> int:
    """This rank's peak memory in bytes: allocated on its GPU, or the process's max RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def time_case(fn, ctx, warmup: int, repeats: int, solo: bool = False):
    """Run ``fn(tm)`` warmup + repeats times. Returns (last result, times (repeats,),
    phases (repeats, len(PHASES)), bytes per step {phase: bytes}). ``solo``: one rank computes,
    the others wait asleep between iterations (:meth:`CommContext.idle_barrier`)."""
    timer = PhaseTimer(ctx.device, ctx.counters)
    ctx.counters.reset()
    times, phases, result = [], [], None
    cuda = ctx.device.type == "cuda"
    for i in range(warmup + repeats):
        result = None
        ctx.idle_barrier() if solo else ctx.barrier()
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            result = fn(timer)
            b.record()
            b.synchronize()
            dt = a.elapsed_time(b) / 1e3
        else:
            t0 = time.perf_counter()
            result = fn(timer)
            dt = time.perf_counter() - t0
        ph = timer.collect()
        if i >= warmup:
            times.append(dt)
            phases.append([ph.get(x, 0.0) for x in PHASES])
    n = warmup + repeats
    per_step = {x: ctx.counters.bytes.get(x, 0) // n for x in PHASES}
    return result, np.asarray(times), np.asarray(phases).reshape(repeats, len(PHASES)), per_step


def time_summary(step: np.ndarray, minimum: bool = True) -> dict:
    """The record's time attributes of a case's timed runs ``step`` (seconds, one per run):
    time_median_s, time_p10_s, time_p90_s and, with ``minimum``, time_min_s."""
    out = {"time_median_s": float(np.median(step)), "time_p10_s": float(np.percentile(step, 10)),
           "time_p90_s": float(np.percentile(step, 90))}
    if minimum:
        out["time_min_s"] = float(step.min())
    return out


def summarize(times: np.ndarray, phases: np.ndarray) -> dict:
    """times (repeats, ranks), phases (repeats, ranks, P) -> :func:`time_summary` of the
    max-over-ranks times and the slowest rank's comm_fraction."""
    step = times.max(axis=1)
    slowest = times.argmax(axis=1)
    ph = phases[np.arange(len(step)), slowest]                   # phases of the slowest rank
    out = time_summary(step)
    med = out["time_median_s"]
    comm = float(np.median(ph[:, PHASES.index("comm")]))
    return out | {"comm_fraction": comm / med if med > 0 else 0.0}
