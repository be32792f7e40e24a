"""A Llama-3-style decoder in plain PyTorch (gpt-fast / nanoGPT style), Llama and Qwen2 families.

RMSNorm, rotary embeddings (Hugging Face's rotate-half convention, with Llama-3 rope scaling),
grouped-query attention, SwiGLU MLP; optional biases as in transformers (Qwen2: q, k, v; Llama
``attention_bias``: q, k, v, o; Llama ``mlp_bias``: gate, up, down). The model does not compute
attention itself: every layer hands its post-RoPE q, k, v to an ``attend(layer, q, k, v)``
callable, so that any method (local, ring, tree, ...) and any KV-cache placement plug in per layer. ``attend(layer, q, k, v, pre=(q, k, v))``
gets the post-RoPE q, k and v and, as ``pre``, the same projections before RoPE (APB's compressors
score those).

Shapes: tokens (B, S) int64, positions (S,) int64 (absolute RoPE positions of these tokens),
hidden (B, S, dim); attention tensors (B, S, H, head_dim) as everywhere in hpcattn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from hpcattn.errors import ConfigError


@dataclass
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None   # llama3: factor, low_freq_factor, high_freq_factor, original_max_position_embeddings
    qkv_bias: bool = False             # biases on q, k, v (Qwen2; Llama with attention_bias)
    o_bias: bool = False               # bias on the output projection (Llama with attention_bias)
    mlp_bias: bool = False             # biases on gate, up, down (Llama with mlp_bias)
    tie_embeddings: bool = False

    @classmethod
    def from_preset(cls, name: str) -> "ModelArgs":
        """A shape from ``configs/models/<name>.yaml`` (or a YAML file path)."""
        path = _preset_path(name)
        data = yaml.safe_load(path.read_text()) or {}
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"{path}: unknown model keys {sorted(unknown)}; valid: {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as e:
            raise ConfigError(f"{path}: {e}") from None


def preset_names() -> list[str]:
    return sorted(p.stem for d in preset_dirs() if d.is_dir() for p in d.glob("*.yaml"))


def preset_dirs() -> list[Path]:
    return [Path("configs/models"), Path(__file__).resolve().parents[2] / "configs" / "models"]


def _preset_path(name: str) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    for d in preset_dirs():
        if (d / f"{name}.yaml").is_file():
            return d / f"{name}.yaml"
    raise ConfigError(f"model.preset: no model preset '{name}' (available: {', '.join(preset_names())})")


# ------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """(head_dim/2,) float64 inverse frequencies, with Llama-3 scaling when configured."""
    d = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    sc = args.rope_scaling
    if not sc:
        return inv
    factor, lo, hi = sc["factor"], sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
    old = sc["original_max_position_embeddings"]
    lo_wavelen, hi_wavelen = old / lo, old / hi
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > lo_wavelen, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= hi_wavelen) & (wavelen <= lo_wavelen)
    return torch.where(medium, smoothed, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, S, H, d); cos/sin (S, d) -> rotated x (rotate-half convention of HF Llama/Qwen2)."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    rot = torch.cat((-x2, x1), dim=-1)
    acc = cos.dtype                          # float32, or float64 for a float64 model
    return (x.to(acc) * cos[:, None, :] + rot.to(acc) * sin[:, None, :]).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        hd = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * hd, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * hd, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * hd, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * hd, args.dim, bias=args.o_bias)

    def forward(self, x, cos, sin, attend: Callable, layer: int) -> torch.Tensor:
        B, S, _ = x.shape
        a = self.args
        q = self.wq(x).view(B, S, a.n_heads, a.head_dim)
        k = self.wk(x).view(B, S, a.n_kv_heads, a.head_dim)
        v = self.wv(x).view(B, S, a.n_kv_heads, a.head_dim)
        qr, kr = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attend(layer, qr, kr, v, pre=(q, k, v))                 # (B, S, Hq, hd)
        return self.wo(out.reshape(B, S, a.n_heads * a.head_dim))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.ffn_dim, bias=args.mlp_bias)   # gate
        self.w3 = nn.Linear(args.dim, args.ffn_dim, bias=args.mlp_bias)   # up
        self.w2 = nn.Linear(args.ffn_dim, args.dim, bias=args.mlp_bias)   # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = MLP(args)

    def forward(self, x, cos, sin, attend, layer):
        x = x + self.attention(self.attention_norm(x), cos, sin, attend, layer)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    """The decoder. ``forward`` returns final hidden states; :meth:`logits` applies norm + head."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)

    def _apply(self, fn, recurse=True):
        """Every move or cast of the module (``.to(device / dtype)``, ``.to_empty``, ``.half()``)
        keeps ``inv_freq`` the exact float64 of :func:`rope_inv_freq`: a cast would round it (in
        bfloat16 the rotation angle at position 128K is then off by up to ~230 rad), and a meta
        buffer moved with ``to_empty`` holds no values."""
        super()._apply(fn, recurse)
        if self.inv_freq.device.type != "meta":
            self.inv_freq = rope_inv_freq(self.args).to(self.inv_freq.device)
        return self

    def rope(self, positions: torch.Tensor, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (S, head_dim) for absolute positions (S,), computed in float64."""
        f = positions.to(torch.float64)[:, None] * self.inv_freq.to(positions.device)[None, :]
        emb = torch.cat((f, f), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, attend: Callable) -> torch.Tensor:
        """tokens (B, S), positions (S,) -> hidden (B, S, dim) before the final norm."""
        x = self.tok_embeddings(tokens)
        cos, sin = self.rope(positions, torch.float64 if x.dtype == torch.float64 else torch.float32)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, attend, i)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, S, dim) -> float32 logits (B, S, vocab)."""
        return self.output(self.norm(hidden)).float()
