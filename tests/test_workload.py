"""Workload and Layer: validation, JSON, and FLOP extraction against closed forms.

Expected values come from formulas (FLOPs = 2 x MACs, as torch's flop counter
counts them), never from a previous run.
"""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from simulator.workload import ROOT_LAYER, Layer, Workload


def make_layer(**kw):
    base = dict(name="fc", kind="Linear", params=10, fwd_flops=20.0, bwd_flops=40.0,
                input_elems=4.0, output_elems=2.0)
    return Layer(**{**base, **kw})


# -- validation ----------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("params", -3), ("fwd_flops", -1.0), ("bwd_flops", -0.5), ("input_elems", -1),
    ("output_elems", -2), ("kernels", -1), ("fwd_time", -1e-3), ("bwd_time", -1.0),
    ("fwd_flops", math.nan), ("fwd_flops", math.inf), ("params", 2.5), ("params", True),
    ("fwd_flops", "1e9"),
])
def test_layer_rejects_bad_numbers_naming_field_and_value(field, value):
    with pytest.raises(ValueError, match=rf"Layer\.{field} must be .*>= 0, got {value!r}"):
        make_layer(**{field: value})


@pytest.mark.parametrize("field", ["name", "kind"])
def test_layer_rejects_empty_strings(field):
    with pytest.raises(ValueError, match=rf"Layer\.{field} must be a non-empty string"):
        make_layer(**{field: ""})


def test_layer_is_frozen_and_coerces_numbers():
    layer = make_layer(params=7, fwd_flops=3)
    assert isinstance(layer.fwd_flops, float) and layer.params == 7
    assert layer.kernels == 1 and layer.fwd_time is None and layer.bwd_time is None
    with pytest.raises(AttributeError):
        layer.params = 1


def test_workload_validation():
    with pytest.raises(ValueError, match=r"Workload\.name must be a non-empty string"):
        Workload(name="", layers=(make_layer(),))
    with pytest.raises(ValueError, match=r"Workload\.layers must contain at least one"):
        Workload(name="w", layers=())
    with pytest.raises(ValueError, match=r"unique, got 'fc' twice"):
        Workload(name="w", layers=(make_layer(), make_layer()))
    with pytest.raises(ValueError, match=r"Workload\.layers must contain only Layer"):
        Workload(name="w", layers=({"name": "fc"},))
    with pytest.raises(ValueError, match=r"Workload\.sample_shape"):
        Workload(name="w", layers=(make_layer(),), sample_shape=(3, -1))


def test_workload_totals_are_layer_sums():
    w = Workload(name="w", layers=[make_layer(name="a"), make_layer(name="b", params=5)],
                 sample_shape=[3])
    assert isinstance(w.layers, tuple) and w.sample_shape == (3,)
    assert (w.params, w.fwd_flops, w.bwd_flops) == (15, 40.0, 80.0)


# -- JSON ------------------------------------------------------------------------------

layers_strategy = st.lists(
    st.builds(Layer, name=st.text(min_size=1, max_size=8), kind=st.sampled_from(["Linear", "Conv2d"]),
              params=st.integers(0, 10**12), fwd_flops=st.floats(0, 1e18), bwd_flops=st.floats(0, 1e18),
              input_elems=st.floats(0, 1e12), output_elems=st.floats(0, 1e12),
              kernels=st.integers(0, 100), fwd_time=st.none() | st.floats(0, 10),
              bwd_time=st.none() | st.floats(0, 10)),
    min_size=1, max_size=5, unique_by=lambda layer: layer.name)


@settings(max_examples=40, deadline=None)
@given(layers=layers_strategy, shape=st.lists(st.integers(0, 4096), max_size=3))
def test_json_round_trip_gives_equal_workload(layers, shape):
    w = Workload(name="w", layers=tuple(layers), sample_shape=tuple(shape))
    assert Workload.from_dict(json.loads(json.dumps(w.to_dict()))) == w
    assert Workload.from_json(w.to_json()) == w


def test_json_file_round_trip_and_errors(tmp_path):
    w = Workload(name="w", layers=(make_layer(fwd_time=0.5, bwd_time=1.0),), sample_shape=(3, 8))
    path = tmp_path / "w.json"
    text = w.to_json(path)
    assert path.read_text() == text
    assert Workload.from_json(path) == w and Workload.from_json(str(path)) == w
    with pytest.raises(ValueError, match="neither JSON text nor an existing file"):
        Workload.from_json(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="invalid JSON"):
        Workload.from_json("{not json")
    bad = w.to_dict()
    bad["layers"][0]["flops"] = 1
    with pytest.raises(ValueError, match=r"unknown keys \['flops'\]"):
        Workload.from_dict(bad)
    with pytest.raises(ValueError, match=r"Layer\.params must be an integer >= 0, got -1"):
        Workload.from_dict({**w.to_dict(), "layers": [{**w.to_dict()["layers"][0], "params": -1}]})


# -- extraction: closed forms ----------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(widths=st.lists(st.integers(1, 64), min_size=2, max_size=5), batch=st.integers(1, 5))
def test_mlp_params_and_flops_match_closed_form(widths, batch):
    mods = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        mods += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
    w = Workload.from_module(nn.Sequential(*mods), torch.randn(batch, widths[0]))
    pairs = list(zip(widths[:-1], widths[1:], strict=True))
    assert w.params == sum(a * b + b for a, b in pairs)
    assert w.fwd_flops == sum(2 * a * b for a, b in pairs)
    # The first layer's input needs no gradient: weight-grad only (1x forward).
    assert w.bwd_flops == 2 * pairs[0][0] * pairs[0][1] + sum(4 * a * b for a, b in pairs[1:])
    assert [layer.kind for layer in w.layers] == [type(m).__name__ for m in mods]
    assert w.sample_shape == (widths[0],)


