"""Command line: ``hpcattn run | report | plot | compare | recover | check-comm | project | config``.

``run`` is an MPI program (launch it with mpirun/mpiexec/srun, or alone for one rank). It behaves
like ``python -m mpi4py``: an exception on any rank aborts every rank instead of hanging. A user
error (bad config, missing file) is printed once, by rank 0, as ``hpcattn: error: ...``, and every
rank exits with status 2. So is any other exception during the collective set-up (resolving the
config on rank 0, kernel self-tests, the model, the memory check, opening the record): one line
naming the input or step and the exception (``--debug``: the failing rank's traceback too), never
a rank left waiting in a collective. Ctrl-C is one ``hpcattn: interrupted`` line and status 130
(:func:`hpcattn.watchdog.catch_interrupt`). Console output comes from rank 0 only. Every error
and its status: docs/errors.md.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import logging
import sys
import time
from pathlib import Path

from hpcattn.errors import HpcattnError

log = logging.getLogger("hpcattn")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hpcattn", description="Distributed long-context attention on MPI ranks.")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a job config (under mpirun/srun for several ranks)")
    r.add_argument("config", help="YAML job config (see docs/config.md)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set shape.context=65536 (repeatable)")
    r.add_argument("-o", "--output", help="HDF5 result file (overrides run.output)")
    r.add_argument("--dry-run", action="store_true",
                   help="print resolved config, cases, memory per rank and bytes per step; compute nothing")
    r.add_argument("--ranks", type=int, help="with --dry-run: plan for this many ranks instead of the MPI world")
    r.add_argument("--debug", action="store_true", help="log from every rank to stderr")
    rep = sub.add_parser("report", help="print the table of one or more HDF5 records")
    rep.add_argument("files", nargs="+")
    rep.add_argument("--csv", action="store_true", help="CSV instead of the fixed-width table")
    rc = sub.add_parser("recover", help="merge an unfinished run's NAME.tmp (+ NAME.tmp.d/) into NAME "
                                        "(status incomplete)")
    rc.add_argument("tmp", help="the NAME.tmp a crashed or killed run left")
    rc.add_argument("-o", "--output", help="file to write (default NAME)")
    pl = sub.add_parser("plot", help="plot records to a PNG/PDF/SVG: time vs context (default), phase breakdown, "
                                     "scaling, decode bandwidth, eval accuracy (docs/analysis.md)")
    pl.add_argument("files", nargs="+")
    pl.add_argument("-o", "--output", required=True, help="file to write: .png, .pdf or .svg")
    pl.add_argument("--kind", default="time", help="time (default), breakdown, scaling, bandwidth or accuracy "
                                                   "(eval records: vs context and needle depth)")
    pl.add_argument("--ceiling-tbs", type=float, help="with --kind bandwidth: ceiling line, TB/s per device")
    cp = sub.add_parser("compare", help="new/old step time of the cases two records share; exit 1 on a "
                                        "regression beyond noise (docs/analysis.md)")
    cp.add_argument("old")
    cp.add_argument("new")
    cp.add_argument("--threshold", type=float, default=0.05,
                    help="smallest slowdown that counts, as a fraction (default 0.05); the repeat spread "
                         "raises it per case")
    cc = sub.add_parser("check-comm", help="transport probe and collective latencies (its own MPI job)")
    cc.add_argument("--backend", default="auto", choices=("auto", "mpi", "nccl", "gloo"))
    cc.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    cc.add_argument("--gpu-aware-mpi", default="auto", choices=("auto", "true", "false"))
    cc.add_argument("--repeats", type=int, default=50)
    pj = sub.add_parser("project", help="project a P-host ring/Star/APB run from one device (runs every "
                                        "host's work here; one process): a generate config projects the "
                                        "whole model (prefill, query pass, decode), a prefill config the "
                                        "attention level")
    pj.add_argument("config", help="generate job config (model level) or prefill job config (attention level)")
    pj.add_argument("--hosts", type=int, default=8)
    pj.add_argument("--link-gbps", type=float, default=150.0,
                    help="link bandwidth for the comm model, GB/s (measure with check-comm)")
    pj.add_argument("--latency-us", type=float, default=30.0, help="per-collective latency for the comm model")
    pj.add_argument("--more-link-gbps", type=float, action="append", default=[], metavar="GBPS",
                    help="generate configs: also project the same measurements over this link (repeatable)")
    pj.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    pj.add_argument("-o", "--output", help="write the projection to this HDF5 file")
    from hpcattn.jobs.lamina_cost import add_parser as add_lamina_cost
    add_lamina_cost(sub)
    cfg = sub.add_parser("config", help="print the config reference (every key, type, default)")
    cfg.add_argument("--defaults", action="store_true", help="print the default config as YAML instead")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "run":
            return cmd_run(args)
        if args.cmd == "check-comm":
            from mpi4py import MPI

            from hpcattn import watchdog
            from hpcattn.jobs.check_comm import check_comm
            watchdog.catch_interrupt(MPI.COMM_WORLD.Get_rank())
            try:
                return _abort_on_error(lambda: check_comm(args))
            finally:
                watchdog.release_interrupt()
        if args.cmd == "project":
            from hpcattn import config as config_mod
            from hpcattn.jobs.model_projection import run_model_projection
            from hpcattn.jobs.projection import run_projection
            cfg = config_mod.load(args.config, args.set)
            if cfg.job not in ("prefill", "generate"):
                raise HpcattnError(f"{args.config}: hpcattn project needs a generate job config (model level) "
                                   f"or a prefill job config (attention level), got job: {cfg.job}")
            if args.output:                 # never over a file it reads (nor a run's work file)
                from hpcattn.results.hdf5 import check_output_collision
                check_output_collision(args.output, *_files_read(args.config, cfg))
            if cfg.job == "generate":
                run_model_projection(cfg, args.hosts, args.link_gbps, args.latency_us, args.output,
                                     more_links=tuple(args.more_link_gbps))
            elif args.more_link_gbps:
                raise HpcattnError("--more-link-gbps: only for generate configs (model-level projection)")
            else:
                run_projection(cfg, args.hosts, args.link_gbps, args.latency_us, args.output)
            return 0
        if args.cmd == "lamina-cost":
            from hpcattn.jobs.lamina_cost import run_cli
            return run_cli(args)
        if args.cmd == "report":
            from hpcattn.results.report import format_csv, format_table, rows_from_files
            rows = rows_from_files(args.files)
            print(format_csv(rows) if args.csv else format_table(rows), end="\n" if not args.csv else "")
            return 0
        if args.cmd == "recover":
            from hpcattn.results.hdf5 import check_output_collision, recover
            if args.output:
                check_output_collision(args.output, [("the record to recover", args.tmp)])
            print(f"wrote {recover(args.tmp, args.output)}")
            return 0
        if args.cmd == "plot":
            from hpcattn.results.plot import plot
            print(f"wrote {plot(args.files, args.output, args.kind, args.ceiling_tbs)}")
            return 0
        if args.cmd == "compare":
            from hpcattn.results.compare import compare, format_comparison
            res = compare(args.old, args.new, args.threshold)
            print(format_comparison(res))
            return res.exit_status
        if args.cmd == "config":
            from hpcattn import config
            print(config.to_yaml(config.Config()) if args.defaults else config.reference_text())
            return 0
    except HpcattnError as e:
        print(f"hpcattn: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hpcattn: interrupted", file=sys.stderr)
        return 130
    return 0


# ------------------------------------------------------------------------------------------------
# run


def _setup_logging(rank: int, debug: bool) -> None:
    handler = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
    handler.setFormatter(logging.Formatter(f"[r{rank}] %(message)s" if debug else "%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if rank == 0 else (logging.DEBUG if debug else logging.ERROR))
    log.propagate = False


def _resolve(args, world_size: int):
    """Rank 0: load, complete and validate the config; plan the cases. Raises HpcattnError
    (an unexpected exception while reading an input names that input: :func:`_reading`)."""
    import torch

    from hpcattn import config
    from hpcattn.jobs.inputs import apply_file_shape
    from hpcattn.jobs.runner import plan_cases

    if args.ranks is not None and (not args.dry_run or args.ranks < 1):
        raise HpcattnError(f"--ranks {args.ranks}: " + ("must be >= 1" if args.dry_run else
                                                        "is for --dry-run (a run uses the MPI world)"))
    with _reading(f"config {args.config}"):
        cfg = config.load(args.config, args.set)
    if args.output:
        cfg.run.output = args.output
    if not cfg.run.output:
        cfg.run.output = f"runs/{cfg.job}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.h5"
    from hpcattn.errors import check_utf8_path
    for what, path in (("output", cfg.run.output), ("inputs.path", cfg.inputs.path),
                       ("model.path", cfg.model.path), ("model.preset", cfg.model.preset),
                       ("generate.prompt_ids", cfg.generate.prompt_ids),
                       ("apb.retaining_heads_path", cfg.apb.retaining_heads_path)):
        if path:
            check_utf8_path(what, path)
    if not args.dry_run:
        from hpcattn.results.hdf5 import check_output_collision, check_output_path
        check_output_collision(cfg.run.output, *_files_read(args.config, cfg))
        check_output_path(cfg.run.output)
    if cfg.job not in config.MODEL_JOBS and not cfg.methods:
        raise HpcattnError(f"{args.config}: methods must list at least one method "
                           f"(choose from {', '.join(config.METHODS_BY_JOB[cfg.job])})")
    if cfg.inputs.source == "file" and cfg.inputs.path:
        if not Path(cfg.inputs.path).is_file():
            raise HpcattnError(f"{args.config}: inputs.path: file not found: {cfg.inputs.path}")
        with _reading(f"inputs.path {cfg.inputs.path}"):
            apply_file_shape(cfg, cfg.inputs.path)
    if cfg.job == "eval":
        from hpcattn.jobs.eval import resolve_eval_shape
        with _reading(f"model.path {cfg.model.path}"):
            resolve_eval_shape(cfg)
    if cfg.job == "generate":
        from hpcattn.jobs.generate import resolve_shape
        model = f"model.path {cfg.model.path}" if cfg.model.path else f"model.preset {cfg.model.preset}"
        prompt = cfg.generate.prompt_ids or ("generate.prompt_text" if cfg.generate.prompt_text else "")
        with _reading(model + (f" or the prompt ({prompt})" if prompt else "")):
            resolve_shape(cfg)
    cuda = torch.cuda.is_available()
    if args.dry_run and (cfg.run.device == "cuda" or cfg.comm.backend == "nccl"):
        cuda = True            # planning a GPU job on a CPU login node
    p = args.ranks if args.ranks else world_size
    _check_sweep_size(cfg, args.config)
    cases = plan_cases(cfg, p)
    for c in cases:
        config.validate(c.cfg, p, cuda, source=args.config)
    if cfg.comm.ranks_per_node and p % cfg.comm.ranks_per_node:
        raise HpcattnError(f"{args.config}: comm.ranks_per_node={cfg.comm.ranks_per_node} does not divide "
                           f"the {p} ranks")
    return config.to_dict(cfg), p


SWEEP_SAY = 1000           # a sweep of more cases than this says how many before planning them


def _check_sweep_size(cfg, source: str) -> None:
    """Rank 0, before planning: say how many cases a big sweep has, and refuse more than
    ``run.max_cases`` (ConfigError naming the axes)."""
    import math

    from hpcattn import config
    from hpcattn.errors import ConfigError

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


def _files_read(config_path: str, cfg) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The files a run of ``cfg`` reads, which -o must never name: ([(what, path)], [(what, folder
    whose files it reads)]). (Path keys are not sweep axes.)"""
    from hpcattn.model.llama import _preset_dirs

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
            files += [("model.preset", str(d / f"{cfg.model.preset}.yaml")) for d in _preset_dirs()]
            files.append(("model.preset", cfg.model.preset))
    return files, dirs


