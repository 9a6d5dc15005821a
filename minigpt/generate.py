"""Decoding a GPT: :func:`sample_next` picks each next token (greedy, temperature, top-k, top-p) for
every decoding loop in minigpt, and :func:`generate` continues prompts with a preallocated KV cache.

The arguments mirror the familiar ``model.generate(input_ids, max_length=100, temperature=0.7,
num_return_sequences=5)``: ``max_length`` counts the prompt, ``max_new_tokens`` does not.

Built in: 03_gpt
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import cast

import torch
from torch import nn

from minigpt.checks import positive_int
from minigpt.model import GPT


class KVCache:
    """Keys and values of every layer for the positions seen so far, in buffers allocated once.

    ``k[layer]`` and ``v[layer]`` are (B, K, max_len, head_dim), K the key-value heads (``n_head``, or
    fewer under grouped-query attention: that is what it saves); ``length`` is how many positions are
    filled. Each forward pass with the cache writes its new positions and attends to all filled ones,
    so a new token costs one position's work instead of the whole sequence's.

    Built in: 03_gpt
    """

    def __init__(self, model: GPT, batch_size: int, max_len: int | None = None):
        c = model.config
        max_len = c.block_size if max_len is None else max_len
        if not 0 < max_len <= c.block_size:
            raise ValueError(f"max_len={max_len} must be in [1, block_size={c.block_size}]")
        p = model.lm_head.weight
        shape = (c.n_layer, batch_size, c.kv_heads, max_len, c.head_dim)
        self.k = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.v = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Scale by 1/temperature, then keep the ``top_k`` largest and the smallest set whose probability
    reaches ``top_p`` (the nucleus); everything else becomes -inf. ``logits`` is (..., vocab).

    Built in: 03_gpt
    """
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def check_sampling(temperature: float, top_k: int | None = None, top_p: float | None = None) -> None:
    """ValueError naming the first setting that cannot be used: a temperature that is negative, NaN
    or infinite, a ``top_k`` that is not a positive integer, a ``top_p`` outside (0, 1].

    Built in: 03_gpt
    """
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 (0 means greedy)")
    if top_k is not None:
        positive_int("top_k", top_k)
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p={top_p!r} must be a number in (0, 1]")  # NaN and inf fail the test too


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each row of ``logits`` (B, vocab): the most likely one if ``temperature``
    is 0, otherwise a draw from the softmax of :func:`filter_logits` with ``generator``. Returns (B,)
    token ids. Every decoding loop in minigpt picks its tokens here.

    Built in: 03_gpt
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _check(temperature, top_k, top_p, num_return_sequences, max_new_tokens) -> None:
    check_sampling(temperature, top_k, top_p)
    positive_int("num_return_sequences", num_return_sequences)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")


@contextmanager
def _column_major(model: nn.Module) -> Iterator[None]:
    """While active, every ``nn.Linear`` weight of ``model`` is stored transposed in memory: the same
    (out, in) matrix with the same numbers, laid out column by column. Restored on exit.

    Decoding one sequence multiplies each weight matrix by one vector per token, so a step takes as
    long as the weights take to stream from memory. On the AMD EPYC this book is measured on, torch's
    matrix library (MKL) runs that product close to memory speed when the matrix is (in, out)-contiguous,
    the layout of GPT-2's original Conv1D layers, and at a fraction of it on ``nn.Linear``'s (out, in)
    rows (bench/bench_generate.py times both for a 50257 x 384 head). The products' sums run in another
    order, so they round differently, by about 1e-7 of the logits' size; they are the products
    ``transformers``' GPT-2 computes in its Conv1D blocks. Costs one copy of the matrices while active;
    a tied weight is one tensor, copied once, and stays tied.
    """
    saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in saved:
            w = module.weight
            saved[id(w)] = (w, w.data)
            w.data = w.data.t().contiguous().t()
    try:
        yield
    finally:
        for w, data in saved.values():
            w.data = data


