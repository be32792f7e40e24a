"""Strict YAML config mapped onto dataclasses, with dotted overrides and sweeps.

A config file is a YAML mapping whose sections mirror :class:`Config`. Loading is strict:

* an unknown key is an error naming the key, the file and the closest valid keys;
* every value is type-checked against the dataclass field (``int``, ``float``, ``bool``, ``str``,
  optional values, lists) and checked against the field's choices;
* ``--set a.b=c`` overrides are parsed as YAML scalars and checked the same way; a bare leaf name
  (``--set context=65536``) is accepted when exactly one field has that name;
* fields marked *sweepable* accept a list, and :func:`expand_cases` expands the Cartesian product
  of all such lists into concrete configs (one per sweep point);
* :func:`validate` checks the combinations (GQA divisibility, zigzag divisibility, nccl without
  GPUs, ...) against the world size and device of the run.

The resolved config (:func:`to_yaml`) is stored in every HDF5 record, and re-running from it
reproduces the run.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

from hpcattn.checkpoint_paths import has_tokenizer, is_gguf
from hpcattn.errors import ConfigError

DTYPES = ("float64", "float32", "bfloat16", "float16")
JOBS = ("decode", "prefill", "generate", "eval")
METHODS_BY_JOB = {"decode": ("local", "tree", "ring"), "prefill": ("local", "ring", "torch_cp", "star", "apb"),
                  "generate": ("local", "tree", "ring"), "eval": ("local", "tree", "ring")}
MODEL_JOBS = ("generate", "eval")          # jobs that run the whole model (generate.* settings)
EVAL_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
KERNEL_BACKENDS = (
    "auto", "torch_ref", "cpu_flash", "aten_cudnn", "aten_flash", "aten_efficient", "fa2", "lean",
)


def _f(default: Any, *, choices: tuple | None = None, sweep: bool = False, doc: str = ""):
    """A dataclass field with hpcattn metadata (allowed values, sweepable, one-line doc)."""
    meta = {"choices": choices, "sweep": sweep, "doc": doc}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ShapeConfig:
    batch: int = _f(1, sweep=True, doc="sequences per step (B)")
    heads_q: int = _f(32, sweep=True, doc="query heads (Hq)")
    heads_kv: int = _f(8, sweep=True, doc="key/value heads (Hkv); Hq % Hkv == 0")
    head_dim: int = _f(128, sweep=True, doc="head dimension (d)")
    context: int = _f(4096, sweep=True, doc="decode: KV tokens per sequence; prefill: sequence length")
    lengths: typing.Optional[list[int]] = _f(
        None, doc="decode: per-sequence KV lengths (ragged batch), each <= context; generate with "
                  "decode lamina: per-sequence prompt lengths")
    dtype: str = _f("bfloat16", choices=DTYPES, sweep=True, doc="tensor dtype")
    causal: bool = _f(True, sweep=True, doc="prefill only: causal mask")
    query_len: int = _f(0, sweep=True, doc="prefill: query rows after the context (Star/APB query pass and "
                                            "APB's anchor); star/apb need >= 1")
    scale: typing.Optional[float] = _f(None, doc="softmax scale; default head_dim**-0.5")


@dataclass
class CommConfig:
    backend: str = _f("auto", choices=("auto", "mpi", "nccl", "gloo"),
                      doc="auto: nccl on GPUs, mpi on CPU ranks; gloo is a CPU stand-in for nccl")
    gpu_aware_mpi: str = _f("auto", choices=("auto", "true", "false"),
                            doc="hand device buffers to MPI directly (auto: probe, false when unsure)")
    ranks_per_node: typing.Optional[int] = _f(
        None, doc="emulate nodes of this many ranks (functional tests; timings meaningless)")
    staging_pool_mib: int = _f(4096, doc="mpi staged through host memory: bound of each communicator's pinned "
                                         "buffer pool (MiB); messages in flight beyond it go through transient "
                                         "pageable buffers")


@dataclass
class KernelConfig:
    backend: str = _f("auto", choices=KERNEL_BACKENDS, sweep=True,
                      doc="local attention kernel; auto picks the fastest present that passes its self-test "
                          "(GPU: cuDNN's dense decode calls run on aten_flash eager and on lean in CUDA "
                          "graphs; ragged decode batches on lean)")


@dataclass
class TreeConfig:
    reduction: str = _f("allgather", choices=("allreduce", "allgather"), sweep=True,
                        doc="allreduce: MAX then packed SUM; allgather: one gather of states + local merge")
    topology: str = _f("flat", choices=("flat", "hierarchical"), sweep=True,
                       doc="hierarchical: node-local reduce -> leaders -> node-local broadcast")
    fused_merge: bool = _f(False, sweep=True, doc="allgather/flat on GPUs: merge in one Triton kernel "
                                                  "(off until measured; sweep [false, true] to compare)")


@dataclass
class RingConfig:
    layout: str = _f("zigzag", choices=("zigzag", "contiguous"), sweep=True,
                     doc="prefill sequence layout over ranks (zigzag balances causal work)")


@dataclass
class TorchCPConfig:
    sdpa: str = _f("cudnn", choices=("cudnn", "flash", "efficient"), sweep=True,
                   doc="SDPA backend inside PyTorch's context_parallel ring (the torch_cp peer)")
    native_gqa: bool = _f(False, sweep=True, doc="torch_cp: SDPA enable_gqa instead of K/V expanded to "
                                                 "heads_q at set-up")


@dataclass
class StarConfig:
    block: typing.Optional[int] = _f(None, sweep=True, doc="phase-1 block in tokens (default context/ranks, "
                                                           "as APB ran Star; the Star README uses context/4)")
    anchor: typing.Optional[int] = _f(None, sweep=True, doc="anchor tokens (default = block)")
    compat_remote_causal_quirk: bool = _f(False, doc="the public code's bottom-right causal mask on remote "
                                                     "caches in the query pass (default: intended non-causal)")


@dataclass
class APBConfig:
    anchor_len: typing.Optional[int] = _f(None, sweep=True, doc="la (default: paper preset, else block/4; at least "
                                                                "query_offset + the query's length)")
    passing_len: typing.Optional[int] = _f(None, sweep=True, doc="lp per rank and KV head (default: preset, "
                                                                 "else block/8)")
    query_offset: int = _f(0, doc="s: header tokens before the query inside the anchor")
    compressor: str = _f("query_aware", choices=("query_aware", "retaining_heads", "random"), sweep=True,
                         doc="how local KV is scored for the passing blocks")
    retaining_heads_path: typing.Optional[str] = _f(None, doc="safetensors file with fc1/fc2 per layer")
    retaining_heads_regex: str = _f(r"layers\.(\d+)\..*?(fc1|fc2)\.weight",
                                    doc="regex capturing (layer, fc1|fc2) in the heads file's keys")
    layer: int = _f(0, doc="attention level: which layer's retaining heads score the inputs")
    anchor: bool = _f(True, sweep=True, doc="ablation: use an anchor block")
    passing: bool = _f(True, sweep=True, doc="ablation: pass compressed blocks")
    query_in_anchor: bool = _f(True, sweep=True, doc="ablation: embed the query in the anchor")
    score_pool: int = _f(5, doc="max-pool window of the scores along the sequence (odd)")
    seed: int = _f(0, doc="seed of the random compressor")


@dataclass
class InputConfig:
    source: str = _f("synthetic", choices=("synthetic", "file"), doc="synthetic from seed, or an HDF5 file")
    seed: int = _f(0, doc="seed of the synthetic inputs (results do not depend on the rank count)")
    path: typing.Optional[str] = _f(None, doc="HDF5 file with datasets q, k, v (see docs/inputs.md)")
    needles: int = _f(0, doc="prefill: plant this many far-away keys aligned with the query (needle recall)")


@dataclass
class ModelConfig:
    preset: str = _f("tiny", doc="model shape from configs/models/<preset>.yaml (random weights), or a YAML path")
    path: typing.Optional[str] = _f(None, doc="Hugging Face checkpoint directory (config.json + *.safetensors) "
                                              "or a llama.cpp .gguf file (Llama or Qwen2; docs/methods.md lists "
                                              "what is read and refused); overrides preset")
    seed: int = _f(0, doc="seed of the random weights (identical on every rank)")
    layers: typing.Optional[int] = _f(None, doc="use only this many layers (benchmarks of big shapes)")


@dataclass
class GenerateConfig:
    prefill: str = _f("ring", choices=("local", "ring", "star", "apb"), sweep=True,
                      doc="prefill method in every layer (star/apb: approximate, settings in star.*/apb.*)")
    query_len: int = _f(16, doc="star/apb: the last query_len prompt tokens are the query (anchor, query pass)")
    decode: str = _f("tree", choices=("local", "tree", "ring", "lamina"), sweep=True,
                     doc="decode method in every layer (local needs prefill local; lamina: model and "
                         "attention ranks, settings in lamina.*)")
    new_tokens: int = _f(8, doc="greedy tokens to generate (the first comes from the prefill)")
    prompt_ids: typing.Optional[str] = _f(None, doc="file of prompt token ids (.txt of integers, or .npy); "
                                                    "default: shape.context random ids from inputs.seed")
    prompt_text: typing.Optional[str] = _f(None, doc="prompt text, tokenized with model.path's tokenizer.json")
    kv_placement: str = _f("last", choices=("last", "round_robin"),
                           doc="which rank stores generated tokens' KV")
    prompt_logits: bool = _f(False, doc="with run.save_outputs: also store the logits of every prompt position, "
                                        "prompt_logits (B, context, vocab) float32, gathered to rank 0 after "
                                        "the last repeat (B x context x vocab x 4 bytes: for validation runs)")


@dataclass
class LaminaConfig:
    attention_ranks: int = _f(1, doc="generate.decode=lamina: the last this many ranks hold all KV (head-split, "
                                     "Hkv divisible by it) and run attention; the others hold the weights")
    microbatches: int = _f(1, sweep=True, doc="micro-batches of the rotational staggered pipeline "
                                              "(<= shape.batch)")
    model_device: str = _f("auto", choices=("auto", "cpu", "cuda"), doc="device of the model ranks "
                                                                        "(auto: run.device)")
    attention_device: str = _f("auto", choices=("auto", "cpu", "cuda"),
                               doc="device of the attention ranks (auto: run.device); a mixed pool needs "
                                   "comm.backend=mpi")


@dataclass
class EvalConfig:
    tasks: list[str] = _f(list(EVAL_TASKS), doc="job eval: RULER synthetic tasks (" + ", ".join(EVAL_TASKS) + ")")
    samples: int = _f(10, doc="job eval: prompts per task at each context")
    seed: int = _f(0, doc="job eval: seed of the prompts (sample i of a task is the same for every method)")
    depths: typing.Optional[list[float]] = _f(None, doc="job eval: needle depths in percent, cycled over the "
                                                         "samples; null: RULER's random pick of 40 even depths")
    max_new_tokens: typing.Optional[int] = _f(None, doc="job eval: cap on RULER's tokens to generate per task "
                                                        "(niah 128, vt 30, cwe 120, fwe 50); generation stops "
                                                        "earlier at the tokenizer's end tokens")
    batch_size: int = _f(1, doc="job eval: prompts of one task generated together (shape.batch)")
    chat_template: bool = _f(True, doc="job eval: wrap the task in the model's chat template (when it has one)")


@dataclass
class RunConfig:
    warmup: int = _f(2, doc="untimed iterations per case")
    repeats: int = _f(10, doc="timed iterations per case")
    check: bool = _f(True, doc="compare outputs with the float64 reference on a gathered copy")
    check_rows: int = _f(512, doc="prefill: at most this many query rows are checked (evenly spaced)")
    save_outputs: bool = _f(False, doc="store gathered out/lse of each case in the HDF5 record "
                                       "(generate: the logits of every generated token)")
    output: typing.Optional[str] = _f(None, doc="HDF5 result file (default runs/<job>-<utc time>.h5)")
    device: str = _f("auto", choices=("auto", "cpu", "cuda"), doc="auto: cuda when GPUs are visible")
    cuda_graphs: str = _f("auto", choices=("auto", "true", "false"),
                          doc="decode steps as one CUDA graph (decode local/tree, generate decode; lamina: each "
                              "role's work between two exchanges); auto: where capturable, eager on CPU and "
                              "host-staged MPI collectives; true: error where not")
    decode_products: str = _f("auto", choices=("auto", "gemv", "torch"),
                              doc="the captured decode step's matrix products: auto: hpcattn's Triton gemv "
                                  "(RMSNorm / SiLU fused in) where it beat cuBLAS on an H200, cuBLAS elsewhere; "
                                  "gemv: every product up to 16 rows; torch: cuBLAS (F.linear) for all")
    case_timeout_s: typing.Optional[float] = _f(3600.0, doc="hang watchdog: a case (or set-up) running longer "
                                                            "aborts the job with stacks; null = off")
    memory_check: bool = _f(True, doc="refuse a case whose --dry-run memory estimate exceeds this rank's share of "
                                      "its GPU's free memory (ranks on one GPU split it) or of host RAM; "
                                      "false: try anyway")
    max_cases: int = _f(10000, doc="refuse a sweep of more points x methods than this, before planning it "
                                   "(rank 0 plans about 2000 cases/s while the other ranks wait); raise it "
                                   "to run a bigger sweep")


@dataclass
class Config:
    job: str = _f("decode", choices=JOBS, doc="decode (one query token), prefill, generate (whole model), or eval "
                                              "(RULER task accuracy of the generate methods, eval.*)")
    methods: list[str] = _f(["local", "tree"], doc="attention jobs: methods run on every sweep point; local is "
                                                   "the baseline (generate uses generate.prefill/decode)")
    shape: ShapeConfig = field(default_factory=ShapeConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    kernel: KernelConfig = field(default_factory=KernelConfig)
    tree: TreeConfig = field(default_factory=TreeConfig)
    ring: RingConfig = field(default_factory=RingConfig)
    torch_cp: TorchCPConfig = field(default_factory=TorchCPConfig)
    star: StarConfig = field(default_factory=StarConfig)
    apb: APBConfig = field(default_factory=APBConfig)
    inputs: InputConfig = field(default_factory=InputConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    lamina: LaminaConfig = field(default_factory=LaminaConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)


# --------------------------------------------------------------------------------------------
# Introspection helpers


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def leaf_paths(cls=Config, prefix: str = "") -> dict[str, tuple[Any, dataclasses.Field]]:
    """All leaf fields as ``{"shape.context": (type, field), ...}``."""
    out = {}
    hints = _hints(cls)
    for name, f in _fields(cls).items():
        t = hints[name]
        if dataclasses.is_dataclass(t):
            out.update(leaf_paths(t, prefix + name + "."))
        else:
            out[prefix + name] = (t, f)
    return out


def _type_name(t) -> str:
    origin = typing.get_origin(t)
    if origin is typing.Union:
        args = [a for a in typing.get_args(t) if a is not type(None)]
        return _type_name(args[0]) + " or null"
    if origin is list:
        return f"list of {_type_name(typing.get_args(t)[0])}"
    return getattr(t, "__name__", str(t))


def _check_scalar(value, t, where: str):
    """Return ``value`` converted to type ``t`` or raise ConfigError naming ``where``."""
    origin = typing.get_origin(t)
    if origin is typing.Union:
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if value is None:
            return None
        return _check_scalar(value, args[0], where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected {_type_name(t)}, got {value!r}")
        (inner,) = typing.get_args(t)
        return [_check_scalar(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if t is bool:
        if isinstance(value, bool):
            return value
    elif t is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif t is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif t is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{where}: expected {_type_name(t)}, got {value!r} ({type(value).__name__})")


def _check_value(value, t, f: dataclasses.Field, where: str):
    """Type-check one leaf value; a sweepable field may hold a non-empty list of values."""
    sweep = f.metadata.get("sweep", False)
    if isinstance(value, bool) and t is str and "true" in (f.metadata.get("choices") or ()):
        value = "true" if value else "false"          # YAML reads `true` as a boolean
    if sweep and isinstance(value, list) and typing.get_origin(t) is not list:
        if not value:
            raise ConfigError(f"{where}: a sweep list must not be empty")
        vals = [_check_scalar(v, t, f"{where}[{i}]") for i, v in enumerate(value)]
    else:
        vals = [_check_scalar(value, t, where)]
    choices = f.metadata.get("choices")
    if choices:
        for v in vals:
            if v not in choices:
                raise ConfigError(f"{where}: {v!r} is not one of {', '.join(map(str, choices))}")
    return vals if (sweep and isinstance(value, list) and typing.get_origin(t) is not list) else vals[0]


def _unknown_key(key: str, valid: list[str], where: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else \
        f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"{source}: unknown key '{where}{key}'{hint}")


def _build(cls, data: dict, source: str, prefix: str = ""):
    """Build dataclass ``cls`` from mapping ``data``, strictly."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or '<top level>'}' must be a mapping, "
                          f"got {type(data).__name__}")
    fields = _fields(cls)
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key(str(key), list(fields), prefix, source)
        t = hints[key]
        if dataclasses.is_dataclass(t):
            kwargs[key] = _build(t, value if value is not None else {}, source, prefix + key + ".")
        else:
            kwargs[key] = _check_value(value, t, fields[key], f"{source}: {prefix}{key}")
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# Loading and overrides


