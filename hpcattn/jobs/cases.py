"""Plan the cases of a run and execute them: warm-up, timed repeats, checks, HDF5 record.

:data:`JOBS` maps each job kind to how its cases run (:func:`run_cases` for decode and prefill,
:func:`run_generate_cases` for generate, :func:`hpcattn.jobs.eval.run_eval_cases` for eval), its
plan estimate (--dry-run and the memory check) and its case variant names (:func:`plan_cases`).

A *case* is one method at one sweep point. Cases of one sweep point share their inputs and
reference. Timing per iteration: device sync + barrier, then CUDA events (GPU) or perf_counter
(CPU) around the method; the reported time of an iteration is the max over ranks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch

import hpcattn
from hpcattn import watchdog
from hpcattn.config import MODEL_JOBS, Config
from hpcattn.config import expand_cases as expand_points
from hpcattn.errors import ConfigError
from hpcattn.jobs import decode, generate, lamina, prefill
from hpcattn.jobs.check import verdict
from hpcattn.jobs.eval import run_eval_cases
from hpcattn.jobs.measure import peak_memory, summarize, time_case
from hpcattn.jobs.params import apb_params
from hpcattn.jobs.prefill import timed_work
from hpcattn.jobs.record import case_attrs, write_case
from hpcattn.timing import PHASES


def model_estimate(cfg: Config, method: str, p: int) -> tuple[int, int, int]:
    """A whole-model case's plan estimate (:func:`hpcattn.jobs.generate.estimate`; a Lamina case's:
    :func:`hpcattn.jobs.lamina.estimate_case`)."""
    return (lamina.estimate_case if method.endswith("+lamina") else generate.estimate)(cfg, method, p)


def model_variant(cfg: Config, method: str, p: int) -> str:
    """A whole-model case's variant name (generate, eval): ring's layout, Star's block and anchor,
    APB's anchor and passing lengths and compressor, tree's reduction and topology, the KV
    placement; a Lamina case's: :func:`hpcattn.jobs.lamina.variant`."""
    if cfg.job == "generate" and cfg.generate.decode == "lamina":
        return lamina.variant(cfg, p)
    parts = []
    if cfg.generate.prefill == "ring" and p > 1:
        parts.append(cfg.ring.layout)
    if cfg.generate.prefill == "star":
        parts.append(f"block{cfg.star.block or 'auto'}-anchor{cfg.star.anchor or 'block'}")
    if cfg.generate.prefill == "apb":
        prm = apb_params(cfg, p, cfg.shape.context - cfg.generate.query_len)
        parts.append(f"la{prm.la}-lp{prm.lp}-{cfg.apb.compressor}")
    if cfg.generate.decode == "tree" and p > 1:
        parts += [cfg.tree.reduction, cfg.tree.topology]
    if cfg.generate.decode != "local" and p > 1:
        parts.append(f"kv-{cfg.generate.kv_placement}")
    return "/".join(parts)


@dataclass
class Case:
    """One method at one sweep point of a run."""

    index: int
    id: str
    method: str
    variant: str
    point: dict
    cfg: Config
    group: int               # index of the sweep point (cases of a group share inputs)


