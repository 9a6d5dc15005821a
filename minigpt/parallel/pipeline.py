"""Pipeline parallelism: a GPT's layers split into stages, one per process, and micro-batches passed
from stage to stage by point-to-point sends, under two schedules written out.

A stage holds a contiguous run of blocks (:class:`GPTStage`; the first also the embeddings, the last
also the final LayerNorm, the head and the loss). A batch is cut into ``m`` micro-batches. Stage s
runs micro-batch i's forward when stage s - 1 has sent its activations, and its backward when stage
s + 1 has sent the gradient of those activations. Which of its ready pieces of work a stage does next
is the *schedule* (:func:`schedule_order`):

- **GPipe** (Huang et al., 2019): every forward, then every backward. Stage s holds the activations of
  all ``m`` micro-batches at the turn.
- **1F1B** (Narayanan et al., 2019, PipeDream): ``p - s - 1`` forwards to fill the pipe, then one
  forward and one backward in turn, then the remaining backwards. Stage s holds at most ``p - s``.

Both leave each stage idle for the same share of the step, the *bubble* ``(p - 1) / (m + p - 1)``,
when every stage takes the same time. The schedules' arithmetic (their orders, the formulas, the ideal
timeline and the bubble of a timeline) lives in :mod:`minigpt.parallel.schedules` and is imported here
too. This module runs a real pipeline: :func:`run_schedule` runs one stage of a step and records, for
every forward and backward, when it started and ended on the machine's clock and how much CPU time its
thread spent on it, so that the bubble can be measured on the wall clock and replayed from the
stages' own work.

Built in: 08_model_parallel
"""

from __future__ import annotations

import copy
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from minigpt.checks import positive_int
from minigpt.model import GPT, GPTConfig, require_gpt2
from minigpt.parallel.launch import shard_range
from minigpt.parallel.schedules import SCHEDULES, Event, schedule_order

# the schedules' arithmetic, re-exported (``x as x``) for code that imports it from here
from minigpt.parallel.schedules import bubble_formula as bubble_formula
from minigpt.parallel.schedules import bubble_fraction as bubble_fraction
from minigpt.parallel.schedules import peak_in_flight_formula as peak_in_flight_formula
from minigpt.parallel.schedules import replay_schedule as replay_schedule
from minigpt.parallel.schedules import simulate_schedule as simulate_schedule


def stage_layers(n_layer: int, stages: int) -> list[range]:
    """The blocks each of ``stages`` stages holds: contiguous runs, as even as ``n_layer`` allows.

    Built in: 08_model_parallel
    """
    positive_int("stages", stages)
    if stages > n_layer:
        raise ValueError(f"stages={stages} must be at most n_layer={n_layer}: each stage needs a block")
    return [range(s.start, s.stop) for s in (shard_range(n_layer, r, stages) for r in range(stages))]


class _StageBody(nn.Module):
    """A stage's share of the GPT's ``transformer``: the embeddings (first stage), its blocks under
    their global indices, the final LayerNorm (last stage). Copies, so stages never share a tensor."""

    wte: nn.Embedding  # first stage only
    wpe: nn.Embedding
    drop: nn.Dropout
    ln_f: nn.Module  # last stage only

    def __init__(self, gpt: GPT, layers: range, first: bool, last: bool):
        super().__init__()
        if first:
            self.wte = copy.deepcopy(gpt.transformer.wte)
            self.wpe = copy.deepcopy(gpt.transformer.wpe)
            self.drop = copy.deepcopy(gpt.transformer.drop)
        # a ModuleDict keyed by the global index keeps the GPT's names: transformer.h.<i>.*
        self.h = nn.ModuleDict({str(i): copy.deepcopy(gpt.transformer.h[i]) for i in layers})
        if last:
            self.ln_f = copy.deepcopy(gpt.transformer.ln_f)