def load(path: str | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config file (or defaults when ``path`` is None) and apply ``--set`` overrides."""
    data: dict = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"config file {path} is a directory (expected a YAML file)")
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.load(p.read_text(encoding="utf-8"), Loader=_StrictLoader) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); "
                              f"a config file is UTF-8 YAML") from None
        except _DuplicateKey as e:
            raise ConfigError(f"{path}: duplicate key '{e.key}' (line {e.line}; first at line {e.first}): "
                              f"YAML would silently keep only the last one") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}".splitlines()[0]) from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the config file: {e.strerror or e}") from None
    for item in overrides or []:
        apply_override(data, item)
    return _build(Config, data, source)


class _DuplicateKey(Exception):
    def __init__(self, key, line: int, first: int):
        super().__init__(key)
        self.key, self.line, self.first = key, line, first


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:              # an unhashable key: construct_mapping reports it
                    continue
                if first is not None:
                    raise _DuplicateKey(key, line, first)
                seen[key] = line
        return super().construct_mapping(node, deep)


def apply_override(data: dict, item: str) -> None:
    """Apply one ``key=value`` override (dotted key, YAML-scalar value) to the raw mapping."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. shape.context=65536")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    leaves = leaf_paths()
    if key not in leaves and "." not in key:
        matches = [p for p in leaves if p.rsplit(".", 1)[-1] == key]
        if len(matches) == 1:
            key = matches[0]
        elif len(matches) > 1:
            raise ConfigError(f"--set {key}: ambiguous, use one of {', '.join(matches)}")
    if key not in leaves:
        close = difflib.get_close_matches(key, list(leaves), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"--set: unknown key '{key}'{hint}")
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_dict(data: dict, source: str = "<resolved config>") -> Config:
    return _build(Config, data, source)


