"""Where and how a model runs: :class:`Target` bundles a wafer, the mode (inference or training),
the context length and the number format, so that placement, its strategies, the optimizer and the
emulator take one argument instead of four loose ones.

Built in: 11_placement
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, get_args

from wafer.hardware import DTYPE_BYTES, MODEL_DTYPE, Dtype, Wafer, positive_int

Mode = Literal["inference", "training"]
MODES: tuple[str, ...] = get_args(Mode)


def check_mode(mode: object) -> Mode:
    """``mode`` if it is one of :data:`MODES`; else a ValueError naming it."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    return mode  # type: ignore[return-value]


@dataclass(frozen=True)
class Target:
    """A wafer, a mode, a context length (tokens per sequence) and a number format.

    ``mode``: ``"inference"`` holds 16-bit weights and one sequence's KV cache; ``"training"`` holds
    the optimizer's state and one sequence's activations (see :mod:`wafer.stages`). ``dtype``
    defaults to :data:`wafer.hardware.MODEL_DTYPE`, the package's format for a model on the wafer.

    Built in: 11_placement
    """

    wafer: Wafer
    mode: Mode = "inference"
    context: int = 1024
    dtype: Dtype = MODEL_DTYPE

    def __post_init__(self) -> None:
        if not isinstance(self.wafer, Wafer):
            raise ValueError(f"wafer={self.wafer!r} must be a wafer.hardware.Wafer (for example WSE2)")
        check_mode(self.mode)
        positive_int("context", self.context)
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype={self.dtype!r} is not one of {sorted(DTYPE_BYTES)}")

    def replace(self, **changes) -> Target:
        """A copy with some fields changed, e.g. ``target.replace(mode="training")``."""
        return dataclasses.replace(self, **changes)
