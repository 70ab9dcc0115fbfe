"""Megatron tensor parallelism on a real module: one rank's share of each split layer.

:func:`shard_module` cuts a model, in place, the way
:mod:`strategies.tensor_parallel` says each layer splits across the ``t``
ranks of a tensor-parallel group (Shoeybi et al., "Megatron-LM", 2019):

* ``column`` (and ``head``) ``Linear``: rank ``r`` keeps output rows
  ``r`` of ``t`` of the weight and bias. A fused projection (a parent module's
  ``tp_fused = {"qkv": 3}``: q, k and v stacked) keeps the same rows of each
  block, so a rank holds whole heads.
* ``row`` ``Linear``: input columns ``r`` of ``t``. The bias is added once over
  the group: each rank adds ``bias / t`` in forward, so the all-reduce that
  follows sums it whole, and its gradient is the whole output gradient on every
  rank (Megatron adds it after the all-reduce; the values are the same).
* ``vocab`` ``Embedding``: rows (tokens) ``r`` of ``t``; a token outside the
  slice looks up zeros, and the all-reduce after it sums the one rank that has it.
* ``inner`` modules with heads (``n_head`` or ``num_heads``) keep ``1/t`` of them.

Everything else is replicated: each rank keeps it whole. Tied weights (an
output head sharing the word embedding's) stay tied, to the slice.

The collectives are not here: they are the strategy's ops, which the executor
performs at the layers they name (:mod:`realrun.executor`). Only the loss of a
vocabulary-split head needs the group's help inside the loss itself:
:func:`vocab_parallel_cross_entropy` (Megatron's) takes a maximum and two sums
over the group, of one number per token each.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from simulator.workload import ROOT_LAYER
from strategies.tensor_parallel import SPLIT_ROLES


def _rows(n: int, t: int, r: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of ``n`` that rank ``r`` of ``t`` keeps (``tensor_split``'s cut)."""
    base, extra = divmod(n, t)
    lo = r * base + min(r, extra)
    return lo, lo + base + (1 if r < extra else 0)


