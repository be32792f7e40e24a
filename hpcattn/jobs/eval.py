"""The eval job (``job: eval``): task accuracy of each prefill/decode method on RULER's synthetic tasks.

Per sweep point (``shape.context``, methods as in the generate job: ``generate.prefill`` /
``generate.decode`` / ``star.*`` / ``apb.*`` sweeps), rank 0 builds ``eval.samples`` prompts of
every task in ``eval.tasks`` with the model's tokenizer and chat template, each exactly
``shape.context`` tokens (:mod:`hpcattn.jobs.ruler`), and broadcasts them. Every case (one method
at the point) then generates greedily for each sample, ``eval.batch_size`` samples of one task at a
time, up to RULER's token count for the task (capped by ``eval.max_new_tokens``), stopping when
every row has produced one of the tokenizer's end tokens. For star/apb prefill the last
``generate.query_len`` prompt tokens are the query (the question, the template's assistant tag and
the answer prefix; the tail of the context too when the question is shorter).

Rank 0 decodes each output up to its end token, scores it as RULER does (string_match_all: the
fraction of the reference strings it contains) and records, per case, the per-sample datasets of
docs/hdf5.md (task, context, needle depth, prompt length, generated text and tokens, the score,
prefill and decode time as the max over ranks) and the accuracy per task (``accuracy_by_task``)
and overall (``accuracy``). ``hpcattn report`` prints them beside the exact method's accuracy;
``hpcattn plot --kind accuracy`` draws accuracy against context and needle depth.
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch

from hpcattn import watchdog
from hpcattn.errors import ConfigError
from hpcattn.jobs.generate import GenerateJob, ignored_config_keys, model_args
from hpcattn.jobs.measure import time_summary
from hpcattn.jobs.record import case_attrs, model_shape, write_case
from hpcattn.jobs.ruler import MAX_NEW, PromptBuilder, Sample, score

EXACT_PREFILL = ("local", "ring")


def new_tokens_of(task: str, cap: int | None) -> int:
    """Tokens generated at most for ``task``: RULER's count, capped by ``eval.max_new_tokens``."""
    return min(MAX_NEW[task], cap) if cap else MAX_NEW[task]


def resolve_eval_shape(cfg) -> None:
    """Rank 0, before validation: shape.heads_*/head_dim from the model, shape.batch from
    eval.batch_size, generate.new_tokens the most any task generates (for the memory estimate),
    run.check off (the eval's measure is accuracy)."""

    e = cfg.eval
    if not cfg.model.path:
        raise ConfigError("job eval: model.path must name a checkpoint with a tokenizer (a directory with "
                          "tokenizer.json, or a .gguf file)")
    a = model_args(cfg)
    cfg.shape.heads_q, cfg.shape.heads_kv, cfg.shape.head_dim = a.n_heads, a.n_kv_heads, a.head_dim
    cfg.shape.batch = e.batch_size
    cfg.run.check = False                     # accuracy is the eval's measure; no logits reference
    cfg.generate.new_tokens = max(new_tokens_of(t, e.max_new_tokens) for t in e.tasks)


def make_samples(cfg, tokenizer) -> list[Sample]:
    """Every sample of the point: for each task, ``eval.samples`` prompts of shape.context tokens."""
    e = cfg.eval
    b = PromptBuilder(tokenizer, chat=e.chat_template)
    return [b.sample(t, cfg.shape.context, e.seed, i, e.depths) for t in e.tasks for i in range(e.samples)]


def batches(samples: list[Sample], size: int) -> list[list[Sample]]:
    """Consecutive runs of at most ``size`` samples of one task."""
    out: list[list[Sample]] = []
    for s in samples:
        if out and out[-1][0].task == s.task and len(out[-1]) < size:
            out[-1].append(s)
        else:
            out.append([s])
    return out


@torch.inference_mode()
def greedy_until_stop(runner, ctx, tokens: torch.Tensor, max_new: int, stop_ids: list[int]):
    """Greedy generation of ``tokens`` (B, N) until every row has produced a stop token or
    ``max_new`` tokens. Collective. Returns (generated (B, n) int64, n <= max_new; prefill seconds;
    decode seconds), the times on this rank, device-synchronised."""
    stop = torch.tensor(stop_ids or [-1], device=tokens.device)
    ctx.sync()
    t0 = time.perf_counter()
    tok = runner.next_token(runner.prefill(tokens, max_new))
    ctx.sync()
    t1 = time.perf_counter()
    out = [tok]
    done = torch.isin(tok, stop)
    while len(out) < max_new and not bool(done.all()):        # tok is rank 0's on every rank
        tok = runner.next_token(runner.decode_step(tok))
        out.append(tok)
        done |= torch.isin(tok, stop)
    ctx.sync()
    return torch.stack(out, dim=1), t1 - t0, time.perf_counter() - t1


def answer_ids(row: list[int], stop_ids: list[int]) -> list[int]:
    """``row`` up to (without) its first stop token."""
    for i, t in enumerate(row):
        if t in stop_ids:
            return row[:i]
    return row