# --------------------------------------------------------------------------------------------
# Sweeps


def sweep_axes(cfg: Config) -> dict[str, list]:
    """The sweepable fields that hold lists: ``{"shape.context": [4096, 65536], ...}``."""
    axes = {}
    d = to_dict(cfg)
    for path, (t, f) in leaf_paths().items():
        if not f.metadata.get("sweep"):
            continue
        node = d
        for part in path.split("."):
            node = node[part]
        if isinstance(node, list) and typing.get_origin(t) is not list:
            axes[path] = node
    return axes


def _set_path(d: dict, path: str, value) -> None:
    parts = path.split(".")
    for part in parts[:-1]:
        d = d[part]
    d[parts[-1]] = value


def expand_cases(cfg: Config) -> Iterator[tuple[dict, Config]]:
    """Yield ``(point, concrete_config)`` for every point of the sweep's Cartesian product.

    ``point`` maps each swept path to its value at this point (empty for a config without sweep).
    """
    axes = sweep_axes(cfg)
    names = list(axes)
    base = to_dict(cfg)
    for values in itertools.product(*(axes[n] for n in names)):
        d = copy.deepcopy(base)
        for n, v in zip(names, values):
            _set_path(d, n, v)
        yield dict(zip(names, values)), from_dict(d)


# --------------------------------------------------------------------------------------------
# Validation of concrete configs