def plan_cases(cfg: Config, p: int) -> list[Case]:
    """Expand the sweep into cases; identical cases (a sweep axis a method ignores) appear once."""
    cases, seen = [], set()
    groups: dict = {}
    for point, c in expand_points(cfg):
        shape = dataclasses.asdict(c.shape)
        if c.job == "decode":
            shape.pop("causal")              # decode ignores it: a causal sweep adds no case
        shape_key = json.dumps(shape, sort_keys=True) + c.kernel.backend + \
            json.dumps(dataclasses.asdict(c.inputs), sort_keys=True)
        methods = c.methods
        if c.job in MODEL_JOBS and p > 1 and c.generate.prefill != "local" and c.generate.decode == "local" \
                and ("generate.prefill" in point or "generate.decode" in point):
            continue                      # impossible pair inside a prefill x decode sweep: skip it
        if c.job in MODEL_JOBS:
            gen = dataclasses.asdict(c.generate)
            shape_key += json.dumps(dataclasses.asdict(c.model), sort_keys=True) + json.dumps(
                {k: v for k, v in gen.items() if k not in ("prefill", "decode", "kv_placement")}, sort_keys=True)
            methods = [f"{c.generate.prefill}+{c.generate.decode}"]
        g = groups.setdefault(shape_key, len(groups))
        for m in methods:
            var = JOBS[c.job].variant(c, m, p)
            key = (shape_key, m, var)
            if key in seen:
                continue
            seen.add(key)
            i = len(cases)
            name = f"c{i:04d}-{m}" + (f"-{var.replace('/', '-')}" if var else "")
            cases.append(Case(i, name, m, var, point, c, g))
    cases.sort(key=lambda cs: (cs.group, cs.index))
    return cases


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"`` (binary units, as --dry-run prints them)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def check_memory(cases: list[Case], p: int, device: torch.device, ranks_on_host: int,
                 ranks_on_device: int = 1) -> None:
    """Refuse (ConfigError) the first case whose memory estimate (the --dry-run ``mem/rank``: the
    busiest rank, rank 0 with what it alone holds for ``run.check`` included) exceeds what this
    rank has: its share of its GPU's free memory (``ranks_on_device`` ranks of this host use that
    GPU), or its share of the host's available RAM (``ranks_on_host`` ranks share it; a cgroup
    limit, e.g. Slurm's --mem, counts). Cases with ``run.memory_check`` false, or a host whose
    available memory is unknown, are not checked."""
    have, what = available_memory(device, ranks_on_host, ranks_on_device)
    if have is None:
        return
    for c in cases:
        if not c.cfg.run.memory_check:
            continue
        need = JOBS[c.cfg.job].estimate(c.cfg, c.method, p)[0]
        if need > have:
            raise ConfigError(f"case {c.id} needs about {format_bytes(need)} per rank (the --dry-run estimate), "
                              f"more than the {format_bytes(have)} {what}; use a smaller shape or more ranks, "
                              f"or --set run.memory_check=false if the estimate is too conservative")


def available_memory(device: torch.device, ranks_on_host: int,
                     ranks_on_device: int = 1) -> tuple[int | None, str]:
    """(bytes this rank may use, what they are); None when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        share = f" / {ranks_on_device} ranks sharing it" if ranks_on_device > 1 else ""
        return int(free) // max(ranks_on_device, 1), f"free on {device}{share}"
    avail = _host_available()
    if avail is None:
        return None, ""
    share = f" / {ranks_on_host} ranks on this host" if ranks_on_host > 1 else ""
    return avail // max(ranks_on_host, 1), f"of available host RAM{share}"


def _host_available() -> int | None:
    """MemAvailable (/proc/meminfo), lowered to the cgroup v2 limit's headroom when there is one."""
    avail = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
    try:                          # this process's cgroup (v2): "0::/path" in /proc/self/cgroup
        rel = next(x for x in open("/proc/self/cgroup").read().splitlines() if x.startswith("0::"))[3:]
        group = Path("/sys/fs/cgroup") / rel.lstrip("/")
        limit = (group / "memory.max").read_text().strip()
        if limit != "max":
            avail = min(avail, max(int(limit) - int((group / "memory.current").read_text()), 0))
    except (OSError, ValueError, StopIteration):
        pass
    return avail


# the record's ``baseline_ran`` of a ``local`` case: how the single-rank baseline was timed
BASELINE_ALONE = "alone: a 1-rank run"
BASELINE_SOLO = "on rank 0; the other ranks asleep (a polled MPI_Ibarrier), not busy-polling"


