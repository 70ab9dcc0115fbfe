"""Plots: the drawn data equals the tables, checked against values worked out by hand.

The breakdown and timeline cases use a hand-built RunResult (times in ms) whose
compute / exposed-communication / idle split is computed on paper in ``TINY_SPLIT``:
comm spans overlap each other, overlap compute, and cross an iteration boundary.
"""

import subprocess
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from builders import small_workload  # noqa: E402
from matplotlib.collections import PathCollection  # noqa: E402
from matplotlib.container import ErrorbarContainer  # noqa: E402
from matplotlib.patches import Rectangle, StepPatch  # noqa: E402

from simulator import plots  # noqa: E402
from simulator.cluster import Cluster  # noqa: E402
from simulator.executor import simulate  # noqa: E402
from simulator.experiment import Experiment  # noqa: E402
from simulator.results import ITERATION_COLUMNS, UPDATE_COLUMNS, RunResult, plot_staleness  # noqa: E402
from strategies import AllReduceSGD, ParameterServer, PipelineParallel  # noqa: E402

MS = 1e-3


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# -- hand-built tables -----------------------------------------------------------------------------

SWEEP = pd.DataFrame({
    "strategy": ["ring"] * 4 + ["ps"] * 4,
    "workers": [1, 2, 4, 8] * 2,
    "throughput": [100.0, 190.0, 360.0, 640.0, 80.0, 150.0, 240.0, 280.0],
})


def updates(staleness, dropped=()) -> pd.DataFrame:
    rows = [(0, 9, 0, i, 8, 0, s, s, 0.0, float(i), True) for i, s in enumerate(staleness)]
    rows += [(1, 9, 0, i, 8, 0, s, s, 0.0, float(i), False) for i, s in enumerate(dropped)]
    return pd.DataFrame(rows, columns=UPDATE_COLUMNS)


def run_with_updates(staleness, dropped=(), name="") -> RunResult:
    empty = pd.DataFrame()
    return RunResult(experiment={"name": name}, iterations=empty, timeline=empty, links=empty, ranks=empty,
                     updates=updates(staleness, dropped))


def tiny_result() -> RunResult:
    """Ranks 0 and 1 train two iterations; rank 2 is a server (no iteration rows); one link."""
    iters = [  # rank, iteration, start, end
        (0, 0, 0, 10), (0, 1, 10, 20),
        (1, 0, 0, 8), (1, 1, 8, 20),
    ]
    it = pd.DataFrame([(r, i, s * MS, e * MS, (e - s) * MS, 0.0, 0.0, 0.0, 4) for r, i, s, e in iters],
                      columns=ITERATION_COLUMNS)
    spans = [  # rank, stream, name, start, end, iteration
        (0, "compute", "forward[0:2]", 0, 3, 0),
        (0, "compute", "backward[0:2]", 5, 6, 0),
        (0, "comm", "all_reduce:grads[0]", 2, 7, 0),
        (0, "comm", "send:act[1]->1", 4, 8, 0),
        (0, "comm", "all_reduce:grads[1]", 9, 12, 0),  # crosses into iteration 1
        (0, "compute", "forward[0:2]", 10, 14, 1),
        (0, "compute", "optimizer_step", 16, 18, 1),
        (0, "comm", "all_reduce:grads[0]", 13, 17, 1),
        (1, "compute", "forward[0:2]", 1, 5, 0),
        (1, "compute", "backward[0:2]", 8, 10, 1),
        (1, "compute", "forward[0:2]", 12, 20, 1),
        (1, "comm", "send:grad[0]->0", 9, 13, 1),
        (2, "compute", "apply[shard 0]", 6, 9, -1),
        (2, "comm", "send:params/shard0->0", 9, 25, -1),
        (-1, "link", "node0.nic0.up", 0, 20, -1),
        (-1, "link", "node1.nic0.up", 19.95, 20, -1),  # under 1 % of iteration 1's 12 ms: no row
    ]
    tl = pd.DataFrame([(f"r{r}/{st}", r, st, n, s * MS, e * MS, i) for r, st, n, s, e, i in spans],
                      columns=["resource", "rank", "stream", "name", "start", "end", "iteration"])
    ranks = pd.DataFrame({"rank": [0, 1, 2], "kind": ["gpu", "gpu", "host"]})
    return RunResult(experiment={"name": "tiny"}, iterations=it, timeline=tl, links=pd.DataFrame(), ranks=ranks)


