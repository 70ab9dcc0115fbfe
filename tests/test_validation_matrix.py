"""The validation matrix on the emulated cluster (root): every family of strategy run for
real and simulated. CI runs it (as root, with CLUSTERSIM_REQUIRE_EMULATED=1) and fails if
the calibrated model's median error of iteration time exceeds the alarm in two runs in a
row, or if calibration does not beat the catalogue.

The alarm is at 10 % (the goal is 5 %). On this 2-core shared machine timings move by
10-20 % from one run to the next, the real runs' and the calibrations' both, so the matrix
runs a second time before the alarm sounds. Six runs with the emulated links' 2 ms tbf
bucket gave calibrated medians of 3.1, 5.0, 7.1, 10.3, 3.6 and 5.9 % (the catalogue's:
13-23 %); what misses is in the README (Validate): the compressors' small messages under
compute load and the pipelines' messages after the link idles (tbf's bucket).
"""

from __future__ import annotations

import pytest
from test_realrun_cluster import need_root

from experiments.validation import cases
from realrun import EmulatedCluster
from realrun.validate import error_summary, validate

pytestmark = pytest.mark.spawns

ALARM = 0.10
"""Median |relative error| of iteration time, calibrated, above which CI fails twice in a row
(the goal is 5 %: see the module's docstring)."""


def _median(table) -> float:
    return float(error_summary(table).set_index("model").loc["calibrated", "median_abs_error"])


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """The matrix's table; run a second time if the first run's median error is over the
    alarm: timings on a shared 2-core machine move by 10-20 % from one run to the next
    (measured here), so the alarm stands for two runs in a row."""
    need_root()
    folder = tmp_path_factory.mktemp("validation")
    table = validate(cases(), launcher=EmulatedCluster(), out=folder / "validation.csv", progress=False)
    print(table[table["metric"] == "iteration_time_mean"].to_string(index=False))
    if _median(table) > ALARM:
        print(f"median error {_median(table):.3f} over the alarm: running the matrix again")
        table = validate(cases(), launcher=EmulatedCluster(), out=folder / "validation-again.csv", progress=False)
        print(table[table["metric"] == "iteration_time_mean"].to_string(index=False))
    return table


def test_every_case_has_both_models(table):
    it = table[table["metric"] == "iteration_time_mean"]
    names = {c.name for c in cases()}
    for model in ("catalogue", "calibrated"):
        assert set(it.loc[it["model"] == model, "experiment"]) == names


def test_calibrated_median_error_within_the_alarm(table):
    summary = error_summary(table).set_index("model")
    print(summary.to_string())
    assert summary.loc["calibrated", "median_abs_error"] <= ALARM, summary.to_string()


def test_calibration_beats_the_catalogue(table):
    # Mean |error|: the catalogue's roofline misses the compressors' CPU cost by 50-70 %.
    summary = error_summary(table).set_index("model")
    assert summary.loc["calibrated", "mean_abs_error"] < summary.loc["catalogue", "mean_abs_error"], \
        summary.to_string()


def test_bytes_agree_exactly(table):
    # What each rank sends is decided by the strategy's program, which both executors run.
    b = table[(table["metric"] == "bytes_per_rank") & (table["model"] == "calibrated")]
    bad = b[(b["rel_error"].abs() > 1e-9)]
    assert bad.empty, bad.to_string()
