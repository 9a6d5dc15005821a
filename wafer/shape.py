"""A decoder-only transformer's shape as the wafer model reads it: minigpt's ``GPTConfig``, and what
its matrices, norms and tables add up to.

Every model reaches the wafer as a ``GPTConfig``: GPT-2 (learned positions, biases, LayerNorm's scale
and shift, a GELU MLP, the head tied to the token embedding) and the LLaMA family that chapter 03's
options reach (grouped-query attention, a SwiGLU MLP, RMSNorm's scale only, rotary positions, an
untied head; Qwen2's biases on q, k and v; Qwen3's norms on each head's query and key).
:func:`as_config` is the one adapter, from a ``GPTConfig``, a minigpt ``GPT``, or a Hugging Face GPT-2
model or config; ``workload``, ``placement``, ``streaming`` and ``inference`` all read a model through
it. The accounting counts what minigpt builds: :func:`products` (one layer's products with weights),
:func:`norm_params`, :func:`layer_params`, :func:`params`, :func:`kv_width` and
:func:`kv_bytes_per_token`. The module also holds the configs of four open models, from their
published config.json: :data:`LLAMA3_8B`, :data:`LLAMA2_13B`, :data:`CODELLAMA_34B` and
:data:`QWEN2_72B`, with :data:`SHAPES` by name and :func:`label` for the name of a config.

Built in: 09_wafer (GPT-2's shape), 13_inference (grouped-query attention, gated MLPs)
"""

from __future__ import annotations

from typing import Any

from minigpt.model import LLAMA_STYLE, GPTConfig
from wafer.hardware import MODEL_DTYPE, dtype_bytes


def as_config(model) -> GPTConfig:
    """The ``GPTConfig`` of ``model``: a ``GPTConfig`` itself, a minigpt ``GPT``, or a Hugging Face GPT-2
    model or config (multi-head attention, a GELU MLP of ``n_inner`` or 4 n_embd, learned positions,
    biases, the head tied unless the config unties it). The wafer models dense MLPs only.

    Built in: 09_wafer
    """
    obj = getattr(model, "config", model)
    if not isinstance(obj, GPTConfig):
        obj = _from_hugging_face_gpt2(model, obj)
    if obj.n_expert:
        raise ValueError(f"n_expert={obj.n_expert}: the wafer model counts a dense MLP in every block; pass "
                         f"a config with n_expert=0")
    return obj


def _from_hugging_face_gpt2(model, obj) -> GPTConfig:
    kind = getattr(obj, "model_type", None)
    if kind is not None and kind != "gpt2":
        raise ValueError(f"model_type={kind!r}: the wafer reads a Hugging Face GPT-2 config directly; for "
                         f"another model pass minigpt's GPT.from_hf(model).config")
    values = []
    for options in (("n_layer",), ("n_head",), ("n_embd",), ("block_size", "n_positions"), ("vocab_size",)):
        for option in options:
            if hasattr(obj, option):
                values.append(int(getattr(obj, option)))
                break
        else:
            raise ValueError(f"{type(model).__name__} has no {options[0]}: pass a minigpt GPTConfig or GPT, "
                             f"or a Hugging Face GPT-2 model or config")
    n_layer, n_head, n_embd, block, vocab = values
    return GPTConfig(block_size=block, vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                     bias=bool(getattr(obj, "bias", True)), mlp_hidden=getattr(obj, "n_inner", None),
                     layer_norm_epsilon=float(getattr(obj, "layer_norm_epsilon", 1e-5)),
                     tie_embeddings=bool(getattr(obj, "tie_word_embeddings", True)))


def q_width(config: GPTConfig) -> int:
    """Width of the queries (and of attention's output): the query heads times the head size, n_embd
    unless ``head_size`` sets it apart (Qwen3)."""
    return config.n_head * config.head_dim


def kv_width(config: GPTConfig) -> int:
    """Width of K (and of V): the key-value heads times the head size."""
    return config.kv_heads * config.head_dim


def qkv_biased(config: GPTConfig) -> bool:
    """Whether q, k and v carry biases: ``qkv_bias``, or ``bias`` when it is None."""
    return config.bias if config.qkv_bias is None else config.qkv_bias


