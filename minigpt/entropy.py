"""The story world's entropy rate, computed exactly from the program's tables: nats per story, and
the expected characters (or tokens) per story, so nats per character (or token).

Built in: 01_tokens
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from minigpt.stories import (
    ENDINGS,
    HAPPY_FEELINGS,
    NAMES,
    OBJECTS,
    SAD_FEELINGS,
    SECTIONS,
    SEPARATOR,
    SLOT,
    SLOTS,
    VARIABLES,
    Story,
    generate_stories,
    slot_variables,
)


def _marginal(var: str, ending: str | None = None) -> list[tuple[str, float]]:
    """The marginal distribution of a variable's value (given the ending, for "feeling").

    friend is uniform over NAMES without the hero, so by symmetry its marginal is uniform over NAMES;
    likewise gift over OBJECTS.
    """
    values: tuple[str, ...]
    if var == "friend":
        values = NAMES
    elif var == "gift":
        values = OBJECTS
    elif var == "feeling":
        values = HAPPY_FEELINGS if ending == "happy" else SAD_FEELINGS
    else:
        values = VARIABLES[var]({})
    return [(v, 1 / len(values)) for v in values]


def _pieces(template: str, lead: str) -> list[tuple[str, str | None]]:
    """Split a sentence into (text, slot) pieces; literal pieces have slot None.

    The space before a slot goes with the slot (" Mia", not " " + "Mia"), and ``lead`` (the space that
    joins sentences) goes with the first piece, so that pieces begin where GPT-2's pre-splitting
    begins a chunk: a word with its leading space, or punctuation.
    """
    out: list[tuple[str, str | None]] = []
    pending, last = lead, 0
    for m in SLOT.finditer(template):
        literal = pending + template[last:m.start()]
        prefix = " " if literal.endswith(" ") else ""
        if literal[: len(literal) - len(prefix)]:
            out.append((literal[: len(literal) - len(prefix)], None))
        out.append((prefix, m.group(1)))
        pending, last = "", m.end()
    if pending + template[last:]:
        out.append((pending + template[last:], None))
    return out


def _expected_piece(prefix: str, slot: str, ending: str | None, cost: Callable[[str], float]) -> float:
    """E[cost(prefix + rendered slot)], from the marginals of the variables the slot reads."""
    reads = SLOTS[slot][0]
    if reads == ("giver", "friend"):  # giver/receiver: the hero's or the friend's name, both uniform
        return sum(p * cost(prefix + n) for n, p in _marginal("hero"))
    (var,) = reads
    render = SLOTS[slot][1]
    return sum(p * cost(prefix + render({var: v})) for v, p in _marginal(var, ending))


def _expected_cost(cost: Callable[[str], float]) -> float:
    """E[sum of cost over a story's pieces and its separator], exactly, by linearity of expectation.

    Each section's template is drawn independently, and each slot's value has a known marginal, so
    the expectation is a sum over sections, templates and slots. For ``cost=len`` this is the
    expected number of characters; for a tokenizer's token count it is the expected number of tokens
    when tokenization is additive over the pieces (checked by :func:`entropy_rate`).
    """
    total = cost(SEPARATOR)
    for k, (_, table) in enumerate(SECTIONS):
        for cond, options in table.items():
            weight = 1.0 if cond is None else ENDINGS[cond]
            for p, template in options:
                for text, slot in _pieces(template, " " if k else ""):
                    piece = cost(text) if slot is None else _expected_piece(text, slot, cond, cost)
                    total += weight * p * piece
    return total


def _story_pieces(story: Story) -> list[str]:
    """The story's text cut into the pieces that :func:`_expected_cost` sums over."""
    bound = dict(story.choices)
    templates = []
    for name, table in SECTIONS:
        options = table[bound["ending"]] if None not in table else table[None]
        templates.append(options[bound[name]][1])
    return [text if slot is None else text + SLOTS[slot][1](bound)
            for k, t in enumerate(templates) for text, slot in _pieces(t, " " if k else "")] + [SEPARATOR]


@dataclass(frozen=True)
class EntropyRate:
    """The corpus's entropy per story, per character and (given a tokenizer) per token; all exact."""

    nats_per_story: float
    chars_per_story: float  # including the separator that follows each story
    tokens_per_story: float | None = None

    @property
    def nats_per_char(self) -> float:
        return self.nats_per_story / self.chars_per_story

    @property
    def bits_per_char(self) -> float:
        return self.nats_per_char / math.log(2)

    @property
    def nats_per_token(self) -> float | None:
        return None if self.tokens_per_story is None else self.nats_per_story / self.tokens_per_story


def _entropy(probs) -> float:
    return -math.fsum(p * math.log(p) for p in probs if p > 0)


def _expected_nats() -> float:
    """E[-log p(story)]: the entropy of each choice, weighted by the probability it is made."""
    nats = _entropy(ENDINGS.values())
    p_unused = {v: 1.0 for v in VARIABLES}  # P(no chosen template so far needs v)
    for _, table in SECTIONS:
        for cond, options in table.items():
            nats += (1.0 if cond is None else ENDINGS[cond]) * _entropy(p for p, _ in options)
        # sections draw templates independently, so P(unused) multiplies across sections
        for v in VARIABLES:
            p_use = sum((1.0 if c is None else ENDINGS[c]) * p for c, opts in table.items()
                        for p, t in opts if v in slot_variables(t))
            p_unused[v] *= 1 - p_use
    sizes = {"friend": len(NAMES) - 1, "gift": len(OBJECTS) - 1}
    for v in VARIABLES:
        if v == "feeling":  # only needed by ending templates; its set depends on the ending
            for ending, pe in ENDINGS.items():
                p_use = sum(p for p, t in dict(SECTIONS)["closing"][ending] if "{feeling}" in t)
                nats += pe * p_use * math.log(len(_marginal("feeling", ending)))
            continue
        n = sizes[v] if v in sizes else len(VARIABLES[v]({}))
        nats += (1 - p_unused[v]) * math.log(n)
    return nats


def entropy_rate(tokenizer=None) -> EntropyRate:
    """The entropy rate of the story corpus: the loss floor no model can beat.

    Because the text determines the choices, a story's information content is the sum of its choices'
    -log p, and the corpus (stories drawn independently, each followed by a newline) has entropy rate
    ``E[nats per story] / E[characters per story]`` (renewal-reward theorem). Both expectations are
    computed exactly from the program's tables, not sampled; so is ``E[tokens per story]`` for a
    ``tokenizer`` whose encoding is additive over words with their leading space and punctuation
    (characters, or BPE with GPT-2's pre-splitting). A tokenizer that is not raises ValueError.

    Built in: 01_tokens
    """
    nats, chars = _expected_nats(), _expected_cost(len)
    if tokenizer is None:
        return EntropyRate(nats, chars)

    def count(text: str) -> int:
        return len(tokenizer.encode(text))

    for story in generate_stories(20, seed=0):
        pieces = _story_pieces(story)
        if sum(map(count, pieces)) != count(story.text + SEPARATOR):
            raise ValueError(f"tokenizer {type(tokenizer).__name__} does not split stories at word "
                             f"boundaries, so its tokens per story cannot be computed exactly")
    return EntropyRate(nats, chars, _expected_cost(count))
