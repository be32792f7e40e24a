"""CUDA-graph decode (hpcattn.graph, run.cuda_graphs) on CPU: the mode decisions, the config
error, the Lean kernel's device lengths, and the model runner's static decode step.

Graphs themselves are CUDA-only (tests/test_graph_gpu.py replays them against eager runs). Here the
static step runs with :class:`hpcattn.graph.StepGraph` replaced by a plain re-call of the captured
function, through Triton's CPU interpreter: the same static buffers, device-side cache writes,
in-graph position / length advance and Lean kernel with device lengths as on a GPU, checked
against the eager runner."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import pytest  # noqa: E402
import torch  # noqa: E402

from hpcattn import graph  # noqa: E402
import hpcattn.methods  # noqa: E402,F401  (the decode methods declare their capture to graph)
from hpcattn.errors import ConfigError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_decisions():
    assert graph.decide("false", None) == (False, "run.cuda_graphs=false")
    assert graph.decide("auto", None)[0] is True
    cpu = graph.blocker(device="cpu", method="local", backend="mpi", world_size=1)
    assert "CUDA" in cpu and graph.decide("auto", cpu) == (False, cpu)
    with pytest.raises(ConfigError, match="run.cuda_graphs=true: CUDA graphs need a CUDA device"):
        graph.decide("true", cpu)
    assert graph.blocker(device="cuda", method="tree", backend="nccl", world_size=2) is None
    assert graph.blocker(device="cuda", method="tree", backend="mpi", world_size=1) is None
    assert "host-staged" in graph.blocker(device="cuda", method="tree", backend="mpi", world_size=2)
    assert "ring" in graph.blocker(device="cuda", method="ring", backend="nccl", world_size=2)
    assert "round_robin" in graph.blocker(device="cuda", method="tree", backend="nccl", world_size=2,
                                          placement="round_robin")


def test_config_true_on_cpu_is_one_clear_error():
    from hpcattn import config
    from hpcattn.jobs.validate import validate

    cfg = config.load(None, ["run.cuda_graphs=true", "run.device=cpu", "methods=[local]"])
    with pytest.raises(ConfigError, match=r"x.yaml: run.cuda_graphs=true: CUDA graphs need a CUDA device"):
        validate(cfg, 1, False, source="x.yaml")
    cfg = config.load(None, ["run.cuda_graphs=auto", "run.device=cpu"])
    validate(cfg, 1, False)                       # auto: eager on CPU, no error
    with pytest.raises(ConfigError, match="run.cuda_graphs"):
        config.load(None, ["run.cuda_graphs=sometimes"])


def test_lean_device_lengths_follow_the_tensor():
    """One set of launch arguments (a lengths tensor updated in place, as a graph replay sees it)
    gives the right state for every length, 0 and the full capacity included."""
    from hpcattn.kernels import attn_reference, head_major
    from hpcattn.kernels.lean import lean_decode

    g = torch.Generator().manual_seed(3)
    B, cap, hq, hkv, d = 3, 70, 8, 2, 32
    q = torch.randn(B, 1, hq, d, generator=g)
    k = head_major(torch.randn(B, cap, hkv, d, generator=g))
    v = head_major(torch.randn(B, cap, hkv, d, generator=g))
    lens = torch.zeros(B, dtype=torch.int32)
    for step in ([1, 0, 17], [2, 0, 18], [33, 70, 0], [70, 69, 1]):
        lens.copy_(torch.tensor(step))
        for red in ("two_kernel", "fused"):
            o, l = lean_decode(q, k, v, scale=0.2, k_lengths=lens, num_programs=5, block_n=16, reduction=red)
            ro, rl = attn_reference(q.double(), k.double(), v.double(), scale=0.2, k_lengths=torch.tensor(step))
            assert (o.double() - ro).abs().max() < 1e-5 and torch.equal(torch.isneginf(l), torch.isneginf(rl))
            fin = ~torch.isneginf(rl)
            assert (l.double()[fin] - rl[fin]).abs().max() < 1e-5
            ol, ll = lean_decode(q, k, v, scale=0.2, k_lengths=step, num_programs=5, block_n=16, reduction=red)
            assert torch.equal(o, ol) and torch.equal(l, ll)       # same schedule as host lengths
    with pytest.raises(ValueError, match="k_lengths tensor"):
        lean_decode(q, k, v, scale=0.2, k_lengths=lens[:2])
    with pytest.raises(ValueError, match="k_lengths tensor"):
        lean_decode(q, k, v, scale=0.2, k_lengths=lens.float())


class _Replay:
    """Stands in for StepGraph on CPU: 'replay' re-runs the captured function (no warm-up)."""

    def __init__(self, fn, warmup=2, counters=None):
        self.fn = fn
        self.out = fn()

    def __call__(self):
        out = self.fn()
        self.out.copy_(out)
        return self.out


@pytest.mark.parametrize("biases", [False, True])
def test_runner_static_step_equals_eager(monkeypatch, biases):
    """The captured step (fused forward with gemv products, Lean with device lengths) equals the
    eager runner; with every bias a Llama checkpoint can have (attention_bias: q/k/v/o, mlp_bias:
    gate/up/down)."""
    from hpcattn.kernels import select_kernel
    from hpcattn.model.llama import ModelArgs
    from hpcattn.model.runner import ModelRunner
    from hpcattn.model.weights import random_model

    args = ModelArgs.from_preset("tiny")
    args.qkv_bias = args.o_bias = args.mlp_bias = biases
    model = random_model(args, 2, torch.float32, "cpu")
    if biases:                                                 # random_model leaves biases at their init
        with torch.no_grad():
            for name, prm in model.named_parameters():
                if name.endswith(".bias"):
                    prm.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    kern = select_kernel("torch_ref", "cpu", torch.float32, model.args.head_dim)
    tokens = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(1))

    eager = ModelRunner(model, None, kern, prefill="local", decode="local", cuda_graphs="auto")
    assert eager.graph_attrs()["cuda_graphs"] == "eager" and "CUDA" in eager.graph_attrs()["cuda_graphs_reason"]
    with pytest.raises(ConfigError, match="cuda_graphs=true"):
        ModelRunner(model, None, kern, prefill="local", decode="local", cuda_graphs="true")
    ref_toks, ref_logits = eager.generate(tokens, 6)

    monkeypatch.setattr(graph, "blocker", lambda **kw: None)     # pretend the path is capturable
    monkeypatch.setattr(graph, "StepGraph", _Replay)
    import hpcattn.kernels as kernels                          # the interpreter's Lean (no CPU self-test)
    monkeypatch.setattr(kernels, "select_kernel", lambda *a, **kw: kernels.Kernel("lean"))
    cache: dict = {}
    for rep in range(2):                                       # the second run reuses the "graph"
        r = ModelRunner(model, None, kern, prefill="local", decode="local", cuda_graphs="auto",
                        graph_cache=cache, decode_products="gemv")      # every product on gemv (CPU: auto = torch)
        assert r.graph_attrs() == {"cuda_graphs": "graph", "decode_kernel": "lean", "decode_products": "gemv",
                                   "cuda_graphs_reason": "captured once per shape, replayed every step"}
        toks, logits = r.generate(tokens, 6)
        assert torch.equal(toks, ref_toks), rep
        torch.testing.assert_close(logits, ref_logits, rtol=0, atol=2e-5)
        assert r.cache.length == 19 + 5
    assert sum(1 for k in cache if k[0] == "step") == 1
    with torch.inference_mode():
        r.decode_step(toks[:, -1])                             # fills the last slot (capacity 25)
        with pytest.raises(RuntimeError, match="KV cache overflow"):
            r.decode_step(toks[:, -1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_small_ops_match_the_model(dtype):
    """rmsnorm / rope_and_cache / silu_mul (hpcattn.model.fused_decode) against the plain model's
    RMSNorm, apply_rope and F.silu(a) * b: equal up to a rounding or two of the dtype."""
    import torch.nn.functional as F

    from hpcattn.model.fused_decode import rmsnorm, rope_and_cache, silu_mul
    from hpcattn.model.llama import ModelArgs, RMSNorm, Transformer, apply_rope

    g = torch.Generator().manual_seed(4)
    tol = 1e-6 if dtype == torch.float32 else 2e-2         # bf16: two roundings of 2**-8
    x = torch.randn(3, 96, generator=g).to(dtype)
    norm = RMSNorm(96, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(96, generator=g) + 0.5)
    torch.testing.assert_close(rmsnorm(x, norm.weight.detach(), 1e-5), norm(x).detach(), rtol=tol, atol=tol)
    ab = torch.randn(2, 2 * 1100, generator=g).to(dtype)        # 1100: two blocks, the last partial
    a_, b_ = ab[:, :1100], ab[:, 1100:]
    torch.testing.assert_close(silu_mul(ab), F.silu(a_) * b_, rtol=tol, atol=tol)

    model = Transformer(ModelArgs.from_preset("tiny"))
    cos, sin = model.rope(torch.tensor([1234]), torch.float32)
    B, hq, hkv, d, cap = 2, 8, 2, 8, 5
    q, k, v = (torch.randn(B, h, d, generator=g).to(dtype) for h in (hq, hkv, hkv))
    kb = torch.full((B, hkv, cap, d), float("nan"), dtype=dtype)
    vb = kb.clone()
    qo = rope_and_cache(q, k, v, cos.view(-1), sin.view(-1), (kb, vb), torch.tensor([3]))
    torch.testing.assert_close(qo, apply_rope(q[:, None], cos, sin), rtol=tol, atol=tol)
    torch.testing.assert_close(kb[:, :, 3], apply_rope(k[:, None], cos, sin)[:, 0], rtol=tol, atol=tol)
    assert torch.equal(vb[:, :, 3], v) and kb[:, :, [0, 1, 2, 4]].isnan().all()   # only slot 3 written
    qo2 = rope_and_cache(q, k, v, cos.view(-1), sin.view(-1), None, torch.tensor([3]))
    assert torch.equal(qo2, qo)


@pytest.mark.parametrize("biases", [False, True])
def test_fuse_projections_shares_storage_and_keeps_the_model(biases):
    """fuse_projections: wq/wk/wv (w1/w3) become row views of one buffer per layer (no memory
    added), the plain model's logits are bit-identical, the fused product equals the three, and
    a weight replaced afterwards (a checkpoint loaded later) makes it rebuild."""
    import torch.nn.functional as F

    from hpcattn.model.fused_decode import fuse_projections
    from hpcattn.model.llama import ModelArgs, Transformer

    torch.manual_seed(0)
    args = ModelArgs.from_preset("tiny")
    if biases:
        args.qkv_bias = args.mlp_bias = True
    model = Transformer(args).eval()
    tokens = torch.randint(0, args.vocab_size, (2, 7))
    pos = torch.arange(7)

    def attend(layer, q, k, v, **_):
        from hpcattn.kernels import attn_reference
        return attn_reference(q, k, v, scale=args.head_dim ** -0.5, causal="square")[0]

    with torch.no_grad():
        before = model.logits(model(tokens, pos, attend))
        n_before = sum(p.numel() for p in model.parameters())
        fused = fuse_projections(model)
        assert sum(p.numel() for p in model.parameters()) == n_before
        att, ffn = model.layers[1].attention, model.layers[1].feed_forward
        w, b = fused[1]["qkv"]
        assert att.wk.weight.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
        assert torch.equal(model.logits(model(tokens, pos, attend)), before)
        h = torch.randn(3, args.dim)
        three = torch.cat([att.wq(h), att.wk(h), att.wv(h)], dim=1)
        torch.testing.assert_close(F.linear(h, w, b), three, rtol=1e-6, atol=1e-6)
        assert fuse_projections(model) is fused                      # cached
        ffn.w3.weight = torch.nn.Parameter(torch.randn_like(ffn.w3.weight))
        again = fuse_projections(model)
        assert again is not fused and torch.equal(again[1]["w13"][0][args.ffn_dim:], ffn.w3.weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3])
def test_gemv_prologues_and_epilogue_match_float64(dtype, M):
    """hpcattn.model.gemv.gemv against a float64 product of the same rounded operands, for each
    prologue (none, rmsnorm, silu_mul), with bias and residual, K not a multiple of the block,
    and N not a multiple of BLOCK_N: within twice F.linear's error plus one rounding of the output."""
    import torch.nn.functional as F

    from hpcattn.model.fused_decode import rmsnorm, silu_mul
    from hpcattn.model.gemv import gemv

    g = torch.Generator().manual_seed(M)
    K, N = 300, 100
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
    b, nw = torch.randn(N, generator=g).to(dtype), (torch.rand(K, generator=g) + 0.5).to(dtype)
    res = torch.randn(M, N, generator=g).to(dtype)
    ab = torch.randn(M, 2 * K, generator=g).to(dtype)
    cases = [(gemv(x, w, b, residual=res), res.double() + x.double() @ w.double().T + b.double(),
              res + F.linear(x, w, b)),
             (gemv(x, w, prologue="rmsnorm", norm_weight=nw, eps=1e-5),
              rmsnorm(x, nw, 1e-5).double() @ w.double().T, F.linear(rmsnorm(x, nw, 1e-5), w)),
             (gemv(ab, w, prologue="silu_mul", cfg={"BLOCK_K": 128}), silu_mul(ab).double() @ w.double().T,
              F.linear(silu_mul(ab), w))]
    for got, ref, same_dtype in cases:
        assert got.dtype == dtype and got.shape == (M, N)
        err, base = (got.double() - ref).abs().max(), (same_dtype.double() - ref).abs().max()
        ulp = torch.finfo(dtype).eps * ref.abs().max()              # one rounding of the largest output
        assert err <= 2 * base + ulp, (err, base)                    # as good as torch's own product
    logits = gemv(x, w, out_dtype=torch.float32)
    assert logits.dtype == torch.float32 and torch.equal(logits, gemv(x, w).float())
    with pytest.raises(ValueError, match="norm_weight"):
        gemv(x, w, prologue="rmsnorm")
    with pytest.raises(ValueError, match="does not fit"):
        gemv(x[:, :-1], w)


