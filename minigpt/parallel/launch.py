"""Run a function in N processes joined in a process group, from a script, a test or a notebook.

``torchrun`` (chapter 07) starts processes from a command line. A chapter that compares strategies
wants to start a group, run one function in every process, and get each process's result back as a
Python value. :func:`spawn` does that: it starts ``world`` fresh Python processes (the "spawn" start
method, which is safe on every platform and after threads have run), joins them in a gloo process
group through a file in a temporary directory (no port to pick), calls ``fn(rank, world, *args)`` in
each, and returns the list of what each rank returned. The function must be importable by name (a
module's top-level function), because a fresh process finds it by its module and name.

Built in: 08_model_parallel
"""

from __future__ import annotations

import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _child(rank: int, fn: Callable, world: int, args: tuple, folder: str, threads: int) -> None:
    torch.set_num_threads(threads)
    store = dist.FileStore(str(Path(folder) / "store"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        dist.barrier()  # nobody leaves while a peer may still be sending to it
    except BaseException:
        (Path(folder) / f"{rank}.err").write_text(f"{time.time_ns()}\n{traceback.format_exc()}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    torch.save(result, Path(folder) / f"{rank}.pt")


def spawn(fn: Callable, world: int, *args: Any, timeout: float = 120.0, threads: int = 1) -> list[Any]:
    """Run ``fn(rank, world, *args)`` in ``world`` new processes in one gloo process group; return
    the list of their results, by rank. Each process gets ``threads`` CPU threads. A result may hold
    tensors, numbers, strings, lists, tuples and dicts (it travels as a ``weights_only`` file). If a
    rank raises, the others are stopped and a RuntimeError carries that rank's traceback; a run longer
    than ``timeout`` seconds is stopped with a TimeoutError.

    Built in: 08_model_parallel
    """
    if not (isinstance(world, int) and world >= 1):
        raise ValueError(f"world={world!r} must be a positive number of processes")
    if not callable(fn) or "<locals>" in getattr(fn, "__qualname__", "<locals>"):
        raise ValueError(f"fn={fn!r} must be a module's top-level function: a new process imports it "
                         f"by name")
    with tempfile.TemporaryDirectory(prefix="minigpt-spawn-") as folder:
        context = mp.start_processes(_child, args=(fn, world, args, folder, threads), nprocs=world,
                                     join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=0.05):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"spawn: {world} processes running {fn.__name__} did not finish "
                                       f"in {timeout} s")
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as error:
            raise RuntimeError(_first_failure(Path(folder), fn.__name__, error)) from None
        finally:
            for p in context.processes:
                if p.is_alive():
                    p.terminate()
        return [torch.load(Path(folder) / f"{r}.pt", weights_only=True) for r in range(world)]


def _first_failure(folder: Path, name: str, error: Exception) -> str:
    """The traceback of the rank that failed first: a rank whose peer died fails after it, in a
    collective ("connection closed", "connection reset"), which is not the cause."""
    errs = []
    for f in folder.glob("*.err"):
        stamp, _, text = f.read_text().partition("\n")
        errs.append((int(stamp), int(f.stem), text))
    if not errs:
        return f"a rank of {name} exited early: {error}"
    _, rank, text = min(errs)
    return f"rank {rank} of {name} failed:\n{text}"


class CollectiveCounter(TorchDispatchMode):
    """Counts, while active, the collectives this process issues, by operator (``allreduce_``,
    ``reduce_scatter_tensor``, ``all_reduce``, ...): ``seen[name]`` is [calls, bytes], the bytes of the
    largest tensor each call takes (its whole input or output). It watches the operators of the given
    namespaces: ``c10d`` (what ``torch.distributed`` dispatches, FSDP2's collectives included) and
    ``_c10d_functional`` (what DTensor calls).

    Built in: 08_model_parallel
    """

    def __init__(self, namespaces: tuple[str, ...] = ("c10d", "_c10d_functional")) -> None:
        super().__init__()
        self.namespaces = namespaces
        self.seen: dict[str, list[int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in self.namespaces:
            tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            count = self.seen.setdefault(func.__name__.split(".")[0], [0, 0])
            count[0] += 1
            count[1] += max(t.numel() * t.element_size() for t in tensors) if tensors else 0
        return func(*args, **kwargs)


def shard_range(n: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous share of ``n`` items split as evenly as ``world`` ranks allow (the
    first ``n % world`` ranks take one more)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank={rank} must be in [0, {world})")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


