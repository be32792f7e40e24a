"""Llama-family model runner: the model (:mod:`llama`), its weights (:mod:`weights`) and the
distributed prefill/decode runner with a sharded KV cache (:mod:`runner`)."""

from hpcattn.model.llama import ModelArgs, Transformer  # noqa: F401
from hpcattn.model.runner import ModelRunner, ShardedKVCache  # noqa: F401
