"""The emulator's program phase by phase, without running it: how it cuts a model's vectors into
blocks (:class:`Layout`, :func:`split`), the cycles of its local work (:data:`CYCLES`), the cost model
of each phase (:func:`gemv_phase`, :func:`layernorm_phase`, :func:`rmsnorm_phase`,
:func:`attention_phase`, :func:`transfer_phase`), and :func:`program`, one token's phases on any grid.
:class:`wafer.emulate.Emulator` runs the same program on the mesh simulator and records each phase's
prediction from these same functions.

The predictions are chapter 10's formulas: GEMVs by :func:`wafer.cost.gemv_cycles`, the allreduces by
:func:`wafer.cost.allreduce_cycles`, transfers by :func:`wafer.cost.transfer_cycles`, and local work
at the cycles of :data:`CYCLES`. Each phase is charged for the largest block of its PEs.

Built in: 14_emulation
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wafer.cost import allreduce_cycles, gemv_cycles, transfer_cycles
from wafer.hardware import Wafer
from wafer.placement import Placement

# Cycles per element of the local work: a convention, as chapter 09's vector FLOPs are, not a
# measurement. A residual add or a bias, one; LayerNorm's subtraction, division, scale and shift, four;
# RMSNorm's division and scale, two; the tanh GELU, about eight; softmax's exponential, sum and
# division, four; RoPE, per rotated element, six (two multiplies and an add, and its share of the
# pair's cosine and sine); SwiGLU, per element of the first product's [gate | up], five (ten a pair:
# the gate's SiLU at GELU's eight, its product with up, and the write).
CYCLES = {"add": 1, "layernorm": 4, "gelu": 8, "softmax": 4, "rmsnorm": 2, "rope": 6, "swiglu": 5}


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    """Block boundaries of n items over ``parts`` PEs (the first n % parts get one more)."""
    edges = np.cumsum([0] + [n // parts + (1 if i < n % parts else 0) for i in range(parts)])
    return [(int(a), int(b)) for a, b in zip(edges, edges[1:])]


def split(n: int, parts: int, unit: int = 1) -> list[tuple[int, int]]:
    """Block boundaries of n items over ``parts`` PEs in whole units of ``unit`` items (a unit is
    never cut: a rotated pair, a gate with its up, a key dimension with its queries)."""
    if unit == 1:
        return _split(n, parts)
    return [(unit * a, unit * b) for a, b in _split(n // unit, parts)]


def largest(n: int, parts: int, unit: int = 1) -> int:
    """The largest block of :func:`split`: what every PE is charged for."""
    return max(b - a for a, b in split(n, parts, unit))


@dataclass
class Phase:
    """One simulator run of the program: its name, the stage, and its cycles simulated and predicted."""

    name: str
    stage: str
    simulated: int
    predicted: int


@dataclass(frozen=True)
class Product:
    """One product with a weight matrix: ``out`` x ``inp``, from the top row to the first column (or
    back, ``turned``), ``finish`` cycles per output element at its end, and the ``units`` (of its
    outputs, of its inputs) that its blocks never cut."""

    name: str
    out: int
    inp: int
    turned: bool
    finish: int
    units: tuple[int, int] = (1, 1)


@dataclass(frozen=True)
class Layout:
    """What the program needs of a model's shape (:func:`layout` reads it from a ``GPTConfig``).

    ``group`` query heads share each key-value head (grouped-query attention; 1 for GPT-2), and each
    PE of a block's first column holds a block of the key and value dimensions with the ``group``
    query dimensions that meet them, so that the KV cache is ``kv`` wide, not n_embd.
    ``pair`` is 2 where RoPE rotates pairs of dimensions (a block never splits a pair), else 1.
    ``gated``: SwiGLU's gate and up, each gate beside its up.
    """

    width: int  # n_embd: the stream, the queries, attention's output
    head_dim: int
    kv: int  # the keys' (and the values') width: kv heads x head_dim
    hidden: int  # the MLP's hidden width
    vocab: int
    group: int
    pair: int
    gated: bool
    norm: str  # "layernorm" or "rmsnorm": the phase's name too
    biased: bool
    positions: str  # "learned", "rope" or "none"

    def products(self) -> dict[str, Product]:
        """A block's products (and the head's), by phase name, with their finishing work: a bias where
        there are biases, RoPE on q and k, the MLP's activation, the residual add after Wo and Wproj."""
        add, b = CYCLES["add"], CYCLES["add"] * self.biased
        rope = CYCLES["rope"] if self.positions == "rope" else 0
        q, kv, act = self.group * self.pair, self.pair, CYCLES["swiglu" if self.gated else "gelu"]
        c, f = self.width, self.hidden
        return {p.name: p for p in (
            Product("Wq", c, c, False, b + rope, (q, 1)),
            Product("Wk", self.kv, c, False, b + rope, (kv, 1)),
            Product("Wv", self.kv, c, False, b, (kv, 1)),
            Product("Wo", c, c, True, b + add, (1, q)),
            Product("Wfc", (2 if self.gated else 1) * f, c, False, b + act, (2 if self.gated else 1, 1)),
            Product("Wproj", c, f, True, b + add),
            Product("Whead", self.vocab, c, False, 0))}


