"""ModelArgs from a Hugging Face checkpoint's ``config.json`` (``LlamaForCausalLM``, ``Qwen2ForCausalLM``).

Every key of the file is one of:

* read into :class:`ModelArgs` (:data:`READ`, :data:`READ_BY_FAMILY`);
* a feature hpcattn does not implement that changes the math (:data:`REFUSED`): accepted when
  off (null, false, 0, or the plain value), otherwise an :class:`InputError` naming the file and
  the key (sliding windows, logit soft-capping, quantization configs, QK norms, MoE, Granite's and
  Gemma's scalings, ... and RoPE types other than the two below);
* anything else (metadata: ``_name_or_path``, ``transformers_version``, ``*_token_id``,
  ``torch_dtype``, ``use_cache``; training settings; and any key hpcattn does not know): ignored,
  as transformers' own Llama/Qwen2 classes ignore keys they do not read. The ignored keys are
  returned by :func:`read_hf_config` (the generate and eval jobs list them in the record as
  ``ignored_config_keys`` and print them once as a note).

RoPE, both layouts (they mean the same to transformers):

* transformers >= 5: ``rope_parameters: {rope_type, rope_theta, factor, ...}``;
* older: top-level ``rope_theta`` and ``rope_scaling: {rope_type | type, factor, ...}`` (or null).

``rope_type`` ``default`` (plain RoPE) and ``llama3`` (``factor``, ``low_freq_factor``,
``high_freq_factor``, ``original_max_position_embeddings``, which defaults to
``max_position_embeddings`` as in transformers) are implemented; any other type is an error.
Missing optional keys take transformers' defaults (``rms_norm_eps`` 1e-6, ``rope_theta`` 10000,
``head_dim`` = hidden / heads, Llama ``num_key_value_heads`` = heads, no biases, untied head).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hpcattn.errors import InputError
from hpcattn.model.llama import ModelArgs

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}

# Read (or checked) below, per family.
READ = {"architectures", "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "intermediate_size", "rms_norm_eps", "hidden_act",
        "tie_word_embeddings", "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor",
        "max_position_embeddings"}
READ_BY_FAMILY = {"llama": {"attention_bias", "mlp_bias"},
                  "qwen2": {"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"}}

# Features hpcattn does not implement that change the forward pass: accepted only when off
# (null, false, 0, or the value given here), otherwise refused with the reason.
REFUSED = {
    "quantization_config": (None, "a quantized checkpoint (hpcattn loads floating-point weights; give a llama.cpp "
                                  "quantization as its .gguf file)"),
    "sliding_window": (None, "sliding-window attention (hpcattn attends over the whole context)"),
    "attention_chunk_size": (None, "chunked attention (hpcattn attends over the whole context)"),
    "attn_logit_softcapping": (None, "attention logit soft-capping"),
    "final_logit_softcapping": (None, "final logit soft-capping"),
    "query_pre_attn_scalar": (None, "a query scaling other than head_dim**-0.5"),
    "logits_scaling": (1, "scaled logits (Granite)"),
    "embedding_multiplier": (1, "a scaled embedding (Granite)"),
    "residual_multiplier": (1, "scaled residuals (Granite)"),
    "attention_multiplier": (None, "a query scaling other than head_dim**-0.5 (Granite)"),
    "use_qk_norm": (False, "query/key norms"),
    "qk_layernorm": (False, "query/key norms"),
    "num_experts": (None, "mixture-of-experts layers"),
    "num_local_experts": (None, "mixture-of-experts layers"),
    "n_routed_experts": (None, "mixture-of-experts layers"),
    "no_rope_layers": (None, "layers without RoPE"),
    "use_mrope": (False, "Qwen2-VL's multimodal RoPE"),
    "rope_interleaved": (False, "interleaved RoPE"),
}
# Qwen2 reads its sliding-window keys itself (check_no_sliding_window); Qwen2's MLP has no biases.
REFUSED_BY_FAMILY = {"llama": {"layer_types": (None, "layer types other than full_attention")},
                     "qwen2": {"mlp_bias": (False, "MLP biases (transformers' Qwen2 has none)")}}

# Keys known not to change the forward pass of greedy inference (ignored like any unknown key;
# listed for docs/methods.md and the note, which says which ignored keys are not among them).
NO_MATH = {
    # bookkeeping
    "_name_or_path", "_model_name_or_path", "transformers_version", "dtype", "torch_dtype", "id2label",
    "label2id", "problem_type", "tokenizer_class", "finetuning_task", "task_specific_params", "prefix",
    "is_llama_config",
    "max_sequence_length",          # a length limit, as max_position_embeddings (no learned positions)
    # token ids (the jobs decode greedily; eval stops at the tokenizer's end tokens)
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "unk_token_id", "decoder_start_token_id",
    # training only (dropout is off in inference) and output plumbing
    "initializer_range", "attention_dropout", "use_cache", "output_attentions", "output_hidden_states",
    "return_dict", "torchscript", "use_bfloat16", "is_encoder_decoder", "chunk_size_feed_forward",
    # Llama's tensor-parallel split of pre-training: the same products, summed
    "pretraining_tp",
    # sampling settings saved by older transformers (hpcattn always decodes greedily)
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "temperature",
    "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "num_return_sequences", "output_scores", "return_dict_in_generate",
}

ROPE_TYPES = {"default": {"rope_type", "type", "rope_theta", "partial_rotary_factor"},
              "llama3": {"rope_type", "type", "rope_theta", "partial_rotary_factor", "factor", "low_freq_factor",
                         "high_freq_factor", "original_max_position_embeddings"}}
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def read_config_json(path: str | Path) -> tuple[Path, dict]:
    """(path of config.json, its object); a missing, unreadable or malformed file is one InputError."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise InputError(f"model.path: {path} has no config.json (expected a Hugging Face checkpoint directory)")
    try:
        c = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"model.path: {cfg_path}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"model.path: {cfg_path}: not valid JSON: {e}") from None
    if not isinstance(c, dict):
        raise InputError(f"model.path: {cfg_path}: expected a JSON object, got {type(c).__name__}")
    return cfg_path, c


