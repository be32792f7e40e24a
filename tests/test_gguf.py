"""GGUF loading on small files written with the gguf package: every quantization type the issue
names, llama.cpp's q/k row permutation undone, tied heads, and one clear error per bad file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpcattn.errors import InputError
from hpcattn.model.llama import ModelArgs

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize, quantize  # noqa: E402

T = gguf.GGMLQuantizationType
ARGS = ModelArgs(vocab_size=256, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, ffn_dim=512,
                 norm_eps=float(np.float32(1e-5)), rope_theta=1e4, tie_embeddings=True)   # GGUF stores float32


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model, qtype=T.F32, extra_meta=None, extra_tensor=False):
    """``model`` (our names, HF row order) as a llama GGUF: q/k permuted, linear weights in ``qtype``."""
    a = model.args
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(a.n_layers)
    w.add_context_length(2048)
    w.add_embedding_length(a.dim)
    w.add_feed_forward_length(a.ffn_dim)
    w.add_head_count(a.n_heads)
    w.add_head_count_kv(a.n_kv_heads)
    w.add_layer_norm_rms_eps(a.norm_eps)
    w.add_rope_freq_base(a.rope_theta)
    w.add_string("general.name", "tiny")
    for k, v in (extra_meta or {}).items():
        w.add_string(k, v) if isinstance(v, str) else w.add_uint32(k, v)
    names = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
    for i in range(a.n_layers):
        for ours, theirs in (("attention_norm", "attn_norm"), ("ffn_norm", "ffn_norm"), ("attention.wq", "attn_q"),
                             ("attention.wk", "attn_k"), ("attention.wv", "attn_v"), ("attention.wo", "attn_output"),
                             ("feed_forward.w1", "ffn_gate"), ("feed_forward.w3", "ffn_up"),
                             ("feed_forward.w2", "ffn_down")):
            names[f"layers.{i}.{ours}.weight"] = f"blk.{i}.{theirs}.weight"
    expect = {}
    for ours, theirs in names.items():
        t = dict(model.named_parameters())[ours].detach().numpy().astype(np.float32)
        q = qtype if t.ndim == 2 else T.F32
        # blocks run along rows, so quantizing commutes with the row permutation: the expected
        # tensor is the original one quantized, in the Hugging Face row order
        expect[ours] = torch.from_numpy(dequantize(quantize(t, q) if q != T.F32 else t, q).reshape(t.shape).copy())
        if theirs.endswith(("attn_q.weight", "attn_k.weight")):
            t = permute(t, a.n_heads if "attn_q" in theirs else a.n_kv_heads)
        data = quantize(t, q) if q != T.F32 else t
        w.add_tensor(theirs, data, raw_dtype=q if q != T.F32 else None)
    if extra_tensor:
        w.add_tensor("blk.0.attn_sinks.weight", np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expect


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1])
def test_gguf_model_roundtrip(tmp_path, qtype):
    """Weights come back as gguf dequantizes them, q/k rows in the Hugging Face order (the
    un-permuted q of a permuted file equals the original), tied head; the model runs."""
    from hpcattn.model.weights import checkpoint_config, load_model, random_model

    src = random_model(ARGS, 3, torch.float32, "cpu")
    f = tmp_path / "tiny.gguf"
    expect = write_gguf(f, src, qtype)
    args, ignored = checkpoint_config(str(f))
    assert args == ARGS and "general.name" in ignored
    m = load_model(str(f), torch.float32, "cpu")
    params = dict(m.named_parameters())
    for ours, t in expect.items():
        assert torch.equal(params[ours].detach(), t), ours
    if qtype == T.F32:
        assert torch.equal(params["layers.1.attention.wq.weight"], dict(src.named_parameters())["layers.1.attention.wq.weight"])
    assert m.output.weight is m.tok_embeddings.weight
    assert load_model(str(f), torch.float32, "cpu", n_layers=1).args.n_layers == 1


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K])
def test_gguf_k_quants_dequantize_through_the_package(tmp_path, qtype):
    """K-quant tensors (gguf has no quantizer for them: random blocks with finite scales) come
    back as gguf.quants.dequantize reads the same bytes, in (rows, columns) order."""
    from hpcattn.model.gguf import GGUFFile

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(6, 2 * size), dtype=np.uint8)
    half = np.array([0.01], dtype=np.float16).view(np.uint8)
    d_at = {T.Q4_K: [0], T.Q6_K: [size - 2]}[qtype]             # where each block's fp16 scale(s) sit
    for blk in range(2):
        for off in d_at + ([2] if qtype == T.Q4_K else []):
            raw[:, blk * size + off:blk * size + off + 2] = half
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    w.add_tensor("token_embd.weight", raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = GGUFFile(tmp_path / "k.gguf")
    got = f.tensor("token_embd.weight")
    assert got.shape == (6, 2 * block)
    assert torch.equal(got, torch.from_numpy(dequantize(raw, qtype)))


def test_gguf_errors_name_the_file_and_key(tmp_path):
    from hpcattn.model.weights import load_model, random_model

    src = random_model(ARGS, 3, torch.float32, "cpu")
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(InputError, match=rf"{bad}: not a readable GGUF file"):
        load_model(str(bad), torch.float32, "cpu")
    f = tmp_path / "scaled.gguf"
    write_gguf(f, src, extra_meta={"llama.rope.scaling.type": "yarn"})
    with pytest.raises(InputError, match=r"llama.rope.scaling.type = 'yarn' means RoPE scaling; not supported"):
        load_model(str(f), torch.float32, "cpu")
    f = tmp_path / "extra.gguf"
    write_gguf(f, src, extra_tensor=True)
    with pytest.raises(InputError, match=r"tensor\(s\) blk.0.attn_sinks.weight have no place"):
        load_model(str(f), torch.float32, "cpu")
