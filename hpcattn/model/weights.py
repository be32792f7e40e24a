"""Model weights: random from a seed (identical on every rank), a local Hugging Face checkpoint,
or a GGUF file (:mod:`hpcattn.model.gguf`; ``model.path`` ending in ``.gguf``).

Checkpoint directory: ``config.json`` (``LlamaForCausalLM`` or ``Qwen2ForCausalLM``, read by
:mod:`hpcattn.model.hf_config`) and ``*.safetensors`` (one file or sharded with
``model.safetensors.index.json``). Tensor names are the Hugging Face ones
(``model.layers.{i}.self_attn.q_proj.weight``, ...). Every tensor of the files must be used: a
missing one, one of a wrong shape or dtype, one the model has no place for, a tied ``lm_head.weight``
that differs from the embedding, an unreadable file: each is one InputError naming it.
Every rank loads the full weights (as APB and Star Attention do).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch

from hpcattn.checkpoint_paths import is_gguf
from hpcattn.errors import ConfigError, InputError
from hpcattn.model.gguf import GGUFFile, gguf_args, gguf_state
from hpcattn.model.hf_config import ARCHITECTURES, args_from_hf_config, read_hf_config
from hpcattn.model.llama import ModelArgs, Transformer, rope_inv_freq

# transformers < 4.32 saved RoPE's inverse frequencies; they are checked against config.json's
INV_FREQ = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def hf_names(args: ModelArgs) -> dict[str, str]:
    """Our parameter name -> Hugging Face tensor name."""
    m = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
         "output.weight": "lm_head.weight"}
    bias = {"attention.wq": args.qkv_bias, "attention.wk": args.qkv_bias, "attention.wv": args.qkv_bias,
            "attention.wo": args.o_bias, "feed_forward.w1": args.mlp_bias, "feed_forward.w3": args.mlp_bias,
            "feed_forward.w2": args.mlp_bias}
    for i in range(args.n_layers):
        p, h = f"layers.{i}.", f"model.layers.{i}."
        for ours, theirs in (("attention.wq", "self_attn.q_proj"), ("attention.wk", "self_attn.k_proj"),
                             ("attention.wv", "self_attn.v_proj"), ("attention.wo", "self_attn.o_proj"),
                             ("feed_forward.w1", "mlp.gate_proj"), ("feed_forward.w3", "mlp.up_proj"),
                             ("feed_forward.w2", "mlp.down_proj")):
            m[p + ours + ".weight"] = h + theirs + ".weight"
            if bias[ours]:
                m[p + ours + ".bias"] = h + theirs + ".bias"
        m[p + "attention_norm.weight"] = h + "input_layernorm.weight"
        m[p + "ffn_norm.weight"] = h + "post_attention_layernorm.weight"
    if args.tie_embeddings:
        m.pop("output.weight")
    return m


def _random_init(model: Transformer) -> Transformer:
    """Unit norms, N(0, 0.02) everything else, in place (the current RNG)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model


def random_model(args: ModelArgs, seed: int, dtype: torch.dtype, device) -> Transformer:
    """Random weights from ``seed`` (std 0.02 linears, unit norms): the same on every rank."""
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = Transformer(args)
    return _random_init(model).to(device=device, dtype=dtype).eval()


def random_model_on_device(args: ModelArgs, dtype: torch.dtype, device) -> Transformer:
    """Random weights as :func:`random_model`'s, drawn on ``device`` itself in ``dtype`` and not
    seeded: for timing, where values do not matter and an 8B or 70B shape's CPU initialisation
    would take minutes (no float32 copy is ever made)."""
    with torch.device("meta"):
        model = Transformer(args)
    return _random_init(model.to(dtype).to_empty(device=device)).eval()


