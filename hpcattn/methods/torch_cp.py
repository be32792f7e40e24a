"""PyTorch's own ring attention as a benchmark peer: ``torch.distributed.tensor.experimental.context_parallel``.

The peer runs exactly as PyTorch documents it: the full ``(B, H, N, d)`` q, k, v are sharded by
``context_parallel`` (head-tail load balancing, which is hpcattn's zigzag layout: rank r holds
chunks r and 2p-1-r), and ``F.scaled_dot_product_attention`` called inside the context becomes
PyTorch's ring (``_templated_ring_attention`` over the chosen SDPA backend). Sharding happens once
at set-up; each timed call re-enters the context with an N-byte dummy buffer (PyTorch's causal load
balancing is switched on by the context; entering costs a clone of N bytes, a few µs on a GPU).

Differences from hpcattn's ring, stated so that the ratio is read correctly:

* GQA: K/V are expanded to Hq heads at set-up (outside the timed call) unless
  ``torch_cp.native_gqa`` asks SDPA for ``enable_gqa`` - PyTorch's ring then moves Hq/Hkv times
  hpcattn's bytes per step (hidden behind compute on NVLink at 128K);
* SDPA returns no LSE, so the peer's check compares outputs only.

PyTorch has no CPU sharding rule for SDPA, so the peer runs on GPUs only (NCCL process group,
initialised from MPI when the run's transport is ``mpi``).
"""

from __future__ import annotations

import torch

from hpcattn.comm import CommContext
from hpcattn.timing import NullTimer

class TorchContextParallel:
    """PyTorch's ring over this run's ranks.

    Args:
        q: (B, N, Hq, d); k, v: (B, N, Hkv, d) - the whole sequence, identical on every rank.
        ctx: the run's comm context (its world must span the ranks of the torch.distributed group).
        scale: softmax scale; causal: causal (True) or full attention.
        sdpa: SDPA backend inside the ring (``cudnn``, ``flash`` or ``efficient``).
        native_gqa: pass ``enable_gqa=True`` instead of expanding K/V to Hq heads.
    Attributes:
        index: (t,) global rows this rank owns, in the order of the output (hpcattn's zigzag).
    Call: ``peer(tm)`` -> out (B, t, Hq, d) in q.dtype.
    """

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: CommContext, *,
                 scale: float, causal: bool = True, sdpa: str = "cudnn", native_gqa: bool = False):
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel
        from torch.nn.attention import SDPBackend

        if not dist.is_initialized():
            from hpcattn.comm.torchdist import init_process_group

            init_process_group(ctx.world.mpi, "nccl" if q.is_cuda else "gloo", q.device if q.is_cuda else None)
        p = ctx.world.size
        if dist.get_world_size() != p:
            raise RuntimeError(f"torch_cp: the torch.distributed world has {dist.get_world_size()} ranks, "
                               f"the run {p}")
        self._cp = context_parallel
        self.mesh = init_device_mesh(q.device.type, (p,))
        self.backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                        "efficient": SDPBackend.EFFICIENT_ATTENTION}[sdpa]
        self.scale, self.causal, self.native_gqa = scale, causal, native_gqa
        B, N, Hq, d = q.shape
        group = Hq // k.shape[2]
        self.n = N
        # (B, H, N, d) copies - context_parallel shards (and resizes) its buffers in place
        self.q = q.transpose(1, 2).contiguous()
        if native_gqa or group == 1:
            self.k, self.v = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
        else:
            self.k = k.transpose(1, 2).repeat_interleave(group, dim=1).contiguous()
            self.v = v.transpose(1, 2).repeat_interleave(group, dim=1).contiguous()
        pos = torch.arange(N, device=q.device).view(1, 1, N)
        bufs = [self.q, self.k, self.v, pos]
        with context_parallel(self.mesh, buffers=bufs, buffer_seq_dims=[2] * 4, no_restore_buffers=set(bufs)):
            pass
        self.index = pos.flatten().cpu()

    def __call__(self, tm=NullTimer()) -> torch.Tensor:
        import torch.nn.functional as F
        from torch.nn.attention import sdpa_kernel

        dummy = torch.empty(1, 1, self.n, dtype=torch.uint8, device=self.q.device)
        kw = {"enable_gqa": True} if self.native_gqa else {}
        with tm("compute"), sdpa_kernel([self.backend]), \
                self._cp(self.mesh, buffers=[dummy], buffer_seq_dims=[2], no_restore_buffers={dummy}):
            out = F.scaled_dot_product_attention(self.q, self.k, self.v, is_causal=self.causal,
                                                 scale=self.scale, **kw)
        return out.transpose(1, 2)