def test_lamina_decode_is_captured_on_cuda_over_any_transport_and_says_why():
    """Lamina's pieces between exchanges are captured on a CUDA rank whatever the transport (the
    exchanges stay outside the graphs); a CPU role is eager (true: a config error naming the role's
    key); the record's per-role modes and reasons (hpcattn.jobs.lamina.graph_summary)."""
    from hpcattn import config as C
    from hpcattn.errors import ConfigError
    from hpcattn.graph import blocker, decide
    from hpcattn.jobs.lamina import graph_summary, validate_config

    for backend in ("mpi", "nccl"):
        assert blocker(device="cuda", method="lamina", backend=backend, world_size=2) is None
    why = blocker(device="cpu", method="lamina", backend="mpi", world_size=2)
    assert decide("auto", why) == (False, why) and "CUDA device" in why
    cfg = C.load("configs/generate.yaml", ["generate.decode=lamina", "shape.heads_kv=2", "lamina.model_device=cuda",
                                           "lamina.attention_device=cpu", "comm.backend=mpi", "run.cuda_graphs=true"])
    with pytest.raises(ConfigError, match=r"run.cuda_graphs \(lamina.attention_device=cpu\)=true: CUDA graphs"):
        validate_config(cfg, 2, True, "g.yaml")
    cfg.run.cuda_graphs = "auto"
    validate_config(cfg, 2, True, "g.yaml")                # auto: the CPU role runs eagerly
    g = "each role's work between two exchanges captured"
    per_rank = [{"role": "model", "cuda_graphs": "graph", "cuda_graphs_reason": g},
                {"role": "attention", "cuda_graphs": "eager", "cuda_graphs_reason": why}]
    s = graph_summary(per_rank)
    assert s["lamina_model_cuda_graphs"] == "graph" and s["lamina_attention_cuda_graphs"] == "eager"
    assert s["cuda_graphs"] == "mixed" and s["cuda_graphs_reason"] == f"model ranks: {g}; attention ranks: {why}"
    s = graph_summary([dict(r, cuda_graphs="graph", cuda_graphs_reason=g) for r in per_rank])
    assert s["cuda_graphs"] == "graph" and s["cuda_graphs_reason"] == g


