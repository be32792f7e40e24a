"""Model weights: random from a seed (identical on every rank), or a local Hugging Face checkpoint.

Checkpoint directory: ``config.json`` (``LlamaForCausalLM`` or ``Qwen2ForCausalLM``) and
``*.safetensors`` (one file or sharded with ``model.safetensors.index.json``). Tensor names are the
Hugging Face ones (``model.layers.{i}.self_attn.q_proj.weight``, ...). Anything else is a clear error.
Every rank loads the full weights (as APB and Star Attention do).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hpcattn.errors import ConfigError, InputError
from hpcattn.model.llama import ModelArgs, Transformer, rope_inv_freq

SUPPORTED = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


def args_from_hf_config(path: str | Path) -> ModelArgs:
    """ModelArgs from a checkpoint directory's config.json."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise InputError(f"model.path: {path} has no config.json (expected a Hugging Face checkpoint directory)")
    c = json.loads(cfg_path.read_text())
    archs = c.get("architectures") or [c.get("model_type", "?")]
    if not any(a in SUPPORTED for a in archs):
        raise InputError(f"model.path: {cfg_path}: unsupported architecture {archs}; "
                         f"supported: {', '.join(SUPPORTED)}")
    qwen = any(SUPPORTED.get(a) == "qwen2" for a in archs)
    sc = c.get("rope_scaling")
    if sc and sc.get("rope_type", sc.get("type")) not in ("llama3", None):
        raise InputError(f"model.path: {cfg_path}: rope_scaling type {sc.get('rope_type')!r} is not supported "
                         f"(llama3 or none)")
    try:
        return ModelArgs(
            vocab_size=c["vocab_size"], dim=c["hidden_size"], n_layers=c["num_hidden_layers"],
            n_heads=c["num_attention_heads"], n_kv_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
            head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
            ffn_dim=c["intermediate_size"], norm_eps=c.get("rms_norm_eps", 1e-5),
            rope_theta=c.get("rope_theta", 10000.0),
            rope_scaling=({k: sc[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                "original_max_position_embeddings")} if sc else None),
            qkv_bias=qwen or bool(c.get("attention_bias", False)),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)))
    except KeyError as e:
        raise InputError(f"model.path: {cfg_path}: missing key {e}") from None


def hf_names(args: ModelArgs) -> dict[str, str]:
    """Our parameter name -> Hugging Face tensor name."""
    m = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
         "output.weight": "lm_head.weight"}
    for i in range(args.n_layers):
        p, h = f"layers.{i}.", f"model.layers.{i}."
        for ours, theirs in (("attention.wq", "self_attn.q_proj"), ("attention.wk", "self_attn.k_proj"),
                             ("attention.wv", "self_attn.v_proj"), ("attention.wo", "self_attn.o_proj"),
                             ("feed_forward.w1", "mlp.gate_proj"), ("feed_forward.w3", "mlp.up_proj"),
                             ("feed_forward.w2", "mlp.down_proj")):
            m[p + ours + ".weight"] = h + theirs + ".weight"
            if args.qkv_bias and ours in ("attention.wq", "attention.wk", "attention.wv"):
                m[p + ours + ".bias"] = h + theirs + ".bias"
        m[p + "attention_norm.weight"] = h + "input_layernorm.weight"
        m[p + "ffn_norm.weight"] = h + "post_attention_layernorm.weight"
    if args.tie_embeddings:
        m.pop("output.weight")
    return m


def random_model(args: ModelArgs, seed: int, dtype: torch.dtype, device) -> Transformer:
    """Random weights from ``seed`` (std 0.02 linears, unit norms): the same on every rank."""
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = Transformer(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model.to(device=device, dtype=dtype).eval()


def load_model(path: str, dtype: torch.dtype, device, n_layers: int | None = None) -> Transformer:
    """Build the model from a checkpoint directory; a missing tensor is an error naming it."""
    from safetensors import safe_open

    args = args_from_hf_config(path)
    if n_layers is not None:
        args.n_layers = n_layers
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise InputError(f"model.path: {path} has no *.safetensors files")
    where: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                where[k] = f
    with torch.device("meta"):
        model = Transformer(args)
    names = hf_names(args)
    missing = [theirs for theirs in names.values() if theirs not in where]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise InputError(f"model.path: {path}: checkpoint lacks tensor(s) {', '.join(missing[:3])}{more}")
    state = {}
    handles = {}
    try:
        for ours, theirs in names.items():
            f = where[theirs]
            if f not in handles:
                handles[f] = safe_open(str(f), framework="pt", device="cpu")
            t = handles[f].get_tensor(theirs)
            expect = tuple(dict(model.named_parameters())[ours].shape)
            if tuple(t.shape) != expect:
                raise InputError(f"model.path: {path}: tensor {theirs} has shape {tuple(t.shape)}, "
                                 f"expected {expect} from config.json")
            state[ours] = t.to(dtype)
    finally:
        handles.clear()
    model = model.to_empty(device=device)
    model.load_state_dict(state, strict=False, assign=False)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.inv_freq = rope_inv_freq(args).to(device)
    return model.to(dtype=dtype).eval()


def save_checkpoint(model: Transformer, path: str | Path, architecture: str = "LlamaForCausalLM") -> None:
    """Write ``model`` as a Hugging Face-format directory (used by tests and for small fixtures)."""
    from safetensors.torch import save_file

    a = model.args
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": [architecture], "model_type": SUPPORTED.get(architecture, "llama"),
           "vocab_size": a.vocab_size, "hidden_size": a.dim, "num_hidden_layers": a.n_layers,
           "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads, "head_dim": a.head_dim,
           "intermediate_size": a.ffn_dim, "rms_norm_eps": a.norm_eps, "rope_theta": a.rope_theta,
           "tie_word_embeddings": a.tie_embeddings}
    if a.rope_scaling:
        cfg["rope_scaling"] = dict(a.rope_scaling, rope_type="llama3")
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    params = dict(model.named_parameters())
    save_file({theirs: params[ours].detach().cpu().contiguous() for ours, theirs in hf_names(a).items()},
              str(path / "model.safetensors"))


def build_model(cfg, dtype: torch.dtype, device) -> Transformer:
    """The model of a run config: ``model.path`` (checkpoint) or ``model.preset`` with random weights."""
    m = cfg.model
    if m.path:
        return load_model(m.path, dtype, device, m.layers)
    args = ModelArgs.from_preset(m.preset)
    if m.layers is not None:
        if m.layers < 1:
            raise ConfigError("model.layers must be >= 1")
        args.n_layers = m.layers
    return random_model(args, m.seed, dtype, device)
