"""Run under ``mpiexec -n 2`` on a machine with a GPU (both ranks may share it): Lamina with each
role's pieces captured (``cuda_graphs="true"``) against the eager path, over the ``mpi`` backend
(host-staged unless the MPI is CUDA-aware): float32 tokens identical, logits close, the record's
modes say graph / eager on both roles, a second generation replays the pieces; bf16 runs too.

usage: mpiexec -n 2 python -m mpi4py tests/mpi_progs/check_lamina_gpu.py
"""

import torch
from mpi4py import MPI

from hpcattn import comm as comm_mod
from hpcattn.kernels import select_kernel
from hpcattn.model.lamina import MODEL, Layout, LaminaDecoder, reference_generate
from hpcattn.model.llama import ModelArgs
from hpcattn.model.weights import random_model

torch.set_grad_enabled(False)
world = MPI.COMM_WORLD
ctx = comm_mod.setup(world, device_kind="cuda", backend="mpi")
assert ctx.size == 2
args = ModelArgs(vocab_size=2000, dim=512, n_layers=3, n_heads=8, n_kv_heads=2, head_dim=64, ffn_dim=1024)
B, n = 3, 6
tokens = torch.randint(0, args.vocab_size, (B, 600), generator=torch.Generator().manual_seed(3)).cuda()
mine = ctx.rank == 0
role_ctx = comm_mod.split(ctx, [0, 1])
for dt, lengths, m in (("float32", [600, 257, 411], 1), ("float32", [512] * B, 2), ("bfloat16", [600, 257, 411], 2)):
    dtype = getattr(torch, dt)
    lay = Layout(2, 1, args.n_heads, args.n_kv_heads, B, m)
    model = random_model(args, 7, dtype, "cuda") if mine else None
    kern = select_kernel("auto", ctx.device, dtype, args.head_dim)
    got = {}
    for mode in ("false", "true"):
        dec = LaminaDecoder(lay, ctx, role_ctx, args, kern, dtype, model, "local", "zigzag", cuda_graphs=mode)
        assert dec.graph_attrs()["cuda_graphs"] == ("graph" if mode == "true" else "eager"), dec.graph_attrs()
        for rep in range(2):                      # the second generation replays the first one's pieces
            res = dec.generate(tokens if mine else None, lengths, n)
            if mine:
                got.setdefault(mode, []).append((res.tokens, res.logits))
            print(f"rank {ctx.rank} {dt} m={m} cuda_graphs={mode} generation {rep}: step ms "
                  f"{[round(x * 1e3, 2) for x in res.step_s]} busy ms {[round(x * 1e3, 2) for x in res.busy_s]} "
                  f"pieces ms {[round(x * 1e3, 2) for x in res.piece_s]}",
                  flush=True)
    if mine:
        (te, le), (tg, lg) = got["false"][0], got["true"][1]
        assert torch.equal(got["true"][0][0], tg), "a replayed generation differs from the capturing one"
        err = float((le - lg).abs().max() / le.abs().max())
        if dt == "float32":
            assert torch.equal(te, tg), f"{dt} m={m}: tokens differ eager vs graph:\n{te}\n{tg}"
            rt, rl = reference_generate(model, kern, tokens, lengths, n)
            assert torch.equal(tg.cpu(), rt.cpu()), f"{dt} m={m}: graph tokens differ from one process"
            assert err < 1e-4, f"{dt} m={m}: logits rel err graph vs eager {err:.2e}"
        else:                                   # bf16: the first decode step's logits (later ones follow the tokens)
            err = float((le[1] - lg[1]).abs().max() / le[1].abs().max())
            assert torch.equal(te[:, 0], tg[:, 0]) and err < 5e-2, f"{dt} m={m}: step-1 rel err {err:.2e}"
        print(f"ok {dt} lengths={lengths} m={m}: graph vs eager logits rel err {err:.1e}", flush=True)
comm_mod.teardown(ctx)
if ctx.rank == 0:
    print("check_lamina_gpu: ok", flush=True)
