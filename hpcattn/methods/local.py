"""The single-device baseline: the whole problem on one rank with the local kernel."""

from __future__ import annotations

import torch

from hpcattn import graph
from hpcattn.kernels import Kernel
from hpcattn.timing import NullTimer

# a CUDA graph captures the whole step (hpcattn.graph.Capture)
CUDA_GRAPHS = graph.declare("local", graph.Capture())


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kernel: Kernel, scale: float,
                    causal: str = "none", k_lengths: list[int] | None = None, tm=NullTimer()):
    """Attention state of the full problem on this rank.

    q (B, Sq, Hq, d); k, v (B, Sk, Hkv, d) -> out (B, Sq, Hq, d) q.dtype, lse (B, Hq, Sq) fp32.
    """
    with tm("compute"):
        return kernel(q, k, v, scale=scale, causal=causal, k_lengths=k_lengths)
