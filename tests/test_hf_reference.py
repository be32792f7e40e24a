"""Checkpoints written by transformers itself (``save_pretrained``) give transformers' tokens and
logits: in one process (every position) and through ``hpcattn run`` on 1..4 ranks for every exact
prefill x decode pairing (every prompt position, gathered from the ranks with
``generate.prompt_logits``, and every decode step).

Checkpoints (tiny, float32, random weights of O(1) logits so that greedy choices are well separated):

* ``llama3``: Llama, transformers-5 layout ``rope_parameters`` with llama3 scaling (theta 5e5,
  original context 64: with head_dim 16 the 8 frequencies fall in all three bands - unchanged,
  smoothed, divided by 8 - and positions up to 31 turn the low ones by up to ~1 rad);
* ``bias_tied``: Llama, legacy layout (top-level ``rope_theta``), ``attention_bias`` (q, k, v, o) and
  ``mlp_bias`` (gate, up, down), tied embeddings, sharded into several safetensors files;
* ``qwen2``: Qwen2 (q, k, v biases), theta 1e6, the layout transformers 5 writes (``layer_types``,
  ``use_sliding_window: false``).

Tolerance: our float32 logits against transformers in float64 (same weights) must be within
``2 * err_b + 1e-6``, err_b being transformers' own float32 error against its float64 run
(flash-attention's rule, tests/tolerance.py). The 1e-6 is the float64 reference's own floor:
transformers computes RoPE angles in float32 even for a float64 model (ours in float64), which we
measured at <= 1e-6 on these models (our float64 vs theirs: 8-9e-7). Logits are O(1) here, err_b
is 2-4e-6; a loader bug (wrong theta, scaling ignored, a dropped bias) moves logits by > 1e-2.
Tokens must be identical; each checkpoint's top-2 logit gap is asserted to exceed 100x the
tolerance, so that "identical tokens" is a well-posed requirement and not luck.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import h5py
import numpy as np
import pytest
import torch

from hpcattn.kernels import attn_reference
from hpcattn.model.hf_config import args_from_hf_config
from hpcattn.model.llama import rope_inv_freq
from hpcattn.model.weights import load_model
from hpcattn.results.hdf5 import read_cases
from tests.mpirun import run_ranks

transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)
torch.set_grad_enabled(False)

PROMPT, NEW = 24, 8            # 24 is divisible by 2 x ranks for 1..4 ranks (zigzag)
COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None, eos_token_id=None,
              pad_token_id=None)
CHECKPOINTS = {
    "llama3": ("LlamaConfig", dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "bias_tied": ("LlamaConfig", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                      attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", dict(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
}
# every checkpoint on 2 ranks, one on 1, 3 and 4: every checkpoint and every rank count, 6 launches
MATRIX = [("llama3", 1), ("llama3", 2), ("bias_tied", 2), ("qwen2", 2), ("bias_tied", 3), ("llama3", 4)]


def to_legacy_layout(ckpt) -> None:
    """Rewrite config.json as transformers < 5 wrote it: top-level rope_theta, rope_scaling."""
    c = json.loads((ckpt / "config.json").read_text())
    rope = c.pop("rope_parameters")
    c["rope_theta"] = rope.pop("rope_theta")
    c["rope_scaling"] = None if rope["rope_type"] == "default" else rope
    (ckpt / "config.json").write_text(json.dumps(c, indent=1))


def write_checkpoint(name: str, ckpt) -> None:
    cls, extra = CHECKPOINTS[name]
    cfg = getattr(transformers, cls)(**COMMON, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    for pname, p in model.named_parameters():       # transformers initialises biases to 0: not here
        r = torch.randn(p.shape, generator=g)
        p.copy_(1 + 0.1 * r if "norm" in pname else 0.1 * r if pname.endswith("bias") else r / p.shape[-1] ** 0.5)
    model.save_pretrained(ckpt, max_shard_size="40KB" if name == "bias_tied" else "1GB")
    if name == "bias_tied":
        to_legacy_layout(ckpt)


class Reference:
    """Transformers on one checkpoint: greedy tokens from ``generate``, logits of every position
    of prompt + generated tokens in float64 and float32, and the tolerance derived from them."""

    def __init__(self, name: str, ckpt):
        self.ckpt = ckpt
        self.prompt = torch.randint(0, 256, (2, PROMPT), generator=torch.Generator().manual_seed(5))
        self.prompt_file = ckpt.parent / f"{name}-prompt.npy"
        np.save(self.prompt_file, self.prompt.numpy())
        auto = transformers.AutoModelForCausalLM
        hf32 = auto.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager")
        hf32.generation_config.pad_token_id = 0
        seq = hf32.generate(self.prompt, attention_mask=torch.ones_like(self.prompt), do_sample=False,
                            max_new_tokens=NEW)                    # no eos: always NEW tokens
        self.tokens = seq[:, PROMPT:]                                       # (B, NEW)
        self.seq = seq[:, :-1]                                              # (B, PROMPT + NEW - 1)
        self.l32 = hf32(self.seq).logits.double()                         # (B, S, vocab)
        hf64 = auto.from_pretrained(ckpt, dtype=torch.float64, attn_implementation="eager")
        self.l64 = hf64(self.seq).logits
        self.tol = 2 * float((self.l32 - self.l64).abs().max()) + 1e-6

    def assert_logits(self, ours: torch.Tensor, positions: slice, what: str) -> None:
        """ours (B, len(positions), vocab) float32 against the float64 reference."""
        err = float((ours.double() - self.l64[:, positions]).abs().max())
        assert err <= self.tol, f"{what}: logits err {err:.3g} > tol {self.tol:.3g}"


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    cache = {}

    def get(name: str) -> Reference:
        if name not in cache:
            ckpt = tmp_path_factory.mktemp("hf") / name
            write_checkpoint(name, ckpt)
            cache[name] = Reference(name, ckpt)
        return cache[name]
    return get


def plain_attend(layer, q, k, v, **_):
    return attn_reference(q, k, v, scale=q.shape[-1] ** -0.5, causal="square")[0]


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_loaded_model_matches_transformers(refs, name):
    """One process, every position of prompt + generated tokens. The reference is well-posed, and
    the checkpoint exercises what it is meant to: the same weights read as the old loader read them
    (llama3 scaling ignored; o_proj and MLP biases dropped; Qwen2 with theta 10000) differ."""
    ref = refs(name)
    if name == "bias_tied":
        assert len(list(ref.ckpt.glob("*.safetensors"))) > 1 and (ref.ckpt / "model.safetensors.index.json").is_file()
    top2 = ref.l64.topk(2, dim=-1).values
    assert float((top2[..., 0] - top2[..., 1]).min()) > 100 * ref.tol
    model = load_model(str(ref.ckpt), torch.float32, "cpu")
    S = ref.seq.shape[1]
    logits = model.logits(model(ref.seq, torch.arange(S), plain_attend))
    ref.assert_logits(logits, slice(0, S), name)
    assert torch.equal(logits[:, PROMPT - 1:].argmax(-1), ref.tokens)
    if name == "bias_tied":
        for layer in model.layers:
            for lin in (layer.attention.wo, layer.feed_forward.w1, layer.feed_forward.w2, layer.feed_forward.w3):
                lin.bias.zero_()
    else:
        model.inv_freq = rope_inv_freq(dataclasses.replace(model.args, rope_scaling=None,
                                                           rope_theta=model.args.rope_theta
                                                           if name == "llama3" else 10000.0))
    old = model.logits(model(ref.seq, torch.arange(S), plain_attend))
    assert float((old.double() - ref.l64).abs().max()) > 1e-2


def test_legacy_and_current_rope_layouts_agree(refs, tmp_path):
    """The same llama3 checkpoint in the legacy layout: hpcattn reads the same ModelArgs, and
    transformers gives the same logits (so both layouts mean the same to both)."""
    import shutil

    ref = refs("llama3")
    legacy = tmp_path / "legacy"
    shutil.copytree(ref.ckpt, legacy)
    to_legacy_layout(legacy)
    assert "rope_scaling" in json.loads((legacy / "config.json").read_text())
    assert args_from_hf_config(legacy) == args_from_hf_config(ref.ckpt)
    hf = transformers.AutoModelForCausalLM.from_pretrained(legacy, dtype=torch.float64, attn_implementation="eager")
    torch.testing.assert_close(hf(ref.seq).logits, ref.l64, rtol=0, atol=0)


def run_generate(ref: Reference, ranks: int, out, sets: list[str]) -> list[dict]:
    """``hpcattn run`` (job: generate, float32, local and ring prefill, one timed repeat, outputs
    saved) of ``ref``'s checkpoint and prompts on ``ranks`` ranks with the extra ``--set`` items;
    returns the record's case rows."""
    r = run_ranks(ranks, ["-m", "hpcattn", "run", "configs/generate.yaml", "--set", f"model.path={ref.ckpt}",
                          "--set", f"generate.prompt_ids={ref.prompt_file}", "--set", f"generate.new_tokens={NEW}",
                          "--set", "generate.prefill=[local,ring]", "--set", "shape.dtype=float32",
                          "--set", "run.warmup=0", "--set", "run.repeats=1", "--set", "run.check=false",
                          "--set", "run.save_outputs=true", *(x for kv in sets for x in ("--set", kv)),
                          "-o", str(out)], timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return read_cases(str(out))[1]


def assert_decode(ref: Reference, case, what: str) -> None:
    """A record's case has transformers' greedy tokens and, within the tolerance, its logits at the
    last prompt position and every decode step."""
    assert np.array_equal(case["tokens"][()], ref.tokens.numpy()), what
    logits = torch.from_numpy(case["logits"][()]).transpose(0, 1)        # (B, NEW, vocab)
    ref.assert_logits(logits, slice(PROMPT - 1, PROMPT - 1 + NEW), what)


@pytest.mark.mpi
@pytest.mark.parametrize("name,ranks", MATRIX)
def test_hpcattn_run_matches_transformers(refs, tmp_path, name, ranks):
    """``hpcattn run`` (job: generate) on a transformers checkpoint: every exact prefill x decode
    pairing of one launch gives transformers' greedy tokens and, within the tolerance, its logits
    at every prompt position (``prompt_logits``: ring prefill's shards gathered in token order;
    2 and 3 ranks zigzag, 4 ranks zigzag and contiguous) and every decode step (4 ranks: both
    tree merges too)."""
    ref = refs(name)
    out = tmp_path / "g.h5"
    sweep = ["ring.layout=[zigzag,contiguous]", "tree.reduction=[allreduce,allgather]"] if ranks == 4 else []
    rows = run_generate(ref, ranks, out, ["generate.decode=[local,tree,ring]", "generate.prompt_logits=true",
                                          *sweep])
    pairs = {"local+local", "local+tree", "local+ring", "ring+tree", "ring+ring"}
    pairs |= {"ring+local"} if ranks == 1 else set()          # legal on one rank only
    assert {row["method"] for row in rows} == pairs
    if ranks == 4:
        assert len(rows) == 10
    with h5py.File(out) as f:
        for row in rows:
            case = f["cases"][row["id"]]
            what = f"{name} on {ranks} ranks, {row['method']} {row['variant']}"
            assert_decode(ref, case, what)
            prompt = torch.from_numpy(case["prompt_logits"][()])                 # (B, PROMPT, vocab)
            assert prompt.shape == (2, PROMPT, 256), (what, prompt.shape)
            ref.assert_logits(prompt, slice(0, PROMPT), f"{what}, prompt positions")


@pytest.mark.mpi
def test_lamina_decode_matches_transformers(refs, tmp_path):
    """Lamina (generate.decode=lamina) on a transformers checkpoint with every bias and tied
    embeddings, 3 ranks = 2 model + 1 attention rank, local and ring prefill (ring over the model
    ranks), 1 and 2 micro-batches: transformers' greedy tokens and, within the tolerance, its logits
    at every decode step (and the last prompt position)."""
    ref = refs("bias_tied")
    out = tmp_path / "lamina.h5"
    rows = run_generate(ref, 3, out, ["generate.decode=lamina", "lamina.attention_ranks=1",
                                      "lamina.microbatches=[1,2]"])
    assert sorted(row["method"] for row in rows) == ["local+lamina"] * 2 + ["ring+lamina"] * 2
    with h5py.File(out) as f:
        for row in rows:
            case = f["cases"][row["id"]]
            assert_decode(ref, case, f"bias_tied on 3 ranks, {row['method']} {row['variant']}")


@pytest.mark.mpi
@pytest.mark.parametrize("broken,ranks", [("model.safetensors", 3), ("config.json", 2)])
def test_broken_checkpoint_file_one_error_line(tmp_path, broken, ranks):
    """A truncated safetensors file (read by every rank) or a malformed config.json (read by rank 0
    while resolving the run): one error line naming the file, exit 2 on every rank, no record."""
    ckpt = tmp_path / "ckpt"
    write_checkpoint("qwen2", ckpt)
    f = ckpt / broken
    f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2])
    out = tmp_path / "g.h5"
    r = run_ranks(ranks, ["-m", "hpcattn", "run", "configs/generate.yaml", "--set", f"model.path={ckpt}",
                          "--set", f"shape.context={PROMPT}", "--set", "run.repeats=1", "-o", str(out)], timeout=120)
    err = [line for line in (r.stdout + r.stderr).splitlines() if "error" in line.lower()]
    assert r.returncode == 2 and len(err) == 1 and str(f) in err[0], r.stdout + r.stderr
    assert "Traceback" not in r.stderr and not out.exists()
