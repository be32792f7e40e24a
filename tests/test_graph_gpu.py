"""CUDA-graph decode on a GPU (``pytest -m gpu``; run on the device machine): graph replays give
what eager calls give - the Lean kernel with device lengths over a growing cache, the model
runner's captured decode step (float32: identical tokens), the decode job's local/tree steps."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def test_lean_one_graph_serves_a_growing_cache():
    from hpcattn.graph import StepGraph
    from hpcattn.kernels import attn_reference, head_major
    from hpcattn.kernels.lean import lean_decode

    g = torch.Generator(device="cuda").manual_seed(0)
    B, cap = 3, 5000
    q = torch.randn(B, 1, 32, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = head_major(torch.randn(B, cap, 8, 128, device="cuda", dtype=torch.bfloat16, generator=g))
    v = head_major(torch.randn(B, cap, 8, 128, device="cuda", dtype=torch.bfloat16, generator=g))
    lens = torch.tensor([1, 0, 4000], dtype=torch.int32, device="cuda")
    for red in ("two_kernel", "fused"):
        step = StepGraph(lambda: lean_decode(q, k, v, scale=0.088, k_lengths=lens, num_programs=132,
                                             reduction=red))
        for lengths in ([1, 0, 4000], [2, 1, 4001], [129, 64, 4999], [5000, 5000, 5000], [0, 0, 0]):
            lens.copy_(torch.tensor(lengths))
            o, l = step()
            oe, le = lean_decode(q, k, v, scale=0.088, k_lengths=lengths, num_programs=132, reduction=red)
            assert torch.equal(o, oe) and torch.equal(l, le), (red, lengths)   # same schedule, bitwise
            ro, rl = attn_reference(q.double(), k.double(), v.double(), scale=0.088,
                                    k_lengths=torch.tensor(lengths))
            assert _err(o, ro) < 2e-2 and torch.equal(torch.isneginf(l.cpu()), torch.isneginf(rl.cpu()))


@pytest.mark.parametrize("B", [1, 3])
def test_runner_graph_tokens_identical_to_eager_fp32(B):
    from hpcattn.kernels import select_kernel
    from hpcattn.model.llama import ModelArgs
    from hpcattn.model.runner import ModelRunner
    from hpcattn.model.weights import random_model

    a = ModelArgs(vocab_size=2000, dim=512, n_layers=3, n_heads=8, n_kv_heads=2, head_dim=64, ffn_dim=1024)
    model = random_model(a, 5, torch.float32, "cuda")
    kern = select_kernel("auto", "cuda", torch.float32, a.head_dim)
    tokens = torch.randint(0, a.vocab_size, (B, 700), generator=torch.Generator().manual_seed(B)).cuda()
    eager = ModelRunner(model, None, kern, prefill="local", decode="local", cuda_graphs="false")
    ref_toks, ref_logits = eager.generate(tokens, 12)
    cache: dict = {}
    for rep in range(2):                     # capture in the first generation, replay in the second
        r = ModelRunner(model, None, kern, prefill="local", decode="local", cuda_graphs="true",
                        graph_cache=cache)
        toks, logits = r.generate(tokens, 12)
        assert r.graph_attrs()["cuda_graphs"] == "graph"
        assert torch.equal(toks, ref_toks), (rep, toks, ref_toks)
        assert _err(logits, ref_logits) < 1e-4 * max(1.0, ref_logits.abs().max().item())


def test_decode_job_graph_equals_eager(tmp_path):
    """One rank: local and tree (p = 1) decode steps at two contexts, captured vs eager: the same
    outputs up to float32 rounding (cuDNN's lse differed in the last bit at 20000 keys on an H200),
    and the record says which ran."""
    import numpy as np

    from hpcattn.results.hdf5 import read_cases
    from tests.mpirun import run_ranks

    outs = {}
    for mode in ("true", "false"):
        path = tmp_path / f"d-{mode}.h5"
        r = run_ranks(1, ["-m", "hpcattn", "run", "configs/decode_tree.yaml",
                          "--set", "methods=[local,tree]", "--set", "context=[4096,20000]",
                          "--set", "run.save_outputs=true", "--set", f"run.cuda_graphs={mode}",
                          "--set", "run.repeats=3", "-o", str(path)], timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
        _, rows = read_cases(str(path), datasets=("out", "lse"))
        for row in rows:
            assert row["cuda_graphs"] == ("graph" if mode == "true" else "eager"), row
            assert row["check_passed"], row
        outs[mode] = rows
    for a, b in zip(outs["true"], outs["false"]):
        assert a["method"] == b["method"] and a["context"] == b["context"]
        for name, tol in (("out", 2 ** -8), ("lse", 1e-6)):     # out: bf16, at most one rounding apart
            x, y = a["datasets"][name][0], b["datasets"][name][0]
            assert np.allclose(x, y, rtol=tol, atol=tol) and np.isfinite(x).all(), (a["id"], name)


def test_auto_sends_ragged_decode_to_lean():
    """Under kernel auto a ragged GPU decode batch runs on Lean (measured faster than cuDNN's
    per-sequence loop); the state matches the reference as closely as the dense kernel's does."""
    from hpcattn.kernels import attn_reference, head_major, select_kernel
    from tests.tolerance import same_dtype_attention

    kern = select_kernel("auto", "cuda", torch.bfloat16, 128)
    q = torch.randn(4, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = head_major(torch.randn(4, 3000, 8, 128, device="cuda", dtype=torch.bfloat16))
    v = head_major(torch.randn(4, 3000, 8, 128, device="cuda", dtype=torch.bfloat16))
    lengths = [3000, 1, 1777, 640]
    o, l = kern(q, k, v, scale=0.088, k_lengths=lengths)
    assert kern.selftest.get("ragged") == "lean", kern.selftest
    ro, rl = attn_reference(q.double(), k.double(), v.double(), scale=0.088, k_lengths=torch.tensor(lengths))
    bo, bl = same_dtype_attention(q, k, v, scale=0.088, lengths=lengths)
    assert _err(o, ro) <= 2 * _err(bo, ro) + 1e-5 and _err(l, rl) <= 2 * _err(bl, rl) + 1e-5


def test_auto_sends_dense_decode_off_cudnn():
    """Under kernel auto, cuDNN's dense fp16/bf16 decode calls run on aten_flash (else Lean) eager
    and on Lean inside a graph capture: cuDNN's op builds a host graph for every new key length,
    and every decode step has one. The record's kernel line says so, and the state matches the
    reference as closely as the same-dtype baseline's does, eager and replayed."""
    from hpcattn.kernels import attn_reference, head_major, select_kernel
    from tests.tolerance import same_dtype_attention

    kern = select_kernel("auto", "cuda", torch.bfloat16, 128)
    if kern.name != "aten_cudnn":
        pytest.skip(f"auto chose {kern.name}, not cuDNN")
    assert kern.decode_route is not None and kern.decode_route[1] == "lean", kern.selftest
    q = torch.randn(1, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = head_major(torch.randn(1, 5000, 8, 128, device="cuda", dtype=torch.bfloat16))
    v = head_major(torch.randn(1, 5000, 8, 128, device="cuda", dtype=torch.bfloat16))
    for n in (4999, 5000):                     # two lengths: no per-length state on either
        o, l = kern(q, k[:, :n], v[:, :n], scale=0.088)
        ro, rl = attn_reference(q.double(), k[:, :n].double(), v[:, :n].double(), scale=0.088)
        bo, bl = same_dtype_attention(q, k[:, :n], v[:, :n], scale=0.088, lengths=[n])
        assert _err(o, ro) <= 2 * _err(bo, ro) + 1e-5 and _err(l, rl) <= 2 * _err(bl, rl) + 1e-5
    from hpcattn.graph import StepGraph
    g = StepGraph(lambda: kern(q, k, v, scale=0.088))
    go, gl = g()
    lo, ll = select_kernel("lean", "cuda", torch.bfloat16, 128)(q, k, v, scale=0.088)
    assert torch.equal(go, lo) and torch.equal(gl, ll)             # the capture ran Lean
