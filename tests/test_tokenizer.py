"""Tokenizers: BPE equals tiktoken given the same ranks; round trips; training; files; errors."""

import subprocess
import sys
from collections import Counter

import pytest
import regex
import tiktoken
from hypothesis import given
from hypothesis import strategies as st

from conftest import ROOT
from minigpt.data import story_corpus
from minigpt.tokenizer import ENDOFTEXT, GPT2_PATTERN, BPETokenizer, CharTokenizer

TRICKY = (
    "Emoji: 🙂🙃 👩‍👩‍👧‍👦 🇯🇵 and skin tones 👋🏽.\n"
    "CJK: 東京は日本の首都です。你好，世界！한국어 텍스트.\n"
    "Whitespace:" + " " * 300 + "end\n\n\n\t\t\t  \u00a0\u2003 x\r\n"
    + "def f(x: int) -> int:\n    return {'a': [x ** 2, 0x1F]}  # comment\n\n"
    "for (int i = 0; i < n; ++i) { s += a[i]; }\n"
    "It's they're we've I'm you'll he'd 'tis 12345 3.14159 -0.5e10\n"
)


@pytest.fixture(scope="module")
def story_bpe() -> BPETokenizer:
    return BPETokenizer.train(story_corpus(2000, seed=0), vocab_size=600)


def as_tiktoken(tok: BPETokenizer) -> tiktoken.Encoding:
    return tiktoken.Encoding("ours", pat_str=tok.pattern, mergeable_ranks=tok.ranks,
                             special_tokens=tok.special_tokens)


def test_equals_tiktoken_on_the_story_corpus(story_bpe):
    text = story_corpus(500, seed=99)  # stories not seen in training
    assert story_bpe.encode(text) == as_tiktoken(story_bpe).encode(text)


def test_equals_tiktoken_on_tricky_text(story_bpe):
    enc = as_tiktoken(story_bpe)
    for line in TRICKY.splitlines(keepends=True) + [TRICKY]:
        assert story_bpe.encode(line) == enc.encode(line), line


def test_equals_tiktoken_on_tiny_shakespeare(shakespeare_text):
    tok = BPETokenizer.train(shakespeare_text, vocab_size=4096)
    assert tok.vocab_size == 4096
    ours = tok.encode(shakespeare_text)
    assert ours == as_tiktoken(tok).encode(shakespeare_text)
    assert len(ours) < len(shakespeare_text.encode()) / 3  # BPE compresses English text well


def test_equals_tiktoken_when_trained_on_tricky_text():
    tok = BPETokenizer.train(TRICKY * 3 + story_corpus(50), vocab_size=700)
    assert tok.encode(TRICKY) == as_tiktoken(tok).encode(TRICKY)


@given(st.text())
def test_round_trip_and_tiktoken_on_any_string(text):
    tok = _shared_tokenizer()
    ids = tok.encode(text, disallowed_special=())
    assert tok.decode(ids) == text
    assert ids == _shared_tiktoken().encode(text, disallowed_special=())


@given(st.binary())
def test_round_trip_on_any_bytes(data):
    tok = _shared_tokenizer()
    assert tok.decode_bytes(tok.encode_bytes(data)) == data


_TOK = {}


def _shared_tokenizer() -> BPETokenizer:
    if "tok" not in _TOK:
        _TOK["tok"] = BPETokenizer.train(story_corpus(300, seed=1) + TRICKY, vocab_size=400)
    return _TOK["tok"]


def _shared_tiktoken() -> tiktoken.Encoding:
    if "enc" not in _TOK:
        _TOK["enc"] = as_tiktoken(_shared_tokenizer())
    return _TOK["enc"]


def naive_train(text: str, vocab_size: int, special_tokens=(ENDOFTEXT,)) -> dict[bytes, int]:
    """Reference trainer: recount every pair after every merge (slow, obviously right)."""
    pieces = regex.split("|".join(regex.escape(s) for s in special_tokens), text)
    counts = Counter(c for p in pieces for c in regex.findall(GPT2_PATTERN, p))
    words = {tuple(c.encode()): f for c, f in counts.items()}
    ranks = {bytes([b]): b for b in range(256)}
    token_bytes = [bytes([b]) for b in range(256)]
    while len(token_bytes) < vocab_size - len(special_tokens):
        pairs = Counter()
        for w, f in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += f
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merged = token_bytes[best[0]] + token_bytes[best[1]]
        if merged not in ranks:
            ranks[merged] = len(token_bytes)
            token_bytes.append(merged)
        new = ranks[merged]
        out = Counter()
        for w, f in words.items():
            res, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    res.append(new)
                    i += 2
                else:
                    res.append(w[i])
                    i += 1
            out[tuple(res)] += f
        words = out
    return ranks


@pytest.mark.parametrize("text", [story_corpus(60, seed=4), "aaaaaaa bbbb aaaa abab ababab " * 20,
                                  TRICKY])
def test_incremental_training_equals_recounting(text):
    assert BPETokenizer.train(text, vocab_size=330).ranks == naive_train(text, 330)


