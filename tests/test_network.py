"""Flow-level network: exact timed traces against closed forms."""

import math

import pytest
import simpy
from hypothesis import given, settings
from hypothesis import strategies as st

from simulator.network import Network


def run_flows(capacities, flows, windows=None, bursts=None, peaks=None):
    """flows: (start, path, nbytes, latency, label). Returns {label: finish time}."""
    env = simpy.Environment()
    net = Network(env, capacities, windows=windows, bursts=bursts, peaks=peaks)
    log = {}

    def starter(start, path, nbytes, latency, label):
        yield env.timeout(start)
        yield net.transfer(path, nbytes, latency)
        log[label] = env.now

    for f in flows:
        env.process(starter(*f))
    env.run()
    return log, net


def close(a, b, rel=1e-9):
    return math.isclose(a, b, rel_tol=rel, abs_tol=0)


def test_single_flow_is_latency_plus_size_over_bandwidth():
    n, B, a = 123_456_789.0, 12.5e9, 7e-6
    log, _ = run_flows([B], [(0, (0,), n, a, "f")])
    assert close(log["f"], a + n / B)


@given(
    n=st.floats(1, 1e11),
    B=st.floats(1e6, 1e12),
    a=st.floats(0, 1e-3),
)
@settings(max_examples=60, deadline=None)
def test_single_flow_property(n, B, a):
    log, _ = run_flows([B], [(0, (0,), n, a, "f")])
    assert close(log["f"], a + n / B)


def test_two_flows_share_a_link_equally():
    n, B = 1e9, 1e9
    log, _ = run_flows([B], [(0, (0,), n, 0.0, "x"), (0, (0,), n, 0.0, "y")])
    # each gets B/2, both end at 2n/B
    assert close(log["x"], 2 * n / B) and close(log["y"], 2 * n / B)


def test_unequal_flows_on_one_link_trace():
    B = 100.0
    log, _ = run_flows([B], [(0, (0,), 100.0, 0.0, "small"), (0, (0,), 300.0, 0.0, "big")])
    # both at 50 B/s until small ends at 2 s (big has 200 left), then big alone at 100 B/s: +2 s
    assert close(log["small"], 2.0)
    assert close(log["big"], 4.0)


def test_late_arrival_reshares():
    B = 10.0
    log, _ = run_flows([B], [(0, (0,), 100.0, 0.0, "first"), (5, (0,), 20.0, 0.0, "second")])
    # first alone 5 s (50 bytes), then both at 5 B/s: second needs 4 s -> 9; first has 30 left at 9 -> +3
    assert close(log["second"], 9.0)
    assert close(log["first"], 12.0)


def test_bottleneck_of_a_two_link_path():
    log, _ = run_flows([40.0, 10.0], [(0, (0, 1), 100.0, 0.5, "f")])
    assert close(log["f"], 0.5 + 100.0 / 10.0)


def test_max_min_fairness_three_flows():
    # link0 cap 1 shared by A and B; link1 cap 2 shared by A and C.
    # Max-min: link0 is the bottleneck at 0.5 each; C takes 2 - 0.5 = 1.5.
    log, _ = run_flows(
        [1.0, 2.0],
        [(0, (0, 1), 1.0, 0.0, "A"), (0, (0,), 1.0, 0.0, "B"), (0, (1,), 3.0, 0.0, "C")],
    )
    assert close(log["A"], 2.0) and close(log["B"], 2.0)
    assert close(log["C"], 2.0)  # 3 bytes at 1.5 B/s


def test_latency_paid_once_per_flow_and_after_drain():
    # Two flows on one link with different latencies: bandwidth is shared while both drain.
    log, _ = run_flows([1.0], [(0, (0,), 1.0, 5.0, "slow"), (0, (0,), 1.0, 0.0, "fast")])
    assert close(log["fast"], 2.0)
    assert close(log["slow"], 7.0)


def test_zero_byte_flow_takes_latency_only():
    log, _ = run_flows([1.0], [(0, (0,), 0.0, 3e-6, "z")])
    assert close(log["z"], 3e-6)


def test_counters_bytes_and_busy_time():
    log, net = run_flows([10.0, 5.0], [(0, (0, 1), 50.0, 0.0, "a"), (20, (0,), 10.0, 0.0, "b")])
    assert net.bytes == [60.0, 50.0]
    assert close(net.busy_time[1], 10.0)
    assert close(net.busy_time[0], 10.0 + 1.0)
    assert sorted(net.busy_intervals) == sorted([(0, 0.0, 10.0), (1, 0.0, 10.0), (0, 20.0, 21.0)])