# (rank, iteration) -> compute, exposed comm, idle in ms, worked out on paper:
# (0, 0) [0, 10]: compute [0,3]+[5,6] = 4; comm not under compute [3,5]+[6,8]+[9,10] = 5; idle [8,9] = 1
# (0, 1) [10, 20]: compute [10,14]+[16,18] = 6; comm [10,12] hidden, [14,16] exposed = 2; idle [18,20] = 2
# (1, 0) [0, 8]: compute [1,5] = 4; no comm; idle 4
# (1, 1) [8, 20]: compute [8,10]+[12,20] = 10; comm [10,12] exposed = 2; idle 0
TINY_SPLIT = {(0, 0): (4, 5, 1), (0, 1): (6, 2, 2), (1, 0): (4, 0, 4), (1, 1): (10, 2, 0)}

VALIDATION = pd.DataFrame([
    # experiment, strategy, metric, predicted, measured
    ("dp-2", "allreduce", "throughput", 110.0, 100.0),
    ("dp-4", "allreduce", "throughput", 190.0, 200.0),
    ("dp-8", "allreduce", "throughput", 400.0, 400.0),
    ("dp-2", "allreduce", "iteration_time", 0.30, 0.25),
    ("ps-2", "ps", "throughput", 50.0, 80.0),
    ("ps-4", "ps", "throughput", 90.0, 100.0),
    ("ps-2", "ps", "iteration_time", 0.5, 0.4),
], columns=["experiment", "strategy", "metric", "predicted", "measured"])
VALIDATION["rel_error"] = (VALIDATION["predicted"] - VALIDATION["measured"]) / VALIDATION["measured"]


# -- sweeps ----------------------------------------------------------------------------------------


def lines_by_label(ax) -> dict:
    return {line.get_label(): line for line in ax.get_lines()}


def test_throughput_lines_are_the_table_and_ideal_scales_linearly():
    ax = plots.throughput_vs_workers(SWEEP.sample(frac=1, random_state=0), ideal=True)
    lines = lines_by_label(ax)
    assert list(lines["ring"].get_xdata()) == [1, 2, 4, 8]
    assert list(lines["ring"].get_ydata()) == [100.0, 190.0, 360.0, 640.0]
    assert list(lines["ps"].get_ydata()) == [80.0, 150.0, 240.0, 280.0]
    assert lines["ring"].get_marker() == "o"
    # True: from the best 1-worker throughput (ring's 100).
    assert list(lines["linear scaling"].get_ydata()) == [100.0, 200.0, 400.0, 800.0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert ax.get_ylabel() == "throughput (samples/s)"
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"ring", "ps", "linear scaling"}


def test_throughput_ideal_from_a_group_or_a_number_and_linear_scale():
    ax = plots.throughput_vs_workers(SWEEP, ideal="ps", scale="linear")
    assert list(lines_by_label(ax)["linear scaling"].get_ydata()) == [80.0, 160.0, 320.0, 640.0]
    assert ax.get_xscale() == "linear"
    ax = plots.throughput_vs_workers(SWEEP, ideal=50.0)
    assert list(lines_by_label(ax)["linear scaling"].get_ydata()) == [50.0, 100.0, 200.0, 400.0]
    ax = plots.throughput_vs_workers(SWEEP[SWEEP["strategy"] == "ring"], by=None)
    assert len(ax.get_lines()) == 1 and ax.get_legend() is None


def test_scaling_efficiency_is_the_hand_formula():
    ax = plots.scaling_efficiency(SWEEP)
    lines = lines_by_label(ax)
    # ring: 100, 190/(2*100), 360/(4*100), 640/(8*100); ps: base 80
    assert np.allclose(lines["ring"].get_ydata(), [100.0, 95.0, 90.0, 80.0])
    assert np.allclose(lines["ps"].get_ydata(), [100.0, 150 / 160 * 100, 240 / 320 * 100, 280 / 640 * 100])
    ref = lines["linear scaling"]
    assert list(ref.get_ydata()) == [100.0, 100.0]
    assert ax.yaxis.get_major_formatter()(50.0, 0) == "50%"


