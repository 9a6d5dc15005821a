"""Finetuning a pretrained GPT: a classification head, instruction tuning with the loss on the response
only, batches of examples, and their accuracy and exact-match scores. LoRA adapters are in
:mod:`minigpt.lora` (their names are importable from here too).

Everything here trains with :class:`minigpt.train.Trainer`: :class:`Examples` has the same
``batch(batch_size, generator, device)`` as the token windows of pretraining, and both models return
``(logits, loss)`` from ``forward(idx, targets)``.

Built in: 05_finetuning
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from minigpt.generate import generate
from minigpt.lora import (  # noqa: F401  (LoRA is part of finetuning's interface, as chapter 05 imports it)
    LORA_TARGETS,
    LoRALinear,
    add_lora,
    load_adapters,
    lora_modules,
    lora_parameter_count,
    merge_lora,
    save_adapters,
    trainable_parameters,
    unmerge_lora,
)
from minigpt.model import GPT

IGNORE = -100  # the target of a position that the loss skips (F.cross_entropy's ignore_index)

# --- classification -----------------------------------------------------------------------------------


class GPTClassifier(nn.Module):
    """A pretrained GPT's body with a linear head over ``labels`` instead of the vocabulary.

    ``pooling="last"`` reads the final hidden state of each sequence's last real token (which, with
    causal attention, has seen the whole text); ``"mean"`` averages the hidden states of all real
    tokens. Padding is ``pad_id`` on the right, as :class:`Examples` pads. ``freeze_body=True``
    trains the head alone (a linear probe of the pretrained features).

    Built in: 05_finetuning
    """

    def __init__(self, body: GPT, labels: Sequence[str], pad_id: int, pooling: str = "last",
                 freeze_body: bool = False):
        super().__init__()
        labels = tuple(labels)
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ValueError(f"labels={labels!r} must be at least two distinct names")
        if pooling not in ("last", "mean"):
            raise ValueError(f"pooling={pooling!r} must be 'last' or 'mean'")
        if not 0 <= pad_id < body.config.vocab_size:
            raise ValueError(f"pad_id={pad_id} must be a token id in [0, {body.config.vocab_size})")
        self.body, self.labels, self.pad_id, self.pooling = body, labels, pad_id, pooling
        self.config = body.config
        self.head = nn.Linear(body.config.n_embd, len(labels))
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.freeze_body(freeze_body)

    def freeze_body(self, frozen: bool = True) -> None:
        for p in self.body.parameters():
            p.requires_grad_(not frozen)

    def label_ids(self, names: Sequence[str]) -> torch.Tensor:
        """Class indices of label names; a name outside the label set is a ValueError."""
        index = {name: i for i, name in enumerate(self.labels)}
        bad = [n for n in names if n not in index]
        if bad:
            raise ValueError(f"label {bad[0]!r} is not one of {list(self.labels)}")
        return torch.tensor([index[n] for n in names])

    def pool(self, features: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """(B, T, C) hidden states -> (B, C), reading only the real (non-pad) tokens of each row."""
        real = idx != self.pad_id
        if (real[:, 1:] & ~real[:, :-1]).any() or not real[:, 0].all():
            raise ValueError(f"padding (pad_id={self.pad_id}) must come after the text, on the right, and "
                             f"every row needs at least one real token")
        if self.pooling == "last":
            last = real.sum(1) - 1
            return features[torch.arange(len(idx), device=idx.device), last]
        w = real.unsqueeze(-1).to(features.dtype)
        return (features * w).sum(1) / w.sum(1)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) right-padded token ids -> (logits (B, n_labels), mean cross-entropy or None)."""
        logits = self.head(self.pool(self.body.features(idx), idx))
        loss = None
        if targets is not None:
            if targets.shape != (len(idx),) or targets.min() < 0 or targets.max() >= len(self.labels):
                raise ValueError(f"targets must be {len(idx)} class indices in [0, {len(self.labels)}); "
                                 f"got shape {tuple(targets.shape)}, values {targets.min().item()}.."
                                 f"{targets.max().item()}")
            loss = F.cross_entropy(logits.float(), targets)
        return logits, loss


# --- instruction data -------------------------------------------------------------------------------