@given(sizes=st.lists(st.floats(1.0, 1e6), min_size=1, max_size=12), B=st.floats(1.0, 1e9))
@settings(max_examples=50, deadline=None)
def test_work_conserving_single_link(sizes, B):
    """Flows starting together on one link: the k-th smallest ends at sum_{i<k} s_i + (n-k+1) s_k over B."""
    flows = [(0, (0,), s, 0.0, i) for i, s in enumerate(sizes)]
    log, _ = run_flows([B], flows)
    ordered = sorted(sizes)
    n = len(ordered)
    for k, s in enumerate(ordered):
        expected = (sum(ordered[:k]) + (n - k) * s) / B
        finished = sorted(log.values())[k]
        assert math.isclose(finished, expected, rel_tol=1e-9)


def test_rejects_bad_capacity_and_size():
    env = simpy.Environment()
    with pytest.raises(ValueError, match="capacity"):
        Network(env, [1.0, -2.0])
    net = Network(env, [1.0])
    with pytest.raises(ValueError, match="nbytes"):
        net.transfer((0,), -1.0)


# Flow windows: a link that queues first-in-first-out, each flow keeping up to W bytes queued.


def test_a_late_flow_waits_behind_the_window_then_shares():
    B, W = 10.0, 20.0
    log = run_flows([B], [(0, (0,), 100.0, 0.0, "first"), (5, (0,), 20.0, 0.0, "second")], [W])[0]
    # At 5 s first has 50 left, min(W, 50) = 20 queued: second waits 2 s, enters at 7 (first
    # has 30 left), both at 5 B/s: second's 20 bytes take 4 s -> 11; first's last 10 alone -> 12.
    assert close(log["second"], 11.0)
    assert close(log["first"], 12.0)


def test_flows_started_together_queue_in_program_order():
    B, W, S = 10.0, 20.0, 100.0
    log = run_flows([B], [(0, (0,), S, 0.0, "a"), (0, (0,), S, 0.0, "b")], [W])[0]
    # b waits W/B behind a's window; a sends W alone, then they share: a ends at (2S - W)/B, b at 2S/B.
    assert close(log["a"], (2 * S - W) / B)
    assert close(log["b"], 2 * S / B)


def test_an_empty_message_waits_for_the_queue_ahead_of_it():
    B, W, a = 10.0, 30.0, 0.5
    log = run_flows([B], [(0, (0,), 100.0, 0.0, "bulk"), (2, (0,), 0.0, a, "early"),
                       (9, (0,), 0.0, a, "late")], [W])[0]
    assert close(log["early"], 2 + W / B + a)  # 80 bytes left: the window's 30 are ahead
    assert close(log["late"], 9 + 10 / B + a)  # 10 bytes left: all of them are ahead
    assert close(log["bulk"], 10.0)


def test_a_waiting_flow_is_queued_ahead_of_later_ones():
    B, W = 10.0, 20.0
    log = run_flows([B], [(0, (0,), 100.0, 0.0, "a"), (1, (0,), 50.0, 0.0, "b"),
                       (2, (0,), 0.0, 0.0, "token")], [W])[0]
    # b waits 2 s (from 1 to 3); at 2 s the token is behind a's 20 and waiting b's 20: 4 s.
    assert close(log["token"], 6.0)


def test_the_longest_queue_on_the_path_counts():
    log = run_flows([10.0, 10.0], [(0, (0,), 100.0, 0.0, "x"), (0, (1,), 100.0, 0.0, "y"),
                           (1, (0, 1), 0.0, 0.0, "token")], [20.0, 40.0])[0]
    assert close(log["token"], 1 + 40.0 / 10.0)


def test_without_windows_nothing_waits():
    log = run_flows([10.0], [(0, (0,), 100.0, 0.0, "a"), (0, (0,), 100.0, 0.0, "b"),
                       (3, (0,), 0.0, 0.0, "token")], [0.0])[0]
    assert close(log["a"], 20.0) and close(log["b"], 20.0) and close(log["token"], 3.0)


def test_rejects_bad_windows():
    env = simpy.Environment()
    with pytest.raises(ValueError, match="window"):
        Network(env, [1.0, 2.0], windows=[0.0])
    with pytest.raises(ValueError, match="flow window"):
        Network(env, [1.0], windows=[-1.0])


