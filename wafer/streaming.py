"""Weight streaming: the whole wafer runs one layer at a time while the next layer's weights stream in.

It holds SwarmX's tree (:func:`swarmx_levels`, :func:`swarmx_seconds`), one training step
(:func:`weight_streaming`, a :class:`StreamingStep`), the days to train (:func:`training_time`, a
:class:`TrainingTime`, and :func:`gpu_training_days` for GPUs), Cerebras-GPT's runs and the assumed
constants. A model is a :class:`~wafer.shape.Shape`, anything ``Shape.from_config`` reads, or a
workload; weights and activations default to :data:`wafer.hardware.MODEL_DTYPE`.

When a model's weights no longer fit in the wafer's SRAM (chapter 10), they live off the wafer in
**MemoryX**, which also holds the optimizer state and does the update. The activations stay on the
wafer. A training step, for each micro-batch:

- forward, layer by layer: the layer's weights stream in while the wafer computes the previous layer;
- backward, layer by layer in reverse: the weights stream in again, and the layer's gradients stream
  out to MemoryX, which accumulates them over the micro-batches;
- after the last micro-batch, MemoryX updates the weights, and the next step's first weights can only
  stream in once their update is done (the update boundary).

Data parallel over N systems: **SwarmX** broadcasts the weights to every system and reduces their
gradients in a tree. It works at line rate, so the bandwidth each system sees is its own I/O, and the
tree adds latency: one level of switches per factor of the fan-out.

The model, its assumptions stated once:

- A layer's time is the largest of its compute (its FLOPs at the wafer's dense peak), its weights in
  and, in the backward pass, its gradients out (the other direction of the links), each at the
  system's I/O rate. Weights and gradients are 16-bit.
- The embedding lookup streams only the rows the micro-batch reads; its gradient is those rows too.
- The head streams the tied matrix itself (chapter 10's head holds its own copy; here nothing stays).
- The wafer holds two layers' weights (the one it computes with and the next, arriving) and the
  activations of one micro-batch kept for the backward pass: every layer's (``recompute=False``), or
  with **recomputation** only each layer's input, the backward pass recomputing the rest of the
  layer's forward first (one more forward pass of compute) and holding one layer's activations.
- At the update boundary the step waits for: the SwarmX reduction of the first layer's gradient, its
  update in MemoryX (16 bytes of weight, master weight and Adam moments per parameter, at
  ``update_bytes_per_s``), and the SwarmX broadcast and stream of its new weights.

Built in: 11_streaming
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from wafer.hardware import GPU, MODEL_DTYPE, Cluster, dtype_bytes, positive_int
from wafer.stages import Stage, pipeline_stages
from wafer.workload import Workload, gpt_workload

# How Cerebras-GPT was trained (Dey et al. 2023, P): systems of Andromeda and sequences per batch. 13B ran on
# 8 systems with 720 sequences, then on 12 with 1080 (90 per system either way); we take the second.
CEREBRAS_GPT_RUNS = {"111M": (1, 120), "256M": (1, 264), "590M": (1, 264), "1.3B": (4, 528), "2.7B": (4, 528),
                     "6.7B": (8, 1040), "13B": (12, 1080)}
SWARMX_LEVEL_S = 1e-6  # A: latency per level of the SwarmX tree (a switch and its links); no figure published
UPDATE_BYTES_PER_S = 1e12  # A: MemoryX's update throughput (it reads and writes 16 B per parameter)
UPDATE_BYTES_PER_PARAM = 16  # fp16 weight, fp32 master weight, fp32 Adam m and v


def swarmx_levels(cluster: Cluster) -> int:
    """Levels of the SwarmX tree that connects ``cluster.systems`` systems (0 for one system).

    Built in: 11_streaming
    """
    levels, reach = 0, 1
    while reach < cluster.systems:
        reach *= cluster.swarmx_fanout
        levels += 1
    return levels


def swarmx_seconds(nbytes: float, cluster: Cluster, level_s: float = SWARMX_LEVEL_S) -> float:
    """Time to broadcast ``nbytes`` to every system, or to reduce every system's ``nbytes`` into one:
    the stream at one system's I/O rate (the switches reduce at line rate) plus a latency per level.

    Built in: 11_streaming
    """
    if nbytes < 0:
        raise ValueError(f"nbytes={nbytes!r} must be non-negative")
    return nbytes * 8 / cluster.wafer.io_bits_per_s + swarmx_levels(cluster) * level_s


@dataclass
class StreamingStep:
    """One training step under weight streaming. Times in seconds; per-stage arrays are per
    micro-batch.

    Built in: 11_streaming
    """

    stages: list[str]
    micro_batch: int  # sequences per system in each micro-batch
    micro_batches: int
    forward: np.ndarray  # each stage's forward time
    backward: np.ndarray  # each stage's backward time
    compute: np.ndarray  # each stage's forward + backward compute
    io: np.ndarray  # each stage's weights in (twice) and gradients out, the larger direction
    boundary: float  # the update boundary
    step: float
    tokens_per_s: float
    flops: float  # training FLOPs of the step (matrix products and attention, as the workload counts)
    compute_bound: float  # the step at the cluster's peak
    utilisation: float  # compute_bound / step
    limit: str  # "I/O" if waiting for weights or gradients costs over 5% of the step, else "compute"
    sram_bytes: int  # on each wafer: two layers of weights and one micro-batch's activations


def _workload(model, context: int | None, dtype: str = MODEL_DTYPE) -> Workload:
    """``model`` if it is a workload, else its workload (a Shape, or what ``Shape.from_config`` reads)."""
    return model if isinstance(model, Workload) else gpt_workload(model, context=context, dtype=dtype)


def _stages(model, context: int | None, dtype: str = MODEL_DTYPE) -> tuple[Workload, list[Stage]]:
    work = _workload(model, context, dtype)
    return work, pipeline_stages(work)


def weight_streaming(model, cluster: Cluster, batch: int, context: int | None = None,
                     micro_batch: int | None = None, recompute: bool = True, dtype: str = MODEL_DTYPE,
                     level_s: float = SWARMX_LEVEL_S, update_bytes_per_s: float = UPDATE_BYTES_PER_S,
                     ) -> StreamingStep:
    """A training step of ``batch`` sequences (the global batch) of ``model`` (a
    :class:`~wafer.shape.Shape`, a GPTConfig, a GPT, or a workload) on ``cluster``, weight-streamed;
    ``micro_batch`` sequences per system at a time (by default the largest that fits in the wafer's
    SRAM, dividing the batch per system).

    Built in: 11_streaming
    """
    work, stages = _stages(model, context, dtype)
    context = work.context
    positive_int("batch", batch)
    if batch % cluster.systems:
        raise ValueError(f"batch={batch} sequences do not split evenly over {cluster.systems} systems")
    per_system = batch // cluster.systems
    w = cluster.wafer
    b = dtype_bytes(dtype)
    sram = w.sram_bytes(w.pes)  # what one program's rectangle holds, not the marketed total
    where = f"the {w.name}'s {sram:,} bytes of SRAM on the {w.width} x {w.height} PEs a program gets"
    c = work.n_embd
    weights = np.array([s.params * b for s in stages], dtype=float)
    for s, nbytes in zip(stages, weights):
        if s.name != "embed" and 2 * nbytes > sram:
            raise ValueError(f"layer {s.name} needs {int(nbytes):,} bytes of weights, twice that to stream "
                             f"the next layer in beside it ({int(2 * nbytes):,}), over {where}")
    resident = 2 * weights[1:].max()  # two layers of weights (the embedding lookup streams rows only)
    if recompute:  # each layer's input, and one layer's activations while it runs backward
        kept = sum(c for s in stages if s.name != "head") + max(s.act_elems for s in stages)
    else:
        kept = sum(s.act_elems for s in stages)
    act_per_seq = kept * context * b
    fits = [m for m in range(1, per_system + 1) if per_system % m == 0 and resident + m * act_per_seq <= sram]
    if micro_batch is None:
        if not fits:
            raise ValueError(f"one sequence's activations ({act_per_seq:,} bytes) and two layers of weights "
                             f"({int(resident):,}) need {int(resident + act_per_seq):,} bytes, over {where}")
        micro_batch = max(fits)
    elif not isinstance(micro_batch, int) or micro_batch < 1 or per_system % micro_batch:
        raise ValueError(f"micro_batch={micro_batch!r} must divide the {per_system} sequences per system")
    elif resident + micro_batch * act_per_seq > sram:
        need = int(resident + micro_batch * act_per_seq)
        raise ValueError(f"micro_batch={micro_batch} needs {need:,} bytes of SRAM, over {where}")
    tokens = micro_batch * context  # per system per micro-batch
    peak = w.peak_flops(dtype, cores=w.pes)
    io = w.io_bits_per_s / 8  # bytes per second, each direction
    streamed = weights.copy()
    rows = tokens + (context if work.shape.positions else 0)  # the token rows it reads, and the positions'
    streamed[0] = min(weights[0], rows * c * b)
    forward_compute = np.array([s.flops for s in stages]) * tokens / peak
    backward_compute = (3 if recompute else 2) * forward_compute
    forward = np.maximum(forward_compute, streamed / io)
    backward = np.maximum(backward_compute, streamed / io)  # weights in; gradients out on the other direction
    first = 1 if len(stages) > 1 else 0  # the first layer whose weights stream whole
    boundary = (swarmx_seconds(weights[first], cluster, level_s)  # its gradient reduced
                + stages[first].params * UPDATE_BYTES_PER_PARAM / update_bytes_per_s  # updated
                + swarmx_seconds(weights[first], cluster, level_s))  # and its new weights broadcast
    micro_batches = per_system // micro_batch
    step = micro_batches * float(forward.sum() + backward.sum()) + boundary
    flops = work.training_flops() * batch * context
    compute_bound = flops / cluster.peak_flops(dtype)
    compute = forward_compute + backward_compute
    io_time = 2 * streamed / io
    busy = micro_batches * float(compute.sum()) + boundary  # the step if every stream were hidden
    limit = "I/O" if step > 1.05 * busy else "compute"  # waiting for streams costs over 5% of the step
    return StreamingStep(
        stages=[s.name for s in stages], micro_batch=micro_batch, micro_batches=micro_batches,
        forward=forward, backward=backward, compute=compute, io=io_time, boundary=boundary, step=step,
        tokens_per_s=batch * context / step, flops=flops, compute_bound=compute_bound,
        utilisation=compute_bound / step, limit=limit,
        sram_bytes=int(resident + micro_batch * act_per_seq))


@dataclass
class TrainingTime:
    """How long training takes: steps, seconds per step, days, and the FLOPs counted.

    Built in: 11_streaming
    """

    tokens: float
    steps: int
    step_s: float
    days: float
    flops: float
    utilisation: float


def training_time(model, tokens: float, cluster: Cluster, batch: int, context: int | None = None,
                  **kwargs) -> TrainingTime:
    """Days to train ``model`` on ``tokens`` tokens on ``cluster``, weight-streamed, ``batch``
    sequences per step.

    Built in: 11_streaming
    """
    if not tokens >= 0 or math.isinf(tokens):
        raise ValueError(f"tokens={tokens!r} must be a non-negative, finite number of tokens")
    work = _workload(model, context, kwargs.get("dtype", MODEL_DTYPE))
    step = weight_streaming(work, cluster, batch, **kwargs)
    steps = math.ceil(tokens / (batch * work.context))
    return TrainingTime(tokens=tokens, steps=steps, step_s=step.step, days=steps * step.step / 86400,
                        flops=work.training_flops() * tokens, utilisation=step.utilisation)


def gpu_training_days(model, tokens: float, gpu: GPU, gpus: int, mfu: float,
                      context: int | None = None) -> float:
    """Days to train ``model`` on ``tokens`` tokens on ``gpus`` GPUs that sustain ``mfu`` (model FLOPs
    utilisation) of their dense 16-bit peak, with the same FLOP count as :func:`training_time`.

    Built in: 11_streaming
    """
    if not tokens >= 0 or math.isinf(tokens):
        raise ValueError(f"tokens={tokens!r} must be a non-negative, finite number of tokens")
    positive_int("gpus", gpus)
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu={mfu!r} must be in (0, 1]")
    work = _workload(model, context)
    return work.training_flops() * tokens / (gpus * gpu.peak_flops() * mfu) / 86400
