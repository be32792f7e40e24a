"""Run under ``mpiexec -n P``: Star and APB prefill inside the model runner. Settings that make them
exact must reproduce one process (tokens identical, logits 1e-9): APB without an anchor passing
whole blocks (every P), Star with anchor = block (P = 2). Approximate settings must run and stay
finite, with every rank agreeing on the tokens.
"""

import torch
from mpi4py import MPI

from hpcattn import comm as comm_mod
from hpcattn.kernels import select_kernel
from hpcattn.methods.apb import APBParams
from hpcattn.model.llama import ModelArgs
from hpcattn.model.runner import ModelRunner
from hpcattn.model.weights import random_model

torch.set_grad_enabled(False)
world = MPI.COMM_WORLD
ctx = comm_mod.setup(world, device_kind="cpu", backend="mpi")
p = ctx.size
model = random_model(ModelArgs.from_preset("tiny"), 5, torch.float64, "cpu")
kern = select_kernel("torch_ref", "cpu", torch.float64, 8)
ql, lb = 4, 16
tokens = torch.randint(0, 256, (2, lb * p + ql), generator=torch.Generator().manual_seed(2))
ref_t, ref_l = ModelRunner(model, None, kern, prefill="local", decode="local").generate(tokens, 5)


def run(**kw):
    return ModelRunner(model, ctx, kern, decode=kw.pop("decode", "tree"), query_len=ql, **kw).generate(tokens, 5)


exact = [dict(prefill="apb", apb=APBParams(la=0, lp=lb)),
         dict(prefill="apb", apb=APBParams(la=0, lp=lb), decode="ring")]
if p == 2:
    exact.append(dict(prefill="star"))
for kw in exact:
    name = str(kw)
    t, l = run(**kw)
    assert torch.equal(t, ref_t), f"{name}: tokens differ"
    assert float((l - ref_l).abs().max()) < 1e-9, f"{name}: logits differ"
for kw in [dict(prefill="star", star_anchor=4), dict(prefill="star", star_block=8, star_anchor=8),
           dict(prefill="apb", apb=APBParams(la=8, lp=4, query_offset=1)),
           dict(prefill="apb", apb=APBParams(la=8, lp=4, query_in_anchor=False), compressor="random")]:
    t, l = run(**kw)
    assert torch.isfinite(l).all(), f"{kw}: non-finite logits"
    assert all(torch.equal(t, x) for x in world.allgather(t)), f"{kw}: ranks disagree on tokens"
comm_mod.teardown(ctx)
if ctx.rank == 0:
    print(f"check_generate_approx: passed on {p} ranks")
