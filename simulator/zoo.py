"""Model zoo: real, trainable ``torch.nn.Module`` definitions of well-known models.

The same modules serve the simulator (traced on the meta device by
:meth:`simulator.Workload.from_module`, so GPT-3 175B costs no memory) and
realrun (trained for real on CPU or GPU). Every zoo model has

* ``sample_shape``: the shape of one input sample, and
* ``example_input(batch_size, device=None)``: a batch of inputs (token ids,
  images or feature vectors) to run it on;

and is built from repeated blocks (``layer1..4`` for ResNet, ``blocks`` for GPT
and BERT) so that cutting it into pipeline stages by layers is natural.

Build one under ``torch.device("meta")`` (or ``build(name, device="meta")``) to
get shapes without memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn


def _check_batch(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def _check_positive(owner: str, **values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}.{name} must be an integer >= 1, got {value!r}")


# -- MLP -------------------------------------------------------------------------


class MLP(nn.Sequential):
    """Linear/ReLU stack; ``widths = (in, hidden..., out)`` features per sample."""

    def __init__(self, widths: Sequence[int], *, bias: bool = True) -> None:
        widths = tuple(widths)
        if len(widths) < 2:
            raise ValueError(f"MLP.widths needs at least 2 entries (in, out), got {widths!r}")
        for i, width in enumerate(widths):
            _check_positive("MLP", **{f"widths[{i}]": width})
        mods: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            mods.append(nn.Linear(fan_in, fan_out, bias=bias))
            if i < len(widths) - 2:
                mods.append(nn.ReLU())
        super().__init__(*mods)
        self.widths = widths
        self.sample_shape = (widths[0],)

    def example_input(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Float feature vectors, shape ``(batch_size, widths[0])``."""
        _check_batch(batch_size)
        return torch.randn(batch_size, self.widths[0], device=device)


def mlp(in_features: int = 784, hidden: Sequence[int] = (512, 512), out_features: int = 10,
        *, bias: bool = True) -> MLP:
    """MLP ``in_features -> hidden... -> out_features`` with ReLU between layers."""
    return MLP((in_features, *hidden, out_features), bias=bias)


# -- ResNet (torchvision-equivalent, v1.5: stride on the 3x3 conv) -----------------


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet for ``image_size`` x ``image_size`` RGB images, torchvision layout and names."""

    def __init__(self, block: type[BasicBlock | Bottleneck], depths: Sequence[int], *,
                 num_classes: int = 1000, image_size: int = 224) -> None:
        super().__init__()
        _check_positive("ResNet", num_classes=num_classes, image_size=image_size)
        self.sample_shape = (3, image_size, image_size)
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, depths[0], 1)
        self.layer2 = self._make_layer(block, 128, depths[1], 2)
        self.layer3 = self._make_layer(block, 256, depths[2], 2)
        self.layer4 = self._make_layer(block, 512, depths[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block, planes: int, depth: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion))
        blocks = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        blocks += [block(self.inplanes, planes) for _ in range(1, depth)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def pipeline_units(self) -> list[tuple[str, Callable]]:
        """The forward as a chain of ``(module name, callable)``: what pipeline stages are cut from."""
        blocks = [(f"{name}.{i}", block) for name in ("layer1", "layer2", "layer3", "layer4")
                  for i, block in enumerate(getattr(self, name))]
        return [("conv1", self.conv1), ("bn1", self.bn1), ("relu", self.relu), ("maxpool", self.maxpool),
                *blocks, ("avgpool", lambda x: torch.flatten(self.avgpool(x), 1)), ("fc", self.fc)]

    def example_input(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Float images, shape ``(batch_size, 3, image_size, image_size)``."""
        _check_batch(batch_size)
        return torch.randn(batch_size, *self.sample_shape, device=device)


def resnet18(*, num_classes: int = 1000, image_size: int = 224) -> ResNet:
    """ResNet-18 (11,689,512 parameters at 1000 classes)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes=num_classes, image_size=image_size)


def resnet50(*, num_classes: int = 1000, image_size: int = 224) -> ResNet:
    """ResNet-50 (25,557,032 parameters at 1000 classes)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes=num_classes, image_size=image_size)


