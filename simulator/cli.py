"""``clustersim`` command line.

    clustersim simulate FILE [--out DIR] [--trace FILE.json]
    clustersim collective --op all_reduce --algorithm ring --size 256MB [--nodes 8 ...]
    clustersim demo [--out DIR] [--quick]
    clustersim realrun FILE [--launcher local|emulated|torchrun] [--bandwidth 1Gbps] [--out DIR]
    clustersim calibrate FILE [--launcher none|local|emulated] [--out DIR]
    clustersim validate [FILE ... | --matrix] [--quick] [--launcher emulated|local] [--out DIR]
    clustersim sweep FILE --set KEY=V1,V2 [--set ...] [--out ROWS.jsonl] [--csv TABLE.csv] [--workers N]
    clustersim search FILE [--global-batch N] [--set KNOB=V1,V2 ...] [--objective throughput] [--top 20] [--out DIR]

User errors (a bad file, a bad value) print one line and exit with status 2.
The CLI sits on top of every package: ``demo`` imports ``experiments`` when run.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

EXIT_USAGE = 2


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def print_summary(summary: dict, file=None) -> None:
    file = sys.stdout if file is None else file  # looked up now: stdout may be redirected
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        print(f"  {key:<{width}}  {_fmt(value)}", file=file)


def cmd_simulate(args) -> int:
    from simulator.executor import simulate
    from simulator.experiment import load_experiment

    experiment = load_experiment(args.file)
    result = simulate(experiment)
    name = experiment.name or Path(args.file).stem
    print(f"{name}: {experiment.world_size} ranks, {experiment.iterations} iterations")
    print_summary(result.summary())
    if args.out:
        folder = result.save(args.out)
        print(f"tables written to {folder}")
    if args.trace:
        print(f"trace written to {result.to_chrome_trace(args.trace)}")
    return 0


def cmd_collective(args) -> int:
    from simulator.cluster import Cluster
    from simulator.collectives import simulate_collective
    from simulator.units import fmt_bandwidth, fmt_bytes, fmt_time, parse_bytes
    from strategies.collectives import ALGORITHMS

    # Check every input before printing anything, so an error is the only output.
    if args.op not in ALGORITHMS:
        raise ValueError(f"--op must be one of {tuple(ALGORITHMS)}, got {args.op!r}")
    algorithm = args.algorithm or ALGORITHMS[args.op][0]
    if algorithm not in ALGORITHMS[args.op]:
        raise ValueError(f"--algorithm must be one of {ALGORITHMS[args.op]} for {args.op}, got {algorithm!r}")
    sizes = [parse_bytes(size, field="--size") for size in args.size]
    # Show sizes in the prefix system they were written in: "1MB" as 1 MB, not 976.6 KiB.
    systems = ["binary" if "i" in str(size) else "decimal" for size in args.size]
    cluster = Cluster.homogeneous(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu=args.gpu,
        intra=args.intra, inter=args.inter, nics_per_node=args.nics_per_node,
    )
    p = cluster.world_size
    # nccl-tests' bus bandwidth factor: what each link must carry relative to algbw
    factor = {"all_reduce": 2 * (p - 1) / p, "reduce_scatter": (p - 1) / p,
              "all_gather": (p - 1) / p, "all_to_all": (p - 1) / p}.get(args.op, 1.0)
    rows = []
    for nbytes, system in zip(sizes, systems, strict=True):
        t = simulate_collective(cluster, args.op, nbytes, algorithm=algorithm)
        algbw = nbytes / t if t > 0 else float("inf")
        busbw = algbw * factor if factor > 0 else 0.0  # one rank: nothing crosses a link
        rows.append((fmt_bytes(nbytes, system), t, algbw, busbw))
    print(f"{args.op} / {algorithm} on {p} ranks ({args.nodes} x {args.gpus_per_node})")
    print(f"  {'size':>10}  {'time':>10}  {'algbw':>12}  {'busbw':>12}")
    for size, t, algbw, busbw in rows:
        print(f"  {size:>10}  {fmt_time(t):>10}  {fmt_bandwidth(algbw):>12}  "
              f"{fmt_bandwidth(busbw):>12}")
    return 0


def cmd_realrun(args) -> int:
    import realrun
    from simulator.experiment import load_experiment

    experiment = load_experiment(args.file)
    launcher = _launcher(args.launcher, args.bandwidth)
    name = experiment.name or Path(args.file).stem
    quiet = args.launcher == "torchrun" and os.environ.get("RANK", "0") != "0"
    if not quiet:
        print(f"{name}: {experiment.world_size} ranks, {experiment.iterations} iterations, "
              f"{args.launcher} launcher, {args.backend} on {args.device}", flush=True)
    try:
        result = realrun.run(experiment, launcher=launcher, backend=args.backend, device=args.device, lr=args.lr,
                             timeout=args.timeout, progress=not quiet and sys.stderr.isatty() or None)
    except realrun.RealRunError as exc:
        print(f"clustersim: error: {str(exc).splitlines()[0]} (files: {exc.folder})", file=sys.stderr)
        return 1
    if result is None:  # a torchrun rank other than 0
        return 0
    summary = result.summary()
    summary["final_loss"] = result.stats["final_loss"]
    print_summary(summary)
    if args.out:
        folder = result.save(args.out)
        print(f"tables written to {folder}")
    return 0


def _launcher(name: str, bandwidth=None):
    import realrun

    if name != "emulated" and bandwidth is not None:
        raise ValueError("--bandwidth applies to --launcher emulated only")
    return {"local": realrun.Local, "torchrun": realrun.Torchrun,
            "emulated": lambda: realrun.EmulatedCluster(bandwidth=bandwidth)}[name]()


def cmd_calibrate(args) -> int:
    from realrun.calibrate import calibrate
    from simulator.experiment import load_experiment
    from simulator.units import fmt_bandwidth, fmt_time

    experiment = load_experiment(args.file)
    name = experiment.name or Path(args.file).stem
    out = Path(args.out or f"calibration-{name}")
    launcher = None if args.launcher == "none" else _launcher(args.launcher)
    print(f"{name}: calibrating {args.device}" + (f" and the {args.launcher} launcher's links" if launcher else ""),
          flush=True)
    cal = calibrate(experiment, launcher=launcher, links=launcher is not None, device=args.device,
                    threads=args.threads, out=out)
    dev = cal.device
    facts = {
        "fp32 matmul": f"{dev.flops('fp32') / 1e9:.1f} GFLOP/s",
        "optimizer memory bandwidth": fmt_bandwidth(dev.mem_bandwidth),
        "op overhead": fmt_time(dev.kernel_overhead),
        "forward (model)": fmt_time(sum(layer.fwd_time for layer in cal.workload.layers)),
        "backward (model)": fmt_time(sum(layer.bwd_time for layer in cal.workload.layers)),
        "batch": cal.workload.calibration_batch,
        "shared cores": cal.shared_cores,
    }
    if cal.link is not None:
        facts["link bandwidth"] = fmt_bandwidth(cal.link.bandwidth, "bps")
        facts["link latency"] = fmt_time(cal.link.latency)
    for key, value in cal.cost_scale.items():
        facts[f"{key} (measured/model)"] = f"{value:.2f}"
    print_summary(facts)
    print(f"calibration written to {out} (workload.json, calibration.json)")
    return 0


def cmd_validate(args) -> int:
    from experiments import validation
    from realrun.validate import error_summary, validate, write_report
    from simulator.experiment import load_experiment

    if args.files and args.matrix:
        raise ValueError("give experiment files or --matrix, not both")
    if args.files:
        experiments = []
        for f in args.files:
            exp = load_experiment(f)
            experiments.append(exp if exp.name else exp.replace(name=Path(f).stem))
    else:
        experiments = validation.cases(quick=args.quick)
    out = Path(args.out)
    table = validate(experiments, launcher=_launcher(args.launcher),
                     calibration=None if args.no_calibrate else "auto", out=out / "validation.csv",
                     progress=sys.stderr.isatty() or None)
    print(error_summary(table).to_string(index=False))
    for path in write_report(table, out):
        print(f"wrote {path}")
    print(f"table written to {out / 'validation.csv'}")
def parse_value(text: str):
    """A ``--set`` value: an integer, a number, true/false, none, or else the string itself."""
    text = text.strip()
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            continue
        if kind is int or math.isfinite(value):  # "nan", "inf": names, not numbers, here
            return value
    return text


def parse_settings(settings: list[str]) -> dict[str, list]:
    """``["KEY=V1,V2", ...]`` as a sweep grid."""
    grid: dict[str, list] = {}
    for setting in settings:
        key, sep, values = setting.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ValueError(f"--set must be KEY=V1,V2,... (e.g. cluster.nodes=1,2,4), got {setting!r}")
        if key in grid:
            raise ValueError(f"--set {key} is given twice; list all its values in one --set")
        items = values.split(",")
        if any(not item.strip() for item in items):
            raise ValueError(f"--set {key}: empty value in {values!r}")
        grid[key] = [parse_value(item) for item in items]
    return grid


def cmd_sweep(args) -> int:
    from concurrent.futures import ProcessPoolExecutor

    from simulator.experiment import load_experiment
    from simulator.sweep import sweep

    experiment = load_experiment(args.file)
    grid = parse_settings(args.set)
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    if args.csv:  # fail before the sweep runs, not after it
        csv = Path(args.csv)
        if csv.is_dir():
            raise ValueError(f"--csv {args.csv!r} is a folder; give a file name")
        csv.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(csv.parent, os.W_OK):
            raise ValueError(f"--csv {args.csv!r}: cannot write in folder {str(csv.parent)!r}")
    executor = ProcessPoolExecutor(args.workers) if args.workers else None
    try:
        table = sweep(experiment, grid, executor=executor, out=args.out)
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)
    name = experiment.name or Path(args.file).stem
    points = len(table)
    print(f"{name}: {points} point{'s' if points != 1 else ''} over {', '.join(grid)}")
    shown = table[list(grid) + [c for c in ("throughput", "iteration_time_mean", "error") if c in table]]
    if "error" in shown:  # the whole message is in --csv; a screen row shows its start
        shown = shown.assign(error=shown["error"].map(lambda e: e if not isinstance(e, str) or len(e) <= 60
                                                      else e[:59] + "…"))
    print(shown.to_string(index=False, float_format=_fmt))
    if "error" in table:
        print(f"{int(table['error'].notna().sum())} of {points} points failed (see the error column)")
    if args.out:
        print(f"rows written to {args.out}")
    if args.csv:
        table.to_csv(args.csv, index=False)
        print(f"table written to {args.csv}")
    return 0


def global_batch_of(experiment) -> int:
    """Samples one iteration of ``experiment`` trains on: each data shard's batch once (the ranks
    of a tensor- or pipeline-parallel replica share theirs)."""
    job = experiment.job()
    shard_of = getattr(experiment.strategy, "data_shard", None)
    ranks = range(job.accelerators)
    if callable(shard_of):
        return int(sum({shard_of(job, r): job.samples(r) for r in ranks}.values()))
    return int(sum(job.samples(r) for r in ranks))


SEARCH_COLUMNS = ("iteration_time", "throughput", "tflops_per_gpu", "mfu", "peak_memory_gb", "staleness_mean",
                  "bound_ratio", "lossy")


def cmd_search(args) -> int:
    from concurrent.futures import ProcessPoolExecutor

    from simulator.experiment import load_experiment
    from simulator.search import plot_search, search

    experiment = load_experiment(args.file)
    space = parse_settings(args.set or [])
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    if args.top < 1:
        raise ValueError(f"--top must be at least 1, got {args.top}")
    batch = args.global_batch if args.global_batch is not None else global_batch_of(experiment)
    out = Path(args.out) if args.out else None
    executor = ProcessPoolExecutor(args.workers) if args.workers else None
    try:
        table = search(experiment.workload, experiment.cluster, global_batch=batch, precision=experiment.precision,
                       optimizer=experiment.optimizer, space=space or None, objective=args.objective,
                       executor=executor, out=out / "search.jsonl" if out else None, progress=None)
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)
    c = table.attrs["counts"]
    name = experiment.name or Path(args.file).stem
    print(f"{name}: {c['generated']} candidates for {experiment.cluster.num_gpus} GPUs at global batch {batch} "
          f"({table.attrs['family']} space): {c['pruned_memory']} do not fit, {c['pruned_bound']} cannot beat "
          f"the best (bound), {c['simulated']} simulated")
    sim = table[table["status"] == "simulated"]
    knobs = [k for k in table.columns[1:table.columns.get_loc("gpus")] if sim[k].notna().any()]
    shown = sim.head(args.top)[["rank", *knobs, *[k for k in SEARCH_COLUMNS if sim[k].notna().any()]]]
    print(shown.to_string(index=False, float_format=_fmt))
    if out is not None:
        table.to_csv(out / "search.csv", index=False)
        plots = plot_search(table, out)
        print(f"table written to {out / 'search.csv'}; plots: {', '.join(p.name for p in plots)}")
    return 0


def cmd_demo(args) -> int:
    from experiments import allreduce_algorithms

    allreduce_algorithms.main(out=Path(args.out), quick=args.quick)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line too, like every other user error."""

    def error(self, message: str):
        message = " ".join(message.split())
        self.exit(EXIT_USAGE, f"clustersim: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="clustersim", description="Simulate distributed training on GPU clusters.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="simulate an experiment file (TOML or JSON)")
    p.add_argument("file")
    p.add_argument("--out", help="folder for the result tables (CSV) and summary")
    p.add_argument("--trace", help="write a Chrome/Perfetto trace JSON here")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("collective", help="time one collective across sizes, like nccl-tests")
    p.add_argument("--op", default="all_reduce")
    p.add_argument("--algorithm", default=None, help="default: the op's first algorithm (ring for all_reduce)")
    p.add_argument("--size", nargs="+", default=["1MB", "16MB", "256MB"])
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nics-per-node", type=int, default=1)
    p.add_argument("--gpu", default="A100-80GB")
    p.add_argument("--intra", default="nvlink3")
    p.add_argument("--inter", default="100GbE")
    p.set_defaults(func=cmd_collective)

    p = sub.add_parser("realrun", help="run an experiment file for real on torch.distributed")
    p.add_argument("file")
    p.add_argument("--launcher", choices=("local", "emulated", "torchrun"), default="local",
                   help="local processes, an emulated cluster (root: namespaces + tc), or under torchrun")
    p.add_argument("--bandwidth", default=None, help="emulated links' bandwidth (default: the cluster's inter)")
    p.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--lr", type=float, default=0.01, help="learning rate (default 0.01)")
    p.add_argument("--timeout", type=float, default=None, help="seconds the whole run may take")
    p.add_argument("--out", help="folder for the result tables (CSV) and summary")
    p.set_defaults(func=cmd_realrun)

    p = sub.add_parser("calibrate", help="measure this machine (and emulated links) for an experiment's model")
    p.add_argument("file")
    p.add_argument("--launcher", choices=("none", "local", "emulated"), default="none",
                   help="whose links to measure: none (keep the catalogue's), local (loopback), emulated (root)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per rank (default 1)")
    p.add_argument("--out", help="folder for the calibration (default: calibration-NAME)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("validate", help="run experiments for real and simulated; predicted vs measured")
    p.add_argument("files", nargs="*", help="experiment files (default: the validation matrix)")
    p.add_argument("--matrix", action="store_true", help="the validation matrix that ships with clustersim")
    p.add_argument("--quick", action="store_true", help="four cases of the matrix, one per family")
    p.add_argument("--launcher", choices=("local", "emulated"), default="emulated",
                   help="emulated cluster (root; links shaped to each experiment's bandwidth) or local processes")
    p.add_argument("--no-calibrate", action="store_true", help="catalogue predictions only")
    p.add_argument("--out", default="validation-out", help="output folder (default: validation-out)")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("sweep", help="simulate an experiment file at every point of a grid of values")
    p.add_argument("file")
    p.add_argument("--set", action="append", required=True, metavar="KEY=V1,V2",
                   help="values of one field (dotted path, e.g. cluster.nodes=1,2,4); repeat for a grid")
    p.add_argument("--out", help="JSON-lines file rows are appended to as they finish; "
                                 "given again, the sweep runs only the points it lacks")
    p.add_argument("--csv", help="write the table (every summary metric) as CSV here")
    p.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("search", help="rank the ways to train an experiment file's model on its cluster")
    p.add_argument("file")
    p.add_argument("--global-batch", type=int, default=None,
                   help="samples per iteration (default: what the file's experiment trains on)")
    p.add_argument("--set", action="append", metavar="KNOB=V1,V2",
                   help="narrow or widen one knob of the space (e.g. tp=4,8 or compression=none,powersgd)")
    p.add_argument("--objective", choices=("throughput", "iteration_time", "mfu", "cost"), default="throughput")
    p.add_argument("--top", type=int, default=20, help="rows to print (default 20)")
    p.add_argument("--out", help="folder: search.jsonl (rows as they finish; given again, the search resumes), "
                                 "search.csv and plots")
    p.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("demo", help="what-if: all-reduce algorithms x cluster size x network speed")
    p.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    p.add_argument("--quick", action="store_true", help="a smaller grid (seconds)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse printed its one-line usage error
        return int(exc.code or 0)
    try:
        return args.func(args)
    except (ValueError, OSError, TypeError, RecursionError) as exc:
        if os.environ.get("CLUSTERSIM_DEBUG"):
            raise
        message = " ".join(str(exc).split())  # one line, whatever the message held
        print(f"clustersim: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("clustersim: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
