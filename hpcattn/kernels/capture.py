"""Whether a CUDA graph is being built: the one piece of graph state the kernels read.

:class:`hpcattn.graph.StepGraph` holds :func:`building_graph` open while it warms up and captures a
decode step; kernels that choose per call between an eager-friendly and a graph-friendly kernel
(``auto``'s decode route, :func:`hpcattn.kernels._decode_kernel`) ask :func:`building`. The graph
layer imports this module; the kernels never import the graph layer.
"""

from __future__ import annotations

import contextlib

_BUILDING = [0]     # > 0 while a StepGraph warms up or captures (kernel choice: see building())


def building() -> bool:
    """True while a :class:`StepGraph` runs its warm-up or its capture: kernels that choose per
    call between an eager-friendly and a graph-friendly kernel (``auto``'s decode route) take the
    graph one, so the warm-up compiles and runs what the capture records."""
    return _BUILDING[0] > 0


@contextlib.contextmanager
def building_graph():
    """Inside the block, :func:`building` is True (blocks nest)."""
    _BUILDING[0] += 1
    try:
        yield
    finally:
        _BUILDING[0] -= 1
