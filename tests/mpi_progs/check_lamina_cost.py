"""Run under ``mpiexec -n 2`` (one model rank, one attention rank): measure MTIME, ATIME (each on
the rank that runs it) and the link (ping-pong through the comm layer), predict Lamina's decode
step time with the cost model for 1 and 2 micro-batches and colocated one-process decode, run all
three for real, and print one JSON line ``LAMINA_COST {...}`` with predicted and measured times.

Then the same with *paced* work: every model slice sleeps ALPHA s per sequence and every attention
item BETA s per sequence (inside hpcattn.model.lamina.finish_layer / fold_new_token, which the
measurements time too), so the costs dominate the machine's noise and the pipeline's overlap is
visible: one JSON line ``LAMINA_PACED {...}`` for 1, 2 and 4 micro-batches.

usage: mpiexec -n 2 python -m mpi4py tests/mpi_progs/check_lamina_cost.py
"""

import json

import numpy as np
import torch
from mpi4py import MPI

from hpcattn import comm as comm_mod
from hpcattn.jobs.lamina_cost import measure_atime, measure_link, measure_mtime
from hpcattn.model.lamina.cost import Measurements, link_from_pingpong, predict_colocated, predict_lamina
from hpcattn.kernels import select_kernel
from hpcattn.model.lamina import MODEL, Layout, LaminaDecoder
from hpcattn.model.llama import ModelArgs
from hpcattn.model.runner import ModelRunner
from hpcattn.model.weights import random_model

