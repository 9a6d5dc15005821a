"""A transformer as a workload: :class:`Op` (one operation, per token), :class:`Workload` (a model's
ops at one context length, with its ``GPTConfig``) and :func:`gpt_workload`, which builds them from a
minigpt ``GPTConfig`` or ``GPT``, or a Hugging Face GPT-2 (whatever :func:`wafer.shape.as_config`
reads).

FLOP conventions (stated once, used everywhere):

- A matrix product counts 2 FLOPs per multiply-add (``matmul`` ops), as ``torch.utils.flop_counter``
  does. Attention's two products (q.k^T and the weighted sum of v) count the full T x T scores, as
  computed, though the causal mask zeroes half. These are what the tests compare with torch's counter.
- Norms, softmax, the MLP's activation (GELU, or SwiGLU's gate in a gated MLP) and residual adds are
  ``vector`` ops with small nominal counts (below). They are O(C) per token, not O(C^2), and torch's
  counter leaves them out; the wafer still spends cycles on them, so they are kept, apart.
- Training = forward + backward, and the backward of a matrix product costs two products (a gradient
  for the input and one for the weights), so training matmul FLOPs are 3x forward.

Built in: 09_wafer
"""

from __future__ import annotations

from dataclasses import dataclass

from wafer.hardware import MODEL_DTYPE, dtype_bytes
from wafer.shape import GPTConfig, as_config, kv_width, norm_params, q_width, qkv_biased

# Nominal FLOPs per element of the vector ops (a convention, not a measurement): a norm reads each
# element for the mean, the variance, the normalisation, the scale and the shift (RMSNorm, which has
# no mean or shift, is counted the same); softmax for the max,
# the exponential, the sum and the division; the tanh GELU for about eight operations; SwiGLU's gate
# for the sigmoid (an exponential, an add, a division), the product with its input and the product
# with the other half.
VECTOR_FLOPS_PER_ELEMENT = {"layernorm": 5, "softmax": 4, "gelu": 8, "swiglu": 5, "add": 1}