# Token buckets: closed forms of a fluid bucket of B bytes refilled at R, link at P while it
# holds tokens. A lone flow of n bytes on an idle link: n / P while n <= B P / (P - R),
# else (n - B) / R.
R, P, BUCKET = 50e6, 1e9, 200e3


@pytest.mark.parametrize("n", [64e3, 0.5 * BUCKET * P / (P - R), BUCKET * P / (P - R), 1e6, 4e6])
def test_a_lone_flow_on_a_full_bucket(n):
    log, _ = run_flows([R], [(0, (0,), n, 0.0, "f")], bursts=[BUCKET], peaks=[P])
    expect = n / P if n <= BUCKET * P / (P - R) else (n - BUCKET) / R
    assert close(log["f"], expect)


def test_the_bucket_refills_at_the_rate_while_idle():
    # 1 MB empties the bucket (done at (1e6 - B) / R); an idle gap g refills R g bytes; the
    # next 100 kB message spends them at P, then the rest at R.
    g = 1e-3
    first = (1e6 - BUCKET) / R
    tokens = R * g  # 50 kB, less than the bucket
    burst_bytes = tokens * P / (P - R)  # sent at P before the bucket is dry
    second = burst_bytes / P + (100e3 - burst_bytes) / R
    log, _ = run_flows([R], [(0, (0,), 1e6, 0.0, "a"), (first + g, (0,), 100e3, 0.0, "b")],
                       bursts=[BUCKET], peaks=[P])
    assert close(log["a"], first)
    assert close(log["b"], first + g + second)


def test_a_path_runs_at_its_slowest_link_and_spends_only_what_crosses():
    # Link 0 has no bucket (R), link 1 a bucket: the flow crosses at R, so link 1's bucket
    # never drains; a second flow on link 1 alone later still finds it full.
    log, _ = run_flows([R, R], [(0, (0, 1), 1e6, 0.0, "a"), (0.001, (1,), 100e3, 0.0, "b")],
                       bursts=[0.0, BUCKET], peaks=[0.0, P])
    # b shares link 1 at P with a (held to R by link 0): b gets P - R.
    assert close(log["b"], 0.001 + 100e3 / (P - R))
    assert close(log["a"], 1e6 / R)


def test_two_flows_share_the_peak_then_the_rate():
    # Two equal flows start together: they share P until the bucket is dry at B / (P - R),
    # then R; each carries half.
    n = 1e6
    t_dry = BUCKET / (P - R)
    sent = P * t_dry
    log, _ = run_flows([R], [(0, (0,), n, 0.0, "a"), (0, (0,), n, 0.0, "b")], bursts=[BUCKET], peaks=[P])
    expect = t_dry + (2 * n - sent) / R
    assert close(log["a"], expect) and close(log["b"], expect)


def test_rejects_bad_buckets():
    env = simpy.Environment()
    with pytest.raises(ValueError, match="one value per link"):
        Network(env, [1.0, 2.0], bursts=[0.0], peaks=[0.0, 0.0])
    with pytest.raises(ValueError, match="burst must be >= 0"):
        Network(env, [1.0], bursts=[-1.0], peaks=[2.0])
    with pytest.raises(ValueError, match="peak must exceed"):
        Network(env, [1.0], bursts=[10.0], peaks=[1.0])


def test_a_flow_alone_on_its_links_starts_at_once_and_shares_when_another_joins():
    # A: 100 B over links of 100 and 50 B/s, latency 0.5, alone: 50 B/s from t = 0, without a
    # recomputation. B: 25 B on the 50 B/s link from t = 1: both get 25 B/s there until B
    # is done at t = 2; A then has 100 - 50 - 25 = 25 B left at 50 B/s: drained at 2.5, done at 3.
    log, net = run_flows([100.0, 50.0], [(0, (0, 1), 100.0, 0.5, "A"), (1, (1,), 25.0, 0.0, "B")])
    assert close(log["B"], 2.0)
    assert close(log["A"], 3.0)
    assert net.fast_starts == 1  # B joined a busy link: it went through the recomputation


def test_two_flows_starting_together_on_one_link_share_it_from_the_start():
    log, net = run_flows([10.0], [(0, (0,), 10.0, 0.0, "A"), (0, (0,), 10.0, 0.0, "B")])
    assert close(log["A"], 2.0) and close(log["B"], 2.0)
    assert net.fast_starts == 1
