"""LoRA: a frozen ``nn.Linear`` plus a trainable low-rank update, put into a model by name, merged
into the base weights and back, counted, and saved and loaded on its own (the adapters only).

Built in: 05_finetuning
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from minigpt.files import atomic_write, load_tensors


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update: y = base(x) + (alpha / r) x A^T B^T.

    A (r, in) starts random and B (out, r) starts at zero, so the layer starts equal to its base and
    training moves it along a rank-r subspace. ``merge()`` adds (alpha / r) B A into the base weight,
    so inference costs nothing extra; ``unmerge()`` takes it out again.

    Built in: 05_finetuning
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, not {type(base).__name__}")
        width = min(base.in_features, base.out_features)
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= width:
            raise ValueError(f"rank={rank!r} must be an integer from 1 to {width}, the smaller side of this "
                             f"{base.in_features} -> {base.out_features} layer")
        alpha = float(rank if alpha is None else alpha)
        if alpha <= 0:
            raise ValueError(f"alpha={alpha} must be positive")
        self.base, self.rank, self.alpha, self.scaling = base, rank, alpha, alpha / rank
        for p in base.parameters():
            p.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises a weight
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta(self) -> torch.Tensor:
        """The update to the base weight, (alpha / r) B A, shaped like it: (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.merged:
            y = y + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling
        return y

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta()
            self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, merged={self.merged}"


LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, targets: Sequence[str] = LORA_TARGETS,
             trainable: Sequence[str] = (), dropout: float = 0.0) -> list[str]:
    """Freeze ``model`` and wrap each ``nn.Linear`` whose name ends with one of ``targets`` in a
    :class:`LoRALinear`. Parameters whose names start with one of ``trainable`` (a new head, say)
    stay trainable. Returns the wrapped modules' names.

    Built in: 05_finetuning
    """
    linear = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen = [n for n in linear if n.endswith(tuple(targets))]
    if not chosen:
        raise ValueError(f"no nn.Linear matches targets={list(targets)}; this model's are named "
                         f"{sorted({'.'.join(n.split('.')[-2:]) for n in linear})}")
    keep = tuple(trainable)
    for name, p in model.named_parameters():
        p.requires_grad_(bool(keep) and name.startswith(keep))
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(linear[name], rank, alpha, dropout))
    return chosen


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameter_count(shapes: Sequence[tuple[int, int]], rank: int) -> int:
    """Trainable parameters that LoRA of rank r adds to layers of (in, out) shapes: r (in + out) each."""
    return sum(rank * (i + o) for i, o in shapes)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.unmerge()


def save_adapters(model: nn.Module, path: str | Path) -> Path:
    """Write only what finetuning trained (every parameter with ``requires_grad``: the LoRA matrices and
    any trainable head) to ``path``, atomically; a few hundred kilobytes instead of the whole model.

    Built in: 05_finetuning
    """
    modules = lora_modules(model)
    if any(m.merged for m in modules.values()):
        raise ValueError("the adapters are merged into the base weights: unmerge_lora(model) before saving")
    tensors = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    if not tensors:
        raise ValueError("the model has no trainable parameters to save")
    state = {"format": "minigpt-adapters 1", "tensors": tensors,
             "lora": {n: {"rank": m.rank, "alpha": m.alpha} for n, m in modules.items()}}
    buf = io.BytesIO()
    torch.save(state, buf)
    path = Path(path)
    atomic_write(path, buf.getvalue())
    return path


def load_adapters(model: nn.Module, path: str | Path) -> None:
    """Load adapters saved by :func:`save_adapters` into ``model``, which must already have the same
    LoRA layers (call :func:`add_lora` with the same rank and targets on the same base model first).

    Built in: 05_finetuning
    """
    state = load_tensors(path, "adapter file")
    if not isinstance(state, dict) or state.get("format") != "minigpt-adapters 1":
        raise ValueError(f"{path} is not a minigpt adapter file")
    ours = {n: {"rank": m.rank, "alpha": m.alpha} for n, m in lora_modules(model).items()}
    if ours != state["lora"]:
        raise ValueError(f"the model's LoRA layers ({len(ours)}) do not match the file's "
                         f"({len(state['lora'])}); add_lora with the same rank and targets first")
    params = dict(model.named_parameters())
    missing = [n for n in state["tensors"] if n not in params]
    if missing:
        raise ValueError(f"the model has no parameter {missing[0]!r} that the adapter file holds")
    with torch.no_grad():
        for n, t in state["tensors"].items():
            if params[n].shape != t.shape:
                raise ValueError(f"{n}: shape {tuple(t.shape)} in the file, {tuple(params[n].shape)} here")
            params[n].copy_(t)