def run_cases(cfg: Config, cases: list[Case], ctx, kernel_for, writer, progress, model=None) -> list[dict]:
    """Execute decode or prefill ``cases`` on every rank (collective); the cases of a sweep point
    share one job (inputs) and its reference. Rank 0 writes each finished case to ``writer``.

    ``kernel_for(case_cfg)`` returns the local kernel of a case; ``model`` is unused (the table's
    run signature). Returns the summaries (rank 0).
    """
    rows = []
    by_group: dict[int, list[Case]] = {}
    for c in cases:
        by_group.setdefault(c.group, []).append(c)
    for group_cases in by_group.values():
        gcfg = group_cases[0].cfg
        job_cls = ATTENTION_JOBS[gcfg.job]
        kernel = kernel_for(gcfg)
        job = job_cls(gcfg, ctx, kernel)
        ref = job.reference()
        ctx.idle_barrier()              # the other ranks sleep while rank 0 computes the reference
        for case in group_cases:
            watchdog.arm(f"case {case.id}")
            _fault_injection(ctx)
            if ctx.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(ctx.device)
            fn = job.method(case)
            solo = case.method == "local" and ctx.size > 1       # rank 0 alone: the baseline
            result, times, phases, bytes_step = time_case(fn, ctx, case.cfg.run.warmup, case.cfg.run.repeats,
                                                          solo=solo)
            errs = job.errors(case, result, ref)
            err_all = ctx.world.mpi.gather(errs, root=0)
            extras = job.approx_extras(case, result, ref) if hasattr(job, "approx_extras") and \
                case.cfg.run.check else {}
            extras = {**(extras or {}), **(job.graph_attrs(case) if hasattr(job, "graph_attrs") else {})}
            outputs = job.gathered_outputs(case, result) if case.cfg.run.save_outputs else None
            per_rank = ctx.world.mpi.gather((times, phases, [bytes_step[x] for x in PHASES],
                                             peak_memory(ctx.device)), root=0)
            if ctx.rank == 0:
                if case.method == "local":
                    extras = {**extras, "baseline_ran": BASELINE_ALONE if ctx.size == 1 else BASELINE_SOLO}
                row = attention_record(case, kernel, ctx, per_rank, err_all, outputs, writer, extras)
                rows.append(row)
                progress(case, row)
            del fn, result
        del job, ref
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def run_generate_cases(cfg, cases, ctx, kernel_for, writer, progress, model=None) -> list[dict]:
    """Execute generate cases (collective), one at a time over the run's ``model`` (a Lamina case:
    :func:`hpcattn.jobs.lamina.run_lamina_case`); rank 0 writes each finished case."""
    rows, ref_model = [], None
    for case in cases:
        watchdog.arm(f"case {case.id}")
        kernel = kernel_for(case.cfg)
        if case.cfg.generate.decode == "lamina":         # model and attention roles: hpcattn.jobs.lamina
            row, model = lamina.run_lamina_case(case, ctx, kernel, writer, model)
            if row is not None:
                rows.append(row)
                progress(case, row)
            continue
        job = generate.GenerateJob(case.cfg, ctx, kernel, model)
        job.ref_model = ref_model
        model = job.model                      # same weights for every case of the run
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        job.compute_reference(case)
        ctx.idle_barrier()              # the other ranks sleep while rank 0 computes the reference
        toks, logits, prefill_s, decode_s = job.run(case)
        per_rank = ctx.world.mpi.gather((prefill_s, decode_s, peak_memory(ctx.device)), root=0)
        if ctx.rank == 0:
            row = write_case(writer, case, *generate.case_record(case, kernel, ctx, job, toks, logits,
                                                                 job.check(toks, logits) or {}, per_rank))
            rows.append(row)
            progress(case, row)
            ref_model = job.ref_model
        del job
    return rows


class Job(NamedTuple):
    """What the run needs of a job kind (``job:`` in the config)."""

    run: Callable        # run(cfg, cases, ctx, kernel_for, writer, progress, model) -> rows (rank 0), collective
    estimate: Callable   # estimate(cfg, method, p) -> (bytes on the busiest rank, bytes per step, rank 0's share)
    variant: Callable    # variant(cfg, method, p) -> the case's variant name ("" for none)


ATTENTION_JOBS = {"decode": decode.DecodeJob, "prefill": prefill.PrefillJob}
JOBS = {"decode": Job(run_cases, decode.estimate, decode.variant),
        "prefill": Job(run_cases, prefill.estimate, prefill.variant),
        "generate": Job(run_generate_cases, model_estimate, model_variant),
        "eval": Job(run_eval_cases, generate.estimate, model_variant)}


def _fault_injection(ctx, _started=[0]) -> None:  # noqa: B006 (a call counter)
    """Test hooks, no-ops without the variables: ``HPCATTN_TEST_FAIL_RANK=r`` makes rank r raise,
    ``HPCATTN_TEST_HANG_RANK=r`` makes it hang, as its third case starts, after a barrier (rank 0
    has written the first two cases). Tests check that the job ends on every rank, says why, and
    keeps the finished cases."""
    fail, hang = os.environ.get("HPCATTN_TEST_FAIL_RANK"), os.environ.get("HPCATTN_TEST_HANG_RANK")
    if fail is None and hang is None:
        return
    ctx.world.barrier()
    _started[0] += 1
    if _started[0] >= 3 and fail == str(ctx.rank):
        raise RuntimeError("injected failure (HPCATTN_TEST_FAIL_RANK)")
    while _started[0] >= 3 and hang == str(ctx.rank):
        time.sleep(1.0)                       # injected hang (HPCATTN_TEST_HANG_RANK)


