"""``clustersim`` command line.

    clustersim simulate FILE [--out DIR] [--trace FILE.json]
    clustersim collective --op all_reduce --algorithm ring --size 256MB [--nodes 8 ...]
    clustersim demo [--out DIR] [--quick]
    clustersim realrun FILE [--launcher local|emulated|torchrun] [--bandwidth 1Gbps] [--out DIR]

User errors (a bad file, a bad value) print one line and exit with status 2.
The CLI sits on top of every package: ``demo`` imports ``experiments`` when run.
"""

from __future__ import annotations

import argparse
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
    if args.launcher != "emulated" and args.bandwidth is not None:
        raise ValueError("--bandwidth applies to --launcher emulated only")
    launcher = {"local": realrun.Local, "torchrun": realrun.Torchrun,
                "emulated": lambda: realrun.EmulatedCluster(bandwidth=args.bandwidth)}[args.launcher]()
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
