"""Run under ``mpiexec -n P`` (P = 2 or 3): Lamina's graph mode, run eagerly on CPU ranks, gives
the same greedy tokens as one process and logits within the fused forward's rounding, for 1 and
several micro-batches, ragged prompts, one and several model / attention ranks, and with the two
roles in different modes (graph model ranks with eager attention ranks and the reverse: the
messages are the same).

CUDA graphs cannot run on CPU, so the test stands in for them: ``hpcattn.graph.StepGraph`` is
replaced by an object that runs the function ``warmup`` times at "capture" (as the real warm-up
does: the decoder must undo what they change) and re-runs it at every "replay"; the fused forward's
Triton kernels and Lean run in Triton's CPU interpreter; ``graph.blocker`` and
``graph.lean_for_graphs`` are told that this CPU rank can capture.

BACKEND ``mpi-staged``: the mpi backend told that every tensor but its own staging buffers is device
data (``is_device``), so that every message of the pieces' static buffers is staged through the
bounded pinned pool as on a GPU without CUDA-aware MPI.

usage: mpiexec -n P python -m mpi4py tests/mpi_progs/check_lamina_graphs.py BACKEND [COMBOS]
(COMBOS: comma list of indices into ``combos``, default all)
"""

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"          # before triton is imported

import torch  # noqa: E402
from mpi4py import MPI  # noqa: E402

from hpcattn import comm as comm_mod  # noqa: E402
from hpcattn import graph  # noqa: E402
from hpcattn.kernels import Kernel, select_kernel  # noqa: E402
from hpcattn.model.lamina import MODEL, Layout, LaminaDecoder, reference_generate  # noqa: E402
from hpcattn.model.llama import ModelArgs  # noqa: E402
from hpcattn.model.weights import random_model  # noqa: E402


class Replayed:
    """hpcattn.graph.StepGraph on CPU: ``warmup`` real calls at capture, a real call per replay."""

    built = 0

    def __init__(self, fn, *, warmup: int = 2, counters=None):
        self.fn = fn
        for _ in range(warmup):
            self.out = fn()
        Replayed.built += 1

    def __call__(self):
        self.out = self.fn()
        return self.out


graph.StepGraph = Replayed
graph.blocker = lambda **kw: None
graph.lean_for_graphs = lambda device, dtype, head_dim: ((None, "Lean has no float64") if dtype == torch.float64
                                                         else (Kernel("lean"), None))

torch.set_grad_enabled(False)
world = MPI.COMM_WORLD
staged = sys.argv[1] == "mpi-staged"
ctx = comm_mod.setup(world, device_kind="cpu", backend="mpi" if staged else sys.argv[1])
if staged:       # "device" = not a staging buffer of the pool (tests/test_staging.py's fake)
    def is_device(t):
        ptr = t.untyped_storage().data_ptr()
        return all(ptr != b.data.untyped_storage().data_ptr() for b in ctx.world._pool.values())

    ctx.world.is_device = is_device
P, rank = ctx.size, ctx.rank
args = ModelArgs.from_preset("tiny")
B, n = 4, 3
g = torch.Generator().manual_seed(3)
tokens = torch.randint(0, args.vocab_size, (B, 24), generator=g)
# (attention ranks, micro-batches, prefill, prompt lengths, dtype, model mode, attention mode); "auto"
# captures as "true" does where the rank can (here: not the attention role in float64, Lean's dtypes)
combos = [(1, 1, "local", [12] * B, "float32", "true", "true"),
          (1, 2, "ring", [5, 9, 7, 13], "float32", "true", "true"),
          (1, 2, "local", [6, 10, 8, 9], "float32", "auto", "false"),
          (1, 1, "ring", [12] * B, "float32", "false", "true"),
          (1, 1, "local", [7, 3, 11, 6], "float64", "true", "auto"),     # attention eager (auto; and Lean has no float64)
          (2, 2, "local", [7, 3, 11, 6], "float32", "true", "true")]
if len(sys.argv) > 2:
    combos = [combos[int(i)] for i in sys.argv[2].split(",")]
models, refs, runs = {}, {}, 0
for A, m, prefill, lengths, dt, model_mode, attn_mode in combos:
    M = P - A
    if M < 1 or args.n_kv_heads % A:
        continue
    dtype = getattr(torch, dt)
    lay = Layout(P, A, args.n_heads, args.n_kv_heads, B, m)
    role_ctx = comm_mod.split(ctx, [0 if r < M else 1 for r in range(P)])
    mine = lay.role(rank) == MODEL
    model = models.setdefault(dt, random_model(args, 11, dtype, "cpu")) if mine else None
    kern = select_kernel("torch_ref", "cpu", dtype, args.head_dim)
    dec = LaminaDecoder(lay, ctx, role_ctx, args, kern, dtype, model, prefill, "contiguous",
                        cuda_graphs=model_mode if mine else attn_mode, decode_products="gemv")
    assert dec.graph_on == ((model_mode if mine else attn_mode) in ("true", "auto") and (mine or dt != "float64"))
    built = Replayed.built
    name = f"A={A} M={M} m={m} {prefill} lengths={lengths} {dt} model {model_mode} attention {attn_mode}"
    for rep in range(2):                      # the second generation replays the first one's pieces
        res = dec.generate(tokens if mine else None, lengths, n)
        if rank == 0:
            key = (dt, tuple(lengths))
            if key not in refs:
                refs[key] = reference_generate(model, kern, tokens, lengths, n)
            rt, rl = refs[key]
            err = float((res.logits - rl).abs().max() / rl.abs().max())
            assert torch.equal(res.tokens, rt), f"{name}: tokens differ:\n{res.tokens}\n{rt}"
            tol = 1e-6 if dt == "float64" else 1e-4         # the fused forward's rounding (RMSNorm in float32)
            assert err < tol, f"{name}: logits rel err {err:.2e}"
            print(f"ok {name} (generation {rep}): rel err {err:.1e}", flush=True)
    if staged:              # the messages went through the staging pool
        assert ctx.world._pool and not ctx.world.staging_stats["transient"], (name, ctx.world.staging_stats)
    pieces = (args.n_layers + 1) * m if mine else args.n_layers * m
    assert Replayed.built - built == (pieces if dec.graph_on else 0), (name, Replayed.built - built)
    assert dec.graph_attrs()["cuda_graphs"] == ("graph" if dec.graph_on else "eager")
    runs += 1
total = world.allreduce(runs)
comm_mod.teardown(ctx)
if rank == 0:
    print(f"check_lamina_graphs: {total // P} configurations matched one process on {P} ranks")
