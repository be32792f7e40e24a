"""The generate job: prefill a prompt and greedily decode ``generate.new_tokens`` tokens with a
Llama-family model whose attention runs distributed across the ranks.

Per case (prefill method + decode method at one sweep point), after ``run.warmup`` untimed
generations, ``run.repeats`` timed ones record the prefill time and every decode step's time
(device-synchronised, per rank; reported as max over ranks), the tokens, peak memory, and the
throughput as the APB paper counts it: (input + generated tokens) / (prefill + decode wall time).

With ``run.check`` rank 0 also runs the model in one process (local prefill and decode, no
communication) and checks the case with the attention jobs' rule (see :meth:`GenerateJob.check`):

* reference: a one-process run of the same weights in float64 (float32 for a bfloat16/float16
  model on a GPU, where a float64 copy would need 4x the memory), fed the case's own tokens
  (teacher forcing, so a near-tie that flips one token does not make every later logit
  incomparable); baseline: the same forced one-process run in the case's dtype;
* ``logits_max_err = max |logits - reference|``, ``logits_base_err`` the baseline's; the logits
  pass when ``logits_max_err <= 2 * logits_base_err + 1e-5`` (both finite);
* tokens: wherever the reference's top-2 logit margin exceeds twice that tolerance (there no
  logits within the tolerance can choose another token), the case's token must be the reference's
  argmax (``tokens_decided`` such positions, ``tokens_mismatched`` of them differ);
* with ``generate.prompt_logits``, the gathered logits of every prompt position by the same rule
  (``prompt_logits_max_err`` against ``prompt_logits_base_err``).

Exact methods get ``check_passed`` (every dtype) and ``check_reason``; star/apb prefill are
approximate, so their figures are fidelity, and ``check_passed`` is None (no verdict).
``token_agreement`` is the fraction of tokens equal to a free-running one-process run in the
case's dtype (what a user would see). A non-finite checkpoint weight is an input error
(:func:`build_checked_model`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from pathlib import Path

import numpy as np
import torch

from hpcattn.checkpoint_paths import has_tokenizer
from hpcattn.config import resolve_device
from hpcattn.dtypes import DTYPES
from hpcattn.errors import ConfigError, InputError
from hpcattn.jobs.check import failure, max_err, require_finite, tolerance
from hpcattn.jobs.measure import time_summary, timed_repeats
from hpcattn.jobs.record import case_attrs, model_shape
from hpcattn.kernels import select_kernel


# -- prompts and shapes ----------------------------------------------------------------------------

def model_args(cfg):
    from hpcattn.model.llama import ModelArgs
    from hpcattn.model.weights import checkpoint_config

    if cfg.model.path:
        a = checkpoint_config(cfg.model.path)[0]
    else:
        a = ModelArgs.from_preset(cfg.model.preset)
    if cfg.model.layers is not None:
        a.n_layers = cfg.model.layers
    return a


def ignored_config_keys(cfg) -> list[str]:
    """Keys of model.path's config.json (or GGUF metadata) the loader ignored (the record's
    ``ignored_config_keys``; :func:`hpcattn.model.hf_config.read_hf_config`)."""
    from hpcattn.model.weights import checkpoint_config

    return checkpoint_config(cfg.model.path)[1] if cfg.model.path else []


def prompt_ids(cfg) -> torch.Tensor | None:
    """The prompt from generate.prompt_ids / prompt_text as (B, N) int64 (B = shape.batch rows
    unless the file holds a 2-D array), or None for a synthetic prompt."""
    g = cfg.generate
    if g.prompt_text is not None:
        from hpcattn.model.tokenizer import load_tokenizer
        ids = load_tokenizer(cfg.model.path).encode(g.prompt_text)
        arr = np.asarray(ids, dtype=np.int64)
    elif g.prompt_ids is not None:
        p = Path(g.prompt_ids)
        try:
            arr = np.load(p) if p.suffix == ".npy" else np.asarray(p.read_text().split(), dtype=np.int64)
        except (ValueError, OSError) as e:
            raise InputError(f"generate.prompt_ids: {p}: expected integers (.txt) or an .npy array: {e}") from None
    else:
        return None
    arr = np.asarray(arr, dtype=np.int64)
    if arr.ndim == 1:
        arr = np.broadcast_to(arr, (cfg.shape.batch, arr.shape[0]))
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise InputError(f"generate prompt: expected a non-empty 1-D or 2-D array of ids, got shape {arr.shape}")
    return torch.from_numpy(np.array(arr, dtype=np.int64, copy=True))


def resolve_shape(cfg) -> None:
    """Rank 0, before validation: shape.heads_*/head_dim from the model, context/batch from the prompt."""
    a = model_args(cfg)
    cfg.shape.heads_q, cfg.shape.heads_kv, cfg.shape.head_dim = a.n_heads, a.n_kv_heads, a.head_dim
    ids = prompt_ids(cfg)
    if ids is not None:
        if int(ids.max()) >= a.vocab_size or int(ids.min()) < 0:
            raise InputError(f"generate prompt: token ids must be in [0, {a.vocab_size}), "
                             f"got [{int(ids.min())}, {int(ids.max())}]")
        cfg.shape.batch, cfg.shape.context = int(ids.shape[0]), int(ids.shape[1])


def build_checked_model(cfg, dtype: torch.dtype, device):
    """:func:`hpcattn.model.weights.build_model`, then every weight must be finite in ``dtype``
    (a NaN/Inf in the checkpoint, or a value that overflows float16): InputError naming the
    tensor and the checkpoint."""
    from hpcattn.model.hf_config import ignored_note
    from hpcattn.model.weights import build_model, hf_names

    model = build_model(cfg, dtype, device)
    ignored = ignored_config_keys(cfg)
    if ignored:                  # the job's logger prints on rank 0 only: once per run
        logging.getLogger("hpcattn").info(ignored_note(ignored, f"model.path {cfg.model.path}"))
    if cfg.model.path:
        names = hf_names(model.args)
        for ours, p in model.named_parameters():
            require_finite(p.detach(), f"model.path: {cfg.model.path}: tensor {names.get(ours, ours)} "
                                       f"(as {str(p.dtype).replace('torch.', '')})")
    return model


def reference_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The generate check's reference precision (float32 for a low-precision model on a GPU)."""
    low = dtype in (torch.bfloat16, torch.float16)
    return torch.float32 if low and device.type == "cuda" else torch.float64


