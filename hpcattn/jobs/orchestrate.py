"""``hpcattn run``: the run's orchestration on every rank, in order.

Rank 0 loads, completes and validates the config and plans the cases (:func:`_resolve`; ``--dry-run``
prints the plan, :func:`_print_plan`); then every rank sets up its communicators, checks the memory
each case needs, self-tests its kernels, builds the model (generate), opens the record (rank 0) and
runs the cases (the job kind's entry of :data:`hpcattn.jobs.cases.JOBS`).
Every collective step goes through the MPI error policy of :mod:`hpcattn.collective`: any rank's
failure is one line and status 2 on every rank. Moved out of ``cli.py``, which parses and looks up
the command.
"""

from __future__ import annotations

import faulthandler
import logging
import math
import socket
import sys
import time
from pathlib import Path

from hpcattn import config, watchdog
from hpcattn.collective import Collective, abort_on_error, collective_check, message, reading, root_check
from hpcattn.errors import ConfigError, HpcattnError, check_utf8_path
from hpcattn.launch import refuse_split_launch

log = logging.getLogger("hpcattn")


def _setup_logging(rank: int, debug: bool) -> None:
    handler = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
    handler.setFormatter(logging.Formatter(f"[r{rank}] %(message)s" if debug else "%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if rank == 0 else (logging.DEBUG if debug else logging.ERROR))
    log.propagate = False


def _resolve(args, world_size: int):
    """Rank 0: load, complete and validate the config; plan the cases. Raises HpcattnError
    (an unexpected exception while reading an input names that input: :func:`reading`)."""
    import torch

    from hpcattn.jobs.inputs import apply_file_shape
    from hpcattn.jobs.cases import plan_cases
    from hpcattn.jobs.validate import validate

    if args.ranks is not None and (not args.dry_run or args.ranks < 1):
        raise HpcattnError(f"--ranks {args.ranks}: " + ("must be >= 1" if args.dry_run else
                                                        "is for --dry-run (a run uses the MPI world)"))
    with reading(f"config {args.config}"):
        cfg = config.load(args.config, args.set)
    if args.output:
        cfg.run.output = args.output
    if not cfg.run.output:
        cfg.run.output = f"runs/{cfg.job}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.h5"
    for what, path in (("output", cfg.run.output), ("inputs.path", cfg.inputs.path),
                       ("model.path", cfg.model.path), ("model.preset", cfg.model.preset),
                       ("generate.prompt_ids", cfg.generate.prompt_ids),
                       ("apb.retaining_heads_path", cfg.apb.retaining_heads_path)):
        if path:
            check_utf8_path(what, path)
    if not args.dry_run:
        from hpcattn.results.hdf5 import check_output_collision, check_output_path
        check_output_collision(cfg.run.output, *files_read(args.config, cfg))
        check_output_path(cfg.run.output)
    if cfg.job not in config.MODEL_JOBS and not cfg.methods:
        raise HpcattnError(f"{args.config}: methods must list at least one method "
                           f"(choose from {', '.join(config.METHODS_BY_JOB[cfg.job])})")
    if cfg.inputs.source == "file" and cfg.inputs.path:
        if not Path(cfg.inputs.path).is_file():
            raise HpcattnError(f"{args.config}: inputs.path: file not found: {cfg.inputs.path}")
        with reading(f"inputs.path {cfg.inputs.path}"):
            apply_file_shape(cfg, cfg.inputs.path)
    if cfg.job == "eval":
        from hpcattn.jobs.eval import resolve_eval_shape
        with reading(f"model.path {cfg.model.path}"):
            resolve_eval_shape(cfg)
    if cfg.job == "generate":
        from hpcattn.jobs.generate import resolve_shape
        model = f"model.path {cfg.model.path}" if cfg.model.path else f"model.preset {cfg.model.preset}"
        prompt = cfg.generate.prompt_ids or ("generate.prompt_text" if cfg.generate.prompt_text else "")
        with reading(model + (f" or the prompt ({prompt})" if prompt else "")):
            resolve_shape(cfg)
    cuda = torch.cuda.is_available()
    if args.dry_run and (cfg.run.device == "cuda" or cfg.comm.backend == "nccl"):
        cuda = True            # planning a GPU job on a CPU login node
    p = args.ranks if args.ranks else world_size
    _check_sweep_size(cfg, args.config)
    cases = plan_cases(cfg, p)
    for c in cases:
        validate(c.cfg, p, cuda, source=args.config)
    if cfg.comm.ranks_per_node and p % cfg.comm.ranks_per_node:
        raise HpcattnError(f"{args.config}: comm.ranks_per_node={cfg.comm.ranks_per_node} does not divide "
                           f"the {p} ranks")
    return config.to_dict(cfg), p


SWEEP_SAY = 1000           # a sweep of more cases than this says how many before planning them


def _check_sweep_size(cfg, source: str) -> None:
    """Rank 0, before planning: say how many cases a big sweep has, and refuse more than
    ``run.max_cases`` (ConfigError naming the axes)."""
    axes = config.sweep_axes(cfg)
    points = math.prod(len(v) for v in axes.values())
    methods = 1 if cfg.job == "generate" else max(len(cfg.methods), 1)
    total = points * methods
    sizes = " x ".join(f"{k} ({len(v)})" for k, v in axes.items())
    if total > SWEEP_SAY:
        log.info(f"hpcattn: planning {total} cases ({points} points: {sizes}; x {methods} method(s))")
        for h in log.handlers:
            h.flush()
    if total > cfg.run.max_cases:
        raise ConfigError(f"{source}: the sweep has {total} cases ({points} points: {sizes}; x {methods} method(s)), "
                          f"more than run.max_cases = {cfg.run.max_cases}; narrow the sweep, or --set "
                          f"run.max_cases={total} to plan it (about {max(total // 2000, 1)} s on rank 0)")


def files_read(config_path: str, cfg) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The files a run of ``cfg`` reads, which -o must never name: ([(what, path)], [(what, folder
    whose files it reads)]). (Path keys are not sweep axes.) ``hpcattn project -o`` checks the same."""
    from hpcattn.model.llama import preset_dirs

    files, dirs = [("the config file", config_path)], []
    if cfg.inputs.source == "file" and cfg.inputs.path:
        files.append(("inputs.path", cfg.inputs.path))
    if cfg.apb.retaining_heads_path:
        files.append(("apb.retaining_heads_path", cfg.apb.retaining_heads_path))
    if cfg.job == "generate":
        if cfg.generate.prompt_ids:
            files.append(("generate.prompt_ids", cfg.generate.prompt_ids))
        if cfg.model.path and Path(cfg.model.path).is_file():      # a GGUF checkpoint is one file
            files.append(("model.path", cfg.model.path))
        elif cfg.model.path:
            dirs.append(("model.path", cfg.model.path))
        else:
            files += [("model.preset", str(d / f"{cfg.model.preset}.yaml")) for d in preset_dirs()]
            files.append(("model.preset", cfg.model.preset))
    return files, dirs


def _print_plan(cfg, p: int) -> None:
    import torch

    from hpcattn.jobs.cases import JOBS, format_bytes, plan_cases

    device = config.resolve_device(cfg, torch.cuda.is_available())
    print("# resolved config")
    print(config.to_yaml(cfg).rstrip())
    print(f"# plan: {p} ranks, device {device}, comm.backend {cfg.comm.backend}, kernel {cfg.kernel.backend}")
    cases = plan_cases(cfg, p)
    print(f"# {len(cases)} cases")
    print("# mem/rank: tensors of the busiest rank, including rank0+ (what rank 0 alone holds: the "
          "run.check reference, gathered outputs); the memory check's figure (docs/errors.md)")
    print(f"{'case':32} {'method':6} {'variant':20} {'B':>3} {'N':>9} {'dtype':9} "
          f"{'mem/rank':>11} {'rank0+':>11} {'bytes/step':>11}")
    for c in cases:
        mem, nbytes, rank0 = JOBS[c.cfg.job].estimate(c.cfg, c.method, p)
        s = c.cfg.shape
        print(f"{c.id:32} {c.method:6} {c.variant or '-':20} {s.batch:>3} {s.context:>9} {s.dtype:9} "
              f"{format_bytes(mem):>11} {format_bytes(rank0):>11} {format_bytes(nbytes):>11}")


def cmd_run(args) -> int:
    faulthandler.enable()
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    if refuse_split_launch(size):   # N launcher tasks came up as N 1-rank worlds (no collective: size 1)
        return 2
    _setup_logging(rank, args.debug)

    watchdog.catch_interrupt(rank, _interrupt_note)
    if not args.dry_run:     # every rank imports what the run needs while rank 0 resolves the config, so
        import hpcattn.comm  # noqa: F401  (no rank is still importing when set-up's clock starts)
        import hpcattn.jobs.cases  # noqa: F401
        import hpcattn.kernels  # noqa: F401
        import hpcattn.results.report  # noqa: F401
    try:
        try:            # the watchdog covers the first collective: rank 0 may hang reading an input
            watchdog.start(watchdog.setup_timeout(), rank, key=watchdog.SETUP_ENV)
        except ValueError as e:       # the same environment on every rank: all return here
            if rank == 0:
                watchdog.say(f"hpcattn: error: {e}")
            return 2
        watchdog.arm(f"resolving the config on rank 0 ({args.config} and the files it names)")
        try:
            cfg_dict, p = root_check(world, lambda: _resolve(args, size), f"config {args.config}", args.debug)
        except Collective as e:
            if rank == 0:
                watchdog.say(f"hpcattn: error: {e}")
            return 2
        finally:
            watchdog.disarm()
        cfg = config.from_dict(cfg_dict)
        if args.dry_run:
            try:
                if rank == 0:
                    _print_plan(cfg, p)
            except Exception as e:  # noqa: BLE001 (rank 0 only: nobody waits for it)
                watchdog.say(f"hpcattn: error: {message(e, 'the plan (--dry-run)', args.debug)}")
                return 2
            return 0
        return abort_on_error(lambda: _run(cfg, world, args))
    finally:
        watchdog.disarm()
        watchdog.release_interrupt()
        _RUNNING.clear()


_RUNNING: dict = {}          # rank 0: the record being written (for the interrupt line)


def _interrupt_note() -> str:
    tmp = _RUNNING.get("tmp")
    return f"finished cases are kept: hpcattn recover {tmp}" if tmp else "nothing was written"


def _run(cfg, world, args) -> int:
    import torch

    from hpcattn import comm as comm_mod
    from hpcattn.dtypes import DTYPES
    from hpcattn.jobs.cases import JOBS, check_memory, host_info, plan_cases, run_metadata
    from hpcattn.kernels import select_kernel
    from hpcattn.results.hdf5 import RecordWriter
    from hpcattn.results.report import format_table

    rank = world.Get_rank()
    watchdog.start(cfg.run.case_timeout_s, rank)
    watchdog.arm("set-up (communicators, kernel self-tests, model)")
    device_kind = config.resolve_device(cfg, torch.cuda.is_available())
    lamina = cfg.job == "generate" and cfg.generate.decode == "lamina"
    if lamina:                     # a device per role; attention ranks hold no weights
        from hpcattn.jobs.lamina import rank_device
        device_kind = rank_device(cfg, rank, world.Get_size(), torch.cuda.is_available())
    # collective inside: a rank that fails here cannot tell the others (they wait in it), so it
    # prints its one line and aborts the job (abort_on_error)
    with reading(f"communicator set-up (comm.backend={cfg.comm.backend}, device {device_kind})"):
        ctx = comm_mod.setup(world, device_kind=device_kind, backend=cfg.comm.backend,
                             gpu_aware_setting=cfg.comm.gpu_aware_mpi, ranks_per_node=cfg.comm.ranks_per_node,
                             staging_pool_bytes=cfg.comm.staging_pool_mib << 20)
    cases = plan_cases(cfg, ctx.size)
    where = world.allgather((socket.gethostname(), str(ctx.device)))
    ranks_here = [h for h, _ in where].count(socket.gethostname())
    ranks_on_device = where.count(where[ctx.rank]) if ctx.device.type == "cuda" else 1
    collective_check(world, lambda: check_memory(cases, ctx.size, ctx.device, ranks_here, ranks_on_device),
                      "memory check", args.debug)

    def kernel_for(c):
        return select_kernel(c.kernel.backend, ctx.device, DTYPES[c.shape.dtype], c.shape.head_dim)

    kernels = collective_check(world, lambda: {(c.cfg.kernel.backend, c.cfg.shape.dtype, c.cfg.shape.head_dim):
                                                kernel_for(c.cfg) for c in cases}, "kernel self-tests", args.debug)
    first = next(iter(kernels.values()))
    log.info(f"hpcattn: {cfg.job}, {ctx.size} ranks on {len(ctx.node_ranks)} node(s), device {ctx.device.type}, "
             f"transport {ctx.transport} (gpu-aware MPI: {ctx.gpu_aware}, by {ctx.gpu_aware_method}), "
             f"kernel {first.name}, {len(cases)} cases")
    model = None
    if cfg.job in config.MODEL_JOBS:      # a bad checkpoint is reported once, before any file is written
        from hpcattn.jobs.generate import build_checked_model
        model = collective_check(world, lambda: None if lamina and rank >= ctx.size - cfg.lamina.attention_ranks
                                  else build_checked_model(cfg, DTYPES[cfg.shape.dtype], ctx.device),
                                  f"model {cfg.model.path or cfg.model.preset}", args.debug)
    # the stored config carries what "auto" resolved to, so re-running from it reproduces the run
    cfg.run.device = ctx.device.type
    cfg.comm.backend = ctx.backend
    cfg.comm.gpu_aware_mpi = "true" if ctx.gpu_aware else "false"
    if cfg.kernel.backend == "auto" and len({k.name for k in kernels.values()}) == 1:
        cfg.kernel.backend = first.name
    hosts = world.gather(host_info(ctx), root=0)

    def start_record():          # rank 0; takes the record's lock before any case runs
        kinfo = {f"{b}/{dt}/d{d}": f"{k.name} (native_gqa={k.native_gqa}); " +
                 "; ".join(f"{n}: {r}" for n, r in k.selftest.items()) for (b, dt, d), k in kernels.items()}
        w = RecordWriter(cfg.run.output, run_metadata(cfg, ctx, first.name), config.to_yaml(cfg), hosts, kinfo)
        _RUNNING["tmp"] = w.tmp
        return w

    writer = collective_check(world, lambda: start_record() if rank == 0 else None,
                               f"output {cfg.run.output}", args.debug)
    progress = _progress(len(cases)) if rank == 0 else (lambda case, row: None)
    rows = JOBS[cfg.job].run(cfg, cases, ctx, kernel_for, writer, progress, model)
    watchdog.arm("teardown")
    comm_mod.teardown(ctx)
    watchdog.disarm()
    if rank == 0:
        path = writer.close()
        for r in rows:
            r["file"] = str(path)
        from hpcattn.results.report import rows_from_files
        log.info(format_table(rows_from_files([str(path)])))
        log.info(f"wrote {path}")
        failed = [f"{r['id']} ({r.get('check_reason') or '?'})" for r in rows if r.get("check_passed") is False]
        if failed:
            log.info(f"hpcattn: check FAILED for {'; '.join(failed)}")
    failed_any = world.bcast(bool(rank == 0 and any(r.get("check_passed") is False for r in rows)), root=0)
    return 3 if failed_any else 0


def _progress(total: int):
    start = time.time()

    def show(case, row):
        from hpcattn.results.report import check_text
        ok = "check " + check_text(row) + (f": {row.get('check_reason')}" if row.get("check_passed") is False else "")
        done = len(show.done) + 1
        bar = "#" * (20 * done // total) + "-" * (20 - 20 * done // total)
        log.info(f"[{bar}] {done}/{total} {case.id:34} "
                 f"N={case.cfg.shape.context:<8} B={case.cfg.shape.batch:<3} "
                 f"{row['time_median_s'] * 1e3:10.3f} ms  {ok}  ({time.time() - start:.0f} s)")
        show.done.append(case.id)
    show.done = []
    return show