def validate(cfg: Config, world_size: int, cuda_available: bool, source: str = "config") -> None:
    """Check one concrete (sweep-expanded) config against the run's world size and device: the
    rules that need the config alone. A run checks each case with :func:`hpcattn.jobs.validate.validate`,
    which adds the rules of the layers above (Lamina's roles, APB's lengths, CUDA-graph capture)."""
    s = cfg.shape
    for name in ("batch", "heads_q", "heads_kv", "head_dim"):
        if getattr(s, name) < 1:
            raise ConfigError(f"{source}: shape.{name} must be >= 1, got {getattr(s, name)}")
    if s.context < 1:
        raise ConfigError(f"{source}: shape.context must be >= 1, got {s.context}")
    if s.heads_q % s.heads_kv:
        raise ConfigError(f"{source}: shape.heads_q ({s.heads_q}) must be a multiple of "
                          f"shape.heads_kv ({s.heads_kv})")
    if not cfg.methods:
        raise ConfigError(f"{source}: methods must list at least one method")
    allowed = METHODS_BY_JOB[cfg.job]
    for m in cfg.methods:
        if m not in allowed:
            close = difflib.get_close_matches(m, allowed, n=2)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"{source}: methods: '{m}' is not a {cfg.job} method "
                              f"(choose from {', '.join(allowed)}){hint}")
    if len(set(cfg.methods)) != len(cfg.methods):
        raise ConfigError(f"{source}: methods lists a method twice: {cfg.methods}")
    lamina = cfg.job == "generate" and cfg.generate.decode == "lamina"
    if cfg.job == "eval":
        _validate_eval(cfg, source)
    if cfg.job in MODEL_JOBS:
        _validate_generate(cfg, world_size - cfg.lamina.attention_ranks if lamina else world_size, source)
    if cfg.job == "prefill" and ("star" in cfg.methods or "apb" in cfg.methods):
        _validate_approx(cfg, world_size, source)
    if s.lengths is not None:
        if cfg.job != "decode" and not lamina:
            raise ConfigError(f"{source}: shape.lengths (ragged batch) is for job: decode, or generate with "
                              f"generate.decode=lamina (ragged prompts)")
        if len(s.lengths) != s.batch:
            raise ConfigError(f"{source}: shape.lengths has {len(s.lengths)} entries, "
                              f"expected shape.batch = {s.batch}")
        if any(n < 0 or n > s.context for n in s.lengths):
            raise ConfigError(f"{source}: shape.lengths entries must be in [0, context={s.context}]")
    if cfg.job == "prefill" and "ring" in cfg.methods and world_size > 1:
        if s.context < world_size:
            raise ConfigError(f"{source}: prefill with ring needs at least one token per rank: "
                              f"context={s.context} < {world_size} ranks")
        if cfg.ring.layout == "zigzag" and s.context % (2 * world_size):
            raise ConfigError(f"{source}: ring.layout=zigzag needs shape.context divisible by "
                              f"2 x ranks = {2 * world_size}, got {s.context} "
                              f"(use another context or ring.layout=contiguous)")
    device = resolve_device(cfg, cuda_available)
    if cfg.job == "prefill" and "torch_cp" in cfg.methods:
        if device != "cuda":
            raise ConfigError(f"{source}: methods: torch_cp (PyTorch's context_parallel) runs on GPUs only "
                              f"(PyTorch has no CPU sharding rule for SDPA); drop it on CPU ranks")
        if s.context % (2 * world_size):
            raise ConfigError(f"{source}: torch_cp shards head-tail: shape.context must be divisible by "
                              f"2 x ranks = {2 * world_size}, got {s.context}")
    if cfg.run.device == "cuda" and not cuda_available:
        raise ConfigError(f"{source}: run.device=cuda but no CUDA GPU is visible")
    if cfg.comm.backend == "nccl" and device != "cuda":
        raise ConfigError(f"{source}: comm.backend=nccl needs GPUs (run.device resolved to {device}); "
                          f"use comm.backend=mpi or gloo on CPU ranks")
    if cfg.comm.backend == "gloo" and device == "cuda":
        raise ConfigError(f"{source}: comm.backend=gloo is the CPU stand-in for nccl; on GPUs use nccl or mpi")
    if device == "cpu" and s.dtype == "float16":
        raise ConfigError(f"{source}: shape.dtype=float16 is not supported on CPU ranks; "
                          f"use float32, float64 or bfloat16")
    if device == "cuda" and s.dtype == "float64" and cfg.kernel.backend not in ("auto", "torch_ref"):
        raise ConfigError(f"{source}: shape.dtype=float64 on GPU needs kernel.backend=torch_ref")
    cpu_kernels = ("auto", "torch_ref", "cpu_flash")
    if cfg.kernel.backend == "lean" and cfg.job != "decode":
        raise ConfigError(f"{source}: kernel.backend=lean is a decode kernel (job: decode only)")
    if device == "cpu" and cfg.kernel.backend not in cpu_kernels:
        raise ConfigError(f"{source}: kernel.backend={cfg.kernel.backend} needs a GPU; "
                          f"on CPU ranks use one of {', '.join(cpu_kernels)}")
    if cfg.comm.staging_pool_mib < 0:
        raise ConfigError(f"{source}: comm.staging_pool_mib must be >= 0, got {cfg.comm.staging_pool_mib}")
    if cfg.comm.ranks_per_node is not None and cfg.comm.ranks_per_node < 1:
        raise ConfigError(f"{source}: comm.ranks_per_node must be >= 1")
    r = cfg.run
    if r.repeats < 1:
        raise ConfigError(f"{source}: run.repeats must be >= 1 (timed repetitions per case), got {r.repeats}")
    if r.warmup < 0:
        raise ConfigError(f"{source}: run.warmup must be >= 0 (untimed repetitions before them), got {r.warmup}")
    if r.check_rows < 1:
        raise ConfigError(f"{source}: run.check_rows must be >= 1 (query rows compared with the reference), "
                          f"got {r.check_rows}; use run.check=false to skip the check")
    if r.case_timeout_s is not None and r.case_timeout_s <= 0:
        raise ConfigError(f"{source}: run.case_timeout_s must be > 0 seconds (or null to turn the watchdog off), "
                          f"got {r.case_timeout_s:g}")
    if cfg.inputs.source == "file" and not cfg.inputs.path:
        raise ConfigError(f"{source}: inputs.source=file needs inputs.path (an HDF5 file with q, k, v)")
    if cfg.inputs.source == "file" and not Path(cfg.inputs.path).is_file():
        raise ConfigError(f"{source}: inputs.path: file not found: {cfg.inputs.path}")


