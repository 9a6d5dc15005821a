"""The story world: the text determines the choices, and the exact entropy rate is right."""

import math
import random
import re
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minigpt import stories as S
from minigpt.data import entropy_rate, generate_stories, parse, sentences_parsed, story_corpus
from minigpt.tokenizer import BPETokenizer, CharTokenizer


def test_world_is_big_enough():
    assert len(S.NAMES) >= 40 and len(set(S.NAMES)) == len(S.NAMES)
    assert len(S.OBJECTS) >= 30 and len(set(S.OBJECTS)) == len(S.OBJECTS)
    assert len(S.PLACES) >= 15 and len(set(S.PLACES)) == len(S.PLACES)
    templates = [t for _, table in S.SECTIONS for opts in table.values() for _, t in opts]
    assert len(set(templates)) >= 15
    for name, table in S.SECTIONS:
        for cond, opts in table.items():
            assert math.isclose(sum(p for p, _ in opts), 1.0), (name, cond)


@given(st.integers(min_value=0, max_value=2**63))
def test_parse_recovers_the_choices(seed):
    story = S.generate_story(random.Random(seed))
    assert parse(story.text) == story.choices


def test_parse_recovers_choices_over_a_corpus():
    stories = generate_stories(3000, seed=7)
    assert all(parse(s.text) == s.choices for s in stories)
    # distinct choices give distinct texts (the other half of "the text determines the choices")
    by_text = {}
    for s in stories:
        assert by_text.setdefault(s.text, s.choices) == s.choices


def test_logprobs_are_one_per_choice_and_normalised():
    for s in generate_stories(200, seed=3):
        assert len(s.logprobs) == len(s.choices)
        assert all(lp <= 0 for lp in s.logprobs)
        assert s.nats == pytest.approx(-sum(s.logprobs))


def test_pronouns_agree_with_the_hero():
    for s in generate_stories(500, seed=11):
        words = re.findall(r"[A-Za-z]+", s.text)
        hero_forms = Counter(w.lower() for w in words if w.lower() in ("she", "he", "her", "his", "him"))
        female = {"she", "her"}
        male = {"he", "his", "him"}
        if s.facts.hero_gender == "f":
            # "her" may be the friend only in "a girl from her class"... which is the hero's class
            assert not (set(hero_forms) & male), s.text
        else:
            assert not (set(hero_forms) & female), s.text


def test_facts_are_in_the_text():
    for s in generate_stories(300, seed=5):
        f = s.facts
        assert f.hero in s.text and f.friend in s.text and f.hero != f.friend
        assert f" {f.place}" in s.text and f.object in s.text and f.gift in s.text
        assert f.gift != f.object and {f.giver, f.receiver} == {f.hero, f.friend}
        assert f.ending in ("happy", "sad")


def test_generation_is_deterministic_for_a_seed():
    assert story_corpus(50, seed=1) == story_corpus(50, seed=1)
    rng = random.Random(2)  # the seed seeds one random.Random, from which the stories are drawn in turn
    assert story_corpus(50, seed=2) == "".join(S.generate_story(rng).text + "\n" for _ in range(50))
    assert story_corpus(3, seed=0).count("\n") == 3


def test_parse_rejects_texts_the_program_cannot_write():
    text = generate_stories(1, seed=0)[0].text  # "Ben was a little boy ... he found ..."
    with pytest.raises(ValueError, match="not a story-world text"):
        parse(text.replace(" he ", " she ", 1))  # a pronoun that disagrees with the hero
    with pytest.raises(ValueError, match="not a story-world text"):
        parse(text + " The end.")
    with pytest.raises(ValueError, match="not a story-world text"):
        parse("It was a dark and stormy night.")
    with pytest.raises(ValueError, match="not a story-world text"):
        parse("Once upon a time, there was a little girl named Mia. One day, she found a red ball "
              "under a tree. She took the ball to the park. There she saw her old friend Mia.")


def test_sentences_parsed_counts_the_sentences_before_the_first_bad_one():
    stories = generate_stories(200, seed=5)
    assert all(sentences_parsed(s.text) == 6 for s in stories)
    for k, story in enumerate(stories[:6]):  # sentence k replaced by one the program cannot write
        sentences = story.text.split(". ")
        sentences[k] = "It was a dark and stormy night" + ("." if k == 5 else "")
        assert sentences_parsed(". ".join(sentences)) == k
    story = next(s for s in stories if s.text.endswith(f"{s.facts.hero} ran home alone."))
    other = next(n for n in ("Mia", "Tom") if n != story.facts.hero and n != story.facts.friend)
    swapped = story.text[: story.text.rindex(story.facts.hero)] + f"{other} ran home alone."
    assert sentences_parsed(swapped) == 5  # a last sentence that names someone else as the hero
    assert sentences_parsed(story.text + " The end.") == 6  # six good sentences, then more text:
    with pytest.raises(ValueError, match="unexpected text after the ending"):
        parse(story.text + " The end.")  # ... which parse rejects
    assert sentences_parsed("") == 0
    with pytest.raises(ValueError, match="must be a str"):
        sentences_parsed(None)


def test_exact_entropy_matches_the_sample_mean():
    """The exact expectations agree with Monte Carlo averages within 5 standard errors."""
    rate = entropy_rate()
    stories = generate_stories(20000, seed=2024)
    n = len(stories)
    for exact, values in ((rate.nats_per_story, [s.nats for s in stories]),
                          (rate.chars_per_story, [len(s.text) + 1 for s in stories])):
        mean = sum(values) / n
        se = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
        assert abs(mean - exact) < 5 * se, (exact, mean, se)
    assert rate.bits_per_char == pytest.approx(rate.nats_per_char / math.log(2))


def test_entropy_per_token_with_a_character_tokenizer_equals_per_character():
    rate = entropy_rate(CharTokenizer.train(story_corpus(2000, seed=0)))
    assert rate.tokens_per_story == pytest.approx(rate.chars_per_story, rel=1e-12)
    assert rate.nats_per_token == pytest.approx(rate.nats_per_char, rel=1e-12)


def test_exact_tokens_per_story_matches_the_sample_mean():
    bpe = BPETokenizer.train(story_corpus(500, seed=0), vocab_size=500)
    rate = entropy_rate(bpe)
    counts = [len(bpe.encode(s.text + "\n")) for s in generate_stories(20000, seed=6)]
    mean = sum(counts) / len(counts)
    se = math.sqrt(sum((c - mean) ** 2 for c in counts) / (len(counts) - 1) / len(counts))
    assert abs(mean - rate.tokens_per_story) < 5 * se, (rate.tokens_per_story, mean, se)
    assert rate.nats_per_token > rate.nats_per_char


def test_a_tokenizer_that_ignores_word_boundaries_is_refused():
    class Pairs:  # two characters per token, whatever they are
        def encode(self, text):
            return list(range((len(text) + 1) // 2))

    with pytest.raises(ValueError, match="tokenizer Pairs does not split stories at word boundaries"):
        entropy_rate(Pairs())


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="n=-1"):
        generate_stories(-1)
