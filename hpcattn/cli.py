"""Command line: ``hpcattn run | report | plot | check-comm | config``.

``run`` is an MPI program (launch it with mpirun/mpiexec/srun, or alone for one rank). It behaves
like ``python -m mpi4py``: an exception on any rank aborts every rank instead of hanging. A user
error (bad config, missing file) is printed once, by rank 0, as ``hpcattn: error: ...``, and every
rank exits with status 2. Console output comes from rank 0 only.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import sys
import time

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
    pl = sub.add_parser("plot", help="plot time vs context and speedup vs baseline to a PNG")
    pl.add_argument("files", nargs="+")
    pl.add_argument("-o", "--output", required=True, help="PNG file to write")
    cc = sub.add_parser("check-comm", help="transport probe and collective latencies (its own MPI job)")
    cc.add_argument("--backend", default="auto", choices=("auto", "mpi", "nccl", "gloo"))
    cc.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    cc.add_argument("--gpu-aware-mpi", default="auto", choices=("auto", "true", "false"))
    cc.add_argument("--repeats", type=int, default=50)
    pj = sub.add_parser("project", help="project a P-host ring/Star/APB prefill from one device "
                                        "(runs every host's work here; one process)")
    pj.add_argument("config", help="prefill job config")
    pj.add_argument("--hosts", type=int, default=8)
    pj.add_argument("--link-gbps", type=float, default=150.0,
                    help="link bandwidth for the comm model, GB/s (measure with check-comm)")
    pj.add_argument("--latency-us", type=float, default=30.0, help="per-collective latency for the comm model")
    pj.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    pj.add_argument("-o", "--output", help="write the projection to this HDF5 file")
    cfg = sub.add_parser("config", help="print the config reference (every key, type, default)")
    cfg.add_argument("--defaults", action="store_true", help="print the default config as YAML instead")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "run":
            return cmd_run(args)
        if args.cmd == "check-comm":
            from hpcattn.jobs.check_comm import check_comm
            return _abort_on_error(lambda: check_comm(args))
        if args.cmd == "project":
            from hpcattn import config as config_mod
            from hpcattn.jobs.projection import run_projection
            cfg = config_mod.load(args.config, args.set)
            if cfg.job != "prefill":
                raise HpcattnError(f"{args.config}: hpcattn project needs a prefill job config")
            run_projection(cfg, args.hosts, args.link_gbps, args.latency_us, args.output)
            return 0
        if args.cmd == "report":
            from hpcattn.results.report import format_csv, format_table, rows_from_files
            rows = rows_from_files(args.files)
            print(format_csv(rows) if args.csv else format_table(rows), end="\n" if not args.csv else "")
            return 0
        if args.cmd == "recover":
            from hpcattn.results.hdf5 import recover
            print(f"wrote {recover(args.tmp, args.output)}")
            return 0
        if args.cmd == "plot":
            from hpcattn.results.plot import plot
            print(f"wrote {plot(args.files, args.output)}")
            return 0
        if args.cmd == "config":
            from hpcattn import config
            print(config.to_yaml(config.Config()) if args.defaults else config.reference_text())
            return 0
    except HpcattnError as e:
        print(f"hpcattn: error: {e}", file=sys.stderr)
        return 2
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
    """Rank 0: load, complete and validate the config; plan the cases. Raises HpcattnError."""
    import torch

    from hpcattn import config
    from hpcattn.jobs.inputs import apply_file_shape
    from hpcattn.jobs.runner import plan_cases

    cfg = config.load(args.config, args.set)
    if args.output:
        cfg.run.output = args.output
    if not cfg.run.output:
        cfg.run.output = f"runs/{cfg.job}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.h5"
    if cfg.inputs.source == "file" and cfg.inputs.path:
        from pathlib import Path
        if not Path(cfg.inputs.path).is_file():
            raise HpcattnError(f"{args.config}: inputs.path: file not found: {cfg.inputs.path}")
        apply_file_shape(cfg, cfg.inputs.path)
    if cfg.job == "generate":
        from hpcattn.jobs.generate import resolve_shape
        resolve_shape(cfg)
    cuda = torch.cuda.is_available()
    if args.dry_run and (cfg.run.device == "cuda" or cfg.comm.backend == "nccl"):
        cuda = True            # planning a GPU job on a CPU login node
    p = args.ranks if (args.dry_run and args.ranks) else world_size
    cases = plan_cases(cfg, p)
    for c in cases:
        config.validate(c.cfg, p, cuda, source=args.config)
    if cfg.comm.ranks_per_node and p % cfg.comm.ranks_per_node:
        raise HpcattnError(f"{args.config}: comm.ranks_per_node={cfg.comm.ranks_per_node} does not divide "
                           f"the {p} ranks")
    return config.to_dict(cfg), p


def _print_plan(cfg, p: int) -> None:
    import torch

    from hpcattn import config
    from hpcattn.jobs.runner import JOBS, plan_cases

    device = config.resolve_device(cfg, torch.cuda.is_available())
    print("# resolved config")
    print(config.to_yaml(cfg).rstrip())
    print(f"# plan: {p} ranks, device {device}, comm.backend {cfg.comm.backend}, kernel {cfg.kernel.backend}")
    cases = plan_cases(cfg, p)
    print(f"# {len(cases)} cases")
    print(f"{'case':32} {'method':6} {'variant':20} {'B':>3} {'N':>9} {'dtype':9} "
          f"{'mem/rank':>11} {'bytes/step':>11}")
    for c in cases:
        mem, nbytes = JOBS[c.cfg.job][1](c.cfg, c.method, p)
        s = c.cfg.shape
        print(f"{c.id:32} {c.method:6} {c.variant or '-':20} {s.batch:>3} {s.context:>9} {s.dtype:9} "
              f"{_size(mem):>11} {_size(nbytes):>11}")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _collective_check(world, fn):
    """Run ``fn()`` on every rank; if it raises HpcattnError anywhere, raise the first message on all."""
    err = None
    try:
        value = fn()
    except HpcattnError as e:
        err, value = str(e), None
    errs = [e for e in world.allgather(err) if e]
    if errs:
        raise _Collective(errs[0])
    return value


class _Collective(HpcattnError):
    """An error every rank knows about: rank 0 prints it, every rank exits 2."""


def cmd_run(args) -> int:
    faulthandler.enable()
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    _setup_logging(rank, args.debug)

    payload = err = None
    if rank == 0:
        try:
            payload = _resolve(args, size)
        except HpcattnError as e:
            err = str(e)
    err, payload = world.bcast((err, payload), root=0)
    if err:
        if rank == 0:
            print(f"hpcattn: error: {err}", file=sys.stderr)
        return 2
    from hpcattn import config

    cfg_dict, p = payload
    cfg = config.from_dict(cfg_dict)
    if args.dry_run:
        if rank == 0:
            _print_plan(cfg, p)
        return 0
    return _abort_on_error(lambda: _run(cfg, world, args))


def _abort_on_error(fn) -> int:
    """Run an MPI command; any exception on any rank aborts every rank (never a hang).

    An error that every rank raised together (:class:`_Collective`) is printed once by rank 0 and
    every rank returns 2. Any other :class:`HpcattnError` prints one line from the failing rank,
    any other exception its traceback; then ``MPI_Abort`` ends the whole job.
    """
    from mpi4py import MPI

    from hpcattn.watchdog import abort_job

    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    try:
        return fn()
    except _Collective as e:
        if rank == 0:
            print(f"hpcattn: error: {e}", file=sys.stderr)
        return 2
    except HpcattnError as e:
        print(f"hpcattn: error{f' (rank {rank})' if rank else ''}: {e}", file=sys.stderr, flush=True)
        abort_job(world, 2)
    except BaseException:
        import traceback

        print(f"hpcattn: rank {rank} failed; aborting all ranks", file=sys.stderr)
        traceback.print_exc()
        abort_job(world, 1)
    return 1


def _run(cfg, world, args) -> int:
    import torch

    from hpcattn import comm as comm_mod
    from hpcattn import config, watchdog
    from hpcattn.jobs.inputs import DTYPES
    from hpcattn.jobs.runner import host_info, plan_cases, run_cases, run_metadata
    from hpcattn.kernels import select_kernel
    from hpcattn.results.hdf5 import RecordWriter
    from hpcattn.results.report import format_table

    rank = world.Get_rank()
    watchdog.start(cfg.run.case_timeout_s, rank)
    watchdog.arm("set-up (communicators, kernel self-tests, model)")
    device_kind = config.resolve_device(cfg, torch.cuda.is_available())
    ctx = comm_mod.setup(world, device_kind=device_kind, backend=cfg.comm.backend,
                         gpu_aware_setting=cfg.comm.gpu_aware_mpi, ranks_per_node=cfg.comm.ranks_per_node)
    cases = plan_cases(cfg, ctx.size)

    def kernel_for(c):
        return select_kernel(c.kernel.backend, ctx.device, DTYPES[c.shape.dtype], c.shape.head_dim)

    kernels = _collective_check(world, lambda: {(c.cfg.kernel.backend, c.cfg.shape.dtype, c.cfg.shape.head_dim):
                                                kernel_for(c.cfg) for c in cases})
    first = next(iter(kernels.values()))
    log.info(f"hpcattn: {cfg.job}, {ctx.size} ranks on {len(ctx.node_ranks)} node(s), device {ctx.device.type}, "
             f"transport {ctx.transport} (gpu-aware MPI: {ctx.gpu_aware}, by {ctx.gpu_aware_method}), "
             f"kernel {first.name}, {len(cases)} cases")
    model = None
    if cfg.job == "generate":      # a bad checkpoint is reported once, before any file is written
        from hpcattn.model.weights import build_model
        model = _collective_check(world, lambda: build_model(cfg, DTYPES[cfg.shape.dtype], ctx.device))
    # the stored config carries what "auto" resolved to, so re-running from it reproduces the run
    cfg.run.device = ctx.device.type
    cfg.comm.backend = ctx.backend
    cfg.comm.gpu_aware_mpi = "true" if ctx.gpu_aware else "false"
    if cfg.kernel.backend == "auto" and len({k.name for k in kernels.values()}) == 1:
        cfg.kernel.backend = first.name
    hosts = world.gather(host_info(ctx), root=0)
    writer = None
    if rank == 0:
        kinfo = {f"{b}/{dt}/d{d}": f"{k.name} (native_gqa={k.native_gqa}); " +
                 "; ".join(f"{n}: {r}" for n, r in k.selftest.items()) for (b, dt, d), k in kernels.items()}
        writer = RecordWriter(cfg.run.output, run_metadata(cfg, ctx, first.name), config.to_yaml(cfg), hosts, kinfo)
    progress = _progress(len(cases)) if rank == 0 else (lambda case, row: None)
    if cfg.job == "generate":
        from hpcattn.jobs.generate import run_generate_cases
        rows = run_generate_cases(cfg, cases, ctx, kernel_for, writer, progress, model)
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
        failed = [r["id"] for r in rows if r.get("check_passed") is False]
        if failed:
            log.info(f"hpcattn: check FAILED for {', '.join(failed)}")
    failed_any = world.bcast(bool(rank == 0 and any(r.get("check_passed") is False for r in rows)), root=0)
    return 3 if failed_any else 0


def _progress(total: int):
    start = time.time()

    def show(case, row):
        ok = {True: "check ok", False: "check FAILED"}.get(row.get("check_passed"), "")
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