def _validate_approx(cfg: Config, world_size: int, source: str) -> None:
    s = cfg.shape
    if s.query_len < 1:
        raise ConfigError(f"{source}: methods star/apb need query rows: set shape.query_len >= 1")
    if not s.causal:
        raise ConfigError(f"{source}: star/apb are causal prefill methods (shape.causal must be true)")
    if cfg.inputs.source == "file":
        raise ConfigError(f"{source}: star/apb need query rows; inputs.source=file is not supported for them yet")
    if "star" in cfg.methods:
        block = cfg.star.block or s.context // world_size
        anchor = cfg.star.anchor if cfg.star.anchor is not None else block
        if block < 1 or block > s.context:
            raise ConfigError(f"{source}: star.block={block} must be in [1, context={s.context}]")
        if anchor > block:
            raise ConfigError(f"{source}: star.anchor={anchor} must be <= star.block={block}")


def _validate_generate(cfg: Config, world_size: int, source: str) -> None:
    g, s = cfg.generate, cfg.shape
    if g.decode == "local" and g.prefill != "local" and world_size > 1:
        raise ConfigError(f"{source}: generate.decode=local needs generate.prefill=local "
                          f"(after a ring prefill the KV cache is sharded)")
    if g.new_tokens < 1:
        raise ConfigError(f"{source}: generate.new_tokens must be >= 1")
    if g.prompt_logits and not cfg.run.save_outputs:
        raise ConfigError(f"{source}: generate.prompt_logits=true needs run.save_outputs=true (it stores them)")
    if g.prompt_logits and g.decode == "lamina":
        raise ConfigError(f"{source}: generate.prompt_logits is not supported with generate.decode=lamina")
    if g.prefill == "ring" and world_size > 1:
        if s.context < world_size:
            raise ConfigError(f"{source}: ring prefill needs at least one prompt token per rank: "
                              f"context={s.context} < {world_size} ranks")
        if cfg.ring.layout == "zigzag" and s.context % (2 * world_size):
            raise ConfigError(f"{source}: ring.layout=zigzag needs the prompt length (shape.context={s.context}) "
                              f"divisible by 2 x ranks = {2 * world_size}")
    if g.prefill in ("star", "apb"):
        n = s.context - g.query_len
        if world_size < 2:
            raise ConfigError(f"{source}: generate.prefill={g.prefill} needs at least 2 ranks")
        if g.query_len < 1 or n < world_size:
            raise ConfigError(f"{source}: generate.query_len={g.query_len} must be >= 1 and leave at least "
                              f"one context token per rank (prompt length {s.context})")
    validate_model_path(cfg, source)
    if g.prompt_ids is not None and not Path(g.prompt_ids).is_file():
        raise ConfigError(f"{source}: generate.prompt_ids: file not found: {g.prompt_ids}")
    if g.prompt_text is not None and not has_tokenizer(cfg.model.path):
        raise ConfigError(f"{source}: generate.prompt_text needs model.path with a tokenizer.json, or a .gguf file "
                          f"(or give token ids with generate.prompt_ids)")


