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


# -- loader errors: each names the file and the key or tensor ----------------------------------------

def _edit_config(ckpt, **changes):
    """Apply changes to config.json (a value None deletes the key)."""
    c = json.loads((ckpt / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            c.pop(k, None)
        else:
            c[k] = v
    (ckpt / "config.json").write_text(json.dumps(c))


LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("arch,changes,message", [
    ("LlamaForCausalLM", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
     r"rope_parameters.rope_type 'yarn' is not supported \(supported: default, llama3\)"),
    ("LlamaForCausalLM", {"rope_parameters": None, "rope_theta": 1e4,
                          "rope_scaling": {"type": "dynamic", "factor": 2.0}},
     r"rope_scaling.type 'dynamic' is not supported"),
    ("LlamaForCausalLM", {"rope_parameters": dict(LLAMA3, rope_type="llama3", beta_fast=32)},
     r"rope_parameters key\(s\) beta_fast not understood for rope_type 'llama3'"),
    ("LlamaForCausalLM", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0}},
     r"rope_parameters.low_freq_factor must be a positive number"),
    ("LlamaForCausalLM", {"rope_theta": 123.0}, r"rope_theta 123.0 and rope_parameters.rope_theta .* disagree"),
    ("LlamaForCausalLM", {"rope_scaling": dict(LLAMA3, rope_type="llama3", factor=2.0)},
     r"rope_parameters .* and rope_scaling .* disagree"),
    ("LlamaForCausalLM", {"quantization_config": {"quant_method": "gptq"}, "attn_logit_softcapping": 30.0},
     r"attn_logit_softcapping: 30.0 means attention logit soft-capping; not supported by hpcattn's llama model"),
    ("LlamaForCausalLM", {"quantization_config": {"quant_method": "gptq"}}, r"quantization_config: .* a quantized"),
    ("LlamaForCausalLM", {"sliding_window": 4096}, r"sliding_window: 4096 means sliding-window attention"),
    ("LlamaForCausalLM", {"layer_types": ["full_attention", "sliding_attention"]}, r"layer_types: .* means layer"),
    ("Qwen2ForCausalLM", {"mlp_bias": True}, r"mlp_bias: true means MLP biases .*qwen2 model"),
    ("LlamaForCausalLM", {"hidden_act": "gelu"}, r"hidden_act 'gelu' is not supported"),
    ("Qwen2ForCausalLM", {"use_mrope": True}, r"use_mrope: true means Qwen2-VL's multimodal RoPE; not supported"),
    ("LlamaForCausalLM", {"hidden_size": "64"}, r"hidden_size must be a positive int, got '64'"),
    ("LlamaForCausalLM", {"vocab_size": None}, r"missing key 'vocab_size'"),
    ("Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1},
     r"sliding_window 16 puts sliding-window attention on layer\(s\) \[1\]"),
])
def test_config_json_errors_name_the_key(tmp_path, arch, changes, message):
    """Unknown rope types (both layouts), math keys hpcattn does not understand, bad values: one
    InputError naming config.json and the key."""
    args = tiny(qkv_bias=arch == "Qwen2ForCausalLM")
    save_checkpoint(random_model(args, 0, torch.float32, "cpu"), tmp_path, arch)
    args_from_hf_config(tmp_path)                     # the unedited file loads
    _edit_config(tmp_path, **changes)
    with pytest.raises(InputError, match=message) as e:
        load_model(str(tmp_path), torch.float32, "cpu")
    assert str(tmp_path / "config.json") in str(e.value)


def test_config_json_keys_that_do_not_change_the_math(tmp_path):
    """Bookkeeping keys, Qwen2's disabled sliding window, the same rope settings in both layouts
    or in the legacy layout alone are accepted and read as the plain config."""
    save_checkpoint(random_model(tiny(qkv_bias=True), 0, torch.float32, "cpu"), tmp_path, "Qwen2ForCausalLM")
    plain = args_from_hf_config(tmp_path)
    rope = json.loads((tmp_path / "config.json").read_text())["rope_parameters"]
    _edit_config(tmp_path, transformers_version="4.45.0", torch_dtype="bfloat16", eos_token_id=[1, 2], use_mrope=False,
                 use_cache=True, attention_dropout=0.1, use_sliding_window=False, sliding_window=4,
                 max_window_layers=0, layer_types=["full_attention"] * 2, rope_scaling=rope)
    assert args_from_hf_config(tmp_path) == plain
    legacy = {k: v for k, v in rope.items() if k != "rope_theta"}
    _edit_config(tmp_path, rope_parameters=None, layer_types=None, rope_scaling=legacy, rope_theta=rope["rope_theta"])
    assert args_from_hf_config(tmp_path) == plain