# -- Transformers --------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TransformerConfig:
    """Published shape of a transformer: layers, width, heads, context, vocabulary."""

    n_layer: int
    d_model: int
    n_head: int
    n_ctx: int
    """Context length (positions), tokens."""
    vocab_size: int
    d_ff: int = 0
    """Feed-forward width; 0 means 4 x d_model."""


_GPT2 = dict(n_ctx=1024, vocab_size=50257)
_GPT3 = dict(n_ctx=2048, vocab_size=50257)
GPT_CONFIGS: dict[str, TransformerConfig] = {
    "gpt2-small": TransformerConfig(n_layer=12, d_model=768, n_head=12, **_GPT2),
    "gpt2-medium": TransformerConfig(n_layer=24, d_model=1024, n_head=16, **_GPT2),
    "gpt2-large": TransformerConfig(n_layer=36, d_model=1280, n_head=20, **_GPT2),
    "gpt2-xl": TransformerConfig(n_layer=48, d_model=1600, n_head=25, **_GPT2),
    # GPT-3 paper, Table 2.1. Two rows are inconsistent there: XL lists 24 heads of
    # 128 for d_model 2048 and 13B lists d_model 5140 with 40 heads of 128; we use
    # 16 heads (d_head 128) and d_model 5120 = 40 x 128, as re-implementations do.
    "gpt3-small": TransformerConfig(n_layer=12, d_model=768, n_head=12, **_GPT3),
    "gpt3-medium": TransformerConfig(n_layer=24, d_model=1024, n_head=16, **_GPT3),
    "gpt3-large": TransformerConfig(n_layer=24, d_model=1536, n_head=16, **_GPT3),
    "gpt3-xl": TransformerConfig(n_layer=24, d_model=2048, n_head=16, **_GPT3),
    "gpt3-2.7b": TransformerConfig(n_layer=32, d_model=2560, n_head=32, **_GPT3),
    "gpt3-6.7b": TransformerConfig(n_layer=32, d_model=4096, n_head=32, **_GPT3),
    "gpt3-13b": TransformerConfig(n_layer=40, d_model=5120, n_head=40, **_GPT3),
    "gpt3-175b": TransformerConfig(n_layer=96, d_model=12288, n_head=96, **_GPT3),
}
BERT_CONFIGS: dict[str, TransformerConfig] = {
    "bert-base": TransformerConfig(n_layer=12, d_model=768, n_head=12, n_ctx=512,
                                   vocab_size=30522, d_ff=3072),
    "bert-large": TransformerConfig(n_layer=24, d_model=1024, n_head=16, n_ctx=512,
                                    vocab_size=30522, d_ff=4096),
}


