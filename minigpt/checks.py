"""Checks of user input shared by the package, so that one kind of bad value gets one message.

Built in: 03_gpt
"""

from __future__ import annotations


def positive_int(name: str, value: object) -> int:
    """``value`` if it is an integer of at least 1 (a bool is not); otherwise a ValueError that names
    it: ``"n_layer=0 must be a positive integer"``.

    Built in: 03_gpt
    """
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return value