def test_special_tokens():
    tok = _shared_tokenizer()
    eot = tok.special_tokens[ENDOFTEXT]
    assert eot == tok.vocab_size - 1
    text = f"Mia smiled.{ENDOFTEXT}Tom ran."
    ids = tok.encode(text, allowed_special="all")
    assert ids.count(eot) == 1 and tok.decode(ids) == text
    assert ids == _shared_tiktoken().encode(text, allowed_special="all")
    with pytest.raises(ValueError, match="special token"):
        tok.encode(text)  # disallowed by default, as in tiktoken
    assert eot not in tok.encode(text, disallowed_special=())
    with pytest.raises(ValueError, match="<\\|pad\\|>"):
        tok.encode("x", allowed_special={"<|pad|>"})


def test_encode_caches_repeated_chunks():
    tok = BPETokenizer.train(story_corpus(100), vocab_size=300)
    first = tok.encode("the the the the")
    assert " the" in tok._cache and tok.encode("the the the the") == first


def test_save_load_round_trip(tmp_path, story_bpe):
    story_bpe.save(tmp_path / "tok.txt")
    again = BPETokenizer.load(tmp_path / "tok.txt")
    assert again.ranks == story_bpe.ranks and again.special_tokens == story_bpe.special_tokens
    text = story_corpus(20, seed=8)
    assert again.encode(text) == story_bpe.encode(text)
    assert (tmp_path / "tok.txt").read_text().startswith("minigpt-bpe 1\npattern ")
    assert [p.name for p in tmp_path.iterdir()] == ["tok.txt"]  # no temporary file left behind


def test_bad_tokenizer_files(tmp_path, story_bpe):
    path = tmp_path / "tok.txt"
    story_bpe.save(path)
    good = path.read_text()
    cases = {
        "truncated": good[: len(good) // 2],
        "corrupted": good.replace("\n", "\n!!notbase64 ", 5),
        "wrong header": "something else\n" + good,
        "empty": "",
    }
    for text in cases.values():
        path.write_text(text)
        with pytest.raises(ValueError, match="tok.txt"):
            BPETokenizer.load(path)
    path.write_bytes(b"minigpt-bpe 1\n\xff\xfe")
    with pytest.raises(ValueError, match="not UTF-8"):
        BPETokenizer.load(path)


@pytest.mark.parametrize("edit, line, expected", [
    (lambda t: "something else\n" + t, 1, "the format line 'minigpt-bpe 1'"),
    (lambda t: t.replace("pattern ", "pattern 3", 1), 2, "the pre-split regex as a JSON string"),
    (lambda t: t.replace("tokens ", "tokens x", 1), 3, "the number of tokens"),
    (lambda t: t.replace("\nAA== 0\n", "\n!!notbase64 0\n", 1), 4, "with valid base64"),
    (lambda t: t.replace("\nAA== 0\n", "\nAA== zero\n", 1), 4, "with an integer id"),
    (lambda t: t.replace("\nAQ== 1\n", "\nAA== 1\n", 1), 5, "appear once"),
    (lambda t: t.replace("\nend\n", "\nstop\n"), -2, "'end'"),
    (lambda t: t[: t.index("\nspecials")], 0, "'specials <the number of special tokens>', but the file ends"),
])
def test_a_bad_tokenizer_file_names_the_line_and_what_was_expected(tmp_path, story_bpe, edit, line, expected):
    path = tmp_path / "tok.txt"
    good = story_bpe.to_text()
    text = edit(good)
    assert text != good
    n_lines = len(text.split("\n"))
    line = line if line > 0 else n_lines + line + 1  # 0: the line after the last
    path.write_text(text)
    with pytest.raises(ValueError) as e:
        BPETokenizer.load(path)
    assert str(e.value).startswith(f"{path}, line {line}: expected ") and expected in str(e.value), e.value


def test_file_checks_hold_under_python_O(tmp_path):
    # the checks are if-and-raise, not assert, so that python -O (which strips asserts) keeps them
    path = tmp_path / "c.json"
    path.write_text('{"format": "minigpt-char 1", "chars": 3}')
    code = ("import sys; from minigpt.tokenizer import CharTokenizer\n"
            "try:\n    CharTokenizer.load(sys.argv[1])\nexcept ValueError as e:\n    print(e)")
    done = subprocess.run([sys.executable, "-O", "-c", code, str(path)], capture_output=True, text=True,
                          cwd=ROOT, check=True)
    assert done.stdout.startswith(f"{path}, line 1: expected \"chars\""), done.stdout + done.stderr


def test_bad_training_input():
    with pytest.raises(ValueError, match="empty"):
        BPETokenizer.train("", vocab_size=300)
    with pytest.raises(ValueError, match="vocab_size=255"):
        BPETokenizer.train("hello", vocab_size=255)
    with pytest.raises(ValueError, match="vocab_size=256"):
        BPETokenizer.train("hello", vocab_size=256)  # 256 bytes + <|endoftext|> need 257


def test_char_tokenizer(tmp_path):
    text = story_corpus(20)
    tok = CharTokenizer.train(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == len(set(text))
    tok.save(tmp_path / "c.json")
    assert CharTokenizer.load(tmp_path / "c.json").chars == tok.chars
    with pytest.raises(ValueError, match="'Ω'"):
        tok.encode("Ω")
    with pytest.raises(ValueError, match="empty"):
        CharTokenizer.train("")
    (tmp_path / "c.json").write_text('{"format": "minigpt-char 1"')
    with pytest.raises(ValueError, match="c.json"):
        CharTokenizer.load(tmp_path / "c.json")