def test_config_json_metadata_and_unknown_keys_are_ignored_and_listed(tmp_path):
    """Keys a real export carries (transformers' GGUF-rebuilt SmolLM2: _model_name_or_path,
    unk_token_id) and keys hpcattn has never seen load as the plain config, listed as ignored;
    the note names the unknown ones."""
    from hpcattn.model.hf_config import ignored_note, read_hf_config

    save_checkpoint(random_model(tiny(), 0, torch.float32, "cpu"), tmp_path)
    plain = args_from_hf_config(tmp_path)
    _edit_config(tmp_path, _model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct", unk_token_id=0,
                 some_future_flag={"a": 1}, torch_dtype="bfloat16", sliding_window=None, use_qk_norm=False)
    hc = read_hf_config(tmp_path)
    assert hc.args == plain
    assert hc.ignored == ["_model_name_or_path", "some_future_flag", "torch_dtype", "unk_token_id"]
    note = ignored_note(hc.ignored, "model.path: x")
    assert note.startswith("note: model.path: x: ignored key(s) _model_name_or_path, some_future_flag, torch_dtype")
    assert "not known to hpcattn: some_future_flag," in note
    loaded = load_model(str(tmp_path), torch.float32, "cpu")        # every tensor is still used
    assert loaded.args == plain


