"""Optimizers over flat slices of parameters, so a replica, a server's shard and a
bucket step the same way. The update rules are torch.optim's defaults for each
name the simulator knows (``simulator.compute.OPTIMIZERS``)."""

from __future__ import annotations

import torch

RULES = ("sgd", "momentum", "adam", "adagrad", "rmsprop")


class FlatOptimizer:
    """``step(key, params, grads)`` updates ``params`` in place; state is kept per ``key``."""

    def __init__(self, kind: str, lr: float):
        if kind not in RULES:
            raise ValueError(f"optimizer must be one of {RULES}, got {kind!r}")
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not lr > 0:
            raise ValueError(f"lr must be a number > 0, got {lr!r}")
        self.kind = kind
        self.lr = float(lr)
        self.state: dict = {}

    @torch.no_grad()
    def step(self, key, p: torch.Tensor, g: torch.Tensor) -> None:
        lr, kind = self.lr, self.kind
        g = g.to(p.dtype)
        if kind == "sgd":
            p.add_(g, alpha=-lr)
            return
        st = self.state.get(key)
        if st is None:
            st = self.state[key] = {"t": 0}
        st["t"] += 1
        if kind == "momentum":  # torch.optim.SGD(momentum=0.9)
            buf = st.get("buf")
            if buf is None:
                buf = st["buf"] = g.clone()
            else:
                buf.mul_(0.9).add_(g)
            p.add_(buf, alpha=-lr)
        elif kind == "adam":  # torch.optim.Adam defaults
            b1, b2, eps, t = 0.9, 0.999, 1e-8, st["t"]
            m = st.setdefault("m", torch.zeros_like(p))
            v = st.setdefault("v", torch.zeros_like(p))
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v / (1 - b2**t)).sqrt_().add_(eps)
            p.addcdiv_(m, denom, value=-lr / (1 - b1**t))
        elif kind == "adagrad":  # torch.optim.Adagrad defaults
            s = st.setdefault("sum", torch.zeros_like(p))
            s.addcmul_(g, g)
            p.addcdiv_(g, s.sqrt().add_(1e-10), value=-lr)
        else:  # rmsprop, torch.optim.RMSprop defaults
            sq = st.setdefault("sq", torch.zeros_like(p))
            sq.mul_(0.99).addcmul_(g, g, value=0.01)
            p.addcdiv_(g, sq.sqrt().add_(1e-8), value=-lr)