class GPTStage(nn.Module):
    """Stage ``stage`` of ``stages`` of a GPT: a copy of its blocks, plus the embeddings on the first
    stage and the final LayerNorm and head on the last. Parameter names are the GPT's
    (``transformer.h.3.attn.c_attn.weight``), so a stage's gradients compare name by name with the
    whole model's.

    The GPT ties its head to the token embedding: one matrix, used at both ends. Here the two ends live
    in different processes, so the last stage holds its own copy (``lm_head.weight``) and, after the
    backward, the two copies' gradients are added (:func:`sync_tied_gradients`) as the GPT adds the two
    uses' contributions into one ``.grad``.

    Built in: 08_model_parallel
    """

    lm_head: nn.Linear  # last stage only

    def __init__(self, gpt: GPT, stage: int, stages: int):
        super().__init__()
        config = gpt.config
        require_gpt2(config, "GPTStage")
        if config.n_expert:
            raise ValueError(f"n_expert={config.n_expert}: a mixture of experts adds a load-balancing loss "
                             f"from every block, which these stages do not carry; use n_expert=0")
        layers = stage_layers(config.n_layer, stages)
        if not 0 <= stage < stages:
            raise ValueError(f"stage={stage} must be in [0, {stages})")
        self.config, self.stage, self.stages = config, stage, stages
        self.first, self.last = stage == 0, stage == stages - 1
        self.layers = layers[stage]
        self.transformer = _StageBody(gpt, self.layers, self.first, self.last)
        if self.last:
            self.lm_head = copy.deepcopy(gpt.lm_head)  # a copy of the tied matrix, untied
            if self.first:  # one stage: the whole GPT, tied as it is
                self.lm_head.weight = self.transformer.wte.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """First stage: token ids (B, T); other stages: hidden states (B, T, C). Returns hidden states
        (B, T, C), or on the last stage the logits (B, T, vocab)."""
        config = self.config
        if self.first:
            pos = torch.arange(x.shape[1], device=x.device)
            x = self.transformer.wte(x) + self.transformer.wpe(pos)  # (B, T, C)
            if config.mup and config.mup_input_mult != 1.0:
                x = x * config.mup_input_mult
            x = self.transformer.drop(x)
        for block in self.transformer.h.values():
            x = block(x)
        if self.last:
            x = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab)
            if config.mup:
                x = x * (config.mup_output_mult / config.width_mult)
        return x


# --- running a schedule in processes ------------------------------------------------------------------

@dataclass
class StageRun:
    """What one stage recorded in one step: the batch's loss (on the last stage; 0 elsewhere), its
    events (kind, micro-batch, start, end) in seconds of the machine's monotonic clock, the CPU time
    (seconds) the stage's thread spent on each of them (``cpu``, in the order of ``events``), the most
    micro-batches whose activations it held at once, and the bytes autograd saved for the backward
    (per micro-batch, and at the peak).

    A piece's wall-clock time is its CPU time plus the time its thread waited for a core; when other
    processes share the cores, the first grows and the second does not.

    Built in: 08_model_parallel
    """

    loss: float
    events: list[Event] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    peak_in_flight: int = 0
    saved_bytes: list[int] = field(default_factory=list)
    peak_saved_bytes: int = 0

    def as_dict(self) -> dict:
        """Plain values, to travel back from a process."""
        return {"loss": self.loss, "events": list(self.events), "cpu": list(self.cpu),
                "peak_in_flight": self.peak_in_flight,
                "saved_bytes": list(self.saved_bytes), "peak_saved_bytes": self.peak_saved_bytes}


