"""The model runner's KV cache: this rank's shard of every layer's post-RoPE keys and values.

Used by the model runner (:mod:`hpcattn.model.runner`), the approximate prefills that fill it
(:mod:`hpcattn.model.approx_prefill`) and Lamina's attention ranks.
"""

from __future__ import annotations

import torch


class ShardedKVCache:
    """This rank's post-RoPE K and V for every layer, head-major: buf (L, 2, B, Hkv, cap, d).

    ``length`` tokens are valid (the same count in every layer).
    """

    def __init__(self, n_layers: int, B: int, n_kv: int, d: int, capacity: int, dtype, device):
        self.buf = torch.empty(n_layers, 2, B, n_kv, capacity, d, dtype=dtype, device=device)
        self.length = 0
        self.capacity = capacity

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, at: int) -> None:
        """Store k, v (B, n, Hkv, d) at token slots [at, at + n)."""
        n = k.shape[1]
        if at + n > self.capacity:
            raise RuntimeError(f"KV cache overflow: {at + n} > capacity {self.capacity}")
        self.buf[layer, 0, :, :, at:at + n] = k.transpose(1, 2)
        self.buf[layer, 1, :, :, at:at + n] = v.transpose(1, 2)

    def view(self, layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n tokens as (B, n, Hkv, d) views (no copy)."""
        return self.buf[layer, 0, :, :, :n].transpose(1, 2), self.buf[layer, 1, :, :, :n].transpose(1, 2)

    @property
    def nbytes(self) -> int:
        return self.buf.numel() * self.buf.element_size()