class PromptTemplate:
    """A template such as ``"{story}\\nQ: {question}\\nA: {response}"``: the fields before ``{response}``
    make the prompt, and the text the model must learn to write goes in ``{response}``, which must be
    the template's last field.

    Spaces just before ``{response}`` move to the start of the response: byte-level BPE attaches a
    word's leading space to the word (" park" is one token), so the response tokenizes as it did in
    pretraining text, and the prompt never ends in a lone space token.

    Built in: 05_finetuning
    """

    def __init__(self, template: str, response_field: str = "response"):
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        if any(f == "" or not f.isidentifier() for f in fields):
            raise ValueError(f"template {template!r} has a positional or malformed field; use named "
                             f"fields such as {{question}}")
        if response_field not in fields:
            raise ValueError(f"template {template!r} has no {{{response_field}}} field: the response is "
                             f"what the model learns to write, e.g. 'Q: {{question}}\\nA: "
                             f"{{{response_field}}}'")
        if fields.count(response_field) > 1 or fields[-1] != response_field:
            raise ValueError(f"template {template!r}: {{{response_field}}} must appear once, as the last "
                             f"field (the prompt is everything before it)")
        self.template, self.response_field = template, response_field
        self.fields = tuple(dict.fromkeys(fields))
        head, tail = template.split("{" + response_field + "}")
        stripped = head.rstrip(" ")
        self._prompt, self._lead, self._tail = stripped, head[len(stripped):], tail

    def prompt(self, example: Mapping[str, str]) -> str:
        """The text the model is given (everything before the response)."""
        missing = [f for f in self.fields if f != self.response_field and f not in example]
        if missing:
            raise ValueError(f"example lacks field(s) {missing}; the template needs {list(self.fields)}")
        return self._prompt.format(**{k: v for k, v in example.items() if k != self.response_field})

    def response(self, example: Mapping[str, str]) -> str:
        """The text the model learns to write (with the template's text after the field, if any)."""
        if self.response_field not in example:
            raise ValueError(f"example lacks the response field {self.response_field!r}; it has "
                             f"{sorted(example)}")
        return self._lead + str(example[self.response_field]) + self._tail

    def render(self, example: Mapping[str, str]) -> tuple[str, str]:
        return self.prompt(example), self.response(example)


def encode_instruction(tokenizer, template: PromptTemplate, example: Mapping[str, str], eos_id: int,
                       ) -> tuple[list[int], list[int]]:
    """(inputs, targets) for one example: the prompt and response tokens followed by ``eos_id`` (so
    the model learns to stop), shifted by one as in pretraining, with the target of every position
    that predicts a prompt token set to IGNORE. The loss is on the response (and the stop) only.

    Built in: 05_finetuning
    """
    return encode_conversation(tokenizer, template, [example], eos_id)


def encode_conversation(tokenizer, template: PromptTemplate, examples: Sequence[Mapping[str, str]],
                        eos_id: int, shared: Sequence[str] = ()) -> tuple[list[int], list[int]]:
    """Several examples as one sequence of turns: the first rendered in full, each later one with its
    ``shared`` fields (the story they all ask about) left empty, every response followed by
    ``eos_id``. Targets as in :func:`encode_instruction`: only responses and stops are learned.

    One story with four questions costs about twice the tokens of one story with one question, and
    teaches four answers.

    Built in: 05_finetuning
    """
    if not examples:
        raise ValueError("a conversation needs at least one example")
    ids: list[int] = []
    learn: list[bool] = []
    for k, example in enumerate(examples):
        if k:
            missing = [f for f in shared if f not in example]
            if missing:
                raise ValueError(f"shared field(s) {missing} not in example {k}; it has {sorted(example)}")
            example = {**example, **{f: "" for f in shared}}
        prompt, response = template.render(example)
        p, r = tokenizer.encode(prompt), tokenizer.encode(response)
        if not r or (k == 0 and not p):
            raise ValueError(f"prompt and response must both be non-empty; got {prompt!r} and {response!r}")
        ids += p + r + [eos_id]
        learn += [False] * len(p) + [True] * (len(r) + 1)
    targets = [t if keep else IGNORE for t, keep in zip(ids[1:], learn[1:])]
    return ids[:-1], targets


