"""Data parallelism: the process group under ``torchrun``, the ring all-reduce written out, and its cost.

``torchrun --nproc_per_node=N -m minigpt train ...`` starts N processes. Each holds a full copy of
the model, reads its own share of every global batch, and after the backward pass the gradients are
averaged across processes by an all-reduce, so every copy takes the same optimizer step. The Trainer
(:mod:`minigpt.train`) does this when a process group is up; this module starts one and models what
the all-reduce costs.

Built in: 07_data_parallel
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0 and 1 without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_by_torchrun() -> bool:
    """Whether the environment says this process is one of several started by ``torchrun``."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device: str = "auto") -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes in the environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT): NCCL when the processes train on CUDA, gloo on the CPU. Each CUDA
    process takes the GPU numbered by its LOCAL_RANK. Returns (rank, world size); without torchrun,
    (0, 1) and nothing is started.

    Built in: 07_data_parallel
    """
    if not launched_by_torchrun() or dist.is_initialized():
        return rank_and_world()
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} CUDA devices: "
                             f"start at most that many processes per node")
        torch.cuda.set_device(local)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return rank_and_world()


def stop() -> None:
    """Leave the process group, if there is one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device: str = "auto"):
    """``with session(): ...`` runs the block in the process group torchrun describes (see
    :func:`start`; without torchrun, in one process) and yields (rank, world size). If the block
    finishes, every process waits for the others before leaving: a process that tears its
    connections down while a peer is still using them can abort that peer. If it raises, the process
    leaves at once (the others may be stuck in a collective and would never arrive), and torchrun
    stops them.

    Built in: 07_data_parallel
    """
    ranks = start(device)
    try:
        yield ranks
    except BaseException:
        stop()
        raise
    if ranks[1] > 1:
        dist.barrier()
    stop()


