"""GPU check: realrun on one CUDA GPU, over NCCL and gloo, and the simulator's error there.

Run it where there is a CUDA GPU (one is enough)::

    python benchmarks/gpu.py --out gpu-out

It writes, as each part finishes:

* ``env.json``: the GPU, torch, CUDA and NCCL versions;
* ``paths.csv``: the NCCL path run end to end on one rank (``collectives="schedule"`` and
  ``"native"``), its losses against gloo's on the same GPU and seed, and two ranks sharing
  the GPU over gloo (NCCL refuses two ranks on one device) against the simulator's bytes;
* ``validation.csv``: data-parallel training of each model on the GPU at half, once and
  twice a batch size B, measured against the simulator on the catalogue's entry for this
  GPU and on two calibrations: ``calibrated-one-batch`` (layers timed at B, scaled linearly
  with the batch) and ``calibrated`` (layers timed at B/4, B and 4B, interpolated). The runs
  at B/2 and 2B are the calibrations' error on data they were not fitted on (``held_out``);
  the run at B is in-sample.

``--device cpu --backend gloo --quick`` runs the same code on a CPU (small models), which
is how the script is checked where there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import pandas as pd

from simulator import Cluster, Experiment, Workload
from strategies import AllReduceSGD

GPU_CATALOGUE = (("H200", "H200-SXM"), ("H100", "H100-SXM"), ("A100", "A100-80GB"), ("V100", "V100-32GB"))


def catalogue_device(device: str) -> str:
    """The catalogue entry for the GPU at hand (``cpu-core`` on a CPU)."""
    if device == "cpu":
        return "cpu-core"
    import torch

    name = torch.cuda.get_device_name(0)
    for key, entry in GPU_CATALOGUE:
        if key in name:
            return entry
    raise SystemExit(f"gpu.py: no catalogue entry for GPU {name!r}; known: {[k for k, _ in GPU_CATALOGUE]}")


def environment(device: str) -> dict:
    import torch

    env = {"torch": torch.__version__, "device": device, "date": time.strftime("%Y-%m-%d")}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, memory_bytes=props.total_memory, multiprocessors=props.multi_processor_count,
                   capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                   nccl=".".join(map(str, torch.cuda.nccl.version())),
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)
    return env


def experiment(workload: Workload, gpu: str, batch: int, name: str, *, ranks: int = 1,
               iterations: int = 12) -> Experiment:
    cluster = Cluster.homogeneous(nodes=1, gpus_per_node=ranks, gpu=gpu)
    return Experiment(workload=workload, cluster=cluster, strategy=AllReduceSGD(), batch_size=batch,
                      iterations=iterations, seed=1, name=name)


def models(quick: bool) -> list[tuple[str, Workload, int]]:
    """(name, workload, batch size the calibration is made at)."""
    if quick:
        return [("mlp", Workload.from_zoo("mlp", in_features=256, hidden=[512, 512], out_features=10), 64)]
    return [
        ("mlp", Workload.from_zoo("mlp", in_features=1024, hidden=[4096, 4096], out_features=10), 256),
        ("resnet50", Workload.from_zoo("resnet50"), 64),
        ("gpt2-small", Workload.from_zoo("gpt", size="gpt2-small", seq_len=512), 8),
    ]


def _append(path: Path, rows: list[dict]) -> None:
    frame = pd.DataFrame(rows)
    frame.to_csv(path, mode="a", header=not path.exists(), index=False)
    print(frame.to_string(index=False), flush=True)


def paths(out: Path, device: str, backend: str, gpu: str) -> None:
    """The NCCL path end to end, and two ranks on one device over gloo."""
    import numpy as np

    import realrun
    from realrun.validate import steady_metrics
    from simulator.executor import simulate

    w = Workload.from_zoo("mlp", in_features=256, hidden=[512, 512], out_features=10)
    one = experiment(w, gpu, 64, "one-rank", iterations=6)
    reference = realrun.run(one, backend="gloo", device=device, timeout=300)
    ref_loss = np.array(reference.stats["loss"], dtype=float)
    rows = []
    for collectives in ("schedule", "native"):
        t0 = time.perf_counter()
        res = realrun.run(one, backend=backend, device=device, collectives=collectives, timeout=300)
        iters = res.iterations
        row = {"check": f"{backend} one rank ({collectives})", "iterations": int(iters["iteration"].nunique()),
               "expected_iterations": one.iterations, "seconds": round(time.perf_counter() - t0, 2)}
        loss = np.array(res.stats["loss"], dtype=float)
        row["final_loss"] = float(loss[-1]) if len(loss) else math.nan
        row["max_loss_diff_vs_gloo"] = float(np.max(np.abs(loss - ref_loss))) \
            if len(loss) == len(ref_loss) and len(loss) else math.nan
        rows.append(row)
    two = experiment(w, gpu, 64, "two-ranks", ranks=2, iterations=6)
    t0 = time.perf_counter()
    res = realrun.run(two, backend="gloo", device=device, timeout=300)
    real, sim = steady_metrics(res, 2), steady_metrics(simulate(two), 2)
    rows.append({"check": "gloo two ranks, one device (ring)", "iterations": int(res.iterations["iteration"].nunique()),
                 "expected_iterations": two.iterations, "seconds": round(time.perf_counter() - t0, 2),
                 "bytes_per_rank": real["bytes_per_rank"], "simulated_bytes_per_rank": sim["bytes_per_rank"]})
    _append(out / "paths.csv", rows)


def validation(out: Path, device: str, backend: str, gpu: str, quick: bool) -> pd.DataFrame:
    """Each model measured against the catalogue and against a calibration made at one batch size."""
    path = out / "validation.csv"
    for name, workload, batch in models(quick):
        try:
            _validate_model(path, out, name, workload, batch, device, backend, gpu)
        except Exception:  # one model's failure is reported and the others still run
            _failed(out, f"validation of {name}")
    return pd.read_csv(path) if path.exists() else pd.DataFrame()


def _failed(out: Path, what: str) -> None:
    import traceback

    text = f"== {what} failed ==\n{traceback.format_exc()}\n"
    with open(out / "errors.txt", "a", encoding="utf-8") as f:
        f.write(text)
    print(text, file=sys.stderr, flush=True)


def _one_batch(cal):
    """The calibration with the times at its main batch alone (scaled linearly, as before
    layers were timed at several batch sizes)."""
    import dataclasses

    w = cal.workload
    layers = tuple(dataclasses.replace(layer, fwd_times=(), bwd_times=()) for layer in w.layers)
    return dataclasses.replace(cal, workload=dataclasses.replace(w, layers=layers, calibration_batches=()))


def _validate_model(path: Path, out: Path, name: str, workload: Workload, batch: int, device: str, backend: str,
                    gpu: str) -> None:
    """Calibrated at ``batch`` (and a quarter and four times it, for the interpolated model),
    measured at half, once and twice ``batch``."""
    from realrun.calibrate import calibrate
    from realrun.validate import compare, steady_metrics, strategy_label, validate
    from simulator.executor import simulate

    fitted = experiment(workload, gpu, batch, f"{name}-b{batch}")
    grid = tuple(b for b in (batch // 4, batch * 4) if b >= 1 and b != batch)
    t0 = time.perf_counter()
    cal = calibrate(fitted, device=device, repeats=5, batches=grid)
    cal.save(out / f"calibration-{name}")
    seconds = time.perf_counter() - t0
    cases = [experiment(workload, gpu, b, f"{name}-b{b}") for b in (batch // 2, batch, batch * 2)]
    table = validate(cases, calibration={c.name: cal for c in cases}, device=device, backend=backend,
                     warmup=2, timeout=600)
    linear = _one_batch(cal)
    rows = table.to_dict("records")
    for c in cases:  # the same runs against the one-batch calibration
        measured = {r["metric"]: r["measured"] for r in rows if r["experiment"] == c.name}
        rows += compare(c.name, strategy_label(c.strategy), steady_metrics(simulate(linear.apply(c)), 2), measured,
                        "calibrated-one-batch")
    table = pd.DataFrame(rows)
    table = table[table["metric"].isin(["iteration_time_mean", "throughput"])].copy()
    table.insert(1, "fitted_at", f"{batch} + {list(grid)}")
    table.insert(2, "batch", table["experiment"].str.extract(r"-b(\d+)$", expand=False).astype(int))
    table["held_out"] = (table["model"] == "catalogue") | (table["batch"] != batch)
    table["calibration_seconds"] = round(seconds, 1)
    _append(path, table.to_dict("records"))


def summary(table: pd.DataFrame) -> str:
    t = table[table["metric"] == "iteration_time_mean"]
    models = [m for m in ("catalogue", "calibrated-one-batch", "calibrated") if m in set(t["model"])]
    lines = ["| model | batch | measured (ms) | " + " | ".join(f"{m} error" for m in models) + " | held out |",
             "| --- | ---: | ---: | " + " | ".join("---:" for _ in models) + " | --- |"]
    for (exp, batch), g in t.groupby(["experiment", "batch"], sort=False):
        err = {m: float(g.loc[g["model"] == m, "rel_error"].iloc[0]) for m in g["model"]}
        held = "no (fitted here)" if batch == int(str(g["fitted_at"].iloc[0]).split()[0]) else "yes"
        lines.append(f"| {exp.rsplit('-b', 1)[0]} | {batch} | {g['measured'].iloc[0] * 1e3:.2f} | "
                     + " | ".join(f"{err.get(m, math.nan):+.1%}" for m in models) + f" | {held} |")
    for m in models[1:]:
        e = t[(t["model"] == m) & t["held_out"]]["rel_error"].abs()
        if len(e):
            lines.append(f"\n{m}, held-out batches: median |error| {e.median():.1%}, max {e.max():.1%} "
                         f"over {len(e)} runs")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/gpu.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu-out")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--backend", choices=("nccl", "gloo"), default=None,
                        help="default: nccl on cuda, gloo on cpu")
    parser.add_argument("--quick", action="store_true", help="one small model")
    parser.add_argument("--skip-paths", action="store_true")
    args = parser.parse_args(argv)
    backend = args.backend or ("nccl" if args.device == "cuda" else "gloo")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for f in ("paths.csv", "validation.csv", "errors.txt"):
        (out / f).unlink(missing_ok=True)
    env = environment(args.device)
    (out / "env.json").write_text(json.dumps(env, indent=1))
    print(json.dumps(env), flush=True)
    gpu = catalogue_device(args.device)
    if not args.skip_paths:
        try:
            paths(out, args.device, backend, gpu)
        except Exception:
            _failed(out, "the paths check")
    table = validation(out, args.device, backend, gpu, args.quick)
    text = summary(table) if len(table) else "no validation rows"
    if (out / "errors.txt").exists():
        text += "\nfailures: see errors.txt"
    (out / "summary.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