class _Files:
    """The checkpoint's safetensors files: which file holds each tensor; reads name the file on error."""

    def __init__(self, path: str):
        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise InputError(f"model.path: {path} has no *.safetensors files")
        self.where: dict[str, Path] = {}
        self.handles = {}
        for f in files:
            for k in self._handle(f).keys():
                if k in self.where:
                    raise InputError(f"model.path: tensor {k} is in both {self.where[k]} and {f}")
                self.where[k] = f

    def _handle(self, f: Path):
        from safetensors import safe_open

        if f not in self.handles:
            try:
                self.handles[f] = safe_open(str(f), framework="pt", device="cpu")
            except Exception as e:          # safetensors raises its own SafetensorError, or OSError
                raise InputError(f"model.path: {f}: not a readable safetensors file ({e})") from None
        return self.handles[f]

    def get(self, name: str) -> torch.Tensor:
        f = self.where[name]
        try:
            return self._handle(f).get_tensor(name)
        except Exception as e:
            raise InputError(f"model.path: {f}: cannot read tensor {name} ({e})") from None


def _names_list(names: list[str]) -> str:
    more = f" (and {len(names) - 3} more)" if len(names) > 3 else ""
    return ", ".join(names[:3]) + more


def checkpoint_config(path: str) -> tuple[ModelArgs, list[str]]:
    """(ModelArgs, keys the loader ignored) of ``model.path``: a Hugging Face directory's
    config.json (:func:`hpcattn.model.hf_config.read_hf_config`) or a GGUF file's metadata."""
    if is_gguf(path):
        return gguf_args(path)
    hc = read_hf_config(path)
    return hc.args, hc.ignored


def _layers(args: ModelArgs, n_layers: int | None, path: str) -> int:
    if n_layers is None:
        return args.n_layers
    if not 1 <= n_layers <= args.n_layers:
        raise ConfigError(f"model.layers={n_layers}: {path} has {args.n_layers} layers "
                          f"(num_hidden_layers); use 1..{args.n_layers}")
    return n_layers


def load_gguf_model(path: str, dtype: torch.dtype, device, n_layers: int | None = None) -> Transformer:
    """Build the model from a GGUF file (``n_layers``: only the first layers; every tensor used)."""


    f = GGUFFile(path)
    full, _ = gguf_args(path, f)
    args = copy.copy(full)
    args.n_layers = _layers(full, n_layers, path)
    state = gguf_state(path, full, dtype, args.n_layers, f)
    return _assemble(args, state, dtype, device, path)


def load_model(path: str, dtype: torch.dtype, device, n_layers: int | None = None) -> Transformer:
    """Build the model from a checkpoint directory or GGUF file (``n_layers``: only the first layers).

    Every tensor of the files is consumed (layers past ``n_layers`` are skipped on purpose) or
    the load is refused with an InputError naming it."""
    if is_gguf(path):
        return load_gguf_model(path, dtype, device, n_layers)
    args = args_from_hf_config(path)
    full = hf_names(args)
    args.n_layers = _layers(args, n_layers, path)
    files = _Files(path)
    names = hf_names(args)
    missing = [theirs for theirs in names.values() if theirs not in files.where]
    if missing:
        raise InputError(f"model.path: {path}: checkpoint lacks tensor(s) {_names_list(missing)}")
    tied_head = args.tie_embeddings and "lm_head.weight" in files.where
    unused = sorted(k for k in files.where if k not in set(full.values()) and not INV_FREQ.fullmatch(k)
                    and not (tied_head and k == "lm_head.weight"))
    if unused:
        raise InputError(f"model.path: {path}: tensor(s) {_names_list(unused)} in {files.where[unused[0]].name} "
                         f"have no place in the model config.json describes (refusing to drop them)")
    params = _meta_params(args)
    state = {}
    try:
        for ours, theirs in names.items():
            t = files.get(theirs)
            expect = tuple(params[ours].shape)
            if tuple(t.shape) != expect or not t.is_floating_point():
                raise InputError(f"model.path: {path}: tensor {theirs} has shape {tuple(t.shape)} dtype {t.dtype}, "
                                 f"expected {expect} floating point from config.json")
            state[ours] = t.to(dtype)
        _check_extras(files, args, path)
    finally:
        files.handles.clear()
    return _assemble(args, state, dtype, device, path)


