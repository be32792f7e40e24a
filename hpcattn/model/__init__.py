"""Llama-family model runner: the model (:mod:`llama`), its weights (:mod:`weights`) and the
distributed prefill/decode runner (:mod:`runner`) with its options (:mod:`options`) and its sharded
KV cache (:mod:`kv_cache`)."""

from hpcattn.model.kv_cache import ShardedKVCache  # noqa: F401
from hpcattn.model.llama import ModelArgs, Transformer  # noqa: F401
from hpcattn.model.options import ApproxOptions, RunnerOptions  # noqa: F401
from hpcattn.model.runner import ModelRunner  # noqa: F401