def test_linear_forward_and_backward_flops():
    inp, out = 96, 40
    model = nn.Sequential(nn.Linear(inp, inp), nn.Linear(inp, out))
    w = Workload.from_module(model, torch.randn(8, inp))
    second = w.layers[1]
    assert second.fwd_flops == 2 * inp * out
    assert second.bwd_flops == 2 * second.fwd_flops  # input-grad + weight-grad
    assert (second.input_elems, second.output_elems) == (inp, out)
    assert second.params == inp * out + out and second.kernels == 1


def test_input_requiring_grad_doubles_first_layer_backward():
    x = torch.randn(4, 16, requires_grad=True)
    w = Workload.from_module(nn.Linear(16, 8), x)
    assert w.layers[0].bwd_flops == 2 * w.layers[0].fwd_flops == 4 * 16 * 8


@pytest.mark.parametrize("cin,cout,k,stride,pad,size", [(3, 64, 7, 2, 3, 224), (64, 64, 3, 1, 1, 56),
                                                        (16, 32, 1, 2, 0, 15)])
def test_conv_flops_closed_form(cin, cout, k, stride, pad, size):
    hout = (size + 2 * pad - k) // stride + 1
    w = Workload.from_module(nn.Conv2d(cin, cout, k, stride, pad), torch.randn(2, cin, size, size))
    (conv,) = w.layers
    assert conv.fwd_flops == 2 * cin * cout * k * k * hout * hout
    assert conv.output_elems == cout * hout * hout and conv.input_elems == cin * size * size
    assert conv.params == cin * cout * k * k + cout


def test_explicit_batch_size_divides_counts():
    x = torch.randn(3, 10)
    whole = Workload.from_module(nn.Linear(10, 10), x, batch_size=1)
    per_sample = Workload.from_module(nn.Linear(10, 10), x)
    assert whole.fwd_flops == 3 * per_sample.fwd_flops == 3 * 2 * 10 * 10


class Attention(nn.Module):
    """Non-leaf module doing functional compute between its children."""

    def __init__(self, d):
        super().__init__()
        self.q, self.out = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        q = self.q(x)
        scores = torch.softmax(q @ x.transpose(1, 2), -1)  # (B, T, T)
        return self.out(scores @ x)


class Net(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.late = nn.Linear(d, d)  # defined first, called second
        self.early = Attention(d)
        self.scale = nn.Parameter(torch.ones(d))
        self.unused = nn.Linear(d, 3)

    def forward(self, x):
        return self.late(self.early(x)) * self.scale


def test_functional_compute_in_non_leaf_and_root_is_kept_in_forward_order():
    batch, seq, d = 2, 5, 16
    w = Workload.from_module(Net(d), torch.randn(batch, seq, d))
    names = [layer.name for layer in w.layers]
    assert names == [ROOT_LAYER, "early", "early.q", "early.out", "late", "unused"]
    by = {layer.name: layer for layer in w.layers}
    assert by["early"].fwd_flops == 2 * (2 * seq * seq * d)  # two (T,T)-sized matmuls
    assert by["early.q"].fwd_flops == 2 * seq * d * d
    assert by[ROOT_LAYER].params == d and by[ROOT_LAYER].kind == "Net"
    assert by["unused"].params == d * 3 + 3 and by["unused"].fwd_flops == 0
    assert w.params == sum(p.numel() for p in Net(d).parameters())


def test_layer_sums_equal_flop_counter_totals():
    model = Net()
    x = torch.randn(3, 7, 16)
    with FlopCounterMode(display=False) as fwd_counter:
        model(x)
    with FlopCounterMode(display=False) as all_counter:
        model(x).sum().backward()
    w = Workload.from_module(model, x)
    assert sum(layer.fwd_flops for layer in w.layers) * 3 == fwd_counter.get_total_flops()
    assert (w.fwd_flops + w.bwd_flops) * 3 == all_counter.get_total_flops()


def test_tied_parameters_counted_once_at_first_use():
    emb, head = nn.Embedding(50, 8), nn.Linear(8, 50, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, head)
    w = Workload.from_module(model, torch.randint(0, 50, (2, 4)))
    assert [layer.params for layer in w.layers] == [50 * 8, 0]
    assert w.layers[1].fwd_flops == 4 * 2 * 8 * 50  # 4 tokens per sample


def test_cpu_module_is_left_untouched():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    Workload.from_module(model, torch.randn(8, 4))
    assert all(p.device.type == "cpu" and p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class NeedsRealDevice(nn.Module):
    """Keeps a plain CPU tensor attribute, so it cannot run on meta."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.mask = torch.ones(6)

    def forward(self, x):
        return self.fc(x) * self.mask


def test_module_that_cannot_run_on_meta_runs_on_its_device():
    w = Workload.from_module(NeedsRealDevice(), torch.randn(2, 6))
    assert w.fwd_flops == 2 * 6 * 6


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="module must be a torch.nn.Module, got int"):
        Workload.from_module(3, torch.randn(2, 2))
    with pytest.raises(ValueError, match="example_input must be a tensor"):
        Workload.from_module(nn.Linear(2, 2), "x")
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        Workload.from_module(nn.Linear(2, 2), torch.randn(2, 2), batch_size=0)
    with pytest.raises(ValueError, match="forward/backward of Linear failed"):
        Workload.from_module(nn.Linear(2, 2), torch.randn(2, 3))
    with pytest.raises(ValueError, match="failed on the meta device"):
        Workload.from_module(nn.Linear(2, 2, device="meta"), torch.randn(2, 3))