@pytest.mark.parametrize("M", [1, 3])
def test_decode_forward_gemv_products_equal_cublas_path_with_biases(M):
    """decode_forward with every product on gemv (products=gemv: RMSNorm / SiLU prologues,
    residual epilogue, biases on q/k/v, o and the MLP) equals the torch-product path (float32), and
    a changed weight changes both (the check can fail); a bad products value is one clear error."""
    from hpcattn.model import fused_decode
    from hpcattn.model.llama import ModelArgs
    from hpcattn.model.weights import random_model

    args = ModelArgs.from_preset("tiny")
    args.qkv_bias = args.o_bias = args.mlp_bias = True
    model = random_model(args, 3, torch.float32, "cpu")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    token = torch.randint(0, args.vocab_size, (M,), generator=torch.Generator().manual_seed(M))
    pos, at = torch.tensor([7]), torch.tensor([0])

    def run(products):
        with torch.inference_mode():
            return fused_decode.decode_forward(model, token, pos, slot=lambda i: None, at=at,
                                               attend=lambda i, q: q * 0.5, products=products)

    ref, got = run("torch"), run("gemv")
    assert got.dtype == torch.float32 and got.shape == (M, args.vocab_size)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        model.layers[1].feed_forward.w2.bias.add_(1.0)
    assert (run("gemv") - got).abs().max() > 1e-3
    with pytest.raises(ValueError, match="decode products 'cublas': expected one of auto, gemv, torch"):
        run("cublas")


def test_gemv_tuned_table_lookup():
    """tuned(): N-limited entries before open ones, larger batches fall to the next row bound,
    untuned kinds/batches say None (cuBLAS), float32 gets {} (gemv's default tiles)."""
    from hpcattn.model.gemv import MAX_ROWS, TUNED, tuned

    assert tuned("rmsnorm", 1, N=6144) == TUNED[("rmsnorm", 1, 8192)]
    assert tuned("rmsnorm", 1, N=128256) == TUNED[("rmsnorm", 1, None)]
    assert tuned("residual", 8, N=4096) == TUNED[("residual", MAX_ROWS, None)]
    assert tuned("rmsnorm", 8, N=6144) is None and tuned("silu_mul", 2, N=4096) is None
    assert tuned("residual", 1, torch.float32, 4096) == {} and tuned("residual", MAX_ROWS + 1) is None
