"""Small objects several test files build (tests/ is on sys.path under pytest)."""

from simulator.workload import Layer, Workload


def small_workload() -> Workload:
    """Four layers, two DDP buckets (1 MiB first-bucket cap), no torch needed."""
    params = (1_000, 200_000, 300_000, 50_000)
    layers = tuple(
        Layer(name=f"fc{i}", kind="Linear", params=p, fwd_flops=2.0 * p, bwd_flops=4.0 * p,
              input_elems=500.0, output_elems=500.0)
        for i, p in enumerate(params)
    )
    return Workload(name="small", layers=layers)


def timed_workload(params=(4096,), fwd=0.4, bwd=0.6, batch=32) -> Workload:
    """Layers with measured times: one iteration's compute is exactly fwd + bwd seconds
    at the calibration batch (and scales linearly with the samples)."""
    n = len(params)
    layers = tuple(
        Layer(name=f"l{i}", kind="Linear", params=p, fwd_flops=1.0, bwd_flops=1.0, input_elems=1.0,
              output_elems=1.0, fwd_time=fwd / n, bwd_time=bwd / n)
        for i, p in enumerate(params)
    )
    return Workload(name="timed", layers=layers, calibration_batch=batch)
