"""Weight streaming: the whole wafer runs one layer at a time while the next layer's weights stream in.

It holds SwarmX's tree (:func:`swarmx_levels`, :func:`swarmx_seconds`), one training step
(:func:`weight_streaming`, a :class:`StreamingStep`; :func:`timeline` draws it, :func:`max_micro_batch`
is its SRAM cap), the days to train (:func:`training_time`, a :class:`TrainingTime`, and
:func:`gpu_training_days` for GPUs), Cerebras-GPT's runs (:data:`CEREBRAS_GPT_RUNS`, each phase a
:class:`Run`) and the assumed constants. A model is a minigpt ``GPTConfig`` (or anything
:func:`wafer.shape.as_config` reads) or a workload; weights and activations default to
:data:`wafer.hardware.MODEL_DTYPE`.

When a model's weights no longer fit in the wafer's SRAM (chapter 11), they live off the wafer in
**MemoryX**, which also holds the optimizer state and does the update. The activations stay on the
wafer. A training step, for each micro-batch:

- forward, layer by layer: the layer's weights stream in while the wafer computes the previous layer;
- backward, layer by layer in reverse: the weights stream in again, and the layer's gradients stream
  out to MemoryX, which accumulates them over the micro-batches;
- after the last micro-batch, MemoryX updates the weights, and the next step's first weights can only
  stream in once their update is done (the update boundary).

Data parallel over N systems: **SwarmX** broadcasts the weights to every system and reduces their
gradients in a tree. The model assumes it works at line rate (the vendor gives no rate), so the
bandwidth each system sees is its own I/O, and the tree adds latency: one level of switches per
factor of the fan-out.

The model, its assumptions stated once:

- A layer's time is the largest of its compute (its FLOPs at the wafer's dense peak), its weights in
  and, in the backward pass, its gradients out (the other direction of the links), each at the
  system's I/O rate. Weights and gradients are 16-bit.
- The embedding lookup streams only the rows the micro-batch reads; its gradient is those rows too.
- The head streams the tied matrix itself (chapter 11's head holds its own copy; here nothing stays).
- The wafer holds two layers' weights (the one it computes with and the next, arriving) and the
  activations of one micro-batch kept for the backward pass: every layer's (``recompute=False``), or
  with **recomputation** only each layer's input, the backward pass recomputing the rest of the
  layer's forward first (one more forward pass of compute) and holding one layer's activations.
- MemoryX updates each layer once its gradient has arrived (streamed out in the layer's backward slot,
  reduced by SwarmX with a latency per level), one layer after another in the order they arrive, at
  ``update_bytes_per_s`` (16 bytes of weight, master weight and Adam moments per parameter; a tied
  matrix is updated once, with the embedding). At the update boundary, after the last backward slot,
  the step waits until the embedding and the first block are updated (the next step reads them
  first), then for SwarmX's tree latency; their new weights stream in the next step's own slots.

Built in: 12_streaming
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from wafer.hardware import GPU, MODEL_DTYPE, Cluster, dtype_bytes, positive_int
from wafer.stages import Stage, pipeline_stages
from wafer.workload import Workload, gpt_workload


@dataclass(frozen=True)
class Run:
    """One phase of a published training run: ``systems`` CS-2s, ``batch`` sequences per step (the
    global batch, split evenly over the systems), ``steps`` steps.

    Built in: 12_streaming
    """

    systems: int
    batch: int
    steps: int

    def tokens(self, context: int) -> int:
        """Tokens the phase trains on: steps x batch x context."""
        return self.steps * self.batch * positive_int("context", context)


# How Cerebras-GPT was trained: systems, global batch and steps, from the Cerebras Model Zoo's
# Cerebras-GPT README (github.com/Cerebras/modelzoo, commit 502f4a2 of 2023-03-28,
# modelzoo/transformers/pytorch/gpt3/configs/Cerebras_GPT/README.md) and its configs (111m.yaml ...
# 13b_bs1080.yaml). The model cards say only "Andromeda ... 16 CS-2 wafer scale systems".
# - Batches and steps: P (README's training table and configs; the same batches as Dey et al. 2023).
# - 111M, 256M, 590M on 1 system, 1.3B and 2.7B on 4, 6.7B on 8: P for the released configurations
#   ("a configuration to train the 1.3B parameter model on a cluster of 4 CS-2 systems"), A for the
#   runs themselves: the README does not say these are the counts that ran, and earlier GPT-3 configs
#   of the same shapes (Model Zoo R_1.7.0, modelzoo/transformers/tf/gpt3/configs/params_gpt3_xl.yaml
#   and params_gpt3_2p7b.yaml) say "This exact config was run on 8 CS-2 machines" (and 6.7B's, in
#   params_gpt3_6p7b.yaml, "run for 15000/62522 steps ... on 16 CS-2 machines").
# - 13B: P. "we started training on 8 CS-2 systems with a global batch size of 720 and finished
#   training on 12 CS-2 systems with a global batch size of 1080": 57,000 steps at 720, then the step
#   reset to 38,000 and 13b_bs1080.yaml run to its max_steps of 116,223, so 78,223 steps at 1080
#   (257.07B tokens in all; the README says 257B).
CEREBRAS_GPT_RUNS: dict[str, tuple[Run, ...]] = {
    "111M": (Run(1, 120, 9_037),), "256M": (Run(1, 264, 9_468),), "590M": (Run(1, 264, 21_836),),
    "1.3B": (Run(4, 528, 24_334),), "2.7B": (Run(4, 528, 49_041),), "6.7B": (Run(8, 1040, 62_522),),
    "13B": (Run(8, 720, 57_000), Run(12, 1080, 116_223 - 38_000)),
}
SWARMX_LEVEL_S = 1e-6  # A: latency per level of the SwarmX tree (a switch and its links); no figure published
UPDATE_BYTES_PER_S = 1e12  # A: MemoryX's update throughput (it reads and writes 16 B per parameter)
UPDATE_BYTES_PER_PARAM = 16  # fp16 weight, fp32 master weight, fp32 Adam m and v


def swarmx_levels(cluster: Cluster) -> int:
    """Levels of the SwarmX tree that connects ``cluster.systems`` systems (0 for one system).

    Built in: 12_streaming
    """
    levels, reach = 0, 1
    while reach < cluster.systems:
        reach *= cluster.swarmx_fanout
        levels += 1
    return levels


def swarmx_seconds(nbytes: float, cluster: Cluster, level_s: float = SWARMX_LEVEL_S) -> float:
    """Time to broadcast ``nbytes`` to every system, or to reduce every system's ``nbytes`` into one:
    the stream at one system's I/O rate (the switches assumed to reduce at line rate) plus a latency
    per level.

    Built in: 12_streaming
    """
    if nbytes < 0:
        raise ValueError(f"nbytes={nbytes!r} must be non-negative")
    return nbytes * 8 / cluster.wafer.io_bits_per_s + swarmx_levels(cluster) * level_s


@dataclass
class StreamingStep:
    """One training step under weight streaming. Times in seconds; per-stage arrays are per
    micro-batch, in the forward order of ``stages``.

    Built in: 12_streaming
    """

    stages: list[str]
    micro_batch: int  # sequences per system in each micro-batch
    micro_batches: int
    forward: np.ndarray  # each stage's forward time: the larger of its forward compute and its stream
    backward: np.ndarray  # each stage's backward time: the larger of its backward compute and its stream
    compute: np.ndarray  # each stage's forward + backward compute
    io: np.ndarray  # each stage's weights in (twice) and gradients out, the larger direction
    boundary: float  # the update boundary: wait_s + broadcast_s
    step: float
    tokens_per_s: float
    flops: float  # training FLOPs of the step (matrix products and attention, as the workload counts)
    compute_bound: float  # the step at the cluster's peak
    utilisation: float  # compute_bound / step
    limit: str  # "I/O" if waiting for weights or gradients costs over 5% of the step, else "compute"
    sram_bytes: int  # on each wafer: two layers of weights and one micro-batch's activations
    stream: np.ndarray  # each stage's weights in (or its gradients out), one direction
    forward_compute: np.ndarray  # each stage's forward compute
    backward_compute: np.ndarray  # each stage's backward compute (a recomputed forward included)
    update: np.ndarray  # each stage's update in MemoryX (16 bytes per parameter)
    update_start: np.ndarray  # when MemoryX starts each stage's update, from the last backward's start
    wait_s: float  # after the last backward: until MemoryX has updated the embedding and the first layer
    broadcast_s: float  # then SwarmX's tree latency before their new weights stream in


def _workload(model, context: int | None, dtype: str = MODEL_DTYPE) -> Workload:
    """``model`` if it is a workload, else its workload (a GPTConfig, or what ``as_config`` reads)."""
    return model if isinstance(model, Workload) else gpt_workload(model, context=context, dtype=dtype)


def _stages(model, context: int | None, dtype: str = MODEL_DTYPE) -> tuple[Workload, list[Stage]]:
    work = _workload(model, context, dtype)
    return work, pipeline_stages(work)


def _sram(cluster: Cluster) -> tuple[int, str]:
    """One wafer's SRAM on the PEs a program gets (not the marketed total), and how errors name it."""
    w = cluster.wafer
    sram = w.sram_bytes(w.pes)
    return sram, f"the {w.name}'s {sram:,} bytes of SRAM on the {w.width} x {w.height} PEs a program gets"


