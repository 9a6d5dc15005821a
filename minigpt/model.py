"""The GPT: its shape (GPTConfig, with muP's settings), GPT-2's architecture (MLP, Block, Body, GPT),
its parameter and FLOP counts, and Hugging Face GPT-2 weights.

Built in: 03_gpt
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minigpt.attention import MultiHeadAttention, RotaryEmbedding, check_rope_scaling
from minigpt.checks import positive_int
from minigpt.moe import MoE

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
POSITIONS = ("learned", "rope", "none")
# The options that take GPT-2 to LLaMA (chapter 03), at GPT-2's values and at LLaMA's: for example
# GPTConfig(**LLAMA_STYLE, n_kv_head=2). Qwen2 adds qkv_bias=True; Qwen3 qk_norm=True.
GPT2_STYLE = dict(norm="layernorm", mlp="gelu", mlp_hidden=None, positions="learned", n_kv_head=None,
                  head_size=None, qkv_bias=None, qk_norm=False, tie_embeddings=True)
LLAMA_STYLE = dict(norm="rmsnorm", mlp="swiglu", positions="rope", bias=False, tie_embeddings=False)


def _leaves_gpt2(config: GPTConfig) -> str | None:
    """The first option of the step to LLaMA at which ``config`` leaves GPT-2's value, or None."""
    return next((k for k, v in GPT2_STYLE.items() if getattr(config, k) != v), None)


def require_gpt2(config: GPTConfig, what: str) -> None:
    """ValueError naming the first option at which ``config`` leaves GPT-2, for code written for GPT-2
    only (``what`` names it)."""
    k = _leaves_gpt2(config)
    if k is not None:
        raise ValueError(f"{what} takes GPT-2-style models only; this one has {k}="
                         f"{getattr(config, k)!r} (GPT-2: {GPT2_STYLE[k]!r})")