torch.set_grad_enabled(False)
world = MPI.COMM_WORLD
ctx = comm_mod.setup(world, device_kind="cpu", backend="mpi")
assert ctx.size == 2, "run on 2 ranks"
args = ModelArgs(vocab_size=1024, dim=256, n_layers=2, n_heads=8, n_kv_heads=8, head_dim=64, ffn_dim=768)
B, l, n, dtype = 8, 512, 8, torch.float32
kern = select_kernel("auto", "cpu", dtype, args.head_dim)
model = random_model(args, 1, dtype, "cpu")
role = "model" if ctx.rank == 0 else "attention"
batches = [B // 2, B]
mt = {b: measure_mtime(model, b, repeats=15, stat="min") for b in batches} if role == MODEL else None
at = [(b, x, measure_atime(kern, b, x, args.n_heads, args.n_kv_heads, args.head_dim, dtype, "cpu",
                           args.n_layers, repeats=15, stat="min")) for b in batches for x in (l // 2, l)] \
    if role != MODEL else None
mt, at = world.bcast(mt, root=0), world.bcast(at, root=1)
link = link_from_pingpong(measure_link(ctx, 1 - ctx.rank, [8, 1 << 16, 1 << 20]))
meas = Measurements(args.n_layers, args.dim, args.n_heads, args.n_kv_heads, args.head_dim, 4, 0, mt, at)

tokens = torch.randint(0, args.vocab_size, (B, l), generator=torch.Generator().manual_seed(0))
measured, predicted = {}, {}
for m in (1, 2):
    lay = Layout(2, 1, args.n_heads, args.n_kv_heads, B, m)
    role_ctx = comm_mod.split(ctx, [0, 1])
    dec = LaminaDecoder(lay, ctx, role_ctx, args, kern, dtype, model if lay.role(ctx.rank) == MODEL else None,
                        prefill="local")
    best = []
    for rep in range(2):
        ctx.barrier()
        res = dec.generate(tokens if ctx.rank == 0 else None, [l] * B, n, keep_logits=False)
        steps = np.max(np.asarray(world.allgather(res.step_s)), axis=0)     # max over ranks per step
        best.append(float(np.min(steps)))     # minima: the machine may be shared (CI, other jobs)
        busy = world.allgather(float(np.min(res.busy_s)))
        measured[f"lamina_m{m}_busy_model"], measured[f"lamina_m{m}_busy_attention"] = busy
    measured[f"lamina_m{m}"] = min(best)
    p = predict_lamina(meas, link, 1, 1, m, B, l)
    predicted[f"lamina_m{m}"] = p["step_s"]
    predicted[f"lamina_m{m}_no_overlap"] = m * (meas.mtime_at(B / m) + meas.atime_at(B / m, l)) + \
        args.n_layers * m * 2 * link.latency
ctx.barrier()
times = []                          # colocated: one-process local decode, on both ranks at once
for rep in range(3):                # (as the measurements ran: no rank spins in a barrier meanwhile)
    r = ModelRunner(model, None, kern, prefill="local", decode="local")
    r.prefill(tokens, n)
    tok = torch.zeros(B, dtype=torch.int64)
    ts = []
    for _ in range(n - 1):
        t0 = MPI.Wtime()
        tok = r.decode_step(tok).argmax(-1)
        ts.append(MPI.Wtime() - t0)
    times.append(float(np.min(ts)))
measured["local_1dev"] = min(world.allgather(min(times)))
predicted["local_1dev"] = predict_colocated(meas, link, 1, B, l, "local")["step_s"]
ctx.barrier()
if ctx.rank == 0:
    print("LAMINA_COST " + json.dumps({"measured": measured, "predicted": predicted,
                                        "link": {"bandwidth": link.bandwidth, "latency": link.latency},
                                        "mtime": mt, "atime": at}), flush=True)

# -- paced: sleeps proportional to the micro-batch ----------------------------------------------------
import time  # noqa: E402

import hpcattn.model.lamina as lamina_pkg  # noqa: E402
import hpcattn.model.lamina.decoder as lamina_mod  # noqa: E402

ALPHA, BETA = 8e-3, 4e-3
real_finish, real_fold = lamina_mod.finish_layer, lamina_mod.fold_new_token


def paced_finish(model_, layer, x, o):
    time.sleep(ALPHA * x.shape[0])
    return real_finish(model_, layer, x, o)


def paced_fold(q, kv, o, lse, scale, G):
    time.sleep(BETA * q.shape[0])
    return real_fold(q, kv, o, lse, scale, G)


lamina_mod.finish_layer, lamina_mod.fold_new_token = paced_finish, paced_fold
# the measurements (hpcattn.jobs.lamina_cost) take them from the package's face
lamina_pkg.finish_layer, lamina_pkg.fold_new_token = paced_finish, paced_fold
targs = ModelArgs.from_preset("tiny")
tmodel = random_model(targs, 2, dtype, "cpu")
tk = select_kernel("auto", "cpu", dtype, targs.head_dim)
PB, Pl, Pn = 4, 16, 6
pm = {b: measure_mtime(tmodel, b, repeats=5, stat="min") for b in (1, 2, 4)} if role == MODEL else None
pa = [(b, Pl, measure_atime(tk, b, Pl, targs.n_heads, targs.n_kv_heads, targs.head_dim, dtype, "cpu",
                            targs.n_layers, repeats=5, stat="min")) for b in (1, 2, 4)] if role != MODEL else None
pm, pa = world.bcast(pm, root=0), world.bcast(pa, root=1)
pmeas = Measurements(targs.n_layers, targs.dim, targs.n_heads, targs.n_kv_heads, targs.head_dim, 4, 0, pm, pa)
ptoks = torch.randint(0, targs.vocab_size, (PB, Pl), generator=torch.Generator().manual_seed(1))
paced = {"measured": {}, "predicted": {}, "no_overlap": {}}
for m in (1, 2, 4):
    lay = Layout(2, 1, targs.n_heads, targs.n_kv_heads, PB, m)
    dec = LaminaDecoder(lay, ctx, comm_mod.split(ctx, [0, 1]), targs, tk, dtype,
                        tmodel if lay.role(ctx.rank) == MODEL else None, prefill="local")
    ctx.barrier()
    res = dec.generate(ptoks if ctx.rank == 0 else None, [Pl] * PB, Pn, keep_logits=False)
    steps = np.max(np.asarray(world.allgather(res.step_s)), axis=0)[1:]     # step 0 holds the hand-over
    paced["measured"][m] = float(np.median(steps))
    paced["predicted"][m] = predict_lamina(pmeas, link, 1, 1, m, PB, Pl)["step_s"]
    paced["no_overlap"][m] = m * (pmeas.mtime_at(PB / m) + pmeas.atime_at(PB / m, Pl))
comm_mod.teardown(ctx)
if ctx.rank == 0:
    print("LAMINA_PACED " + json.dumps(paced), flush=True)