def test_scaling_efficiency_groups_by_several_columns():
    table = pd.concat([SWEEP.assign(network="10GbE"), SWEEP.assign(network="100GbE")])
    ax = plots.scaling_efficiency(table, by=["strategy", "network"])
    assert {"ring, 10GbE", "ps, 100GbE"} <= set(lines_by_label(ax))


# -- staleness -------------------------------------------------------------------------------------


def test_staleness_histogram_has_every_integer_bin_and_ignores_dropped():
    run = run_with_updates([0, 0, 2, 2, 2, 5], dropped=[1, 7], name="async")
    ax = plots.staleness(run)
    (patch,) = [p for p in ax.patches if isinstance(p, StepPatch)]
    values, edges, _ = patch.get_data()
    assert np.allclose(values, [2 / 6, 0, 3 / 6, 0, 0, 1 / 6])  # bins 1, 3, 4 empty but present
    assert np.allclose(edges, np.arange(7) - 0.5)
    assert patch.get_label() == "async"


def test_staleness_histograms_of_two_runs_each_to_its_own_max():
    ax = plots.staleness([run_with_updates([0, 3]), run_with_updates([1, 1, 1, 0])], labels=["a", "b"])
    patches = [p for p in ax.patches if isinstance(p, StepPatch)]
    assert np.allclose(patches[0].get_data()[0], [0.5, 0, 0, 0.5])
    assert np.allclose(patches[1].get_data()[0], [0.25, 0.75])
    assert [p.get_label() for p in patches] == ["a", "b"]


def test_staleness_cdf_steps_to_one():
    ax = plots.staleness([run_with_updates([0, 0, 2, 2, 2, 5]), run_with_updates([1])], kind="cdf")
    first, second = ax.get_lines()
    assert list(first.get_xdata()) == [-1, 0, 1, 2, 3, 4, 5]
    assert np.allclose(first.get_ydata(), [0, 2 / 6, 2 / 6, 5 / 6, 5 / 6, 5 / 6, 1])
    assert first.get_drawstyle() == "steps-post"
    assert np.allclose(second.get_ydata(), [0, 0, 1, 1, 1, 1, 1])  # reaches 1 at its max, stays there
    assert [line.get_label() for line in ax.get_lines()] == ["run 0", "run 1"]


def test_plot_staleness_delegates():
    ax = plot_staleness([run_with_updates([1, 1, 0])], labels=["x"])
    (patch,) = [p for p in ax.patches if isinstance(p, StepPatch)]
    assert np.allclose(patch.get_data()[0], [1 / 3, 2 / 3])


# -- timeline --------------------------------------------------------------------------------------


def bars(ax) -> list[tuple[str, float, float, str]]:
    """(row label, left, width, legend label of its container) of every bar."""
    rows = [t.get_text() for t in ax.get_yticklabels()]
    out = []
    for container in ax.containers:
        for rect in container.patches:
            row = rows[round(rect.get_y() + rect.get_height() / 2)]
            out.append((row, round(rect.get_x(), 9), round(rect.get_width(), 9), container.get_label()))
    return sorted(out)


def test_timeline_draws_the_spans_of_the_chosen_iteration():
    ax = plots.timeline(tiny_result())  # iterations 0, 1: the middle one is 1; its window is [8, 20] ms
    expected = sorted([
        # rank 0: the spans labelled iteration 1 (not the all-reduce labelled 0 that crosses into it)
        ("rank 0 compute", 2, 4, "forward"), ("rank 0 compute", 8, 2, "optimizer step"),
        ("rank 0 comm", 5, 4, "all-reduce"),
        ("rank 1 compute", 0, 2, "backward"), ("rank 1 compute", 4, 8, "forward"),
        ("rank 1 comm", 1, 4, "send"),
        # the server has no iterations: what overlaps [8, 20], clipped
        ("rank 2 (host) compute", 0, 1, "apply (server)"), ("rank 2 (host) comm", 1, 11, "send"),
        ("node0.nic0.up", 0, 12, "link busy"),
    ])
    assert "node1.nic0.up" not in [t.get_text() for t in ax.get_yticklabels()]
    assert bars(ax) == expected
    assert "(ms)" in ax.get_xlabel()
    legend = {t.get_text() for t in ax.get_legend().get_texts()}
    assert legend == {"forward", "backward", "optimizer step", "all-reduce", "send", "apply (server)",
                      "link busy"}


