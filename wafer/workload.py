"""A transformer as a workload: :class:`Op` (one operation, per token), :class:`Workload` (a model's
ops at one context length, with its :class:`~wafer.shape.Shape`) and :func:`gpt_workload`, which
builds them from a shape, a minigpt ``GPTConfig`` or ``GPT``, or a Hugging Face GPT-2.

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
from wafer.shape import Shape

# Nominal FLOPs per element of the vector ops (a convention, not a measurement): a norm reads each
# element for the mean, the variance, the normalisation, the scale and the shift; softmax for the max,
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
    """A model's operations for one token at a given context length, and the shape they came from.

    Built in: 09_wafer
    """

    ops: list[Op]
    shape: Shape
    context: int
    dtype: str = MODEL_DTYPE

    @property
    def n_layer(self) -> int:
        return self.shape.n_layer

    @property
    def n_embd(self) -> int:
        """The model's width (``d_model``), under GPT-2's name."""
        return self.shape.d_model

    @property
    def kv_elems_per_token(self) -> int:
        """K and V entries the cache holds per token, over every layer."""
        return 2 * self.shape.d_kv * self.shape.n_layer

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


def _context(shape: Shape, context: int | None) -> int:
    """The context length: ``context``, at most the rows of a learned position table (the default)."""
    if context is None and shape.positions:
        return shape.positions
    top = shape.positions
    if isinstance(context, bool) or not isinstance(context, int) or context < 1 or (top and context > top):
        if top:
            raise ValueError(f"context={context!r} must be an integer in [1, {top}] (the block size)")
        raise ValueError(f"context={context!r} must be a positive integer ({shape.name} has no learned "
                         f"position table to take a default from)")
    return context


def _block(shape: Shape, i: int, t: int) -> list[Op]:
    """Block ``i``'s ops at context ``t``: norm, attention, residual, norm, MLP, residual."""
    c, b, vf = shape.d_model, int(shape.bias), VECTOR_FLOPS_PER_ELEMENT
    qkv = c + 2 * shape.d_kv  # the queries, and the keys and values of the key-value heads
    mlp_in = (2 if shape.gated else 1) * shape.d_ffn  # a gated MLP's two halves are one product
    f, p = shape.d_ffn, f"h{i}."
    if shape.gated:  # the gate's activation times the other half
        act = Op(p + "mlp.swiglu", i, "vector", vf["swiglu"] * f, 0, f)
    else:
        act = Op(p + "mlp.gelu", i, "vector", vf["gelu"] * f, 0, f)
    return [
        Op(p + "ln_1", i, "vector", vf["layernorm"] * c, shape.norm_params, c),
        Op(p + "attn.c_attn", i, "matmul", 2 * c * qkv, qkv * c + b * qkv, qkv),
        Op(p + "attn.scores", i, "attention", 2 * t * c, 0, shape.n_head * t),  # q.k^T, all heads
        Op(p + "attn.softmax", i, "vector", vf["softmax"] * shape.n_head * t, 0, shape.n_head * t),
        Op(p + "attn.mix", i, "attention", 2 * t * c, 0, c),  # weights times v
        Op(p + "attn.c_proj", i, "matmul", 2 * c * c, c * c + b * c, c),
        Op(p + "resid_1", i, "vector", vf["add"] * c, 0, c),
        Op(p + "ln_2", i, "vector", vf["layernorm"] * c, shape.norm_params, c),
        Op(p + "mlp.c_fc", i, "matmul", 2 * c * mlp_in, mlp_in * c + b * mlp_in, mlp_in),
        act,
        Op(p + "mlp.c_proj", i, "matmul", 2 * f * c, f * c + b * c, c),
        Op(p + "resid_2", i, "vector", vf["add"] * c, 0, c),
    ]


def gpt_workload(model_or_shape, context: int | None = None, dtype: str = MODEL_DTYPE) -> Workload:
    """A decoder-only transformer's forward pass, op by op, per token at ``context`` tokens (default:
    the block size, for a shape with learned positions). Accepts a :class:`~wafer.shape.Shape`, or
    anything :meth:`Shape.from_config` reads (a minigpt ``GPTConfig`` or ``GPT``, a Hugging Face
    GPT-2). The products follow the shape: grouped-query attention's narrower K and V, a gated MLP's
    two halves and SwiGLU, biases and norm shifts when ``bias``, a head tied to the token embedding
    or owning its own matrix.

    Built in: 09_wafer
    """
    shape = Shape.from_config(model_or_shape)
    t = _context(shape, context)
    c, vocab, vf = shape.d_model, shape.vocab, VECTOR_FLOPS_PER_ELEMENT
    ops = [Op("wte", -1, "embedding", 0.0, vocab * c, c)]
    if shape.positions:
        ops += [Op("wpe", -1, "embedding", 0.0, shape.positions * c, c),
                Op("embed.add", -1, "vector", vf["add"] * c, 0, c)]
    for i in range(shape.n_layer):
        ops += _block(shape, i, t)
    ops.append(Op("ln_f", shape.n_layer, "vector", vf["layernorm"] * c, shape.norm_params, c))
    if shape.tied:  # the head is the token embedding, transposed: it reads wte's weights and owns none
        ops.append(Op("lm_head", shape.n_layer, "matmul", 2 * c * vocab, 0, vocab, reads_params=vocab * c))
    else:
        ops.append(Op("lm_head", shape.n_layer, "matmul", 2 * c * vocab, vocab * c, vocab))
    return Workload(ops=ops, shape=shape, context=t, dtype=dtype)