@contextmanager
def _count_saved(module: nn.Module, into: list[int]) -> Iterator[None]:
    """Add to ``into[0]`` the bytes of every tensor autograd saves for the backward inside the block,
    parameters left out (they are held anyway) and each storage counted once."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            into[0] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


class _Inbox:
    """Receives micro-batch 0, 1, 2, ... from one neighbour, each with its receive posted while the
    previous one is used: the message can arrive while this stage computes, instead of the sender
    waiting until this stage asks for it."""

    def __init__(self, peer: int, shape: tuple[int, ...], dtype: torch.dtype, count: int):
        self.peer, self.shape, self.dtype, self.count = peer, shape, dtype, count
        self.posted: dict[int, tuple[torch.Tensor, dist.Work]] = {}
        self._post(0)

    def _post(self, i: int) -> None:
        if i < self.count:
            buffer = torch.empty(self.shape, dtype=self.dtype)
            work = dist.irecv(buffer, self.peer, tag=i)
            if work is None:  # only a rank outside the group gets None
                raise RuntimeError(f"irecv from rank {self.peer} was not posted")
            self.posted[i] = (buffer, work)

    def take(self, i: int) -> torch.Tensor:
        buffer, work = self.posted.pop(i)
        work.wait()
        self._post(i + 1)
        return buffer


class _Outbox:
    """Sends in a thread of its own, in the order given: a send that waits until its receiver takes
    the message (gloo writes to the socket from the caller's thread) then holds up only this thread,
    not the stage's next piece of work, as a GPU's copy engine sends while its cores compute."""

    def __init__(self) -> None:
        self.queue: queue.Queue[tuple[torch.Tensor, int, int] | None] = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            tensor, peer, tag = item
            try:
                dist.send(tensor, peer, tag=tag)
            except BaseException as error:  # raised again in the stage's thread by close()
                self.error = error
                return

    def send(self, tensor: torch.Tensor, peer: int, tag: int) -> None:
        self.queue.put((tensor, peer, tag))

    def close(self) -> None:
        """Wait until every message has been sent."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def run_schedule(stage: GPTStage, schedule: str, idx: torch.Tensor, targets: torch.Tensor,
                 micro_batches: int) -> StageRun:
    """Run one training step's forwards and backwards of ``stage`` in this process, under ``schedule``,
    over ``micro_batches`` equal slices of the batch ``idx``, ``targets`` (B, T) (every rank passes the
    whole batch; the first stage reads ``idx``, the last ``targets``). Activations go to rank s + 1 and
    their gradients come back to rank s - 1 (tag: the micro-batch): sends go from a thread of their
    own, and the receive for the next micro-batch is posted while the current one is used. Each forward
    and backward is timed on the wall clock (``time.perf_counter``) and in this thread's CPU time
    (``time.thread_time``), around the computation only: receiving and sending are outside. Gradients
    accumulate in ``.grad``: the last stage divides each micro-batch's summed cross-entropy by the
    batch's count of targets, so the step's loss and gradients are the whole batch's mean.

    The process group's rank must be the stage's index. Call :func:`sync_tied_gradients` afterwards.

    Built in: 08_model_parallel
    """
    if dist.get_world_size() != stage.stages or dist.get_rank() != stage.stage:
        raise ValueError(f"stage {stage.stage} of {stage.stages} must run on rank {stage.stage} of "
                         f"{stage.stages}; this is rank {dist.get_rank()} of {dist.get_world_size()}")
    positive_int("micro_batches", micro_batches)
    if idx.shape[0] % micro_batches:
        raise ValueError(f"batch of {idx.shape[0]} must split into micro_batches={micro_batches} "
                         f"equal slices")
    s = stage.stage
    order = schedule_order(schedule, s, stage.stages, micro_batches)
    # contiguous copies: a view would share (and be counted with) the whole batch's storage
    xs = [c.clone() for c in idx.chunk(micro_batches)]
    ys = targets.chunk(micro_batches)
    n_targets = (targets != -100).sum()
    dtype = next(stage.parameters()).dtype
    shape = (xs[0].shape[0], xs[0].shape[1], stage.config.n_embd)
    # activations come from s - 1 and gradients from s + 1, each in micro-batch order
    activations = None if stage.first else _Inbox(s - 1, shape, dtype, micro_batches)
    gradients = None if stage.last else _Inbox(s + 1, shape, dtype, micro_batches)
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    held: dict[int, int] = {}
    run = StageRun(loss=0.0)
    outbox = _Outbox()
    for kind, i in order:
        if kind == "F":
            if activations is None:
                x = xs[i]
            else:
                x = activations.take(i).requires_grad_(True)
            saved = [0]
            start, cpu = time.perf_counter(), time.thread_time()
            with _count_saved(stage, saved):
                out = stage(x)
                if stage.last:
                    out = F.cross_entropy(out.flatten(0, 1).float(), ys[i].flatten(), ignore_index=-100,
                                          reduction="sum") / n_targets
            end, cpu = time.perf_counter(), time.thread_time() - cpu
            if stage.last:
                run.loss += out.item()
            else:
                outbox.send(out.detach(), s + 1, tag=i)
            inputs[i], outputs[i], held[i] = x, out, saved[0]
            run.saved_bytes.append(saved[0])
            run.peak_in_flight = max(run.peak_in_flight, len(held))
            run.peak_saved_bytes = max(run.peak_saved_bytes, sum(held.values()))
        else:
            out, x = outputs.pop(i), inputs.pop(i)
            grad = None if gradients is None else gradients.take(i)
            start, cpu = time.perf_counter(), time.thread_time()
            torch.autograd.backward(out, grad)  # on CPU, autograd runs the graph in this thread
            end, cpu = time.perf_counter(), time.thread_time() - cpu
            del held[i]
            if not stage.first:
                assert x.grad is not None  # the received activation requires its gradient
                outbox.send(x.grad, s - 1, tag=i)
        run.events.append((kind, i, start, end))
        run.cpu.append(cpu)
    outbox.close()
    return run


