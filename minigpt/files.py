"""Safe file I/O shared by the package: atomic writes and strict UTF-8 reads.

Built in: 01_tokens
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write to a temporary file beside ``path``, then rename it over ``path``.

    Readers see the old file or the new one, never half of one, even if the process dies mid-write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_utf8(path: str | os.PathLike) -> str:
    """The file's text; ValueError naming the file, the bad byte and its offset if it is not UTF-8."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: invalid byte {data[e.start]:#04x} at offset "
                         f"{e.start}") from None


def load_tensors(path: str | os.PathLike, what: str, device="cpu"):
    """``torch.load`` with ``weights_only=True`` (tensors and plain data only, never pickled code); a
    file that is refused or unreadable is a ValueError naming ``what`` it should have been."""
    import torch

    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 (unpickling errors come in many types)
        raise ValueError(f"{path} is not a loadable {what} (refused or corrupted): "
                         f"{str(e).splitlines()[0][:200]}") from None
