"""Inference at wafer scale: prefill and decode on square regions of PEs, and the KV cache.

It holds :func:`layout` (a :class:`Layout`: the layers on P x P regions, the KV cache's capacity) and
:func:`min_wafers`; :func:`decode` (a :class:`Decode`) and :func:`prefill` (a :class:`Prefill`) on a
:class:`~wafer.target.Target`, whose context is the cached tokens or the prompt; and their GPU
rooflines, :func:`gpu_decode` and :func:`gpu_prefill` (a :class:`GpuRoofline`). A model is a minigpt
``GPTConfig``, or anything :func:`wafer.shape.as_config` reads; four open models' configs are in
:mod:`wafer.shape`. The wafer defaults to
:data:`wafer.hardware.MODEL_DTYPE` (16-bit), a GPU to :data:`wafer.hardware.GPU_DTYPE`.

A model too large for one region is spread over several P x P regions, each holding a run of
consecutive layers (layer pipelining between regions, as WaferLLM does). Inside a region, each
layer's matrix products run on the whole P x P grid with chapter 10's algorithms:

- **decode** (one new token): every product is a GEMV: the input down the columns, the local
  products, a 2-level tree reduction along the rows (:func:`wafer.cost.gemv_cycles`). Attention over
  t cached tokens is two more GEMV-shaped products (scores t x d, and the weighted sum d x t); the
  norms and the softmax cost one small allreduce each. Compute per PE is tiny; what is left is the
  latency of the broadcasts and reductions, which grows with P.
- **prefill** (a prompt of n tokens at once): every product is a GEMM, run as Cannon's algorithm on
  the 2-hop interleaved ring (:func:`wafer.cost.gemm_cycles`); attention is two GEMMs per layer
  (n x d by d x n, and back).

The KV cache of a layer lives in its region: K and V are (tokens x d_kv), d_kv being the key-value
heads times the head size (:func:`wafer.shape.kv_width`), the d_kv columns split over the P columns of
PEs (ceil(d_kv / P) values each). Where the tokens go is the layout:

- **concatenation**: each new token's K and V are appended in the same row of PEs, so the cache can
  only grow until that row's free SRAM is full;
- **shift**: a new token enters the top row, and each row that then holds more tokens than the row
  below passes its oldest token down one row, so the tokens spread over all P rows, and the cache
  holds P times as many (WaferLLM's shift-based cache).

The free SRAM of a PE is what its share of the region's weights leaves (16-bit weights; working
buffers not counted). :func:`kv_rows` says which row of PEs holds each cached token in either layout.

Energy: :func:`joules_per_token` charges a decode, a prefill or a GPU roofline with its machine's
nameplate power (``power_w``) for the time each token takes.

Built in: 13_inference
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from wafer.cost import Roofline, allreduce_cycles, gemm_cycles, gemv_cycles, roofline
from wafer.hardware import GPU, GPU_DTYPE, MODEL_DTYPE, Wafer, dtype_bytes, positive_int
from wafer.shape import (
    GPTConfig,
    as_config,
    kv_bytes_per_token,
    kv_width,
    label,
    layer_params,
    params,
    products,
    q_width,
)
from wafer.streaming import SWARMX_LEVEL_S
from wafer.target import Target


@dataclass
class Layout:
    """How a model sits on a wafer in P x P regions.

    Built in: 13_inference
    """

    side: int
    regions: int  # regions the layers occupy
    layers_per_region: int
    weight_bytes_per_pe: int
    free_bytes_per_pe: int
    kv_bytes_per_token_per_pe: int  # in the region's PEs, for its layers
    concat_tokens: int  # KV capacity, concatenation-based
    shift_tokens: int  # KV capacity, shift-based


def layout(config: GPTConfig, wafer: Wafer, side: int, dtype: str = MODEL_DTYPE,
           layers_per_region: int | None = None, wafers: int = 1) -> Layout:
    """Place the layers of ``config``'s model on ``side`` x ``side`` regions of ``wafers`` wafers: by
    default as many regions as the grids hold as squares, the layers shared out evenly; or
    ``layers_per_region`` each, as long as the grids have that many regions' worth of PEs. Raises if the
    layers do not fit.

    Built in: 13_inference
    """
    config = as_config(config)
    if not isinstance(side, int) or side < 1 or side > min(wafer.width, wafer.height):
        raise ValueError(f"side={side!r} must be an integer in [1, {min(wafer.width, wafer.height)}] for the "
                         f"{wafer.width} x {wafer.height} {wafer.name} grid")
    positive_int("wafers", wafers)
    b = dtype_bytes(dtype)
    pes = side * side
    squares = wafers * (wafer.width // side) * (wafer.height // side)
    if layers_per_region is None:
        layers_per_region = math.ceil(config.n_layer / squares)
    elif config.n_layer / positive_int("layers_per_region", layers_per_region) * pes > wafers * wafer.pes:
        raise ValueError(f"{config.n_layer} layers at {layers_per_region} per region of {side} x {side} need "
                         f"{config.n_layer / layers_per_region * pes:,.0f} PEs; the {wafer.name} grid has "
                         f"{wafers * wafer.pes:,}")
    weights = math.ceil(layers_per_region * layer_params(config) * b / pes)
    free = wafer.sram_bytes_per_pe - weights
    if free <= 0:
        raise ValueError(f"{label(config)} does not fit in {side} x {side} regions on {wafers} {wafer.name}: "
                         f"{layers_per_region} layer(s) per region need {weights:,} bytes of weights per PE, "
                         f"and a PE has {wafer.sram_bytes_per_pe:,}")
    kv = layers_per_region * 2 * math.ceil(kv_width(config) / side) * b
    concat = free // kv
    return Layout(side=side, regions=math.ceil(config.n_layer / layers_per_region),
                  layers_per_region=layers_per_region, weight_bytes_per_pe=weights, free_bytes_per_pe=free,
                  kv_bytes_per_token_per_pe=kv, concat_tokens=concat, shift_tokens=concat * side)


def min_wafers(config: GPTConfig, wafer: Wafer, side: int, dtype: str = MODEL_DTYPE, most: int = 64) -> int:
    """The fewest wafers whose ``side`` x ``side`` regions hold ``config``'s model (layer-pipelined
    across them).

    Built in: 13_inference
    """
    config = as_config(config)
    for n in range(1, most + 1):
        try:
            layout(config, wafer, side, dtype, wafers=n)
            return n
        except ValueError:
            continue
    raise ValueError(f"{label(config)} does not fit on {most} {wafer.name} wafers in {side} x {side} regions")


def _check_inference(target: Target) -> None:
    if target.mode != "inference":
        raise ValueError(f"target.mode={target.mode!r}: decode and prefill need an inference target")


@dataclass(frozen=True)
class Decode:
    """One decode step on the wafer: each phase's share of it, in seconds, and the rate.

    Built in: 13_inference
    """

    weights_s: float  # every layer's products with weights, as GEMVs
    attention_s: float  # the scores and the weighted sum over the cache
    allreduce_s: float  # the two norms and the softmax
    head_s: float
    between_wafers_s: float  # the activations crossing from one wafer to the next
    seconds: float  # the whole step
    tokens_per_s: float


def decode(config: GPTConfig, target: Target, side: int, levels: int = 2, wafers: int = 1) -> Decode:
    """One decode step (one new token of one sequence, ``target.context`` tokens cached, in
    ``target.dtype``) with every layer on a ``side`` x ``side`` region of ``target.wafer``: the products
    as GEMVs, attention as two GEMV-shaped products, the norms and softmax as allreduces of one value,
    the head as one more GEMV. Over ``wafers`` wafers, the activations cross from one to the next at
    the system's I/O rate plus a switch's latency (:data:`wafer.streaming.SWARMX_LEVEL_S`, assumed).

    Built in: 13_inference
    """
    _check_inference(target)
    config = as_config(config)
    wafer, context, dtype = target.wafer, target.context, target.dtype
    layout(config, wafer, side, dtype, wafers=wafers)  # raises if the layers do not fit
    grid = (side, side)
    d, q, n_layer = config.n_embd, q_width(config), config.n_layer
    weights = sum(gemv_cycles(wafer, m, n, grid, levels, dtype).total for _, m, n in products(config))
    attention = (gemv_cycles(wafer, context, q, grid, levels, dtype).total  # scores
                 + gemv_cycles(wafer, q, context, grid, levels, dtype).total)  # the weighted sum of V
    small = 3 * allreduce_cycles(wafer, side, 1, levels)  # two norms, one softmax
    head = gemv_cycles(wafer, config.vocab_size, d, grid, levels, dtype).total
    cycles = n_layer * (weights + attention + small) + head
    between = (wafers - 1) * (SWARMX_LEVEL_S + d * dtype_bytes(dtype) * 8 / wafer.io_bits_per_s)
    seconds = cycles / wafer.clock_hz + between
    return Decode(weights_s=n_layer * weights / wafer.clock_hz,
                  attention_s=n_layer * attention / wafer.clock_hz,
                  allreduce_s=n_layer * small / wafer.clock_hz, head_s=head / wafer.clock_hz,
                  between_wafers_s=between, seconds=seconds, tokens_per_s=1 / seconds)


@dataclass(frozen=True)
class Prefill:
    """A prompt's prefill on the wafer: ``seconds`` for the whole prompt, and prompt tokens per second.

    Built in: 13_inference
    """

    seconds: float
    tokens_per_s: float


def prefill(config: GPTConfig, target: Target, side: int, method: str = "interleave", wafers: int = 1
            ) -> Prefill:
    """Prefill of a prompt of ``target.context`` tokens with every layer on a ``side`` x ``side``
    region: each product a GEMM (prompt x inputs by inputs x outputs), attention two GEMMs, the head
    one product for the last token only.

    Built in: 13_inference
    """
    _check_inference(target)
    config = as_config(config)
    wafer, prompt, dtype = target.wafer, target.context, target.dtype
    layout(config, wafer, side, dtype, wafers=wafers)  # raises if the layers do not fit
    d, q = config.n_embd, q_width(config)

    def gemm(m, k, n):  # the lockstep bound: within a cycle of Cannon's dataflow on the interleaved ring
        return gemm_cycles(wafer, m, k, n, side, method, dtype, dataflow=False).total

    matrices = sum(gemm(prompt, n, m) for _, m, n in products(config))
    attention = gemm(prompt, q, prompt) + gemm(prompt, prompt, q)
    head = gemv_cycles(wafer, config.vocab_size, d, (side, side), 2, dtype).total
    cycles = config.n_layer * (matrices + attention) + head
    between = (wafers - 1) * (SWARMX_LEVEL_S + prompt * d * dtype_bytes(dtype) * 8 / wafer.io_bits_per_s)
    seconds = cycles / wafer.clock_hz + between
    return Prefill(seconds=seconds, tokens_per_s=prompt / seconds)


@dataclass(frozen=True)
class GpuRoofline(Roofline):
    """A decode step or a prefill on one GPU by the roofline (times in seconds), and its tokens per
    second.

    Built in: 13_inference
    """

    tokens_per_s: float


def gpu_decode(config: GPTConfig, gpu: GPU, context: int, dtype: str = GPU_DTYPE) -> GpuRoofline:
    """One decode step on one GPU by the roofline, ``context`` tokens cached: every weight and the
    cache read from HBM once, 2 FLOPs per weight and 4 per cached K or V value per query head group.

    Built in: 13_inference
    """
    positive_int("context", context)
    config = as_config(config)
    b, n = dtype_bytes(dtype), params(config)
    nbytes = n * b + context * kv_bytes_per_token(config, dtype)
    flops = 2 * n + 4 * config.n_layer * q_width(config) * context
    r = roofline(flops, nbytes, gpu.peak_flops(dtype), gpu.hbm_bytes_per_s)
    return GpuRoofline(**dataclasses.asdict(r), tokens_per_s=1 / r.seconds)


def gpu_prefill(config: GPTConfig, gpu: GPU, prompt: int, dtype: str = GPU_DTYPE) -> GpuRoofline:
    """Prefill of ``prompt`` tokens on one GPU by the roofline: 2 FLOPs per weight per token and the
    attention's 4 d n^2 per layer, the weights read once.

    Built in: 13_inference
    """
    positive_int("prompt", prompt)
    config = as_config(config)
    b, n = dtype_bytes(dtype), params(config)
    flops = 2 * n * prompt + 4 * config.n_layer * q_width(config) * prompt * prompt
    r = roofline(flops, n * b, gpu.peak_flops(dtype), gpu.hbm_bytes_per_s)
    return GpuRoofline(**dataclasses.asdict(r), tokens_per_s=prompt / r.seconds)


KV_LAYOUTS = ("concat", "shift")


def kv_rows(tokens: int, side: int, kind: str = "shift") -> list[int]:
    """The row of PEs (0 at the top) that holds each cached token's K and V after ``tokens`` tokens
    on a ``side`` x ``side`` region, token 0 the oldest. Each token's K and V are split over all
    ``side`` columns of its row, so a row's count of tokens is what each of its PEs stores.

    ``"concat"``: every token in row 0. ``"shift"``: a new token enters row 0, and each row whose
    count then exceeds the next row's passes its oldest token down to it. The rows end up holding
    contiguous runs of tokens, oldest at the bottom, floor or ceil of ``tokens / side`` each (the
    extra ones in the bottom rows), so no PE holds more than ceil(tokens / side).

    Built in: 13_inference
    """
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"tokens={tokens!r} must be an integer >= 0")
    positive_int("side", side)
    if kind not in KV_LAYOUTS:
        raise ValueError(f"kind={kind!r} is not one of {KV_LAYOUTS}")
    if kind == "concat":
        return [0] * tokens
    q, extra = divmod(tokens, side)
    rows = []
    for r in range(side - 1, -1, -1):  # from the bottom row up, oldest tokens first
        rows += [r] * (q + (r >= side - extra))
    return rows


def joules_per_token(result: Decode | Prefill | GpuRoofline, machine: Wafer | GPU,
                     machines: int = 1) -> float:
    """Energy per token, in joules: the nameplate power of ``machines`` wafers or GPUs (each
    ``machine.power_w``) times the seconds per token, 1 / ``result.tokens_per_s``. For a decode it is
    per generated token; for a prefill, per prompt token. Pass the wafers a :func:`decode` or
    :func:`prefill` ran on as ``machines``.

    ``power_w`` is meant as the whole system's power for a wafer (for WSE-2 an assumed figure for a
    CS-2; pass a preset with another ``power_w`` to try others) and the board's for a GPU (its host not
    counted). It charges the tokens with everything the machine may draw, idle PEs included, so it is
    an upper bound on what the computation alone draws. Over several wafers that run their layers one
    after another, ``machines`` = the wafers charges every wafer for the whole step; ``machines`` = 1
    charges only the one at work, as if the others drew nothing.

    Built in: 13_inference
    """
    positive_int("machines", machines)
    if not machine.power_w > 0:
        raise ValueError(f"{machine.name} has power_w={machine.power_w!r}: a preset needs a positive power "
                         f"for its energy")
    if not result.tokens_per_s > 0:
        raise ValueError(f"tokens_per_s={result.tokens_per_s!r} must be positive")
    return machines * machine.power_w / result.tokens_per_s
