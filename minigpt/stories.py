"""The story world: a small probabilistic program that writes short stories, and its inverse.

Every random choice the program makes is recorded with its log-probability, and the text determines
the choices (:func:`parse` recovers them), so the information content of a story is exactly
``-sum(story.logprobs)`` nats. Averaged over the program, that gives the corpus's entropy rate
(:func:`minigpt.entropy.entropy_rate`): the floor below which no language model's loss can go.

A story is six sentences, one per *section*. Each section picks a sentence template; a template has
slots such as ``{hero}``, ``{he}`` or ``{object}``. A slot reads a *variable* (the hero's name, the
object, the place, ...) and the variable is drawn the first time a chosen template needs it, so every
variable that is drawn also appears in the text. Pronouns agree with the hero's name, which the model
only sees in the first sentence.

Here: the vocabulary, the program's tables (variables, slots, sections), the generator
(:func:`generate_story`, :func:`story_corpus`), the finetuning questions (:func:`questions`) and the
parser (:func:`parse`, and :func:`sentences_parsed` for how far into a text it gets).

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
SLOT = re.compile(r"\{(\w+)\}")  # a slot in a template: {hero}, {he}, {object}, ...


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


def slot_variables(template: str) -> list[str]:
    """Variables a template needs, in the order they are first drawn (the order of VARIABLES).

    Built in: 01_tokens
    """
    needed = {v for slot in SLOT.findall(template) for v in SLOTS[slot][0]}
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
        for var in slot_variables(template):
            if var not in bound:
                values = VARIABLES[var](bound)
                bound[var] = values[rng.randrange(len(values))]
                choices.append((var, bound[var]))
                logprobs.append(-math.log(len(values)))
        sentences.append(_render(template, bound))
    return Story(" ".join(sentences), tuple(choices), tuple(logprobs), _facts(bound))


def _render(template: str, bound: dict) -> str:
    return SLOT.sub(lambda m: SLOTS[m.group(1)][1](bound), template)


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
    for m in SLOT.finditer(template):
        parts.append(re.escape(template[last:m.start()]))
        parts.append(f"(?P<s{k}_{m.group(1)}>{_slot_alternatives(m.group(1))})")
        last, k = m.end(), k + 1
    parts.append(re.escape(template[last:]))
    return re.compile("".join(parts))


def _slot_alternatives(slot: str) -> str:
    values: tuple[str, ...]
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
    slots = set(SLOT.findall(template))
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


def _parse_sentences(text: str):
    """Parse ``text`` sentence by sentence: after each accepted sentence, yield where it ends and the
    choices recovered so far; raise ValueError (naming the position) at the first one that fails."""
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
        for var in slot_variables(template):
            if var not in bound:
                if new[var] not in VARIABLES[var](new):  # e.g. the friend must not be the hero
                    raise ValueError(f"not a story-world text: {var}={new[var]!r} at char {pos} is not "
                                     f"one of {VARIABLES[var](new)}")
                choices.append((var, new[var]))
        bound = new
        pos = m.end()
        yield pos, choices


def parse(text: str) -> tuple[tuple[str, str | int], ...]:
    """Recover the choices that produced a story's text (the inverse of :func:`generate_story`).

    Raises ValueError naming the position when the text is not one the program can write.

    Built in: 01_tokens
    """
    pos, choices = 0, []
    for end, so_far in _parse_sentences(text):
        pos, choices = end, so_far
    if pos != len(text):
        raise ValueError(f"not a story-world text: unexpected text after the ending at char {pos}: "
                         f"{text[pos:pos + 40]!r}")
    return tuple(choices)


def sentences_parsed(text: str) -> int:
    """How many of the text's sentences, from the first, :func:`parse` accepts before the first one
    that the program cannot write or that contradicts the story so far (a name, a pronoun, an object):
    0 to 6. Every story the program writes scores 6; a text that scores 6 and stops there parses.

    Built in: 04_pretraining
    """
    if not isinstance(text, str):
        raise ValueError(f"text={text!r} must be a str")
    count = 0
    try:
        for _ in _parse_sentences(text):
            count += 1
    except ValueError:
        pass
    return count