def _print_plan(cfg, p: int) -> None:
    import torch

    from hpcattn import config
    from hpcattn.jobs.runner import JOBS, format_bytes, plan_cases

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
        mem, nbytes, rank0 = JOBS[c.cfg.job][1](c.cfg, c.method, p)
        s = c.cfg.shape
        print(f"{c.id:32} {c.method:6} {c.variant or '-':20} {s.batch:>3} {s.context:>9} {s.dtype:9} "
              f"{format_bytes(mem):>11} {format_bytes(rank0):>11} {format_bytes(nbytes):>11}")


# ------------------------------------------------------------------------------------------------
# errors of the collective set-up: any exception on any rank -> one line from rank 0, exit 2


@contextlib.contextmanager
def _reading(what: str):
    """Turn an unexpected exception while reading ``what`` (a file, the model) into an
    HpcattnError naming it and the exception (the original stays as ``__cause__``)."""
    try:
        yield
    except HpcattnError:
        raise
    except Exception as e:
        raise HpcattnError(_unexpected(what, e)) from e


def _unexpected(what: str, e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{what}: unexpected {type(e).__name__}{': ' + first if first else ''} (--debug shows the traceback)"


def _message(e: Exception, where: str, debug: bool) -> str:
    """The one line for ``e``; with ``debug`` this rank first prints the traceback."""
    if debug:
        import traceback

        from hpcattn.watchdog import say
        say("".join(traceback.format_exception(e)))
    return str(e) if isinstance(e, HpcattnError) else _unexpected(where, e)


def _collective_check(world, fn, where: str = "set-up", debug: bool = False):
    """Run ``fn()`` on every rank; if it raises anywhere, raise the first rank's message on all
    (:class:`_Collective`). A non-HpcattnError becomes ``WHERE: unexpected TYPE: MESSAGE``."""
    err = None
    try:
        value = fn()
    except Exception as e:      # noqa: BLE001 (every rank must learn of it, or the others hang)
        err, value = _message(e, where, debug), None
    errs = [e for e in world.allgather(err) if e]
    if errs:
        raise _Collective(errs[0])
    return value


def _root_check(world, fn, where: str, debug: bool = False):
    """Run ``fn()`` on rank 0 only and broadcast its value; an exception there is raised on every
    rank as :class:`_Collective`, as in :func:`_collective_check`."""
    err = value = None
    if world.Get_rank() == 0:
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001
            err = _message(e, where, debug)
    err, value = world.bcast((err, value), root=0)
    if err:
        raise _Collective(err)
    return value


class _Collective(HpcattnError):
    """An error every rank knows about: rank 0 prints it, every rank exits 2."""


def cmd_run(args) -> int:
    faulthandler.enable()
    from mpi4py import MPI

    from hpcattn import watchdog

    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    from hpcattn.launch import refuse_split_launch
    if refuse_split_launch(size):   # N launcher tasks came up as N 1-rank worlds (no collective: size 1)
        return 2
    _setup_logging(rank, args.debug)

    watchdog.catch_interrupt(rank, _interrupt_note)
    if not args.dry_run:     # every rank imports what the run needs while rank 0 resolves the config, so
        import hpcattn.comm  # noqa: F401  (no rank is still importing when set-up's clock starts)
        import hpcattn.jobs.runner  # noqa: F401
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
            cfg_dict, p = _root_check(world, lambda: _resolve(args, size), f"config {args.config}", args.debug)
        except _Collective as e:
            if rank == 0:
                watchdog.say(f"hpcattn: error: {e}")
            return 2
        finally:
            watchdog.disarm()
        from hpcattn import config

        cfg = config.from_dict(cfg_dict)
        if args.dry_run:
            try:
                if rank == 0:
                    _print_plan(cfg, p)
            except Exception as e:  # noqa: BLE001 (rank 0 only: nobody waits for it)
                watchdog.say(f"hpcattn: error: {_message(e, 'the plan (--dry-run)', args.debug)}")
                return 2
            return 0
        return _abort_on_error(lambda: _run(cfg, world, args))
    finally:
        watchdog.disarm()
        watchdog.release_interrupt()
        _RUNNING.clear()


_RUNNING: dict = {}          # rank 0: the record being written (for the interrupt line)


def _interrupt_note() -> str:
    tmp = _RUNNING.get("tmp")
    return f"finished cases are kept: hpcattn recover {tmp}" if tmp else "nothing was written"


def _abort_on_error(fn) -> int:
    """Run an MPI command; any exception on any rank aborts every rank (never a hang).

    An error that every rank raised together (:class:`_Collective`) is printed once by rank 0 and
    every rank returns 2. Any other :class:`HpcattnError` prints one line from the failing rank,
    any other exception its traceback; then ``MPI_Abort`` ends the whole job.
    """
    from mpi4py import MPI

    from hpcattn.watchdog import abort_job, say

    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    try:
        return fn()
    except _Collective as e:
        if rank == 0:
            say(f"hpcattn: error: {e}")
        return 2
    except HpcattnError as e:
        say(f"hpcattn: error{f' (rank {rank})' if rank else ''}: {e}")
        abort_job(world, 2)
    except BaseException:
        import traceback

        say(f"hpcattn: rank {rank} failed; aborting all ranks\n" + traceback.format_exc())
        abort_job(world, 1)
    return 1


def _run(cfg, world, args) -> int:
    import socket

    import torch

    from hpcattn import comm as comm_mod
    from hpcattn import config, watchdog
    from hpcattn.jobs.inputs import DTYPES
    from hpcattn.jobs.runner import check_memory, host_info, plan_cases, run_cases, run_metadata
    from hpcattn.kernels import select_kernel
    from hpcattn.results.hdf5 import RecordWriter
    from hpcattn.results.report import format_table

    rank = world.Get_rank()
    watchdog.start(cfg.run.case_timeout_s, rank)
    watchdog.arm("set-up (communicators, kernel self-tests, model)")
    device_kind = config.resolve_device(cfg, torch.cuda.is_available())
    lamina = cfg.job == "generate" and cfg.generate.decode == "lamina"
    if lamina:                     # a device per role; attention ranks hold no weights
        from hpcattn.model.lamina import rank_device
        device_kind = rank_device(cfg, rank, world.Get_size(), torch.cuda.is_available())
    # collective inside: a rank that fails here cannot tell the others (they wait in it), so it
    # prints its one line and aborts the job (_abort_on_error)
    with _reading(f"communicator set-up (comm.backend={cfg.comm.backend}, device {device_kind})"):
        ctx = comm_mod.setup(world, device_kind=device_kind, backend=cfg.comm.backend,
                             gpu_aware_setting=cfg.comm.gpu_aware_mpi, ranks_per_node=cfg.comm.ranks_per_node,
                             staging_pool_bytes=cfg.comm.staging_pool_mib << 20)
    cases = plan_cases(cfg, ctx.size)
    where = world.allgather((socket.gethostname(), str(ctx.device)))
    ranks_here = [h for h, _ in where].count(socket.gethostname())
    ranks_on_device = where.count(where[ctx.rank]) if ctx.device.type == "cuda" else 1
    _collective_check(world, lambda: check_memory(cases, ctx.size, ctx.device, ranks_here, ranks_on_device),
                      "memory check", args.debug)

    def kernel_for(c):
        return select_kernel(c.kernel.backend, ctx.device, DTYPES[c.shape.dtype], c.shape.head_dim)

    kernels = _collective_check(world, lambda: {(c.cfg.kernel.backend, c.cfg.shape.dtype, c.cfg.shape.head_dim):
                                                kernel_for(c.cfg) for c in cases}, "kernel self-tests", args.debug)
    first = next(iter(kernels.values()))
    log.info(f"hpcattn: {cfg.job}, {ctx.size} ranks on {len(ctx.node_ranks)} node(s), device {ctx.device.type}, "
             f"transport {ctx.transport} (gpu-aware MPI: {ctx.gpu_aware}, by {ctx.gpu_aware_method}), "
             f"kernel {first.name}, {len(cases)} cases")
    model = None
    if cfg.job in config.MODEL_JOBS:      # a bad checkpoint is reported once, before any file is written
        from hpcattn.jobs.generate import build_checked_model
        model = _collective_check(world, lambda: None if lamina and rank >= ctx.size - cfg.lamina.attention_ranks
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

    writer = _collective_check(world, lambda: start_record() if rank == 0 else None,
                               f"output {cfg.run.output}", args.debug)
    progress = _progress(len(cases)) if rank == 0 else (lambda case, row: None)
    if cfg.job == "generate":
        from hpcattn.jobs.generate import run_generate_cases
        rows = run_generate_cases(cfg, cases, ctx, kernel_for, writer, progress, model)
    elif cfg.job == "eval":
        from hpcattn.jobs.eval import run_eval_cases
        rows = run_eval_cases(cfg, cases, ctx, kernel_for, writer, progress, model)
    else:
        rows = run_cases(cfg, cases, ctx, kernel_for, writer, log, progress)
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


if __name__ == "__main__":
    raise SystemExit(main())