def family_of(c: dict, cfg_path: Path) -> str:
    """``llama`` or ``qwen2`` from ``architectures`` (or ``model_type``)."""
    archs = c.get("architectures") or [c.get("model_type", "?")]
    families = {ARCHITECTURES[a] for a in archs if a in ARCHITECTURES} if isinstance(archs, list) else set()
    if len(families) != 1:
        raise InputError(f"model.path: {cfg_path}: unsupported architecture {archs}; "
                         f"supported: {', '.join(ARCHITECTURES)}")
    return families.pop()


@dataclass
class HFConfig:
    """What :func:`read_hf_config` makes of a config.json: the model's shape and the keys it ignored."""
    args: ModelArgs
    ignored: list[str]          # sorted keys of the file hpcattn does not read (metadata, unknown keys)


def args_from_hf_config(path: str | Path) -> ModelArgs:
    """ModelArgs from a checkpoint directory's config.json (see the module docstring)."""
    return read_hf_config(path).args


def ignored_note(ignored: list[str], where: str) -> str:
    """The one-line note printed once per run about the keys :func:`read_hf_config` ignored."""
    unknown = [k for k in ignored if k not in NO_MATH and not k.startswith("general.")]   # GGUF: general.*
    text = f"note: {where}: ignored key(s) {', '.join(ignored)} (they do not change greedy inference"
    if unknown:
        text += f"; not known to hpcattn: {', '.join(unknown)}, assumed harmless as transformers' own " \
                f"class does not read them either"
    return text + ")"


def check_refused(c: dict, family: str, where: str) -> None:
    """InputError for the first :data:`REFUSED` feature ``c`` turns on."""
    for key, (off, why) in sorted((REFUSED | REFUSED_BY_FAMILY[family]).items()):
        v = c.get(key)
        if key in READ_BY_FAMILY[family]:          # Qwen2's sliding window: check_no_sliding_window
            continue
        if v is None or v is False or v == off or (v == 0 and not isinstance(v, bool)):
            continue
        if key == "layer_types" and isinstance(v, list) and set(v) <= {"full_attention"}:
            continue
        raise InputError(f"{where}: {key}: {json.dumps(v)} means {why}; not supported by hpcattn's {family} model")