def test_malformed_config_json(tmp_path):
    save_checkpoint(random_model(tiny(), 0, torch.float32, "cpu"), tmp_path)
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    with pytest.raises(InputError, match=rf"{tmp_path / 'config.json'}: not valid JSON"):
        load_model(str(tmp_path), torch.float32, "cpu")
    (tmp_path / "config.json").write_bytes(b'{"a": "\xff"}')
    with pytest.raises(InputError, match=rf"{tmp_path / 'config.json'}: cannot read"):
        args_from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="expected a JSON object, got list"):
        args_from_hf_config(tmp_path)


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors(tmp_path, how):
    save_checkpoint(random_model(tiny(), 0, torch.float32, "cpu"), tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncated": data[:len(data) // 2], "garbage": b"not a safetensors file", "empty": b""}[how])
    with pytest.raises(InputError, match=rf"{f}: not a readable safetensors file"):
        load_model(str(tmp_path), torch.float32, "cpu")


@pytest.mark.parametrize("extra,message", [
    ("model.layers.0.self_attn.o_proj.bias", r"tensor\(s\) model.layers.0.self_attn.o_proj.bias in "
                                             r"model.safetensors have no place in the model"),
    ("model.layers.1.mlp.gate_proj.bias", r"tensor\(s\) model.layers.1.mlp.gate_proj.bias in"),
    ("lm_head.bias", r"tensor\(s\) lm_head.bias in"),
    ("model.layers.2.input_layernorm.weight", r"tensor\(s\) model.layers.2.input_layernorm.weight in"),
])
def test_unconsumed_tensor_is_an_error(tmp_path, extra, message):
    """A tensor the config.json model has no place for (a bias the config does not declare, a
    layer past num_hidden_layers) is refused, not dropped."""
    from safetensors.torch import load_file, save_file

    save_checkpoint(random_model(tiny(), 0, torch.float32, "cpu"), tmp_path)
    st = load_file(str(tmp_path / "model.safetensors"))
    st[extra] = torch.zeros(64)
    save_file(st, str(tmp_path / "model.safetensors"))
    with pytest.raises(InputError, match=message):
        load_model(str(tmp_path), torch.float32, "cpu")


def test_tied_head_and_stored_inv_freq_must_agree(tmp_path):
    """A tied checkpoint may store lm_head.weight, and old ones RoPE inv_freq: used only if they
    agree with what they duplicate; fewer layers (model.layers) skip the rest on purpose."""
    from safetensors.torch import load_file, save_file

    model = random_model(tiny(tie_embeddings=True), 0, torch.float32, "cpu")
    save_checkpoint(model, tmp_path)
    st = load_file(str(tmp_path / "model.safetensors"))
    st["lm_head.weight"] = st["model.embed_tokens.weight"].clone()
    st["model.layers.0.self_attn.rotary_emb.inv_freq"] = rope_inv_freq(model.args).float()
    save_file(st, str(tmp_path / "model.safetensors"))
    assert load_model(str(tmp_path), torch.float32, "cpu", n_layers=1).args.n_layers == 1
    st["lm_head.weight"][0, 0] += 1
    save_file(st, str(tmp_path / "model.safetensors"))
    with pytest.raises(InputError, match="ties the embeddings .* lm_head.weight differs"):
        load_model(str(tmp_path), torch.float32, "cpu")
    st["lm_head.weight"] = st["model.embed_tokens.weight"].clone()
    st["model.layers.0.self_attn.rotary_emb.inv_freq"] *= 2
    save_file(st, str(tmp_path / "model.safetensors"))
    with pytest.raises(InputError, match="rotary_emb.inv_freq does not match the RoPE frequencies"):
        load_model(str(tmp_path), torch.float32, "cpu")


@pytest.mark.parametrize("attention_bias,mlp_bias", [(True, False), (False, True), (True, True)])
def test_llama_biases_round_trip(tmp_path, attention_bias, mlp_bias):
    """attention_bias puts biases on q, k, v and o; mlp_bias on gate, up and down: all loaded."""
    args = tiny(qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=mlp_bias)
    model = random_model(args, 4, torch.float32, "cpu")
    save_checkpoint(model, tmp_path)
    loaded = load_model(str(tmp_path), torch.float32, "cpu")
    assert loaded.args == args
    tokens = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(9)
    torch.testing.assert_close(loaded.logits(loaded(tokens, pos, plain_attend)),
                               model.logits(model(tokens, pos, plain_attend)), rtol=0, atol=0)


def test_random_model_on_device_is_the_random_models_shape():
    """random_model_on_device (benchmarks: drawn on the device, in the dtype): every parameter of
    random_model's shape and dtype, unit norms, std ~0.02 elsewhere, the exact RoPE frequencies
    (a meta-built buffer has none), and a finite forward."""
    from hpcattn.model.weights import random_model_on_device

    args = ModelArgs.from_preset("tiny")
    ref = random_model(args, 0, torch.bfloat16, "cpu")
    m = random_model_on_device(args, torch.bfloat16, "cpu")
    got = dict(m.named_parameters())
    for name, p in ref.named_parameters():
        assert got[name].shape == p.shape and got[name].dtype == torch.bfloat16, name
        if name.endswith("norm.weight"):
            assert torch.all(got[name] == 1), name
        elif p.numel() > 1000:
            assert 0.015 < got[name].float().std() < 0.025, name
    assert torch.equal(m.inv_freq, rope_inv_freq(args))

    def attend(layer, q, k, v, **_):
        return attn_reference(q, k, v, scale=args.head_dim ** -0.5, causal="square")[0]

    with torch.no_grad():
        assert torch.isfinite(m.logits(m(torch.zeros(1, 5, dtype=torch.long), torch.arange(5), attend))).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rope_frequencies_survive_casts(tmp_path, dtype):
    """A model in a low precision rotates with the exact float64 RoPE frequencies: a cast
    (random_model, load_model, .to, .half) must not round them (in bfloat16 the angle at position
    128K was off by up to ~230 rad), so its cos/sin equal a float64 model's to float32 rounding."""
    args = ModelArgs.from_preset("llama-3.1-8b")
    args.n_layers, args.dim, args.ffn_dim, args.vocab_size = 1, 256, 64, 32    # the RoPE of the 8B shape
    exact = rope_inv_freq(args)
    m = random_model(args, 0, dtype, "cpu")
    assert m.inv_freq.dtype == torch.float64 and torch.equal(m.inv_freq, exact)
    assert torch.equal(m.to(torch.bfloat16).half().inv_freq, exact)
    save_checkpoint(random_model(args, 0, torch.float32, "cpu"), tmp_path / "ck")
    assert torch.equal(load_model(str(tmp_path / "ck"), dtype, "cpu").inv_freq, exact)
    pos = torch.tensor([131071, 4096, 7])
    cos, sin = m.rope(pos, torch.float32)
    ref = Transformer(args).to(torch.float64).rope(pos, torch.float32)
    assert torch.equal(cos, ref[0]) and torch.equal(sin, ref[1])