class SelfAttention(nn.Module):
    """Multi-head self-attention with fused QKV projection (causal or not)."""

    tp_fused = {"qkv": 3}
    """``qkv``'s output rows are three blocks (q, k, v): a tensor-parallel split takes the
    same heads from each (:func:`realrun.tensor_parallel.shard_module`)."""

    def __init__(self, d_model: int, n_head: int, *, causal: bool, dropout: float) -> None:
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model must be divisible by n_head, got {d_model} and {n_head}")
        self.n_head, self.causal, self.dropout = n_head, causal, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Shapes come from the projection's output, so a tensor-parallel rank that holds
        # n_head / t heads (a slice of qkv's rows, see realrun.tensor_parallel) runs this unchanged.
        h = self.qkv(x)
        batch, seq = h.shape[:2]
        q, k, v = h.view(batch, seq, 3, self.n_head, -1).unbind(2)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            dropout_p=self.dropout if self.training else 0.0, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, *, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff)
        self.act = nn.GELU(approximate="tanh")
        self.proj = nn.Linear(d_ff, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    """GPT-2 pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, n_head: int, d_ff: int, *, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_head, causal=True, dropout=dropout)
        self.drop = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = FeedForward(d_model, d_ff, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x)))
        return x + self.mlp(self.ln_2(x))


class BertBlock(nn.Module):
    """BERT post-LN encoder block: ln(x + attn(x)), then ln(x + ffn(x))."""

    def __init__(self, d_model: int, n_head: int, d_ff: int, *, dropout: float) -> None:
        super().__init__()
        self.attn = SelfAttention(d_model, n_head, causal=False, dropout=dropout)
        self.drop = nn.Dropout(dropout)
        self.ln_1 = nn.LayerNorm(d_model, eps=1e-12)
        self.mlp = FeedForward(d_model, d_ff, dropout=dropout)
        self.ln_2 = nn.LayerNorm(d_model, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_1(x + self.drop(self.attn(x)))
        return self.ln_2(x + self.mlp(x))


class TokenEmbedding(nn.Module):
    """Token + learned position (+ token-type, for BERT) embeddings, then dropout."""

    def __init__(self, cfg: TransformerConfig, *, type_vocab: int, norm: bool,
                 dropout: float) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.n_ctx, cfg.d_model)
        self.wtt = nn.Embedding(type_vocab, cfg.d_model) if type_vocab else None
        self.ln = nn.LayerNorm(cfg.d_model, eps=1e-12) if norm else None
        self.drop = nn.Dropout(dropout)
        self.sequence_shard: tuple[int, int] | None = None
        """``(r, t)`` under sequence parallelism: the word embeddings may come back as the
        ``r``-th of ``t`` equal slices of the sequence (reduce-scattered across the group), and
        the position embeddings then follow that slice."""

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx)
        n = x.shape[1]
        first = 0
        if n != idx.shape[1]:
            if self.sequence_shard is None or n * self.sequence_shard[1] != idx.shape[1]:
                raise ValueError(f"TokenEmbedding: word embeddings of {n} tokens for {idx.shape[1]} token ids, "
                                 f"and sequence_shard={self.sequence_shard} does not say which slice they are")
            first = self.sequence_shard[0] * n
        x = x + self.wpe(torch.arange(first, first + n, device=idx.device))
        if self.wtt is not None:  # every token is segment 0
            x = x + self.wtt(torch.zeros(x.shape[:2], dtype=idx.dtype, device=idx.device))
        if self.ln is not None:
            x = self.ln(x)
        return self.drop(x)


class _TokenModel(nn.Module):
    """Shared parts of GPT and BERT: token-id input of ``seq_len`` tokens."""

    def __init__(self, cfg: TransformerConfig, seq_len: int | None) -> None:
        super().__init__()
        seq_len = cfg.n_ctx if seq_len is None else seq_len
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 1 <= seq_len <= cfg.n_ctx:
            raise ValueError(f"seq_len must be an integer in [1, {cfg.n_ctx}] (the context), "
                             f"got {seq_len!r}")
        self.config, self.seq_len, self.sample_shape = cfg, seq_len, (seq_len,)

    def example_input(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Random token ids (int64), shape ``(batch_size, seq_len)``."""
        _check_batch(batch_size)
        return torch.randint(0, self.config.vocab_size, (batch_size, self.seq_len), device=device)

    def _init_weights(self, resid_std: float) -> None:
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                std = resid_std if name.endswith("proj") else 0.02
                nn.init.normal_(m.weight, 0.0, std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)


class GPT(_TokenModel):
    """GPT-2/3 decoder: embeddings, pre-LN blocks, final LN, LM head tied to ``wte``.

    Input: token ids ``(batch, seq_len)``; output: logits ``(batch, seq_len, vocab)``.
    """

    def __init__(self, cfg: TransformerConfig, *, seq_len: int | None = None,
                 dropout: float = 0.1) -> None:
        super().__init__(cfg, seq_len)
        d_ff = cfg.d_ff or 4 * cfg.d_model
        self.embed = TokenEmbedding(cfg, type_vocab=0, norm=False, dropout=dropout)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_head, d_ff, dropout=dropout)
                                    for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.embed.wte.weight
        self._init_weights(0.02 / math.sqrt(2 * cfg.n_layer))  # GPT-2's scaled residual init

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def pipeline_units(self) -> list[tuple[str, Callable]]:
        """The forward as a chain of ``(module name, callable)``: what pipeline stages are cut from."""
        return [("embed", self.embed), *((f"blocks.{i}", b) for i, b in enumerate(self.blocks)),
                ("ln_f", self.ln_f), ("lm_head", self.lm_head)]


class MLMHead(nn.Module):
    """BERT masked-LM head: dense + GELU + LN, decoder tied to the word embeddings."""

    def __init__(self, cfg: TransformerConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.act = nn.GELU()
        self.ln = nn.LayerNorm(cfg.d_model, eps=1e-12)
        self.decoder = nn.Linear(cfg.d_model, cfg.vocab_size)
        self.decoder.weight = word_embeddings.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.ln(self.act(self.dense(x))))


