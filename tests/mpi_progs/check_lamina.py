"""Run under ``mpiexec -n P``: Lamina decode (model ranks + head-split attention ranks, rotational
micro-batch pipeline) gives the same greedy tokens and logits as one process, for every valid
split of P ranks, 1 and several micro-batches, local and ring prefill, uniform and ragged prompts;
and the bytes each phase sent are exactly the spec's volumes.

usage: mpiexec -n P python -m mpi4py tests/mpi_progs/check_lamina.py BACKEND
"""

import sys

import torch
from mpi4py import MPI

from hpcattn import comm as comm_mod
from hpcattn.kernels import select_kernel
from hpcattn.model.lamina import MODEL, Layout, LaminaDecoder, reference_generate
from hpcattn.model.llama import ModelArgs
from hpcattn.model.weights import random_model

torch.set_grad_enabled(False)
world = MPI.COMM_WORLD
ctx = comm_mod.setup(world, device_kind="cpu", backend=sys.argv[1])
P, rank = ctx.size, ctx.rank
args = ModelArgs.from_preset("tiny")
B, n = 4, 5
g = torch.Generator().manual_seed(3)
tokens = torch.randint(0, args.vocab_size, (B, 36), generator=g)
# (attention ranks, micro-batches, prefill, ring layout, prompt lengths, dtype)
combos = [(1, 1, "ring", "zigzag", [12] * B, "float64"),
          (1, 2, "local", "zigzag", [12] * B, "float64"),
          (1, 3, "ring", "contiguous", [5, 9, 7, 13], "float64"),
          (2, 2, "ring", "zigzag", [12, 24, 12, 36], "float64"),
          (2, 4, "local", "zigzag", [7, 3, 11, 6], "float64"),
          (2, 1, "ring", "contiguous", [12] * B, "float32"),
          (1, 4, "local", "zigzag", [6, 10, 8, 9], "float32")]
models, refs, runs = {}, {}, 0
for A, m, prefill, layout, lengths, dt in combos:
    M = P - A
    if M < 1 or args.n_kv_heads % A:
        continue
    dtype = getattr(torch, dt)
    lay = Layout(P, A, args.n_heads, args.n_kv_heads, B, m)
    role_ctx = comm_mod.split(ctx, [0 if r < M else 1 for r in range(P)])
    model = models.setdefault(dt, random_model(args, 11, dtype, "cpu")) if lay.role(rank) == MODEL else None
    kern = select_kernel("torch_ref", "cpu", dtype, args.head_dim)
    dec = LaminaDecoder(lay, ctx, role_ctx, args, kern, dtype, model, prefill, layout)
    res = dec.generate(tokens if model is not None else None, lengths, n)
    name = f"A={A} M={M} m={m} {prefill}/{layout} lengths={lengths} {dt}"
    # exact payload volumes (sum over ranks): prompt KV once; per token per layer q + kv + out, and
    # the residual stream per slice hand-off when M > 1
    e = dtype.itemsize
    tot = {ph: world.allreduce(res.bytes[ph]) for ph in res.bytes}
    L, hd, tok_layers = args.n_layers, args.head_dim, B * (n - 1) * args.n_layers
    want = {"handover": 2 * L * args.n_kv_heads * hd * e * sum(lengths), "q": tok_layers * args.n_heads * hd * e,
            "kv": tok_layers * 2 * args.n_kv_heads * hd * e, "out": tok_layers * args.n_heads * hd * e,
            "migrate": tok_layers * args.dim * e if M > 1 else 0}
    assert tot == want, f"{name}: bytes {tot} != {want}"
    assert len(res.step_s) == n - 1 and all(x >= 0 for x in res.step_s + res.busy_s + res.wait_s), name
    assert sum(res.busy_s) > 0, f"{name}: rank {rank} ({res.role}) recorded no busy time"
    if rank == 0:
        key = (dt, tuple(lengths))
        if key not in refs:
            refs[key] = reference_generate(model, kern, tokens, lengths, n)
        rt, rl = refs[key]
        err = float((res.logits - rl).abs().max() / rl.abs().max())
        assert torch.equal(res.tokens, rt), f"{name}: tokens differ:\n{res.tokens}\n{rt}"
        tol = 1e-9 if dt == "float64" else 1e-4
        assert err < tol, f"{name}: logits rel err {err:.2e}"
        print(f"ok {name}: rel err {err:.1e}", flush=True)
    runs += 1
total = world.allreduce(runs)
comm_mod.teardown(ctx)
if rank == 0:
    print(f"check_lamina: {total // P} configurations matched one process on {P} ranks")
