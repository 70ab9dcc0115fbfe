"""DDP-style buckets, checked against torch's own bucket assignment."""

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.bucketing import MIB, assign_buckets


def torch_buckets(layer_params, cap_bytes, first_bytes):
    """DDP's steady-state buckets: gradient-ready (reverse) order, caps [first, cap, cap, ...]."""
    order = [i for i in reversed(range(len(layer_params))) if layer_params[i] > 0]
    tensors = [torch.empty(layer_params[i], device="meta") for i in order]
    groups, _ = dist._compute_bucket_assignment_by_size(tensors, [first_bytes, cap_bytes])
    return [sorted(order[j] for j in g) for g in groups]


@given(
    params=st.lists(st.integers(0, 3_000_000), min_size=1, max_size=40),
    cap_mb=st.sampled_from([1, 4, 25]),
)
@settings(max_examples=80, deadline=None)
def test_matches_ddp_assignment(params, cap_mb):
    if sum(params) == 0:
        assert assign_buckets(params, bytes_per_param=4, bucket_bytes=cap_mb * MIB) == ()
        return
    ours = assign_buckets(params, bytes_per_param=4, bucket_bytes=cap_mb * MIB, first_bucket_bytes=MIB)
    mine = [[i for i in range(*b.layers) if params[i] > 0] for b in ours]
    assert mine == torch_buckets(params, cap_mb * MIB, MIB)


@given(params=st.lists(st.integers(0, 10_000), min_size=1, max_size=30))
@settings(max_examples=60, deadline=None)
def test_ranges_tile_all_layers_and_bytes_add_up(params):
    buckets = assign_buckets(params, bytes_per_param=2, bucket_bytes=5_000, first_bucket_bytes=1_000)
    if sum(params) == 0:
        assert buckets == ()
        return
    covered = sorted(i for b in buckets for i in range(*b.layers))
    assert covered == list(range(len(params)))
    # backward order: each bucket's range lies below the previous one's
    assert all(a.layers[0] == b.layers[1] for a, b in zip(buckets, buckets[1:]))
    assert sum(b.nbytes for b in buckets) == 2 * sum(params)


def test_rejects_bad_caps():
    with pytest.raises(ValueError, match="bucket_bytes"):
        assign_buckets([1, 2], bytes_per_param=4, bucket_bytes=0)