@dataclass(frozen=True)
class Op:
    """One operation, per token of a forward pass.

    ``layer`` is -1 for the embeddings, the block index inside the blocks, and ``n_layer`` for the
    final norm and the head. ``kind`` is ``matmul`` (a product with a weight matrix),
    ``attention`` (the two products between activations), ``vector`` or ``embedding`` (a lookup).

    Built in: 09_wafer
    """

    name: str
    layer: int
    kind: str
    flops: float  # forward FLOPs per token
    weight_params: int  # parameters this op owns (a tied matrix belongs to the op that owns it)
    activation_elems: int  # elements the op writes per token
    reads_params: int = 0  # parameters the op reads but does not own (the tied head)

    @property
    def inputs(self) -> int:
        """Elements a matrix product reads per token (its FLOPs are 2 x inputs x outputs); 0 otherwise."""
        return int(self.flops // (2 * self.activation_elems)) if self.kind == "matmul" else 0


@dataclass
class Workload:
    """A model's operations for one token at a given context length, and the config they came from.

    Built in: 09_wafer
    """

    ops: list[Op]
    config: GPTConfig
    context: int
    dtype: str = MODEL_DTYPE

    @property
    def n_layer(self) -> int:
        return self.config.n_layer

    @property
    def n_embd(self) -> int:
        """The model's width."""
        return self.config.n_embd

    @property
    def kv_elems_per_token(self) -> int:
        """K and V entries the cache holds per token, over every layer."""
        return 2 * kv_width(self.config) * self.config.n_layer

    @property
    def bytes_per_elem(self) -> int:
        return dtype_bytes(self.dtype)

    @property
    def params(self) -> int:
        return sum(op.weight_params for op in self.ops)

    @property
    def weight_bytes(self) -> int:
        return self.params * self.bytes_per_elem

    def forward_flops(self, kinds=("matmul", "attention")) -> float:
        """Forward FLOPs per token, over the op kinds given (the matrix products by default)."""
        return sum(op.flops for op in self.ops if op.kind in kinds)

    def training_flops(self, kinds=("matmul", "attention")) -> float:
        """Forward + backward FLOPs per token: 3x the forward for matrix products."""
        return 3.0 * self.forward_flops(kinds)

    def activation_bytes(self) -> int:
        """Bytes written per token by all ops: what training keeps for the backward pass (without
        recomputation)."""
        return sum(op.activation_elems for op in self.ops) * self.bytes_per_elem

    def layers(self) -> dict[int, list[Op]]:
        """Ops grouped by ``layer``, in order."""
        groups: dict[int, list[Op]] = {}
        for op in self.ops:
            groups.setdefault(op.layer, []).append(op)
        return groups

    def table(self) -> list[tuple[str, str, float, int]]:
        """(name, kind, forward FLOPs per token, weight parameters) per op."""
        return [(op.name, op.kind, op.flops, op.weight_params) for op in self.ops]


def _context(config: GPTConfig, context: int | None) -> int:
    """The context length: ``context``, at most the block size (the default), as minigpt's model takes
    no longer sequence whatever its positions."""
    top = config.block_size
    if context is None:
        return top
    if isinstance(context, bool) or not isinstance(context, int) or not 1 <= context <= top:
        raise ValueError(f"context={context!r} must be an integer in [1, {top}] (the block size)")
    return context


def _block(config: GPTConfig, i: int, t: int) -> list[Op]:
    """Block ``i``'s ops at context ``t``: norm, attention, residual, norm, MLP, residual."""
    c, b, vf = config.n_embd, int(config.bias), VECTOR_FLOPS_PER_ELEMENT
    q, kv, heads = q_width(config), kv_width(config), config.n_head
    qkv = q + 2 * kv  # the queries, and the keys and values of the key-value heads
    gated = config.mlp == "swiglu"
    f, p = config.ffn_hidden, f"h{i}."
    mlp_in = (2 if gated else 1) * f  # a gated MLP's two halves are one product
    if gated:  # the gate's activation times the other half
        act = Op(p + "mlp.swiglu", i, "vector", vf["swiglu"] * f, 0, f)
    else:
        act = Op(p + "mlp.gelu", i, "vector", vf["gelu"] * f, 0, f)
    norm = norm_params(config)
    attention = [
        Op(p + "ln_1", i, "vector", vf["layernorm"] * c, norm, c),
        Op(p + "attn.c_attn", i, "matmul", 2 * c * qkv, qkv * c + int(qkv_biased(config)) * qkv, qkv),
    ]
    if config.qk_norm:  # each head's query and key normalised, one scale of head_dim for each
        attention.append(Op(p + "attn.qk_norm", i, "vector", vf["layernorm"] * (q + kv), 2 * config.head_dim,
                            q + kv))
    return attention + [
        Op(p + "attn.scores", i, "attention", 2 * t * q, 0, heads * t),  # q.k^T, all heads
        Op(p + "attn.softmax", i, "vector", vf["softmax"] * heads * t, 0, heads * t),
        Op(p + "attn.mix", i, "attention", 2 * t * q, 0, q),  # weights times v
        Op(p + "attn.c_proj", i, "matmul", 2 * q * c, q * c + b * c, c),
        Op(p + "resid_1", i, "vector", vf["add"] * c, 0, c),
        Op(p + "ln_2", i, "vector", vf["layernorm"] * c, norm, c),
        Op(p + "mlp.c_fc", i, "matmul", 2 * c * mlp_in, mlp_in * c + b * mlp_in, mlp_in),
        act,
        Op(p + "mlp.c_proj", i, "matmul", 2 * f * c, f * c + b * c, c),
        Op(p + "resid_2", i, "vector", vf["add"] * c, 0, c),
    ]


def gpt_workload(model, context: int | None = None, dtype: str = MODEL_DTYPE) -> Workload:
    """A decoder-only transformer's forward pass, op by op, per token at ``context`` tokens (default:
    the block size). Accepts a minigpt ``GPTConfig`` or ``GPT``, or a Hugging Face GPT-2 (anything
    :func:`wafer.shape.as_config` reads). The products follow the config: grouped-query attention's
    narrower K and V, SwiGLU's two halves as one product and its gate, biases and LayerNorm's shifts
    when ``bias`` (and on q, k and v when ``qkv_bias``), RMSNorm's scale only, Qwen3's norms on each
    head's query and key, a learned position table or none, a head tied to the token embedding or
    owning its own matrix.

    Built in: 09_wafer
    """
    config = as_config(model)
    t = _context(config, context)
    c, vocab, vf = config.n_embd, config.vocab_size, VECTOR_FLOPS_PER_ELEMENT
    norm = norm_params(config)
    ops = [Op("wte", -1, "embedding", 0.0, vocab * c, c)]
    if config.positions == "learned":
        ops += [Op("wpe", -1, "embedding", 0.0, config.block_size * c, c),
                Op("embed.add", -1, "vector", vf["add"] * c, 0, c)]
    for i in range(config.n_layer):
        ops += _block(config, i, t)
    ops.append(Op("ln_f", config.n_layer, "vector", vf["layernorm"] * c, norm, c))
    if config.tie_embeddings:  # the head is the token embedding, transposed: reads wte's weights, owns none
        ops.append(Op("lm_head", config.n_layer, "matmul", 2 * c * vocab, 0, vocab, reads_params=vocab * c))
    else:
        ops.append(Op("lm_head", config.n_layer, "matmul", 2 * c * vocab, vocab * c, vocab))
    return Workload(ops=ops, config=config, context=t, dtype=dtype)