def _meta_params(args: ModelArgs) -> dict[str, torch.nn.Parameter]:
    with torch.device("meta"):
        return dict(Transformer(args).named_parameters())


def _assemble(args: ModelArgs, state: dict[str, torch.Tensor], dtype: torch.dtype, device,
              path: str) -> Transformer:
    """The model of ``args`` holding ``state`` (our names; a tied head is filled in here); every
    parameter must be there with its shape (an InputError naming the first that is not)."""
    with torch.device("meta"):
        model = Transformer(args)
    for name, p in model.named_parameters():
        if name == "output.weight" and args.tie_embeddings:
            continue
        if name not in state:
            raise InputError(f"model.path: {path}: checkpoint lacks tensor {name}")
        if tuple(state[name].shape) != tuple(p.shape):
            raise InputError(f"model.path: {path}: tensor {name} has shape {tuple(state[name].shape)}, "
                             f"expected {tuple(p.shape)}")
    if args.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model = model.to_empty(device=device)
    model.load_state_dict(state, strict=True, assign=False)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.to(dtype=dtype).eval()


def _check_extras(files: _Files, args: ModelArgs, path: str) -> None:
    """Tensors that hold nothing new must agree with what they duplicate: a tied ``lm_head.weight``
    with the embedding, stored RoPE ``inv_freq`` with config.json's frequencies."""
    if args.tie_embeddings and "lm_head.weight" in files.where and \
            not torch.equal(files.get("lm_head.weight"), files.get("model.embed_tokens.weight")):
        raise InputError(f"model.path: {path}: config.json ties the embeddings (tie_word_embeddings) but "
                         f"lm_head.weight differs from model.embed_tokens.weight")
    inv = rope_inv_freq(args)
    for k in sorted(k for k in files.where if INV_FREQ.fullmatch(k)):
        t = files.get(k).double()
        if t.shape != inv.shape or not torch.allclose(t, inv, rtol=1e-3, atol=0):
            raise InputError(f"model.path: {path}: tensor {k} does not match the RoPE frequencies of "
                             f"config.json (rope_theta / rope scaling)")


def save_checkpoint(model: Transformer, path: str | Path, architecture: str = "LlamaForCausalLM") -> None:
    """Write ``model`` as a Hugging Face-format directory (transformers 5 layout: ``rope_parameters``;
    used by tests and for small fixtures). Biases must be ones the architecture can express."""
    from safetensors.torch import save_file

    a = model.args
    family = ARCHITECTURES[architecture]
    cfg = {"architectures": [architecture], "model_type": family,
           "vocab_size": a.vocab_size, "hidden_size": a.dim, "num_hidden_layers": a.n_layers,
           "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads, "head_dim": a.head_dim,
           "intermediate_size": a.ffn_dim, "rms_norm_eps": a.norm_eps, "hidden_act": "silu",
           "rope_parameters": dict(a.rope_scaling or {}, rope_theta=a.rope_theta,
                                   rope_type="llama3" if a.rope_scaling else "default"),
           "tie_word_embeddings": a.tie_embeddings}
    if family == "llama":
        if a.qkv_bias != a.o_bias:
            raise ValueError("Llama's attention_bias puts biases on q, k, v and o alike")
        cfg |= {"attention_bias": a.o_bias, "mlp_bias": a.mlp_bias}
    elif not a.qkv_bias or a.o_bias or a.mlp_bias:
        raise ValueError("Qwen2 has biases on q, k, v only")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
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
            raise ConfigError(f"model.layers must be >= 1, got {m.layers}")
        args.n_layers = m.layers
    return random_model(args, m.seed, dtype, device)