def validate_model_path(cfg: Config, source: str) -> None:
    """model.path: a checkpoint directory or a .gguf file."""
    path = cfg.model.path
    if path is None:
        return
    if is_gguf(path):
        if not Path(path).is_file():
            raise ConfigError(f"{source}: model.path: GGUF file not found: {path}")
    elif not Path(path).is_dir():
        raise ConfigError(f"{source}: model.path: not a directory (a Hugging Face checkpoint) or a .gguf file: {path}")


def _validate_eval(cfg: Config, source: str) -> None:
    e = cfg.eval
    if cfg.generate.decode == "lamina":
        raise ConfigError(f"{source}: job eval runs generate.decode local, tree or ring (lamina: use job generate)")
    if not has_tokenizer(cfg.model.path):
        raise ConfigError(f"{source}: job eval needs model.path with a tokenizer (a checkpoint directory with "
                          f"tokenizer.json, or a .gguf file)")
    bad = [t for t in e.tasks if t not in EVAL_TASKS]
    if bad or not e.tasks:
        raise ConfigError(f"{source}: eval.tasks: {bad or 'empty'}: choose from {', '.join(EVAL_TASKS)}")
    if e.samples < 1 or e.batch_size < 1:
        raise ConfigError(f"{source}: eval.samples ({e.samples}) and eval.batch_size ({e.batch_size}) must be >= 1")
    if e.max_new_tokens is not None and e.max_new_tokens < 1:
        raise ConfigError(f"{source}: eval.max_new_tokens must be >= 1 or null, got {e.max_new_tokens}")
    if e.depths is not None and (not e.depths or any(not 0 <= d <= 100 for d in e.depths)):
        raise ConfigError(f"{source}: eval.depths must list percentages in [0, 100] (or be null), got {e.depths}")
    if cfg.generate.prompt_ids or cfg.generate.prompt_text or cfg.generate.prompt_logits:
        raise ConfigError(f"{source}: job eval makes its own prompts: drop generate.prompt_ids/prompt_text/"
                          f"prompt_logits")


def resolve_device(cfg: Config, cuda_available: bool) -> str:
    if cfg.run.device == "auto":
        return "cuda" if cuda_available else "cpu"
    return cfg.run.device


def reference_text() -> str:
    """Markdown table of every key, its type, default and meaning (for docs/config.md)."""
    rows = ["| key | type | default | sweep | meaning |", "|---|---|---|---|---|"]
    defaults = to_dict(Config())
    for path, (t, f) in leaf_paths().items():
        node = defaults
        for part in path.split("."):
            node = node[part]
        choices = f.metadata.get("choices")
        typ = _type_name(t) + (f" ({' / '.join(choices)})" if choices else "")
        rows.append(f"| `{path}` | {typ} | `{node!r}` | {'yes' if f.metadata.get('sweep') else ''} "
                    f"| {f.metadata.get('doc', '')} |")
    return "\n".join(rows)
