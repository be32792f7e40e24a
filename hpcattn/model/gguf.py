"""GGUF checkpoints (llama.cpp's single-file format) of Llama-family models: shape, weights, tokenizer.

``model.path`` may name a ``.gguf`` file whose ``general.architecture`` is ``llama`` (Llama,
Mistral, SmolLM, ...) or ``qwen2``. Read with the ``gguf`` package (optional extra ``gguf``):

* shape from ``{arch}.block_count``, ``embedding_length``, ``feed_forward_length``,
  ``attention.head_count(_kv)``, ``attention.key_length``, ``attention.layer_norm_rms_epsilon``,
  ``rope.freq_base``, ``vocab_size`` (default: the tokenizer's token count); refused when they
  change the math and hpcattn does not implement it (:data:`REFUSED_META`: RoPE scaling, partial
  rotary, sliding windows, experts, soft-capping; a ``rope_freqs`` tensor);
* weights dequantized to float32 by ``gguf.quants.dequantize`` (F32, F16, BF16, Q8_0, Q4_0, Q4_1,
  Q5_0, Q5_1, Q2_K..Q6_K, ...), then cast to the run's dtype. llama.cpp's converter permutes the
  rows of Llama's q and k projections (RoPE's halves interleaved per head); they are permuted back
  here, as transformers does (:func:`unpermute`; Qwen2 files are not permuted). No ``output.weight``
  means a tied head. Every tensor of the file must be used (else one InputError naming it);
* tokenizer (``tokenizer.ggml.model`` ``gpt2``: byte-level BPE from ``tokens`` and ``merges``, the
  control tokens special, BOS prepended when ``add_bos_token``) and ``tokenizer.chat_template``:
  built as transformers builds them from the same file (:func:`hpcattn.model.tokenizer.gguf_tokenizer`,
  beside the directory tokenizer, so that tokenizer.py imports this module and not the other way).

Metadata keys not read (``general.*``, ...) are listed as ignored (the record's ``ignored_config_keys``).
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import torch

from hpcattn.errors import ConfigError, InputError
from hpcattn.model.llama import ModelArgs

ARCHS = ("llama", "qwen2")
PERMUTED = {"llama"}                 # llama.cpp permutes q/k rows of these architectures

# metadata (without the "{arch}." prefix) that changes the math, accepted only when off
REFUSED_META = {
    "rope.scaling.type": ("none", "RoPE scaling"),
    "rope.scaling.factor": (1.0, "RoPE scaling"),
    "attention.sliding_window": (None, "sliding-window attention"),
    "expert_count": (0, "mixture-of-experts layers"),
    "attn_logit_softcapping": (None, "attention logit soft-capping"),
    "final_logit_softcapping": (None, "final logit soft-capping"),
}
READ_META = {"block_count", "embedding_length", "feed_forward_length", "attention.head_count",
             "attention.head_count_kv", "attention.key_length", "attention.value_length",
             "attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.dimension_count", "vocab_size",
             "context_length"}

LAYER_NAMES = {"attn_norm.weight": "attention_norm.weight", "ffn_norm.weight": "ffn_norm.weight",
               "attn_q.weight": "attention.wq.weight", "attn_k.weight": "attention.wk.weight",
               "attn_v.weight": "attention.wv.weight", "attn_output.weight": "attention.wo.weight",
               "attn_q.bias": "attention.wq.bias", "attn_k.bias": "attention.wk.bias",
               "attn_v.bias": "attention.wv.bias", "attn_output.bias": "attention.wo.bias",
               "ffn_gate.weight": "feed_forward.w1.weight", "ffn_up.weight": "feed_forward.w3.weight",
               "ffn_down.weight": "feed_forward.w2.weight"}
GLOBAL_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
                "output.weight": "output.weight"}
BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ConfigError("model.path names a .gguf file: that needs the 'gguf' package "
                          "(pip install 'hpcattn[gguf]' or pip install gguf)") from None
    return gguf


class GGUFFile:
    """A GGUF file's metadata (``meta``: key -> Python value) and tensor directory (``tensors``:
    name -> (GGML type, ne dims, byte offset)), read by :func:`read_header` (the ``gguf`` package's
    own reader spends ~10 s on the 100K tokenizer strings of a small model)."""

    def __init__(self, path: str | Path):
        self.gguf = _gguf()
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"model.path: {path}: no such file")
        try:
            self.meta, self.tensors, self.data_start = read_header(self.path)
        except (ValueError, KeyError, struct.error, UnicodeDecodeError, OSError) as e:
            raise InputError(f"model.path: {path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        self.arch = self.meta.get("general.architecture")
        if self.arch not in ARCHS:
            raise InputError(f"model.path: {path}: general.architecture {self.arch!r} is not supported "
                             f"(supported: {', '.join(ARCHS)})")

    def get(self, key: str, default=None, required: bool = False):
        """Metadata ``{arch}.{key}``."""
        full = f"{self.arch}.{key}"
        if full not in self.meta:
            if required:
                raise InputError(f"model.path: {self.path}: missing metadata {full}")
            return default
        return self.meta[full]

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor ``name`` dequantized to float32 (``gguf.quants.dequantize``), in PyTorch's order
        (the reverse of GGUF's ne dims: (out, in) for a linear weight)."""
        qtype, ne, offset = self.tensors[name]
        try:
            kind = self.gguf.GGMLQuantizationType(qtype)
            block, type_size = self.gguf.GGML_QUANT_SIZES[kind]
        except (ValueError, KeyError):
            raise InputError(f"model.path: {self.path}: tensor {name} has unknown GGML type {qtype}") from None
        if ne[0] % block:
            raise InputError(f"model.path: {self.path}: tensor {name}: row of {ne[0]} not a multiple of "
                             f"{kind.name}'s block {block}")
        rows = int(np.prod(ne[1:])) if len(ne) > 1 else 1
        row_bytes = ne[0] // block * type_size
        raw = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.data_start + offset,
                        shape=(rows, row_bytes))
        try:
            arr = self.gguf.quants.dequantize(np.array(raw), kind)
        except (NotImplementedError, ValueError) as e:
            raise InputError(f"model.path: {self.path}: tensor {name}: cannot dequantize type "
                             f"{kind.name} ({e})") from None
        shape = tuple(int(x) for x in reversed(ne))
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32).reshape(shape))


