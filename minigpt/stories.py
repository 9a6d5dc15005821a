"""The story world: a small probabilistic program that writes short stories.

Every random choice the program makes is recorded with its log-probability, and the text determines
the choices (:func:`parse` recovers them), so the information content of a story is exactly
``-sum(story.logprobs)`` nats. Averaged over the program, that gives the corpus's entropy rate
(:func:`entropy_rate`): the floor below which no language model's loss can go.

A story is six sentences, one per *section*. Each section picks a sentence template; a template has
slots such as ``{hero}``, ``{he}`` or ``{object}``. A slot reads a *variable* (the hero's name, the
object, the place, ...) and the variable is drawn the first time a chosen template needs it, so every
variable that is drawn also appears in the text. Pronouns agree with the hero's name, which the model
only sees in the first sentence.

Built in: 01_tokens
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

# --- vocabulary -------------------------------------------------------------------------------------

GIRLS = ("Mia", "Lily", "Emma", "Anna", "Sara", "Zoe", "Ella", "Lucy", "Nora", "Ruby", "Maya",
         "Ivy", "Rosa", "Chloe", "Hannah", "Grace", "Alice", "Julia", "Leah", "Nina", "Olivia",
         "Sophie", "Amara", "Priya")
BOYS = ("Tom", "Sam", "Ben", "Leo", "Max", "Jack", "Noah", "Liam", "Finn", "Omar", "Ravi", "Hugo",
        "Oscar", "Felix", "Ethan", "Lucas", "Daniel", "Mateo", "Kenji", "Jonah", "Theo", "Arjun",
        "Caleb", "Milo")
NAMES = GIRLS + BOYS
GENDER = {**{n: "f" for n in GIRLS}, **{n: "m" for n in BOYS}}
ADJECTIVES = ("little", "kind", "brave", "curious", "shy", "clever", "cheerful", "quiet")
OBJECTS = ("ball", "kite", "book", "hat", "cup", "drum", "doll", "boat", "shell", "apple", "flower",
           "key", "lamp", "box", "bell", "ring", "feather", "stone", "map", "sock", "spoon", "clock",
           "robot", "balloon", "scarf", "whistle", "crayon", "blanket", "puzzle", "umbrella",
           "cookie", "marble")
COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "pink", "silver", "golden", "brown")
SPOTS = ("under a tree", "by the door", "in the grass", "behind the shed", "near the fence",
         "on the stairs")
PLACES = ("park", "beach", "forest", "market", "school", "library", "garden", "river", "farm", "zoo",
          "castle", "lake", "hill", "bakery", "museum", "playground", "meadow", "harbor")
HAPPY_FEELINGS = ("happy", "glad", "proud", "joyful", "calm")
SAD_FEELINGS = ("sad", "lonely", "upset", "gloomy", "tired")
ENDINGS = {"happy": 0.5, "sad": 0.5}
GIVERS = ("hero", "friend")  # who gives the gift; the other one receives it


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# --- the program ------------------------------------------------------------------------------------
# A variable: its name, and how to draw it given the variables bound so far (values with equal
# probability). The order of this table is the order in which variables may first be needed.

VARIABLES: dict[str, Callable[[dict], tuple[str, ...]]] = {
    "hero": lambda b: NAMES,
    "adjective": lambda b: ADJECTIVES,
    "color": lambda b: COLORS,
    "object": lambda b: OBJECTS,
    "spot": lambda b: SPOTS,
    "place": lambda b: PLACES,
    "friend": lambda b: tuple(n for n in NAMES if n != b["hero"]),
    "giver": lambda b: GIVERS,
    "gift": lambda b: tuple(o for o in OBJECTS if o != b["object"]),
    "feeling": lambda b: HAPPY_FEELINGS if b["ending"] == "happy" else SAD_FEELINGS,
}

# A slot: the variable it reads and how it renders that variable's value given all bindings.
_PRONOUNS = {"he": ("she", "he"), "He": ("She", "He"), "his": ("her", "his"), "His": ("Her", "His"),
             "him": ("her", "him"), "girl": ("girl", "boy")}


def _gendered(form: str, role: str) -> Callable[[dict], str]:
    female, male = _PRONOUNS[form]
    return lambda b: female if GENDER[b[role]] == "f" else male


def _role_name(role: str) -> Callable[[dict], str]:
    # giver/receiver are roles: "hero" gives to "friend" or the other way round
    if role == "giver":
        return lambda b: b[b["giver"]]
    return lambda b: b["friend" if b["giver"] == "hero" else "hero"]


SLOTS: dict[str, tuple[tuple[str, ...], Callable[[dict], str]]] = {
    "hero": (("hero",), lambda b: b["hero"]),
    "friend": (("friend",), lambda b: b["friend"]),
    "adjective": (("adjective",), lambda b: b["adjective"]),
    "color": (("color",), lambda b: b["color"]),
    "a_color": (("color",), lambda b: _article(b["color"])),
    "object": (("object",), lambda b: b["object"]),
    "spot": (("spot",), lambda b: b["spot"]),
    "place": (("place",), lambda b: b["place"]),
    "gift": (("gift",), lambda b: b["gift"]),
    "a_gift": (("gift",), lambda b: _article(b["gift"])),
    "feeling": (("feeling",), lambda b: b["feeling"]),
    "giver": (("giver", "friend"), _role_name("giver")),
    "receiver": (("giver", "friend"), _role_name("receiver")),
    "friend_girl": (("friend",), _gendered("girl", "friend")),
    **{form: (("hero",), _gendered(form, "hero")) for form in _PRONOUNS},
}

# Sections in story order: (name, {condition: [(probability, template), ...]}). The condition is the
# value of "ending" for the last section, None elsewhere. Templates within a section must start
# differently enough that exactly one of them matches a sentence (the parser checks this).
SECTIONS: tuple[tuple[str, dict], ...] = (
    ("intro", {None: [
        (0.5, "Once upon a time, there was a {adjective} {girl} named {hero}."),
        (0.3, "There once lived a {adjective} child called {hero}."),
        (0.2, "{hero} was a {adjective} child who loved to play outside."),
    ]}),
    ("find", {None: [
        (0.4, "One day, {he} found {a_color} {color} {object} {spot}."),
        (0.3, "One morning, {he} saw {a_color} {color} {object} {spot}."),
        (0.3, "On {his} way to breakfast, {he} spotted {a_color} {color} {object} {spot}."),
    ]}),
    ("go", {None: [
        (0.4, "{He} took the {object} to the {place}."),
        (0.3, "{He} carried the {object} all the way to the {place}."),
        (0.3, "With the {object} in {his} hands, {he} walked to the {place}."),
    ]}),
    ("meet", {None: [
        (0.4, "At the {place}, {he} met {friend}, a {friend_girl} from {his} class."),
        (0.3, "There {he} saw {his} old friend {friend}."),
        (0.3, "{friend} was already there, waiting for {him}."),
    ]}),
    ("give", {None: [
        (0.4, "{giver} gave {receiver} {a_gift} {gift}."),
        (0.3, "{giver} gave {a_gift} {gift} to {receiver}."),
        (0.3, "{giver} had {a_gift} {gift} and gave it to {receiver}."),
    ]}),
    ("closing", {
        "happy": [
            (0.4, "They laughed together, and {hero} felt {feeling} all the way home."),
            (0.3, "The two friends played until the sun went down."),
            (0.3, "It was the best day ever, and {he} went to bed {feeling}."),
        ],
        "sad": [
            (0.4, "But on the way home, {hero} lost the {object}, and {he} felt {feeling}."),
            (0.3, "Then it began to rain, and {hero} ran home alone."),
            (0.3, "But the {gift} broke, and {hero} cried all evening."),
        ],
    }),
)

SEPARATOR = "\n"  # between stories in a corpus; a story never contains it
_SLOT = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class Facts:
    """What happened in a story: the answers the finetuning chapter asks about."""

    hero: str
    hero_gender: str  # "f" or "m"
    friend: str
    object: str
    color: str
    place: str
    giver: str  # a name
    receiver: str  # a name
    gift: str
    ending: str  # "happy" or "sad"


@dataclass(frozen=True)
class Story:
    """One story: its text, the choices that made it (in order), and their log-probabilities (nats)."""

    text: str
    choices: tuple[tuple[str, str | int], ...]
    logprobs: tuple[float, ...]
    facts: Facts

    @property
    def nats(self) -> float:
        """Information content of the story: -log p(story), in nats."""
        return -math.fsum(self.logprobs)


def _facts(b: dict) -> Facts:
    receiver = b["friend"] if b["giver"] == "hero" else b["hero"]
    return Facts(hero=b["hero"], hero_gender=GENDER[b["hero"]], friend=b["friend"], object=b["object"],
                 color=b["color"], place=b["place"], giver=b[b["giver"]], receiver=receiver,
                 gift=b["gift"], ending=b["ending"])


def _slot_variables(template: str) -> list[str]:
    """Variables a template needs, in the order they are first drawn (the order of VARIABLES)."""
    needed = {v for slot in _SLOT.findall(template) for v in SLOTS[slot][0]}
    return [v for v in VARIABLES if v in needed]


def generate_story(rng: random.Random) -> Story:
    """Draw one story with ``rng``. Deterministic for the generator's state.

    Built in: 01_tokens
    """
    bound: dict[str, str] = {}
    choices: list[tuple[str, str | int]] = []
    logprobs: list[float] = []
    sentences = []
    for name, table in SECTIONS:
        if None not in table:  # the ending: a choice of its own, rendered by which templates follow
            ending = "happy" if rng.random() < ENDINGS["happy"] else "sad"
            bound["ending"] = ending
            choices.append(("ending", ending))
            logprobs.append(math.log(ENDINGS[ending]))
            options = table[ending]
        else:
            options = table[None]
        u, k = rng.random(), 0
        while k < len(options) - 1 and u >= options[k][0]:
            u -= options[k][0]
            k += 1
        choices.append((name, k))
        logprobs.append(math.log(options[k][0]))
        template = options[k][1]
        for var in _slot_variables(template):
            if var not in bound:
                values = VARIABLES[var](bound)
                bound[var] = values[rng.randrange(len(values))]
                choices.append((var, bound[var]))
                logprobs.append(-math.log(len(values)))
        sentences.append(_render(template, bound))
    return Story(" ".join(sentences), tuple(choices), tuple(logprobs), _facts(bound))


def _render(template: str, bound: dict) -> str:
    return _SLOT.sub(lambda m: SLOTS[m.group(1)][1](bound), template)


def generate_stories(n: int, seed: int = 0) -> list[Story]:
    """``n`` stories from one seeded generator.

    Built in: 01_tokens
    """
    if n < 0:
        raise ValueError(f"n={n} must be a count of stories, 0 or more")
    rng = random.Random(seed)
    return [generate_story(rng) for _ in range(n)]


def story_corpus(n: int, seed: int = 0) -> str:
    """``n`` stories as one text, each followed by the separator (a newline).

    Built in: 01_tokens
    """
    return "".join(s.text + SEPARATOR for s in generate_stories(n, seed))


# --- questions: the finetuning tasks ----------------------------------------------------------------

# A question about a story: its template (filled from the story's facts) and the fact that answers it.
QUESTIONS: dict[str, tuple[str, str]] = {
    "place": ("Where did {hero} go?", "place"),
    "object": ("What did {hero} find?", "object"),
    "color": ("What color was the {object}?", "color"),
    "friend": ("Who did {hero} meet?", "friend"),
    "gift": ("What did {giver} give to {receiver}?", "gift"),
    "giver": ("Who gave the {gift} to {receiver}?", "giver"),
}


def questions(story: Story, kinds=None) -> list[dict[str, str]]:
    """Questions about ``story`` with their one-word answers, as examples with the fields ``story``,
    ``question``, ``response`` and ``kind``. ``kinds`` picks from :data:`QUESTIONS` (default: all).

    Built in: 05_finetuning
    """
    kinds = list(QUESTIONS) if kinds is None else list(kinds)
    unknown = [k for k in kinds if k not in QUESTIONS]
    if unknown:
        raise ValueError(f"unknown question kind {unknown[0]!r}; valid kinds are {list(QUESTIONS)}")
    facts = vars(story.facts)
    return [{"story": story.text, "question": QUESTIONS[k][0].format(**facts),
             "response": facts[QUESTIONS[k][1]], "kind": k} for k in kinds]


# --- parsing: the text determines the choices -------------------------------------------------------

def _template_regex(template: str) -> re.Pattern:
    """A regex with one group per slot occurrence; each group matches any value the slot can take."""
    parts, last, k = [], 0, 0
    for m in _SLOT.finditer(template):
        parts.append(re.escape(template[last:m.start()]))
        parts.append(f"(?P<s{k}_{m.group(1)}>{_slot_alternatives(m.group(1))})")
        last, k = m.end(), k + 1
    parts.append(re.escape(template[last:]))
    return re.compile("".join(parts))


def _slot_alternatives(slot: str) -> str:
    if slot in ("hero", "friend", "giver", "receiver"):
        values = NAMES
    elif slot in _PRONOUNS or slot == "friend_girl":
        values = _PRONOUNS["girl" if slot == "friend_girl" else slot]
    elif slot in ("a_color", "a_gift"):
        values = ("a", "an")
    else:
        values = {"adjective": ADJECTIVES, "color": COLORS, "object": OBJECTS, "spot": SPOTS,
                  "place": PLACES, "gift": OBJECTS, "feeling": HAPPY_FEELINGS + SAD_FEELINGS}[slot]
    return "|".join(re.escape(v) for v in sorted(values, key=len, reverse=True))


_PARSERS = [(name, {cond: [(_template_regex(t), t) for _, t in opts] for cond, opts in table.items()})
            for name, table in SECTIONS]


def _bind_from_match(match: re.Match, template: str, bound: dict, where: int) -> dict:
    """Read the variables a matched sentence reveals; check that every slot renders consistently."""
    found = dict(bound)
    for key, text in match.groupdict().items():
        slot = key.split("_", 1)[1]
        if slot in ("hero", "friend", "object", "adjective", "color", "spot", "place", "gift", "feeling"):
            if found.get(slot, text) != text:
                raise ValueError(f"not a story-world text: {slot}={text!r} at char {where} contradicts "
                                 f"{found[slot]!r} earlier")
            found[slot] = text
    slots = set(_SLOT.findall(template))
    if "giver" in slots:  # the giver's name says who gives: the hero or the friend
        groups = match.groupdict()
        giver = groups[next(k for k in groups if k.endswith("_giver"))]
        receiver = groups[next(k for k in groups if k.endswith("_receiver"))]
        found["giver"], friend = ("hero", receiver) if giver == found["hero"] else ("friend", giver)
        if found.setdefault("friend", friend) != friend:
            raise ValueError(f"not a story-world text: {giver!r} gives to {receiver!r} at char {where}, "
                             f"but the friend is {found['friend']!r}")
    for key, text in match.groupdict().items():
        slot = key.split("_", 1)[1]
        if _render("{" + slot + "}", found) != text:
            raise ValueError(f"not a story-world text: {text!r} at char {where} does not agree with "
                             f"the story so far (slot {slot})")
    return found


def parse(text: str) -> tuple[tuple[str, str | int], ...]:
    """Recover the choices that produced a story's text (the inverse of :func:`generate_story`).

    Raises ValueError naming the position when the text is not one the program can write.

    Built in: 01_tokens
    """
    if not isinstance(text, str):
        raise ValueError(f"text={text!r} must be a str")
    bound: dict[str, str] = {}
    choices: list[tuple[str, str | int]] = []
    pos = 0
    for name, table in _PARSERS:
        if pos > 0:
            if not text.startswith(" ", pos):
                raise ValueError(f"not a story-world text: expected a space at char {pos}")
            pos += 1
        hits = [(cond, k, m, t) for cond, opts in table.items() for k, (rx, t) in enumerate(opts)
                if (m := rx.match(text, pos))]
        if len(hits) != 1:
            what = "no" if not hits else "more than one"
            raise ValueError(f"not a story-world text: {what} {name!r} sentence matches at char {pos}: "
                             f"{text[pos:pos + 40]!r}")
        cond, k, m, template = hits[0]
        if cond is not None:
            bound["ending"] = cond
            choices.append(("ending", cond))
        choices.append((name, k))
        new = _bind_from_match(m, template, bound, pos)
        for var in _slot_variables(template):
            if var not in bound:
                if new[var] not in VARIABLES[var](new):  # e.g. the friend must not be the hero
                    raise ValueError(f"not a story-world text: {var}={new[var]!r} at char {pos} is not "
                                     f"one of {VARIABLES[var](new)}")
                choices.append((var, new[var]))
        bound = new
        pos = m.end()
    if pos != len(text):
        raise ValueError(f"not a story-world text: unexpected text after the ending at char {pos}: "
                         f"{text[pos:pos + 40]!r}")
    return tuple(choices)


# --- the entropy rate -------------------------------------------------------------------------------

def _marginal(var: str, ending: str | None = None) -> list[tuple[str, float]]:
    """The marginal distribution of a variable's value (given the ending, for "feeling").

    friend is uniform over NAMES without the hero, so by symmetry its marginal is uniform over NAMES;
    likewise gift over OBJECTS.
    """
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
    for m in _SLOT.finditer(template):
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
                        for p, t in opts if v in _slot_variables(t))
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
