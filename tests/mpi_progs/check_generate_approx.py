"""Run under ``mpiexec -n P``: Star and APB prefill inside the model runner. Settings that make them
exact must reproduce one process (tokens identical, logits 1e-9, also the prompt logits of every
position gathered to rank 0): APB without an anchor passing whole blocks (every P), Star with
anchor = block (P = 2). Approximate settings must run and stay finite, with every rank agreeing on
the tokens, and gather finite prompt logits of every position (exact on rank 0's first block, and
at the last position equal to the prefill's logits).
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
ref = ModelRunner(model, None, kern, prefill="local", decode="local", prompt_logits=True)
ref_t, ref_l = ref.generate(tokens, 5)
ref_prompt = ref.gather_prompt_logits()                          # (B, N, vocab)


def run(**kw):
    """(tokens, logits, prompt logits: rank 0 (B, N, vocab), other ranks None)."""
    r = ModelRunner(model, ctx, kern, decode=kw.pop("decode", "tree"), query_len=ql, prompt_logits=True, **kw)
    t, l = r.generate(tokens, 5)
    prompt = r.gather_prompt_logits()
    assert (prompt is None) == (ctx.rank != 0) and (prompt is None or prompt.shape == ref_prompt.shape), kw
    return t, l, prompt


exact = [dict(prefill="apb", apb=APBParams(la=0, lp=lb)),
         dict(prefill="apb", apb=APBParams(la=0, lp=lb), decode="ring")]
if p == 2:
    exact.append(dict(prefill="star"))
for kw in exact:
    name = str(kw)
    t, l, prompt = run(**kw)
    assert torch.equal(t, ref_t), f"{name}: tokens differ"
    assert float((l - ref_l).abs().max()) < 1e-9, f"{name}: logits differ"
    assert prompt is None or float((prompt - ref_prompt).abs().max()) < 1e-9, f"{name}: prompt logits differ"
for kw in [dict(prefill="star", star_anchor=4), dict(prefill="star", star_block=8, star_anchor=8),
           dict(prefill="apb", apb=APBParams(la=8, lp=4, query_offset=1)),
           dict(prefill="apb", apb=APBParams(la=8, lp=4, query_in_anchor=False), compressor="random")]:
    t, l, prompt = run(**kw)
    assert torch.isfinite(l).all() and (prompt is None or torch.isfinite(prompt).all()), f"{kw}: non-finite logits"
    if prompt is not None:      # the first 8 positions are rank 0's plain causal block (exact in every setting)
        assert float((prompt[:, :8] - ref_prompt[:, :8]).abs().max()) < 1e-9, f"{kw}: first block's prompt logits"
        assert float((prompt[:, -1] - l[0]).abs().max()) < 1e-9, f"{kw}: last prompt position != prefill logits"
    assert all(torch.equal(t, x) for x in world.allgather(t)), f"{kw}: ranks disagree on tokens"
comm_mod.teardown(ctx)
if ctx.rank == 0:
    print(f"check_generate_approx: passed on {p} ranks")
