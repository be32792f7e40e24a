"""The link Lamina's exchange sees between two ranks: ping-pong of ``Comm.isend`` / ``Comm.irecv``
(:func:`hpcattn.jobs.lamina_cost.measure_link`) through hpcattn's comm layer on the configured
transport, at the sizes of one layer's Lamina messages; the (latency, bandwidth) it implies is
what ``hpcattn lamina-cost`` and ``benchmarks/lamina_graphs_report.py`` take.

    mpirun -n 2 python benchmarks/lamina_link.py --backend mpi -o runs/link.json   # 2 ranks, one GPU each or shared
    mpirun -n 2 python benchmarks/lamina_link.py --backend mpi --gpu-aware-mpi true -o runs/link-device.json
                                                 # device buffers straight to a CUDA-aware MPI (mpi_device)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from mpi4py import MPI

    from hpcattn import comm as comm_mod
    from hpcattn.jobs.lamina_cost import measure_link
    from hpcattn.model.lamina.cost import link_from_pingpong
    from hpcattn.model.llama import ModelArgs

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="mpi", choices=("mpi", "nccl", "gloo"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="llama-3.1-8b", help="model shape whose per-layer messages are timed")
    p.add_argument("--batches", default="1,16", help="batches whose per-layer message sizes are timed")
    p.add_argument("--gpu-aware-mpi", default="auto", choices=("auto", "true", "false"),
                   help="comm.gpu_aware_mpi: whether MPI gets device buffers (true) or host-staged copies (false)")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("-o", "--output")
    args = p.parse_args(argv)
    ctx = comm_mod.setup(MPI.COMM_WORLD, device_kind=args.device, backend=args.backend,
                         gpu_aware_setting=args.gpu_aware_mpi)
    if ctx.size != 2:
        raise SystemExit("lamina_link.py: run it on exactly 2 ranks")
    a = ModelArgs.from_preset(args.preset)
    e = 2                                                            # bf16 messages
    G = a.n_heads // a.n_kv_heads
    per_seq = {"q": a.n_heads * a.head_dim * e, "kv": 2 * a.n_kv_heads * a.head_dim * e,
               "out": a.n_heads * a.head_dim * e}
    batches = [int(x) for x in args.batches.split(",")]
    sizes = sorted({8, 1 << 22} | {v * B for B in batches for v in per_seq.values()})
    times = measure_link(ctx, 1 - ctx.rank, sizes, args.repeats)
    link = link_from_pingpong(times)
    if ctx.rank == 0:
        out = {"transport": ctx.transport, "device": torch.cuda.get_device_name(ctx.device)
               if ctx.device.type == "cuda" else "cpu", "one_way_s": {str(k): v for k, v in times.items()},
               "latency": link.latency, "bandwidth": link.bandwidth, "group": G, "per_seq_bytes": per_seq}
        for n, t in sorted(times.items()):
            print(f"{n:>10d} B  one-way {t * 1e6:9.1f} us", flush=True)
        print(f"link ({ctx.transport}): latency {link.latency * 1e6:.1f} us, bandwidth {link.bandwidth / 1e9:.2f} GB/s")
        if args.output:
            Path(args.output).write_text(json.dumps(out, indent=1))
    comm_mod.teardown(ctx)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
