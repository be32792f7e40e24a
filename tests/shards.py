"""Test helpers: a rank's shard of full tensors, as the decode job lays it out."""

from __future__ import annotations

import torch

from hpcattn.methods.sharding import contiguous_bounds, shard_lengths


def ragged_kv_shard(K: torch.Tensor, V: torch.Tensor, lengths: list[int], p: int, r: int):
    """Rank ``r`` of ``p``'s contiguous shard of the ragged KV K, V (B, N, Hkv, d) whose sequence i
    has ``lengths[i]`` keys: (k, v) (B, width, Hkv, d), sequence i's shard at its start and zeros
    after, and the shard lengths (what ``tree_decode`` takes as ``k_lengths``)."""
    bounds = [contiguous_bounds(n, p, r) for n in lengths]
    width = max(b - a for a, b in bounds)
    k = K.new_zeros(K.shape[0], width, *K.shape[2:])
    v = torch.zeros_like(k)
    for i, (a, b) in enumerate(bounds):
        k[i, : b - a], v[i, : b - a] = K[i, a:b], V[i, a:b]
    return k, v, shard_lengths(lengths, p, r)