@dataclass
class GPTConfig:
    """A GPT's shape, with GPT-2's names. The defaults are GPT-2 small (124M parameters).

    Built in: 03_gpt
    """

    block_size: int = 1024  # longest sequence (learned positions)
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms
    layer_norm_epsilon: float = 1e-5
    # muP, the maximal-update parametrisation (chapter 06). None: the standard parametrisation (SP).
    # An integer: the base width, at which muP and SP coincide (up to the two multipliers below).
    mup_base_width: int | None = None
    mup_input_mult: float = 1.0  # muP: multiplies the sum of token and position embeddings
    mup_output_mult: float = 1.0  # muP: multiplies the logits, on top of base_width / n_embd
    # Mixture of experts (chapter 08). 0: every block has the dense MLP (GPT-2). E >= 1: each block's
    # MLP becomes E expert MLPs and a router sending each token to expert_top_k of them; the loss
    # gains moe_aux_weight x the load-balancing loss (minigpt.moe).
    n_expert: int = 0
    expert_top_k: int = 2
    moe_aux_weight: float = 0.01
    # From GPT-2 to LLaMA (chapter 03). Each default is GPT-2's; LLAMA_STYLE holds LLaMA's choices.
    norm: str = "layernorm"  # "rmsnorm": divide by the root mean square, then a scale (no mean, no shift)
    mlp: str = "gelu"  # "swiglu": W_down(silu(x W_gate) * (x W_up)), three matrices
    mlp_hidden: int | None = None  # the MLP's hidden width; None: ffn_hidden's rule
    positions: str = "learned"  # "rope": rotary, on queries and keys; "none": no position signal
    rope_theta: float = 10000.0  # RoPE's base (LLaMA-2 10,000; LLaMA-3 500,000)
    rope_scaling: tuple[float, float, float, int] | None = None  # LLaMA-3.1's: see rope_frequencies
    n_kv_head: int | None = None  # key and value heads (grouped-query attention); None: n_head; 1: MQA
    head_size: int | None = None  # each head's width; None: n_embd / n_head (Qwen3 sets it apart)
    qkv_bias: bool | None = None  # biases on the queries, keys and values; None: as bias (Qwen2: on)
    qk_norm: bool = False  # RMSNorm on each head's query and key, before RoPE (Qwen3)
    tie_embeddings: bool = True  # the head reuses the token embedding (GPT-2); LLaMA: False

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            positive_int(name, getattr(self, name))
        if self.head_size is None and self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head} (or set "
                             f"head_size)")
        for name, allowed in (("norm", NORMS), ("mlp", MLPS), ("positions", POSITIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {', '.join(allowed)}")
        for name in ("mlp_hidden", "n_kv_head", "head_size"):
            if getattr(self, name) is not None:
                positive_int(name, getattr(self, name))
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}: each key-value "
                             f"head serves the same number of query heads")
        if not (isinstance(self.rope_theta, (int, float)) and 1.0 < self.rope_theta < math.inf):
            raise ValueError(f"rope_theta={self.rope_theta!r} must be a finite number greater than 1")
        if self.rope_scaling is not None:
            if self.positions != "rope":
                raise ValueError(f"rope_scaling={self.rope_scaling!r} rescales RoPE: it needs "
                                 f"positions='rope'")
            self.rope_scaling = check_rope_scaling(self.rope_scaling)
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"positions='rope' rotates pairs of dimensions: the head size {self.head_dim} "
                             f"must be even")
        for name in ("bias", "qk_norm", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")
        if self.qkv_bias is not None and not isinstance(self.qkv_bias, bool):
            raise ValueError(f"qkv_bias={self.qkv_bias!r} must be True, False or None (as bias)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if not self.layer_norm_epsilon > 0:
            raise ValueError(f"layer_norm_epsilon={self.layer_norm_epsilon} must be positive")
        base = self.mup_base_width
        if base is not None:  # None: the standard parametrisation
            positive_int("mup_base_width", base)
        for name in ("mup_input_mult", "mup_output_mult"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name}={value!r} must be positive")
            if base is None and value != 1.0:
                raise ValueError(f"{name}={value!r} is a muP multiplier: set mup_base_width too, or "
                                 f"leave it at 1.0")
        if not isinstance(self.n_expert, int) or isinstance(self.n_expert, bool) or self.n_expert < 0:
            raise ValueError(f"n_expert={self.n_expert!r} must be 0 (the dense MLP) or a positive integer")
        if self.n_expert:
            positive_int("expert_top_k", self.expert_top_k)
            if self.expert_top_k > self.n_expert:
                raise ValueError(f"expert_top_k={self.expert_top_k} must be at most n_expert="
                                 f"{self.n_expert}: a token cannot go to more experts than there are")
            if not (isinstance(self.moe_aux_weight, (int, float)) and 0 <= self.moe_aux_weight < math.inf):
                raise ValueError(f"moe_aux_weight={self.moe_aux_weight!r} must be a finite number >= 0")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head if self.head_size is None else self.head_size

    @property
    def kv_heads(self) -> int:
        """Key and value heads: ``n_kv_head``, or ``n_head`` (multi-head attention) when it is None."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def ffn_hidden(self) -> int:
        """The MLP's hidden width: ``mlp_hidden`` if set; else GPT-2's 4 n_embd for the GELU MLP, and
        for SwiGLU two thirds of that (so that its three matrices hold as many parameters as GELU's
        two), rounded up to a multiple of 32, as LLaMA rounds it up to a multiple of 256."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp == "gelu":
            return 4 * self.n_embd
        return -(-(8 * self.n_embd // 3) // 32) * 32

    @property
    def is_gpt2(self) -> bool:
        """Whether every option of the step to LLaMA is at GPT-2's value (the parallel strategies of
        chapter 08 take only such models)."""
        return _leaves_gpt2(self) is None

    @property
    def mup(self) -> bool:
        return self.mup_base_width is not None

    @property
    def width_mult(self) -> float:
        """n_embd / base width under muP (how many times wider than the base); 1 under SP."""
        base = self.mup_base_width
        return 1.0 if base is None else self.n_embd / base

    @property
    def attention_scale(self) -> float:
        """What multiplies q.k: 1/sqrt(head_dim) under SP. muP uses 1/head_dim, with the constant
        chosen so that both agree at the base width: sqrt(base_head_dim) / head_dim."""
        base = self.mup_base_width
        if base is None:
            return 1.0 / math.sqrt(self.head_dim)
        return math.sqrt(base / self.n_head) / self.head_dim


class MLP(nn.Module):
    """Position-wise feed-forward: expand (4x in GPT-2), GELU (tanh approximation, as GPT-2), project
    back."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.ffn_hidden, bias=config.bias)
        self.c_proj = nn.Linear(config.ffn_hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class SwiGLU(nn.Module):
    """LLaMA's gated MLP: ``c_proj(silu(gate) * up)``, where ``c_fc`` computes [gate | up] in one
    product (its first ``ffn_hidden`` outputs are the gate, Hugging Face's ``gate_proj``; the rest
    ``up_proj``; ``c_proj`` is ``down_proj``). Shazeer (2020, arXiv:2002.05202)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 2 * config.ffn_hidden, bias=config.bias)
        self.c_proj = nn.Linear(config.ffn_hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.c_fc(x).chunk(2, dim=-1)
        return self.dropout(self.c_proj(F.silu(gate) * up))


def make_mlp(config: GPTConfig) -> nn.Module:
    """The block's dense MLP as ``config.mlp`` says: :class:`MLP` (GELU) or :class:`SwiGLU`."""
    return SwiGLU(config) if config.mlp == "swiglu" else MLP(config)


def make_norm(config: GPTConfig) -> nn.Module:
    """LayerNorm (GPT-2: subtract the mean, divide by the standard deviation, scale and shift) or
    RMSNorm (LLaMA: divide by the root mean square, scale) over n_embd, as ``config.norm`` says."""
    eps = config.layer_norm_epsilon
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=eps)
    return nn.LayerNorm(config.n_embd, eps=eps, bias=config.bias)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config)
        rope = (RotaryEmbedding(config.head_dim, config.rope_theta, interleaved=False,
                                scaling=config.rope_scaling)
                if config.positions == "rope" else None)
        self.attn = MultiHeadAttention(config.n_embd, config.n_head, bias=config.bias,
                                       dropout=config.dropout, causal=True, use_sdpa=True, rope=rope,
                                       scale=config.attention_scale if config.mup else None,
                                       n_kv_head=config.kv_heads, qkv_bias=config.qkv_bias,
                                       head_dim=config.head_size,
                                       qk_norm_eps=config.layer_norm_epsilon if config.qk_norm else None)
        self.ln_2 = make_norm(config)
        self.mlp = MoE(config) if config.n_expert else make_mlp(config)  # MoE: E MLPs and a router

    def forward(self, x: torch.Tensor, cache=None, padding_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache=cache, key_padding_mask=padding_mask, positions=positions)
        return x + self.mlp(self.ln_2(x))


class Body(nn.Module):
    """The modules of a GPT below its head, under GPT-2's parameter names (``transformer.wte``, ...):
    token and position embeddings, dropout, the blocks ``h`` and the final LayerNorm. A container:
    :meth:`GPT.features` runs them.

    Built in: 03_gpt
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.positions == "learned":  # rotary positions act inside attention; "none" has none
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = make_norm(config)


class GPT(nn.Module):
    """GPT-2: token and position embeddings, ``n_layer`` blocks, a final LayerNorm, and a head that
    shares its weights with the token embedding.

    With ``config.mup_base_width`` set, the model follows muP (Yang et al., Tensor Programs V, 2022),
    as Cerebras-GPT did. With m = n_embd / base width: hidden matrices (everything inside the blocks)
    start with standard deviation 0.02 / sqrt(m) and learn at lr / m (:meth:`lr_multipliers`, which
    the ``Trainer`` applies); embeddings, biases and LayerNorms keep the base initialisation and
    learning rate; the embeddings' sum is multiplied by ``mup_input_mult``; the logits by
    ``mup_output_mult / m``; attention scores use 1/head_dim. At m = 1 it is the standard model.

    Built in: 03_gpt
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = Body(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # weight tying: one matrix, two uses
        self.apply(self._init_weights)
        # GPT-2: 2 n_layer residual projections add to the stream, so their weights start smaller by
        # 1/sqrt(2 n_layer): what the blocks add to the stream's variance then does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        # muP: hidden matrices start smaller by 1/sqrt(width_mult), so that sums over their n_embd
        # inputs keep the same scale at every width (scaled in place: at width_mult 1, SP exactly).
        hidden = self.lr_multipliers()
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name in hidden:
                    p.mul_(1.0 / math.sqrt(config.width_mult))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def features(self, idx: torch.Tensor, kv_cache=None, *, positions: torch.Tensor | None = None,
                 padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) token ids -> the final hidden states (B, T, n_embd), after ``ln_f``: what the head
        reads, and what a classifier built on the body (chapter 05) reads instead.

        ``kv_cache`` (a :class:`minigpt.generate.KVCache`) continues a sequence whose earlier keys and
        values it holds; this call's are appended to it. For rows that do not start at position 0
        (left-padded prompts of different lengths), ``positions`` (B, T) gives each token's position and
        ``padding_mask`` (B, S) marks with True the keys no query may attend to, S counting the cached
        positions too.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx of shape {tuple(idx.shape)} must be (B, T)")
        b, t = idx.shape
        start = 0 if kv_cache is None else kv_cache.length
        if start + t > self.config.block_size:
            raise ValueError(f"positions up to {start + t} exceed block_size={self.config.block_size}")
        if t == 0:
            raise ValueError("idx is empty: a sequence needs at least one token")
        if not torch.compiler.is_compiling():  # a compiled graph bounds-checks its gathers itself, and
            low, high = torch.aminmax(idx)  # this branch on data would split the graph in two
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(f"token ids must be in [0, {self.config.vocab_size}); got "
                                 f"{low.item()}..{high.item()}")
        if positions is not None and positions.shape != idx.shape:
            raise ValueError(f"positions of shape {tuple(positions.shape)} must match idx of shape "
                             f"{tuple(idx.shape)}")
        if padding_mask is not None and padding_mask.shape != (b, start + t):
            raise ValueError(f"padding_mask of shape {tuple(padding_mask.shape)} must be (B={b}, "
                             f"S={start + t}): one entry per key, the cached ones included")
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.config.positions == "learned":
            pos = torch.arange(start, start + t, device=idx.device) if positions is None else positions
            x = x + self.transformer.wpe(pos)
        if self.config.mup and self.config.mup_input_mult != 1.0:
            x = x * self.config.mup_input_mult
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            cache = None if kv_cache is None else (kv_cache.k[i], kv_cache.v[i], start)
            if positions is None and padding_mask is None:
                x = block(x, cache=cache)
            else:
                x = block(x, cache=cache, padding_mask=padding_mask, positions=positions)
        if kv_cache is not None:
            kv_cache.length = start + t
        return self.transformer.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache=None, *,
                positions: torch.Tensor | None = None, padding_mask: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> (logits (B, T, vocab), loss or None).

        ``targets`` (B, T) gives the mean cross-entropy, ignoring positions set to -100. ``kv_cache``,
        ``positions`` and ``padding_mask`` as in :meth:`features`.
        """
        logits = self.lm_head(self.features(idx, kv_cache, positions=positions, padding_mask=padding_mask))
        if self.config.mup:
            logits = logits * (self.config.mup_output_mult / self.config.width_mult)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
            if self.config.n_expert and self.config.moe_aux_weight:
                loss = loss + self.config.moe_aux_weight * self.moe_aux_loss()
        return logits, loss

    def moe_aux_loss(self) -> torch.Tensor:
        """The mean over blocks of the load-balancing loss of the last forward pass (each block's
        ``mlp.aux_loss``): 1 when every block routes uniformly. ``forward`` adds ``moe_aux_weight``
        times it to the loss when given targets. Only for a model with ``n_expert`` >= 1.

        Built in: 08_model_parallel
        """
        if not self.config.n_expert:
            raise ValueError("n_expert=0: a dense model has no load-balancing loss")
        losses = []
        for block in self.transformer.h:  # an MoE, or anything in its place with an aux_loss
            loss = getattr(block.mlp, "aux_loss", None)
            if not isinstance(loss, torch.Tensor):
                raise ValueError("no load-balancing loss yet: run a forward pass first")
            losses.append(loss)
        return torch.stack(losses).mean()

    def lr_multipliers(self) -> dict[str, float]:
        """Parameter name -> factor on the learning rate. Under muP the hidden matrices (the weights
        of every Linear inside the blocks) learn at lr / width_mult, because Adam's update moves each
        of their n_embd inputs by about lr, and a sum over n_embd such inputs would grow with width.
        Empty under SP (every parameter learns at lr).

        Built in: 06_scaling
        """
        if not self.config.mup:
            return {}
        m = 1.0 / self.config.width_mult
        return {name: m for name, p in self.named_parameters()
                if name.startswith("transformer.h.") and name.endswith(".weight") and p.dim() == 2}

    # -- accounting ----------------------------------------------------------------------------------
    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameters in the module (the tied head counted once); ``non_embedding`` leaves out the
        token and position embeddings, as Kaplan et al. (2020, arXiv:2001.08361) count N. Hoffmann et
        al. (2022, arXiv:2203.15556, "Chinchilla") count every parameter, and so does chapter 06.

        Built in: 03_gpt
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            for name in ("wte", "wpe"):  # a model with rotary positions (or none) has no wpe
                table = getattr(self.transformer, name, None)
                if isinstance(table, nn.Embedding):
                    n -= table.weight.numel()
        return n

    # -- Hugging Face models (minigpt.hf) -------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_model) -> GPT:
        """A GPT with the weights of a ``transformers`` causal language model: ``GPT2LMHeadModel``,
        ``LlamaForCausalLM``, ``Qwen2ForCausalLM`` or ``Qwen3ForCausalLM`` (:func:`minigpt.hf.from_hf`).

        Built in: 03_gpt
        """
        from minigpt import hf

        config, state = hf.config_and_state(hf_model)
        model = cls(config)
        model.load_state_dict(state)
        return model

    def to_hf(self):
        """A ``transformers`` model with this model's weights: ``GPT2LMHeadModel`` for a GPT-2-style
        config; for a LLaMA-style one (RMSNorm, SwiGLU, RoPE) ``LlamaForCausalLM``, or
        ``Qwen2ForCausalLM`` with biases on q, k and v only, or ``Qwen3ForCausalLM`` with ``qk_norm``.

        Built in: 03_gpt
        """
        from minigpt import hf

        return hf.to_hf(self)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike = "gpt2") -> GPT:
        """Released weights from this machine's disk, never from the network: ``name_or_path`` is a
        directory written by ``save_pretrained`` (config.json and safetensors), or a Hugging Face model
        name (``gpt2``, ``Qwen/Qwen2.5-0.5B``, ...) whose files are in the local Hugging Face cache.
        GPT-2, LLaMA, Qwen2 and Qwen3 models load, through ``transformers`` with
        ``local_files_only=True``; when the files are not there, a FileNotFoundError names what is
        missing and how to fetch it on a machine with internet access.

        Built in: 03_gpt
        """
        from minigpt import hf

        return cls.from_hf(hf.load_local(name_or_path))


# --- FLOPs --------------------------------------------------------------------------------------------

def flops_per_token(config: GPTConfig, context: int | None = None) -> dict[str, float]:
    """Matrix-multiply FLOPs per token of a forward pass over ``context`` tokens (default block_size).

    Per layer and token: the QKV projection 6C^2, scores and weighted sum 2 x 2TC (the full T x T,
    as computed, though half is masked), the output projection 2C^2, the MLP 16C^2; then the head
    2CV. Backward costs twice the forward (a gradient for the input and one for the weights of each
    matmul), so training is 3x. Left out: LayerNorm, softmax, GELU, bias adds, embedding lookups,
    which are O(C) per token, not O(C^2). With a mixture of experts (``n_expert`` > 0) each token runs
    ``expert_top_k`` expert MLPs, 16C^2 each, and the router's 2CE (chapter 08). The LLaMA options
    change the terms: with K key-value heads of size hd, the QKV projection is 2C(H + 2K)hd; a SwiGLU
    MLP of hidden width F is 6CF (GELU's is 4CF, 16C^2 at F = 4C).

    Built in: 03_gpt
    """
    t = config.block_size if context is None else context
    c, n_layer, v = config.n_embd, config.n_layer, config.vocab_size
    q_width, kv_width = config.n_head * config.head_dim, config.kv_heads * config.head_dim
    one_mlp = (6 if config.mlp == "swiglu" else 4) * c * config.ffn_hidden
    mlp = one_mlp
    if config.n_expert:
        mlp = config.expert_top_k * one_mlp + 2 * c * config.n_expert
    per_layer = 2 * c * (q_width + 2 * kv_width) + 2 * q_width * c + mlp + 4 * t * q_width
    forward = n_layer * per_layer + 2 * c * v
    return {"forward": float(forward), "training": 3.0 * forward,
            "attention_share": n_layer * 4 * t * q_width / forward}
