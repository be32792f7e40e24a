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

This module parses the command line and looks the command up in :data:`COMMANDS` (one entry per
command); each entry imports what its command needs when it runs, so ``report``, ``plot`` or
``config`` never load torch or initialise MPI. The run's orchestration is
:mod:`hpcattn.jobs.orchestrate`, the MPI error policy :mod:`hpcattn.collective`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from hpcattn import config, watchdog
from hpcattn.collective import abort_on_error
from hpcattn.errors import HpcattnError
from hpcattn.jobs.orchestrate import cmd_run, files_read


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
    lc = sub.add_parser("lamina-cost", help="project Lamina decode (a model + b attention devices, m micro-batches) "
                                            "against colocated decode from measured MTIME/ATIME")
    lc.add_argument("measurements", help="JSON written by benchmarks/lamina_measure.py")
    lc.add_argument("--shape", help="which shape of a benchmark file (default: its first, the 8B shape)")
    lc.add_argument("--dop", action="append", default=[], metavar="A,B",
                    help="model and attention device counts (repeatable; default 1,1 2,2 1,2 2,4)")
    lc.add_argument("--microbatches", default="1,2,4,8", help="micro-batch counts to try (best is reported)")
    lc.add_argument("--batch", default="16,64,256", help="batch sizes")
    lc.add_argument("--context", type=int, default=8192, help="tokens per sequence (l)")
    lc.add_argument("--link-gbps", type=float, default=50.0, help="link bandwidth GB/s (check-comm)")
    lc.add_argument("--latency-us", type=float, default=33.3, help="one-way latency us (check-comm; NCCL "
                                                                   "RTT 66.6 us in the paper)")
    lc.add_argument("--mem-gib-model", type=float, help="memory of a model device (GiB): adds the memory-max batch rows")
    lc.add_argument("--mem-gib-attention", type=float, help="memory of an attention device (GiB)")
    lc.add_argument("--model-split", default="replica", choices=("replica", "tensor"),
                    help="model devices as full-weight replicas (hpcattn) or one tensor-parallel group (the paper's 70B)")
    lc.add_argument("-o", "--output", help="write rows + inputs as JSON")
    cfg = sub.add_parser("config", help="print the config reference (every key, type, default)")
    cfg.add_argument("--defaults", action="store_true", help="print the default config as YAML instead")
    return p


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    """Register the function that runs ``hpcattn NAME`` (it returns the exit status)."""
    def register(fn):
        COMMANDS[name] = fn
        return fn
    return register


command("run")(cmd_run)


@command("check-comm")
def _check_comm(args) -> int:
    from mpi4py import MPI

    from hpcattn.jobs.check_comm import check_comm
    watchdog.catch_interrupt(MPI.COMM_WORLD.Get_rank())
    try:
        return abort_on_error(lambda: check_comm(args))
    finally:
        watchdog.release_interrupt()


@command("project")
def _project(args) -> int:
    from hpcattn.jobs.model_projection import run_model_projection
    from hpcattn.jobs.projection import run_projection
    cfg = config.load(args.config, args.set)
    if cfg.job not in ("prefill", "generate"):
        raise HpcattnError(f"{args.config}: hpcattn project needs a generate job config (model level) "
                           f"or a prefill job config (attention level), got job: {cfg.job}")
    if args.output:                 # never over a file it reads (nor a run's work file)
        from hpcattn.results.hdf5 import check_output_collision
        check_output_collision(args.output, *files_read(args.config, cfg))
    if cfg.job == "generate":
        run_model_projection(cfg, args.hosts, args.link_gbps, args.latency_us, args.output,
                             more_links=tuple(args.more_link_gbps))
    elif args.more_link_gbps:
        raise HpcattnError("--more-link-gbps: only for generate configs (model-level projection)")
    else:
        run_projection(cfg, args.hosts, args.link_gbps, args.latency_us, args.output)
    return 0


@command("lamina-cost")
def _lamina_cost(args) -> int:
    from hpcattn.jobs.lamina_cost import run_cli        # loads torch (the model package)
    return run_cli(args)


@command("report")
def _report(args) -> int:
    from hpcattn.results.report import format_csv, format_table, rows_from_files
    rows = rows_from_files(args.files)
    print(format_csv(rows) if args.csv else format_table(rows), end="\n" if not args.csv else "")
    return 0


@command("recover")
def _recover(args) -> int:
    from hpcattn.results.hdf5 import check_output_collision, recover
    if args.output:
        check_output_collision(args.output, [("the record to recover", args.tmp)])
    print(f"wrote {recover(args.tmp, args.output)}")
    return 0


@command("plot")
def _plot(args) -> int:
    from hpcattn.results.plot import plot
    print(f"wrote {plot(args.files, args.output, args.kind, args.ceiling_tbs)}")
    return 0


@command("compare")
def _compare(args) -> int:
    from hpcattn.results.compare import compare, format_comparison
    res = compare(args.old, args.new, args.threshold)
    print(format_comparison(res))
    return res.exit_status


@command("config")
def _config(args) -> int:
    print(config.to_yaml(config.Config()) if args.defaults else config.reference_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.cmd](args)
    except HpcattnError as e:
        print(f"hpcattn: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hpcattn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
