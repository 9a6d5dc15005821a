"""How far to trust the model: every published measurement the book uses, beside the model's value,
and the chapters' own numbers for one model set side by side (:func:`reconcile_gpt2_small`).

:func:`points` returns one :class:`Point` per measurement: what was measured and on what, the published
value and its source, the model's value (the analytic model of :mod:`wafer.cost` with the PE's
instructions of :mod:`wafer.kernels`), the same with :data:`wafer.kernels.IDEAL` costs (``ideal``: no
start-up, fp32 at its peak), the mesh
simulator's value where it can run part of the same thing, their ratio, what kind of quantity it is
(:data:`KINDS`), and the point's role:

- ``"calibrates"``: the point set a constant of the model (it agrees by construction and is no test);
- ``"validates"``: a prediction made with constants set elsewhere;
- ``"setup fitted"``: the paper does not state part of its setup, and the model's setup was chosen so
  that it matches (also no test; the row shows what the setup has to be).

:func:`error` is a point's error as a factor, max(r, 1/r); :func:`geometric_mean_error` summarises
the validation points, of one kind or all.

Built in: 15_calibration
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from wafer import collectives, cost, inference, kernels
from wafer.emulate import program
from wafer.hardware import A100, KERNEL_DTYPE, MODEL_DTYPE, WSE1, WSE2
from wafer.mesh import Mesh
from wafer.optimize import optimize
from wafer.placement import evaluate
from wafer.shape import LLAMA2_13B, LLAMA3_8B, QWEN2_72B, label
from wafer.stages import pipeline_stages
from wafer.strategies import flop_proportional
from wafer.target import Target
from wafer.workload import gpt_workload

ROLES = ("calibrates", "validates", "setup fitted")
# What a point measures: a wafer's speed, a wafer's capacity (a layout's arithmetic), a GPU's speed,
# or an amount of work counted from a model's shape.
KINDS = ("wafer timing", "wafer capacity", "GPU timing", "work count")
TIME_UNITS = ("us", "ms")  # quantities where more is slower
DECODE_CONTEXT = 2048  # A: cached tokens while decoding (chapter 13's); the paper's rate does not say


@dataclass(frozen=True)
class Point:
    """One published measurement beside the model: ``ratio`` = model / published; ``ideal``, the model
    with :data:`wafer.kernels.IDEAL` costs (no start-up, fp32 at its peak); ``speed_ratio``, the ratio
    oriented so that more than 1 means the model is faster (or holds more) than the machine.

    Built in: 15_calibration
    """

    quantity: str
    setup: str
    unit: str
    published: float
    source: str
    model: float
    ideal: float
    simulated: float | None
    role: str
    kind: str

    @property
    def ratio(self) -> float:
        return self.model / self.published

    @property
    def speed_ratio(self) -> float:
        return 1 / self.ratio if self.unit in TIME_UNITS else self.ratio


def error(ratio: float) -> float:
    """A ratio's error as a factor of at least 1: max(r, 1/r).

    Built in: 15_calibration
    """
    if not ratio > 0:
        raise ValueError(f"ratio={ratio!r} must be positive")
    return max(ratio, 1 / ratio)


def geometric_mean_error(points: list[Point], kind: str | None = None) -> float:
    """The geometric mean of :func:`error` over the points that validate (of ``kind``, if given).

    Built in: 15_calibration
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}")
    errors = [error(p.ratio) for p in points if p.role == "validates" and kind in (None, p.kind)]
    if not errors:
        raise ValueError("no validation points" + ("" if kind is None else f" of kind {kind!r}"))
    return math.exp(sum(math.log(e) for e in errors) / len(errors))


def simulated_row_cycles(n: int, count: int, levels: int, collective: str = "reduce") -> int:
    """A ``collective`` (``"reduce"`` toward the first PE, or ``"allreduce"``) of ``count`` wavelets per
    PE over a row of ``n`` PEs on the simulator, with a ``levels``-level tree (1: a chain). A GEMV's
    allreduce is one such row: every row of its grid does the same at the same time.

    Built in: 15_calibration
    """
    run = {"reduce": collectives.reduce, "allreduce": collectives.allreduce}
    if collective not in run:
        raise ValueError(f"collective={collective!r} is not one of {sorted(run)}")
    mesh = Mesh(n, 1, WSE2)
    pes = collectives.row(mesh, 0)
    for i, pe in enumerate(pes):
        mesh.store(pe, "v", np.full(count, float(i), dtype=np.float32))
    return run[collective](mesh, pes, "v", levels).cycles


def best_tree(n: int, count: int, most: int = 8) -> int:
    """The levels (2 to ``most``) of the fastest tree reduction over ``n`` PEs.

    Built in: 15_calibration
    """
    return min(range(2, most + 1), key=lambda levels: cost.reduce_cycles(WSE2, n, count, levels))


