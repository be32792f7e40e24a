"""The config rules of a run: :func:`validate` checks one concrete (sweep-expanded) case against
the run's world size and device.

:func:`hpcattn.config.validate` holds the rules that need the config alone; this module adds the
rules that need the layers above it: a Lamina case's roles (:func:`hpcattn.jobs.lamina.validate_config`),
APB's anchor and passing lengths (:func:`hpcattn.methods.apb.validate`) and whether
``run.cuda_graphs: true`` can capture the decode step (:func:`hpcattn.graph.blocker`).
"""

from __future__ import annotations

from pathlib import Path

from hpcattn import config, graph
from hpcattn.config import MODEL_JOBS, Config, resolve_device
from hpcattn.errors import ConfigError
from hpcattn.jobs.lamina import validate_config as validate_lamina
from hpcattn.jobs.params import apb_params
from hpcattn.methods.apb import validate as apb_validate


def validate(cfg: Config, world_size: int, cuda_available: bool, source: str = "config") -> None:
    """Check one concrete config: every rule of the config, the methods, Lamina and CUDA graphs
    (raises ConfigError naming ``source`` and the key)."""
    if cfg.job == "generate" and cfg.generate.decode == "lamina":
        validate_lamina(cfg, world_size, cuda_available, source)
    config.validate(cfg, world_size, cuda_available, source)
    s, g = cfg.shape, cfg.generate
    if cfg.job in MODEL_JOBS and g.prefill == "apb":
        n = s.context - g.query_len
        apb_validate(n, world_size, g.query_len, apb_params(cfg, world_size, n))
        if cfg.apb.compressor == "query_aware" and apb_params(cfg, world_size, n).lp and \
                not (apb_params(cfg, world_size, n).la and cfg.apb.query_in_anchor):
            raise ConfigError(f"{source}: apb.compressor=query_aware in the model needs the query in the "
                              f"anchor (apb.anchor and apb.query_in_anchor true)")
    if cfg.job == "prefill" and "apb" in cfg.methods:
        apb_validate(s.context, world_size, s.query_len, apb_params(cfg, world_size))
        if cfg.apb.compressor == "retaining_heads" and not (cfg.apb.retaining_heads_path and
                                                             Path(cfg.apb.retaining_heads_path).is_file()):
            raise ConfigError(f"{source}: apb.compressor=retaining_heads needs apb.retaining_heads_path "
                              f"(a safetensors file), got {cfg.apb.retaining_heads_path!r}")
    if cfg.run.cuda_graphs == "true" and cfg.job in ("decode",) + MODEL_JOBS:
        device = resolve_device(cfg, cuda_available)
        backend = cfg.comm.backend if cfg.comm.backend != "auto" else ("nccl" if device == "cuda" else "mpi")
        methods = cfg.methods if cfg.job == "decode" else [cfg.generate.decode]
        for m in methods:
            graph.decide("true", graph.blocker(device=device, method=m, backend=backend, world_size=world_size,
                                               placement=cfg.generate.kv_placement if cfg.job in MODEL_JOBS
                                               else "last"),
                         where=f"{source}: run.cuda_graphs")