def synthetic_prompt(cfg, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(cfg.inputs.seed)
    return torch.randint(0, vocab, (cfg.shape.batch, cfg.shape.context), generator=g)


# -- the job -----------------------------------------------------------------------------------------

class GenerateJob:
    """Model, prompt and reference of one sweep point on this rank."""

    def __init__(self, cfg, ctx, kernel, model=None):
        from hpcattn.model.weights import build_model

        self.cfg, self.ctx, self.kernel = cfg, ctx, kernel
        self.dtype = DTYPES[cfg.shape.dtype]
        self.model = model if model is not None else build_model(cfg, self.dtype, ctx.device)
        ids = prompt_ids(cfg)
        self.tokens = (ids if ids is not None else synthetic_prompt(cfg, self.model.args.vocab_size)).to(ctx.device)
        self.reference = None
        self.ref_model = None             # the reference-precision copy of the model (rank 0, built once)
        self.graph_cache: dict = {}          # captured decode steps, reused by every repeat
        self.graph_attrs: dict = {}
        self.prompt_logits = None            # rank 0, generate.prompt_logits: (B, N, vocab) float32

    def runner(self, case, ctx=None, prefill=None, decode=None, prompt_logits=False):
        from hpcattn.model.options import ApproxOptions, RunnerOptions
        from hpcattn.model.runner import ModelRunner

        from hpcattn.jobs.params import apb_params

        c = case.cfg
        p = ctx.size if ctx is not None else 1
        approx = ApproxOptions(query_len=c.generate.query_len, star_block=c.star.block, star_anchor=c.star.anchor,
                               star_quirk=c.star.compat_remote_causal_quirk,
                               apb=apb_params(c, p, c.shape.context - c.generate.query_len),
                               compressor=self.compressor(c), apb_seed=c.apb.seed)
        opts = RunnerOptions(prefill=prefill or c.generate.prefill, decode=decode or c.generate.decode,
                             layout=c.ring.layout, reduction=c.tree.reduction, topology=c.tree.topology,
                             placement=c.generate.kv_placement,
                             cuda_graphs=c.run.cuda_graphs if ctx is not None else "false",
                             decode_products=c.run.decode_products, prompt_logits=prompt_logits, approx=approx)
        return ModelRunner(self.model, ctx, self.kernel, opts, graph_cache=self.graph_cache)

    def compressor(self, c):
        """The APB compressor kind of case config ``c`` (retaining heads of every layer, read once)."""
        if c.apb.compressor != "retaining_heads" or c.generate.prefill != "apb":
            return c.apb.compressor
        if getattr(self, "_heads", None) is None:
            from hpcattn.jobs.params import apb_compressor_kind

            a = self.model.args
            self._heads = apb_compressor_kind(c, a.n_heads, a.n_kv_heads, a.head_dim, list(range(a.n_layers)))
        return self._heads

    def compute_reference(self, case) -> None:
        """Rank 0: free-running one-process generation in the case's dtype (token_agreement)."""
        if self.ctx.rank != 0 or not self.cfg.run.check:
            return
        toks, logits = self.runner(case, None, "local", "local").generate(self.tokens, self.cfg.generate.new_tokens)
        self.reference = (toks.cpu(), logits.cpu())

    @torch.inference_mode()
    def forced_logits(self, model, kernel, toks: torch.Tensor) -> torch.Tensor:
        """One process, local prefill and decode of ``model``, fed ``toks`` (B, n) instead of its
        own choices: the float32 logits (n, B, V) each of the n tokens was chosen from."""
        from hpcattn.model.runner import ModelRunner

        r = ModelRunner(model, None, kernel, prefill="local", decode="local")
        out = [r.prefill(self.tokens, toks.shape[1])]
        for t in range(toks.shape[1] - 1):
            out.append(r.decode_step(toks[:, t].to(self.ctx.device)))
        return torch.stack(out).cpu()

    @torch.inference_mode()
    def one_process_prompt_logits(self, model, kernel) -> torch.Tensor:
        """One process, local prefill of ``model``: float32 logits (B, N, V) of every prompt position."""
        from hpcattn.model.runner import ModelRunner

        r = ModelRunner(model, None, kernel, prefill="local", decode="local", prompt_logits=True)
        r.prefill(self.tokens, 1)
        return r.gather_prompt_logits()

    def _reference(self):
        """(model, kernel, dtype name) of the reference precision; model and kernel None when the
        case already runs in it (its own one-process run is then the reference)."""
        rd = reference_dtype(self.dtype, self.ctx.device)
        name = str(rd).replace("torch.", "")
        if rd == self.dtype:
            return None, None, name
        if self.ref_model is None:
            self.ref_model = copy.deepcopy(self.model).to(rd)          # RoPE stays exact (Transformer._apply)
        return self.ref_model, select_kernel("torch_ref", self.ctx.device, rd, self.model.args.head_dim), name

    def _reference_logits(self, toks: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, str]:
        """(reference logits (n, B, V) along ``toks``, its dtype name); ``base`` when the case is
        already in the reference dtype."""
        model, kernel, name = self._reference()
        return (base if model is None else self.forced_logits(model, kernel, toks)), name

    def _prompt_figures(self) -> tuple[dict, str]:
        """With ``generate.prompt_logits``: the gathered prompt logits against the one-process
        reference at every prompt position, baseline the one-process run in the case's dtype
        (the logits rule of the module docstring). Returns (figures, failure reason or "")."""
        if self.prompt_logits is None:
            return {}, ""
        base = self.one_process_prompt_logits(self.model, self.kernel)
        model, kernel, _ = self._reference()
        ref = base if model is None else self.one_process_prompt_logits(model, kernel)
        err, base_err = max_err(self.prompt_logits, ref), max_err(base, ref)
        return ({"prompt_logits_max_err": err, "prompt_logits_base_err": base_err},
                failure("prompt_logits_max_err", err, "prompt_logits_base_err", base_err))

    def check(self, toks, logits) -> dict | None:
        """Rank 0: the figures and verdict of the module docstring (None without ``run.check``).
        toks (B, n) int64, logits (n, B, V) float32: the case's tokens and their logits."""
        if self.reference is None:
            return None
        toks, logits = toks.cpu(), logits.cpu()
        free_toks, free_logits = self.reference
        # forced along the case's tokens; when they are the free run's, that run is the forced one
        base = free_logits if torch.equal(toks, free_toks) else self.forced_logits(self.model, self.kernel, toks)
        ref, ref_name = self._reference_logits(toks, base)
        # per step: float64 copies of one (B, V) step at a time, not of all (n, B, V) logits
        err = max(max_err(a, r) for a, r in zip(logits, ref))
        base_err = max(max_err(a, r) for a, r in zip(base, ref))
        tol = tolerance(base_err)
        top2 = ref.topk(2, dim=-1).values if ref.shape[-1] > 1 else None
        decided = (top2[..., 0] - top2[..., 1] > 2 * tol) if top2 is not None and np.isfinite(tol) \
            else torch.zeros(ref.shape[:2], dtype=torch.bool)                       # (n, B)
        mismatched = int(((toks.T != ref.argmax(dim=-1)) & decided).sum())
        prompt, prompt_why = self._prompt_figures()
        why = [failure("logits_max_err", err, "logits_base_err", base_err), prompt_why]
        if mismatched:
            why.append(f"{mismatched} of {int(decided.sum())} decided token(s) differ from the "
                       f"{ref_name} reference's argmax (top-2 margin > 2 * tolerance {tol:.3g})")
        why = [w for w in why if w]
        exact = self.cfg.generate.prefill not in ("star", "apb")
        return {"token_agreement": float((toks == free_toks).double().mean()), "logits_max_err": err,
                "logits_base_err": base_err, "logits_rel_err": err / max(float(ref.abs().max()), 1e-30),
                "reference_dtype": ref_name, "tokens_decided": int(decided.sum()),
                "tokens_mismatched": mismatched, "check_passed": (not why) if exact else None,
                "check_reason": "; ".join(why) if exact else ""} | prompt

    def run(self, case):
        """Warm-up + timed repeats. Returns (tokens, logits, prefill_s (R,), decode_s (R, steps)).
        With ``generate.prompt_logits`` the last repeat's prompt logits are then gathered (untimed)
        to ``self.prompt_logits`` on rank 0."""
        c = case.cfg
        n = c.generate.new_tokens
        spans: dict[str, list[float]] = {"prefill": [], "decode": []}

        @contextlib.contextmanager
        def timer(name):
            self.ctx.sync()
            t0 = time.perf_counter()
            yield
            self.ctx.sync()
            spans[name].append(time.perf_counter() - t0)

        last = c.run.warmup + c.run.repeats - 1
        kept: dict = {}                      # the last generation's runner, tokens and logits

        def one(i):
            for v in spans.values():
                v.clear()
            runner = self.runner(case, self.ctx, prompt_logits=c.generate.prompt_logits and i == last)
            kept["runner"] = runner          # the previous runner (and its cache) is freed here
            kept["out"] = runner.generate(self.tokens, n, timer)
            self.graph_attrs = runner.graph_attrs()
            return spans["prefill"][0], list(spans["decode"])

        runs = timed_repeats(self.ctx, c.run.warmup, c.run.repeats, one)
        if c.generate.prompt_logits:
            self.prompt_logits = kept["runner"].gather_prompt_logits()
        toks, logits = kept["out"]
        return (toks, logits, np.asarray([p for p, _ in runs]),
                np.asarray([d for _, d in runs], dtype=np.float64).reshape(c.run.repeats, n - 1))


def case_record(case, kernel, ctx, job, toks, logits, check: dict, per_rank) -> tuple[dict, dict]:
    """Rank 0: (attributes, datasets) of a generate case's record: the shared attributes
    (:func:`hpcattn.jobs.record.case_attrs`), the model, the time summary of whole generations,
    prefill and decode step medians, throughput, ``check``'s figures and the graph attributes.
    ``per_rank``: each rank's (prefill_s (R,), decode_s (R, steps), peak memory)."""
    c = case.cfg
    a = job.model.args
    pre = np.stack([pr[0] for pr in per_rank], axis=1)                   # (R, ranks)
    dec = np.stack([pr[1] for pr in per_rank], axis=2)                   # (R, steps, ranks)
    mem = np.asarray([pr[2] for pr in per_rank], dtype=np.int64)
    pre_max, dec_max = pre.max(axis=1), dec.max(axis=2)                  # max over ranks
    total = pre_max + dec_max.sum(axis=1)
    B, N, n = c.shape.batch, c.shape.context, c.generate.new_tokens
    attrs = case_attrs(case, "generate", model_shape(c, a, B), kernel.name, ctx.size, c.run.warmup, c.run.repeats)
    attrs |= {"model": c.model.path or c.model.preset, "n_layers": a.n_layers, "new_tokens": n,
              "kv_placement": c.generate.kv_placement, **time_summary(total),
              "prefill_median_s": float(np.median(pre_max)),
              "decode_step_median_s": float(np.median(dec_max)) if dec_max.size else 0.0,
              "throughput_tok_s": float(B * (N + n) / np.median(total)), "comm_fraction": 0.0,
              "peak_mem_bytes": int(mem.max())}
    attrs |= check | job.graph_attrs
    attrs["ignored_config_keys"] = ignored_config_keys(c)
    tok_np = toks.cpu().numpy()
    attrs["text"] = decoded_text(c, tok_np[0].tolist())
    datasets = {"time_s": (total[:, None].repeat(ctx.size, axis=1), {"units": "s", "note": "whole generation"}),
                "prefill_s": (pre, {"units": "s"}), "decode_step_s": (dec, {"units": "s"}),
                "tokens": (tok_np, {"layout": "(B, new_tokens)"}), "peak_mem_bytes": (mem, {"units": "bytes"})}
    if c.run.save_outputs:
        datasets["logits"] = (logits.float().cpu().numpy(), {"layout": "(new_tokens, B, vocab)"})
    if job.prompt_logits is not None:
        datasets["prompt_logits"] = (job.prompt_logits.numpy(), {"layout": "(B, context, vocab)"})
    return attrs, datasets


def decoded_text(cfg, ids: list[int]) -> str:
    """``ids`` as text with model.path's tokenizer; "" without one (or without the package)."""
    from hpcattn.model.tokenizer import load_tokenizer

    if not has_tokenizer(cfg.model.path):
        return ""
    try:
        return load_tokenizer(cfg.model.path).decode(ids)
    except ConfigError:                       # no tokenizers package: the tokens are recorded anyway
        return ""


def weight_bytes(a, element_size: int) -> int:
    """Bytes of a model's weights (embedding + head, per layer attention, FFN and norms)."""
    return element_size * (2 * a.vocab_size * a.dim + a.n_layers * (
        a.dim * a.head_dim * (a.n_heads * 2 + a.n_kv_heads * 2) + 3 * a.dim * a.ffn_dim + 2 * a.dim))


def reference_bytes(cfg, a, tokens: int, case_kv: int) -> int:
    """Rank 0's bytes for ``run.check`` beyond the case's own (:meth:`GenerateJob.check`): the
    reference-precision copy of the weights (float64 on CPU; float32 for a bfloat16/float16 model
    on a GPU; none when the case already runs in it), the KV cache of a one-process run over all
    ``tokens`` in that precision less the case's own ``case_kv`` bytes (freed by then), and three
    (new_tokens, B, vocab) float32 logits (the free-running reference's, the case's, the forced
    reference's). 0 without ``run.check``."""
    if not cfg.run.check:
        return 0

    dtype = DTYPES[cfg.shape.dtype]
    rd = reference_dtype(dtype, torch.device(resolve_device(cfg, torch.cuda.is_available())))
    re = torch.empty(0, dtype=rd).element_size()
    copy = weight_bytes(a, re) if rd != dtype else 0
    kv = 2 * a.n_layers * cfg.shape.batch * tokens * a.n_kv_heads * a.head_dim * re
    return copy + max(kv - case_kv, 0) + 3 * cfg.generate.new_tokens * cfg.shape.batch * a.vocab_size * 4


def estimate(cfg, method: str, p: int) -> tuple[int, int, int]:
    """(bytes of weights + KV cache on the busiest rank, payload bytes per rank per decode step,
    the part of the first that is rank 0's alone: its ``run.check`` reference (:func:`reference_bytes`)
    and, with ``generate.prompt_logits``, the gathered (B, context, vocab) float32 prompt logits)."""
    a = model_args(cfg)
    e = torch.empty(0, dtype=DTYPES[cfg.shape.dtype]).element_size()
    weights = weight_bytes(a, e)
    n = cfg.shape.context + cfg.generate.new_tokens
    prefill, decode = method.split("+")
    per_rank = n if (prefill == "local" and decode == "local") or p == 1 else -(-n // p) + cfg.generate.new_tokens
    kv = 2 * a.n_layers * cfg.shape.batch * per_rank * a.n_kv_heads * a.head_dim * e
    ref = reference_bytes(cfg, a, n, kv)
    if cfg.generate.prompt_logits:          # (B, context, vocab) float32: rank 0's gathered ones, and
        # with run.check the one-process baseline's and reference's
        ref += (3 if cfg.run.check else 1) * cfg.shape.batch * cfg.shape.context * a.vocab_size * 4
    state = cfg.shape.batch * a.n_heads * (a.head_dim + 1) * 4
    # per decode step: tree sends one state per layer; ring moves every other rank's KV shard
    step = {"tree": a.n_layers * state, "ring": (p - 1) * kv, "local": 0}[decode] if p > 1 else 0
    return weights + kv + ref, step, ref