def points(costs: kernels.PECosts = kernels.WSE2_COSTS, simulate: bool = True) -> list[Point]:
    """Every published measurement the book holds the model against, in the order of the table.

    Built in: 15_calibration
    """
    out: list[Point] = []
    waferllm = "He et al. 2025 (WaferLLM, OSDI)"
    ideal = kernels.IDEAL

    # WaferLLM's GEMV, as its code times it (x already on every row; the product, then a K = 2 tree
    # allreduce; cycles converted at 1.1 GHz), on the largest grid under 750 whose side divides both
    # sizes (the paper does not state its grid).
    for n, published in ((16384, 1.2e-6), (32768, 2.03e-6)):
        k, i = kernels.gemv(WSE2, n, 512, costs), kernels.gemv(WSE2, n, 512, ideal)
        sim = None
        if simulate:  # the allreduce simulated; the product is the same formula on both sides
            reduced = simulated_row_cycles(512, cost.wavelets(n // 512, "fp16"), 2, "allreduce")
            sim = (i.compute + reduced) / WSE2.clock_hz
        out.append(Point(f"GEMV {n // 1024}K x {n // 1024}K",
                         "WSE-2, 512 x 512 PEs (chosen), fp16, K = 2 tree", "us", published * 1e6, waferllm,
                         k.seconds(WSE2) * 1e6, i.seconds(WSE2) * 1e6,
                         None if sim is None else sim * 1e6, "validates", "wafer timing"))
    # The same GEMVs on one A100 (cuBLAS), against the HBM roofline.
    for n, published in ((16384, 0.336e-3), (32768, 1.231e-3)):
        gpu = cost.gemv_roofline_gpu(n, n, A100).seconds * 1e3
        out.append(Point(f"GEMV {n // 1024}K x {n // 1024}K", "one A100, cuBLAS, 16-bit", "ms",
                         published * 1e3, waferllm, gpu, gpu, None, "validates", "GPU timing"))
    # The SGEMM sets the fp32 rate.
    s = kernels.summa_gemm(WSE2, 33_000, 750, costs)
    si = kernels.summa_gemm(WSE2, 33_000, 750, ideal)
    out.append(Point("SGEMM 33,000^2", "CS-2, 750 x 750 PEs, fp32 (SUMMA assumed)", "TFLOP/s", 349.0,
                     "Miyajima et al. 2026 (IPSJ JIP)", s.flops_per_s(WSE2) / 1e12,
                     si.flops_per_s(WSE2) / 1e12, None, "calibrates", "wafer timing"))
    # BiCGStab on a CS-1, with WSE-2's instruction constants (none are published for WSE-1).
    b = kernels.bicgstab(WSE1, 1536, costs)
    bi = kernels.bicgstab(WSE1, 1536, ideal)
    out.append(Point("BiCGStab, 7-point stencil", "CS-1, 600 x 595 x 1536, all 16-bit (assumed)",
                     "PFLOP/s", 0.86, "Rocki et al. 2020 (SC20)", b.flops_per_s(WSE1) / 1e15,
                     bi.flops_per_s(WSE1) / 1e15, None, "validates", "wafer timing"))
    # Reduce: the best tree against a chain (the vendor's reduce, assumed a chain), at its largest.
    n, count = 750, 1
    levels = best_tree(n, count)
    model = cost.reduce_cycles(WSE2, n, count, 1) / cost.reduce_cycles(WSE2, n, count, levels)
    sim = None
    if simulate:
        sim = simulated_row_cycles(n, count, 1) / simulated_row_cycles(n, count, levels)
    out.append(Point("reduce speed-up, best over vendor's (up to)",
                     f"WSE-2 row of {n}, {count} wavelet, chain vs {levels}-level tree", "x", 3.27,
                     "Luczynski et al. 2024 (HPDC)", model, model, sim,
                     "validates", "wafer timing"))
    # Decode rates.
    for config, side, wafers, published, note in ((LLAMA3_8B, 360, 1, 2700.0, "the paper's region"),
                                                  (QWEN2_72B, 300, 7, 840.0, "assumed")):
        t = Target(WSE2, context=DECODE_CONTEXT)
        d = kernels.decode(config, t, side, costs, wafers=wafers)
        di = kernels.decode(config, t, side, ideal, wafers=wafers)
        out.append(Point(f"decode, {label(config)}",
                         f"WSE-2, {side} x {side} regions ({note}), {wafers} wafer(s), "
                         f"{DECODE_CONTEXT} cached",
                         "tokens/s", published, waferllm, d.tokens_per_s,
                         di.tokens_per_s, None, "validates", "wafer timing"))
    # The KV cache: the shift layout holds P times the concatenation's (no free constant); and the
    # absolute capacities, at the layers per region that reproduce them (the paper does not state its
    # layout: 6 and 9 layers per region need 6 and 5 squares, and a WSE-2 holds 4).
    kv_published = ((LLAMA3_8B, 360, 6, 382, 137_548), (LLAMA2_13B, 375, 9, 16, 6_168))
    for config, side, layers, concat, shift in kv_published:
        lay = inference.layout(config, WSE2, side, layers_per_region=layers)
        r = lay.shift_tokens / lay.concat_tokens
        out.append(Point(f"KV shift / concatenation, {label(config)}", f"{side} x {side} regions", "x",
                         shift / concat, waferllm, r, r, None, "validates", "wafer capacity"))
        out.append(Point(f"KV capacity, concatenation, {label(config)}",
                         f"{side} x {side}, {layers} layers per region ({lay.regions} squares)", "tokens",
                         concat, waferllm, lay.concat_tokens, lay.concat_tokens, None, "setup fitted",
                         "wafer capacity"))
    # Cerebras-GPT's training FLOPs, counted from the model by chapter 06's formula (the products,
    # attention and the head; no embedding or softmax convention), against the Model Zoo's four-digit
    # figures (chapter 12 traces them).
    from minigpt.scaling import CEREBRAS_GPT, MODEL_ZOO_FLOPS, training_flops  # minigpt never imports wafer

    shapes = {r.name: r.config for r in CEREBRAS_GPT}
    for name, (published, tokens) in MODEL_ZOO_FLOPS.items():
        f = training_flops(shapes[name], tokens)
        out.append(Point(f"training FLOPs, Cerebras-GPT {name}", f"{tokens:.4g} tokens", "FLOPs", published,
                         "Cerebras Model Zoo configs", f, f, None, "validates", "work count"))
    return out


# --- the chapters' numbers for one model, reconciled ---------------------------------------------------


@dataclass(frozen=True)
class Reading:
    """One chapter's rate for the same model on the same wafer, and the choices behind it.

    Built in: 14_emulation
    """

    chapter: str
    method: str
    dtype: str
    placement: str
    kv_cache: str
    tokens: str  # what is in flight: the pipeline full, or one token of one sequence
    tokens_per_s: float


def reconcile_gpt2_small(sides: tuple[int, ...] = (60, 90, 120, 180, 240, 360)) -> list[Reading]:
    """GPT-2 small on WSE-2 as chapters 11, 13 and 14 each compute it, with what differs; chapter 14's
    program also at chapter 11's and 12's 2048 cached tokens, like for like.

    Built in: 14_emulation
    """
    from minigpt.model import GPTConfig  # minigpt never imports wafer

    out = []
    gpt2 = GPTConfig(block_size=2048)
    stages = pipeline_stages(gpt_workload(gpt2, context=2048, dtype=MODEL_DTYPE))
    ev = evaluate(optimize(stages, Target(WSE2, context=2048)))
    rects = "a rectangle per layer, sized by its FLOPs (optimized)"
    out.append(Reading("10", "layer-pipelined evaluation", MODEL_DTYPE, rects,
                       "spread over each layer's rectangle",
                       "the pipeline full (many tokens)", ev.tokens_per_s))
    out.append(Reading("10", "the same, latency", MODEL_DTYPE, rects, "spread over each layer's rectangle",
                       "one token alone, 2048 cached", 1 / ev.latency_s))
    target = Target(WSE2, context=2048)
    rates = {p: inference.decode(gpt2, target, p).tokens_per_s for p in sides}
    best = max(rates, key=lambda p: rates[p])
    square = f"each layer on its own {best} x {best} square (the best side)"
    spread = "spread over the square (attention as two GEMVs)"
    one = "one token alone, 2048 cached"
    out.append(Reading("12", "decode, GEMVs at the FMAC peak", MODEL_DTYPE, square, spread, one, rates[best]))
    for block, position, what in ((1024, 511, "one token alone, position 512 (as above)"),
                                  (2048, 2047, "one token alone, 2048 cached")):
        small = GPTConfig(block_size=block)
        st = pipeline_stages(gpt_workload(small, context=block, dtype=KERNEL_DTYPE))
        placed = flop_proportional(st, Target(WSE2, context=block, dtype=KERNEL_DTYPE), columns=1)
        cycles = sum(c for _, _, c in program(small, placed, position))
        out.append(Reading("13", "the emulator's program", KERNEL_DTYPE,
                           "FLOP-proportional strips, one column",
                           "in the first column of each layer's strip", what, WSE2.clock_hz / cycles))
    return out
