"""The per-role Lamina step callables (hpcattn.model.lamina.steps, the graph variant of
benchmarks/lamina_measure.py) run eagerly on CPU through Triton's CPU interpreter: the model role
and the attention role, interleaved on shared exchange buffers, reproduce the colocated runner's
decode logits and tokens; the model role alone, fed the attention role's outputs, recomputes the
same logits (so the model-only step that the benchmark captures is the model's whole share)."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import pytest  # noqa: E402
import torch  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(B=2, N=13, new=4):
    from hpcattn.kernels import Kernel, select_kernel
    from hpcattn.model.llama import ModelArgs
    from hpcattn.model.runner import ModelRunner
    from hpcattn.model.weights import random_model

    model = random_model(ModelArgs.from_preset("tiny"), 2, torch.float32, "cpu")
    kern = select_kernel("torch_ref", "cpu", torch.float32, model.args.head_dim)
    tokens = torch.randint(0, model.args.vocab_size, (B, N), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        ref_toks, ref_logits = ModelRunner(model, None, kern, prefill="local", decode="local").generate(tokens, new)
    runner = ModelRunner(model, None, kern, prefill="local", decode="local")
    return model, Kernel("lean"), runner, tokens, ref_toks, ref_logits


@pytest.mark.parametrize("products", ["torch", "gemv"])
def test_split_roles_equal_the_colocated_decode(products):
    """Both product paths of the fused forward (cuBLAS-style F.linear / addmm, and the Triton
    gemv with RMSNorm / SiLU prologues and the residual epilogue) reproduce the plain model."""
    from hpcattn.model.lamina import AttentionRole, ModelRole, split_step

    model, lean, runner, tokens, ref_toks, ref_logits = _setup()
    B, N = tokens.shape
    new = ref_toks.shape[1]
    with torch.inference_mode():
        logits = runner.prefill(tokens, new)
        mr = ModelRole(model, B, pos=N, products=products)
        ar = AttentionRole(lean, runner.cache, model.args.n_heads, exchange=(mr.q, mr.kv, mr.o))
        mr.token.copy_(logits.argmax(-1))
        assert torch.equal(mr.token, ref_toks[:, 0])
        for t in range(1, new):
            logits, tok = split_step(mr, ar)
            torch.testing.assert_close(logits, ref_logits[t], rtol=0, atol=2e-5)
            assert torch.equal(tok, ref_toks[:, t]), t
            mr.token.copy_(tok)
        assert ar.cache.length == N + new - 1 and ar.klen.tolist() == [N + new - 1] * B and int(mr.pos) == N + new - 1
        # the model role alone (what the benchmark captures) with the receive buffers as the
        # attention role left them recomputes the last step's logits: nothing else feeds it
        mr.pos.sub_(1)
        mr.token.copy_(ref_toks[:, new - 2])
        again, _ = mr.step()
        torch.testing.assert_close(again, ref_logits[new - 1], rtol=0, atol=2e-5)
        mr.o.zero_()                                   # and it does read them
        mr.pos.sub_(1)
        assert (mr.step()[0] - ref_logits[new - 1]).abs().max() > 1e-3


def test_attention_role_alone_is_the_attention_of_the_prefix_and_new_token():
    """The attention role's step (what the benchmark captures for ATIME): o = attention of q over
    the prefix plus the new token (float64 reference), k, v appended at slot ``at``."""
    from hpcattn.kernels import Kernel, attn_reference
    from hpcattn.model.lamina import AttentionRole
    from hpcattn.model.kv_cache import ShardedKVCache

    g = torch.Generator().manual_seed(2)
    L, B, Hq, Hkv, d, n = 2, 3, 8, 2, 16, 21
    cache = ShardedKVCache(L, B, Hkv, d, n + 2, torch.float32, "cpu")
    cache.buf.copy_(torch.randn(cache.buf.shape, generator=g))
    cache.length = n
    ar = AttentionRole(Kernel("lean"), cache, Hq)
    ar.q.copy_(torch.randn(ar.q.shape, generator=g))
    ar.kv.copy_(torch.randn(ar.kv.shape, generator=g))
    full = cache.buf[:, :, :, :, :n + 1].clone()
    full[:, :, :, :, n:n + 1] = ar.kv.transpose(3, 4)    # prefix + the new token (kv: message layout)
    o = ar.step().clone()
    for i in range(L):
        ref, _ = attn_reference(ar.q[i].double(), full[i, 0].transpose(1, 2).double(),
                                full[i, 1].transpose(1, 2).double(), scale=d ** -0.5)
        assert (o[i].double() - ref).abs().max() < 1e-5, i
    assert torch.equal(cache.buf[:, :, :, :, n:n + 1], ar.kv.transpose(3, 4)) and cache.length == n + 1
    assert ar.at.tolist() == [n + 1] * B and ar.klen.tolist() == [n + 1] * B


def _bench():
    import importlib.util

    from tests.mpirun import ROOT

    spec = importlib.util.spec_from_file_location("lamina_measure", f"{ROOT}/benchmarks/lamina_measure.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_guard_records_failures_and_skips_past_the_deadline():
    bench = _bench()
    guard = bench.Guard(3600.0, torch.device("cpu"))
    assert guard("ok", lambda: 0.5) == 0.5
    assert guard("bad", lambda: 1 / 0) is None and guard("after", lambda: 0.25) == 0.25
    assert guard.notes == ["bad: FAILED ZeroDivisionError: division by zero"]
    late = bench.Guard(-1.0, torch.device("cpu"))
    assert late("graph item", lambda: 0.5, optional=True) is None and late("eager item", lambda: 0.5) == 0.5
    assert late.notes == ["graph item: skipped (past --max-seconds)"]


class _Replay:
    """Stands in for hpcattn.graph.StepGraph on CPU: a 'replay' re-runs the captured function."""

    def __init__(self, fn, warmup=2, counters=None):
        self.fn = fn
        self.out = fn()

    def __call__(self):
        return self.fn()


def test_benchmark_graph_timings_run_end_to_end(monkeypatch, tmp_path):
    """benchmarks/lamina_measure.py --smoke with its graph variant forced on (graphs replaced by
    re-calls, Lean through the interpreter): every graph MTIME / ATIME and the colocated graph step
    are measured and projected next to the eager ones, so the GPU run cannot trip over a shape or
    call error in them. On plain CPU the graph variant is skipped with a note (test_lamina_cost)."""
    import json

    from hpcattn import graph
    from hpcattn import kernels
    from hpcattn.jobs import lamina_cost

    bench = _bench()
    real = kernels.select_kernel
    lean = lambda backend, *a, **kw: kernels.Kernel("lean") if backend == "lean" else real(backend, *a, **kw)  # noqa: E731
    monkeypatch.setattr(bench, "select_kernel", lean)
    monkeypatch.setattr(kernels, "select_kernel", lean)                 # the runner's graph path
    monkeypatch.setattr(lamina_cost, "graph_blocker", lambda *a: None)
    monkeypatch.setattr(graph, "blocker", lambda **kw: None)
    monkeypatch.setattr(graph, "StepGraph", _Replay)
    out = tmp_path / "g.json"
    # no deadline: on a loaded machine the default 90 s would skip the last shape's graph timings
    assert bench.main(["--smoke", "--batches", "1,2", "--contexts", "48", "--max-seconds", "3600",
                       "-o", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["complete"] and d["notes"] == [] and d["graph_timings"] == "measured"
    assert [s["name"] for s in d["shapes"]] == ["tiny (8B stand-in)", "tiny (8B stand-in) (graph)", "tiny-70b-like",
                                                "tiny-70b-like (graph)"]
    for s in d["shapes"]:
        m = lamina_cost.Measurements.from_json(s["measurements"])
        assert sorted(m.mtime) == [1, 2] and [(b, n) for b, n, _ in m.atime] == [(1, 48), (2, 48)]
        assert min(m.mtime.values()) > 0 and min(t for *_, t in m.atime) > 0
        assert {r["dop"] for p in s["projections"] for r in p["rows"]} == {"(1, 1)", "(2, 2)", "(1, 2)", "(2, 4)"}
    colo = d["shapes"][0]["colocated_measured"]
    assert len(colo) == 1 and colo[0]["eager_ms"] > 0 and colo[0]["graph_ms"] > 0
    assert {r["timing"] for r in d["summary"]} == {"eager", "graph"}