def _prefill(model: GPT, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
    """Empty ``cache`` and fill it with all of ``tokens`` (B, T) but the last, which is returned (B, 1)
    for the next step: its logits are the only ones needed, so the head runs on one position, not T."""
    cache.length = 0
    if tokens.shape[1] > 1:
        model.features(tokens[:, :-1], kv_cache=cache)
    return tokens[:, -1:]


def _choose(logits: torch.Tensor, pick: Callable[[torch.Tensor], torch.Tensor], stop: torch.Tensor,
            done: torch.Tensor, pad: int) -> torch.Tensor:
    """The next token of each row from its last position's logits (B, T, vocab): ``pad`` for a row
    already stopped; ``done`` (B,) is updated in place for the rows that emit a stop token."""
    nxt = pick(logits[:, -1, :].float())
    if stop.numel():
        nxt = torch.where(done, pad, nxt)
        done |= torch.isin(nxt, stop)
    return nxt


def _decode(model: GPT, idx: torch.Tensor, max_new_tokens: int, pick: Callable[[torch.Tensor], torch.Tensor],
            stop: torch.Tensor, pad: int, use_cache: bool) -> torch.Tensor:
    """The decoding loop of :func:`generate`: ``idx`` (B, T) followed by up to ``max_new_tokens``
    tokens, each chosen by ``pick`` from the last position's logits (B, vocab)."""
    b, t0 = idx.shape
    block = model.config.block_size
    out = torch.empty(b, t0 + max_new_tokens, dtype=torch.long, device=idx.device)  # written in place
    out[:, :t0] = idx
    done = torch.zeros(b, dtype=torch.bool, device=idx.device)
    cache, pending = None, out[:, max(0, t0 - block):t0]
    if use_cache:
        cache = KVCache(model, b, min(block, pending.shape[1] + max_new_tokens))
        pending = _prefill(model, cache, pending)
    for pos in range(t0, t0 + max_new_tokens):
        window = out[:, max(0, pos - block):pos]
        if cache is None:
            pending = window  # no cache: every step recomputes the whole window
        elif cache.length + pending.shape[1] > block:
            pending = _prefill(model, cache, window)  # full: recompute the last block_size positions
        out[:, pos] = _choose(model(pending, kv_cache=cache)[0], pick, stop, done, pad)
        pending = out[:, pos:pos + 1]
        if stop.numel() and done.all():  # the only host synchronisation per token, and only with stops
            return out[:, :pos + 1]
    return out


def _decode_padded(model: GPT, idx: torch.Tensor, padding: torch.Tensor, max_new_tokens: int,
                   pick: Callable[[torch.Tensor], torch.Tensor], stop: torch.Tensor, pad: int,
                   use_cache: bool) -> torch.Tensor:
    """:func:`_decode` for left-padded prompts: ``padding`` (B, T) is True at the padding. A row's
    tokens take positions 0, 1, ... from its first real token on, and no query attends to padding, so
    each row computes what it would alone (up to rounding: its products run in a larger batch)."""
    b, t0 = idx.shape
    total = t0 + max_new_tokens
    if total > model.config.block_size:
        raise ValueError(f"prompts padded to {t0} tokens plus max_new_tokens={max_new_tokens} exceed "
                         f"block_size={model.config.block_size}: a padded batch does not slide its window; "
                         f"generate such prompts one at a time")
    out = torch.full((b, total), pad, dtype=torch.long, device=idx.device)
    out[:, :t0] = idx
    keys = torch.zeros(b, total, dtype=torch.bool, device=idx.device)  # True: padding, never attended to
    keys[:, :t0] = padding
    positions = ((~keys).long().cumsum(1) - 1).clamp(min=0)  # each row counts from its first token
    done = torch.zeros(b, dtype=torch.bool, device=idx.device)
    cache = KVCache(model, b, total) if use_cache else None
    for pos in range(t0, total):
        cols = slice(0 if cache is None else cache.length, pos)  # without a cache, the whole prefix
        logits, _ = model(out[:, cols], kv_cache=cache, positions=positions[:, cols],
                          padding_mask=keys[:, :pos])
        out[:, pos] = _choose(logits, pick, stop, done, pad)
        if stop.numel() and done.all():
            return out[:, :pos + 1]
    return out


def _prompts(input_ids, attention_mask, pad: int, device) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """(ids (B, T), padding (B, T) True at left padding or None, whether the prompts came as a list)."""
    if isinstance(input_ids, torch.Tensor) or not isinstance(input_ids, Sequence) or not input_ids or \
            not all(isinstance(p, (Sequence, torch.Tensor)) and not isinstance(p, str) for p in input_ids):
        try:
            idx = torch.as_tensor(input_ids, dtype=torch.long, device=device)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"input_ids must be a prompt (a list of token ids), a list of prompts (of any "
                             f"lengths) or a (B, T) tensor; got {type(input_ids).__name__} ({e})") from None
        if attention_mask is None:
            return idx, None, False
        mask = torch.as_tensor(attention_mask, device=device)
        if mask.shape != idx.shape or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"attention_mask of shape {tuple(mask.shape)} must be 0s and 1s of input_ids' "
                             f"shape {tuple(idx.shape)}")
        mask = mask.bool()
        if bool((mask[:, :-1] & ~mask[:, 1:]).any()) or not bool(mask[:, -1].all()):
            raise ValueError("attention_mask must pad on the left (each row: 0s, then 1s to the end); a row "
                             "with padding on its right or in its middle cannot be continued")
        return idx, (~mask if not bool(mask.all()) else None), False
    if attention_mask is not None:
        raise ValueError("a list of prompts is padded here: pass attention_mask only with a (B, T) tensor")
    rows = []
    for i, p in enumerate(input_ids):
        row = torch.as_tensor(p, dtype=torch.long, device=device) if len(p) else None
        if row is None or row.dim() != 1:
            raise ValueError(f"prompt {i} must be a non-empty list of token ids; got "
                             f"{'nothing' if row is None else f'shape {tuple(row.shape)}'}")
        rows.append(row)
    t = max(len(r) for r in rows)
    idx = torch.full((len(rows), t), pad, dtype=torch.long, device=device)
    padding = torch.ones(len(rows), t, dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        idx[i, t - len(r):], padding[i, t - len(r):] = r, False
    return idx, (padding if bool(padding.any()) else None), True


@torch.inference_mode()
def generate(model: GPT, input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
             max_new_tokens: int | None = None,
             *, max_length: int | None = None, do_sample: bool = True, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, num_return_sequences: int = 1,
             stop_tokens: Iterable[int] = (), pad_token_id: int | None = None,
             generator: torch.Generator | None = None, use_cache: bool = True,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor | list[torch.Tensor]:
    """Continue ``input_ids`` (a list of ids, or a (B, T) tensor) and return prompt + continuation.

    Prompts of different lengths come as a list of lists of ids, and then the result is a list of
    1-D tensors, each prompt followed by its continuation (up to and including its stop token); or as
    a (B, T) tensor padded on the left with ``attention_mask`` (1 for a token, 0 for padding, as in
    ``transformers``), and then the result is that tensor continued. Either way each row gets the
    tokens it would get alone: its positions count from its first token and nothing attends to the
    padding. Such a batch must fit in ``block_size`` with its new tokens.

    ``do_sample=False`` or ``temperature=0`` picks the most likely token (greedy). A sequence that
    emits one of ``stop_tokens`` stops there; it is padded with ``pad_token_id`` (default: that stop
    token) while the others go on. Prompts longer than ``block_size`` keep their last ``block_size``
    tokens. With ``use_cache`` the keys and values of earlier positions are kept in a :class:`KVCache`;
    once the sequence fills ``block_size``, each step recomputes the last ``block_size`` positions.
    While it runs, the model's weight matrices are stored column by column, which makes each
    matrix-vector product faster on this book's CPUs (see ``_column_major``).

    Built in: 03_gpt
    """
    if max_new_tokens is None and max_length is None:
        raise ValueError("give max_new_tokens or max_length")
    pad = pad_token_id if pad_token_id is not None else (min(stop_tokens) if stop_tokens else 0)
    idx, padding, as_list = _prompts(input_ids, attention_mask, pad, model.lm_head.weight.device)
    if idx.dim() == 1:
        idx = idx[None]
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f"input_ids of shape {tuple(idx.shape)} must be a non-empty prompt (T,) or (B, T)")
    vocab = model.config.vocab_size
    if idx.min() < 0 or idx.max() >= vocab:
        raise ValueError(f"input_ids must be token ids in [0, {vocab}); got {idx.min().item()}.."
                         f"{idx.max().item()}")
    if max_new_tokens is None:
        max_new_tokens = cast(int, max_length) - idx.shape[1]  # one of the two was given (checked above)
    greedy = not do_sample or temperature == 0
    _check(temperature, top_k, top_p, num_return_sequences, max_new_tokens)
    stop = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=idx.device)
    if stop.numel() and (stop.min() < 0 or stop.max() >= vocab):
        raise ValueError(f"stop_tokens must be token ids in [0, {vocab})")
    t = 0.0 if greedy else temperature

    def pick(logits: torch.Tensor) -> torch.Tensor:
        return sample_next(logits, t, top_k, top_p, generator)

    idx = idx.repeat_interleave(num_return_sequences, dim=0)
    if padding is not None:
        padding = padding.repeat_interleave(num_return_sequences, dim=0)
    out = idx
    if max_new_tokens > 0:
        was_training = model.training
        model.eval()
        try:
            with _column_major(model):
                out = (_decode(model, idx, max_new_tokens, pick, stop, pad, use_cache) if padding is None else
                       _decode_padded(model, idx, padding, max_new_tokens, pick, stop, pad, use_cache))
        finally:
            model.train(was_training)
    if not as_list:
        return out
    rows = []
    for i, row in enumerate(out):
        start, t0 = (0 if padding is None else int(padding[i].sum())), idx.shape[1]
        new = row[t0:]
        stops = torch.isin(new, stop).nonzero()
        rows.append(torch.cat([row[start:t0], new[:int(stops[0]) + 1] if len(stops) else new]))
    return rows