def run_eval_cases(cfg, cases, ctx, kernel_for, writer, progress, model) -> list[dict]:
    """Execute eval cases (collective); rank 0 writes each finished case."""
    from hpcattn.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.path) if ctx.rank == 0 else None
    stop_ids = ctx.world.mpi.bcast(tokenizer.stop_ids if tokenizer else None, root=0)
    made: dict = {}
    rows = []
    for case in cases:
        c = case.cfg
        watchdog.arm(f"case {case.id} (prompts)")
        key = (c.shape.context, tuple(c.eval.tasks), c.eval.samples, c.eval.seed,
               tuple(c.eval.depths or ()), c.eval.chat_template)
        if key not in made:
            made[key] = ctx.world.mpi.bcast(make_samples(c, tokenizer) if ctx.rank == 0 else None, root=0)
        samples = made[key]
        watchdog.arm(f"case {case.id}")
        job = GenerateJob(c, ctx, kernel_for(c), model)
        results = []
        for group in batches(samples, c.eval.batch_size):
            tokens = torch.tensor([s.ids for s in group], dtype=torch.long, device=ctx.device)
            runner = job.runner(case, ctx)
            out, pre_s, dec_s = greedy_until_stop(runner, ctx, tokens, new_tokens_of(group[0].task,
                                                                                     c.eval.max_new_tokens), stop_ids)
            times = ctx.world.mpi.gather((pre_s, dec_s), root=0)
            if ctx.rank == 0:
                pre, dec = max(t[0] for t in times), max(t[1] for t in times)
                for s, row in zip(group, out.cpu().tolist()):
                    results.append((s, row, pre, dec, out.shape[1]))
        if ctx.rank == 0:
            row = _record(case, ctx, job, results, tokenizer, stop_ids, writer)
            rows.append(row)
            progress(case, row)
        del job
    return rows


def _record(case, ctx, job, results, tokenizer, stop_ids, writer) -> dict:
    """Rank 0: the case's attributes and per-sample datasets (docs/hdf5.md), written."""

    c = case.cfg
    a = job.model.args
    width = max(n for *_, n in results)
    texts, scores, toks = [], [], np.full((len(results), width), -1, dtype=np.int64)
    for i, (s, row, *_rest) in enumerate(results):
        ans = answer_ids(row, stop_ids)
        text = tokenizer.decode(ans)
        texts.append(text)
        scores.append(score(text, s.answers))
        toks[i, :len(row)] = row
    scores = np.asarray(scores, dtype=np.float64)
    tasks = [s.task for s, *_ in results]
    pre = np.asarray([r[2] for r in results])
    dec = np.asarray([r[3] for r in results])
    by_task = {t: float(scores[[i for i, x in enumerate(tasks) if x == t]].mean()) for t in dict.fromkeys(tasks)}
    total = pre + dec
    attrs = case_attrs(case, "eval", model_shape(c, a, c.eval.batch_size), job.kernel.name, ctx.size, 0, 1)
    attrs |= {"model": c.model.path, "n_layers": a.n_layers, "prefill": c.generate.prefill,
              "decode": c.generate.decode, "exact": c.generate.prefill in EXACT_PREFILL,
              "query_len": c.generate.query_len, "tasks": list(by_task), "samples_per_task": c.eval.samples,
              "seed": c.eval.seed, "chat_template": c.eval.chat_template,
              "max_new_tokens": c.eval.max_new_tokens, "accuracy": float(scores.mean()),
              "accuracy_by_task": by_task, **time_summary(total, minimum=False),   # one run per sample: no min
              "prefill_median_s": float(np.median(pre)), "decode_median_s": float(np.median(dec)),
              "throughput_tok_s": float(c.shape.context * len(results) / max(pre.sum(), 1e-30)),
              "comm_fraction": 0.0, "check_passed": None, "ignored_config_keys": ignored_config_keys(c)}
    enc = lambda xs: np.asarray([x.encode("utf-8") for x in xs], dtype=bytes)  # noqa: E731
    datasets = {
        "task": (enc(tasks), {}), "sample_index": (np.asarray([s.index for s, *_ in results]), {}),
        "context": (np.full(len(results), c.shape.context), {"units": "tokens"}),
        "prompt_len": (np.asarray([len(s.ids) for s, *_ in results]), {"units": "tokens"}),
        "question_len": (np.asarray([s.question_len for s, *_ in results]), {"units": "tokens"}),
        "depth": (np.asarray([s.depth for s, *_ in results], dtype=np.float64),
                  {"units": "percent", "note": "shallowest asked needle's depth in the context part; NaN: none"}),
        "answers": (enc([json.dumps(s.answers) for s, *_ in results]), {"note": "JSON list of reference strings"}),
        "text": (enc(texts), {"note": "generated text up to the first end token"}),
        "tokens": (toks, {"layout": "(samples, max generated); -1 pads"}),
        "correct": (scores, {"note": "RULER string_match_all: fraction of answers found in text"}),
        "prefill_s": (pre, {"units": "s", "note": "max over ranks; a batch's time for each of its samples"}),
        "decode_s": (dec, {"units": "s", "note": "max over ranks; whole decode of the sample's batch"}),
    }
    return write_case(writer, case, attrs, datasets)
