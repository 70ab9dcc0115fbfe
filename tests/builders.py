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