def _isend(tensor: torch.Tensor, peer: int, tag: int = 0) -> dist.Work:
    work = dist.isend(tensor, peer, tag=tag)
    if work is None:  # only a rank outside the group gets None; every stage is in it
        raise RuntimeError(f"isend to rank {peer} was not posted")
    return work


def sync_tied_gradients(stage: GPTStage) -> None:
    """Add the head's gradient (last stage) and the token embedding's (first stage) on both, as one
    process adds the two uses of the tied matrix into one gradient. Nothing to do on one stage or on
    the stages in between.

    Built in: 08_model_parallel
    """
    if stage.stages == 1 or not (stage.first or stage.last):
        return
    mine = stage.transformer.wte.weight if stage.first else stage.lm_head.weight
    peer = stage.stages - 1 if stage.first else 0
    if mine.grad is None:
        raise ValueError("run the backward (run_schedule) before syncing the tied gradients")
    theirs = torch.empty_like(mine.grad)
    work = _isend(mine.grad.clone(), peer)
    dist.recv(theirs, peer)
    work.wait()
    mine.grad += theirs


def pipeline_worker(rank: int, world: int, config: GPTConfig, seed: int, idx: torch.Tensor,
                    targets: torch.Tensor, runs: list[tuple[str, int]], grads_for: int = 0,
                    warmup: bool = False, dtype: torch.dtype = torch.float32) -> list[dict]:
    """For :func:`minigpt.parallel.launch.spawn`: build the GPT from ``seed`` (in ``dtype``),
    keep stage ``rank`` of ``world``, and run one step per (schedule, micro-batches) in ``runs``, each
    from zero gradients. Returns one dict per run: :meth:`StageRun.as_dict`, plus, for the first
    ``grads_for`` runs, the stage's gradients by parameter name (the tied matrix's already summed).
    ``warmup`` runs the first entry once, unrecorded, first (the first step of a process allocates
    its memory and is slower).

    Built in: 08_model_parallel
    """
    torch.manual_seed(seed)
    stage = GPTStage(GPT(config).to(dtype), rank, world)
    if not runs:
        raise ValueError("runs is empty: give at least one (schedule, micro_batches)")
    out: list[dict] = []
    for n, (schedule, m) in enumerate(([runs[0]] if warmup else []) + list(runs)):
        stage.zero_grad(set_to_none=True)
        dist.barrier()  # every stage starts the step together
        record = run_schedule(stage, schedule, idx, targets, m)
        sync_tied_gradients(stage)
        if warmup and n == 0:
            continue
        result = record.as_dict() | {"schedule": schedule, "micro_batches": m, "stage": rank}
        if len(out) < grads_for:
            result["grads"] = {name: p.grad.clone() for name, p in stage.named_parameters()
                               if p.grad is not None}
        out.append(result)
    return out


def torch_pipeline_worker(rank: int, world: int, config: GPTConfig, seed: int, idx: torch.Tensor,
                          targets: torch.Tensor, runs: list[tuple[str, int]],
                          dtype: torch.dtype = torch.float32) -> list[dict]:
    """The same stages run by torch's own pipeline (``torch.distributed.pipelining``): for each
    (schedule, micro-batches) in ``runs``, each rank wraps its :class:`GPTStage` in a
    ``PipelineStage`` and steps ``ScheduleGPipe`` or ``Schedule1F1B``, which work out the activations'
    shapes, post the sends and receives, and divide the accumulated gradients by ``m``. Each
    micro-batch's loss is its mean cross-entropy, so the step is the batch's when every micro-batch
    has as many targets (no ignored positions). Returns, per run, the loss (last stage: the mean of
    the micro-batches' losses) and the gradients by parameter name.

    Built in: 08_model_parallel
    """
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    for schedule, _ in runs:
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r} must be one of {SCHEDULES}")
    torch.manual_seed(seed)
    stage = GPTStage(GPT(config).to(dtype), rank, world)

    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100)

    out = []
    for schedule, m in runs:
        stage.zero_grad(set_to_none=True)
        pipe = PipelineStage(stage, rank, world, torch.device("cpu"))
        kind = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
        steps = kind(pipe, m, loss_fn=loss_fn)
        losses: list[torch.Tensor] = []
        args = (idx,) if stage.first else ()
        if stage.last:
            steps.step(*args, target=targets, losses=losses)
        else:
            steps.step(*args)
        sync_tied_gradients(stage)
        out.append({"loss": torch.stack(losses).mean().item() if stage.last else 0.0,
                    "grads": {n: p.grad.clone() for n, p in stage.named_parameters()
                              if p.grad is not None}})
    return out