def _memory(work: Workload, stages: list[Stage], cluster: Cluster, recompute: bool,
            b: int) -> tuple[float, int]:
    """Bytes each wafer holds: two layers of weights (each layer checked against the SRAM), and the
    activations kept per sequence."""
    sram, where = _sram(cluster)
    weights = [s.params * b for s in stages]
    for s, nbytes in zip(stages, weights):
        if s.name != "embed" and 2 * nbytes > sram:
            raise ValueError(f"layer {s.name} needs {int(nbytes):,} bytes of weights, twice that to stream "
                             f"the next layer in beside it ({int(2 * nbytes):,}), over {where}")
    resident = 2 * max(weights[1:] or weights)  # two layers (the embedding lookup streams rows only)
    if recompute:  # each layer's input, and one layer's activations while it runs backward
        kept = sum(work.n_embd for s in stages if s.name != "head") + max(s.act_elems for s in stages)
    else:
        kept = sum(s.act_elems for s in stages)
    return float(resident), kept * work.context * b


def max_micro_batch(model, cluster: Cluster, context: int | None = None, recompute: bool = True,
                    dtype: str = MODEL_DTYPE) -> int:
    """The most sequences a wafer of ``cluster`` holds in one micro-batch beside two layers of
    weights: the SRAM cap on the micro-batch (0 if not even one sequence fits).

    Built in: 12_streaming
    """
    work, stages = _stages(model, context, dtype)
    resident, per_seq = _memory(work, stages, cluster, recompute, dtype_bytes(dtype))
    return max(0, int((_sram(cluster)[0] - resident) // per_seq))


def weight_streaming(model, cluster: Cluster, batch: int, context: int | None = None,
                     micro_batch: int | None = None, recompute: bool = True, dtype: str = MODEL_DTYPE,
                     level_s: float = SWARMX_LEVEL_S, update_bytes_per_s: float = UPDATE_BYTES_PER_S,
                     ) -> StreamingStep:
    """A training step of ``batch`` sequences (the global batch) of ``model`` (a GPTConfig, a GPT, or a
    workload) on ``cluster``, weight-streamed; ``micro_batch`` sequences per system at a time (by
    default the largest that fits in the wafer's SRAM, dividing the batch per system).

    Built in: 12_streaming
    """
    work, stages = _stages(model, context, dtype)
    context = work.context
    positive_int("batch", batch)
    if batch % cluster.systems:
        raise ValueError(f"batch={batch} sequences do not split evenly over {cluster.systems} systems")
    per_system = batch // cluster.systems
    w = cluster.wafer
    b = dtype_bytes(dtype)
    sram, where = _sram(cluster)
    c = work.n_embd
    weights = np.array([s.params * b for s in stages], dtype=float)
    resident, act_per_seq = _memory(work, stages, cluster, recompute, b)
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
    learned = work.config.positions == "learned"
    rows = tokens + (context if learned else 0)  # the token rows it reads, and the positions'
    streamed[0] = min(weights[0], rows * c * b)
    forward_compute = np.array([s.flops for s in stages]) * tokens / peak
    backward_compute = (3 if recompute else 2) * forward_compute
    stream = streamed / io
    forward = np.maximum(forward_compute, stream)
    backward = np.maximum(backward_compute, stream)  # weights in; gradients out on the other direction
    owned = np.array([sum(op.weight_params for op in ops) for ops in work.layers().values()], dtype=float)
    update = owned * UPDATE_BYTES_PER_PARAM / update_bytes_per_s  # a tied head owns no weights to update
    first = 1 if len(stages) > 1 else 0  # the first layer whose weights stream whole
    latency = swarmx_levels(cluster) * level_s  # SwarmX's tree, each way
    t, free = 0.0, 0.0  # from the start of the last micro-batch's backward pass; when MemoryX is free
    update_start = np.zeros(len(stages))
    for i in reversed(range(len(stages))):  # MemoryX updates in the order the gradients arrive
        update_start[i] = max(free, t + stream[i] + latency)  # streamed out in its slot, then reduced
        free = update_start[i] + update[i]
        t += backward[i]
    # the next step reads the embedding and the first layer first: it waits for their updates, then for
    # the tree to broadcast (their streams are in the next step's own slots)
    wait_s = max(0.0, float((update_start + update)[:first + 1].max()) - t)
    broadcast_s = latency
    boundary = wait_s + broadcast_s
    micro_batches = per_system // micro_batch
    step = micro_batches * float(forward.sum() + backward.sum()) + boundary
    flops = work.training_flops() * batch * context
    compute_bound = flops / cluster.peak_flops(dtype)
    compute = forward_compute + backward_compute
    busy = micro_batches * float(compute.sum()) + boundary  # the step if every stream were hidden
    limit = "I/O" if step > 1.05 * busy else "compute"  # waiting for streams costs over 5% of the step
    return StreamingStep(
        stages=[s.name for s in stages], micro_batch=micro_batch, micro_batches=micro_batches,
        forward=forward, backward=backward, compute=compute, io=2 * stream, boundary=boundary, step=step,
        tokens_per_s=batch * context / step, flops=flops, compute_bound=compute_bound,
        utilisation=compute_bound / step, limit=limit,
        sram_bytes=int(resident + micro_batch * act_per_seq), stream=stream,
        forward_compute=forward_compute, backward_compute=backward_compute, update=update,
        update_start=update_start, wait_s=wait_s, broadcast_s=broadcast_s)


@dataclass(frozen=True)
class Bar:
    """One bar of a step's timeline: its ``lane`` ("weights in", "compute", "gradients out",
    "update" in MemoryX, "boundary"), the stage it serves, what it does ("forward", "backward",
    "update", "boundary"), its start and end in seconds.

    Built in: 12_streaming
    """

    lane: str
    stage: str
    what: str
    start: float
    end: float


def timeline(step: StreamingStep) -> list[Bar]:
    """The last micro-batch of ``step`` and the update boundary as bars, on the model's own schedule:
    each stage's forward slot in order, then its backward slot in reverse order, lasting
    ``step.forward[i]`` and ``step.backward[i]``; in a slot the compute and the stream both start at
    its start. MemoryX's updates start at ``step.update_start``; after the last slot comes the
    boundary, ``step.boundary`` long. Time 0 is the start of the micro-batch.

    Built in: 12_streaming
    """
    bars: list[Bar] = []
    t = 0.0
    for i, name in enumerate(step.stages):
        bars.append(Bar("weights in", name, "forward", t, t + step.stream[i]))
        bars.append(Bar("compute", name, "forward", t, t + step.forward_compute[i]))
        t += step.forward[i]
    backward = t
    for i in reversed(range(len(step.stages))):
        name = step.stages[i]
        bars.append(Bar("weights in", name, "backward", t, t + step.stream[i]))
        bars.append(Bar("compute", name, "backward", t, t + step.backward_compute[i]))
        bars.append(Bar("gradients out", name, "backward", t, t + step.stream[i]))
        if step.update[i] > 0:  # a tied head's matrix is updated with the embedding
            start = backward + step.update_start[i]
            bars.append(Bar("update", name, "update", start, start + step.update[i]))
        t += step.backward[i]
    bars.append(Bar("boundary", step.stages[0], "boundary", t, t + step.boundary))
    return bars


@dataclass
class TrainingTime:
    """How long training takes: steps, seconds per step, days, and the FLOPs counted.

    Built in: 12_streaming
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

    Built in: 12_streaming
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

    Built in: 12_streaming
    """
    if not tokens >= 0 or math.isinf(tokens):
        raise ValueError(f"tokens={tokens!r} must be a non-negative, finite number of tokens")
    positive_int("gpus", gpus)
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu={mfu!r} must be in (0, 1]")
    work = _workload(model, context)
    return work.training_flops() * tokens / (gpus * gpu.peak_flops() * mfu) / 86400
