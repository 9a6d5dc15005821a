"""Tokenizers: characters, and byte-level BPE with GPT-2's pre-splitting; both saved as text files
that are read back with checks naming the file and the line.

``BPETokenizer`` encodes exactly as ``tiktoken`` does when given the same ranks: each pre-split chunk
starts as bytes, and the adjacent pair whose concatenation has the lowest rank is merged (leftmost
first on ties) until no pair's concatenation is a token.

Built in: 01_tokens
"""

from __future__ import annotations

import base64
import binascii
import heapq
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Self

import regex

from minigpt.files import atomic_write, read_utf8

# GPT-2's pre-splitting pattern: contractions, letters, numbers, other symbols, and whitespace (a run
# of spaces keeps its last space for the word that follows).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENDOFTEXT = "<|endoftext|>"
_FORMAT = "minigpt-bpe 1"
_CHAR_FORMAT = "minigpt-char 1"
_CACHE_LIMIT = 200_000  # chunks remembered by encode; cleared when full


class _SavedAsText:
    """``save`` and ``load`` for a tokenizer that has ``to_text`` and ``from_text``."""

    def to_text(self) -> str:
        raise NotImplementedError

    @classmethod
    def from_text(cls, text: str, source: str = "the tokenizer text") -> Self:
        raise NotImplementedError

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_text` to ``path`` atomically."""
        atomic_write(Path(path), self.to_text())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Self:
        return cls.from_text(read_utf8(Path(path)), str(path))


class CharTokenizer(_SavedAsText):
    """One token per character, over the characters of a training text (sorted, so ids are stable).

    Built in: 01_tokens
    """

    def __init__(self, chars: Iterable[str]):
        self.chars = sorted(set(chars))
        if not self.chars:
            raise ValueError("chars is empty: a character tokenizer needs at least one character")
        if any(len(c) != 1 for c in self.chars):
            raise ValueError(f"chars={self.chars!r} must be single characters")
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        if not text:
            raise ValueError("text is empty: cannot build a vocabulary from an empty corpus")
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in the vocabulary of {self.vocab_size} "
                             f"characters") from None

    def decode(self, ids: Iterable[int]) -> str:
        try:
            return "".join(self.chars[i] for i in ids)
        except (IndexError, TypeError):
            raise ValueError(f"ids must be integers in [0, {self.vocab_size})") from None

    def to_text(self) -> str:
        return json.dumps({"format": _CHAR_FORMAT, "chars": "".join(self.chars)})

    @classmethod
    def from_text(cls, text: str, source: str = "the tokenizer text") -> CharTokenizer:
        """The tokenizer that :meth:`to_text` wrote; ValueError naming ``source`` and the line if the
        text is not one."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise _bad_file(source, _CHAR_FORMAT, e.lineno, f"JSON ({e.msg})") from None
        if not isinstance(data, dict) or data.get("format") != _CHAR_FORMAT:
            raise _bad_file(source, _CHAR_FORMAT, 1, f'a JSON object with "format": "{_CHAR_FORMAT}"')
        if not isinstance(data.get("chars"), str):
            raise _bad_file(source, _CHAR_FORMAT, 1, '"chars": the vocabulary\'s characters as a string')
        return cls(data["chars"])


class BPETokenizer(_SavedAsText):
    """Byte-level BPE: ``ranks`` maps token bytes to ids; special tokens come after them.

    Built in: 01_tokens
    """

    def __init__(self, ranks: dict[bytes, int], special_tokens: dict[str, int] | None = None,
                 pattern: str = GPT2_PATTERN):
        special_tokens = dict(special_tokens or {})
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise ValueError("ranks must be the ids 0..n-1, each once")
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise ValueError(f"ranks lack the single byte(s) {missing[:5]}: every byte must be a token")
        taken = set(ranks.values())
        for name, i in special_tokens.items():
            if i in taken:
                raise ValueError(f"special token {name!r} has id {i}, which is already a token")
            taken.add(i)
        self.ranks = ranks
        self.special_tokens = special_tokens
        self.pattern = pattern
        self._split = regex.compile(pattern)
        self._special_split = (regex.compile("(" + "|".join(regex.escape(s) for s in sorted(
            special_tokens, key=len, reverse=True)) + ")") if special_tokens else None)
        self._bytes = {i: b for b, i in ranks.items()} | {i: s.encode() for s, i in special_tokens.items()}
        self._cache: dict[str, list[int]] = {}

    # -- training ------------------------------------------------------------------------------------
    @classmethod
    def train(cls, text: str, vocab_size: int, special_tokens: Iterable[str] = (ENDOFTEXT,),
              pattern: str = GPT2_PATTERN) -> BPETokenizer:
        """Learn merges until the vocabulary (256 bytes + merges + special tokens) has ``vocab_size``.

        Pair counts are kept up to date after each merge by touching only the chunks that contain the
        merged pair; the most frequent pair comes off a heap (ties: the smallest ids). Special tokens
        in the text split it and are never merged across.
        """
        special_tokens = list(dict.fromkeys(special_tokens))
        if not isinstance(text, str) or not text:
            raise ValueError("text is empty: BPE needs a non-empty training corpus")
        if vocab_size < 256 + len(special_tokens):
            raise ValueError(f"vocab_size={vocab_size} is below 256 + {len(special_tokens)} special "
                             f"token(s): byte-level BPE needs a token for every byte")
        splitter = regex.compile(pattern)
        pieces = (regex.split("|".join(regex.escape(s) for s in special_tokens), text)
                  if special_tokens else [text])
        chunk_counts = Counter(c for piece in pieces for c in splitter.findall(piece))
        words = [list(c.encode("utf-8")) for c in chunk_counts]
        freqs = list(chunk_counts.values())
        ranks = {bytes([b]): b for b in range(256)}
        token_bytes = [bytes([b]) for b in range(256)]

        pair_counts: Counter = Counter()
        where: defaultdict = defaultdict(set)  # pair -> indices of words that contain it
        for w, (word, f) in enumerate(zip(words, freqs)):
            for pair in zip(word, word[1:]):
                pair_counts[pair] += f
                where[pair].add(w)
        heap = [(-c, pair) for pair, c in pair_counts.items()]
        heapq.heapify(heap)

        n_merges = vocab_size - 256 - len(special_tokens)
        while len(token_bytes) - 256 < n_merges and heap:
            neg, pair = heapq.heappop(heap)
            if pair_counts.get(pair, 0) != -neg or -neg <= 0:
                continue  # a stale entry: the count changed after it was pushed
            merged = token_bytes[pair[0]] + token_bytes[pair[1]]
            new_id = ranks.get(merged)
            if new_id is None:  # the vocabulary is keyed by bytes: a string already in it keeps its id
                new_id = ranks[merged] = len(token_bytes)
                token_bytes.append(merged)
            changed = set()
            for w in where.pop(pair):
                word, f = words[w], freqs[w]
                for p in zip(word, word[1:]):
                    pair_counts[p] -= f
                    changed.add(p)
                words[w] = word = _merge(word, pair, new_id)
                for p in zip(word, word[1:]):
                    pair_counts[p] += f
                    where[p].add(w)
                    changed.add(p)
            for p in changed:
                c = pair_counts[p]
                if c > 0:
                    heapq.heappush(heap, (-c, p))
                else:
                    del pair_counts[p]
                    where.pop(p, None)
        n = len(token_bytes)
        specials = {s: n + k for k, s in enumerate(special_tokens)}
        return cls(ranks, specials, pattern)

    # -- encoding ------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.ranks) + len(self.special_tokens)

    def encode(self, text: str, allowed_special: str | Iterable[str] = (),
               disallowed_special: str | Iterable[str] = "all") -> list[int]:
        """Token ids for ``text``; the special-token arguments mean what they mean in tiktoken.

        Special tokens in ``allowed_special`` ("all" or names) are encoded as their ids. Text that
        contains a disallowed special token raises ValueError; anything neither allowed nor
        disallowed is encoded as ordinary text.
        """
        allowed = self._special_names(allowed_special, "allowed_special")
        disallowed = self._special_names(disallowed_special, "disallowed_special") - allowed
        for s in disallowed:
            if s in text:
                raise ValueError(f"text contains the special token {s!r}; pass allowed_special={{{s!r}}} "
                                 f"to encode it as a token, or disallowed_special=() to encode it as text")
        if not allowed or self._special_split is None:  # (allowed names are special tokens, so a split)
            return self._encode_ordinary(text)
        ids: list[int] = []
        for k, piece in enumerate(self._special_split.split(text)):
            if k % 2 and piece in allowed:
                ids.append(self.special_tokens[piece])
            elif piece:
                ids.extend(self._encode_ordinary(piece))
        return ids

    def _special_names(self, which: str | Iterable[str], arg: str) -> set[str]:
        if which == "all":
            return set(self.special_tokens)
        names = {which} if isinstance(which, str) else set(which)
        unknown = names - set(self.special_tokens)
        if unknown:
            raise ValueError(f"{arg}={sorted(unknown)!r} names unknown special token(s); this tokenizer "
                             f"has {sorted(self.special_tokens)!r}")
        return names

    def _encode_ordinary(self, text: str) -> list[int]:
        ids: list[int] = []
        cache = self._cache
        for chunk in self._split.findall(text):
            hit = cache.get(chunk)
            if hit is None:
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                hit = cache[chunk] = self._bpe(chunk.encode("utf-8", "surrogateescape"))
            ids.extend(hit)
        return ids

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids for arbitrary bytes (not necessarily UTF-8); ``decode_bytes`` inverts it."""
        text = bytes(data).decode("utf-8", "surrogateescape")  # invalid bytes become lone surrogates
        ids: list[int] = []
        for chunk in self._split.findall(text):
            ids.extend(self._bpe(chunk.encode("utf-8", "surrogateescape")))
        return ids

    def _bpe(self, piece: bytes) -> list[int]:
        """Merge the lowest-ranked adjacent pair, leftmost first, until none is a token."""
        ranks = self.ranks
        if piece in ranks:
            return [ranks[piece]]
        n = len(piece)
        nxt = list(range(1, n + 1))  # part starting at i ends at nxt[i]
        prv = list(range(-1, n - 1))
        heap = []
        for i in range(n - 1):
            r = ranks.get(piece[i:i + 2])
            if r is not None:
                heap.append((r, i, i + 1, i + 2))
        heapq.heapify(heap)
        while heap:
            r, i, j, k = heapq.heappop(heap)
            if nxt[i] != j or j >= n or nxt[j] != k:
                continue  # stale: one of the two parts has merged since
            nxt[i] = k  # merge part j into part i
            nxt[j] = -1
            if k < n:
                prv[k] = i
            if k < n:
                r2 = ranks.get(piece[i:nxt[k]])
                if r2 is not None:
                    heapq.heappush(heap, (r2, i, k, nxt[k]))
            h = prv[i]
            if h >= 0:
                r2 = ranks.get(piece[h:k])
                if r2 is not None:
                    heapq.heappush(heap, (r2, h, i, k))
        out, i = [], 0
        while i < n:
            out.append(ranks[piece[i:nxt[i]]])
            i = nxt[i]
        return out

    # -- decoding ------------------------------------------------------------------------------------
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        try:
            return b"".join(self._bytes[i] for i in ids)
        except (KeyError, TypeError):
            raise ValueError(f"ids must be integers in [0, {self.vocab_size})") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Text for ``ids``; bytes that are not valid UTF-8 become U+FFFD, as in tiktoken."""
        return self.decode_bytes(ids).decode("utf-8", "replace")

    def token_bytes(self, i: int) -> bytes:
        return self.decode_bytes([i])

    # -- files ---------------------------------------------------------------------------------------
    def to_text(self) -> str:
        """The tokenizer as text, one item per line.

        The format::

            minigpt-bpe 1
            pattern <the pre-split regex as a JSON string>
            tokens <N>
            <base64 of token bytes> <id>          N lines, ids 0..N-1 in order
            specials <M>
            <special token as a JSON string> <id>  M lines
            end
        """
        lines = [_FORMAT, "pattern " + json.dumps(self.pattern), f"tokens {len(self.ranks)}"]
        for b, i in sorted(self.ranks.items(), key=lambda kv: kv[1]):
            lines.append(f"{base64.b64encode(b).decode('ascii')} {i}")
        lines.append(f"specials {len(self.special_tokens)}")
        lines += [f"{json.dumps(s)} {i}" for s, i in self.special_tokens.items()]
        lines.append("end")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_text(cls, text: str, source: str = "the tokenizer text") -> BPETokenizer:
        """The tokenizer that :meth:`to_text` wrote; ValueError naming ``source``, the line and what
        was expected there if the text is not one."""
        lines = _Lines(text, source, _FORMAT)
        if lines.next("the format line") != _FORMAT:
            raise lines.bad(f"the format line {_FORMAT!r}")
        pattern = lines.json_str(lines.field("pattern", "the pre-split regex as a JSON string"),
                                 "the pre-split regex as a JSON string")
        try:
            regex.compile(pattern)
        except regex.error as e:
            raise lines.bad(f"a valid regex ({e})") from None
        n = lines.count(lines.field("tokens", "the number of tokens"), "the number of tokens")
        ranks: dict[bytes, int] = {}
        for _ in range(n):
            b64, _, i = lines.next("'<base64 of token bytes> <id>'").partition(" ")
            try:
                token = base64.b64decode(b64, validate=True)
            except binascii.Error:
                raise lines.bad("'<base64 of token bytes> <id>' with valid base64") from None
            if token in ranks:
                raise lines.bad("a token whose bytes appear once, but they appeared before")
            ranks[token] = lines.count(i, "'<base64 of token bytes> <id>' with an integer id")
        what = "the number of special tokens"
        m = lines.count(lines.field("specials", what), what)
        specials: dict[str, int] = {}
        for _ in range(m):
            name, _, i = lines.next("'<special token as a JSON string> <id>'").rpartition(" ")
            specials[lines.json_str(name, "a special token as a JSON string")] = lines.count(
                i, "'<special token as a JSON string> <id>' with an integer id")
        if lines.next("'end'") != "end":
            raise lines.bad("'end'")
        try:
            return cls(ranks, specials, pattern)
        except ValueError as e:  # well formed, but not a tokenizer (ids missing, a byte without a token)
            raise ValueError(f"{source}: {e}") from None


Tokenizer = CharTokenizer | BPETokenizer  # what a checkpoint can hold


def _bad_file(source: str, kind: str, line: int, expected: str) -> ValueError:
    return ValueError(f"{source}, line {line}: expected {expected}; it is not a valid {kind} file "
                      f"(corrupted or truncated?)")


class _Lines:
    """The lines of a tokenizer file, read in order; every error names the file and the line."""

    def __init__(self, text: str, source: str, kind: str):
        self.lines, self.source, self.kind, self.at = text.split("\n"), source, kind, 0

    def bad(self, expected: str) -> ValueError:
        return _bad_file(self.source, self.kind, self.at, expected)

    def next(self, expected: str) -> str:
        """The next line; ``expected`` says what it should hold, for the error if the file ends."""
        self.at += 1
        if self.at > len(self.lines):
            raise self.bad(f"{expected}, but the file ends")
        return self.lines[self.at - 1]

    def field(self, name: str, expected: str) -> str:
        """The rest of the next line, which must start with ``name`` and a space."""
        head, _, rest = self.next(f"'{name} <{expected}>'").partition(" ")
        if head != name:
            raise self.bad(f"'{name} <{expected}>'")
        return rest

    def count(self, text: str, expected: str) -> int:
        """``text`` as an integer of 0 or more."""
        if not text.isascii() or not text.isdigit():
            raise self.bad(expected)
        return int(text)

    def json_str(self, text: str, expected: str) -> str:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise self.bad(expected) from None
        if not isinstance(value, str):
            raise self.bad(expected)
        return value


def _merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every non-overlapping occurrence of ``pair`` (left to right) with ``new_id``."""
    out, i, n = [], 0, len(ids)
    a, b = pair
    while i < n:
        if i < n - 1 and ids[i] == a and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out
