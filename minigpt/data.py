"""Corpora: the story world (from :mod:`minigpt.stories` and :mod:`minigpt.entropy`, importable from
here), UTF-8 text files, and a cached, checksummed downloader.

The only network access in the book is :func:`download` (and :func:`fetch`, which names a corpus):
it is explicit, verifies a SHA256 before a file is used, writes atomically, and afterwards reads
from its cache without touching the network.

Built in: 01_tokens
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from minigpt.entropy import EntropyRate, entropy_rate  # noqa: F401  (part of minigpt.data's interface)
from minigpt.files import read_utf8
from minigpt.stories import (  # noqa: F401  (the story world is part of minigpt.data's interface)
    QUESTIONS,
    Facts,
    Story,
    generate_stories,
    generate_story,
    parse,
    questions,
    sentences_parsed,
    story_corpus,
)


@dataclass(frozen=True)
class Dataset:
    """A public text corpus: where it lives and the SHA256 it must have."""

    url: str
    sha256: str
    filename: str
    size_bytes: int


DATASETS = {
    # Karpathy's char-rnn collection of Shakespeare's plays, 40,000 lines.
    "tinyshakespeare": Dataset(
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        filename="tinyshakespeare.txt",
        size_bytes=1_115_394,
    ),
}


def default_cache_dir() -> Path:
    """``$MINIGPT_CACHE`` if set, else ``~/.cache/minigpt``."""
    return Path(os.environ.get("MINIGPT_CACHE") or Path.home() / ".cache" / "minigpt")


def load_text(path: str | os.PathLike) -> str:
    """Read a UTF-8 text file; ValueError naming the file and offset if it is not UTF-8 or is empty.

    Built in: 01_tokens
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is not a file")
    text = read_utf8(path)
    if not text:
        raise ValueError(f"{path} is empty: a corpus needs some text")
    return text


def train_val_split(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """The first ``1 - val_fraction`` of the text for training, the rest for validation.

    A contiguous split (not a shuffle), so validation text is never seen in training windows.

    Built in: 01_tokens
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be between 0 and 1 (exclusive)")
    if len(text) < 2:
        raise ValueError(f"text of {len(text)} character(s) is too short to split")
    cut = min(max(1, round(len(text) * (1 - val_fraction))), len(text) - 1)
    return text[:cut], text[cut:]


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(url: str, sha256: str, cache_dir: str | os.PathLike | None = None,
             filename: str | None = None, timeout: float = 60.0) -> Path:
    """Return the path of ``url``'s file in ``cache_dir``, downloading it only if not cached.

    A cached file whose SHA256 matches is returned without any network access. A download is
    written to a temporary file in the cache directory, checked, then renamed into place, so an
    interrupted or wrong download never leaves a file behind. Raises ValueError on a checksum
    mismatch and OSError (with the URL and reason) when the server cannot deliver the file.

    Built in: 01_tokens
    """
    sha256 = sha256.lower()
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError(f"sha256={sha256!r} must be 64 hexadecimal digits")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / (filename or url.rstrip("/").rsplit("/", 1)[-1] or "download")
    if target.is_file() and sha256_file(target) == sha256:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=target.name + ".", suffix=".part")
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    for block in iter(lambda: response.read(1 << 20), b""):
                        h.update(block)
                        out.write(block)
            except urllib.error.HTTPError as e:
                raise OSError(f"download of {url} failed: the server answered {e.code} {e.reason}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                reason = getattr(e, "reason", e)
                raise OSError(f"download of {url} failed: {reason}") from None
        if h.hexdigest() != sha256:
            raise ValueError(f"download of {url} has SHA256 {h.hexdigest()}, expected {sha256}: "
                             f"the file was not saved")
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def fetch(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Download (or find in the cache) a named corpus from :data:`DATASETS`.

    Built in: 01_tokens
    """
    if name not in DATASETS:
        raise ValueError(f"unknown corpus {name!r}; known corpora: {sorted(DATASETS)}")
    d = DATASETS[name]
    return download(d.url, d.sha256, cache_dir, filename=d.filename)
