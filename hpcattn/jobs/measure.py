"""Measurement of a case on every rank: the timed loop every job runs its repetitions in
(:func:`timed_repeats`; an attention-level case's timing inside it: :func:`time_case`), the summary
of a case's times (:func:`time_summary`; over ranks and phases: :func:`summarize`) and a rank's
peak memory (:func:`peak_memory`). One-process micro-timings (the projections, Lamina's cost
measurements) use :func:`hpcattn.timing.timed_runs`."""

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


def timed_repeats(ctx, warmup: int, repeats: int, run, solo: bool = False) -> list:
    """The timed loop of a case (collective): ``run(i)`` is called ``warmup + repeats`` times, each
    after a barrier of every rank (``solo``: one rank computes, the others wait asleep,
    :meth:`CommContext.idle_barrier`); returns what the last ``repeats`` calls returned (the
    warm-up's are dropped). ``run`` times itself and returns its figures."""
    out = []
    for i in range(warmup + repeats):
        ctx.idle_barrier() if solo else ctx.barrier()
        got = run(i)
        if i >= warmup:
            out.append(got)
    return out


def time_case(fn, ctx, warmup: int, repeats: int, solo: bool = False):
    """Run ``fn(tm)`` warmup + repeats times (:func:`timed_repeats`), each timed by CUDA events
    (GPU) or perf_counter (CPU), its phases by ``tm``. Returns (last result, times (repeats,),
    phases (repeats, len(PHASES)), bytes per step {phase: bytes})."""
    timer = PhaseTimer(ctx.device, ctx.counters)
    ctx.counters.reset()
    last = [None]
    cuda = ctx.device.type == "cuda"

    def one(i):
        last[0] = None                       # the previous result is freed before the next run
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            last[0] = fn(timer)
            b.record()
            b.synchronize()
            dt = a.elapsed_time(b) / 1e3
        else:
            t0 = time.perf_counter()
            last[0] = fn(timer)
            dt = time.perf_counter() - t0
        ph = timer.collect()
        return dt, [ph.get(x, 0.0) for x in PHASES]

    runs = timed_repeats(ctx, warmup, repeats, one, solo)
    n = warmup + repeats
    per_step = {x: ctx.counters.bytes.get(x, 0) // n for x in PHASES}
    return (last[0], np.asarray([dt for dt, _ in runs]),
            np.asarray([ph for _, ph in runs]).reshape(repeats, len(PHASES)), per_step)


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
