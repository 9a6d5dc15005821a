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

    ``k[layer]`` and ``v[layer]`` are (B, H, max_len, head_dim); ``length`` is how many positions are
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
        shape = (c.n_layer, batch_size, c.n_head, max_len, c.head_dim)
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
        logits, _ = model(pending, kv_cache=cache)
        nxt = pick(logits[:, -1, :].float())
        if stop.numel():
            nxt = torch.where(done, pad, nxt)
            done |= torch.isin(nxt, stop)
        out[:, pos] = nxt
        pending = out[:, pos:pos + 1]
        if stop.numel() and done.all():  # the only host synchronisation per token, and only with stops
            return out[:, :pos + 1]
    return out


@torch.inference_mode()
def generate(model: GPT, input_ids: torch.Tensor | Sequence[int], max_new_tokens: int | None = None,
             *, max_length: int | None = None, do_sample: bool = True, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, num_return_sequences: int = 1,
             stop_tokens: Iterable[int] = (), pad_token_id: int | None = None,
             generator: torch.Generator | None = None, use_cache: bool = True) -> torch.Tensor:
    """Continue ``input_ids`` (a list of ids, or a (B, T) tensor) and return prompt + continuation.

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
    idx = torch.as_tensor(input_ids, dtype=torch.long, device=model.lm_head.weight.device)
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
    pad = pad_token_id if pad_token_id is not None else (int(stop[0]) if stop.numel() else 0)
    t = 0.0 if greedy else temperature

    def pick(logits: torch.Tensor) -> torch.Tensor:
        return sample_next(logits, t, top_k, top_p, generator)

    idx = idx.repeat_interleave(num_return_sequences, dim=0)
    if max_new_tokens == 0:
        return idx
    was_training = model.training
    model.eval()
    try:
        with _column_major(model):
            return _decode(model, idx, max_new_tokens, pick, stop, pad, use_cache)
    finally:
        model.train(was_training)