def read_hf_config(path: str | Path) -> HFConfig:
    """ModelArgs and ignored keys from a checkpoint directory's config.json (the module docstring)."""
    cfg_path, c = read_config_json(path)
    family = family_of(c, cfg_path)
    where = f"model.path: {cfg_path}"
    check_refused(c, family, where)
    ignored = sorted(set(c) - READ - READ_BY_FAMILY[family] - set(REFUSED) - set(REFUSED_BY_FAMILY[family]))

    def get(key, kind, default=None, required=False):
        return value(c, key, kind, where, default, required)

    if c.get("hidden_act", "silu") != "silu":
        raise InputError(f"{where}: hidden_act {c['hidden_act']!r} is not supported (silu)")
    if get("partial_rotary_factor", float, 1.0) != 1.0:
        raise InputError(f"{where}: partial_rotary_factor {c['partial_rotary_factor']} is not supported (1.0)")
    heads = get("num_attention_heads", int, required=True)
    dim = get("hidden_size", int, required=True)
    kv = get("num_key_value_heads", int, heads if family == "llama" else None, required=family == "qwen2")
    if heads % kv:
        raise InputError(f"{where}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv})")
    n_layers = get("num_hidden_layers", int, required=True)
    theta, scaling = rope_settings(c, where)
    if family == "qwen2":
        check_no_sliding_window(c, n_layers, where)
    attn_bias = get("attention_bias", bool, False)
    return HFConfig(ModelArgs(
        vocab_size=get("vocab_size", int, required=True), dim=dim, n_layers=n_layers, n_heads=heads,
        n_kv_heads=kv, head_dim=get("head_dim", int, dim // heads),
        ffn_dim=get("intermediate_size", int, required=True),
        norm_eps=get("rms_norm_eps", float, 1e-6), rope_theta=theta, rope_scaling=scaling,
        qkv_bias=family == "qwen2" or attn_bias, o_bias=family == "llama" and attn_bias,
        mlp_bias=get("mlp_bias", bool, False) if family == "llama" else False,
        tie_embeddings=get("tie_word_embeddings", bool, False)), ignored)


def value(c: dict, key: str, kind: type, where: str, default=None, required: bool = False):
    """``c[key]`` as ``kind``: ``bool`` (true/false), or a positive ``int`` / ``float``;
    ``default`` when the key is missing or null (an InputError when ``required``)."""
    if c.get(key) is None:
        if required:
            raise InputError(f"{where}: missing key '{key}'")
        return default
    v = c[key]
    if kind is bool:
        if not isinstance(v, bool):
            raise InputError(f"{where}: {key} must be true or false, got {v!r}")
        return v
    number = isinstance(v, (int, float)) and not isinstance(v, bool)
    if not number or v <= 0 or (kind is int and v != int(v)):
        raise InputError(f"{where}: {key} must be a positive {kind.__name__}, got {v!r}")
    return kind(v)


def rope_settings(c: dict, where: str) -> tuple[float, dict | None]:
    """(rope_theta, llama3 scaling parameters or None) from either layout."""
    found = {}
    for key in ("rope_parameters", "rope_scaling"):
        d = c.get(key)
        if d is not None and not isinstance(d, dict):
            raise InputError(f"{where}: {key} must be an object or null, got {d!r}")
        if d:
            found[key] = d
    if len(found) == 2 and found["rope_parameters"] != found["rope_scaling"]:
        raise InputError(f"{where}: rope_parameters {found['rope_parameters']} and rope_scaling "
                         f"{found['rope_scaling']} disagree (keep one)")
    key, p = next(iter(found.items()), ("rope_parameters", {}))
    kinds = {p[k] for k in ("rope_type", "type") if k in p}
    if len(kinds) > 1:
        raise InputError(f"{where}: {key}.rope_type and {key}.type disagree: {sorted(map(str, kinds))}")
    rope_type = kinds.pop() if kinds else "default"
    if rope_type not in ROPE_TYPES:
        raise InputError(f"{where}: {key}.{'rope_type' if 'rope_type' in p else 'type'} {rope_type!r} is not supported "
                         f"(supported: {', '.join(ROPE_TYPES)})")
    extra = sorted(set(p) - ROPE_TYPES[rope_type])
    if extra:
        raise InputError(f"{where}: {key} key(s) {', '.join(extra)} not understood for rope_type {rope_type!r}")
    if p.get("partial_rotary_factor", 1.0) != 1.0:
        raise InputError(f"{where}: {key}.partial_rotary_factor {p['partial_rotary_factor']} is not supported (1.0)")
    top, inner = c.get("rope_theta"), p.get("rope_theta")
    if top is not None and inner is not None and top != inner:
        raise InputError(f"{where}: rope_theta {top} and {key}.rope_theta {inner} disagree (keep one)")
    theta = next((t for t in (inner, top) if t is not None), 10000.0)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 1:
        raise InputError(f"{where}: rope_theta must be a number > 1, got {theta!r}")
    if rope_type == "default":
        return float(theta), None
    scaling = dict(p)
    scaling.setdefault("original_max_position_embeddings", c.get("max_position_embeddings"))
    for k in LLAMA3_KEYS:
        v = scaling.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise InputError(f"{where}: {key}.{k} must be a positive number for rope_type 'llama3', got {v!r}")
    if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise InputError(f"{where}: {key}: high_freq_factor must be > low_freq_factor")
    return float(theta), {k: scaling[k] for k in LLAMA3_KEYS}


def check_no_sliding_window(c: dict, n_layers: int, where: str) -> None:
    """Qwen2: refuse any layer transformers would run with sliding-window attention.

    As in transformers: the window applies only with ``use_sliding_window: true`` and a
    ``sliding_window``; to the layers ``layer_types`` marks ``sliding_attention``, or without
    ``layer_types`` to layers >= ``max_window_layers``."""
    use = value(c, "use_sliding_window", bool, where, False)
    window = c.get("sliding_window") if use else None
    types = c.get("layer_types")
    if types is None:
        first = c.get("max_window_layers", 28) if window is not None else n_layers
        if isinstance(first, bool) or not isinstance(first, int):
            raise InputError(f"{where}: max_window_layers must be an integer, got {first!r}")
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
    if not isinstance(types, list) or len(types) != n_layers or \
            not set(types) <= {"full_attention", "sliding_attention"}:
        raise InputError(f"{where}: layer_types must list full_attention/sliding_attention for each of the "
                         f"{n_layers} layers, got {types!r}")
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"] if window is not None else []
    if sliding:
        raise InputError(f"{where}: use_sliding_window: true with sliding_window {window} puts sliding-window "
                         f"attention on layer(s) {sliding}; not supported (hpcattn attends over the whole context)")