def test_timeline_colours_by_kind_and_selects_ranks_and_iteration():
    ax = plots.timeline(tiny_result(), iteration=0, ranks=[0], links=False)
    rows = [t.get_text() for t in ax.get_yticklabels()]
    assert rows == ["rank 0 compute", "rank 0 comm"]
    # iteration 0 of rank 0, window [0, 10]: its five spans (the all-reduce running to 12 ms is its own)
    assert sorted(g[1:3] for g in bars(ax)) == [(0, 3), (2, 5), (4, 4), (5, 1), (9, 3)]
    colours = {c.get_label(): c.patches[0].get_facecolor() for c in ax.containers}
    assert colours["forward"] != colours["backward"] != colours["all-reduce"]


# -- breakdown -------------------------------------------------------------------------------------


def test_iteration_breakdown_is_the_hand_split():
    table = plots.iteration_breakdown(tiny_result())
    got = {(r.rank, r.iteration): (r.compute, r.exposed_comm, r.idle) for r in table.itertuples()}
    assert set(got) == set(TINY_SPLIT)  # the server (rank 2) has no iterations
    for key, parts in TINY_SPLIT.items():
        assert np.allclose(got[key], np.array(parts) * MS), key
    assert np.allclose(table[["compute", "exposed_comm", "idle"]].sum(axis=1), table["duration"])


def test_breakdown_bars_are_the_mean_split():
    runs = [tiny_result(), tiny_result()]
    ax = plots.breakdown(runs, labels=["a", "b"])
    by_part = {c.get_label(): c.patches for c in ax.containers}
    assert list(by_part) == ["compute", "exposed comm", "idle (bubble/wait)"]
    # means over the four (rank, iteration) rows, in ms: (4+6+4+10)/4, (5+2+0+2)/4, (1+2+4+0)/4
    widths = [by_part[p][0].get_width() for p in by_part]
    assert np.allclose(widths, [6.0, 2.25, 1.75])
    assert sum(widths) == pytest.approx(10.0)  # the mean iteration duration, (10+10+8+12)/4
    lefts = [by_part[p][1].get_x() for p in by_part]
    assert np.allclose(lefts, [0.0, 6.0, 8.25])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b"]
    assert "(ms)" in ax.get_xlabel()


def test_breakdown_vertical_and_warmup():
    ax = plots.breakdown(tiny_result(), orientation="vertical", warmup=1)
    # iteration 1 only: (6+10)/2, (2+2)/2, (2+0)/2; sums to (10+12)/2
    heights = [c.patches[0].get_height() for c in ax.containers]
    assert np.allclose(heights, [8.0, 2.0, 1.0])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["tiny"]


# -- validation ------------------------------------------------------------------------------------


def test_predicted_vs_measured_is_log_log_with_the_identity_and_band():
    ax = plots.predicted_vs_measured(VALIDATION)
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    lines = lines_by_label(ax)
    ident = lines["predicted = measured"]
    assert np.allclose(ident.get_xdata(), ident.get_ydata())
    band = lines["±10 %"]
    assert np.allclose(band.get_ydata(), 1.1 * np.asarray(band.get_xdata()))
    assert any(np.allclose(line.get_ydata(), 0.9 * np.asarray(line.get_xdata())) for line in ax.get_lines())
    points = {c.get_label(): c.get_offsets() for c in ax.collections if isinstance(c, PathCollection)}
    assert set(points) == {"allreduce", "ps"}
    ps = VALIDATION[VALIDATION["strategy"] == "ps"]
    assert np.allclose(points["ps"], ps[["measured", "predicted"]].to_numpy())
    assert {t.get_text() for t in ax.get_legend().get_texts()} >= {"allreduce", "ps"}


