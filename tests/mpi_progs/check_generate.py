"""Run under ``mpiexec -n P``: distributed prefill + decode of the tiny model in float64 produce
the same greedy tokens and logits (1e-9) as one process, for every method combination, and the
prompt logits gathered to rank 0 (every position, token order) equal the one-process ones.

usage: mpiexec -n P python -m mpi4py tests/mpi_progs/check_generate.py BACKEND
"""

import sys

import torch
from mpi4py import MPI

from hpcattn import comm as comm_mod
from hpcattn.kernels import select_kernel
from hpcattn.model.llama import ModelArgs
from hpcattn.model.runner import ModelRunner
from hpcattn.model.weights import random_model

torch.set_grad_enabled(False)
world = MPI.COMM_WORLD
ctx = comm_mod.setup(world, device_kind="cpu", backend=sys.argv[1], ranks_per_node=2)
p = ctx.size
model = random_model(ModelArgs.from_preset("tiny"), 5, torch.float64, "cpu")
kern = select_kernel("torch_ref", "cpu", torch.float64, model.args.head_dim)
N = 8 * p * 3
tokens = torch.randint(0, 256, (2, N), generator=torch.Generator().manual_seed(2))
ref = ModelRunner(model, None, kern, prefill="local", decode="local", prompt_logits=True)
ref_t, ref_l = ref.generate(tokens, 6)
ref_prompt = ref.gather_prompt_logits()                          # (B, N, vocab)
combos = [("ring", "tree", "zigzag", "allgather", "flat", "last"),
          ("ring", "tree", "contiguous", "allreduce", "hierarchical", "round_robin"),
          ("ring", "ring", "zigzag", "allgather", "flat", "round_robin"),
          ("local", "tree", "zigzag", "allreduce", "flat", "last"),
          ("local", "local", "zigzag", "allgather", "flat", "last")]
n = 0
for prefill, decode, layout, red, topo, place in combos:
    r = ModelRunner(model, ctx, kern, prefill=prefill, decode=decode, layout=layout, reduction=red,
                    topology=topo, placement=place, prompt_logits=True)
    toks, logits = r.generate(tokens, 6)
    prompt = r.gather_prompt_logits()
    err = float((logits - ref_l).abs().max())
    name = f"{prefill}+{decode} {layout} {red}/{topo} kv-{place}"
    assert torch.equal(toks, ref_t), f"{name}: tokens differ on rank {ctx.rank}"
    assert err < 1e-9, f"{name}: logits err {err:.2e} on rank {ctx.rank}"
    if ctx.rank == 0:
        err = float((prompt - ref_prompt).abs().max())
        assert prompt.shape == ref_prompt.shape and err < 1e-9, f"{name}: prompt logits err {err:.2e}"
    else:
        assert prompt is None, f"{name}: prompt logits on rank {ctx.rank}"
    n += 1
total = world.allreduce(n)
comm_mod.teardown(ctx)
if ctx.rank == 0:
    print(f"check_generate: {total} runs matched one process on {p} ranks")