# GGUF value types: numpy dtype of the scalar ones; 8 string, 9 array
_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8",
            11: "<i8", 12: "<f8"}


def read_header(path: Path) -> tuple[dict, dict, int]:
    """(metadata, tensors {name: (GGML type, ne dims, offset)}, byte offset of the data section)
    of a GGUF v2/v3 file (little-endian)."""
    with open(path, "rb") as fh:
        buf = fh.read(min(path.stat().st_size, 64 << 20))
    pos = 0

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return v[0] if len(v) == 1 else v

    def string():
        nonlocal pos
        n = take("<Q")
        s = buf[pos:pos + n].decode("utf-8")
        pos += n
        return s

    def value(t):
        nonlocal pos
        if t == 8:
            return string()
        if t == 9:
            et, n = take("<I"), take("<Q")
            if et in _SCALARS:
                dt = np.dtype(_SCALARS[et])
                arr = np.frombuffer(buf, dtype=dt, count=n, offset=pos)
                pos += n * dt.itemsize
                return [bool(x) for x in arr] if et == 7 else arr.tolist()
            return [value(et) for _ in range(n)]
        if t not in _SCALARS:
            raise ValueError(f"unknown metadata value type {t}")
        dt = np.dtype(_SCALARS[t])
        v = np.frombuffer(buf, dtype=dt, count=1, offset=pos)[0].item()
        pos += dt.itemsize
        return bool(v) if t == 7 else v

    if buf[:4] != b"GGUF":
        raise ValueError("no GGUF magic")
    pos = 4
    version = take("<I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (2 and 3 are read)")
    n_tensors, n_kv = take("<Q"), take("<Q")
    meta = {}
    for _ in range(n_kv):
        key = string()
        meta[key] = value(take("<I"))
    tensors = {}
    for _ in range(n_tensors):
        name = string()
        nd = take("<I")
        ne = [take("<Q") for _ in range(nd)]
        tensors[name] = (take("<I"), ne, take("<Q"))
    align = int(meta.get("general.alignment", 32))
    return meta, tensors, -(-pos // align) * align


def gguf_args(path: str | Path, f: GGUFFile | None = None) -> tuple[ModelArgs, list[str]]:
    """(ModelArgs, ignored metadata keys) of a GGUF file (see the module docstring)."""
    f = f or GGUFFile(path)
    where = f"model.path: {path}"
    for key, (off, why) in REFUSED_META.items():
        v = f.get(key)
        if v is not None and v != off and not (off is None and v == 0):
            raise InputError(f"{where}: {f.arch}.{key} = {v!r} means {why}; not supported by hpcattn")
    if "rope_freqs.weight" in f.tensors:
        raise InputError(f"{where}: tensor rope_freqs.weight (Llama 3.1 RoPE frequency factors) is not "
                         f"supported for GGUF files; load the Hugging Face checkpoint instead")
    heads = int(f.get("attention.head_count", required=True))
    kv = int(f.get("attention.head_count_kv", heads))
    dim = int(f.get("embedding_length", required=True))
    head_dim = int(f.get("attention.key_length", dim // heads))
    if int(f.get("attention.value_length", head_dim)) != head_dim:
        raise InputError(f"{where}: {f.arch}.attention.value_length differs from key_length; not supported")
    if int(f.get("rope.dimension_count", head_dim)) != head_dim:
        raise InputError(f"{where}: {f.arch}.rope.dimension_count {f.get('rope.dimension_count')} != head dim "
                         f"{head_dim} (partial rotary) is not supported")
    if heads % kv:
        raise InputError(f"{where}: attention.head_count ({heads}) must be a multiple of head_count_kv ({kv})")
    tokens = f.meta.get("tokenizer.ggml.tokens")
    vocab = f.get("vocab_size") or (len(tokens) if tokens else None)
    if vocab is None:
        vocab = int(f.tensors["token_embd.weight"][1][-1])
    has_bias = "blk.0.attn_q.bias" in f.tensors
    args = ModelArgs(vocab_size=int(vocab), dim=dim, n_layers=int(f.get("block_count", required=True)),
                     n_heads=heads, n_kv_heads=kv, head_dim=head_dim,
                     ffn_dim=int(f.get("feed_forward_length", required=True)),
                     norm_eps=float(f.get("attention.layer_norm_rms_epsilon", 1e-5)),
                     rope_theta=float(f.get("rope.freq_base", 10000.0)), rope_scaling=None,
                     qkv_bias=has_bias, o_bias="blk.0.attn_output.bias" in f.tensors,
                     mlp_bias=False, tie_embeddings="output.weight" not in f.tensors)
    read = {f"{f.arch}.{k}" for k in READ_META | set(REFUSED_META)} | {"general.architecture"}
    ignored = sorted(k for k in f.meta if k not in read and not k.startswith(("tokenizer.", "GGUF.")))
    return args, ignored


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: w (n_heads * head_dim, in) whose rows per head are
    RoPE's pairs interleaved (x0, x_{d/2}, x1, ...) -> the Hugging Face order (halves)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_state(path: str | Path, args: ModelArgs, dtype: torch.dtype, n_layers: int,
               f: GGUFFile | None = None) -> dict[str, torch.Tensor]:
    """Our parameter name -> tensor in ``dtype`` for the first ``n_layers`` of the ``args.n_layers``
    layers (``args``: the file's, :func:`gguf_args`); every tensor of the file must be placed
    (layers past ``n_layers`` are skipped on purpose)."""
    f = f or GGUFFile(path)
    state, unused = {}, []
    for name in f.tensors:
        m = BLOCK.fullmatch(name)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            if rest not in LAYER_NAMES or i >= args.n_layers:
                unused.append(name)
                continue
            if i >= n_layers:
                continue
            ours = f"layers.{i}.{LAYER_NAMES[rest]}"
        elif name in GLOBAL_NAMES:
            ours = GLOBAL_NAMES[name]
        else:
            unused.append(name)
            continue
        t = f.tensor(name)
        if f.arch in PERMUTED and rest_of(name) in ("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias"):
            t = unpermute(t, args.n_heads if rest_of(name).startswith("attn_q") else args.n_kv_heads)
        state[ours] = t.to(dtype)
    if unused:
        more = f" (and {len(unused) - 3} more)" if len(unused) > 3 else ""
        raise InputError(f"model.path: {path}: tensor(s) {', '.join(unused[:3])}{more} have no place in the "
                         f"{f.arch} model its metadata describes (refusing to drop them)")
    return state


def rest_of(name: str) -> str:
    m = BLOCK.fullmatch(name)
    return m.group(2) if m else name
