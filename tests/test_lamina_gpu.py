"""Lamina's graph mode on a GPU (``pytest -m gpu``; run on the device machine): each role's pieces
between two exchanges, captured and replayed, give what the same pieces give eagerly (bitwise: the
same kernels on the same inputs), and a 2-rank run (1 model + 1 attention rank sharing one GPU,
host-staged MPI) gives in float32 the same tokens captured as eager (tests/mpi_progs/check_lamina_gpu.py)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _roles(model, cache, prefix, B, captured: bool):
    """A model role (:class:`ModelSlices`) and an attention role over ``cache`` for B rows, their
    pieces captured (StepGraph) or plain calls; the exchange is a device copy between them."""
    from hpcattn.graph import StepGraph, lean_for_graphs
    from hpcattn.model.lamina import AttentionRole, ModelSlices

    a = model.args
    lean, why = lean_for_graphs(torch.device("cuda"), model.tok_embeddings.weight.dtype, a.head_dim)
    assert why is None, why
    # every product on hpcattn's Triton gemv: the same kernels eager and captured (cuBLAS may choose others
    # while capturing, which would break a bitwise comparison without being an error)
    ms = ModelSlices(model, B, 1, products="gemv", prompt_lengths=prefix)
    ar = AttentionRole(lean, cache, a.n_heads, prefix=prefix)
    L = a.n_layers

    def att(k):
        ar.layer(k)
        if k == L - 1:
            ar.advance()

    wrap = (lambda fn: StepGraph(fn, warmup=1)) if captured else (lambda fn: fn)
    saved_m, saved_a = [x.clone() for x in ms.state()], [ar.klen.clone(), ar.at.clone()]
    pieces = {k: wrap(lambda k=k: ms.slice(k)) for k in range(L)}
    atts = {k: wrap(lambda k=k: att(k)) for k in range(L)}
    for x, v in zip(ms.state() + [ar.klen, ar.at], saved_m + saved_a):
        x.copy_(v)
    return ms, ar, pieces, atts


def _decode(ms, ar, pieces, atts, first_token, steps: int):
    """Greedy steps through the pieces (the exchange: copies of the static buffers)."""
    L = ms.model.args.n_layers
    ms.token.copy_(first_token)
    ms.begin()
    toks, logits = [], []
    for _ in range(steps):
        for k in range(L):
            ar.q[k].copy_(ms.q[k])
            ar.kv[k].copy_(ms.kv[k])
            atts[k]()
            ms.o_in[k, 0].copy_(ar.o[k])
            if k < L - 1:
                pieces[k + 1]()
        lg = pieces[0]()
        logits.append(lg.clone())
        toks.append(ms.token.clone())
    return torch.stack(toks, 1), torch.stack(logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_captured_pieces_equal_eager_pieces(dtype):
    """Ragged prefixes (device lengths and slots per row), B = 3, 6 steps: captured == eager, bitwise."""
    from hpcattn.model.llama import ModelArgs
    from hpcattn.model.runner import ShardedKVCache
    from hpcattn.model.weights import random_model

    a = ModelArgs(vocab_size=2000, dim=512, n_layers=3, n_heads=8, n_kv_heads=2, head_dim=64, ffn_dim=1024)
    model = random_model(a, 5, dtype, "cuda")
    B, prefix, steps = 3, [700, 33, 1200], 6
    out = []
    for captured in (False, True):
        cache = ShardedKVCache(a.n_layers, B, a.n_kv_heads, a.head_dim, max(prefix) + steps + 1, dtype, "cuda")
        cache.buf.copy_(torch.randn(cache.buf.shape, generator=torch.Generator(device="cuda").manual_seed(1),
                                    device="cuda").to(dtype))
        ms, ar, pieces, atts = _roles(model, cache, prefix, B, captured)
        out.append(_decode(ms, ar, pieces, atts, torch.tensor([5, 17, 1999], device="cuda"), steps))
        assert ar.klen.tolist() == [n + steps for n in prefix]
    (te, le), (tg, lg) = out
    assert torch.equal(te, tg) and torch.equal(le, lg)


def test_lamina_graph_vs_eager_on_two_ranks_sharing_one_gpu():
    """1 model + 1 attention rank on this GPU over host-staged MPI: float32 tokens identical captured
    vs eager, 1 and 2 micro-batches, ragged prompts, a second generation replaying the pieces."""
    from tests.mpirun import run_ranks

    r = run_ranks(2, ["-m", "mpi4py", "tests/mpi_progs/check_lamina_gpu.py"], timeout=400)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "check_lamina_gpu: ok" in r.stdout, r.stdout[-4000:]
