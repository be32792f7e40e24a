"""CUDA-graph capture of decode steps (option ``run.cuda_graphs: auto | true | false``).

A decode step is a few hundred small kernels on an otherwise idle GPU, so its host launch cost
can exceed the time the GPU needs to read the weights and the KV cache. Captured once into a
CUDA graph over static buffers and replayed every step, it costs one launch.

* ``auto``: capture where the path is capturable (CUDA device; no host-staged MPI collective in
  the step; not ring decode, whose rotation stays eager; Lamina over any transport), run eagerly
  elsewhere, CPU included;
* ``true``: the same paths, and a config error where a case cannot be captured;
* ``false``: always eager (exactly the code paths of a run without this option).

Users: the attention-level decode job (:mod:`hpcattn.jobs.decode`: methods ``local`` and ``tree``),
the model runner's decode step (:mod:`hpcattn.model.runner`) and Lamina decode
(:mod:`hpcattn.model.lamina`: each role's work between two exchanges, per layer and micro-batch,
over any transport, since the exchanges stay outside the graphs). Each record says which mode ran
and why (``cuda_graphs``, ``cuda_graphs_reason``). Graphs hold static tensors: a replay reads the
inputs captured by address and overwrites the same outputs; per-phase CUDA-event timers cannot
run inside a graph, so graph cases record the whole step only (phases 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hpcattn import kernels
from hpcattn.errors import ConfigError, HpcattnError
from hpcattn.kernels.capture import building_graph

MODES = ("auto", "true", "false")


@dataclass(frozen=True)
class Capture:
    """What a decode method says about capturing its step (its module's ``CUDA_GRAPHS``).

    eager: why its step always runs eagerly (None: it can be captured);
    comm_inside: its communication is captured with the step (then the collectives must be device
        collectives, NCCL, and the rank writing the new KV the same every step); False: its
        exchanges stay outside the graphs (Lamina), so any transport and placement works.
    """

    eager: str | None = None
    comm_inside: bool = True


CAPTURE: dict[str, Capture] = {}
"""Decode method name -> its :class:`Capture`, filled by the methods' modules as they are imported
(``local``, ``tree``, ``ring``: :mod:`hpcattn.methods`; ``lamina``: :mod:`hpcattn.model.lamina`)."""


def declare(method: str, capture: Capture) -> Capture:
    """Register decode method ``method``'s :class:`Capture` (once, at its module's import) and return it."""
    CAPTURE[method] = capture
    return capture


def blocker(*, device: str, method: str, backend: str, world_size: int,
            placement: str = "last") -> str | None:
    """Why a decode step of ``method`` cannot be captured here (None: it can), from the method's
    declared :class:`Capture` (:data:`CAPTURE`; a method that declares none has no captured step).

    ``device`` is ``cuda`` or ``cpu``; ``backend`` the resolved comm backend (``nccl``, ``mpi``,
    ``gloo``); ``placement`` the generate job's KV placement (round-robin changes the writing rank
    every step, so one graph cannot serve every step)."""
    if device != "cuda":
        return "CUDA graphs need a CUDA device (CPU ranks run eagerly)"
    capture = CAPTURE.get(method)
    if capture is None:
        return f"method {method} has no captured decode step"
    if capture.eager is not None or not capture.comm_inside:
        return capture.eager
    if world_size > 1 and backend != "nccl":
        return f"comm.backend={backend}: host-staged MPI collectives cannot be captured (eager)"
    if world_size > 1 and placement != "last":
        return "generate.kv_placement=round_robin changes the writing rank every step (eager)"
    return None


def lean_for_graphs(device: torch.device, dtype: torch.dtype, head_dim: int):
    """(the Lean kernel, None), or (None, why not): captured decode steps need it (it reads the
    cache length from the device, so one graph serves every step)."""
    try:
        return kernels.select_kernel("lean", device, dtype, head_dim), None
    except HpcattnError as e:
        return None, f"the Lean kernel (device lengths) is not usable here: {e}"


def decide(option: str, reason: str | None, where: str = "run.cuda_graphs") -> tuple[bool, str]:
    """(capture?, why) for ``option`` given :func:`blocker`'s ``reason``. ``true`` with a blocker
    raises ConfigError naming the key."""
    if option not in MODES:
        raise ConfigError(f"{where}: expected one of {', '.join(MODES)}, got {option!r}")
    if option == "false":
        return False, "run.cuda_graphs=false"
    if reason is None:
        return True, "captured once per shape, replayed every step"
    if option == "true":
        raise ConfigError(f"{where}=true: {reason}; use auto (graphs where possible) or false")
    return False, reason


class StepGraph:
    """``fn()`` captured into one CUDA graph; calling the object replays it.

    Args:
        fn: a zero-argument callable whose tensors are all static (same addresses every call);
            returns a tensor or a tuple of tensors (the graph's static outputs).
        warmup: eager calls on a side stream before capture (lazy init: cuBLAS handles, Triton
            compilation, NCCL communicators). They run for real: ``fn`` must be idempotent or
            the caller must undo its effects (see the model runner).
        counters: the comm byte counters (:class:`hpcattn.comm.base.Counters`); the bytes a
            captured step hands to collectives are counted again on every replay.
    """

    def __init__(self, fn, *, warmup: int = 2, counters=None):
        self.counters = counters
        with building_graph():
            self._build(fn, warmup, counters)

    def _build(self, fn, warmup, counters):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        before = _snapshot(counters)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):  # NCCL watchdog threads
            self.out = fn()
        after = _snapshot(counters)
        self.delta = {k: (after[k][0] - before.get(k, (0, 0))[0], after[k][1] - before.get(k, (0, 0))[1])
                      for k in after}

    def __call__(self):
        self.graph.replay()
        if self.counters is not None:
            for phase, (nbytes, calls) in self.delta.items():
                self.counters.bytes[phase] += nbytes
                self.counters.calls[phase] += calls
        return self.out


def _snapshot(counters) -> dict:
    if counters is None:
        return {}
    return {k: (counters.bytes.get(k, 0), counters.calls.get(k, 0))
            for k in set(counters.bytes) | set(counters.calls)}