def torchrun(nproc: int, *args: str, timeout: float | None = None, threads: int = 1,
             **kwargs) -> subprocess.CompletedProcess:
    """Run ``torchrun --standalone --nproc_per_node=nproc ARGS`` (a script, or ``-m module``) with this
    Python and return the finished process, output captured as text. ``--standalone`` picks a free
    local port, so runs never collide; each process gets ``threads`` CPU threads. If any process
    fails, torchrun stops the others and exits non-zero.

    Built in: 07_data_parallel
    """
    if nproc < 1:
        raise ValueError(f"nproc={nproc} must be at least 1")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **kwargs.pop("env", {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, **kwargs)


def mean_over_ranks(value: float, device="cpu") -> float:
    """The mean of a number across all processes (every process must call it); the number itself
    without a process group."""
    _, world = rank_and_world()
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / world


# -- the ring all-reduce, written out --------------------------------------------------------------
def ring_allreduce(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
    """Sum ``tensors`` (one per simulated rank, all the same shape) the way a ring all-reduce does,
    and count the bytes each rank sends.

    Each tensor is cut into N chunks. In N - 1 reduce-scatter steps, rank r sends one chunk to rank
    r + 1, which adds it to its own copy; afterwards rank r holds the full sum of chunk r + 1. In N - 1
    all-gather steps the finished chunks travel once more around the ring. Every rank sends
    2 (N - 1) chunks of size/N: 2 (N - 1) / N of the tensor, however many ranks there are.

    Returns each rank's result (all equal to the sum) and the bytes each rank sent.

    Built in: 07_data_parallel
    """
    n = len(tensors)
    if n < 1:
        raise ValueError("ring_allreduce needs at least one tensor")
    shape = tensors[0].shape
    if any(t.shape != shape for t in tensors):
        raise ValueError(f"all tensors must have one shape; got {sorted({tuple(t.shape) for t in tensors})}")
    chunks = [list(t.detach().flatten().clone().tensor_split(n)) for t in tensors]
    sent = [0] * n
    for phase in ("reduce-scatter", "all-gather"):
        for step in range(n - 1):
            # everyone sends at once: take the messages before anyone updates
            messages = []
            for r in range(n):
                c = (r - step + (0 if phase == "reduce-scatter" else 1)) % n
                messages.append((c, chunks[r][c].clone()))
                sent[r] += chunks[r][c].numel() * chunks[r][c].element_size()
            for r in range(n):
                c, data = messages[(r - 1) % n]
                chunks[r][c] = chunks[r][c] + data if phase == "reduce-scatter" else data
    return [torch.cat(c).view(shape) for c in chunks], sent


def ring_bytes_per_rank(nbytes: float, world: int) -> float:
    """Bytes each rank sends in a ring all-reduce of ``nbytes``: 2 (N - 1) / N of them."""
    if world < 1:
        raise ValueError(f"world={world} must be at least 1")
    return 2 * (world - 1) / world * nbytes


@dataclass(frozen=True)
class LinkModel:
    """The alpha-beta model of a message: ``alpha`` seconds to start one, ``beta`` bytes per second
    after that. A ring all-reduce of ``nbytes`` over N ranks is 2 (N - 1) messages of nbytes / N
    in sequence: ``2 (N - 1) alpha + 2 (N - 1) / N x nbytes / beta``.

    Built in: 07_data_parallel
    """

    alpha: float
    beta: float

    def message(self, nbytes: float) -> float:
        return self.alpha + nbytes / self.beta

    def ring_allreduce(self, nbytes: float, world: int) -> float:
        if world == 1:
            return 0.0
        return 2 * (world - 1) * self.alpha + ring_bytes_per_rank(nbytes, world) / self.beta

    @classmethod
    def fit(cls, sizes, seconds) -> LinkModel:
        """alpha and beta from message times (seconds against bytes), fitted by least squares
        on relative errors, so that the small messages (which fix alpha) count as much as the large
        ones (which fix beta)."""
        sizes, seconds = np.asarray(sizes, float), np.asarray(seconds, float)
        if len(sizes) < 2 or len(sizes) != len(seconds):
            raise ValueError(f"need two or more (size, time) pairs of equal count; got {len(sizes)} sizes "
                             f"and {len(seconds)} times")
        slope, intercept = np.polyfit(sizes, seconds, 1, w=1.0 / seconds)
        if slope <= 0:
            raise ValueError(f"the times do not grow with the size (slope {slope:.3g} s/byte): "
                             f"measure larger messages")
        return cls(alpha=max(float(intercept), 0.0), beta=1.0 / float(slope))


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _ping_pong(buf: torch.Tensor, rank: int) -> None:
    if rank == 0:
        dist.send(buf, 1)
        dist.recv(buf, 1)
    elif rank == 1:
        dist.recv(buf, 0)
        dist.send(buf, 0)


def _exchange(send: torch.Tensor, recv: torch.Tensor, rank: int) -> None:
    if rank in (0, 1):
        for request in [dist.isend(send, 1 - rank), dist.irecv(recv, 1 - rank)]:
            if request is None:  # torch returns no request to a process outside the group
                raise RuntimeError(f"rank {rank} is not in the default process group")
            request.wait()


def _time_sizes(op, sizes: list[int], repeats: int, buffers: int = 1) -> list[float]:
    """For each size in bytes: ``op`` on ``buffers`` float32 tensors of that size, once to warm up,
    then the median over ``repeats`` timed calls."""
    out = []
    for size in sizes:
        call = functools.partial(op, *(torch.zeros(max(1, size // 4)) for _ in range(buffers)))
        call()
        out.append(_median_time(call, repeats))
    return out


def _rank_of_a_pair(what: str) -> int:
    rank, world = rank_and_world()
    if world < 2:
        raise ValueError(f"{what} needs a process group of two or more (start it with torchrun)")
    return rank


def time_messages(sizes: list[int], repeats: int = 10) -> list[float]:
    """One-way message times between ranks 0 and 1 (half a measured ping-pong), per size in bytes.
    Every process of the group must call it; ranks other than 0 and 1 wait."""
    rank = _rank_of_a_pair("time_messages")
    return [t / 2 for t in _time_sizes(functools.partial(_ping_pong, rank=rank), sizes, repeats)]


def time_exchanges(sizes: list[int], repeats: int = 10) -> list[float]:
    """Times for ranks 0 and 1 to send each other ``size`` bytes at the same time: one step of a ring
    with two ranks, where every link carries traffic both ways at once."""
    rank = _rank_of_a_pair("time_exchanges")
    return _time_sizes(functools.partial(_exchange, rank=rank), sizes, repeats, buffers=2)


def time_allreduce(sizes: list[int], repeats: int = 10) -> list[float]:
    """All-reduce (sum) times of float32 tensors of each size in bytes, median over ``repeats``.
    Every process of the group must call it."""
    return _time_sizes(dist.all_reduce, sizes, repeats)


def measure(sizes: list[int], nproc: int = 2, repeats: int = 10, timeout: float = 300) -> dict:
    """Start ``nproc`` gloo processes with torchrun and time, for each size in bytes, a one-way
    message between two of them and an all-reduce across all of them (medians over ``repeats``).
    Returns ``{"sizes": [...], "message": [...], "exchange": [...], "allreduce": [...]}`` in seconds
    (``exchange``: both processes sending ``size`` bytes to each other at once).

    Built in: 07_data_parallel
    """
    if nproc < 2:
        raise ValueError(f"nproc={nproc}: measuring messages takes at least 2 processes")
    if not sizes or min(sizes) < 4:
        raise ValueError(f"sizes={sizes} must be byte counts of 4 or more")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.json"
        proc = torchrun(nproc, "-m", "minigpt.distributed", str(out), str(repeats), *map(str, sizes),
                        timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"the measurement failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        return json.loads(out.read_text())


def _measure_main(out: str, repeats: str, *sizes: str) -> None:
    with session("cpu") as (rank, world):
        sizes_, n = [int(s) for s in sizes], int(repeats)
        result = {"sizes": sizes_, "world": world, "message": time_messages(sizes_, n),
                  "exchange": time_exchanges(sizes_, n), "allreduce": time_allreduce(sizes_, n)}
        if rank == 0:
            Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    _measure_main(*sys.argv[1:])
