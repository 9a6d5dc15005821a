"""A GPT as a workload: the sequence of operations one token passes through, with FLOPs, weights and
activations per token.

FLOP conventions (stated once, used everywhere):

- A matrix product counts 2 FLOPs per multiply-add (``matmul`` ops), as ``torch.utils.flop_counter``
  does. Attention's two products (q.k^T and the weighted sum of v) count the full T x T scores, as
  computed, though the causal mask zeroes half. These are what the tests compare with torch's counter.
- LayerNorm, softmax, GELU and residual adds are ``vector`` ops with small nominal counts (below). They
  are O(C) per token, not O(C^2), and torch's counter leaves them out; the wafer still spends cycles on
  them, so they are kept, apart.
- Training = forward + backward, and the backward of a matrix product costs two products (a gradient
  for the input and one for the weights), so training matmul FLOPs are 3x forward.

Built in: 08_wafer
"""

from __future__ import annotations

from dataclasses import dataclass, field

from wafer.hardware import dtype_bytes

# Nominal FLOPs per element of the vector ops (a convention, not a measurement): LayerNorm reads each
# element for the mean, the variance, the normalisation, the scale and the shift; softmax for the max,
# the exponential, the sum and the division; the tanh GELU for about eight operations.
VECTOR_FLOPS_PER_ELEMENT = {"layernorm": 5, "softmax": 4, "gelu": 8, "add": 1}


@dataclass(frozen=True)
class Op:
    """One operation, per token of a forward pass.

    ``layer`` is -1 for the embeddings, the block index inside the blocks, and ``n_layer`` for the
    final LayerNorm and the head. ``kind`` is ``matmul`` (a product with a weight matrix),
    ``attention`` (the two products between activations), ``vector`` or ``embedding`` (a lookup).
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
    """A GPT's operations for one token at a given context length.

    Built in: 08_wafer
    """

    ops: list[Op]
    context: int
    dtype: str = "fp16"
    n_layer: int = 0
    n_embd: int = 0
    kv_elems_per_token: int = field(default=0)  # K and V entries the cache holds per token

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

    def vector_flops(self) -> float:
        return self.forward_flops(kinds=("vector",))

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


def _shape(model_or_config):
    """(n_layer, n_head, n_embd, block_size, vocab_size, bias) from a minigpt GPTConfig or GPT, or a
    Hugging Face GPT-2 model or config."""
    obj = getattr(model_or_config, "config", model_or_config)
    names = [("n_layer",), ("n_head",), ("n_embd",), ("block_size", "n_positions"), ("vocab_size",)]
    values = []
    for options in names:
        for name in options:
            if hasattr(obj, name):
                values.append(int(getattr(obj, name)))
                break
        else:
            raise ValueError(f"{type(model_or_config).__name__} has no {options[0]}: pass a minigpt "
                             f"GPTConfig "
                             f"or GPT, or a Hugging Face GPT-2 model or config")
    values.append(bool(getattr(obj, "bias", True)))
    return values


def gpt_workload(model_or_config, context: int | None = None, dtype: str = "fp16") -> Workload:
    """The forward pass of a GPT-2-style model, op by op, per token at ``context`` tokens (default:
    the block size). Accepts a minigpt ``GPTConfig`` or ``GPT``, or a Hugging Face GPT-2.

    Built in: 08_wafer
    """
    n_layer, n_head, c, block, vocab, bias = _shape(model_or_config)
    t = block if context is None else context
    if not isinstance(t, int) or t < 1 or t > block:
        raise ValueError(f"context={context!r} must be an integer in [1, {block}] (the block size)")
    b = 1 if bias else 0
    vf = VECTOR_FLOPS_PER_ELEMENT
    ln = (1 + b) * c  # LayerNorm: a scale, and a shift when biased
    ops = [Op("wte", -1, "embedding", 0.0, vocab * c, c),
           Op("wpe", -1, "embedding", 0.0, block * c, c),
           Op("embed.add", -1, "vector", vf["add"] * c, 0, c)]
    for i in range(n_layer):
        p = f"h{i}."
        ops += [
            Op(p + "ln_1", i, "vector", vf["layernorm"] * c, ln, c),
            Op(p + "attn.c_attn", i, "matmul", 2 * c * 3 * c, 3 * c * c + b * 3 * c, 3 * c),
            Op(p + "attn.scores", i, "attention", 2 * t * c, 0, n_head * t),  # q.k^T, all heads
            Op(p + "attn.softmax", i, "vector", vf["softmax"] * n_head * t, 0, n_head * t),
            Op(p + "attn.mix", i, "attention", 2 * t * c, 0, c),  # weights times v
            Op(p + "attn.c_proj", i, "matmul", 2 * c * c, c * c + b * c, c),
            Op(p + "resid_1", i, "vector", vf["add"] * c, 0, c),
            Op(p + "ln_2", i, "vector", vf["layernorm"] * c, ln, c),
            Op(p + "mlp.c_fc", i, "matmul", 2 * c * 4 * c, 4 * c * c + b * 4 * c, 4 * c),
            Op(p + "mlp.gelu", i, "vector", vf["gelu"] * 4 * c, 0, 4 * c),
            Op(p + "mlp.c_proj", i, "matmul", 2 * 4 * c * c, 4 * c * c + b * c, c),
            Op(p + "resid_2", i, "vector", vf["add"] * c, 0, c),
        ]
    ops += [Op("ln_f", n_layer, "vector", vf["layernorm"] * c, ln, c),
            # the head is the token embedding, transposed: it reads wte's weights and owns none
            Op("lm_head", n_layer, "matmul", 2 * c * vocab, 0, vocab, reads_params=vocab * c)]
    return Workload(ops=ops, context=t, dtype=dtype, n_layer=n_layer, n_embd=c,
                    kv_elems_per_token=2 * c * n_layer)
