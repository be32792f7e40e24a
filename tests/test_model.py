"""The Llama-family model in one process: KV-cache consistency, RoPE properties, Llama-3 rope
scaling, checkpoint round trip and loader errors, prompts."""

import json

import pytest
import torch

from hpcattn.errors import ConfigError, InputError
from hpcattn.kernels import attn_reference, select_kernel
from hpcattn.model.llama import ModelArgs, Transformer, apply_rope, rope_inv_freq
from hpcattn.model.runner import ModelRunner
from hpcattn.model.weights import args_from_hf_config, load_model, random_model, save_checkpoint

torch.set_grad_enabled(False)


def tiny(**over) -> ModelArgs:
    a = ModelArgs.from_preset("tiny")
    for k, v in over.items():
        setattr(a, k, v)
    return a


def plain_attend(layer, q, k, v, **_):
    """Full causal attention over the tokens of this call (no cache)."""
    return attn_reference(q, k, v, scale=q.shape[-1] ** -0.5, causal="square")[0]


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_cached_decode_equals_full_forward(qkv_bias):
    """Prefill N tokens then decode 3 with the cache == the full forward over N+3 tokens."""
    model = random_model(tiny(qkv_bias=qkv_bias), 1, torch.float64, "cpu")
    kern = select_kernel("torch_ref", "cpu", torch.float64, model.args.head_dim)
    tokens = torch.randint(0, 256, (2, 21), generator=torch.Generator().manual_seed(0))
    runner = ModelRunner(model, None, kern, prefill="local", decode="local")
    toks, logits = runner.generate(tokens, 4)
    seq = torch.cat([tokens, toks[:, :-1]], dim=1)
    full = model.logits(model(seq, torch.arange(seq.shape[1]), plain_attend))
    for i in range(4):
        torch.testing.assert_close(logits[i], full[:, 20 + i], rtol=0, atol=1e-10)
    assert torch.equal(toks, full[:, 20:].argmax(-1))


def test_rope_relative_positions_and_norm():
    """q.k after RoPE depends only on the position difference; rotation keeps the norm."""
    model = Transformer(tiny()).double()
    q = torch.randn(1, 1, 1, 8, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 8, dtype=torch.float64)

    def dot(pq, pk):
        cq, sq = model.rope(torch.tensor([pq]), torch.float64)
        ck, sk = model.rope(torch.tensor([pk]), torch.float64)
        return float((apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum())

    assert dot(10, 3) == pytest.approx(dot(1007, 1000), rel=1e-9)
    assert dot(10, 3) != pytest.approx(dot(10, 4), rel=1e-3)
    c, s = model.rope(torch.tensor([12345]), torch.float64)
    assert float(apply_rope(q, c, s).norm()) == pytest.approx(float(q.norm()), rel=1e-12)


def test_llama3_rope_scaling_bands():
    """High frequencies unchanged, low frequencies divided by the factor, the band between smooth."""
    a = ModelArgs.from_preset("llama-3.1-8b")
    plain = rope_inv_freq(ModelArgs(**{**a.__dict__, "rope_scaling": None}))
    scaled = rope_inv_freq(a)
    wavelen = 2 * torch.pi / plain
    hi = wavelen < 8192 / 4
    lo = wavelen > 8192 / 1
    assert torch.allclose(scaled[hi], plain[hi]) and torch.allclose(scaled[lo], plain[lo] / 8)
    mid = ~hi & ~lo
    assert mid.any() and bool(((scaled[mid] < plain[mid]) & (scaled[mid] > plain[mid] / 8)).all())


@pytest.mark.parametrize("arch,bias,tie", [("LlamaForCausalLM", False, False), ("Qwen2ForCausalLM", True, True)])
def test_checkpoint_round_trip(tmp_path, arch, bias, tie):
    model = random_model(tiny(qkv_bias=bias, tie_embeddings=tie), 3, torch.float32, "cpu")
    save_checkpoint(model, tmp_path, arch)
    args = args_from_hf_config(tmp_path)
    assert args.qkv_bias == bias and args.tie_embeddings == tie and args.rope_scaling == model.args.rope_scaling
    loaded = load_model(str(tmp_path), torch.float32, "cpu")
    tokens = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(9)
    torch.testing.assert_close(loaded.logits(loaded(tokens, pos, plain_attend)),
                               model.logits(model(tokens, pos, plain_attend)), rtol=0, atol=0)


def test_checkpoint_missing_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    save_checkpoint(random_model(tiny(), 0, torch.float32, "cpu"), tmp_path)
    st = load_file(str(tmp_path / "model.safetensors"))
    del st["model.layers.1.mlp.down_proj.weight"]
    save_file(st, str(tmp_path / "model.safetensors"))
    with pytest.raises(InputError, match=r"lacks tensor\(s\) model.layers.1.mlp.down_proj.weight"):
        load_model(str(tmp_path), torch.float32, "cpu")


def test_checkpoint_unsupported_architecture(tmp_path):
    save_checkpoint(random_model(tiny(), 0, torch.float32, "cpu"), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="unsupported architecture.*MistralForCausalLM.*LlamaForCausalLM"):
        load_model(str(tmp_path), torch.float32, "cpu")
    with pytest.raises(InputError, match="no config.json"):
        args_from_hf_config(tmp_path / "nope")


def test_unknown_preset_lists_available():
    with pytest.raises(ConfigError, match="no model preset 'llama-9'.*tiny"):
        ModelArgs.from_preset("llama-9")


def test_prompt_ids_file_sets_shape(tmp_path):
    from hpcattn import config
    from hpcattn.jobs.generate import prompt_ids, resolve_shape

    (tmp_path / "p.txt").write_text("1 2 3\n4 5")
    cfg = config.load(None, ["job=generate", f"generate.prompt_ids={tmp_path / 'p.txt'}", "shape.batch=2"])
    resolve_shape(cfg)
    assert (cfg.shape.batch, cfg.shape.context, cfg.shape.heads_q, cfg.shape.head_dim) == (2, 5, 8, 8)
    assert prompt_ids(cfg).tolist() == [[1, 2, 3, 4, 5]] * 2
    (tmp_path / "bad.txt").write_text("1 999")
    cfg = config.load(None, ["job=generate", f"generate.prompt_ids={tmp_path / 'bad.txt'}"])
    with pytest.raises(InputError, match=r"token ids must be in \[0, 256\)"):
        resolve_shape(cfg)
