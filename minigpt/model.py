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

from minigpt.attention import MultiHeadAttention
from minigpt.checks import positive_int
from minigpt.moe import MoE


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

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            positive_int(name, getattr(self, name))
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
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
        return self.n_embd // self.n_head

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
    """Position-wise feed-forward: expand 4x, GELU (tanh approximation, as GPT-2), project back."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=eps, bias=config.bias)
        self.attn = MultiHeadAttention(config.n_embd, config.n_head, bias=config.bias,
                                       dropout=config.dropout, causal=True, use_sdpa=True,
                                       scale=config.attention_scale if config.mup else None)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=eps, bias=config.bias)
        self.mlp = MoE(config) if config.n_expert else MLP(config)  # MoE: E MLPs and a router

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache=cache)
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
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)


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

    def features(self, idx: torch.Tensor, kv_cache=None) -> torch.Tensor:
        """idx (B, T) token ids -> the final hidden states (B, T, n_embd), after ``ln_f``: what the head
        reads, and what a classifier built on the body (chapter 05) reads instead.

        ``kv_cache`` (a :class:`minigpt.generate.KVCache`) continues a sequence whose earlier keys and
        values it holds; this call's are appended to it.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx of shape {tuple(idx.shape)} must be (B, T)")
        b, t = idx.shape
        start = 0 if kv_cache is None else kv_cache.length
        if start + t > self.config.block_size:
            raise ValueError(f"positions up to {start + t} exceed block_size={self.config.block_size}")
        if t == 0:
            raise ValueError("idx is empty: a sequence needs at least one token")
        low, high = torch.aminmax(idx)  # one pass over the ids, and one wait for the device
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}); got "
                             f"{low.item()}..{high.item()}")
        pos = torch.arange(start, start + t, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        if self.config.mup and self.config.mup_input_mult != 1.0:
            x = x * self.config.mup_input_mult
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            cache = None if kv_cache is None else (kv_cache.k[i], kv_cache.v[i], start)
            x = block(x, cache=cache)
        if kv_cache is not None:
            kv_cache.length = start + t
        return self.transformer.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache=None,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> (logits (B, T, vocab), loss or None).

        ``targets`` (B, T) gives the mean cross-entropy, ignoring positions set to -100. ``kv_cache``
        as in :meth:`features`.
        """
        logits = self.lm_head(self.features(idx, kv_cache))  # (B, T, vocab)
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
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n

    # -- Hugging Face GPT-2 ----------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_model) -> GPT:
        """A GPT with the weights of a ``transformers`` ``GPT2LMHeadModel`` (Conv1D weights transposed).

        Built in: 03_gpt
        """
        c = hf_model.config
        if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"activation_function={c.activation_function!r}: minigpt's MLP uses GELU "
                             f"with the tanh approximation ('gelu_new')")
        config = GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer,
                           n_head=c.n_head, n_embd=c.n_embd, dropout=0.0, bias=True,
                           layer_norm_epsilon=c.layer_norm_epsilon)
        model = cls(config)
        model.load_state_dict(_hf_to_minigpt(hf_model.state_dict()))
        return model

    def to_hf(self):
        """A ``transformers`` ``GPT2LMHeadModel`` with this model's weights.

        Built in: 03_gpt
        """
        from transformers import GPT2Config, GPT2LMHeadModel

        c = self.config
        if c.n_expert:
            raise ValueError(f"n_expert={c.n_expert}: a mixture of experts has no GPT-2 equivalent")
        if not c.bias:
            raise ValueError("bias=False has no GPT-2 equivalent: GPT-2 has biases everywhere")
        if c.mup:
            raise ValueError(f"mup_base_width={c.mup_base_width}: a muP model has no GPT-2 equivalent "
                             f"(its multipliers and attention scale differ)")
        eos = c.vocab_size - 1
        hf = GPT2LMHeadModel(GPT2Config(
            vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
            n_head=c.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            layer_norm_epsilon=c.layer_norm_epsilon, activation_function="gelu_new",
            bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=True))
        missing, unexpected = hf.load_state_dict(_minigpt_to_hf(self.state_dict()), strict=False)
        leftover = [k for k in missing if k != "lm_head.weight"] + list(unexpected)
        if leftover:
            raise RuntimeError(f"weights did not line up with GPT2LMHeadModel: {leftover[:5]}")
        hf.tie_weights()
        return hf.eval()

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike = "gpt2") -> GPT:
        """GPT-2 weights from this machine's disk, never from the network: ``name_or_path`` is a
        directory written by ``save_pretrained``, or a Hugging Face model name (``gpt2``,
        ``gpt2-medium``, ...) whose weights are in the local Hugging Face cache. Loaded through
        ``transformers`` with ``local_files_only=True``; when they are not there, a FileNotFoundError
        names what is missing and how to fetch it on a machine with internet access.

        Built in: 03_gpt
        """
        try:
            from transformers import GPT2LMHeadModel
        except ImportError:
            raise ImportError("GPT.from_pretrained needs the transformers package") from None
        text = os.path.expanduser(os.fspath(name_or_path))
        # a path, or a model name ("name" or "owner/name": no leading / . ~ and one / at most)
        is_path = (isinstance(name_or_path, os.PathLike) or os.path.isdir(text)
                   or text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text)
        if is_path and not os.path.isdir(text):
            raise FileNotFoundError(f"no directory {text!r}: pass a directory written by save_pretrained")
        try:
            hf = GPT2LMHeadModel.from_pretrained(text, local_files_only=True)
        except (OSError, ValueError) as e:  # transformers: files missing, or not a valid model name
            raise FileNotFoundError(_missing_weights(text, is_path, e)) from None
        return cls.from_hf(hf)


def _missing_weights(name_or_path: str, is_path: bool, error: Exception) -> str:
    """What from_pretrained could not find, and how to get it without downloading at run time."""
    if is_path:
        return (f"{name_or_path!r} holds no GPT-2 model (a save_pretrained directory has config.json and "
                f"model.safetensors): {type(error).__name__}: {str(error)[:200]}")
    from huggingface_hub.constants import HF_HUB_CACHE

    return (f"{name_or_path!r} is not in the local Hugging Face cache ({HF_HUB_CACHE}), and minigpt never "
            f"downloads. On a machine with internet access run `python -c \"from transformers import "
            f"GPT2LMHeadModel; GPT2LMHeadModel.from_pretrained('{name_or_path}')\"`, then copy that "
            f"machine's Hugging Face cache here (or point HF_HOME at it); or pass a directory written by "
            f"GPT2LMHeadModel.save_pretrained")


# Hugging Face's GPT-2 uses Conv1D layers, whose weight is (in, out): the transpose of nn.Linear's.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _hf_to_minigpt(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if k.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers in older versions
            continue
        out[k] = v.t() if k.endswith(_CONV1D) else v
    out.setdefault("lm_head.weight", out["transformer.wte.weight"])
    return out


def _minigpt_to_hf(sd: dict) -> dict:
    return {k: (v.t() if k.endswith(_CONV1D) else v) for k, v in sd.items()}


# --- FLOPs --------------------------------------------------------------------------------------------

def flops_per_token(config: GPTConfig, context: int | None = None) -> dict[str, float]:
    """Matrix-multiply FLOPs per token of a forward pass over ``context`` tokens (default block_size).

    Per layer and token: the QKV projection 6C^2, scores and weighted sum 2 x 2TC (the full T x T,
    as computed, though half is masked), the output projection 2C^2, the MLP 16C^2; then the head
    2CV. Backward costs twice the forward (a gradient for the input and one for the weights of each
    matmul), so training is 3x. Left out: LayerNorm, softmax, GELU, bias adds, embedding lookups,
    which are O(C) per token, not O(C^2). With a mixture of experts (``n_expert`` > 0) each token runs
    ``expert_top_k`` expert MLPs, 16C^2 each, and the router's 2CE (chapter 08).

    Built in: 03_gpt
    """
    t = config.block_size if context is None else context
    c, n_layer, v = config.n_embd, config.n_layer, config.vocab_size
    mlp = 16 * c * c
    if config.n_expert:
        mlp = config.expert_top_k * 16 * c * c + 2 * c * config.n_expert
    per_layer = 8 * c * c + mlp + 4 * t * c
    forward = n_layer * per_layer + 2 * c * v
    return {"forward": float(forward), "training": 3.0 * forward,
            "attention_share": n_layer * 4 * t * c / forward}