class RowParallelLinear(nn.Linear):
    """A row-parallel slice of a ``Linear``: ``x_r @ W_r^T + bias / t`` (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, t: int):
        super().__init__(in_features, out_features, bias=bias, device="meta")
        self.t = t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        if self.bias is None:
            return out
        b = self.bias
        return out + (b.detach() / self.t + (b - b.detach()))  # value bias / t, gradient whole


class VocabParallelEmbedding(nn.Embedding):
    """Tokens ``[lo, hi)`` of an ``Embedding``; others look up zeros."""

    def __init__(self, num_embeddings: int, embedding_dim: int, lo: int, hi: int, padding_idx=None):
        local = padding_idx - lo if padding_idx is not None and lo <= padding_idx < hi else None
        super().__init__(hi - lo, embedding_dim, padding_idx=local, device="meta")
        self.lo, self.hi, self.vocab = lo, hi, num_embeddings

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        outside = (idx < self.lo) | (idx >= self.hi)
        local = (idx - self.lo).masked_fill(outside, 0)
        out = F.embedding(local, self.weight, self.padding_idx)
        return out.masked_fill(outside.unsqueeze(-1), 0.0)


def _set(module: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, leaf, new)


def shard_module(module: nn.Module, names, roles, t: int, r: int, *, sequence_parallel: bool = False) -> list[int]:
    """Cut ``module`` in place to rank ``r``'s share of a ``t``-way tensor-parallel group.

    ``names`` and ``roles`` are the workload's layers and their tensor-parallel roles.
    Returns the parameter elements each layer owns afterwards (the first layer that uses a
    tied weight owns it). With ``sequence_parallel`` every submodule with a
    ``sequence_shard`` attribute (the zoo's token embedding, which adds position
    embeddings) is told it sees slice ``r`` of ``t`` of the sequence."""
    if not 0 <= r < t:
        raise ValueError(f"tensor-parallel rank must be in [0, {t}), got {r}")
    if sequence_parallel:
        for sub in module.modules():
            if hasattr(sub, "sequence_shard"):
                sub.sequence_shard = (r, t)
    new_of: dict[int, nn.Parameter] = {}  # id of an original parameter -> its slice
    originals: list[nn.Parameter] = []  # kept alive, so their ids stay theirs

    def sliced(p: nn.Parameter | None, dim: int, lo: int, hi: int, blocks: int = 1) -> nn.Parameter | None:
        if p is None:
            return None
        hit = new_of.get(id(p))
        if hit is not None:
            return hit
        with torch.no_grad():
            if blocks == 1:
                part = p.narrow(dim, lo, hi - lo)
            else:
                part = torch.cat([b.narrow(dim, lo, hi - lo) for b in p.chunk(blocks, dim)], dim)
        new = nn.Parameter(part.clone(), requires_grad=p.requires_grad)
        new_of[id(p)] = new
        originals.append(p)
        return new

    for name, role in zip(names, roles, strict=True):
        if role not in SPLIT_ROLES:
            continue
        mod = module.get_submodule(name)
        if role in ("column", "head"):
            if not isinstance(mod, nn.Linear):
                raise ValueError(f"realrun splits {role}-parallel layers that are nn.Linear; {name!r} is "
                                 f"{type(mod).__name__}")
            parent = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
            blocks = getattr(parent, "tp_fused", {}).get(name.rpartition(".")[2], 1)
            if mod.out_features % blocks or (role == "column" and (mod.out_features // blocks) % t):
                raise ValueError(f"layer {name!r}: {mod.out_features // blocks} output features per block "
                                 f"do not split {t} ways")
            lo, hi = _rows(mod.out_features // blocks, t, r)
            weight = sliced(mod.weight, 0, lo, hi, blocks)
            bias = sliced(mod.bias, 0, lo, hi, blocks)
            new = nn.Linear(mod.in_features, weight.shape[0], bias=bias is not None, device="meta")
            new.weight, new.bias = weight, bias
            if role == "head":
                new.vocab_slice = (lo, hi, mod.out_features)
        elif role == "row":
            if not isinstance(mod, nn.Linear):
                raise ValueError(f"realrun splits row-parallel layers that are nn.Linear; {name!r} is "
                                 f"{type(mod).__name__}")
            if mod.in_features % t:
                raise ValueError(f"layer {name!r}: {mod.in_features} input features do not split {t} ways")
            lo, hi = _rows(mod.in_features, t, r)
            new = RowParallelLinear(hi - lo, mod.out_features, mod.bias is not None, t)
            new.weight = sliced(mod.weight, 1, lo, hi)
            if mod.bias is not None:
                new.bias = mod.bias
        elif role == "vocab":
            if not isinstance(mod, nn.Embedding):
                raise ValueError(f"realrun splits vocab-parallel layers that are nn.Embedding; {name!r} is "
                                 f"{type(mod).__name__}")
            lo, hi = _rows(mod.num_embeddings, t, r)
            new = VocabParallelEmbedding(mod.num_embeddings, mod.embedding_dim, lo, hi, mod.padding_idx)
            new.weight = sliced(mod.weight, 0, lo, hi)
        else:  # inner: fewer heads, same code
            for attr in ("n_head", "num_heads"):
                heads = getattr(mod, attr, None)
                if isinstance(heads, int):
                    if heads % t:
                        raise ValueError(f"layer {name!r} has {heads} heads, which do not split {t} ways")
                    setattr(mod, attr, heads // t)
            continue
        new.train(mod.training)
        _set(module, name, new)
    # every other parameter that was tied to a split one follows it
    for sub in module.modules():
        for pname, p in list(sub.named_parameters(recurse=False)):
            if id(p) in new_of and new_of[id(p)] is not p:
                setattr(sub, pname, new_of[id(p)])
    counted: set[int] = set()
    owned = []
    for name in names:
        sub = module.get_submodule(name if name != ROOT_LAYER else "")
        own = [p for p in sub.parameters(recurse=False) if id(p) not in counted]
        counted.update(id(p) for p in own)
        owned.append(sum(p.numel() for p in own))
    return owned


def head_slice(module: nn.Module) -> tuple[int, int, int] | None:
    """``(lo, hi, vocabulary)``: the vocabulary rows the split output head in ``module`` keeps, if any."""
    for sub in module.modules():
        if hasattr(sub, "vocab_slice"):
            return sub.vocab_slice
    return None


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, lo, hi, group_max, group_sum):
        z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        ctx.dtype = logits.dtype
        z = z - group_max(z.max(dim=-1).values).unsqueeze(-1)
        e = z.exp()
        total = group_sum(e.sum(dim=-1))
        inside = (target >= lo) & (target < hi)
        idx = (target - lo).masked_fill(~inside, 0)
        picked = group_sum(z.gather(-1, idx.unsqueeze(-1)).squeeze(-1) * inside)
        ctx.save_for_backward(e / total.unsqueeze(-1), idx, inside)
        return (total.log() - picked).mean()

    @staticmethod
    def backward(ctx, grad):
        softmax, idx, inside = ctx.saved_tensors
        g = softmax.clone()
        g.scatter_add_(-1, idx.unsqueeze(-1), -inside.to(g.dtype).unsqueeze(-1))
        return (g * (grad / idx.numel())).to(ctx.dtype), None, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, lo: int, hi: int,
                                 group_max: Callable, group_sum: Callable) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` that hold vocabulary ``[lo, hi)`` of the group's whole,
    for ``target`` ids in the whole vocabulary. ``group_max`` and ``group_sum`` reduce a
    tensor elementwise over the group (Megatron's ``vocab_parallel_cross_entropy``)."""
    flat = logits.reshape(-1, logits.shape[-1])
    return _VocabParallelCrossEntropy.apply(flat, target.reshape(-1), lo, hi, group_max, group_sum)