def test_predicted_vs_measured_of_one_metric_has_different_markers():
    ax = plots.predicted_vs_measured(VALIDATION, metric="throughput")
    points = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert sum(len(c.get_offsets()) for c in points) == 5
    assert not np.array_equal(points[0].get_paths()[0].vertices, points[1].get_paths()[0].vertices)
    assert ax.get_xlabel() == "measured throughput (samples/s)"


def test_predicted_vs_measured_tells_a_dozen_strategies_apart_and_keeps_its_legend_off_them():
    """More strategies than colours: each (colour, marker) pair is its own, and the legend sits
    right of the axes, where it covers no point."""
    rows = [(f"e{i}", f"s{i:02d}", "throughput", 10.0 + i, 10.0 + i) for i in range(12)]
    table = pd.DataFrame(rows, columns=["experiment", "strategy", "metric", "predicted", "measured"])
    ax = plots.predicted_vs_measured(table)
    looks = set()
    for c in ax.collections:
        if isinstance(c, PathCollection):
            looks.add((tuple(np.round(c.get_facecolor()[0], 6)), c.get_paths()[0].vertices.tobytes()))
    assert len(looks) == 12
    ax.figure.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    assert legend.x0 >= ax.get_window_extent().x1


def test_error_by_strategy_median_bars_and_extremes():
    ax = plots.error_by_strategy(VALIDATION, metric="throughput")
    heights = [p.get_height() for p in ax.patches if isinstance(p, Rectangle) and abs(p.get_width() - 0.6) < 1e-9]
    # allreduce |errors| 10 %, 5 %, 0 % -> median 5; ps 37.5 %, 10 % -> median 23.75
    assert np.allclose(heights, [5.0, 23.75])
    dots = np.concatenate([c.get_offsets()[:, 1] for c in ax.collections if isinstance(c, PathCollection)])
    assert np.allclose(sorted(dots), [0.0, 5.0, 10.0, 10.0, 37.5])
    errorbars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    whiskers = [c.lines[2][0].get_segments()[0] for c in errorbars]
    assert np.allclose([[w[0][1], w[1][1]] for w in whiskers], [[0.0, 10.0], [10.0, 37.5]])  # min to max
    assert [t.get_text() for t in ax.get_xticklabels()] == ["allreduce", "ps"]
    all_metrics = plots.error_by_strategy(VALIDATION)
    assert len([p for p in all_metrics.patches if isinstance(p, Rectangle) and abs(p.get_width() - 0.6) < 1e-9]) == 2


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("call, match", [
    (lambda: plots.throughput_vs_workers(SWEEP.drop(columns="throughput")), "no column 'throughput'"),
    (lambda: plots.throughput_vs_workers(SWEEP, by="network"), "no column 'network'"),
    (lambda: plots.throughput_vs_workers(SWEEP, by=None), "several rows with workers=1"),
    (lambda: plots.throughput_vs_workers(SWEEP, ideal="allgather"), "ideal='allgather' is not a group"),
    (lambda: plots.throughput_vs_workers(SWEEP, scale="loglog"), "scale must be"),
    (lambda: plots.throughput_vs_workers(SWEEP.to_dict()), "must be a pandas DataFrame"),
    (lambda: plots.scaling_efficiency(SWEEP.iloc[:0]), "has no rows"),
    (lambda: plots.staleness(run_with_updates([1]), kind="pdf"), "kind must be 'hist' or 'cdf'"),
    (lambda: plots.staleness(run_with_updates([], name="ring")), "run 'ring' applied no gradients"),
    (lambda: plots.staleness([run_with_updates([1])], labels=["a", "b"]), "labels has 2 entries for 1 runs"),
    (lambda: plots.staleness([]), "results is empty"),
    (lambda: plots.timeline(tiny_result(), iteration=7), "iteration 7 is not in the run"),
    (lambda: plots.timeline(tiny_result(), ranks=[0, 5]), r"ranks \[5\] have no spans"),
    (lambda: plots.iteration_breakdown(tiny_result(), warmup=2), "no iterations left after warmup=2"),
    (lambda: plots.breakdown(tiny_result(), orientation="diagonal"), "orientation must be"),
    (lambda: plots.breakdown(run_with_updates([1])), "result.timeline has no column 'rank'"),
    (lambda: plots.predicted_vs_measured(VALIDATION.drop(columns="measured")), "no column 'measured'"),
    (lambda: plots.predicted_vs_measured(VALIDATION, metric="mfu"), "no rows with metric 'mfu'"),
    (lambda: plots.predicted_vs_measured(VALIDATION.assign(predicted=0.0)), "need positive"),
    (lambda: plots.error_by_strategy(VALIDATION.drop(columns="rel_error")), "no column 'rel_error'"),
    (lambda: plots.error_by_strategy(VALIDATION.drop(columns="metric"), metric="throughput"),
     "no column 'metric'"),
])
def test_bad_input_is_refused_by_name(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# -- real simulated runs ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def simulated():
    cluster = Cluster.homogeneous(nodes=4, gpus_per_node=1, inter="25GbE")
    strategies = {
        "ring all-reduce": AllReduceSGD(algorithm="ring"),
        "PS async": ParameterServer(mode="async", servers=2),
        "1F1B": PipelineParallel(pp=4, micro_batches=4),
    }
    return {name: simulate(Experiment(workload=small_workload(), cluster=cluster, strategy=s, batch_size=8,
                                      iterations=4, name=name))
            for name, s in strategies.items()}


def test_every_plot_draws_real_runs(simulated):
    runs = list(simulated.values())
    rows = []
    for n in (1, 2, 4):
        cluster = Cluster.homogeneous(nodes=n, gpus_per_node=1, inter="25GbE")
        for name, strategy in (("ring", AllReduceSGD()), ("ps", ParameterServer(mode="async", servers=1))):
            s = simulate(Experiment(workload=small_workload(), cluster=cluster, strategy=strategy, batch_size=8,
                                    iterations=3)).summary()
            rows.append({"strategy": name, "workers": n, "throughput": s["throughput"]})
    sweep = pd.DataFrame(rows)
    drawn = [
        plots.throughput_vs_workers(sweep, ideal=True),
        plots.scaling_efficiency(sweep),
        plots.staleness(simulated["PS async"]),
        plots.staleness(simulated["PS async"], kind="cdf"),
        plots.breakdown(runs),
        *[plots.timeline(r) for r in runs],
    ]
    for ax in drawn:
        assert ax.get_lines() or ax.patches or ax.collections
    for name, r in simulated.items():
        tl = r.timeline
        middle = tl[(tl["rank"] >= 0) & (tl["iteration"] == 2)]  # iterations 0..3: the middle one is 2
        bars_drawn = len(plots.timeline(r, links=False).patches)
        if name == "PS async":  # plus the servers' spans in the window
            assert bars_drawn > len(middle) > 0
        else:
            assert bars_drawn == len(middle) > 0
        table = plots.iteration_breakdown(r)
        parts = table[["compute", "exposed_comm", "idle"]].sum(axis=1)
        assert np.allclose(parts, r.iterations.set_index(["rank", "iteration"]).loc[
            list(zip(table["rank"], table["iteration"])), "duration"].to_numpy())
        assert (table[["compute", "exposed_comm"]] >= 0).all().all()
    validation = pd.DataFrame([
        {"experiment": name, "strategy": name, "metric": "throughput", "predicted": r.summary()["throughput"],
         "measured": 0.9 * r.summary()["throughput"]} for name, r in simulated.items()])
    validation["rel_error"] = (validation["predicted"] - validation["measured"]) / validation["measured"]
    for ax in (plots.predicted_vs_measured(validation), plots.error_by_strategy(validation)):
        assert ax.collections


def test_ring_breakdown_compute_equals_its_compute_spans(simulated):
    r = simulated["ring all-reduce"]
    table = plots.iteration_breakdown(r)
    tl = r.timeline[r.timeline["stream"] == "compute"]
    for row in table.itertuples():
        own = tl[(tl["rank"] == row.rank) & (tl["iteration"] == row.iteration)]
        assert row.compute == pytest.approx((own["end"] - own["start"]).sum(), rel=1e-9)


def test_importing_simulator_does_not_load_matplotlib():
    code = "import sys, simulator; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