class Bert(_TokenModel):
    """BERT encoder with masked-LM head (as HF ``BertForMaskedLM``).

    Input: token ids ``(batch, seq_len)``; output: MLM logits ``(batch, seq_len, vocab)``.
    """

    def __init__(self, cfg: TransformerConfig, *, seq_len: int | None = None,
                 dropout: float = 0.1) -> None:
        super().__init__(cfg, seq_len)
        d_ff = cfg.d_ff or 4 * cfg.d_model
        self.embed = TokenEmbedding(cfg, type_vocab=2, norm=True, dropout=dropout)
        self.blocks = nn.ModuleList(BertBlock(cfg.d_model, cfg.n_head, d_ff, dropout=dropout)
                                    for _ in range(cfg.n_layer))
        self.head = MLMHead(cfg, self.embed.wte)
        self._init_weights(0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def pipeline_units(self) -> list[tuple[str, Callable]]:
        """The forward as a chain of ``(module name, callable)``: what pipeline stages are cut from."""
        return [("embed", self.embed), *((f"blocks.{i}", b) for i, b in enumerate(self.blocks)), ("head", self.head)]


def _config(table: dict[str, TransformerConfig], size: str, overrides: dict) -> TransformerConfig:
    if size not in table:
        raise ValueError(f"size must be one of {sorted(table)}, got {size!r}")
    base = table[size]
    fields = {k: getattr(base, k) for k in ("n_layer", "d_model", "n_head", "n_ctx",
                                            "vocab_size", "d_ff")}
    given = {k: v for k, v in overrides.items() if v is not None}
    _check_positive("TransformerConfig", **given)
    fields.update(given)
    return TransformerConfig(**fields)


def gpt(size: str = "gpt2-small", *, seq_len: int | None = None, vocab_size: int | None = None,
        n_layer: int | None = None, d_model: int | None = None, n_head: int | None = None,
        n_ctx: int | None = None, dropout: float = 0.1) -> GPT:
    """A GPT of a published ``size`` (see ``GPT_CONFIGS``); keywords override its shape.

    ``seq_len`` defaults to the context length (1024 for GPT-2, 2048 for GPT-3).
    """
    cfg = _config(GPT_CONFIGS, size, dict(vocab_size=vocab_size, n_layer=n_layer,
                                          d_model=d_model, n_head=n_head, n_ctx=n_ctx))
    return GPT(cfg, seq_len=seq_len, dropout=dropout)


def bert(size: str = "bert-large", seq_len: int | None = 512, *, vocab_size: int | None = None,
         n_layer: int | None = None, d_model: int | None = None, n_head: int | None = None,
         d_ff: int | None = None, dropout: float = 0.1) -> Bert:
    """A BERT of a published ``size`` ("bert-base", "bert-large") with its MLM head."""
    cfg = _config(BERT_CONFIGS, size, dict(vocab_size=vocab_size, n_layer=n_layer,
                                           d_model=d_model, n_head=n_head, d_ff=d_ff))
    return Bert(cfg, seq_len=seq_len, dropout=dropout)


# -- registry ----------------------------------------------------------------------

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "gpt": gpt,
    "bert": bert,
    **{size: partial(gpt, size) for size in GPT_CONFIGS},
    **{size: partial(bert, size) for size in BERT_CONFIGS},
}
"""Zoo builders by name; the sized names ("gpt3-175b", "bert-base") fix ``size``."""


def build(name: str, *, device: torch.device | str | None = None, **kwargs
          ) -> tuple[nn.Module, Callable[..., torch.Tensor]]:
    """Build zoo model ``name`` (on ``device``, e.g. "meta"); keywords go to its builder.

    Returns the module and ``make_input(batch_size, device)``, which makes an
    example input batch.
    """
    if name not in MODELS:
        raise ValueError(f"zoo model must be one of {sorted(MODELS)}, got {name!r}")
    with torch.device(device) if device is not None else nullcontext():
        model = MODELS[name](**kwargs)
    return model, model.example_input


def sample_shape(name: str, **kwargs) -> tuple[int, ...]:
    """Shape of one input sample of zoo model ``name`` (built on meta, costs nothing)."""
    return tuple(build(name, device="meta", **kwargs)[0].sample_shape)