def layout(config) -> Layout:
    """The :class:`Layout` of a minigpt ``GPTConfig``, or a ValueError naming an option the emulator
    cannot take (muP, a mixture of experts, Qwen3's norms on queries and keys, LLaMA-3.1's rescaled
    RoPE, a head size set apart from n_embd / n_head, biases on q, k and v but not on the other
    products, or the reverse)."""
    if config.mup:
        raise ValueError(f"the emulator runs GPT-2's standard parametrisation; this model uses muP "
                         f"(mup_base_width={config.mup_base_width})")
    if config.n_expert:
        raise ValueError(f"the emulator runs a dense MLP in every block; this model has n_expert="
                         f"{config.n_expert} (a mixture of experts)")
    if config.qk_norm:
        raise ValueError("the emulator has no norm on each head's query and key: qk_norm=True (valid: False)")
    if config.rope_scaling is not None:
        raise ValueError(f"the emulator rotates by RoPE's unscaled frequencies: rope_scaling="
                         f"{config.rope_scaling} (valid: None)")
    if config.head_dim * config.n_head != config.n_embd:
        raise ValueError(f"the emulator needs heads of n_embd / n_head = {config.n_embd / config.n_head:g}: "
                         f"this model has head_size={config.head_size} (valid: None, or n_embd / n_head)")
    if config.qkv_bias is not None and config.qkv_bias != config.bias:
        raise ValueError(f"the emulator puts biases on every product or on none: qkv_bias={config.qkv_bias} "
                         f"with bias={config.bias} (valid: qkv_bias=None, or equal to bias)")
    return Layout(width=config.n_embd, head_dim=config.head_dim,
                  kv=config.kv_heads * config.head_dim, hidden=config.ffn_hidden, vocab=config.vocab_size,
                  group=config.n_head // config.kv_heads, pair=2 if config.positions == "rope" else 1,
                  gated=config.mlp == "swiglu", norm=config.norm, biased=config.bias,
                  positions=config.positions)


def gemv_phase(wafer: Wafer, out: int, inp: int, rect, turned: bool, finish: int, levels: int = 2,
               units: tuple[int, int] = (1, 1)) -> int:
    """A GEMV on ``rect`` from the top row to the first column (or, ``turned``, back), and the
    ``finish`` cycles per output element at the end (bias, activation, RoPE, residual); its outputs
    and inputs in blocks of whole ``units``, every PE charged for the largest."""
    across = rect.h if not turned else rect.w  # output blocks
    along = rect.w if not turned else rect.h  # input blocks
    block = largest(out, across, units[0])
    rows, cols = across * block, along * largest(inp, along, units[1])  # the largest blocks set the pace
    return gemv_cycles(wafer, rows, cols, (across, along), levels).total + finish * block


def layernorm_phase(wafer: Wafer, n: int, pes: int, levels: int = 2) -> int:
    """Local sums, an allreduce of the two along ``pes`` PEs, the local normalisation."""
    block = largest(n, pes)
    sums = allreduce_cycles(wafer, pes, 2, levels) if pes > 1 else 0
    return 2 * block + sums + CYCLES["layernorm"] * block


def rmsnorm_phase(wafer: Wafer, n: int, pes: int, levels: int = 2) -> int:
    """The local sum of squares, its allreduce along ``pes`` PEs (one value), the local scaling."""
    block = largest(n, pes)
    sums = allreduce_cycles(wafer, pes, 1, levels) if pes > 1 else 0
    return block + sums + CYCLES["rmsnorm"] * block


def norm_phase(wafer: Wafer, norm: str, n: int, pes: int, levels: int = 2) -> int:
    """``norm`` ("layernorm" or "rmsnorm") of n elements along ``pes`` PEs."""
    return (rmsnorm_phase if norm == "rmsnorm" else layernorm_phase)(wafer, n, pes, levels)


def attention_phase(wafer: Wafer, n: int, heads: int, t: int, pes: int, levels: int = 2,
                    unit: int = 1) -> int:
    """Partial scores of ``t`` positions, their allreduce down ``pes`` PEs, softmax and the values: the
    queries' ``n`` dimensions in blocks of whole ``unit``."""
    block = largest(n, pes, unit)
    scores = allreduce_cycles(wafer, pes, heads * t, levels) if pes > 1 else 0
    return t * block + scores + CYCLES["softmax"] * heads * t + t * block


def transfer_phase(wafer: Wafer, n: int, pes: int, hops: int) -> int:
    return transfer_cycles(wafer, hops, largest(n, pes))


def program(config, placement: Placement, position: int, levels: int = 2) -> list[tuple[str, str, int]]:
    """The cost model's (phase, stage, cycles) of one token at ``position`` for the emulator's program
    on ``placement``, without running it: the same phases, on grids of any size (WSE-2 included).

    Built in: 14_emulation
    """
    lay = layout(config)
    w, rects, names = placement.wafer, placement.rects, [s.name for s in placement.stages]
    c, t, products = config.n_embd, position + 1, lay.products()
    gap = [abs(rects[i + 1].y - rects[i].y) for i in range(len(rects) - 1)]

    def gemv(name: str, i: int) -> tuple[str, str, int]:
        p = products[name]
        return name, names[i], gemv_phase(w, p.out, p.inp, rects[i], p.turned, p.finish, levels, p.units)

    out = [("embed", names[0], largest(c, rects[0].w)),
           ("transfer", names[0], transfer_phase(w, c, rects[0].w, gap[0]))]
    for layer in range(config.n_layer):
        i, r = layer + 1, rects[layer + 1]
        norm = (lay.norm, names[i], norm_phase(w, lay.norm, c, r.w, levels))
        out += [norm, gemv("Wq", i), gemv("Wk", i), gemv("Wv", i)]
        out.append(("attention", names[i],
                    attention_phase(w, c, config.n_head, t, r.h, levels, lay.group * lay.pair)))
        out += [gemv("Wo", i), norm, gemv("Wfc", i), gemv("Wproj", i)]
        out.append(("transfer", names[i], transfer_phase(w, c, r.w, gap[i])))
    r = rects[-1]
    out.append((lay.norm, names[-1], norm_phase(w, lay.norm, c, r.w, levels)))
    out.append(gemv("Whead", len(rects) - 1))
    return out