class Examples:
    """Encoded examples of different lengths, batched with right padding.

    ``targets`` holds either one class index per example (classification) or one target per input
    position (instruction tuning; padding gets IGNORE). ``batch`` draws examples at random, as the
    pretraining windows do, so :class:`minigpt.train.Trainer` trains on either.

    Built in: 05_finetuning
    """

    def __init__(self, inputs: Sequence[Sequence[int]], targets: Sequence, pad_id: int,
                 block_size: int | None = None, name: str = "examples"):
        if not inputs:
            raise ValueError(f"{name}: no examples")
        if len(inputs) != len(targets):
            raise ValueError(f"{name}: {len(inputs)} inputs but {len(targets)} targets")
        for i, (x, y) in enumerate(zip(inputs, targets)):
            if not len(x):
                raise ValueError(f"{name}: example {i} is empty")
            if block_size is not None and len(x) > block_size:
                raise ValueError(f"{name}: example {i} has {len(x)} tokens, more than "
                                 f"block_size={block_size}")
            if not isinstance(y, int) and len(y) != len(x):
                raise ValueError(f"{name}: example {i} has {len(x)} inputs but {len(y)} targets")
        self.inputs = [list(x) for x in inputs]
        self.targets = [y if isinstance(y, int) else list(y) for y in targets]
        self.pad_id, self.name = pad_id, name
        self.per_token = not isinstance(self.targets[0], int)

    def __len__(self) -> int:
        return len(self.inputs)

    def collate(self, indices: Sequence[int], device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """The examples at ``indices`` as (inputs (B, T), targets (B, T) or (B,)), T the longest."""
        t = max(len(self.inputs[i]) for i in indices)
        x = torch.full((len(indices), t), self.pad_id, dtype=torch.long)
        for row, i in enumerate(indices):
            x[row, :len(self.inputs[i])] = torch.tensor(self.inputs[i])
        if self.per_token:
            y = torch.full((len(indices), t), IGNORE, dtype=torch.long)
            for row, i in enumerate(indices):
                target = cast(list[int], self.targets[i])  # per_token: every target is a list
                y[row, :len(target)] = torch.tensor(target)
        else:
            y = torch.tensor([self.targets[i] for i in indices])
        return x.to(device), y.to(device)

    def batch(self, batch_size: int, generator: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
        return self.collate(torch.randint(len(self), (batch_size,), generator=generator).tolist(), device)

    def batches(self, batch_size: int, device="cpu"):
        """All examples in order, ``batch_size`` at a time (for evaluation)."""
        for start in range(0, len(self), batch_size):
            yield self.collate(range(start, min(len(self), start + batch_size)), device)

    @classmethod
    def for_classification(cls, tokenizer, texts: Sequence[str], labels: Sequence[str],
                           model: GPTClassifier, name: str = "examples") -> Examples:
        """Texts and their label names, for ``model``; a label outside its label set is a ValueError."""
        ids = model.label_ids(labels).tolist()
        return cls([tokenizer.encode(t) for t in texts], ids, model.pad_id, model.config.block_size, name)

    @classmethod
    def for_instructions(cls, tokenizer, template: PromptTemplate, examples: Sequence, eos_id: int,
                         pad_id: int, block_size: int | None = None, shared: Sequence[str] = (),
                         name: str = "examples") -> Examples:
        """Single-turn examples (mappings), or conversations (lists of mappings that share the
        ``shared`` fields, see :func:`encode_conversation`)."""
        pairs = [encode_conversation(tokenizer, template, [e] if isinstance(e, Mapping) else e, eos_id,
                                     shared) for e in examples]
        return cls([x for x, _ in pairs], [y for _, y in pairs], pad_id, block_size, name)


# --- evaluation -------------------------------------------------------------------------------------


@torch.no_grad()
def classification_accuracy(model: GPTClassifier, examples: Examples, batch_size: int = 64) -> float:
    """Fraction of ``examples`` whose highest-scoring label is the true one.

    Built in: 05_finetuning
    """
    model.eval()
    device = next(model.parameters()).device
    right = 0
    for x, y in examples.batches(batch_size, device):
        right += (model(x)[0].argmax(-1) == y).sum().item()
    return right / len(examples)


@torch.no_grad()
def mean_loss(model: nn.Module, examples: Examples, batch_size: int = 64) -> float:
    """Cross-entropy over all of ``examples``' targets (each target token counts once; IGNORE skipped).

    Built in: 05_finetuning
    """
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for x, y in examples.batches(batch_size, device):
        n = (y != IGNORE).sum().item()
        total += model(x, y)[1].item() * n
        count += n
    return total / count


@torch.inference_mode()
def greedy_complete(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_id: int,
                    pad_id: int = 0, batch_size: int = 64) -> list[list[int]]:
    """Greedy continuations of many prompts of different lengths, ``batch_size`` at a time: each
    batch is one call of :func:`minigpt.generate.generate` with the prompts as a list (left-padded,
    each row as it would be alone, with the KV cache). A row stops at ``stop_id`` (not included in
    its result) or after ``max_new_tokens``. Leaves the model in eval mode.

    Built in: 05_finetuning
    """
    model.eval()
    block = model.config.block_size
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[start:start + batch_size]]
        lengths = [len(p) for p in chunk]
        if min(lengths) < 1 or max(lengths) + max_new_tokens > block:
            raise ValueError(f"prompts of {min(lengths)}..{max(lengths)} tokens plus {max_new_tokens} new "
                             f"ones must fit in block_size={block}")
        rows = generate(model, chunk, max_new_tokens, do_sample=False, stop_tokens=[stop_id],
                        pad_token_id=pad_id)
        for p, row in zip(chunk, rows):
            answer = row[len(p):].tolist()
            out.append(answer[:-1] if answer and answer[-1] == stop_id else answer)
    return out


def exact_match(model: GPT, tokenizer, template: PromptTemplate, examples: Sequence[Mapping[str, str]],
                eos_id: int, max_new_tokens: int = 8, pad_id: int = 0) -> tuple[float, list[str]]:
    """Greedy answers to the prompts of ``examples`` and the fraction that equal the response exactly
    (after stripping surrounding whitespace).

    Built in: 05_finetuning
    """
    prompts = [tokenizer.encode(template.prompt(e)) for e in examples]
    answers = [tokenizer.decode(a).strip()
               for a in greedy_complete(model, prompts, max_new_tokens, eos_id, pad_id)]
    right = sum(a == str(e[template.response_field]).strip() for a, e in zip(answers, examples))
    return right / len(examples), answers
