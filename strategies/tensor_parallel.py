"""Megatron-style tensor parallelism: which layers split across ``t`` ranks, and where the
collectives go.

Shoeybi et al., "Megatron-LM" (2019), section 3, split a transformer block's
two GEMM pairs so that each needs one all-reduce in forward and one in
backward: the first linear of a pair is split by output columns (``column``:
each rank holds ``1/t`` of the output features and computes them from the
whole input), what runs between the pair is split with it (``inner``: the
attention heads, the MLP's activation), and the second linear is split by
input rows (``row``: each rank multiplies its slice of the features and the
partial outputs are summed by an all-reduce, the ``g`` operator). The input of
a column group is the ``f`` operator: identity in forward, an all-reduce of
the input gradient in backward. Per transformer layer that is 2 all-reduces of
``b·s·h`` elements in forward and 2 in backward. The word embedding splits by
vocabulary (``vocab``: partial sums, an all-reduce after it in forward) and the
output head by vocabulary too (``head``: a column split whose input gradient is
all-reduced in backward). Everything else (layer norms, dropout, residual
adds, biases after a row split) is ``replicated``: each rank computes it whole.

With sequence parallelism (Korthikanti et al., "Reducing Activation
Recomputation in Large Transformer Models", 2022) the replicated layers work
on ``s/t`` tokens each, each forward all-reduce becomes a reduce-scatter and
each ``f`` becomes an all-gather (forward) / reduce-scatter (backward), with
the same bytes on the wire.

Roles come from :attr:`Layer.tp_role` when set, else from the layer's name and
kind (:func:`infer_roles`), which knows the zoo's names and the common
Megatron/GPT-2/LLaMA ones.
"""

from __future__ import annotations

TP_ROLES = ("replicated", "column", "row", "inner", "vocab", "head")

SPLIT_ROLES = ("column", "row", "inner", "vocab", "head")
"""Roles whose parameters and FLOPs divide by the tensor-parallel degree."""

_COLUMN = ("qkv", "c_attn", "query_key_value", "query", "key", "value", "q_proj", "k_proj", "v_proj",
           "wq", "wk", "wv", "fc", "fc1", "c_fc", "up_proj", "gate_proj", "w1", "w3", "dense_h_to_4h")
_ROW = ("proj", "out_proj", "o_proj", "c_proj", "wo", "fc2", "down_proj", "w2", "dense_4h_to_h")
_HEAD = ("lm_head", "decoder", "output")
_VOCAB = ("wte", "word_embeddings", "embed_tokens", "tok_embeddings")

# Per role: divisors by t of (FLOPs and parameters, input elements, output elements).
# A column layer reads the whole input and makes 1/t of the output; a row layer reads 1/t and
# makes whole (partial-sum) outputs; inner layers are split on both sides.
_SPLIT = {
    "column": (True, False, True),
    "head": (True, False, True),
    "row": (True, True, False),
    "vocab": (True, False, False),
    "inner": (True, True, True),
    "replicated": (False, False, False),
}


def infer_roles(names, kinds, params, given=None) -> tuple[str, ...]:
    """The tensor-parallel role of every layer (see the module docstring).

    ``given[i]`` (a role, or ``""``) wins over the name rule. By name: a
    ``Linear`` whose last name part is a known column (``qkv``, ``fc``,
    ``q_proj`` ...) or row (``proj``, ``o_proj``, ``fc2`` ...) projection, an
    output head (``lm_head``, ``decoder``), an ``Embedding`` of words
    (``wte``, ``embed_tokens`` ...). Then ``inner``: a layer without
    parameters that runs attention (its kind ends in ``Attention``) or that
    lies between a column layer and the next row layer (the activation).
    Everything else is replicated.
    """
    n = len(names)
    given = given or ("",) * n
    roles = []
    for name, kind, own, role in zip(names, kinds, params, given, strict=True):
        if role:
            roles.append(role)
            continue
        last = name.rsplit(".", 1)[-1]
        if kind == "Linear" and last in _COLUMN:
            roles.append("column")
        elif kind == "Linear" and last in _ROW:
            roles.append("row")
        elif kind == "Linear" and last in _HEAD:
            roles.append("head")
        elif kind == "Embedding" and last in _VOCAB:
            roles.append("vocab")
        elif not own and kind.endswith("Attention"):
            roles.append("inner")
        else:
            roles.append("")
    open_pair = False  # inside a column ... row pair
    for i in range(n):
        if roles[i] == "column":
            open_pair = True
        elif roles[i] in ("row", "head", "vocab"):
            open_pair = False
        elif roles[i] == "" and open_pair and not params[i] and not given[i]:
            roles[i] = "inner"
    return tuple(role or "replicated" for role in roles)


def split_factors(role: str, t: int, sequence_parallel: bool = False) -> tuple[float, float, float, float]:
    """Fractions of (FLOPs, parameters, input elements, output elements) of a layer of ``role``
    one of ``t`` ranks handles. With sequence parallelism a replicated layer works on ``1/t``
    of the tokens (its FLOPs and activations) but keeps its parameters whole."""
    work, inp, out = _SPLIT[role]
    share = 1.0 / t
    if role == "replicated" and sequence_parallel:
        return share, 1.0, share, share
    return (share if work else 1.0, share if work else 1.0, share if inp else 1.0, share if out else 1.0)


def local_params(params: int, role: str, t: int) -> float:
    """Parameter elements one of ``t`` ranks holds of a layer of ``role``."""
    return params / t if role in SPLIT_ROLES else float(params)


def comm_points(roles, segment: tuple[int, int]) -> tuple[list[int], list[int]]:
    """Where tensor-parallel collectives go in layers ``segment = [a, b)``.

    Returns ``(forward, backward)`` lists of layer indices: a forward point ``i`` is an
    all-reduce (reduce-scatter with sequence parallelism) of layer ``i``'s output, after it
    (every ``row`` and ``vocab`` layer); a backward point ``i`` is an all-reduce of the input
    gradient of the column group starting at layer ``i``, once backward has passed it (the
    first ``column`` or ``head`` layer after a layer of another role).
    """
    a, b = segment
    forward = [i for i in range(a, b) if roles[i] in ("row", "vocab")]
    backward = []
    for i in range(a, b):
        if roles[i] in ("column", "head"):
            j = i - 1  # a group: columns reading the same input, with only inner layers between
            while j >= a and roles[j] == "inner":
                j -= 1
            if j < a or roles[j] not in ("column", "head"):
                backward.append(i)
    return forward, backward


def check_divisible(names, roles, shapes, t: int, owner: str) -> None:
    """Every column or row weight's split dimension divides by ``t`` (when its shape is known).
    Vocabularies need not: Megatron-LM pads them to a multiple of ``128·t``."""
    if t == 1:
        return
    for name, role, layer_shapes in zip(names, roles, shapes, strict=True):
        if role not in ("column", "row") or not layer_shapes:
            continue
        weight = layer_shapes[0]
        if len(weight) != 2:
            continue
        dim = weight[1] if role == "row" else weight[0]
        if dim % t:
            raise ValueError(
                f"{owner}.tp={t} does not divide layer {name!r} ({role}-parallel weight {tuple(weight)}: "
                f"dimension {dim} split {t} ways); choose tp that divides it"
            )
