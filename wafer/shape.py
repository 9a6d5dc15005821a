"""A decoder-only transformer's shape, the one type the wafer model reads a model through.

:class:`Shape` covers GPT-2 (learned positions, biases, LayerNorm's scale and shift, a GELU MLP, the
head tied to the token embedding) and the LLaMA/Qwen2 family (grouped-query attention, a gated MLP,
norms with a scale only, no biases, an untied head). :meth:`Shape.from_config` is the one adapter
from a minigpt ``GPTConfig`` or ``GPT`` (or a Hugging Face GPT-2 model or config); ``workload``,
``placement``, ``streaming`` and ``inference`` all take a ``Shape``. The module also holds the shapes
of four open models, from their published configs: :data:`LLAMA3_8B`, :data:`LLAMA2_13B`,
:data:`CODELLAMA_34B` and :data:`QWEN2_72B`, with :data:`SHAPES` by name.

Built in: 09_wafer (GPT-2's shape), 13_inference (grouped-query attention, gated MLPs)
"""

from __future__ import annotations

from dataclasses import dataclass

from wafer.hardware import MODEL_DTYPE, dtype_bytes, positive_int


@dataclass(frozen=True)
class Shape:
    """A decoder-only transformer's shape: ``n_kv_head`` key and value heads shared by ``n_head``
    query heads (grouped-query attention), an MLP of ``d_ffn`` hidden units that is gated (three
    matrices of d x d_ffn, as in LLaMA and Qwen2) or not (two, as in GPT-2); ``bias`` puts a bias in
    every product and a shift in every norm; ``positions`` is the number of rows of a learned position
    table (GPT-2's block size), 0 for positions that hold no parameters (rotary).

    Built in: 13_inference
    """

    name: str
    n_layer: int
    d_model: int
    n_head: int
    n_kv_head: int
    d_ffn: int
    vocab: int
    gated: bool = True
    tied: bool = False
    bias: bool = False
    positions: int = 0

    def __post_init__(self) -> None:
        for field_ in ("n_layer", "d_model", "n_head", "n_kv_head", "d_ffn", "vocab"):
            positive_int(field_, getattr(self, field_))
        if isinstance(self.positions, bool) or not isinstance(self.positions, int) or self.positions < 0:
            raise ValueError(f"positions={self.positions!r} must be a non-negative integer (0: no learned "
                             f"position table)")
        if self.d_model % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must divide d_model={self.d_model}, and n_kv_head="
                             f"{self.n_kv_head} must divide n_head")

    @classmethod
    def from_config(cls, model_or_config, name: str = "") -> Shape:
        """GPT-2's shape from a minigpt ``GPTConfig`` or ``GPT``, or a Hugging Face GPT-2 model or
        config: multi-head attention, a 4x GELU MLP, learned positions, the head tied.

        Built in: 09_wafer
        """
        if isinstance(model_or_config, Shape):
            return model_or_config
        obj = getattr(model_or_config, "config", model_or_config)
        names = [("n_layer",), ("n_head",), ("n_embd",), ("block_size", "n_positions"), ("vocab_size",)]
        values = []
        for options in names:
            for option in options:
                if hasattr(obj, option):
                    values.append(int(getattr(obj, option)))
                    break
            else:
                raise ValueError(f"{type(model_or_config).__name__} has no {options[0]}: pass a wafer.Shape, "
                                 f"a minigpt GPTConfig or GPT, or a Hugging Face GPT-2 model or config")
        n_layer, n_head, c, block, vocab = values
        return cls(name=name or f"GPT {n_layer}x{c}", n_layer=n_layer, d_model=c, n_head=n_head,
                   n_kv_head=n_head, d_ffn=4 * c, vocab=vocab, gated=False, tied=True,
                   bias=bool(getattr(obj, "bias", True)), positions=block)

    @property
    def head_size(self) -> int:
        return self.d_model // self.n_head

    @property
    def d_kv(self) -> int:
        """Width of K (and of V): the key-value heads times the head size."""
        return self.n_kv_head * self.head_size

    def products(self) -> list[tuple[str, int, int]]:
        """One layer's products with weights, as (name, outputs, inputs)."""
        d = self.d_model
        mlp_in = (2 if self.gated else 1) * self.d_ffn
        return [("qkv", d + 2 * self.d_kv, d), ("out", d, d), ("mlp in", mlp_in, d),
                ("mlp out", d, self.d_ffn)]

    @property
    def norm_params(self) -> int:
        """One norm's parameters: a scale, and a shift when biased."""
        return (2 if self.bias else 1) * self.d_model

    @property
    def layer_params(self) -> int:
        """One block's parameters: its products (and their biases) and two norms."""
        weights = sum(m * n + (m if self.bias else 0) for _, m, n in self.products())
        return weights + 2 * self.norm_params

    @property
    def params(self) -> int:
        """Every parameter, the tied head counted once."""
        tables = self.vocab * self.d_model * (1 if self.tied else 2)  # embedding, and an untied head
        return self.n_layer * self.layer_params + tables + self.positions * self.d_model + self.norm_params

    def kv_bytes_per_token(self, dtype: str = MODEL_DTYPE) -> int:
        """K and V of every layer, for one token."""
        return 2 * self.n_layer * self.d_kv * dtype_bytes(dtype)


# Shapes from each model's config.json as published with its weights (Meta; Qwen).
LLAMA3_8B = Shape("LLaMA-3-8B", n_layer=32, d_model=4096, n_head=32, n_kv_head=8, d_ffn=14336, vocab=128256)
LLAMA2_13B = Shape("LLaMA-2-13B", n_layer=40, d_model=5120, n_head=40, n_kv_head=40, d_ffn=13824, vocab=32000)
CODELLAMA_34B = Shape("CodeLLaMA-34B", n_layer=48, d_model=8192, n_head=64, n_kv_head=8, d_ffn=22016,
                      vocab=32000)
QWEN2_72B = Shape("Qwen2-72B", n_layer=80, d_model=8192, n_head=64, n_kv_head=8, d_ffn=29568, vocab=152064)
SHAPES = {s.name: s for s in (LLAMA3_8B, LLAMA2_13B, CODELLAMA_34B, QWEN2_72B)}