def attention_record(case: Case, kernel, ctx, per_rank, err_all, outputs, writer, extras=None) -> dict:
    """Rank 0: the record of a decode or prefill case - the shared attributes
    (:func:`hpcattn.jobs.record.case_attrs`), the time summary over ranks, bytes and peak memory,
    the errors' maxima over ranks, ``extras`` and the verdict - written to ``writer``; returns the row.
    ``per_rank``: each rank's (times (repeats,), phases (repeats, P), bytes per phase, peak memory);
    ``err_all``: each rank's error figures (None: not checked there)."""
    times = np.stack([pr[0] for pr in per_rank], axis=1)              # (repeats, ranks)
    phases = np.stack([pr[1] for pr in per_rank], axis=1)             # (repeats, ranks, P)
    bytes_ = np.asarray([pr[2] for pr in per_rank], dtype=np.int64)   # (ranks, P)
    mem = np.asarray([pr[3] for pr in per_rank], dtype=np.int64)
    s = case.cfg.shape
    shape = {"batch": s.batch, "heads_q": s.heads_q, "heads_kv": s.heads_kv, "head_dim": s.head_dim,
             "context": s.context, "lengths": s.lengths, "dtype": s.dtype,
             "causal": s.causal if case.cfg.job == "prefill" else False, "query_len": s.query_len}
    attrs = case_attrs(case, case.cfg.job, shape, kernel.name, ctx.size, case.cfg.run.warmup, case.cfg.run.repeats)
    attrs |= {"bytes_per_step": int(bytes_.sum(axis=1).max()), "peak_mem_bytes": int(mem.max())}
    attrs |= summarize(times, phases)
    if case.cfg.job == "prefill":
        attrs["timed_work"] = timed_work(case.method)
    errs = [e for e in err_all if e is not None]
    if errs:
        attrs |= {k: max(x[k] for x in errs) for k in errs[0]}
    if extras:                 # approximate methods: the check is on the exact query pass
        attrs |= extras
    if errs:
        attrs |= verdict(attrs)                     # check_passed, check_reason
    datasets = {"time_s": (times, {"units": "s", "warmup_excluded": case.cfg.run.warmup}),
                "phase_s": (phases, {"units": "s", "phases": list(PHASES)}),
                "bytes_per_step": (bytes_, {"units": "bytes", "phases": list(PHASES)}),
                "peak_mem_bytes": (mem, {"units": "bytes"})}
    if outputs:
        datasets |= {k: (v, {"layout": "out (B,Sq,Hq,d); lse (B,Hq,Sq)"}) for k, v in outputs.items()}
    return write_case(writer, case, attrs, datasets)


def run_metadata(cfg: Config, ctx, kernel_name: str) -> dict:
    """Root attributes of the record: versions, launcher view, transport."""
    import h5py
    import mpi4py
    from mpi4py import MPI

    def git(*args):
        try:
            here = os.path.dirname(os.path.dirname(os.path.abspath(hpcattn.__file__)))
            return subprocess.run(["git", "-C", here, *args], capture_output=True, text=True,
                                  timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    try:
        import flash_attn
        fa = flash_attn.__version__
    except ImportError:
        fa = ""
    cuda = torch.cuda.is_available()
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if cuda else ""
    return {
        "software": "hpcattn", "hpcattn_version": hpcattn.__version__, "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": " ".join(sys.argv),
        "job": cfg.job, "torch": torch.__version__, "cuda": torch.version.cuda or "",
        "cudnn": str(torch.backends.cudnn.version() or "") if cuda else "", "nccl": nccl,
        "flash_attn": fa, "mpi4py": mpi4py.__version__, "mpi_vendor": "/".join(map(str, MPI.get_vendor())),
        "mpi_library": MPI.Get_library_version().strip().splitlines()[0],
        "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version,
        "world_size": ctx.size, "n_nodes": len(ctx.node_ranks), "device": ctx.device.type,
        "backend": ctx.backend, "transport": ctx.transport, "gpu_aware_mpi": ctx.gpu_aware,
        "gpu_aware_method": ctx.gpu_aware_method, "attn_backend": kernel_name,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
        "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID", ""),
        "modules": os.environ.get("LOADEDMODULES", ""),
    }


def host_info(ctx) -> dict:
    """This rank's row of /meta/hosts (gathered to rank 0)."""
    gpu = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else ""
    env_rank = next((os.environ[v] for v in ("SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
                     if v in os.environ), "")
    return {"rank": ctx.rank, "local_rank": ctx.local_rank, "node": ctx.node_index,
            "hostname": socket.gethostname(), "device": str(ctx.device), "gpu_name": gpu,
            "launcher_rank": env_rank}