def products(config: GPTConfig) -> list[tuple[str, int, int]]:
    """One layer's products with weights, as (name, outputs, inputs): q, k and v as one product, the
    attention's output projection, the MLP's first product (SwiGLU's gate and up as one, twice the
    hidden width) and its second."""
    d, q, f = config.n_embd, q_width(config), config.ffn_hidden
    mlp_in = (2 if config.mlp == "swiglu" else 1) * f
    return [("qkv", q + 2 * kv_width(config), d), ("out", d, q), ("mlp in", mlp_in, d), ("mlp out", d, f)]


def norm_params(config: GPTConfig) -> int:
    """One norm's parameters: RMSNorm's scale; LayerNorm's scale, and its shift when ``bias``."""
    shift = config.norm == "layernorm" and config.bias
    return (2 if shift else 1) * config.n_embd


def layer_params(config: GPTConfig) -> int:
    """One block's parameters: its products, their biases (``bias`` on every product, ``qkv_bias`` on
    q, k and v), two norms, and with ``qk_norm`` the scales of the query's and the key's norms."""
    weights = sum(m * n for _, m, n in products(config))
    biased = {"qkv": qkv_biased(config)}
    biases = sum(m for name, m, _ in products(config) if biased.get(name, config.bias))
    qk = 2 * config.head_dim if config.qk_norm else 0
    return weights + biases + 2 * norm_params(config) + qk


def params(config: GPTConfig) -> int:
    """Every parameter, the tied head counted once: the blocks, the token embedding (and an untied
    head), a learned position table, the final norm.

    Built in: 13_inference
    """
    d = config.n_embd
    tables = config.vocab_size * d * (1 if config.tie_embeddings else 2)
    positions = config.block_size * d if config.positions == "learned" else 0
    return config.n_layer * layer_params(config) + tables + positions + norm_params(config)


def kv_bytes_per_token(config: GPTConfig, dtype: str = MODEL_DTYPE) -> int:
    """K and V of every layer, for one token, in ``dtype``."""
    return 2 * config.n_layer * kv_width(config) * dtype_bytes(dtype)


# Four open models, from each model's config.json as published with its weights (Meta; Qwen): LLaMA's
# choices (RMSNorm, SwiGLU, rotary positions, no biases, an untied head), their widths, rotary bases
# and context lengths. Qwen2 puts biases on q, k and v.
_LLAMA: dict[str, Any] = LLAMA_STYLE
LLAMA3_8B = GPTConfig(**_LLAMA, n_layer=32, n_embd=4096, n_head=32, n_kv_head=8, mlp_hidden=14336,
                      vocab_size=128256, rope_theta=500000.0, block_size=8192)
LLAMA2_13B = GPTConfig(**_LLAMA, n_layer=40, n_embd=5120, n_head=40, n_kv_head=40, mlp_hidden=13824,
                       vocab_size=32000, rope_theta=10000.0, block_size=4096)
CODELLAMA_34B = GPTConfig(**_LLAMA, n_layer=48, n_embd=8192, n_head=64, n_kv_head=8, mlp_hidden=22016,
                          vocab_size=32000, rope_theta=1000000.0, block_size=16384)
QWEN2_72B = GPTConfig(**_LLAMA, n_layer=80, n_embd=8192, n_head=64, n_kv_head=8, mlp_hidden=29568,
                      vocab_size=152064, qkv_bias=True, rope_theta=1000000.0, block_size=32768,
                      layer_norm_epsilon=1e-6)
SHAPES = {"LLaMA-3-8B": LLAMA3_8B, "LLaMA-2-13B": LLAMA2_13B, "CodeLLaMA-34B": CODELLAMA_34B,
          "Qwen2-72B": QWEN2_72B}


def label(config: GPTConfig) -> str:
    """A config's name for tables, plots and messages: its name in :data:`SHAPES` if it equals one of
    the released models, else ``GPT {n_layer}x{n_embd}``.

    Built in: 13_inference
    """
    for name, released in SHAPES.items():
        if released == config:
            return name
    return f"GPT {config.n_layer}x{config.n_embd}"
