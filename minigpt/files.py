"""Safe file I/O shared by the package: atomic writes, strict UTF-8 reads, and weights-only loading
of tensor files (checkpoints, adapters).

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
    """``torch.load`` with ``weights_only=True``: tensors and plain data only, never pickled code.

    A file that the weights-only unpickler refuses (it holds other objects, which unpickling could
    turn into running code, or it is not a pickle at all) or that cannot be read (truncated,
    corrupted) is a ValueError naming the file and ``what`` it should have been. The message never
    suggests loading it some other way.
    """
    import pickle

    import torch

    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path} is not a loadable {what}: it holds more than tensors and plain data "
                         f"(or is no {what} at all), and minigpt never runs code from a checkpoint, "
                         f"so it does not load it") from None
    except Exception as e:  # noqa: BLE001 (a damaged file fails in many ways, all of them the same here)
        raise ValueError(f"{path} is not a loadable {what}: it is truncated or corrupted "
                         f"({type(e).__name__})") from None
