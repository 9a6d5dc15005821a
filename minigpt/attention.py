"""Attention: scaled dot-product attention written out, multi-head attention, recording its weights
(:func:`record_attention`), and positional encodings (learned, sinusoidal, rotary).

Conventions follow PyTorch so that results can be compared one for one:

- ``attn_mask`` is boolean (True = may attend, as in ``F.scaled_dot_product_attention``) or additive
  (a float tensor added to the scores, ``-inf`` to forbid), broadcastable to ``(..., T, S)``;
- ``key_padding_mask`` is boolean ``(B, S)`` with True = padding, ignored (as in
  ``nn.MultiheadAttention``);
- a query that may attend to no key at all gets zero weights and a zero output (as SDPA does).

Built in: 02_attention
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from minigpt.checks import positive_int


def causal_mask(t: int, s: int | None = None, device=None) -> torch.Tensor:
    """Boolean (T, S) mask, True where query i may attend to key j: j <= i (+ S - T when S > T).

    With S > T the queries are the last T positions of S (as when a cache holds earlier keys).
    """
    s = t if s is None else s
    return torch.ones(t, s, dtype=torch.bool, device=device).tril(diagonal=s - t)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() < 2 or k.dim() != q.dim() or v.dim() != q.dim():
        raise ValueError(f"q, k, v must have the same number (>= 2) of dimensions (..., T, d); got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must have the same last dimension d")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same number of keys "
                         f"(dimension -2)")
    try:
        torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except RuntimeError:
        raise ValueError(f"batch dimensions of q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         f"do not broadcast") from None


def _combined_mask(shape: torch.Size, dtype: torch.dtype, device, attn_mask, key_padding_mask,
                   is_causal: bool) -> torch.Tensor | None:
    """All masks as one additive float tensor broadcastable to scores of ``shape`` (..., T, S)."""
    t, s = shape[-2:]
    bias = None
    if attn_mask is not None:
        try:
            if torch.broadcast_shapes(attn_mask.shape, shape) != shape:
                raise RuntimeError
        except RuntimeError:
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to the "
                             f"scores' shape {tuple(shape)} (..., T={t}, S={s})") from None
        if attn_mask.dtype == torch.bool:
            bias = torch.zeros(attn_mask.shape, dtype=dtype, device=device)
            bias = bias.masked_fill(~attn_mask, float("-inf"))
        else:
            bias = attn_mask.to(dtype)
    if is_causal:
        c = torch.zeros(t, s, dtype=dtype, device=device)
        c = c.masked_fill(~causal_mask(t, s, device), float("-inf"))
        bias = c if bias is None else bias + c
    if key_padding_mask is not None:
        if (key_padding_mask.dim() != 2 or len(shape) < 3 or key_padding_mask.shape[1] != s
                or key_padding_mask.shape[0] not in (1, shape[0])):
            raise ValueError(f"key_padding_mask of shape {tuple(key_padding_mask.shape)} must be "
                             f"(B={shape[0] if len(shape) > 2 else '?'}, S={s}) for scores of shape "
                             f"{tuple(shape)}")
        pad = torch.zeros(key_padding_mask.shape, dtype=dtype, device=device)
        pad = pad.masked_fill(key_padding_mask.bool(), float("-inf"))
        # (B, S) -> (B, 1, ..., 1, S) so that it lines up with (B, [H,] T, S)
        pad = pad.view(pad.shape[0], *([1] * (len(shape) - 2)), s)
        bias = pad if bias is None else bias + pad
    return bias


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None,
                                 key_padding_mask: torch.Tensor | None = None,
                                 is_causal: bool = False, dropout_p: float = 0.0,
                                 scale: float | None = None,
                                 generator: torch.Generator | None = None,
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(d) + mask) v, written out. Returns (output, attention weights).

    Shapes: q (..., T, d), k (..., S, d), v (..., S, dv) -> output (..., T, dv), weights (..., T, S).
    Dropout (with probability ``dropout_p``, survivors scaled by 1/(1-p)) applies to the weights,
    as in GPT-2; pass ``dropout_p=0`` at evaluation.

    Built in: 02_attention
    """
    _check_qkv(q, k, v)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p={dropout_p} must be in [0, 1)")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (..., T, S)
    bias = _combined_mask(scores.shape, scores.dtype, scores.device, attn_mask, key_padding_mask, is_causal)
    if bias is not None:
        scores = scores + bias
    weights = torch.softmax(scores, dim=-1)
    if bias is not None:  # a row with no allowed key: softmax gives NaN; SDPA gives zeros
        weights = weights.masked_fill(torch.isinf(scores).all(dim=-1, keepdim=True), 0.0)
    if dropout_p > 0.0:
        keep = torch.rand(weights.shape, generator=generator, device=weights.device) >= dropout_p
        weights = weights * keep / (1.0 - dropout_p)
    return weights @ v, weights


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention in GPT-2's layout.

    ``c_attn`` is one fused projection to queries, keys and values (in that order along its output),
    ``c_proj`` projects the merged heads back. With ``use_sdpa=True`` the core runs in
    ``F.scaled_dot_product_attention`` (:meth:`core`: faster, the same result up to rounding); while
    :func:`record_attention` is active the written-out core runs instead, so that its weights can be
    kept.

    Built in: 02_attention
    """

    def __init__(self, n_embd: int, n_head: int, bias: bool = True, dropout: float = 0.0,
                 causal: bool = True, use_sdpa: bool = True, rope: RotaryEmbedding | None = None,
                 scale: float | None = None, n_kv_head: int | None = None, qkv_bias: bool | None = None,
                 head_dim: int | None = None, qk_norm_eps: float | None = None):
        super().__init__()
        positive_int("n_embd", n_embd)
        positive_int("n_head", n_head)
        if head_dim is None and n_embd % n_head != 0:
            raise ValueError(f"n_embd={n_embd} must be a positive multiple of n_head={n_head}")
        head_dim = n_embd // n_head if head_dim is None else positive_int("head_dim", head_dim)
        n_kv_head = n_head if n_kv_head is None else positive_int("n_kv_head", n_kv_head)
        if n_head % n_kv_head:
            raise ValueError(f"n_kv_head={n_kv_head} must divide n_head={n_head}: each key-value head "
                             f"serves the same number of query heads")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
        if rope is not None and rope.head_dim != head_dim:
            raise ValueError(f"rope.head_dim={rope.head_dim} must equal the head size {head_dim}")
        self.n_embd, self.n_head, self.head_dim, self.n_kv_head = n_embd, n_head, head_dim, n_kv_head
        # one fused projection: the queries of n_head heads, then the keys and the values of n_kv_head
        self.c_attn = nn.Linear(n_embd, (n_head + 2 * n_kv_head) * head_dim,
                                bias=bias if qkv_bias is None else qkv_bias)
        self.c_proj = nn.Linear(n_head * head_dim, n_embd, bias=bias)
        # Qwen3: each head's query and key are RMS-normalised (one scale of head_dim shared by the heads)
        self.q_norm = self.k_norm = None
        if qk_norm_eps is not None:
            self.q_norm = nn.RMSNorm(head_dim, eps=qk_norm_eps)
            self.k_norm = nn.RMSNorm(head_dim, eps=qk_norm_eps)
        self.dropout, self.causal, self.use_sdpa, self.rope = dropout, causal, use_sdpa, rope
        self.scale = scale  # None: 1/sqrt(head_dim); muP (chapter 06) uses 1/head_dim
        self.resid_dropout = nn.Dropout(dropout)
        self.recorded: list[torch.Tensor] | None = None  # set by record_attention

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, hd)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, h, t, d = x.shape
        return x.transpose(1, 2).contiguous().view(b, t, h * d)  # (B, T, H hd): C unless head_dim is set

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float,
             attn_mask: torch.Tensor | None = None,
             key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention's core by ``F.scaled_dot_product_attention``: q (B, H, T, hd), k and v (B, H, S, hd)
        -> (B, H, T, hd), the queries being the last T of the S positions. On a CPU under bf16 autocast
        it runs in float32 up to :data:`FLOAT32_CORE_UP_TO` keys, where that is faster."""
        t, s = q.shape[-2], k.shape[-2]
        causal = self.causal and t > 1  # a single query (the newest position) may see every key
        with _core_precision(q, s) as dtype:
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
            if attn_mask is None and key_padding_mask is None and (not causal or t == s):
                return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=causal,
                                                      scale=self.scale)
            shape = torch.Size((*q.shape[:-1], s))
            mask = _combined_mask(shape, q.dtype, q.device, attn_mask, key_padding_mask, self.causal)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                  scale=self.scale)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None,
                cache: tuple[torch.Tensor, torch.Tensor, int] | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C).

        ``cache`` is ``(k_buffer, v_buffer, start)`` with buffers (B, n_kv_head, max_len, head_dim): this
        call's keys and values are written at positions start..start+T-1, and the queries attend to
        every position up to their own (chapter 03's KV cache). ``positions`` (B, T), for RoPE, is each
        token's position when it is not its index (left-padded prompts); default start..start+T-1.
        """
        if x.dim() != 3 or x.shape[-1] != self.n_embd:
            raise ValueError(f"x of shape {tuple(x.shape)} must be (B, T, n_embd={self.n_embd})")
        b, t, _ = x.shape
        h, kv, d = self.n_head, self.n_kv_head, self.head_dim
        if kv == h:
            # one view of the fused projection, (B, T, 3, H, hd) -> (3, B, H, T, hd): the same q, k, v (with
            # the same strides) as splitting it in three and applying split_heads to each, in 3
            # operations instead of 10, which a decoding step runs once per layer and token
            q, k, v = self.c_attn(x).view(b, t, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        else:  # grouped-query attention: fewer key and value heads than query heads
            q, k, v = self.c_attn(x).split([h * d, kv * d, kv * d], dim=2)
            q = q.view(b, t, h, d).transpose(1, 2)
            k, v = k.view(b, t, kv, d).transpose(1, 2), v.view(b, t, kv, d).transpose(1, 2)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        start = 0
        if cache is not None:
            k_buf, v_buf, start = cache
            end = start + t
            if end > k_buf.shape[2]:
                raise ValueError(f"the cache holds {k_buf.shape[2]} positions; {end} are needed")
        if self.rope is not None:
            q = self.rope(q, offset=start, positions=positions)
            k = self.rope(k, offset=start, positions=positions)
        if cache is not None:
            k_buf[:, :, start:end], v_buf[:, :, start:end] = k, v
            k, v = k_buf[:, :, :end], v_buf[:, :, :end]
        if kv != h:  # each key-value head serves h / kv query heads, neighbours in order (as transformers)
            k, v = k.repeat_interleave(h // kv, dim=1), v.repeat_interleave(h // kv, dim=1)
        p = self.dropout if self.training else 0.0
        if self.use_sdpa and self.recorded is None:
            y = self.core(q, k, v, p, attn_mask, key_padding_mask)
        else:
            y, weights = scaled_dot_product_attention(q, k, v, attn_mask, key_padding_mask,
                                                      is_causal=self.causal, dropout_p=p, scale=self.scale)
            if self.recorded is not None:
                self.recorded.append(weights.detach())
        y = self.c_proj(self.merge_heads(y))
        return self.resid_dropout(y) if self.training else y  # dropout is the identity at evaluation


# Under bf16 autocast on a CPU, torch's fused attention kernel is slow at short contexts: forward
# and backward of causal attention over (12 windows, 4 heads, 64 positions, head size 32) took 7.5 ms
# in bf16 against 1.8 ms for the same kernel in float32 (and 3.3 ms for attention composed of matrix
# products and a softmax), on one core of an AVX512-BF16 CPU. Float32 stayed ahead up to 256 positions
# (39.5 against 46.8 ms at 256, head size 64), was within 4% at 512 (76 against 73 ms) and fell behind
# at 1024 (225 against 183).
FLOAT32_CORE_UP_TO = 512


@contextmanager
def _core_precision(q: torch.Tensor, s: int) -> Iterator[torch.dtype]:
    """The dtype the attention core runs in, with autocast off while it runs if that is float32: on a CPU
    under bf16 autocast with at most :data:`FLOAT32_CORE_UP_TO` keys, float32 (faster there, see the
    constant); elsewhere the dtype of ``q``, as autocast made it."""
    if (q.device.type == "cpu" and q.dtype == torch.bfloat16 and s <= FLOAT32_CORE_UP_TO
            and torch.is_autocast_enabled("cpu")):
        with torch.autocast("cpu", enabled=False):
            yield torch.float32
    else:
        yield q.dtype


@contextmanager
def record_attention(model: nn.Module) -> Iterator[list[list[torch.Tensor]]]:
    """Keep the attention weights of every :class:`MultiHeadAttention` in ``model`` while active.

    Yields a list with one entry per attention module, in module order (layer 0 first); each entry is
    the list of weight tensors (B, H, T, S) from the forward passes made inside the block.

    Built in: 02_attention
    """
    modules = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    if not modules:
        raise ValueError(f"{type(model).__name__} contains no MultiHeadAttention module to record")
    maps: list[list[torch.Tensor]] = [[] for _ in modules]
    for m, store in zip(modules, maps):
        m.recorded = store
    try:
        yield maps
    finally:
        for m in modules:
            m.recorded = None


# --- positions --------------------------------------------------------------------------------------

class LearnedPositions(nn.Module):
    """A learned vector per position (GPT-2): ``forward(t)`` returns (T, n_embd).

    Built in: 02_attention
    """

    def __init__(self, block_size: int, n_embd: int):
        super().__init__()
        self.block_size = block_size
        self.wpe = nn.Embedding(block_size, n_embd)

    def forward(self, t: int, offset: int = 0) -> torch.Tensor:
        if not 0 < t + offset <= self.block_size:
            raise ValueError(f"positions {offset}..{offset + t - 1} exceed block_size={self.block_size}")
        return self.wpe(torch.arange(offset, offset + t, device=self.wpe.weight.device))


def sinusoidal_positions(t: int, d: int, base: float = 10000.0) -> torch.Tensor:
    """The Transformer's fixed encoding: (T, d) with sin in even and cos in odd columns.

    PE[p, 2i] = sin(p / base^(2i/d)), PE[p, 2i+1] = cos(p / base^(2i/d)).

    Built in: 02_attention
    """
    if d % 2:
        raise ValueError(f"d={d} must be even for sinusoidal positions")
    pos = torch.arange(t, dtype=torch.float64)[:, None]
    freq = rope_frequencies(d, base)  # RoPE rotates by the same frequencies
    pe = torch.zeros(t, d, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)
    return pe.float()


def rope_frequencies(head_dim: int, base: float = 10000.0,
                     scaling: tuple[float, float, float, int] | None = None) -> torch.Tensor:
    """RoPE's angular frequencies, one per pair of dimensions: base^(-2i/d), in float64.

    ``scaling`` = (factor, low_freq_factor, high_freq_factor, context) is LLaMA-3.1's rescaling, which
    stretches a model pretrained on ``context`` positions to a longer one. It counts the turns each
    pair makes over that context (context / wavelength): a pair making fewer than low_freq_factor
    turns is slowed ``factor`` times (its angles stretch over the longer context), one making more
    than high_freq_factor turns is kept (it encodes nearby order, which a longer context does not
    change), and one in between blends the two linearly in its number of turns.

    Built in: 03_gpt
    """
    freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling is None:
        return freq
    factor, low, high, context = check_rope_scaling(scaling)
    turns = context * freq / (2 * math.pi)
    keep = ((turns - low) / (high - low)).clamp(0.0, 1.0)  # 0: slowed fully, 1: kept
    return keep * freq + (1 - keep) * freq / factor


def check_rope_scaling(scaling) -> tuple[float, float, float, int]:
    """``scaling`` as (factor, low_freq_factor, high_freq_factor, context), or a ValueError naming it."""
    valid = ("(factor, low_freq_factor, high_freq_factor, context) with factor >= 1, "
             "0 < low_freq_factor < high_freq_factor and context a positive integer")
    try:
        factor, low, high, context = scaling
        ok = (all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                  for v in (factor, low, high)) and factor >= 1 and 0 < low < high
              and isinstance(context, int) and not isinstance(context, bool) and context > 0)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"rope_scaling={scaling!r} must be {valid}")
    return float(factor), float(low), float(high), context


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE): rotate pairs of a head's dimensions, pair i by the angle
    p * base^(-2i/d) at position p (``scaling``: LLaMA-3.1's rescaled frequencies, see
    :func:`rope_frequencies`).

    Applied to queries and keys, it makes the score q_m . k_n depend on the positions only through
    m - n. ``forward(x, offset)`` takes (..., T, head_dim) with positions offset..offset+T-1, or
    ``positions`` (B, T) for x (B, H, T, head_dim). ``interleaved=True`` pairs neighbours (x[2i],
    x[2i+1]), as the RoPE paper and Meta's LLaMA code write it; ``False`` pairs x[i] with x[i + d/2],
    as Hugging Face's LLaMA and Qwen do. The two are the same rotation in a reordered basis, so a
    model trained with one runs with the other once its query and key rows are permuted.

    Built in: 02_attention (interleaved), 03_gpt (half-split, for LLaMA-style models)
    """

    inv_freq: torch.Tensor  # (head_dim / 2,) a buffer

    def __init__(self, head_dim: int, base: float = 10000.0, interleaved: bool = True,
                 scaling: tuple[float, float, float, int] | None = None):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim={head_dim} must be even for RoPE")
        if not (isinstance(base, (int, float)) and 1.0 < base < math.inf):
            raise ValueError(f"base={base!r} must be a finite number greater than 1")
        self.head_dim, self.base, self.interleaved, self.scaling = head_dim, base, interleaved, scaling
        self.register_buffer("inv_freq", rope_frequencies(head_dim, base, scaling), persistent=False)

    def angles(self, t: int, offset: int = 0) -> torch.Tensor:
        pos = torch.arange(offset, offset + t, dtype=torch.float64, device=self.inv_freq.device)
        return pos[:, None] * self.inv_freq[None, :]  # (T, head_dim / 2)

    def forward(self, x: torch.Tensor, offset: int = 0,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"x of shape {tuple(x.shape)} must end in head_dim={self.head_dim}")
        if positions is None:
            theta = self.angles(x.shape[-2], offset)
        else:  # (B, T) -> (B, 1, T, head_dim / 2): one set of angles per row, shared by its heads
            if x.dim() != 4 or positions.shape != (x.shape[0], x.shape[2]):
                raise ValueError(f"positions of shape {tuple(positions.shape)} must be (B, T) for x of shape "
                                 f"{tuple(x.shape)} (B, H, T, head_dim)")
            theta = positions.to(torch.float64)[:, None, :, None] * self.inv_freq
        cos, sin = theta.cos().to(x.dtype), theta.sin().to(x.dtype)
        if self.interleaved:
            even, odd = x[..., 0::2], x[..., 1::2]
            out = torch.empty_like(x)
            out[..., 0::2] = even * cos - odd * sin
            out[..., 1::2] = even * sin + odd * cos
            return out
        first, second = x.chunk(2, dim=-1)
        return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)
