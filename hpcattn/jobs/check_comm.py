"""``hpcattn check-comm``: what the transport is and how fast hpcattn's collectives are on it.

Launch it as its own MPI job (``mpirun -n 2 hpcattn check-comm``). Rank 0 prints the MPI library,
the CUDA-awareness probe and its decision, then an OSU-style table: for each message size, the
median latency (max over ranks) of allreduce, allgather and a ring sendrecv through hpcattn's
comm layer - the calls tree decode and ring prefill make.
"""

from __future__ import annotations

import time

import numpy as np
import torch

SIZES = [1 << k for k in range(10, 27, 2)]      # 1 KiB .. 64 MiB


def _time(ctx, fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(repeats):
        ctx.barrier()
        t0 = time.perf_counter()
        fn()
        ctx.sync()
        ts.append(time.perf_counter() - t0)
    ts = np.max(np.asarray(ctx.world.mpi.allgather(ts)), axis=0)       # max over ranks per repeat
    return float(np.median(ts))


def check_comm(args) -> int:
    from mpi4py import MPI

    from hpcattn import comm as comm_mod
    from hpcattn.comm import gpu_aware

    world = MPI.COMM_WORLD
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    ctx = comm_mod.setup(world, device_kind=device, backend=args.backend, gpu_aware_setting=args.gpu_aware_mpi)
    if ctx.rank == 0:
        print(f"MPI library : {MPI.Get_library_version().strip().splitlines()[0]}")
        print(f"probe       : {gpu_aware.probe(world)}  -> gpu-aware MPI used: {ctx.gpu_aware} ({ctx.gpu_aware_method})")
        print(f"ranks       : {ctx.size} on {len(ctx.node_ranks)} node(s); device {ctx.device}; "
              f"transport {ctx.transport}")
        print(f"{'bytes':>10} {'allreduce_us':>13} {'allgather_us':>13} {'sendrecv_us':>12} {'sendrecv_GB/s':>14}")
    p, r = ctx.size, ctx.rank
    for nbytes in SIZES:
        n = max(1, nbytes // 4)
        a = torch.ones(n, dtype=torch.float32, device=ctx.device)
        s, rv = torch.ones_like(a), torch.empty_like(a)
        t_ar = _time(ctx, lambda: ctx.world.allreduce(a, "sum"), args.repeats)
        t_ag = _time(ctx, lambda: ctx.world.allgather(a), args.repeats)
        t_sr = _time(ctx, lambda: ctx.world.sendrecv_start(s, (r + 1) % p, rv, (r - 1) % p).wait(),
                     args.repeats) if p > 1 else float("nan")
        if ctx.rank == 0:
            print(f"{nbytes:>10} {t_ar * 1e6:>13.1f} {t_ag * 1e6:>13.1f} {t_sr * 1e6:>12.1f} "
                  f"{nbytes / t_sr / 1e9 if p > 1 else float('nan'):>14.2f}")
    comm_mod.teardown(ctx)
    return 0
